"""The backpressure signal on the test bed's Redis Cluster (3 masters + 3 replicas): a real
consumer (`afc-consumer run`) publishes through a `redis+cluster://` URL, the adaptive producer
reads it through one, and both get through the SIGKILL of the master serving the signal's slot.

The consumers keep their idempotency store on the single Redis (the store on a cluster is
work in progress); only the signal goes to the cluster, by AFC_BACKPRESSURE__REDIS_URL.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from afc.runtime.backpressure import (GroupSignal, LevelInputs, LevelRule, SignalKeys, SignalPublisher,
                                      read_group_async, read_records_async)
from afc.runtime.config import ProducerSettings
from afc.runtime.producer import AdaptiveProducer
from afc.runtime.redisconn import async_client
from afctest import ConsumerProcess, produce_json, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.redis]


def start_consumer(testbed, names, topic: str, latency_key: str, log_path) -> ConsumerProcess:
    env = {"AFC_TEST_LIST": f"{names.redis_prefix}effects", "AFC_TEST_LATENCY_KEY": latency_key,
           "AFC_FLOW__TARGET_LATENCY_MS": "50", "AFC_FLOW__MIN_INFLIGHT": "4", "AFC_FLOW__WINDOW_MS": "200",
           "AFC_MEMBERSHIP__SESSION_TIMEOUT_MS": "6000", "AFC_ROUTING__ENABLED": "false",
           "AFC_BACKPRESSURE__REDIS_URL": testbed.redis_cluster_url}
    return ConsumerProcess(testbed, [topic], names.group, "afc_test_handlers:append_with_latency", log_path,
                           instance_id=f"{names.stem}-0", redis_prefix=names.redis_prefix, env=env).start()


def cluster_producer(testbed, names, poll_interval_ms: int) -> AdaptiveProducer:
    return AdaptiveProducer(ProducerSettings(
        bootstrap_servers=testbed.bootstrap, groups=[names.group], redis_url=testbed.redis_cluster_url,
        key_prefix=names.redis_prefix.rstrip(":"), max_rate=1000, floor_rate=10, adjust_interval_ms=200,
        poll_interval_ms=poll_interval_ms))


def record(redis_cluster, keys: SignalKeys, member: str) -> dict | None:
    raw = redis_cluster.get(keys.member(member))
    return None if raw is None else json.loads(raw)


async def operator_view(url: str, names) -> tuple[GroupSignal, dict]:
    r = async_client(url, socket_timeout=2, socket_connect_timeout=2, retries=2)
    try:
        keys = SignalKeys.for_url(url, names.redis_prefix, names.group)
        return await read_group_async(r, keys), await read_records_async(r, keys)
    finally:
        await r.aclose()


@dataclass
class Run:
    """One consumer publishing to the cluster; its handler's latency (ms) in `latency_key` on the single Redis."""
    topic: str
    latency_key: str
    member: str
    keys: SignalKeys
    log_path: Path
    c: ConsumerProcess


@pytest.fixture
def run(testbed, make_topic, names, redis_client, tmp_path) -> Run:
    topic = make_topic("in", partitions=2)
    latency_key = f"{names.redis_prefix}latency"
    redis_client.set(latency_key, 1)
    keys = SignalKeys.for_url(testbed.redis_cluster_url, names.redis_prefix, names.group)
    log_path = tmp_path / "c.log"
    return Run(topic, latency_key, f"{names.stem}-0", keys, log_path,
               start_consumer(testbed, names, topic, latency_key, log_path))


def test_consumer_signal_reaches_the_producer_through_the_cluster(testbed, names, redis_client, redis_cluster,
                                                                run: Run) -> None:
    topic, latency_key, member, keys, c = run.topic, run.latency_key, run.member, run.keys, run.c
    # The hash-tagged names (one slot on the cluster), not the single-Redis ones.
    assert keys.member(member) == f"{names.redis_prefix}bp:{{{names.group}}}:{member}"
    assert keys.index == f"{names.redis_prefix}bpm:{{{names.group}}}"
    # A periodic read only every 30 s: a reaction within seconds comes from the sharded channel.
    prod = cluster_producer(testbed, names, poll_interval_ms=30_000)
    try:
        c.wait_ready()
        wait_for(lambda: (record(redis_cluster, keys, member) or {}).get("level") == 0, 30,
                 what="the member's level published on the cluster")
        assert redis_cluster.zscore(keys.index, member) is not None
        single = SignalKeys(names.redis_prefix, names.group)
        assert redis_client.get(single.member(member)) is None          # nothing went to the single Redis
        wait_for(lambda: prod.level == 0.0 and prod.metrics.signal_up._value.get() == 1, 10, 0.05,
                 what="the producer reading the cluster")

        produce_json(testbed.bootstrap, topic, [{"n": i} for i in range(400)])
        redis_client.set(latency_key, 300)                 # the downstream slows: the member saturates
        wait_for(lambda: (record(redis_cluster, keys, member) or {}).get("level") == 1, 20, 0.02,
                 what="the member saturated, on the cluster")
        t0 = time.monotonic()
        wait_for(lambda: (prod.level or 0) > 0, 5, 0.02, what="the producer heard it (SSUBSCRIBE)")
        heard_s = time.monotonic() - t0
        assert heard_s < 3, heard_s                        # well inside the 30 s periodic read
        assert prod.level == 1.0                           # the only member, saturated
        # No read failed meanwhile (a failure is retried after 1 s and would explain the speed too).
        assert prod.metrics.signal_errors._value.get() == 0
        # The operator's readers (afc.operator.reconcile) on an asyncio cluster client: one slot, no CROSSSLOT.
        sig, records = asyncio.run(operator_view(testbed.redis_cluster_url, names))
        assert (sig.members, sig.saturated, sig.level) == (1, 1, 1.0)
        assert records[member]["level"] == 1 and records[member]["member"] == member

        redis_client.set(latency_key, 1)
        wait_for(lambda: (record(redis_cluster, keys, member) or {}).get("level") == 0, 30, 0.05,
                 what="the member's level cleared")
        wait_for(lambda: prod.level == 0.0, 5, 0.02, what="the producer heard the clear")
        m = c.metrics()
        assert m["afc_backpressure_signal_up"] == 1 and m["afc_backpressure_publish_errors_total"] == 0, m
        print(f"\ncluster signal: producer heard the saturation {heard_s:.2f}s after it was published")
    finally:
        prod.close(10)
        rc = c.stop()
    assert rc == 0, c.log_tail()
    assert record(redis_cluster, keys, member) is None                 # a clean stop leaves at once
    assert redis_cluster.zscore(keys.index, member) is None
    assert "Traceback" not in run.log_path.read_text()


def test_signal_survives_a_failover_of_its_master(testbed, names, redis_client, redis_cluster, redis_cluster_bed,
                                                  run: Run) -> None:
    topic, latency_key, member, keys, c = run.topic, run.latency_key, run.member, run.keys, run.c
    log_path = run.log_path
    prod = cluster_producer(testbed, names, poll_interval_ms=250)
    figures: dict[str, float] = {}
    try:
        c.wait_ready()
        wait_for(lambda: record(redis_cluster, keys, member) is not None, 30, what="the member's level published")
        wait_for(lambda: prod.level == 0.0 and prod.metrics.signal_up._value.get() == 1, 10, 0.05,
                 what="the producer reading the cluster")
        with redis_cluster_bed.failover(keys.index) as fo:
            # The master serving the signal's slot is dead and its replica promoted.
            promoted_wall, promoted = time.time() * 1000, time.monotonic()
            figures["failover_s"] = fo.failover_s
            # The publisher writes again (a record stamped after the promotion, on the new master).
            wait_for(lambda: (record(redis_cluster, keys, member) or {}).get("ts", 0) > promoted_wall, 15, 0.1,
                     what="a fresh record from the consumer after the failover")
            figures["publisher_back_s"] = time.monotonic() - promoted
            # The producer reads it again.
            wait_for(lambda: prod.metrics.signal_up._value.get() == 1 and prod.signal_age() >= 0
                     and prod.signal_ok_at > promoted, 15, 0.05, what="the producer reading after the failover")
            figures["reader_back_s"] = time.monotonic() - promoted
            # And the signal still flows end to end: a saturation reaches the producer.
            produce_json(testbed.bootstrap, topic, [{"n": i} for i in range(300)])
            redis_client.set(latency_key, 300)
            wait_for(lambda: (prod.level or 0) > 0, 20, 0.05, what="a saturation heard after the failover")
            figures["engaged_after_s"] = time.monotonic() - promoted
            redis_client.set(latency_key, 1)
            assert c.proc.poll() is None and c.http("/healthz")[0] == 200
        figures["restore_s"] = fo.restored_s
        # The fail-back (a second, coordinated switch of that slot) is no harm either.
        wait_for(lambda: prod.level == 0.0 and prod.metrics.signal_up._value.get() == 1, 30, 0.05,
                 what="the producer reading, the level clear, after the node came back")
        m = c.metrics()
        figures["publish_errors"] = m["afc_backpressure_publish_errors_total"]
        figures["producer_signal_errors"] = prod.metrics.signal_errors._value.get()
        assert m["afc_backpressure_signal_up"] == 1
    finally:
        prod.close(10)
        rc = c.stop()
        print(f"\ncluster failover figures: {json.dumps({k: round(v, 2) for k, v in figures.items()})}")
    assert rc == 0, c.log_tail()
    log = log_path.read_text()
    assert "Traceback" not in log
    # The outage was seen and counted, and said once each way in the log.
    assert figures["publish_errors"] >= 1, figures
    assert log.count("event=backpressure-signal-down") >= 1 and "event=backpressure-signal-back" in log


def groups_on_two_masters(redis_cluster_bed, names) -> tuple[str, str]:
    """Two group names whose signals live on different masters."""
    from redis.crc import key_slot
    first = f"{names.stem}-g0"
    port = redis_cluster_bed.master_of_slot(key_slot(SignalKeys(names.redis_prefix, first, True).index.encode()))
    for i in range(1, 200):
        g = f"{names.stem}-g{i}"
        if redis_cluster_bed.master_of_slot(key_slot(SignalKeys(names.redis_prefix, g, True).index.encode())) != port:
            return first, g
    raise AssertionError("no second group on another master")


def test_producer_of_two_groups_hears_each_on_its_own_master(testbed, names, redis_cluster, redis_cluster_bed) -> None:
    """In-process publishers (the consumer's SignalPublisher, fed windows by hand) of two groups
    whose slots are on different masters; one producer watching both hears each on its own
    sharded subscription (its periodic read set to 30 s)."""
    g1, g2 = groups_on_two_masters(redis_cluster_bed, names)
    rule = LevelRule(target_latency_ms=50, max_error_rate=0.2, clear_after_s=0.2)
    calm = LevelInputs(completed=10, mean_latency_ms=1, error_rate=0, overloaded=False, at_floor=False, paused=0,
                       assigned=2, outstanding=1)
    hot = LevelInputs(completed=10, mean_latency_ms=500, error_rate=0, overloaded=True, at_floor=True, paused=2,
                      assigned=2, outstanding=50)
    prod = AdaptiveProducer(ProducerSettings(
        bootstrap_servers=testbed.bootstrap, groups=[g1, g2], redis_url=testbed.redis_cluster_url,
        key_prefix=names.redis_prefix.rstrip(":"), max_rate=1000, floor_rate=10, poll_interval_ms=30_000))
    heard: dict[str, float] = {}

    async def drive() -> None:
        pubs = {g: SignalPublisher(testbed.redis_cluster_url, names.redis_prefix, g, f"{g}-m", rule, ttl_ms=3000,
                                   heartbeat_ms=1000) for g in (g1, g2)}
        try:
            async def windows(levels: dict[str, LevelInputs], until, timeout: float, what: str) -> float:
                t0 = time.monotonic()
                while time.monotonic() - t0 < timeout:
                    for g, p in pubs.items():
                        p.observe(levels[g])
                    await asyncio.sleep(0.05)
                    if until():
                        return time.monotonic() - t0
                raise AssertionError(f"timed out after {timeout}s waiting for {what} (levels {prod.levels})")
            await windows({g1: calm, g2: calm}, lambda: prod.levels == {g1: 0.0, g2: 0.0}
                          and all(p.published_level == 0 for p in pubs.values()), 10, "both groups published, clear")
            for g, other in ((g2, g1), (g1, g2)):
                heard[g] = await windows({g: hot, other: calm}, lambda: prod.levels.get(g) == 1.0, 5, f"{g} hot")
                assert prod.levels[other] == 0.0
                await windows({g1: calm, g2: calm}, lambda: prod.levels == {g1: 0.0, g2: 0.0}, 10, f"{g} clear")
            assert all(p.down is False for p in pubs.values())
        finally:
            for p in pubs.values():
                await p.close()

    try:
        asyncio.run(drive())
        assert prod.metrics.signal_errors._value.get() == 0       # every change came by a message, no re-read
    finally:
        prod.close(5)
    assert max(heard.values()) < 3, heard
    print(f"\ntwo groups on two masters: heard in {json.dumps({k: round(v, 2) for k, v in heard.items()})} s")
