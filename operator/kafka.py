"""What the operator asks Kafka: is the broker reachable, do the topics exist, how far behind
is the group. Every call is bounded in time and runs in a thread of its own pool, so a
broker that does not answer delays only the AdaptiveConsumer that names it.
"""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Mapping

from afc.operator.crd import AdaptiveConsumerSpec
from afc.operator.status import BROKER_UNREACHABLE, TOPIC_NOT_FOUND, Problem

logger = logging.getLogger("afc.operator.kafka")

CONNECTION_PROPERTIES = ("ssl.", "sasl.", "security.", "broker.address.", "client.dns.", "socket.")
OFFSET_UNSET = -1001  # librdkafka's OFFSET_INVALID: no committed offset


@dataclass(frozen=True)
class PartitionOffsets:
    committed: int  # OFFSET_UNSET when the group never committed
    earliest: int
    latest: int


@dataclass
class Probe:
    problem: Problem | None = None
    lag: dict[str, Any] | None = None
    partitions: dict[tuple[str, int], PartitionOffsets] = field(default_factory=dict)


def partition_lag(p: PartitionOffsets, auto_offset_reset: str) -> int:
    """Messages the group has still to consume from one partition. Without a committed
    offset the group starts where auto.offset.reset says: everything, or nothing."""
    if p.committed >= 0:
        start = max(p.committed, p.earliest)
    else:
        start = p.earliest if auto_offset_reset == "earliest" else p.latest
    return max(0, p.latest - start)


def lag_summary(partitions: Mapping[tuple[str, int], PartitionOffsets], auto_offset_reset: str,
                measured_at: str) -> dict[str, Any]:
    lags = [partition_lag(p, auto_offset_reset) for p in partitions.values()]
    return {"total": sum(lags), "partitions": len(lags), "maxPartitionLag": max(lags, default=0),
            "measuredAt": measured_at}


def client_config(spec: AdaptiveConsumerSpec, secrets: Mapping[str, str], timeout_s: float) -> dict[str, Any]:
    """librdkafka settings for the operator's admin client: the spec's brokers and security,
    with the secret values the operator read (never written anywhere)."""
    k = spec.kafka
    conf: dict[str, Any] = {
        "bootstrap.servers": k.bootstrap_servers,
        "security.protocol": k.security_protocol,
        "socket.timeout.ms": int(timeout_s * 1000),
        "socket.connection.setup.timeout.ms": int(timeout_s * 1000),
        "reconnect.backoff.max.ms": 1000,
        "client.id": "afc-operator",
    }
    for key, value in k.extra.items():
        if key.startswith(CONNECTION_PROPERTIES):  # how to reach the brokers, not how to consume
            conf[key] = value
    if k.sasl_mechanism:
        conf["sasl.mechanism"] = k.sasl_mechanism
    if k.sasl_username:
        conf["sasl.username"] = k.sasl_username
    if "sasl_password" in secrets:
        conf["sasl.password"] = secrets["sasl_password"]
    if "tls_ca" in secrets:
        conf["ssl.ca.pem"] = secrets["tls_ca"]
    return conf


def probe_sync(spec: AdaptiveConsumerSpec, secrets: Mapping[str, str], timeout_s: float, measured_at: str) -> Probe:
    """Reachability and topics (a Problem when they fail), then the group's lag (its error
    goes into the lag summary: not measuring lag is not a reason to call the consumers degraded)."""
    from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException, TopicPartition
    from confluent_kafka.admin import AdminClient, OffsetSpec

    k = spec.kafka
    admin = AdminClient(client_config(spec, secrets, timeout_s), logger=logger)
    try:
        metadata = admin.list_topics(timeout=timeout_s)
    except KafkaException as e:
        return Probe(problem=Problem(BROKER_UNREACHABLE, f"kafka {k.bootstrap_servers}: {e.args[0].str()}"))
    missing = [t for t in k.topics if t not in metadata.topics or metadata.topics[t].error is not None]
    if missing:
        return Probe(problem=Problem(TOPIC_NOT_FOUND, f"topics not found on {k.bootstrap_servers}: "
                                                      + ", ".join(sorted(missing))))
    tps = [TopicPartition(t, p) for t in k.topics for p in sorted(metadata.topics[t].partitions)]
    try:
        group = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(k.group_id, tps)],
                                                  request_timeout=timeout_s)[k.group_id].result(timeout=timeout_s)
        committed = {(tp.topic, tp.partition): tp.offset for tp in group.topic_partitions}
        earliest = admin.list_offsets({tp: OffsetSpec.earliest() for tp in tps}, request_timeout=timeout_s)
        latest = admin.list_offsets({tp: OffsetSpec.latest() for tp in tps}, request_timeout=timeout_s)
        partitions = {}
        for tp in tps:
            key = (tp.topic, tp.partition)
            partitions[key] = PartitionOffsets(
                committed=committed.get(key, OFFSET_UNSET),
                earliest=earliest[tp].result(timeout=timeout_s).offset,
                latest=latest[tp].result(timeout=timeout_s).offset)
    except (KafkaException, TimeoutError) as e:
        reason = e.args[0].str() if isinstance(e, KafkaException) and e.args else str(e) or type(e).__name__
        return Probe(lag={"error": f"lag of group {k.group_id}: {reason}", "measuredAt": measured_at})
    return Probe(lag=lag_summary(partitions, k.auto_offset_reset, measured_at), partitions=partitions)


class KafkaProbe:
    """Runs probes in a small pool of their own: slow brokers never starve the API calls."""

    def __init__(self, timeout_s: float, workers: int = 4) -> None:
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="afc-kafka")

    async def probe(self, spec: AdaptiveConsumerSpec, secrets: Mapping[str, str], measured_at: str) -> Probe:
        loop = asyncio.get_running_loop()
        # The hard bound: librdkafka's own timeouts apply inside, this one outside.
        bound = self.timeout_s * 4 + 2
        future = loop.run_in_executor(self._pool, probe_sync, spec, secrets, self.timeout_s, measured_at)
        try:
            return await asyncio.wait_for(future, bound)
        except asyncio.TimeoutError:
            return Probe(problem=Problem(BROKER_UNREACHABLE,
                                         f"kafka {spec.kafka.bootstrap_servers}: no answer within {bound:.0f}s"))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
