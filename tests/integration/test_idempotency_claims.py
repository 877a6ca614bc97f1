"""Claim semantics of the idempotency store, on the real Redis and through the runtime."""
from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest

import redis

from afc.runtime.errors import ClaimLost
from afc.runtime.idempotency import DONE_CHUNK, Batch, Claim, RedisStore
from afctest import ConsumerProcess, group_lag, produce_json, wait_for
from idemtest import Claimer, writes_in

pytestmark = [pytest.mark.redis]


def store(testbed, names, owner: str, lease_ms: int = 500) -> RedisStore:
    """A store in the same namespace as the test's consumers (prefix and group)."""
    return RedisStore(testbed.redis_url, names.redis_prefix.rstrip(":"), names.group, owner, lease_ms, 3600)


async def test_claim_lease_done_release_and_fencing(testbed, names, redis_client) -> None:
    sa, sb = store(testbed, names, "a"), store(testbed, names, "b")
    a, b = Claimer(sa), Claimer(sb)
    try:
        assert await a.claim("k1", "k2") == [Claim.CLAIMED, Claim.CLAIMED]
        assert await b.claim("k1", "k2", "k3") == [Claim.BUSY, Claim.BUSY, Claim.CLAIMED]
        assert await a.claim("k1") == [Claim.BUSY]                     # a second claim of our own: another token
        # the same claim sent again (its first answer lost): answered CLAIMED, not BUSY
        assert (await sa.apply(Batch(claims=["k1"], seq0=0))).claims == [Claim.CLAIMED]
        await a.done("k1")
        assert await b.claim("k1") == [Claim.DONE]                      # done is never handed out again
        await b.release("k3")
        await a.release("k2")
        assert await b.claim("k2") == [Claim.CLAIMED]                   # released: claimable at once
        # a dead worker's claim is taken over once its heartbeat (the lease) ran out
        assert await a.claim("k4") == [Claim.CLAIMED]
        assert await b.claim("k4") == [Claim.BUSY]
        await asyncio.sleep(0.7)
        assert await b.claim("k4") == [Claim.CLAIMED]
        assert await a.beat() is True                                   # a learns that it was gone
        # fencing: the stale owner's done mark and release do not touch b's claim
        await a.done("k4")
        await a.release("k4")
        assert redis_client.get(sa.full_key("k4")) == b.tokens["k4"].encode()
        assert await b.claim("k4") == [Claim.BUSY]                      # still b's, b alive
        assert await b.beat() is False
        await b.done("k4")
        assert await a.claim("k4") == [Claim.DONE]
        ttl = redis_client.ttl(sa.full_key("k4"))
        assert 3000 < ttl <= 3600
        # a done mark for a key whose lease ran out and nobody took: marked (the work was done)
        assert await a.claim("k5") == [Claim.CLAIMED]
        await asyncio.sleep(0.7)
        await a.done("k5")
        assert await b.claim("k5") == [Claim.DONE]
    finally:
        await sa.close()
        await sb.close()


async def test_mark_done_in_applies_only_while_the_claim_is_held(testbed, names, redis_client) -> None:
    """Issue 9 item 2: a stale owner's MULTI (effect + done mark) must fail as a whole."""
    sa, sb = store(testbed, names, "a", lease_ms=300), store(testbed, names, "b", lease_ms=300)
    a, b = Claimer(sa), Claimer(sb)
    effects = f"{names.redis_prefix}effects"
    try:
        assert await a.claim("order-1", "order-2") == [Claim.CLAIMED, Claim.CLAIMED]
        # held: the effect and the mark commit together
        pipe = redis_client.pipeline(transaction=True)
        pipe.rpush(effects, "a:order-1")
        sa.done_in(pipe, "order-1", a.tokens["order-1"])
        pipe.execute()
        assert redis_client.get(sa.full_key("order-1")) == b"d"
        # lost: the lease ran out and b took the key: a's transaction is refused whole
        await asyncio.sleep(0.4)
        assert await b.claim("order-2") == [Claim.CLAIMED]
        pipe = redis_client.pipeline(transaction=True)
        pipe.rpush(effects, "a:order-2")
        with pytest.raises(ClaimLost):
            sa.done_in(pipe, "order-2", a.tokens["order-2"])
        # taken between WATCH and EXEC: EXEC fails, nothing applied
        assert await a.claim("order-3") == [Claim.CLAIMED]
        pipe = redis_client.pipeline(transaction=True)
        pipe.rpush(effects, "a:order-3")
        sa.done_in(pipe, "order-3", a.tokens["order-3"])
        redis_client.set(sa.full_key("order-3"), "someone-else")
        with pytest.raises(redis.WatchError):
            pipe.execute()
        # a heartbeat between WATCH and EXEC does not touch the key: the MULTI applies
        assert await a.claim("order-4") == [Claim.CLAIMED]
        pipe = redis_client.pipeline(transaction=True)
        pipe.rpush(effects, "a:order-4")
        sa.done_in(pipe, "order-4", a.tokens["order-4"])
        assert await a.beat() is False
        pipe.execute()
        assert redis_client.lrange(effects, 0, -1) == [b"a:order-1", b"a:order-4"]
    finally:
        await sa.close()
        await sb.close()


def write_calls(r: redis.Redis) -> int:
    """Write commands Redis has executed (scripts' inner calls included), from INFO commandstats."""
    return writes_in(r.info("commandstats"))


async def test_a_message_costs_one_redis_write(testbed, names, redis_client) -> None:
    """Issue 13: the claim's write is the only write per message; the done marks of a call
    are one BITFIELD, and the heartbeat one SET per call, whatever the number of messages."""
    c = Claimer(store(testbed, names, "w", lease_ms=30_000))
    keys = [f"one-write-{i}" for i in range(2000)]
    try:
        await c.claim("warm-up")                       # the first call loads the script
        before = write_calls(redis_client)
        for i in range(0, len(keys), 500):
            await c.claim(*keys[i:i + 500])
            await c.done(*keys[i:i + 500])
        writes = write_calls(redis_client) - before
        x = Claimer(store(testbed, names, "x"))
        assert await x.claim(*keys[:3]) == [Claim.DONE] * 3
        await x.s.close()
    finally:
        await c.s.close()
    # 2,000 claim SETs; per call one heartbeat SET, and per done call (its marks one run) a
    # SETRANGE, a BITFIELD for the run's ends and an EXPIRE
    assert len(keys) <= writes <= len(keys) + 8 * 4 + 20, writes


async def test_done_marks_set_their_own_bits_and_no_other(testbed, names, redis_client) -> None:
    """A call's done marks are set by runs of consecutive sequence numbers (one SETRANGE of whole
    bytes, single bits at the ends): every mark's bit is set and no other, whatever the order,
    with duplicates, runs shorter than two bytes, runs across bytes and across done-bit keys."""
    s = store(testbed, names, "bits", lease_ms=30_000)
    rnd = random.Random(5)
    ch = DONE_CHUNK
    seqs = ({0, 3, 4, 7, 8, 15, 16} | set(range(21, 40)) | set(range(64, 64 + 800)) | {900, 902, 904}
            | set(rnd.sample(range(1_000, ch - 100), 400)) | set(range(ch - 13, ch + 29))
            | set(range(2 * ch - 8, 2 * ch + 8)))
    marks = [(f"k{n}", f"{s.owner}.{n}") for n in seqs]
    marks += rnd.sample(marks, 30)                                    # the same mark twice
    rnd.shuffle(marks)
    try:
        await s.apply(Batch(done=marks))
        for c in range(3):
            key = f"{s.namespace}~d:{s.owner}:{c}"
            raw = redis_client.get(key) or b""
            got = {c * ch + 8 * i + b for i, byte in enumerate(raw) for b in range(8) if byte >> (7 - b) & 1}
            assert got == {n for n in seqs if n // ch == c}, c
            assert 0 < redis_client.ttl(key) <= 3600
        x = Claimer(store(testbed, names, "other"))
        sample = sorted(rnd.sample(sorted(seqs), 50))
        # Another owner finds these keys held by "bits" with the marked tokens: done, not busy.
        for n in sample:
            redis_client.set(s.full_key(f"k{n}"), f"{s.owner}.{n}")
        redis_client.set(s.full_key("k-unmarked"), f"{s.owner}.{max(seqs) + 5}")
        assert await x.claim(*(f"k{n}" for n in sample)) == [Claim.DONE] * len(sample)
        assert await x.claim("k-unmarked") == [Claim.BUSY]             # our heartbeat lives: held, not done
        await x.s.close()
    finally:
        await s.close()


def test_racing_claimers_never_both_win(testbed, names, redis_client) -> None:
    # (redis_client: its fixture deletes the test's keys afterwards; they were left behind)
    keys = [f"race-{i}" for i in range(2000)]
    wins: dict[str, list[str]] = {}
    lock = threading.Lock()

    async def claims(owner: str) -> None:
        c = Claimer(store(testbed, names, owner, lease_ms=60_000))
        try:
            for i in range(0, len(keys), 100):
                chunk = keys[i:i + 100]
                got = [(await c.claim(k))[0] for k in chunk[:50]]        # one by one (parked re-checks)
                got += await c.claim(*chunk[50:])                        # a batch
                with lock:
                    for k, r in zip(chunk, got):
                        if r is Claim.CLAIMED:
                            wins.setdefault(k, []).append(owner)
        finally:
            await c.s.close()

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

    async def as_dead_worker(*keys: str, done: tuple[str, ...] = ()) -> list[Claim]:
        dead = Claimer(store(testbed, names, "dead-worker", lease_ms=3000))
        try:
            got = await dead.claim(*keys, *done)
            await dead.done(*done)
            return got[:len(keys)]
        finally:
            await dead.s.close()

    # order-1: claimed by a worker that then "dies"; order-2: handled earlier by someone.
    assert asyncio.run(as_dead_worker("order-1", done=("order-2",))) == [Claim.CLAIMED]
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
    assert asyncio.run(as_dead_worker("order-1", "order-3")) == [Claim.DONE, Claim.DONE]
