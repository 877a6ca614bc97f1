"""Claim semantics of the idempotency store, on the real Redis and through the runtime."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from afc.runtime.idempotency import Claim, RedisStore
from afctest import ConsumerProcess, group_lag, produce_json, wait_for

pytestmark = [pytest.mark.redis]


def store(testbed, names, owner: str, lease_ms: int = 500) -> RedisStore:
    """A store in the same namespace as the test's consumers (prefix and group)."""
    return RedisStore(testbed.redis_url, names.redis_prefix.rstrip(":"), names.group, owner, lease_ms, 3600)


async def test_claim_lease_done_and_release(testbed, names, redis_client) -> None:
    a, b = store(testbed, names, "a"), store(testbed, names, "b")
    try:
        assert await a.claim(["k1", "k2"], []) == [Claim.CLAIMED, Claim.CLAIMED]
        assert await b.claim(["k1", "k2", "k3"], []) == [Claim.BUSY, Claim.BUSY, Claim.CLAIMED]
        assert await a.claim(["k1"], []) == [Claim.MINE]             # own claim: renewed, reported as ours
        await a.mark_done(["k1"])
        assert await b.claim(["k1"], []) == [Claim.DONE]              # done is never handed out again
        assert await b.release(["k2"]) == 0                           # not b's to release
        assert await a.release(["k2"]) == 1
        assert await b.claim(["k2"], []) == [Claim.CLAIMED]           # released: claimable at once
        # a dead worker's claim expires with its lease
        assert await a.claim(["k4"], []) == [Claim.CLAIMED]
        assert await b.claim(["k4"], []) == [Claim.BUSY]
        await asyncio.sleep(0.7)
        assert await b.claim(["k4"], []) == [Claim.CLAIMED]
        # done marks ride along with the next claim, in one call
        assert await b.claim(["k5"], ["k4"]) == [Claim.CLAIMED]
        assert await a.claim(["k4"], []) == [Claim.DONE]
        ttl = redis_client.ttl(a.full_key("k4"))
        assert 3000 < ttl <= 3600
    finally:
        await a.close()
        await b.close()


def test_racing_claimers_never_both_win(testbed, names) -> None:
    keys = [f"race-{i}" for i in range(2000)]
    wins: dict[str, list[str]] = {}
    lock = threading.Lock()

    async def claims(owner: str) -> None:
        s = store(testbed, names, owner, lease_ms=60_000)
        try:
            for i in range(0, len(keys), 100):
                chunk = keys[i:i + 100]
                got = [(await s.claim([k], []))[0] for k in chunk[:50]]  # one by one (parked re-checks)
                got += await s.claim(chunk[50:], [])                      # a batch
                with lock:
                    for k, c in zip(chunk, got):
                        if c is Claim.CLAIMED:
                            wins.setdefault(k, []).append(owner)
        finally:
            await s.close()

    def worker(owner: str) -> None:
        asyncio.run(claims(owner))

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(wins) == len(keys)                      # every key won by someone
    assert all(len(v) == 1 for v in wins.values())     # and by exactly one


@pytest.mark.kafka
def test_two_consumers_racing_on_the_same_keys_run_each_once(testbed, make_topic, names, redis_client, tmp_path) -> None:
    """The same 300 messages (same idempotency-key header) land in two partitions, read by
    two members of one group at the same time: each key's handler runs once."""
    topic = make_topic("in", partitions=2)
    docs = [{"n": i % 300} for i in range(600)]
    produce_json(testbed.bootstrap, topic, docs, partition_of=lambda i, d: i // 300,
                 headers_of=lambda i, d: [("idempotency-key", f"order-{d['n']}".encode())])
    counts = f"{names.redis_prefix}runs"
    env = {"AFC_TEST_HASH": counts, "AFC_TEST_SLEEP_MS": "5"}
    cs = [ConsumerProcess(testbed, [topic], names.group, "afc_test_handlers:count_runs",
                          tmp_path / f"c{i}.log", instance_id=f"{names.stem}-{i}", env=env,
                          redis_prefix=names.redis_prefix).start() for i in range(2)]
    try:
        wait_for(lambda: group_lag(testbed.bootstrap, topic, names.group)[1] == 0, 120, 0.5,
                 what="both partitions consumed")
    finally:
        for c in cs:
            assert c.stop() == 0, c.log_tail()
    runs = {k.decode(): int(v) for k, v in redis_client.hgetall(counts).items()}
    assert len(runs) == 300
    assert set(runs.values()) == {1}, {k: v for k, v in runs.items() if v != 1}


@pytest.mark.kafka
def test_claim_of_a_dead_worker_is_processed_after_its_lease(testbed, make_topic, names, redis_client, tmp_path) -> None:
    topic = make_topic("in", partitions=1)

    async def as_dead_worker(keys: list[str], done: list[str]) -> list[Claim]:
        dead = store(testbed, names, "dead-worker", lease_ms=3000)
        try:
            return await dead.claim(keys, done)
        finally:
            await dead.close()

    # order-1: claimed by a worker that then "dies"; order-2: handled earlier by someone.
    assert asyncio.run(as_dead_worker(["order-1"], ["order-2"])) == [Claim.CLAIMED]
    claimed_at = time.time()
    produce_json(testbed.bootstrap, topic, [{"n": 1}, {"n": 2}, {"n": 3}],
                 headers_of=lambda i, d: [("idempotency-key", f"order-{d['n']}".encode())])
    times = f"{names.redis_prefix}times"
    c = ConsumerProcess(testbed, [topic], names.group, "afc_test_handlers:record_time",
                        tmp_path / "c.log", instance_id=f"{names.stem}-0",
                        env={"AFC_TEST_HASH": times}, redis_prefix=names.redis_prefix).start()
    try:
        wait_for(lambda: group_lag(testbed.bootstrap, topic, names.group)[1] == 0, 60, 0.2,
                 what="all three handled or skipped")
    finally:
        assert c.stop() == 0, c.log_tail()
    ran = {k.decode(): float(v) for k, v in redis_client.hgetall(times).items()}
    assert set(ran) == {"order-1", "order-3"}                    # order-2 was done: skipped
    assert ran["order-1"] >= claimed_at + 3.0 - 0.05             # not before the dead claim expired
    assert asyncio.run(as_dead_worker(["order-1", "order-3"], [])) == [Claim.DONE, Claim.DONE]
