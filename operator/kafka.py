"""What the operator asks Kafka: is the broker reachable, do the topics exist, where does the
group stand on each partition, who is in it; and, on scale-down, remove departed static
members from the group.

One admin client per Kafka cluster (bootstrap servers, security settings and credentials),
cached and shared by every AdaptiveConsumer that names the same cluster and by every poll
(KEDA keeps one metadata client per ScaledObject: its #7453). Clients unused for
`idle_s` are closed. Every call is bounded in time and runs in a thread of the probe's own
pool, so a broker that does not answer delays only the AdaptiveConsumers that name it.

Removing members by `group.instance.id` is LeaveGroup v3+ (KIP-345), what Java's
`Admin.removeMembersFromConsumerGroup` sends. librdkafka (confluent-kafka) has no such call,
so that one request goes through kafka-python's admin client (`remove_group_members`),
created only when a scale-down needs it, cached the same way.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from afc.operator.crd import AdaptiveConsumerSpec
from afc.operator.scaling import Observation, Offsets, partition_lag
from afc.operator.status import BROKER_UNREACHABLE, TOPIC_NOT_FOUND, Problem

logger = logging.getLogger("afc.operator.kafka")

# The only `kafka.extra` properties the operator's own clients take: how to reach the brokers,
# nothing that names a file, a command, a URL or a mechanism. The operator runs with its own
# ServiceAccount token (cluster-wide: every Secret of the cluster) and its own files, so a
# property such as `sasl.oauthbearer.assertion.file` with `sasl.oauthbearer.token.endpoint.url`
# would make it send its token wherever a resource says (docs/security.md). The pods take the
# whole `extra` (their files are their namespace's own); security.protocol, sasl.mechanism and
# the credentials come from the spec and its Secret references only.
OPERATOR_EXTRA_PROPERTIES = frozenset({
    "ssl.endpoint.identification.algorithm", "enable.ssl.certificate.verification", "ssl.cipher.suites",
    "ssl.curves.list", "ssl.sigalgs.list",
    "broker.address.family", "broker.address.ttl", "client.dns.lookup",
    "socket.keepalive.enable", "socket.nagle.disable", "socket.send.buffer.bytes",
    "socket.receive.buffer.bytes", "socket.max.fails",
})
OFFSET_UNSET = -1001  # librdkafka's OFFSET_INVALID: no committed offset


@dataclass(frozen=True)
class Snapshot:
    """One measurement of a group. `problem`: the broker or a topic is not there (the
    consumers are Degraded); `lag_error`: the offsets could not be read (the lag is unknown,
    the consumers may be fine)."""
    problem: Problem | None = None
    observation: Observation | None = None
    lag_error: str | None = None
    instance_ids: tuple[str, ...] = ()
    group_state: str | None = None
    group_type: str | None = None

    @property
    def fresh(self) -> bool:
        return self.observation is not None


def lag_summary(o: Observation, auto_offset_reset: str, measured_at: str,
                seconds: float | None = None) -> dict[str, Any]:
    lags = [partition_lag(p, auto_offset_reset) for p in o.partitions.values()]
    out: dict[str, Any] = {"total": sum(lags), "partitions": len(lags), "maxPartitionLag": max(lags, default=0),
                           "measuredAt": measured_at}
    if seconds is not None:
        out["seconds"] = round(seconds, 1)
    return out


def client_config(spec: AdaptiveConsumerSpec, secrets: Mapping[str, str], timeout_s: float) -> dict[str, Any]:
    """librdkafka settings for the operator's admin client: the spec's brokers and security,
    with the secret values the operator read (never written anywhere), and of `extra` only
    OPERATOR_EXTRA_PROPERTIES."""
    k = spec.kafka
    conf: dict[str, Any] = {key: value for key, value in k.extra.items() if key in OPERATOR_EXTRA_PROPERTIES}
    conf.update({
        "bootstrap.servers": k.bootstrap_servers,
        "security.protocol": k.security_protocol,
        "socket.timeout.ms": int(timeout_s * 1000),
        "socket.connection.setup.timeout.ms": int(timeout_s * 1000),
        "reconnect.backoff.max.ms": 1000,
        "client.id": "afc-operator",
    })
    if k.sasl_mechanism:
        conf["sasl.mechanism"] = k.sasl_mechanism
    if k.sasl_username:
        conf["sasl.username"] = k.sasl_username
    if "sasl_password" in secrets:
        conf["sasl.password"] = secrets["sasl_password"]
    if "tls_ca" in secrets:
        conf["ssl.ca.pem"] = secrets["tls_ca"]
    return conf


def cluster_key(conf: Mapping[str, Any]) -> str:
    """Clients are shared by this key: same brokers, same security, same credentials (the key
    is a digest, so no secret is kept in it)."""
    return hashlib.sha256(json.dumps(sorted(conf.items()), default=str).encode()).hexdigest()[:24]


def kafka_python_config(conf: Mapping[str, Any], timeout_s: float) -> dict[str, Any]:
    """The same connection for kafka-python's admin client."""
    out: dict[str, Any] = {
        "bootstrap_servers": conf["bootstrap.servers"].split(","),
        "security_protocol": conf.get("security.protocol", "PLAINTEXT"),
        "client_id": "afc-operator",
        "request_timeout_ms": int(timeout_s * 1000) + 1000,
    }
    if "sasl.mechanism" in conf:
        out["sasl_mechanism"] = conf["sasl.mechanism"]
        out["sasl_plain_username"] = conf.get("sasl.username")
        out["sasl_plain_password"] = conf.get("sasl.password")
    if out["security_protocol"] in ("SSL", "SASL_SSL"):
        ctx = ssl.create_default_context(cadata=conf.get("ssl.ca.pem"))
        out["ssl_context"] = ctx
    return out


class ClientCache:
    """One confluent-kafka AdminClient (measurement) and, when needed, one kafka-python admin
    client (member removal) per cluster key; closed after `idle_s` unused."""

    def __init__(self, timeout_s: float, idle_s: float = 900.0) -> None:
        self.timeout_s, self.idle_s = timeout_s, idle_s
        self._lock = threading.Lock()
        self._admins: dict[str, list[Any]] = {}    # key -> [client, last used]
        self._leavers: dict[str, list[Any]] = {}
        self.created = 0                           # admin clients ever made (tests and metrics)

    def admin(self, conf: Mapping[str, Any]) -> Any:
        from confluent_kafka.admin import AdminClient
        key = cluster_key(conf)
        with self._lock:
            entry = self._admins.get(key)
            if entry is None:
                entry = self._admins[key] = [AdminClient(dict(conf), logger=logger), 0.0]
                self.created += 1
            entry[1] = time.monotonic()
            return entry[0]

    def leaver(self, conf: Mapping[str, Any]) -> Any:
        from kafka.admin import KafkaAdminClient
        key = cluster_key(conf)
        with self._lock:
            entry = self._leavers.get(key)
            if entry is None:
                entry = self._leavers[key] = [KafkaAdminClient(**kafka_python_config(conf, self.timeout_s)), 0.0]
            entry[1] = time.monotonic()
            return entry[0]

    def drop_leaver(self, conf: Mapping[str, Any]) -> None:
        """After a failure: the next removal starts with a fresh connection."""
        with self._lock:
            entry = self._leavers.pop(cluster_key(conf), None)
        if entry:
            _close_quietly(entry[0])

    def sweep(self, now: float | None = None) -> int:
        """Close clients no resource used for idle_s; returns how many."""
        now = time.monotonic() if now is None else now
        gone = []
        with self._lock:
            for store in (self._admins, self._leavers):
                for key in [k for k, (_, used) in store.items() if now - used > self.idle_s]:
                    gone.append((store is self._leavers, store.pop(key)[0]))
        for closable, client in gone:
            if closable:
                _close_quietly(client)
        return len(gone)

    def __len__(self) -> int:
        return len(self._admins)

    def close(self) -> None:
        with self._lock:
            leavers = [c for c, _ in self._leavers.values()]
            self._admins.clear()
            self._leavers.clear()
        for c in leavers:
            _close_quietly(c)


def _close_quietly(client: Any) -> None:
    try:
        client.close()
    except Exception:  # noqa: BLE001 - closing a broken connection may fail; it is going anyway
        pass


def _kafka_error(e: BaseException) -> str:
    from confluent_kafka import KafkaException
    if isinstance(e, KafkaException) and e.args and hasattr(e.args[0], "str"):
        return e.args[0].str()
    return str(e) or type(e).__name__


def observe_sync(admin: Any, spec: AdaptiveConsumerSpec, timeout_s: float,
                 group_admin: Callable[[], Any]) -> Snapshot:
    """Reachability and topics (a Problem when they fail), then every partition's committed,
    log-start and log-end offsets and the group's members, in four batched requests.

    The group's committed offsets and members come from kafka-python (`group_admin()`), not
    from librdkafka's admin API: librdkafka's group calls can crash the process when the
    group coordinator is not available yet (confluent-kafka-python #1982, librdkafka #4605;
    seen here as SIGSEGV on a freshly started broker). Only a KIP-848 group, which classic
    DescribeGroups does not describe, is described through librdkafka."""
    from confluent_kafka import KafkaException, TopicPartition
    from confluent_kafka.admin import OffsetSpec

    k = spec.kafka
    topics: dict[str, Any] = {}
    try:
        for t in k.topics:  # metadata of our topics only, not of the whole cluster
            topics.update(admin.list_topics(topic=t, timeout=timeout_s).topics)
    except KafkaException as e:
        return Snapshot(problem=Problem(BROKER_UNREACHABLE, f"kafka {k.bootstrap_servers}: {_kafka_error(e)}"))
    missing = [t for t in k.topics if t not in topics or topics[t].error is not None]
    if missing:
        return Snapshot(problem=Problem(TOPIC_NOT_FOUND, f"topics not found on {k.bootstrap_servers}: "
                                                         + ", ".join(sorted(missing))))
    tps = [TopicPartition(t, p) for t in k.topics for p in sorted(topics[t].partitions)]
    at = time.time()
    try:
        earliest_f = admin.list_offsets({tp: OffsetSpec.earliest() for tp in tps}, request_timeout=timeout_s)
        latest_f = admin.list_offsets({tp: OffsetSpec.latest() for tp in tps}, request_timeout=timeout_s)
        committed, members, ids, state, gtype, owners = _group_sync(admin, group_admin(), k.group_id, tps, timeout_s)
        partitions = {}
        for tp in tps:
            key = (tp.topic, tp.partition)
            c = committed.get(key, OFFSET_UNSET)
            partitions[key] = Offsets(committed=c if c >= 0 else None,
                                      start=earliest_f[tp].result(timeout=timeout_s).offset,
                                      end=latest_f[tp].result(timeout=timeout_s).offset)
    except (KafkaException, TimeoutError) as e:
        return Snapshot(lag_error=f"lag of group {k.group_id}: {_kafka_error(e)}")
    except Exception as e:  # noqa: BLE001 - kafka-python's errors (KafkaError and subclasses)
        return Snapshot(lag_error=f"lag of group {k.group_id}: {type(e).__name__}: {e}")
    mine = {tp: m for tp, m in owners.items() if tp in partitions}
    return Snapshot(observation=Observation(at, partitions, members, mine or None, rebalancing(state)),
                    instance_ids=ids, group_state=state, group_type=gtype)


REBALANCING_STATES = ("preparingrebalance", "preparingrebalancing", "completingrebalance", "completingrebalancing",
                      "assigning", "reconciling")


def rebalancing(state: str | None) -> bool:
    """The group is between assignments (classic PreparingRebalance/CompletingRebalance, KIP-848
    Assigning/Reconciling): its members may be consuming nothing, whatever assignment the
    broker still reports (Kafka 4's coordinator reports the old one during a classic
    rebalance), so positions that stand still then say nothing of a stall."""
    return (state or "").replace("_", "").lower() in REBALANCING_STATES


_GROUP_LOCK = threading.Lock()    # a kafka-python client is not thread-safe; the probe's pool is


Owners = dict[tuple[str, int], str]


def _group_sync(admin: Any, group_admin: Any, group_id: str, tps: Sequence[Any], timeout_s: float
                ) -> tuple[dict[tuple[str, int], int], int, tuple[str, ...], str, str | None, Owners]:
    """(committed offsets, member count, static member ids, state, type, and the assignment:
    partition -> member, by group.instance.id where there is one) of one group. The
    assignment lets the autoscaler measure the rate on the members that were busy."""
    from kafka import TopicPartition as KTP
    with _GROUP_LOCK:
        offsets = group_admin.list_group_offsets({group_id: [KTP(tp.topic, tp.partition) for tp in tps]})[group_id]
        desc = group_admin.describe_groups([group_id])[group_id]
    committed = {(tp.topic, tp.partition): om.offset for tp, om in offsets.items()}
    err = str(desc.get("error") or "")
    if "not a classic group" not in err:
        ids = tuple(sorted(m["group_instance_id"] for m in desc["members"] if m.get("group_instance_id")))
        owners: Owners = {}
        for m in desc["members"]:
            who = m.get("group_instance_id") or m.get("member_id") or ""
            for a in (m.get("member_assignment") or {}).get("assigned_partitions") or ():
                owners.update({(a["topic"], p): who for p in a["partitions"]})
        return committed, len(desc["members"]), ids, str(desc.get("group_state")), "CLASSIC", owners
    group = admin.describe_consumer_groups([group_id], request_timeout=timeout_s)[group_id].result(timeout=timeout_s)
    ids = tuple(sorted(m.group_instance_id for m in group.members if m.group_instance_id))
    owners = {(tp.topic, tp.partition): m.group_instance_id or m.member_id
              for m in group.members for tp in (getattr(m.assignment, "topic_partitions", None) or ())}
    return (committed, len(group.members), ids, str(getattr(group.state, "name", group.state)),
            str(getattr(getattr(group, "type", None), "name", None)), owners)


def remove_members_sync(leaver: Any, group_id: str, instance_ids: Sequence[str]) -> dict[str, str]:
    """LeaveGroup v3+ for these group.instance.ids: {id: error name} ("NoError" when removed,
    "UnknownMemberIdError" when it was not a member any more)."""
    from kafka.admin import MemberToRemove
    members = [MemberToRemove(group_instance_id=i, reason="afc-operator: scaled down") for i in instance_ids]
    with _GROUP_LOCK:
        result = leaver.remove_group_members(group_id, members)
    return {str(k.group_instance_id if hasattr(k, "group_instance_id") else k): v.__name__
            for k, v in result.items()}


class KafkaProbe:
    """The operator's Kafka side: cached clients, calls in a small pool of their own (slow
    brokers never starve the API calls), each bounded inside (librdkafka's timeouts) and out."""

    def __init__(self, timeout_s: float, workers: int = 4, idle_s: float = 900.0) -> None:
        self.timeout_s = timeout_s
        self.clients = ClientCache(timeout_s, idle_s)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="afc-kafka")

    async def _bounded(self, what: str, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        bound = self.timeout_s * 4 + 2
        try:
            return await asyncio.wait_for(loop.run_in_executor(self._pool, fn, *args), bound)
        except asyncio.TimeoutError:
            raise TimeoutError(f"{what}: no answer within {bound:.0f}s") from None

    async def observe(self, spec: AdaptiveConsumerSpec, secrets: Mapping[str, str]) -> Snapshot:
        conf = client_config(spec, secrets, self.timeout_s)

        def run() -> Snapshot:
            try:
                return observe_sync(self.clients.admin(conf), spec, self.timeout_s, lambda: self.clients.leaver(conf))
            except Exception:
                self.clients.drop_leaver(conf)     # a broken kafka-python client is made anew next time
                raise
        try:
            return await self._bounded(f"kafka {spec.kafka.bootstrap_servers}", run)
        except TimeoutError as e:
            return Snapshot(problem=Problem(BROKER_UNREACHABLE, str(e)))

    async def remove_members(self, spec: AdaptiveConsumerSpec, secrets: Mapping[str, str],
                             instance_ids: Sequence[str]) -> dict[str, str]:
        conf = client_config(spec, secrets, self.timeout_s)

        def run() -> dict[str, str]:
            try:
                return remove_members_sync(self.clients.leaver(conf), spec.kafka.group_id, instance_ids)
            except Exception:
                self.clients.drop_leaver(conf)
                raise
        return await self._bounded(f"LeaveGroup on {spec.kafka.bootstrap_servers}", run)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.clients.close()


__all__ = ["OPERATOR_EXTRA_PROPERTIES", "KafkaProbe", "Snapshot", "ClientCache", "client_config", "cluster_key", "lag_summary",
           "observe_sync", "remove_members_sync"]
