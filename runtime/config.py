"""The runtime's configuration: one pydantic model, read from env vars and a JSON file.

The operator renders the same model into a ConfigMap (and the CRD embeds its sections),
so both sides agree on names, bounds and defaults. Field names are snake_case in Python
and environment variables (`AFC_KAFKA__BOOTSTRAP_SERVERS`), camelCase in JSON and the CRD.
Secrets (SASL password, Redis URL with a password) are never written to the file: they
arrive as environment variables the pod takes from Secret references.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, ClassVar, Literal

from pydantic import (AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, field_validator,
                      model_validator)
from pydantic.alias_generators import to_camel, to_snake
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

HANDLER_PATH = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"
TOPIC_NAME = r"^[A-Za-z0-9._-]{1,249}$"


# An empty variable (AFC_IDEMPOTENCY__REDIS_URL=) means "not set", as an absent one does.
OptionalSecret = Annotated[SecretStr | None, BeforeValidator(lambda v: None if v == "" else v)]

# librdkafka properties `kafka.extra` may set: tuning of the connection and the fetch, and
# diagnostics. An allow-list, not a deny-list: a property afc sets itself (group.id,
# group.instance.id, enable.auto.commit, enable.auto.offset.store, bootstrap.servers,
# session.timeout.ms, the security settings, ...) would override it, since `extra` is applied
# last, and break at-least-once, static membership or secret handling; a property carrying a
# secret (sasl.password, sasl.oauthbearer.*, ssl.key.*) would land in a ConfigMap. Both are
# refused, and so is anything librdkafka adds later until it is looked at and listed here.
KAFKA_EXTRA_ALLOWED = (
    # how to reach the brokers
    "client.rack", "socket.timeout.ms", "socket.send.buffer.bytes", "socket.receive.buffer.bytes",
    "socket.keepalive.enable", "socket.nagle.disable", "socket.max.fails", "socket.connection.setup.timeout.ms",
    "connections.max.idle.ms", "broker.address.ttl", "broker.address.family", "client.dns.lookup",
    "reconnect.backoff.ms", "reconnect.backoff.max.ms", "retry.backoff.ms", "retry.backoff.max.ms",
    "metadata.max.age.ms", "topic.metadata.refresh.interval.ms", "topic.metadata.refresh.fast.interval.ms",
    "topic.metadata.refresh.sparse", "topic.metadata.propagation.max.ms", "api.version.request.timeout.ms",
    "ssl.endpoint.identification.algorithm", "enable.ssl.certificate.verification", "ssl.cipher.suites",
    "ssl.curves.list", "ssl.sigalgs.list",
    # how to fetch (the bounds afc adapts itself are typed fields of the section)
    "fetch.wait.max.ms", "fetch.min.bytes", "fetch.error.backoff.ms",
    "queued.min.messages", "receive.message.max.bytes", "check.crcs", "isolation.level",
    "coordinator.query.interval.ms",
    # the classic protocol's client-side assignor (eager range/roundrobin or cooperative-sticky;
    # the runtime handles both): see the rule `kafka-extra-assignor`
    "partition.assignment.strategy",
    # diagnostics
    "debug", "log.connection.close", "enable.metrics.push",
)
ASSIGNORS = ("cooperative-sticky", "range", "roundrobin")
EXTRA_REFUSED = ("not allowed in extra, which only tunes the connection, the fetch and diagnostics: afc sets "
                 "group.id, group.instance.id, enable.auto.commit, bootstrap.servers, session.timeout.ms, the "
                 "security settings, ... itself, and secrets come from Secret references (the allowed properties "
                 "are listed in docs/operator.md)")
RULE_ERROR = "crd_rule"  # the error type afc.operator.render names fields from


def cel_list(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


@dataclass(frozen=True)
class Rule:
    """A cross-field rule, written once and enforced twice: `check` by pydantic (the runtime
    when it loads its settings, the operator when it reads a spec) and `cel` by the apiserver
    (afc.operator.crd writes it into the CRD as an `x-kubernetes-validations` rule), so
    `kubectl apply` refuses what the pods would refuse at start. `name` identifies the rule
    on both sides: tests/unit/test_config_rules.py asserts that every rule of the runtime's
    model is in the CRD and has an invalid example refused by both. `field` is the camelCase
    field the message is about, relative to the section (the CRD's `fieldPath`)."""
    name: str
    cel: str
    check: Callable[[Any], bool]
    message: str
    field: str | None = None
    # Optionally the message with the offending values in it, for pydantic's side (a CEL
    # messageExpression over map keys costs more than the apiserver's budget allows).
    describe: Callable[[Any], str] | None = None

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rule": self.cel, "message": self.message}
        if self.field:
            out["fieldPath"] = self.field
        out["reason"] = "FieldValueInvalid"
        return out

    def explain(self, obj: Any) -> str:
        return self.describe(obj) if self.describe else self.message


def rule_error(failed: list[tuple[str, str]]) -> PydanticCustomError:
    """One error carrying each (field, message), so the caller can name every field."""
    return PydanticCustomError(RULE_ERROR, "{summary}", {
        "summary": "; ".join(f"{f}: {m}" if f else m for f, m in failed), "failures": failed})


def check_rules(obj: Any, rules: tuple[Rule, ...]) -> None:
    failed = [((r.field or "").lstrip("."), r.explain(obj)) for r in rules if not r.check(obj)]
    if failed:
        raise rule_error(failed)


class Section(BaseModel):
    """camelCase in JSON and the CRD, snake_case in Python; unknown keys are errors. Cross-field
    rules are `rules` (never a bare model_validator: the CRD could not carry it)."""
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid",
                              validate_default=True)
    rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _rules(self) -> Any:
        check_rules(self, type(self).rules)
        return self


class KafkaSettings(Section):
    rules = (
        Rule("kafka-extra-allowed",
             "!has(self.extra) || self.extra.all(k, k in " + cel_list(KAFKA_EXTRA_ALLOWED) + ")",
             lambda k: all(p in KAFKA_EXTRA_ALLOWED for p in k.extra), EXTRA_REFUSED, ".extra",
             describe=lambda k: ", ".join(p for p in k.extra if p not in KAFKA_EXTRA_ALLOWED) + ": " + EXTRA_REFUSED),
        Rule("kafka-extra-assignor",
             "!has(self.extra) || !('partition.assignment.strategy' in self.extra)"
             " || self.extra['partition.assignment.strategy'] in " + cel_list(ASSIGNORS),
             lambda k: k.extra.get("partition.assignment.strategy", ASSIGNORS[0]) in ASSIGNORS,
             "extra['partition.assignment.strategy'] must be one of " + ", ".join(ASSIGNORS)
             + " (librdkafka refuses a mix of eager and cooperative assignors)", ".extra"),
    )

    bootstrap_servers: str = Field("localhost:9092", min_length=1,
                                   description="Comma-separated host:port list of the brokers.")
    topics: list[str] = Field(default_factory=list, description="Topics to consume (at least one to run).")
    group_id: str = Field("afc", min_length=1, max_length=249, description="Consumer group id.")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = Field(None, description="From a Secret; never rendered to files.")
    ssl_ca_location: str | None = Field(None, description="Path of a CA bundle (a mounted Secret).")
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    fetch_max_bytes: int = Field(52_428_800, ge=1024)
    max_partition_fetch_bytes: int = Field(1_048_576, ge=1024)
    queued_max_messages_kbytes: int = Field(
        16_384, ge=64, description="Bound on librdkafka's prefetch queue per consumer, in KiB.")
    fetch_queue_backoff_ms: int = Field(
        50, ge=0, le=10_000,
        description="How long librdkafka waits to fetch a partition again after its prefetch queue was over its "
                    "bounds (fetch.queue.backoff.ms). librdkafka's default, 1000 ms, let a fast consumer drain the "
                    "queue and then wait: 105k against 175k msg/s with no idempotency (docs/performance.md).")
    extra: dict[str, str] = Field(default_factory=dict,
                                  description="Further librdkafka properties, passed through as given; only the "
                                              "tuning ones afc does not set itself (see KAFKA_EXTRA_ALLOWED).")

    @field_validator("topics")
    @classmethod
    def _topic_names(cls, v: list[str]) -> list[str]:
        for t in v:
            if not re.match(TOPIC_NAME, t):
                raise ValueError(f"invalid topic name {t!r}")
        if len(set(v)) != len(v):
            raise ValueError("topics must be unique")
        return v


class MembershipSettings(Section):
    rules = (
        Rule("membership-session-within-poll",
             "self.groupProtocol != 'classic' || self.sessionTimeoutMs <= self.maxPollIntervalMs",
             lambda m: m.group_protocol != "classic" or m.session_timeout_ms <= m.max_poll_interval_ms,
             "sessionTimeoutMs must be <= maxPollIntervalMs (librdkafka refuses to start otherwise)",
             ".sessionTimeoutMs"),
    )
    static: bool = Field(True, description="Use group.instance.id (static membership).")
    instance_id: str | None = Field(
        None, description="group.instance.id; defaults to AFC_INSTANCE_ID, then POD_NAME, then HOSTNAME.")
    session_timeout_ms: int = Field(
        45_000, ge=6_000, le=1_800_000, description="Classic protocol: the group session timeout, within the "
        "brokers' default group.min.session.timeout.ms (6000) and group.max.session.timeout.ms (1800000).")
    max_poll_interval_ms: int = Field(300_000, ge=10_000, le=86_400_000)
    group_protocol: Literal["classic", "consumer"] = Field(
        "classic", description="classic (with cooperative-sticky assignment) or KIP-848 consumer.")
    remote_assignor: Literal["range", "uniform"] = Field(
        "range", description="KIP-848 only: the broker-side assignor. range balances each topic on its own "
                             "(partition i of the source and of its .retry topic go to the same member); "
                             "uniform balances the total count, and can leave a member only idle retry partitions.")

    def resolved_instance_id(self) -> str | None:
        if not self.static:
            return None
        return (self.instance_id or os.environ.get("AFC_INSTANCE_ID") or os.environ.get("POD_NAME")
                or os.environ.get("HOSTNAME") or None)


ASYNC_WORKERS = 256     # flow.workers 0: the upper bound for async handlers...
SYNC_WORKERS = 64       # ...and for sync ones (threads)


class FlowSettings(Section):
    """Bounds of the adaptive fetch loop (see fetch_control) and of handler concurrency (see concurrency)."""
    rules = (
        Rule("flow-inflight-bounds", "self.minInflight <= self.maxInflight",
             lambda f: f.min_inflight <= f.max_inflight, "minInflight must be <= maxInflight", ".minInflight"),
        Rule("flow-batch-bounds", "self.minBatch <= self.maxBatch",
             lambda f: f.min_batch <= f.max_batch, "minBatch must be <= maxBatch", ".minBatch"),
        Rule("flow-initial-inflight",
             "!has(self.initialInflight) || (self.minInflight <= self.initialInflight"
             " && self.initialInflight <= self.maxInflight)",
             lambda f: f.initial_inflight is None or f.min_inflight <= f.initial_inflight <= f.max_inflight,
             "initialInflight must lie within [minInflight, maxInflight]", ".initialInflight"),
        Rule("flow-concurrency-bounds", "self.workers == 0 || self.minConcurrency <= self.workers",
             lambda f: f.workers == 0 or f.min_concurrency <= f.workers, "minConcurrency must be <= workers",
             ".minConcurrency"),
        Rule("flow-initial-concurrency",
             "!has(self.initialConcurrency) || (self.minConcurrency <= self.initialConcurrency"
             " && (self.workers == 0 || self.initialConcurrency <= self.workers))",
             lambda f: f.initial_concurrency is None or (f.min_concurrency <= f.initial_concurrency
                                                         and (f.workers == 0 or f.initial_concurrency <= f.workers)),
             "initialConcurrency must lie within [minConcurrency, workers]", ".initialConcurrency"),
    )
    min_inflight: int = Field(1, ge=1, description="Floor of the in-flight limit.")
    max_inflight: int = Field(5_000, ge=1, description="Ceiling of the in-flight limit.")
    initial_inflight: int | None = Field(None, ge=1, description="Start value; default min(100, maxInflight).")
    min_batch: int = Field(1, ge=1)
    max_batch: int = Field(1_000, ge=1, le=100_000, description="Most messages taken per fetch.")
    target_latency_ms: float = Field(200.0, gt=0, description="Handler latency above which the limit is cut.")
    max_error_rate: float = Field(0.2, ge=0, le=1, description="Error rate above which the limit is cut.")
    decrease_factor: float = Field(0.5, gt=0, lt=1, description="Multiplicative cut on overload (AIMD).")
    increase_ratio: float = Field(0.1, ge=0, le=1, description="Growth per healthy window, as a share of the limit (at least +1).")
    window_ms: int = Field(250, ge=10, le=60_000, description="How often the controller decides.")
    fetch_linger_ms: float = Field(
        1.0, ge=0, le=50, description="When a fetch finds a stream of records (more than one already "
        "there, fewer than the batch allows), wait up to this long for more before handing them on: "
        "fewer, larger batches at modest rates (each batch costs a store call and thread hand-offs). "
        "A lone record is never held; a full batch never waits. 0: off.")
    workers: int = Field(0, ge=0, le=1024, description="Upper bound of handler concurrency (tasks for async "
                         "handlers; threads for sync ones, grown and shrunk within it); with concurrency fixed, "
                         "the concurrency itself. 0: 256 for async handlers, 64 for sync ones.")
    concurrency: Literal["adaptive", "fixed"] = Field(
        "adaptive", description="adaptive: the handler-concurrency limit follows the downstream's latency "
        "(see docs/flow-control.md), within [minConcurrency, workers]; fixed: always `workers` calls at once.")
    min_concurrency: int = Field(1, ge=1, le=1024, description="Floor of the adaptive concurrency limit.")
    initial_concurrency: int | None = Field(None, ge=1, le=1024,
                                            description="Start of the adaptive concurrency limit; default 4.")
    latency_tolerance: float = Field(1.5, gt=1, le=10, description="Handler latency over its no-load latency "
                                     "that marks a queueing downstream; the limit settles a third of the way "
                                     "from 1 to it.")


    @property
    def start_inflight(self) -> int:
        return self.initial_inflight or max(self.min_inflight, min(100, self.max_inflight))

    def resolved_workers(self, is_async: bool) -> int:
        """The upper bound for this handler. Sync handlers get fewer by default: every thread
        is one more connection the handler's own client pool must hold (redis-py's default
        pool raises past 100), and the GIL serves few threads at once anyway."""
        return self.workers or (ASYNC_WORKERS if is_async else SYNC_WORKERS)


class IdempotencySettings(Section):
    enabled: bool = True
    redis_url: OptionalSecret = Field(
        None, description="Redis URL (from a Secret); without one, an embedded store serves one process only. A Redis "
                           "Cluster: redis+cluster://host:port[,host:port...] (docs/redis-cluster.md).")
    sqlite_path: str = Field(":memory:", description="Embedded store file when no Redis URL is given.")
    key_prefix: str = Field("afc", min_length=1, max_length=64)
    key_header: str = Field("idempotency-key", min_length=1)
    key_field: str | None = Field(None, description="Dotted payload field used as key when the header is absent.")
    lease_ms: int = Field(30_000, ge=100, le=3_600_000, description="How long a claim survives its worker.")
    done_ttl_s: int = Field(7 * 86_400, ge=60, description="How long a done key is remembered.")



class BackpressureSettings(Section):
    """The backpressure signal this consumer publishes for producers (see backpressure.py)."""
    rules = (
        Rule("backpressure-beat-within-ttl", "!has(self.heartbeatMs) || self.heartbeatMs < self.ttlMs",
             lambda b: b.heartbeat_ms is None or b.heartbeat_ms < b.ttl_ms,
             "heartbeatMs must be < ttlMs, or the level expires between beats", ".heartbeatMs"),
    )
    enabled: bool = Field(True, description="Publish this member's saturation level to Redis "
                          "(needs a Redis URL here or in idempotency).")
    redis_url: OptionalSecret = Field(
        None, description="Redis URL for the signal (from a Secret); defaults to idempotency.redisUrl. A Redis "
                           "Cluster: redis+cluster://host:port[,host:port...] (afc.runtime.redisconn).")
    key_prefix: str | None = Field(None, min_length=1, max_length=64,
                                   description="Key prefix; defaults to idempotency.keyPrefix.")
    ttl_ms: int = Field(3_000, ge=300, le=600_000,
                        description="Life of a member's level without a heartbeat: a dead consumer stops "
                                    "counting after it.")
    heartbeat_ms: int | None = Field(None, ge=50, description="Re-publish interval; default ttlMs/3.")
    clear_ratio: float = Field(0.7, gt=0, lt=1, description="A saturated member clears only once pressure "
                               "(latency/target, errors/bound) stays at or below this...")
    clear_after_ms: int = Field(1_000, ge=0, le=600_000, description="...for this long (hysteresis).")
    paused_share: float = Field(0.5, gt=0, le=1, description="At the in-flight floor, this share of paused "
                                "partitions counts as saturated.")


    @property
    def resolved_heartbeat_ms(self) -> int:
        return self.heartbeat_ms or max(50, self.ttl_ms // 3)


class HandlerSettings(Section):
    rules = (
        Rule("handler-one-target", "!(has(self.handler) && has(self.httpSinkUrl))",
             lambda h: not (h.handler and h.http_sink_url), "set either handler or httpSinkUrl, not both", ".handler"),
    )
    handler: str | None = Field(None, pattern=HANDLER_PATH, description="Import path `pkg.module:func`.")
    http_sink_url: str | None = Field(None, pattern=r"^https?://.+",
                                      description="POST each message (or batch) to this URL instead.")
    http_batch: bool = Field(False, description="The HTTP sink as a batch handler: one POST per batch (a JSON "
                             "array of up to maxBatch messages) instead of one per message.")
    http_timeout_s: float = Field(10.0, gt=0, le=300)
    decoder: Literal["json", "raw", "text"] = "json"
    timeout_s: float = Field(30.0, ge=0, le=86_400, description="Per-call deadline (a batch handler's whole call); "
                             "past it the message (every message of the batch) is failed as TRANSIENT "
                             "(HandlerTimeout) and routed. 0: none.")
    max_batch: int = Field(500, ge=1, le=100_000, description="Most messages a batch handler (`@afc.runtime.batch`, "
                           "or httpBatch) receives in one call.")
    max_abandoned_threads: int = Field(4, ge=0, le=1_000, description="Sync handler threads still running after "
                                       "a timeout; past this many the process exits (code 3) to reclaim them.")
    steal_after_ms: int = Field(500, ge=10, le=600_000, description="A handler call running this long has the "
                                "records queued behind it (other keys) handed to other workers.")
    event_loop: Literal["uvloop", "asyncio"] = Field(
        "uvloop", description="The event loop the runtime and async handlers run on: uvloop (libuv; less CPU per "
        "fetched batch and store call) or asyncio's own, for a handler library that needs it.")



class RoutingSettings(Section):
    """Failure routing (Spring Kafka's vocabulary): retry topic, dead-letter, poison."""
    rules = (
        Rule("routing-distinct-suffixes",
             "self.retrySuffix != self.dlqSuffix && self.retrySuffix != self.poisonSuffix"
             " && self.dlqSuffix != self.poisonSuffix",
             lambda r: len({r.retry_suffix, r.dlq_suffix, r.poison_suffix}) == 3,
             "retrySuffix, dlqSuffix and poisonSuffix must differ", ".dlqSuffix"),
        Rule("routing-backoff-bounds", "self.backoffMaxMs >= self.backoffInitialMs",
             lambda r: r.backoff_max_ms >= r.backoff_initial_ms, "backoffMaxMs must be >= backoffInitialMs",
             ".backoffMaxMs"),
    )
    enabled: bool = Field(True, description="Off: a failing message is retried in place, holding its partition.")
    retry_suffix: str = Field(".retry", pattern=r"^[A-Za-z0-9._-]+$")
    dlq_suffix: str = Field(".dlq", pattern=r"^[A-Za-z0-9._-]+$")
    poison_suffix: str = Field(".poison", pattern=r"^[A-Za-z0-9._-]+$")
    max_attempts: int = Field(5, ge=1, le=100, description="Handler runs before a transient failure is dead-lettered.")
    backoff_initial_ms: int = Field(5_000, ge=0, le=86_400_000)
    backoff_max_ms: int = Field(300_000, ge=0, le=86_400_000)
    backoff_multiplier: float = Field(2.0, ge=1.0, le=10.0)
    jitter: float = Field(0.2, ge=0, le=1)
    transient: list[str] = Field(default_factory=list, description="Exception class names that are TRANSIENT.")
    permanent: list[str] = Field(default_factory=list, description="Exception class names that are PERMANENT.")
    poison: list[str] = Field(default_factory=list, description="Exception class names that are POISON.")
    poison_failures: int = Field(3, ge=0, description="A message failing this often within poisonWindowS is poison (0: off).")
    poison_window_s: float = Field(10.0, gt=0)
    max_message_bytes: int = Field(1_048_576, ge=1024, description="Larger values are poison, never handed to the handler.")
    stacktrace_bytes: int = Field(8_192, ge=256, le=65_536)
    create_topics: bool = Field(True, description="Create missing retry/DLQ/poison topics (source's partition count).")



class OffsetSettings(Section):
    commit_interval_ms: int = Field(1_000, ge=50, le=60_000,
                                    description="How often offsets are committed while records are in flight.")
    caught_up_commit_ms: int = Field(100, ge=0, le=60_000,
                                     description="With nothing in flight, commit at most this often instead of "
                                                 "waiting for commitIntervalMs, so the committed lag (what autoscaling "
                                                 "and dashboards read) is current once caught up; 0: only at "
                                                 "commitIntervalMs.")
    max_window: int = Field(100_000, ge=100, le=100_000_000, description="Most offsets a partition may run ahead "
                            "of its commit point (what a crash re-delivers); past it the partition pauses.")


class ServerSettings(Section):
    host: str = "0.0.0.0"
    port: int = Field(8080, ge=0, le=65_535, description="/healthz, /readyz and /metrics; 0 disables.")
    liveness_timeout_s: float = Field(30.0, gt=0, description="/healthz fails when the loop stalls longer.")


class ShutdownSettings(Section):
    drain_timeout_s: float = Field(20.0, ge=0, le=3_600,
                                   description="How long SIGTERM waits for in-flight work before closing.")


class RuntimeSettings(BaseSettings):
    """Everything `afc-consumer` needs. Sources, strongest first: arguments, environment
    (`AFC_` prefix, `__` between levels), the JSON file named by `AFC_CONFIG_FILE`."""
    model_config = SettingsConfigDict(env_prefix="AFC_", env_nested_delimiter="__", extra="forbid",
                                      alias_generator=to_camel, populate_by_name=True,
                                      validate_default=True)

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    membership: MembershipSettings = Field(default_factory=MembershipSettings)
    flow: FlowSettings = Field(default_factory=FlowSettings)
    idempotency: IdempotencySettings = Field(default_factory=IdempotencySettings)
    handler: HandlerSettings = Field(default_factory=HandlerSettings)
    offsets: OffsetSettings = Field(default_factory=OffsetSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    shutdown: ShutdownSettings = Field(default_factory=ShutdownSettings)
    backpressure: BackpressureSettings = Field(default_factory=BackpressureSettings)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", validation_alias=AliasChoices("logLevel", "log_level"))

    # Rules across sections (the CRD carries them on the spec, whose paths are the same).
    rules: ClassVar[tuple[Rule, ...]] = (
        Rule("kafka-extra-assignor-classic",
             "!has(self.kafka.extra) || !('partition.assignment.strategy' in self.kafka.extra)"
             " || self.membership.groupProtocol == 'classic'",
             lambda s: "partition.assignment.strategy" not in s.kafka.extra or s.membership.group_protocol == "classic",
             "extra['partition.assignment.strategy'] needs membership.groupProtocol classic (the consumer protocol "
             "assigns on the broker: membership.remoteAssignor)", ".kafka.extra"),
    )

    @model_validator(mode="after")
    def _rules(self) -> Any:
        check_rules(self, type(self).rules)
        return self

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, JsonFileSource(settings_cls)

    def require_runnable(self) -> None:
        """What validation of each field alone cannot say: is there enough to run?"""
        problems = []
        if not self.kafka.topics:
            problems.append("kafka.topics: at least one topic is required (AFC_KAFKA__TOPICS='[\"t\"]')")
        if not (self.handler.handler or self.handler.http_sink_url):
            problems.append("handler: set handler.handler (pkg.module:func) or handler.httpSinkUrl")
        if problems:
            raise ConfigError("; ".join(problems))

    def to_file_json(self) -> dict[str, Any]:
        """The camelCase document for a ConfigMap: secrets are left out, not masked."""
        return self.model_dump(mode="json", by_alias=True, exclude={
            "kafka": {"sasl_password"}, "idempotency": {"redis_url"},
            "backpressure": {"redis_url"}})


class ConfigError(ValueError):
    """Configuration that cannot run; the message names the field."""


class JsonFileSource(PydanticBaseSettingsSource):
    """Reads `AFC_CONFIG_FILE` (JSON, camelCase or snake_case keys) if it is set."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover - unused
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get("AFC_CONFIG_FILE")
        if not path:
            return {}
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"AFC_CONFIG_FILE={path}: no such file") from e
        except json.JSONDecodeError as e:
            raise ConfigError(f"AFC_CONFIG_FILE={path}: not valid JSON ({e})") from e
        if not isinstance(data, dict):
            raise ConfigError(f"AFC_CONFIG_FILE={path}: the top level must be an object")
        return snake_keys(data)


def snake_keys(data: Any) -> Any:
    """camelCase keys to field names, so a file (camelCase) and the environment (snake_case)
    merge per field. Free-form maps (`kafka.extra`: librdkafka names) are left as they are."""
    if not isinstance(data, dict):
        return data
    return {to_snake(k): (v if k == "extra" else snake_keys(v)) for k, v in data.items()}


FREE_FORM_MAPS = (("kafka", "extra"),)    # maps whose keys are someone else's names (librdkafka's)


def field_label(loc: tuple[Any, ...]) -> str:
    """`membership.sessionTimeoutMs (AFC_MEMBERSHIP__SESSION_TIMEOUT_MS)` for an error location;
    a free-form map's key as it was written, in brackets as Kubernetes writes map keys
    (`kafka.extra[socket.timeout.ms] (AFC_KAFKA__EXTRA)`:
    the map is one JSON value in the environment), not camel-cased into a name nobody wrote."""
    parts = [str(p) for p in loc if not isinstance(p, int)]
    if not parts:
        return "settings"
    for m in FREE_FORM_MAPS:
        if len(parts) > len(m) and tuple(parts[:len(m)]) == m:
            head = field_label(m).split(" ")
            return f'{head[0]}[{".".join(parts[len(m):])}] {head[1]}'
    camel = ".".join(to_camel(p) for p in parts)
    env = "AFC_" + "__".join(p.upper() for p in parts)
    return f"{camel} ({env})"


def load_settings(**overrides: Any) -> RuntimeSettings:
    """Build and validate settings; pydantic's errors become one ConfigError naming fields."""
    from pydantic import ValidationError
    try:
        return RuntimeSettings(**snake_keys(overrides))
    except ValidationError as e:
        lines = []
        for err in e.errors():
            if err["type"] == RULE_ERROR:  # a Rule: name the field it is about, not only its section
                lines += [f"{field_label((*err['loc'], *(to_snake(p) for p in f.split('.') if p)))}: {m}"
                          for f, m in err["ctx"]["failures"]]
            else:
                lines.append(f"{field_label(err['loc'])}: {err['msg']}")
        raise ConfigError("invalid configuration: " + "; ".join(lines)) from e


class ProducerSettings(BaseSettings):
    """The adaptive producer library's settings (`producer.AdaptiveProducer`), separate from
    the consumer's. Environment: `AFC_PRODUCER__<FIELD>`; camelCase keys in JSON."""
    model_config = SettingsConfigDict(env_prefix="AFC_PRODUCER__", env_nested_delimiter="__", extra="forbid",
                                      alias_generator=to_camel, populate_by_name=True, validate_default=True)

    bootstrap_servers: str = Field("localhost:9092", min_length=1)
    groups: list[str] = Field(default_factory=list,
                              description="Consumer groups whose signal to honour (the most saturated governs).")
    redis_url: OptionalSecret = Field(None, description="Redis holding the signal; none: no signal, max rate. "
                                      "A Redis Cluster: redis+cluster://host:port[,host:port...].")
    key_prefix: str = Field("afc", min_length=1, max_length=64, description="The consumers' key prefix.")
    key_header: str = Field("idempotency-key", min_length=1)
    max_message_bytes: int = Field(1_048_576, ge=1, description="Larger messages are refused before sending.")
    max_rate: float = Field(10_000.0, gt=0, description="Messages per second when the group is healthy.")
    floor_rate: float = Field(50.0, gt=0, description="Least rate: under full pressure, and when Redis is down.")
    burst_s: float = Field(0.1, gt=0, le=10, description="Bucket depth, in seconds of the current rate.")
    max_wait_s: float = Field(5.0, ge=0, description="A send that would wait longer raises ProducerThrottled.")
    decrease_factor: float = Field(0.5, gt=0, lt=1,
                                   description="Rate multiplier per adjust step at group level 1 (AIMD).")
    increase_per_s: float = Field(0.25, gt=0, le=10,
                                  description="Share of maxRate regained per second while the signal is clear.")
    adjust_interval_ms: int = Field(200, ge=10, le=10_000)
    poll_interval_ms: int = Field(500, ge=50, le=60_000, description="Periodic read besides pub/sub.")
    kafka: dict[str, str] = Field(default_factory=dict, description="Further librdkafka producer properties.")

    @model_validator(mode="after")
    def _rates(self) -> "ProducerSettings":
        if self.floor_rate > self.max_rate:
            raise ValueError("floorRate must be <= maxRate")
        return self
