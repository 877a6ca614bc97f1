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

from afc.runtime.backpressure import GroupSignal, SignalKeys, read_group_async, read_records_async
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
