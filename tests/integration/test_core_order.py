"""Issue 9 item 14: same key, in order (README: "same key: in order"), also when a record has to
wait for its idempotency key (parking) or is retried in place."""
from __future__ import annotations

import time

import pytest

from afctest import ConsumerProcess, produce_json, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.redis]

KEYS, PER_KEY = ("ka", "kb", "kc"), 10


def sequences(redis_client, lists: str) -> dict[str, list[int]]:
    return {k: [int(x) for x in redis_client.lrange(f"{lists}:{k}", 0, -1)] for k in KEYS}


def test_async_handler_keeps_key_order_when_records_wait_for_their_idempotency_key(
        testbed, make_topic, names, redis_client, tmp_path) -> None:
    """Item 14 (same-key order broken by parking): another consumer process of the group (B,
    on another topic) holds the idempotency keys of records 3 and 7 of each key for a while,
    then dies (SIGKILL; its claims expire after its 2 s lease). The consumer under test (A,
    async handler) must run every key's records in offset order: 4..6 wait behind 3. Today
    the parked record runs last, after its successors."""
    src = make_topic("in", partitions=3)
    holder_topic = make_topic("holder", partitions=1)
    lists = f"{names.redis_prefix}seq"
    held = [(k, s) for k in KEYS for s in (3, 7)]
    b = ConsumerProcess(testbed, [holder_topic], names.group, "afc_test_handlers:sleep_and_record", tmp_path / "b.log",
                        instance_id=f"{names.stem}-b", redis_prefix=names.redis_prefix,
                        env={"AFC_TEST_HASH": f"{names.redis_prefix}b-runs", "AFC_TEST_SLEEP_MS": "60000",
                             "AFC_IDEMPOTENCY__LEASE_MS": "2000"}).start()
    a = ConsumerProcess(testbed, [src], names.group, "afc_test_handlers:async_ordered", tmp_path / "a.log",
                        instance_id=f"{names.stem}-a", redis_prefix=names.redis_prefix,
                        env={"AFC_TEST_LIST": lists, "AFC_TEST_MAX_CONC": f"{names.redis_prefix}conc"})
    try:
        b.wait_ready()
        produce_json(testbed.bootstrap, holder_topic, [{"n": f"{k}-{s}"} for k, s in held],
                     headers_of=lambda i, d: [("idempotency-key", f"idk-{d['n']}".encode())])
        wait_for(lambda: b.metrics().get("afc_inflight_messages", 0) >= len(held), 30, 0.1,
                 what="B holding the keys (its handler sleeps 60 s)")
        time.sleep(0.5)
        a.start()
        a.wait_ready()
        docs = [{"k": k, "seq": s} for s in range(PER_KEY) for k in KEYS]
        produce_json(testbed.bootstrap, src, docs, key_of=lambda i, d: d["k"].encode(),
                     headers_of=lambda i, d: [("idempotency-key", f"idk-{d['k']}-{d['seq']}".encode())])
        time.sleep(4)                               # A meets the held keys
        b.kill9()
        wait_for(lambda: all(len(v) >= PER_KEY for v in sequences(redis_client, lists).values())
                 or a.proc.poll() is not None, 40, 0.3, what="every record handled once B's claims expired")
        got = sequences(redis_client, lists)
    finally:
        if b.proc is not None and b.proc.poll() is None:
            b.kill9()
        b._log.close()
        if a.proc is not None:
            a.stop()
    wrong = {k: v for k, v in got.items() if v != list(range(PER_KEY))}
    assert not wrong, f"records of a key ran out of offset order (held: 3 and 7): {wrong}"


def test_in_place_retry_keeps_key_order(testbed, make_topic, names, redis_client, tmp_path) -> None:
    """Item 14 (same-key order broken by in-place retry resubmission): with routing off
    (AFC_ROUTING__ENABLED=false), record 2 of key ka fails transiently twice; the later
    records of ka may run only after it succeeded. Today they run while it waits to be
    resubmitted."""
    topic = make_topic("in", partitions=1)
    lists = f"{names.redis_prefix}seq"
    docs = [{"n": f"{k}-{s}", "seq": s, **({"fail_times": 2} if (k, s) == ("ka", 2) else {})}
            for s in range(PER_KEY) for k in KEYS]
    produce_json(testbed.bootstrap, topic, docs, key_of=lambda i, d: d["n"].split("-")[0].encode())
    c = ConsumerProcess(testbed, [topic], names.group, "afc_test_handlers:ordered_flaky", tmp_path / "c.log",
                        instance_id=f"{names.stem}-0", redis_prefix=names.redis_prefix,
                        env={"AFC_TEST_LIST": lists, "AFC_ROUTING__ENABLED": "false"}).start()
    try:
        wait_for(lambda: all(len(v) >= PER_KEY for v in sequences(redis_client, lists).values())
                 or c.proc.poll() is not None, 40, 0.3, what="every record handled")
        got = sequences(redis_client, lists)
    finally:
        assert c.stop() == 0, c.log_tail()
    assert int(redis_client.hget(f"{lists}:tries", "ka-2")) == 3          # failed twice, then succeeded
    wrong = {k: v for k, v in got.items() if v != list(range(PER_KEY))}
    assert not wrong, f"records of a key ran out of offset order (ka/2 failed twice): {wrong}"
