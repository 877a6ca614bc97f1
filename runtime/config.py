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
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, field_validator,
                      model_validator)
from pydantic.alias_generators import to_camel, to_snake
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

HANDLER_PATH = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"
TOPIC_NAME = r"^[A-Za-z0-9._-]{1,249}$"


# An empty variable (AFC_IDEMPOTENCY__REDIS_URL=) means "not set", as an absent one does.
OptionalSecret = Annotated[SecretStr | None, BeforeValidator(lambda v: None if v == "" else v)]


class Section(BaseModel):
    """camelCase in JSON and the CRD, snake_case in Python; unknown keys are errors."""
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid",
                              validate_default=True)


class KafkaSettings(Section):
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
    extra: dict[str, str] = Field(default_factory=dict,
                                  description="Further librdkafka properties, passed through as given.")

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
    static: bool = Field(True, description="Use group.instance.id (static membership).")
    instance_id: str | None = Field(
        None, description="group.instance.id; defaults to AFC_INSTANCE_ID, then POD_NAME, then HOSTNAME.")
    session_timeout_ms: int = Field(45_000, ge=1_000, le=1_800_000)
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


class FlowSettings(Section):
    """Bounds of the adaptive fetch loop (see fetch_control)."""
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
    workers: int = Field(16, ge=1, le=1024, description="Handler concurrency (threads for sync handlers, tasks for async).")

    @model_validator(mode="after")
    def _bounds(self) -> "FlowSettings":
        if self.min_inflight > self.max_inflight:
            raise ValueError("minInflight must be <= maxInflight")
        if self.min_batch > self.max_batch:
            raise ValueError("minBatch must be <= maxBatch")
        if self.initial_inflight is not None and not self.min_inflight <= self.initial_inflight <= self.max_inflight:
            raise ValueError("initialInflight must lie within [minInflight, maxInflight]")
        return self

    @property
    def start_inflight(self) -> int:
        return self.initial_inflight or max(self.min_inflight, min(100, self.max_inflight))


class IdempotencySettings(Section):
    enabled: bool = True
    redis_url: OptionalSecret = Field(
        None, description="Redis URL (from a Secret); without one, an embedded store serves one process only.")
    sqlite_path: str = Field(":memory:", description="Embedded store file when no Redis URL is given.")
    key_prefix: str = Field("afc", min_length=1, max_length=64)
    key_header: str = Field("idempotency-key", min_length=1)
    key_field: str | None = Field(None, description="Dotted payload field used as key when the header is absent.")
    lease_ms: int = Field(30_000, ge=100, le=3_600_000, description="How long a claim survives its worker.")
    done_ttl_s: int = Field(7 * 86_400, ge=60, description="How long a done key is remembered.")



class BackpressureSettings(Section):
    """The backpressure signal this consumer publishes for producers (see backpressure.py)."""
    enabled: bool = Field(True, description="Publish this member's saturation level to Redis "
                          "(needs a Redis URL here or in idempotency).")
    redis_url: OptionalSecret = Field(
        None, description="Redis URL for the signal (from a Secret); defaults to idempotency.redisUrl.")
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

    @model_validator(mode="after")
    def _beat_within_ttl(self) -> "BackpressureSettings":
        if self.heartbeat_ms is not None and self.heartbeat_ms >= self.ttl_ms:
            raise ValueError("heartbeatMs must be < ttlMs, or the level expires between beats")
        return self

    @property
    def resolved_heartbeat_ms(self) -> int:
        return self.heartbeat_ms or max(50, self.ttl_ms // 3)


class HandlerSettings(Section):
    handler: str | None = Field(None, pattern=HANDLER_PATH, description="Import path `pkg.module:func`.")
    http_sink_url: str | None = Field(None, pattern=r"^https?://.+",
                                      description="POST each message (or batch) to this URL instead.")
    http_batch: bool = False
    http_timeout_s: float = Field(10.0, gt=0, le=300)
    decoder: Literal["json", "raw", "text"] = "json"
    timeout_s: float = Field(30.0, ge=0, le=86_400, description="Per-message deadline; past it the message is "
                             "failed as TRANSIENT (HandlerTimeout) and routed. 0: none.")
    max_abandoned_threads: int = Field(4, ge=0, le=1_000, description="Sync handler threads still running after "
                                       "a timeout; past this many the process exits (code 3) to reclaim them.")
    steal_after_ms: int = Field(500, ge=10, le=600_000, description="A handler call running this long has the "
                                "records queued behind it (other keys) handed to other workers.")

    @model_validator(mode="after")
    def _one_target(self) -> "HandlerSettings":
        if self.handler and self.http_sink_url:
            raise ValueError("set either handler or httpSinkUrl, not both")
        return self


class RoutingSettings(Section):
    """Failure routing (Spring Kafka's vocabulary): retry topic, dead-letter, poison."""
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

    @model_validator(mode="after")
    def _distinct(self) -> "RoutingSettings":
        if len({self.retry_suffix, self.dlq_suffix, self.poison_suffix}) != 3:
            raise ValueError("retrySuffix, dlqSuffix and poisonSuffix must differ")
        if self.backoff_max_ms < self.backoff_initial_ms:
            raise ValueError("backoffMaxMs must be >= backoffInitialMs")
        return self


class OffsetSettings(Section):
    commit_interval_ms: int = Field(1_000, ge=50, le=60_000)
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


def field_label(loc: tuple[Any, ...]) -> str:
    """`membership.sessionTimeoutMs (AFC_MEMBERSHIP__SESSION_TIMEOUT_MS)` for an error location."""
    parts = [str(p) for p in loc if not isinstance(p, int)]
    if not parts:
        return "settings"
    camel = ".".join(to_camel(p) for p in parts)
    env = "AFC_" + "__".join(p.upper() for p in parts)
    return f"{camel} ({env})"


def load_settings(**overrides: Any) -> RuntimeSettings:
    """Build and validate settings; pydantic's errors become one ConfigError naming fields."""
    from pydantic import ValidationError
    try:
        return RuntimeSettings(**snake_keys(overrides))
    except ValidationError as e:
        lines = [f"{field_label(err['loc'])}: {err['msg']}" for err in e.errors()]
        raise ConfigError("invalid configuration: " + "; ".join(lines)) from e


class ProducerSettings(BaseSettings):
    """The adaptive producer library's settings (`producer.AdaptiveProducer`), separate from
    the consumer's. Environment: `AFC_PRODUCER__<FIELD>`; camelCase keys in JSON."""
    model_config = SettingsConfigDict(env_prefix="AFC_PRODUCER__", env_nested_delimiter="__", extra="forbid",
                                      alias_generator=to_camel, populate_by_name=True, validate_default=True)

    bootstrap_servers: str = Field("localhost:9092", min_length=1)
    groups: list[str] = Field(default_factory=list,
                              description="Consumer groups whose signal to honour (the most saturated governs).")
    redis_url: OptionalSecret = Field(None, description="Redis holding the signal; none: no signal, max rate.")
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
