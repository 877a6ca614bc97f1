"""The idempotency store on the test bed's Redis Cluster (3 masters + 3 replicas): claim
semantics and fencing as on one Redis, one batch over every master without CROSSSLOT,
`mark_done_in` with the user's keys in the claim's slot, one write per message, and a real
`afc-consumer` whose store is the cluster, through a master failover."""
from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
import redis

from afc.runtime.errors import ClaimLost
from afc.runtime.idempotency import BUCKETS, Batch, Claim, RedisStore
from afctest import ConsumerProcess, group_lag, produce_json, wait_for
from idemtest import Claimer, writes_in

pytestmark = [pytest.mark.redis]


def store(testbed, names, owner: str, lease_ms: int = 500) -> RedisStore:
    """A cluster store in the test's namespace (its keys start with names.redis_prefix)."""
    return RedisStore(testbed.redis_cluster_url, names.redis_prefix.rstrip(":"), names.group, owner, lease_ms, 3600)


def master_port(redis_cluster, key: str) -> int:
    return redis_cluster.get_node_from_key(key).port


async def test_claim_lease_done_release_and_fencing_on_a_cluster(testbed, names, redis_cluster) -> None:
    """test_idempotency_claims' semantics, with keys chosen in different buckets (and masters)."""
    sa, sb = store(testbed, names, "a"), store(testbed, names, "b")
    a, b = Claimer(sa), Claimer(sb)
    try:
        keys = [f"k{i}" for i in range(1, 6)]
        assert len({sa.hash_tag(k) for k in keys}) >= 4                      # spread over buckets
        assert await a.claim("k1", "k2") == [Claim.CLAIMED, Claim.CLAIMED]
        assert await b.claim("k1", "k2", "k3") == [Claim.BUSY, Claim.BUSY, Claim.CLAIMED]
        assert await a.claim("k1") == [Claim.BUSY]
        assert (await sa.apply(Batch(claims=["k1"], seq0=0))).claims == [Claim.CLAIMED]   # same token again
        await a.done("k1")
        assert await b.claim("k1") == [Claim.DONE]
        await b.release("k3")
        await a.release("k2")
        assert await b.claim("k2") == [Claim.CLAIMED]
        assert await a.claim("k4") == [Claim.CLAIMED]
        assert await b.claim("k4") == [Claim.BUSY]
        await asyncio.sleep(0.7)                                        # a's heartbeat (every bucket) ran out
        assert await b.claim("k4") == [Claim.CLAIMED]
        assert await a.beat() is True
        await a.done("k4")                                              # fencing: touches nothing of b's
        await a.release("k4")
        assert redis_cluster.get(sa.full_key("k4")) == b.tokens["k4"].encode()
        assert await b.claim("k4") == [Claim.BUSY]
        assert await b.beat() is False
        await b.done("k4")
        assert await a.claim("k4") == [Claim.DONE]
        assert 3000 < redis_cluster.ttl(sa.full_key("k4")) <= 3600
        assert await a.claim("k5") == [Claim.CLAIMED]
        await asyncio.sleep(0.7)
        await a.done("k5")
        assert await b.claim("k5") == [Claim.DONE]
        # b's claims in buckets it did not touch for a while stay alive: every call beats all buckets
        assert await b.claim("k6") == [Claim.CLAIMED]
        for _ in range(3):
            await asyncio.sleep(0.3)
            assert await b.beat() is False
        assert await a.claim("k6") == [Claim.BUSY]
    finally:
        await sa.close()
        await sb.close()


async def test_one_batch_spreads_over_every_master_without_crossslot(testbed, names, redis_cluster) -> None:
    s = store(testbed, names, "w", lease_ms=30_000)
    c = Claimer(s)
    keys = [f"order-{i}" for i in range(400)]
    try:
        assert await c.claim(*keys) == [Claim.CLAIMED] * len(keys)
        assert len({s.hash_tag(k) for k in keys}) == BUCKETS
        per_master = Counter(master_port(redis_cluster, s.full_key(k)) for k in keys)
        assert len(per_master) == 3 and min(per_master.values()) > len(keys) / 5, per_master
        for k in keys[:50]:
            assert redis_cluster.get(s.full_key(k)) == c.tokens[k].encode()     # the answers in batch order
        # a master without the script (restarted, promoted): loaded there and sent again
        for node in redis_cluster.get_primaries():
            redis_cluster.execute_command("SCRIPT", "FLUSH", target_nodes=node)
        await c.done(*keys)
        x = Claimer(store(testbed, names, "x"))
        assert await x.claim(*reversed(keys)) == [Claim.DONE] * len(keys)
        await x.s.close()
        info = await s.check()
        assert len(info["maxmemory_policies"]) == 3 and info["maxmemory_policy"] == "noeviction", info
    finally:
        await s.close()


async def test_mark_done_in_with_effect_keys_in_the_claims_slot(testbed, names, redis_cluster) -> None:
    sa, sb = store(testbed, names, "a", lease_ms=300), store(testbed, names, "b", lease_ms=300)
    a, b = Claimer(sa), Claimer(sb)

    def effects(key: str) -> str:
        return f"{names.redis_prefix}effects:{sa.hash_tag(key)}"

    try:
        assert await a.claim("order-1", "order-2", "order-3") == [Claim.CLAIMED] * 3
        # held: the effect and the mark commit together, on the claim's master
        pipe = redis_cluster.pipeline(transaction=True)
        pipe.rpush(effects("order-1"), "a:order-1")
        sa.done_in(pipe, "order-1", a.tokens["order-1"])
        pipe.execute()
        assert redis_cluster.get(sa.full_key("order-1")) == b"d"
        assert redis_cluster.lrange(effects("order-1"), 0, -1) == [b"a:order-1"]
        # an effect key without the claim's tag: refused, naming the rule
        other = next(t for t in (f"{names.redis_prefix}x{i}" for i in range(100))
                     if redis_cluster.keyslot(t) != redis_cluster.keyslot(sa.full_key("order-2")))
        pipe = redis_cluster.pipeline(transaction=True)
        pipe.rpush(other, "a:order-2")
        with pytest.raises(ValueError, match="hash tag"):
            sa.done_in(pipe, "order-2", a.tokens["order-2"])
        pipe.reset()
        # a batch whose claims carry several tags cannot be one MULTI
        two = next(k for k in (f"order-{i}" for i in range(4, 100)) if sa.hash_tag(k) != sa.hash_tag("order-2"))
        assert await a.claim(two) == [Claim.CLAIMED]
        with pytest.raises(ValueError, match="one hash slot"):
            sa.done_many_in(redis_cluster.pipeline(transaction=True), [("order-2", a.tokens["order-2"]),
                                                                        (two, a.tokens[two])])
        # a batch whose claims share one tag: one MULTI, every mark applied
        same = [k for k in (f"batch-{i}" for i in range(200)) if sa.hash_tag(k) == sa.hash_tag("order-1")][:3]
        assert await a.claim(*same) == [Claim.CLAIMED] * 3
        pipe = redis_cluster.pipeline(transaction=True)
        pipe.rpush(effects("order-1"), *same)
        sa.done_many_in(pipe, [(k, a.tokens[k]) for k in same])
        pipe.execute()
        assert [redis_cluster.get(sa.full_key(k)) for k in same] == [b"d"] * 3
        # lost: the lease ran out and b took the key: a's transaction is refused whole
        await asyncio.sleep(0.4)
        assert await b.claim("order-2") == [Claim.CLAIMED]
        pipe = redis_cluster.pipeline(transaction=True)
        pipe.rpush(effects("order-2"), "a:order-2")
        with pytest.raises(ClaimLost):
            sa.done_in(pipe, "order-2", a.tokens["order-2"])
        # taken between WATCH and EXEC: EXEC fails, nothing applied
        assert await a.claim("order-5") == [Claim.CLAIMED]
        pipe = redis_cluster.pipeline(transaction=True)
        pipe.rpush(effects("order-5"), "a:order-5")
        sa.done_in(pipe, "order-5", a.tokens["order-5"])
        redis_cluster.set(sa.full_key("order-5"), "someone-else")
        with pytest.raises(redis.WatchError):
            pipe.execute()
        assert redis_cluster.lrange(effects("order-5"), 0, -1) in ([], [b"a:order-1"])
        # a heartbeat between WATCH and EXEC does not refuse it
        assert await a.claim("order-6") == [Claim.CLAIMED]
        pipe = redis_cluster.pipeline(transaction=True)
        pipe.rpush(effects("order-6"), "a:order-6")
        sa.done_in(pipe, "order-6", a.tokens["order-6"])
        await asyncio.sleep(0.15)                                       # a third of the lease: due again
        assert await a.beat() is False
        pipe.execute()
        assert redis_cluster.get(sa.full_key("order-6")) == b"d"
        assert b"a:order-6" in redis_cluster.lrange(effects("order-6"), 0, -1)
        # redis-py's asyncio cluster transactions are refused, with the way out
        from afc.runtime.redisconn import async_client
        ar = async_client(testbed.redis_cluster_url)
        try:
            with pytest.raises(TypeError, match="sync cluster pipeline"):
                await sa.done_in_async(ar.pipeline(transaction=True), "order-6", a.tokens["order-6"])
        finally:
            await ar.aclose()
    finally:
        await sa.close()
        await sb.close()


async def test_a_message_costs_one_redis_write_on_a_cluster(testbed, names, redis_cluster) -> None:
    """Summed over the masters: one claim SET per message; per call, a heartbeat in each of the
    BUCKETS buckets, and per done call one BITFIELD and one EXPIRE per bucket."""
    c = Claimer(store(testbed, names, "w", lease_ms=30_000))
    keys = [f"one-write-{i}" for i in range(2000)]
    primaries = redis_cluster.get_primaries()

    def writes() -> int:
        per_node = redis_cluster.info("commandstats", target_nodes=primaries)
        return sum(writes_in(stats) for stats in per_node.values())

    try:
        await c.claim("warm-up")
        before = writes()
        calls = 0
        for i in range(0, len(keys), 500):
            await c.claim(*keys[i:i + 500])
            await c.done(*keys[i:i + 500])
            calls += 2
        total = writes() - before
    finally:
        await c.s.close()
    per_call = BUCKETS * 3                  # a heartbeat per bucket; BITFIELD + EXPIRE where marks went
    assert len(keys) <= total <= len(keys) + calls * per_call, total
    print(f"\ncluster: {total} writes for {len(keys)} messages in {calls} calls ({total / len(keys):.3f} per message)")


def lag(testbed, topic: str, group: str) -> int:
    return group_lag(testbed.bootstrap, topic, group)[1]


@pytest.mark.kafka
def test_consumers_on_the_cluster_handle_each_message_once_through_a_master_failover(
        testbed, make_topic, names, redis_client, redis_cluster, redis_cluster_bed, tmp_path) -> None:
    """Two afc-consumer processes, the store on the cluster (AFC_IDEMPOTENCY__REDIS_URL), the
    handler counting its runs per key on the single Redis; the master of one bucket is SIGKILLed
    halfway through and its replica promoted. Every message handled, none twice."""
    topic = make_topic("in", partitions=4)
    n = 6000                                # ~800 msg/s (2 x 4 workers x 10 ms): the kill lands mid-way
    produce_json(testbed.bootstrap, topic, [{"n": i} for i in range(n)],
                 headers_of=lambda i, d: [("idempotency-key", f"order-{d['n']}".encode())])
    counts = f"{names.redis_prefix}runs"
    env = {"AFC_IDEMPOTENCY__REDIS_URL": testbed.redis_cluster_url, "AFC_TEST_HASH": counts,
           "AFC_TEST_SLEEP_MS": "10", "AFC_FLOW__WORKERS": "4", "AFC_ROUTING__ENABLED": "false"}
    cs = [ConsumerProcess(testbed, [topic], names.group, "afc_test_handlers:count_runs", tmp_path / f"c{i}.log",
                          instance_id=f"{names.stem}-{i}", env=env, redis_prefix=names.redis_prefix).start()
          for i in range(2)]
    probe = store(testbed, names, "probe")
    figures: dict[str, float] = {}
    try:
        for c in cs:
            c.wait_ready()
        wait_for(lambda: redis_client.hlen(counts) >= n // 4, 60, 0.1, what="a quarter handled")
        with redis_cluster_bed.failover(probe.full_key("order-0")) as fo:
            figures["failover_s"] = fo.failover_s
            at_promotion = redis_client.hlen(counts)
            t0 = time.monotonic()
            wait_for(lambda: redis_client.hlen(counts) >= min(n, at_promotion + 200), 60, 0.1,
                     what="handling goes on after the promotion")
            figures["back_s"] = time.monotonic() - t0
        wait_for(lambda: lag(testbed, topic, names.group) == 0, 120, 0.5, what="every message consumed")
        ms = [c.metrics() for c in cs]
        figures["errors"] = sum(m.get("afc_idempotency_store_errors_total", 0) for m in ms)
        figures["lost"] = sum(m.get("afc_idempotency_claims_lost_total", 0) for m in ms)
    finally:
        asyncio.run(probe.close())
        codes = [c.stop() for c in cs]
    logs = "\n".join(c.log_tail() for c in cs)
    assert codes == [0, 0], logs
    runs = {k.decode(): int(v) for k, v in redis_client.hgetall(counts).items()}
    twice = {k: v for k, v in runs.items() if v != 1}
    assert figures["errors"] > 0, "no store call failed: the failover did not happen under load"
    assert len(runs) == n, f"{n - len(runs)} messages never handled"
    assert not twice, f"handled more than once: {twice}"
    print(f"\ncluster failover: promotion {figures['failover_s']:.1f}s after the kill, 200 more handled "
          f"{figures['back_s']:.1f}s after it; failed store calls {figures['errors']:.0f}, claims lost "
          f"{figures['lost']:.0f}")


@pytest.mark.kafka
def test_mark_done_in_effects_stay_exactly_once_through_a_master_failover(
        testbed, make_topic, names, redis_cluster, redis_cluster_bed, tmp_path) -> None:
    """A handler whose effect (RPUSH to a list carrying the claim's hash tag) commits in one MULTI
    with the done mark, on the cluster; the master of one bucket is SIGKILLed mid-way. Every
    message's effect is there exactly once (a transaction cut by the kill either applied, and its
    retry finds the key done, or did not, and runs again)."""
    topic = make_topic("in", partitions=4)
    n = 4000
    produce_json(testbed.bootstrap, topic, [{"n": i} for i in range(n)],
                 headers_of=lambda i, d: [("idempotency-key", f"order-{d['n']}".encode())])
    effects = f"{names.redis_prefix}effects"
    env = {"AFC_IDEMPOTENCY__REDIS_URL": testbed.redis_cluster_url, "AFC_TEST_CLUSTER_URL": testbed.redis_cluster_url,
           "AFC_TEST_LIST": effects, "AFC_FLOW__WORKERS": "4", "AFC_ROUTING__ENABLED": "false"}
    c = ConsumerProcess(testbed, [topic], names.group, "afc_test_handlers:cluster_effect", tmp_path / "c.log",
                        instance_id=f"{names.stem}-0", env=env, redis_prefix=names.redis_prefix).start()
    probe = store(testbed, names, "probe")
    lists = sorted({f"{effects}:{probe.hash_tag(f'order-{i}')}" for i in range(n)})

    def applied() -> int:
        return sum(redis_cluster.llen(k) for k in lists)

    try:
        c.wait_ready()
        wait_for(lambda: applied() >= n // 4, 60, 0.1, what="a quarter applied")
        with redis_cluster_bed.failover(probe.full_key("order-0")):
            at_promotion = applied()
        wait_for(lambda: lag(testbed, topic, names.group) == 0, 120, 0.5, what="every message consumed")
        errors = c.metrics().get("afc_idempotency_store_errors_total", 0)
    finally:
        asyncio.run(probe.close())
        code = c.stop()
    assert code == 0, c.log_tail()
    assert at_promotion < n, "the failover came after the last message"
    got = Counter(k.decode() for lst in lists for k in redis_cluster.lrange(lst, 0, -1))
    assert len(got) == n, f"{n - len(got)} effects missing"
    assert set(got.values()) == {1}, {k: v for k, v in got.items() if v != 1}
    print(f"\nmark_done_in through a failover: {n} effects once each; {at_promotion} applied at the "
          f"promotion, {errors:.0f} failed store calls")
