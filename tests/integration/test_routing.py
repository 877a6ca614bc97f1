"""Failure routing on the real broker: poison, dead-letter, retry with due times, replay."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest

from afc.runtime.routing import (H_ATTEMPTS, H_CLASS, H_ERR_CLASS, H_ERR_MESSAGE, H_ERR_STACK, H_FAILED_AT,
                                 H_GROUP, H_ORIG_OFFSET, H_ORIG_PARTITION, H_ORIG_TIMESTAMP, H_ORIG_TOPIC,
                                 H_ROUTING_ID)
from afctest import ROOT, ConsumerProcess, group_lag, produce_json, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.redis]
ALL_HEADERS = {H_ORIG_TOPIC, H_ORIG_PARTITION, H_ORIG_OFFSET, H_ORIG_TIMESTAMP, H_GROUP, H_ERR_CLASS,
               H_ERR_MESSAGE, H_ERR_STACK, H_ATTEMPTS, H_FAILED_AT, H_CLASS, H_ROUTING_ID, "idempotency-key"}


def read_topic(bootstrap: str, topic: str, want: int, timeout: float = 30) -> list:
    from confluent_kafka import Consumer
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{time.time_ns()}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    out = []
    try:
        c.subscribe([topic])
        end = time.monotonic() + timeout
        while len(out) < want and time.monotonic() < end:
            m = c.poll(0.2)
            if m is not None and not m.error():
                out.append(m)
        # and nothing more behind them
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            m = c.poll(0.2)
            if m is not None and not m.error():
                out.append(m)
    finally:
        c.close()
    return out


def headers(m) -> dict[str, bytes]:
    return dict(m.headers() or [])


def run(testbed, names, tmp_path, topic, env=None, name="c") -> ConsumerProcess:
    return ConsumerProcess(testbed, [topic], names.group, "afc_test_handlers:scripted", tmp_path / f"{name}.log",
                           instance_id=f"{names.stem}-0", redis_prefix=names.redis_prefix,
                           env={"AFC_TEST_HASH": f"{names.redis_prefix}runs", **(env or {})})


def test_bad_records_land_on_the_right_topic_with_history_and_the_partition_flows(
        testbed, make_topic, names, redis_client, tmp_path) -> None:
    from confluent_kafka import Producer
    topic = make_topic("in", partitions=1)
    c = run(testbed, names, tmp_path, topic).start()
    try:
        c.wait_ready()
        p = Producer({"bootstrap.servers": testbed.bootstrap, "message.max.bytes": 8 * 1024 * 1024})
        huge = json.dumps({"pad": "x" * (2 * 1024 * 1024)}).encode()
        stream = [json.dumps({"n": 0}).encode(), b"{not json", json.dumps({"n": 1}).encode(), b"",
                  json.dumps({"n": 2}).encode(), huge, json.dumps({"n": 3}).encode(),
                  json.dumps({"fail": "always"}).encode()] + [json.dumps({"n": i}).encode() for i in range(4, 10)]
        for v in stream:
            p.produce(topic, value=v, key=b"k")
        assert p.flush(30) == 0
        poison = read_topic(testbed.bootstrap, topic + ".poison", 3)
        dlq = read_topic(testbed.bootstrap, topic + ".dlq", 1)
        wait_for(lambda: group_lag(testbed.bootstrap, topic, names.group)[1] == 0, 30, 0.3, what="source drained")
        m = c.metrics()
        # the member's health record (read by the operator's canary gates): its loop's counters
        key = f"{names.redis_prefix.rstrip(':')}:bp:{names.group}:{names.stem}-0"

        def counts() -> dict | None:
            raw = redis_client.get(key)
            return json.loads(raw).get("counts") if raw else None
        health = wait_for(lambda: (x := counts()) and x["deadLettered"] == 4 and x, 10, 0.2, what="health counters")
    finally:
        assert c.stop() == 0, c.log_tail()
    assert [x.offset() for x in poison] != [] and len(poison) == 3 and len(dlq) == 1
    assert sorted(int(headers(x)[H_ORIG_OFFSET]) for x in poison) == [1, 3, 5]
    assert int(headers(dlq[0])[H_ORIG_OFFSET]) == 7
    for rec, cls in [(x, b"POISON") for x in poison] + [(dlq[0], b"PERMANENT")]:
        h = headers(rec)
        assert ALL_HEADERS <= set(h), ALL_HEADERS - set(h)
        assert h[H_CLASS] == cls and h[H_ORIG_TOPIC] == topic.encode() and h[H_GROUP] == names.group.encode()
        assert h[H_ATTEMPTS] == b"1" and b"Traceback" in h[H_ERR_STACK] or cls == b"POISON"
        assert rec.key() == b"k"
        # within a second of being produced
        assert int(h[H_FAILED_AT]) - int(h[H_ORIG_TIMESTAMP]) <= 1000, (h[H_FAILED_AT], h[H_ORIG_TIMESTAMP])
    by_offset = {int(headers(x)[H_ORIG_OFFSET]): x for x in poison}
    assert by_offset[1].value() == b"{not json" and by_offset[3].value() in (b"", None)
    assert by_offset[5].value() == huge                                    # 2 MiB, intact
    assert b"exceeds maxMessageBytes" in headers(by_offset[5])[H_ERR_MESSAGE]
    assert headers(dlq[0])[H_ERR_CLASS] == b"builtins.ValueError"
    ran = redis_client.hgetall(f"{names.redis_prefix}runs")
    assert len(ran) == 10                                                 # every good record handled
    assert m['afc_rebalances_total{kind="assign"}'] == 1                   # one join, no rebalance since
    assert m.get('afc_rebalances_total{kind="revoke"}', 0) == 0 and m.get('afc_rebalances_total{kind="lost"}', 0) == 0
    assert m['afc_routed_records_total{classification="POISON",route="poison"}'] == 3
    assert m["afc_poison_records_total"] == 3
    # 10 handled; 1 failed handler run (the permanent failure; undecodable records never ran);
    # 3 poison + 1 dead-lettered
    assert health == {"handled": 10, "failed": 1, "deadLettered": 4}, health


def test_payloads_are_decoded_only_when_read_and_an_undecodable_one_read_is_poison(
        testbed, make_topic, names, redis_client, tmp_path) -> None:
    """Issue 13 (lazy decode): a handler that reads only `value` handles a record that is not
    JSON; one that reads `payload` and catches the DecodeError still gets the record routed to
    `.poison` (never counted as done)."""
    from confluent_kafka import Producer
    topic = make_topic("in", partitions=1)
    seen = f"{names.redis_prefix}seen"
    c = ConsumerProcess(testbed, [topic], names.group, "afc_test_handlers:value_or_caught_payload",
                        tmp_path / "c.log", instance_id=f"{names.stem}-0", redis_prefix=names.redis_prefix,
                        env={"AFC_TEST_HASH": seen}).start()
    try:
        c.wait_ready()
        p = Producer({"bootstrap.servers": testbed.bootstrap})
        for v in [b'{"n": 0}', b"v:not json", b"{not json", b'{"n": 3}']:
            p.produce(topic, value=v, key=b"k")
        assert p.flush(30) == 0
        poison = read_topic(testbed.bootstrap, topic + ".poison", 1)
        wait_for(lambda: group_lag(testbed.bootstrap, topic, names.group)[1] == 0, 30, 0.3, what="source drained")
        m = c.metrics()
    finally:
        assert c.stop() == 0, c.log_tail()
    ran = {int(k): v for k, v in redis_client.hgetall(seen).items()}
    assert ran == {0: b"{'n': 0}", 1: b"v:not json", 2: b"caught", 3: b"{'n': 3}"}, ran
    assert [int(headers(x)[H_ORIG_OFFSET]) for x in poison] == [2]
    assert headers(poison[0])[H_CLASS] == b"POISON" and poison[0].value() == b"{not json"
    assert m["afc_poison_records_total"] == 1 and m["afc_messages_handled_total"] == 3


def test_transient_failure_retried_at_due_times_then_handled_once(testbed, make_topic, names, redis_client,
                                                                   tmp_path) -> None:
    topic = make_topic("in", partitions=2)
    produce_json(testbed.bootstrap, topic, [{"fail": "transient", "times": 2}],
                 headers_of=lambda i, d: [("idempotency-key", b"order-7")])
    c = run(testbed, names, tmp_path, topic, env={
        "AFC_ROUTING__BACKOFF_INITIAL_MS": "700", "AFC_ROUTING__BACKOFF_MULTIPLIER": "2",
        "AFC_ROUTING__JITTER": "0"}).start()
    runs = f"{names.redis_prefix}runs"
    try:
        wait_for(lambda: redis_client.hget(runs, "order-7") is not None, 60, 0.2, what="the third attempt")
        wait_for(lambda: group_lag(testbed.bootstrap, topic + ".retry", names.group)[1] == 0, 30, 0.3,
                 what="retry topic drained")
    finally:
        assert c.stop() == 0, c.log_tail()
    calls = [json.loads(x) for x in redis_client.lrange(f"{runs}:calls:order-7", 0, -1)]
    assert len(calls) == 3 and int(redis_client.hget(runs, "order-7")) == 1
    assert [x["topic"] for x in calls] == [topic, topic + ".retry", topic + ".retry"]
    assert [x["attempts"] for x in calls] == [0, 1, 2]
    for x in calls[1:]:
        assert x["at"] >= x["due"], x                                      # never before its due time
    assert calls[1]["due"] - calls[0]["at"] >= 650 and calls[2]["due"] - calls[1]["at"] >= 1350
    assert read_topic(testbed.bootstrap, topic + ".dlq", 0, timeout=2) == []


def test_kill9_between_dead_letter_and_commit_routes_once(testbed, make_topic, names, redis_client,
                                                          tmp_path) -> None:
    topic = make_topic("in", partitions=1)
    produce_json(testbed.bootstrap, topic, [{"fail": "always"}])
    env = {"AFC_OFFSETS__COMMIT_INTERVAL_MS": "60000", "AFC_OFFSETS__CAUGHT_UP_COMMIT_MS": "0"}   # no commit first
    c = run(testbed, names, tmp_path, topic, env=env, name="c1").start()
    try:
        assert len(read_topic(testbed.bootstrap, topic + ".dlq", 1)) == 1
        assert group_lag(testbed.bootstrap, topic, names.group)[0] == 0     # routed, not committed
    finally:
        c.kill9()
    c2 = run(testbed, names, tmp_path, topic, env=env, name="c2").start()
    try:
        wait_for(lambda: c2.metrics().get("afc_route_skipped_total", 0) == 1, 60, what="the replayed route skipped")
    finally:
        assert c2.stop() == 0, c2.log_tail()
    assert len(read_topic(testbed.bootstrap, topic + ".dlq", 2, timeout=3)) == 1
    assert group_lag(testbed.bootstrap, topic, names.group) == (1, 0)


def afc(*args: str, env: dict | None = None) -> dict:
    r = subprocess.run([str(ROOT / ".venv" / "bin" / "afc-consumer"), *args], capture_output=True, text=True,
                       timeout=120, env={**os.environ, **(env or {})})
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_replay_round_trip_runs_each_once_and_twice_changes_nothing(testbed, make_topic, names, redis_client,
                                                                    tmp_path) -> None:
    topic = make_topic("in", partitions=3)
    flag, runs = f"{names.redis_prefix}broken", f"{names.redis_prefix}runs"
    redis_client.set(flag, 1)
    n = 1000
    produce_json(testbed.bootstrap, topic, [{"n": i} for i in range(n)], key_of=lambda i, d: str(i).encode())
    c = run(testbed, names, tmp_path, topic, env={"AFC_TEST_FAIL_KEY": flag}).start()
    try:
        wait_for(lambda: c.metrics().get('afc_routed_records_total{classification="PERMANENT",route="dlq"}', 0) == n,
                 120, 0.5, what="all dead-lettered")
        summary = afc("dlq", "inspect", topic + ".dlq", "--records", "2", "--bootstrap", testbed.bootstrap)
        assert summary["records"] == n and summary["byErrorClass"] == {"builtins.ValueError": n}
        assert summary["distinctRoutings"] == n and len(summary["sample"]) == 2
        dry = afc("dlq", "replay", "--from", topic + ".dlq", "--dry-run", "--bootstrap", testbed.bootstrap)
        assert dry["replayed"] == {topic: n}
        time.sleep(1)
        assert redis_client.hlen(runs) == 0                                  # a dry run sends nothing
        redis_client.delete(flag)                                            # the handler is fixed
        out = afc("dlq", "replay", "--from", topic + ".dlq", "--bootstrap", testbed.bootstrap)
        assert out["replayed"] == {topic: n} and out["failures"] == []
        wait_for(lambda: redis_client.hlen(runs) == n, 120, 0.5, what="replayed records handled")
        wait_for(lambda: group_lag(testbed.bootstrap, topic, names.group)[1] == 0, 60, 0.5, what="caught up")
        skipped = c.metrics().get("afc_messages_skipped_duplicate_total", 0)
        afc("dlq", "replay", "--from", topic + ".dlq", "--bootstrap", testbed.bootstrap)   # again
        wait_for(lambda: c.metrics().get("afc_messages_skipped_duplicate_total", 0) == skipped + n, 120, 0.5,
                 what="the second replay skipped as duplicates")
    finally:
        assert c.stop() == 0, c.log_tail()
    assert set(int(v) for v in redis_client.hgetall(runs).values()) == {1}
    assert redis_client.hlen(runs) == n


@pytest.mark.skipif(shutil.which("kcat") is None, reason="kcat (Debian package kcat) not installed")
def test_record_from_kcat_with_arbitrary_headers_is_routed_intact(testbed, make_topic, names, tmp_path) -> None:
    topic = make_topic("in", partitions=1)
    value = '{"fail": "always", "note": "from kcat"}'
    subprocess.run(["kcat", "-b", testbed.bootstrap, "-t", topic, "-P", "-k", "the-key", "-H", "trace-id=abc123",
                    "-H", "x-tenant=acme", "-H", "trace-id=second"], input=value.encode(), check=True, timeout=30)
    c = run(testbed, names, tmp_path, topic).start()
    try:
        dlq = read_topic(testbed.bootstrap, topic + ".dlq", 1)
    finally:
        assert c.stop() == 0, c.log_tail()
    assert len(dlq) == 1
    rec = dlq[0]
    assert rec.key() == b"the-key" and rec.value() == value.encode()
    own = [(k, v) for k, v in rec.headers() if not k.startswith("afc-") and k != "idempotency-key"]
    assert own == [("trace-id", b"abc123"), ("x-tenant", b"acme"), ("trace-id", b"second")]


def test_failing_dead_letter_produce_pauses_the_partition_and_never_commits_past(
        testbed, make_topic, kafka_admin, names, redis_client, tmp_path) -> None:
    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource
    topic = make_topic("in", partitions=1)
    dlq = make_topic("in.dlq", partitions=1, config={"max.message.bytes": "1024"})   # refuses our record
    produce_json(testbed.bootstrap, topic, [{"fail": "always", "pad": "x" * 3000}]
                 + [{"n": i} for i in range(20)])
    c = run(testbed, names, tmp_path, topic).start()
    try:
        log = tmp_path / "c.log"
        wait_for(lambda: "event=partition-blocked" in log.read_text(), 60, what="the source partition blocked")
        m = c.metrics()
        assert m['afc_route_errors_total{route="dlq"}'] >= 1
        time.sleep(3)
        assert group_lag(testbed.bootstrap, topic, names.group)[0] == 0     # never past the unrouted record
        assert c.metrics()["afc_paused_partitions"] >= 1
        res = ConfigResource(ConfigResource.Type.TOPIC, dlq, incremental_configs=[
            ConfigEntry("max.message.bytes", str(8 * 1024 * 1024), incremental_operation=AlterConfigOpType.SET)])
        for f in kafka_admin.incremental_alter_configs([res]).values():
            f.result(30)                                                     # the DLQ is fixed
        wait_for(lambda: group_lag(testbed.bootstrap, topic, names.group) == (21, 0), 90, 0.5,
                 what="routed, unblocked, the rest handled")
    finally:
        assert c.stop() == 0, c.log_tail()
    assert len(read_topic(testbed.bootstrap, dlq, 1)) == 1
    assert redis_client.hlen(f"{names.redis_prefix}runs") == 20
    assert "event=partition-unblocked" in (tmp_path / "c.log").read_text()
