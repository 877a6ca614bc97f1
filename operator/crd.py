"""The AdaptiveConsumer API: pydantic models and the CRD generated from them.

The spec embeds the runtime's configuration sections (`afc.runtime.config`), so a field's
name, bounds, default and description are written once. What the runtime takes from a
Secret (the SASL password, the Redis URL) is not part of the schema: the spec names a
Secret key instead, and the pod gets it as an environment variable.

Rules the OpenAPI schema cannot say (`min <= max`, exactly one handler target, ...) are
written once as `Rule`s (afc.runtime.config.Rule): each becomes a CEL rule
(`x-kubernetes-validations`, checked by the apiserver at apply time, with a message naming
the field) and a pydantic validator (checked by the operator when it reads a spec). The
runtime's own rules (`rules` of its sections and of RuntimeSettings) are carried as they
are; the operator adds `crd_rules` for what only the API has (Secret references, pod
overrides). tests/unit/test_config_rules.py holds every runtime rule to a CEL twin.

    python -m afc.operator.crd > crds/afc.dev_adaptiveconsumers.yaml
"""
from __future__ import annotations

import copy
import re
import sys
from decimal import Decimal
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError, WithJsonSchema,
                      model_validator)
from pydantic.alias_generators import to_camel, to_snake

from afc.runtime.config import (
    TOPIC_NAME,
    BackpressureSettings,
    FlowSettings,
    HandlerSettings,
    IdempotencySettings,
    KafkaSettings,
    MembershipSettings,
    OffsetSettings,
    RoutingSettings,
    Rule,
    RuntimeSettings,
    ServerSettings,
    ShutdownSettings,
    cel_list,
    check_rules,
    rule_error,
)

GROUP = "afc.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "AdaptiveConsumer"
PLURAL = "adaptiveconsumers"
SINGULAR = "adaptiveconsumer"
SHORT_NAMES = ["ac"]
CRD_NAME = f"{PLURAL}.{GROUP}"
CRD_FILE = f"{GROUP}_{PLURAL}.yaml"

# Pod names are `<name>-<ordinal>` and the StatefulSet's revision label is `<name>-<hash>`:
# both must stay DNS labels, hence the usual 52-character bound for StatefulSet names.
MAX_NAME_LENGTH = 52
DNS_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
SECRET_KEY = r"^[-._a-zA-Z0-9]+$"
ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
# A resource quantity, as Kubernetes parses it but without a sign: a negative request or
# limit passes a generic quantity check and the StatefulSet (which does not validate its pod
# template), and fails only when the StatefulSet controller creates the pods.
QUANTITY = r"^\+?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
# A label, annotation, node-selector or resource key: an optional DNS-subdomain prefix of at
# most 253 characters (the second pattern) and a name of at most 63.
QUALIFIED_NAME = (r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                  r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
QUALIFIED_PREFIX_BOUND = r"^([^/]{1,253}/)?[^/]+$"
MAX_QUALIFIED_NAME = 317
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"
IMAGE = r"^\S+$"
COMPARED_RESOURCES = ("cpu", "memory", "ephemeral-storage")
# What an env var's fieldRef and resourceFieldRef may name (pod validation's lists).
ENV_FIELD_PATH = (r"^(metadata\.(name|namespace|uid)|metadata\.(labels|annotations)\['[^']+'\]"
                  r"|spec\.(nodeName|serviceAccountName)|status\.(hostIP|hostIPs|podIP|podIPs))$")
ENV_RESOURCE = r"^(limits|requests)\.(cpu|memory|ephemeral-storage|hugepages-[0-9A-Za-z]+)$"

# Environment variables the operator sets itself; podTemplate.env may not override them.
RESERVED_ENV_PREFIX = "AFC_"
RESERVED_ENV = ("POD_NAME", "POD_NAMESPACE")


def immutable(field: str, why: str) -> dict[str, Any]:
    """A CEL transition rule: the apiserver refuses an update that changes the field. The
    operator cannot check transitions itself (it sees one spec at a time), so it is CEL only."""
    return {"x-kubernetes-validations": [{"rule": "self == oldSelf", "message": f"{field} is immutable: {why}",
                                          "reason": "FieldValueForbidden"}]}


def _crd_schema_extra(schema: dict[str, Any], cls: type[BaseModel]) -> None:
    """pydantic hook: drop the properties the CRD must not have, add the class's CEL rules
    (the runtime section's own, then the API's)."""
    for name in getattr(cls, "crd_drop", ()):
        schema.get("properties", {}).pop(name, None)
        if name in schema.get("required", []):
            schema["required"].remove(name)
    rules = (*_runtime_rules(cls), *getattr(cls, "crd_rules", ()))
    if rules:
        schema["x-kubernetes-validations"] = [r.schema() for r in rules]


def _runtime_rules(cls: type[BaseModel]) -> tuple[Rule, ...]:
    """The rules of the runtime section a spec class extends (a `rules` ClassVar)."""
    rules = getattr(cls, "rules", ())
    return tuple(rules) if isinstance(rules, tuple) else ()


class Checked(BaseModel):
    """Mixin: the class's `crd_rules` become a pydantic validator and CEL rules."""
    model_config = ConfigDict(json_schema_extra=_crd_schema_extra)
    crd_rules: ClassVar[tuple[Rule, ...]] = ()
    crd_drop: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _crd_dropped(cls, data: Any) -> Any:
        if isinstance(data, dict):
            failed = [(k, "not part of the AdaptiveConsumer API (set by the operator, or taken from a "
                          "Secret reference)") for k in cls.crd_drop if k in data]
            if failed:
                raise rule_error(failed)
        return data

    @model_validator(mode="after")
    def _crd_rules(self) -> Any:
        check_rules(self, type(self).crd_rules)
        return self


class CrdModel(Checked):
    """Operator-only parts of the API: camelCase, unknown keys are errors."""
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid",
                              json_schema_extra=_crd_schema_extra)


def section(cls: type[BaseModel], description: str) -> Any:
    """A nested section that may be left out: the apiserver stores it with every field's
    own default (see `structural`)."""
    return Field(default_factory=cls, description=description, json_schema_extra={"default": {}})


TopicName = Annotated[str, StringConstraints(pattern=TOPIC_NAME, max_length=249)]


def _non_negative_quantity(v: int | str) -> int | str:
    if (isinstance(v, int) and v < 0) or (isinstance(v, str) and not re.match(QUANTITY, v)):
        raise ValueError(f"{v!r} is not a non-negative quantity (100m, 0.5, 128Mi, 1G, ...)")
    return v


Quantity = Annotated[int | str, AfterValidator(_non_negative_quantity),
                     Field(json_schema_extra={"pattern": QUANTITY, "minimum": 0, "maxLength": 64})]
LabelValue = Annotated[str, StringConstraints(pattern=LABEL_VALUE, max_length=63)]


def qualified_keys(field: str, what: str, name: str | None = None) -> Rule:
    """Every key of the map `field` is a qualified name (`prefix/name`), as Kubernetes requires
    of label, annotation, node-selector and resource keys."""
    return Rule(name or f"pod-{field}-keys",
                f"!has(self.{field}) || self.{field}.all(k, size(k) <= {MAX_QUALIFIED_NAME}"
                f" && k.matches(r'{QUALIFIED_NAME}') && k.matches(r'{QUALIFIED_PREFIX_BOUND}'))",
                lambda o: all(len(k) <= MAX_QUALIFIED_NAME and re.match(QUALIFIED_NAME, k)
                              and re.match(QUALIFIED_PREFIX_BOUND, k) for k in getattr(o, to_snake(field))),
                f"{what} keys must be qualified names: an optional DNS subdomain prefix and '/', then at most 63 "
                "letters, digits, '-', '_' or '.', beginning and ending with a letter or digit", f".{field}")


def _quantity(v: Any) -> Decimal:
    from kubernetes.utils.quantity import parse_quantity
    return parse_quantity(v)


def _requests_within_limits(r: "ResourceRequirements") -> bool:
    try:
        return all(_quantity(r.requests[k]) <= _quantity(r.limits[k]) for k in COMPARED_RESOURCES
                   if k in r.requests and k in r.limits)
    except (ValueError, TypeError, ArithmeticError):
        return False


# --------------------------------------------------------------------------- references

class SecretKeyRef(CrdModel):
    """A key of a Secret in the AdaptiveConsumer's namespace."""
    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN, description="Secret name.")
    key: str = Field(min_length=1, max_length=253, pattern=SECRET_KEY, description="Key within the Secret.")


class LocalObjectReference(CrdModel):
    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)


# --------------------------------------------------------------------------- runtime sections

def _is_sasl(k: Any) -> bool:
    return k.security_protocol in ("SASL_PLAINTEXT", "SASL_SSL")


class KafkaSpec(Checked, KafkaSettings):
    """The runtime's `kafka` section; the SASL password and the CA come from Secrets."""
    model_config = ConfigDict(json_schema_extra=_crd_schema_extra)
    crd_drop = ("saslPassword", "sslCaLocation")
    crd_rules = (
        Rule("kafka-sasl-mechanism",
             "!(self.securityProtocol in ['SASL_PLAINTEXT', 'SASL_SSL']) || has(self.saslMechanism)",
             lambda k: not _is_sasl(k) or k.sasl_mechanism is not None,
             "saslMechanism is required when securityProtocol is SASL_PLAINTEXT or SASL_SSL",
             ".saslMechanism"),
        Rule("kafka-sasl-username",
             "!(self.securityProtocol in ['SASL_PLAINTEXT', 'SASL_SSL']) || has(self.saslUsername)",
             lambda k: not _is_sasl(k) or bool(k.sasl_username),
             "saslUsername is required when securityProtocol is SASL_PLAINTEXT or SASL_SSL",
             ".saslUsername"),
        Rule("kafka-sasl-password-ref",
             "!(self.securityProtocol in ['SASL_PLAINTEXT', 'SASL_SSL']) || has(self.saslPasswordSecretRef)",
             lambda k: not _is_sasl(k) or k.sasl_password_secret_ref is not None,
             "saslPasswordSecretRef is required when securityProtocol is SASL_PLAINTEXT or SASL_SSL",
             ".saslPasswordSecretRef"),
        Rule("kafka-tls-ca-needs-ssl", "!has(self.tlsCaSecretRef) || self.securityProtocol in ['SSL', 'SASL_SSL']",
             lambda k: k.tls_ca_secret_ref is None or k.security_protocol in ("SSL", "SASL_SSL"),
             "tlsCaSecretRef needs securityProtocol SSL or SASL_SSL", ".tlsCaSecretRef"),
    )

    bootstrap_servers: str = Field(min_length=1, max_length=2048,
                                   description="Comma-separated host:port list of the brokers.")
    topics: list[TopicName] = Field(min_length=1, max_length=64,
                                    json_schema_extra={"x-kubernetes-list-type": "set"},
                                    description="Topics to consume (at least one, unique).")
    group_id: str = Field(min_length=1, max_length=249, description="Consumer group id (immutable).",
                          json_schema_extra=immutable(
                              "kafka.groupId", "a rolling update would run the old and the new group side by side, "
                              "each consuming every partition; create a new AdaptiveConsumer for the new group"))
    extra: dict[str, str] = Field(default_factory=dict, max_length=64,
                                  description="Further librdkafka properties: only tuning of the connection, the "
                                              "fetch and diagnostics (the allow-list in docs/operator.md); what afc "
                                              "sets itself and secrets are refused.")
    sasl_password_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret key holding the SASL password (env AFC_KAFKA__SASL_PASSWORD in the pod).")
    tls_ca_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret key holding the CA bundle (PEM) for SSL/SASL_SSL; mounted into the pod.")


class MembershipSpec(Checked, MembershipSettings):
    """The runtime's `membership` section; `<namespace>.<pod name>` is the group.instance.id."""
    model_config = ConfigDict(json_schema_extra=_crd_schema_extra)
    crd_drop = ("instanceId",)
    static: bool = Field(MembershipSettings.model_fields["static"].default,
                         description=f"{MembershipSettings.model_fields['static'].description} Immutable.",
                         json_schema_extra=immutable(
                             "membership.static", "a rolling update would mix static and dynamic members in one "
                             "group and rebalance on every restart; create a new AdaptiveConsumer instead"))


class FlowSpec(Checked, FlowSettings):
    """The runtime's `flow` section (bounds of the adaptive fetch loop)."""
    model_config = ConfigDict(json_schema_extra=_crd_schema_extra)


class IdempotencySpec(Checked, IdempotencySettings):
    """The runtime's `idempotency` section; the Redis URL comes from a Secret."""
    model_config = ConfigDict(json_schema_extra=_crd_schema_extra)
    crd_drop = ("redisUrl", "sqlitePath")
    redis_url_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret key holding the Redis URL (env AFC_IDEMPOTENCY__REDIS_URL in the pod). "
                          "Without it each pod deduplicates on its own only. A Redis Cluster: "
                          "redis+cluster://host:port[,host:port...] (docs/redis-cluster.md).")


class HandlerSpec(Checked, HandlerSettings):
    """The runtime's `handler` section: exactly one of a Python handler or an HTTP sink (the
    runtime refuses both; without either it refuses to run, which a spec says up front)."""
    model_config = ConfigDict(json_schema_extra=_crd_schema_extra)
    crd_rules = (
        Rule("handler-target", "has(self.handler) || has(self.httpSinkUrl)",
             lambda h: bool(h.handler) or bool(h.http_sink_url),
             "set exactly one of handler (pkg.module:func) or httpSinkUrl", ".handler"),
    )


class ServerSpec(Checked, ServerSettings):
    """The runtime's `server` section; in a pod it listens on all interfaces, on a real port."""
    model_config = ConfigDict(json_schema_extra=_crd_schema_extra)
    crd_drop = ("host",)
    port: int = Field(8080, ge=1, le=65_535, description="/healthz, /readyz and /metrics (probes use it).")


class BackpressureSpec(Checked, BackpressureSettings):
    """The runtime's `backpressure` section: the saturation signal producers watch. It uses
    the idempotency Redis (from its Secret) unless told otherwise; no URL is in the spec."""
    model_config = ConfigDict(json_schema_extra=_crd_schema_extra)
    crd_drop = ("redisUrl",)
    redis_url_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret key holding a separate Redis URL for the signal (env AFC_BACKPRESSURE__REDIS_URL "
                          "in the pod); without it the idempotency Redis is used. A Redis Cluster: "
                          "redis+cluster://host:port[,host:port...] (docs/redis-cluster.md).")


class RoutingSpec(Checked, RoutingSettings):
    """The runtime's `routing` section: where failures go (retry topic, dead-letter, poison)."""
    model_config = ConfigDict(json_schema_extra=_crd_schema_extra)


# --------------------------------------------------------------------------- operator-only sections

class ScalingSpec(CrdModel):
    """Who writes spec.replicas, and how the lag autoscaler decides (afc.operator.scaling)."""
    mode: Literal["Off", "Lag", "DrainTime"] = Field(
        "Off", description="Off: spec.replicas is written by users, kubectl scale or an HPA/KEDA (the operator "
        "only keeps it within [minReplicas, maxReplicas]). Lag: the operator writes it, ceil(lag / "
        "lagThresholdPerReplica). DrainTime: the operator writes it, enough replicas to keep up with the producers "
        "and drain the lag within targetDrainTimeS at the measured rate per replica. Do not point an HPA at an "
        "AdaptiveConsumer whose mode is not Off: both would write spec.replicas.")
    lag_threshold_per_replica: int = Field(1_000, ge=1, description="Lag one replica is expected to carry "
                                           "(Lag mode; DrainTime before a rate is measured).")
    target_drain_time_s: int = Field(300, ge=1, le=86_400, description="Time in which the lag should be drained "
                                     "(DrainTime mode).")
    scale_up_stabilization_s: int = Field(0, ge=0, le=3_600, description="Scale up to the lowest recommendation "
                                          "of this window (0: at once).")
    scale_down_stabilization_s: int = Field(300, ge=0, le=3_600, description="Scale down to the highest "
                                            "recommendation of this window, once that much has been observed.")
    poll_interval_s: int = Field(30, ge=1, le=3_600,
                                 description="How often lag is measured, a decision taken and the status refreshed.")
    max_scale_up_step: int = Field(10, ge=1, le=1_000, description="Most replicas added by one decision.")
    max_scale_down_step: int = Field(10, ge=1, le=1_000, description="Most replicas removed by one decision.")
    activation_lag: int = Field(0, ge=0, description="With minReplicas 0: lag above this wakes a group at zero "
                                "replicas.")
    stall_after_s: int = Field(120, ge=1, le=86_400, description="A partition whose committed offset stays frozen "
                               "this long while it has lag is stalled: more replicas would not help, its lag does "
                               "not scale up (the Stalled condition names it).")
    rate_window_s: int = Field(60, ge=1, le=3_600, description="Window over which produce and consume rates are "
                               "measured.")
    limit_to_partitions_with_lag: bool = Field(False, description="Cap replicas at the partitions that have lag "
                                               "(else at all partitions).")
    backpressure_blocks_at: float = Field(0.5, gt=0, le=1, description="Group backpressure level (share of "
                                          "saturated members) at or above which the operator never scales up.")
    leave_group_on_scale_down: bool = Field(True, description="When replicas are removed, remove the departed pods' "
                                            "group.instance.ids from the group once the pods are gone, so their "
                                            "partitions move at once instead of after the session timeout.")


class ResourceRequirements(CrdModel):
    crd_rules = (
        qualified_keys("requests", "resources.requests"),
        qualified_keys("limits", "resources.limits"),
        # Over the usual resources only: over every key, the apiserver's cost estimate for
        # quantity() refuses the CRD; extended resources need requests == limits anyway, and
        # what slips through is reported as InvalidSpec when the StatefulSet is refused.
        Rule("pod-requests-within-limits",
             "!has(self.requests) || !has(self.limits) || " + cel_list(COMPARED_RESOURCES) + ".all(k, "
             "!(k in self.requests && k in self.limits)"
             " || quantity(string(self.requests[k])).compareTo(quantity(string(self.limits[k]))) <= 0)",
             _requests_within_limits, "requests of " + ", ".join(COMPARED_RESOURCES) + " must be <= their limits",
             ".requests"),
    )
    requests: dict[str, Quantity] = Field(default_factory=dict, max_length=16)
    limits: dict[str, Quantity] = Field(default_factory=dict, max_length=16)


class KeySelector(CrdModel):
    """A key of a Secret or ConfigMap in the AdaptiveConsumer's namespace."""
    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)
    key: str = Field(min_length=1, max_length=253, pattern=SECRET_KEY)
    optional: bool | None = None


class ObjectFieldSelector(CrdModel):
    field_path: str = Field(min_length=1, max_length=512, pattern=ENV_FIELD_PATH,
                            description="What the downward API offers an env var: metadata.name, metadata.namespace, "
                            "metadata.uid, metadata.labels['k'], metadata.annotations['k'], spec.nodeName, "
                            "spec.serviceAccountName, status.hostIP(s), status.podIP(s).")
    api_version: Literal["v1"] | None = None


class ResourceFieldSelector(CrdModel):
    resource: str = Field(min_length=1, max_length=64, pattern=ENV_RESOURCE,
                          description="limits.cpu, requests.memory, limits.ephemeral-storage, ...")
    container_name: str | None = Field(None, max_length=63)
    divisor: Quantity | None = None


class EnvVarSource(CrdModel):
    """Exactly one source, as in a container's env."""
    crd_rules = (
        Rule("pod-env-one-source",
             "[has(self.secretKeyRef), has(self.configMapKeyRef), has(self.fieldRef), has(self.resourceFieldRef)]"
             ".filter(x, x).size() == 1",
             lambda s: sum(x is not None for x in (s.secret_key_ref, s.config_map_key_ref, s.field_ref,
                                                   s.resource_field_ref)) == 1,
             "set exactly one of secretKeyRef, configMapKeyRef, fieldRef or resourceFieldRef", ".secretKeyRef"),
    )
    secret_key_ref: KeySelector | None = None
    config_map_key_ref: KeySelector | None = None
    field_ref: ObjectFieldSelector | None = None
    resource_field_ref: ResourceFieldSelector | None = None


class EnvVar(CrdModel):
    crd_rules = (
        Rule("pod-env-value-or-source", "!(has(self.value) && has(self.valueFrom))",
             lambda e: e.value is None or e.value_from is None,
             "set value or valueFrom, not both", ".valueFrom"),
    )
    name: str = Field(min_length=1, max_length=256, pattern=ENV_NAME)
    value: str | None = Field(None, max_length=32_768)
    value_from: EnvVarSource | None = Field(None, description="As in a container's env (secretKeyRef, ...).")


class Toleration(CrdModel):
    """As in a pod spec; what the apiserver would refuse in the StatefulSet is refused here."""
    crd_rules = (
        Rule("pod-toleration-exists-no-value",
             "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
             lambda t: t.operator != "Exists" or not t.value, "value must be empty when operator is Exists",
             ".value"),
        Rule("pod-toleration-key", "(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
             lambda t: bool(t.key) or t.operator == "Exists", "key is required unless operator is Exists", ".key"),
        Rule("pod-toleration-seconds-no-execute",
             "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
             lambda t: t.toleration_seconds is None or t.effect == "NoExecute",
             "tolerationSeconds needs effect NoExecute", ".tolerationSeconds"),
    )
    key: str | None = Field(None, max_length=MAX_QUALIFIED_NAME, pattern="^$|" + QUALIFIED_NAME,
                            description="Empty (or unset) with operator Exists: every taint.")
    operator: Literal["Exists", "Equal"] | None = None
    value: LabelValue | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


def _env_not_reserved(p: "PodTemplateOverrides") -> bool:
    return all(e.name not in RESERVED_ENV and not e.name.startswith(RESERVED_ENV_PREFIX) for e in p.env)


class CanarySpec(CrdModel):
    """A staged rollout: the new revision first runs on `replicas` pods (or `percent` of them),
    the highest ordinals; after `holdSeconds` of health data the operator compares the canary
    members' handler error rate and dead-letter rate with the gates (and with the stable
    members) and promotes (every pod rolls) or rolls back (the canary pods return to the
    previous revision; the stable members are not restarted)."""
    crd_rules = (
        Rule("canary-replicas-or-percent", "!(has(self.replicas) && has(self.percent))",
             lambda c: c.replicas is None or c.percent is None,
             "set at most one of replicas or percent", ".replicas"),
        Rule("canary-hold-bounds", "self.maxHoldSeconds >= self.holdSeconds",
             lambda c: c.max_hold_seconds >= c.hold_seconds,
             "maxHoldSeconds must be >= holdSeconds", ".maxHoldSeconds"),
    )
    replicas: int | None = Field(None, ge=1, le=1_000, description="Pods that run the new revision first (the "
                                 "highest ordinals). Default 1 when neither replicas nor percent is set.")
    percent: int | None = Field(None, ge=1, le=100, description="Share of the pods that run the new revision "
                                "first, rounded up, at least 1.")
    hold_seconds: int = Field(60, ge=5, le=86_400, description="How long the canary runs, once its pods are "
                              "ready, before the gates decide.")
    max_hold_seconds: int = Field(600, ge=5, le=86_400, description="Fail-safe: if by then (counted from the "
                                  "canary pods being ready) the canary has not handled minRuns records, "
                                  "it is rolled back (not enough evidence to promote).")
    min_runs: int = Field(20, ge=1, le=10_000_000, description="Handler runs the canary members need in the hold "
                          "window before the gates judge them.")
    max_error_rate: float = Field(0.05, ge=0, le=1, description="Highest share of failed handler runs in the "
                                  "canary members (failed / all runs over the hold window).")
    max_error_rate_ratio: float | None = Field(None, ge=1, le=1_000, description="If set, the canary also fails "
                                               "when its error rate exceeds this multiple of the stable members' "
                                               "(the stable rate counted at least 1%, so one error against a "
                                               "clean baseline does not fail it).")
    max_dlq_rate: float = Field(0.01, ge=0, le=1, description="Highest share of the canary's records routed to "
                                ".dlq or .poison (per handler run).")
    max_lag_ratio: float | None = Field(None, ge=1, le=1_000, description="If set, the canary fails when its "
                                        "members' mean lag per partition over the hold exceeds this multiple of the "
                                        "stable members' (counted at least 100 records per partition).")


class RolloutSpec(CrdModel):
    """How a new revision (a changed pod template or config) rolls through the pods: a
    StatefulSet rolling update, highest ordinal first, one pod at a time; with `canary`, a few
    pods first, judged on their health, then promoted or rolled back."""
    partition: int | None = Field(None, ge=0, le=1_000, description="Only pods with an ordinal >= partition get a "
                                  "new revision; the others keep the previous one (a staged rollout: lower it to go "
                                  "on). Unset: every pod.")
    progress_deadline_seconds: int = Field(600, ge=10, le=86_400, description="How long a restarted pod may take to "
                                           "become ready. Beyond it, or as soon as a pod of the new revision fails "
                                           "(CrashLoopBackOff, image pull errors, ...), the operator holds the "
                                           "rollout at that pod (rollingUpdate.partition) and reports Degraded and "
                                           "Progressing=False (ProgressDeadlineExceeded, as a Deployment's).")
    min_ready_seconds: int = Field(0, ge=0, le=3_600, description="The StatefulSet's minReadySeconds: a "
                                   "restarted pod must stay ready this long before the next one is replaced. 0: "
                                   "at once (with static members each stall is its own restart, docs/rollouts.md); "
                                   "5 catches a pod that fails right after it turns ready.")
    canary: CanarySpec | None = Field(None, description="A staged rollout with health gates (see CanarySpec). "
                                      "Unset: every pod rolls at once, one after another.")


# --------------------------------------------------------------------------- affinity, typed
# A pod template's affinity as core/v1 has it, with the rules pod validation applies: the
# StatefulSet does not validate its pod template, so an invalid affinity used to pass the CRD
# and the StatefulSet, and fail only when the StatefulSet controller created the pods.

QualifiedName = Annotated[str, StringConstraints(min_length=1, max_length=MAX_QUALIFIED_NAME, pattern=QUALIFIED_NAME)]
AFFINITY_ITEMS = 8


def _values_rule(name: str, operators: str) -> Rule:
    """values: some for In/NotIn, none for Exists/DoesNotExist, one integer for Gt/Lt."""
    return Rule(name,
                "self.operator in ['In', 'NotIn'] ? (has(self.values) && size(self.values) > 0)"
                " : self.operator in ['Exists', 'DoesNotExist'] ? (!has(self.values) || size(self.values) == 0)"
                " : (has(self.values) && size(self.values) == 1 && self.values[0].matches('^-?[0-9]+$'))",
                lambda r: (bool(r.values) if r.operator in ("In", "NotIn") else not r.values
                           if r.operator in ("Exists", "DoesNotExist")
                           else len(r.values) == 1 and re.match(r"^-?[0-9]+$", r.values[0]) is not None),
                f"values: at least one for In and NotIn, none for Exists and DoesNotExist{operators}", ".values")


class NodeSelectorRequirement(CrdModel):
    crd_rules = (_values_rule("affinity-node-values", ", exactly one integer for Gt and Lt"),)
    key: QualifiedName
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]
    values: list[Annotated[str, StringConstraints(max_length=253)]] = Field(default_factory=list,
                                                                            max_length=AFFINITY_ITEMS)


class NodeSelectorTerm(CrdModel):
    crd_rules = (
        Rule("affinity-node-fields",
             "!has(self.matchFields) || self.matchFields.all(f, f.key == 'metadata.name'"
             " && f.operator in ['In', 'NotIn'] && has(f.values) && size(f.values) == 1)",
             lambda t: all(f.key == "metadata.name" and f.operator in ("In", "NotIn") and len(f.values) == 1
                           for f in t.match_fields),
             "matchFields: only metadata.name, with In or NotIn and exactly one value", ".matchFields"),
    )
    match_expressions: list[NodeSelectorRequirement] = Field(default_factory=list, max_length=AFFINITY_ITEMS)
    match_fields: list[NodeSelectorRequirement] = Field(default_factory=list, max_length=AFFINITY_ITEMS)


class NodeSelector(CrdModel):
    node_selector_terms: list[NodeSelectorTerm] = Field(min_length=1, max_length=AFFINITY_ITEMS)


class PreferredSchedulingTerm(CrdModel):
    weight: int = Field(ge=1, le=100)
    preference: NodeSelectorTerm


class NodeAffinity(CrdModel):
    required_during_scheduling_ignored_during_execution: NodeSelector | None = None
    preferred_during_scheduling_ignored_during_execution: list[PreferredSchedulingTerm] = Field(
        default_factory=list, max_length=AFFINITY_ITEMS)


class LabelSelectorRequirement(CrdModel):
    crd_rules = (_values_rule("affinity-label-values", ""),)
    key: QualifiedName
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[LabelValue] = Field(default_factory=list, max_length=AFFINITY_ITEMS)


class LabelSelector(CrdModel):
    crd_rules = (qualified_keys("matchLabels", "matchLabels", "affinity-match-labels-keys"),)
    match_labels: dict[str, LabelValue] = Field(default_factory=dict, max_length=AFFINITY_ITEMS)
    match_expressions: list[LabelSelectorRequirement] = Field(default_factory=list, max_length=AFFINITY_ITEMS)


class PodAffinityTerm(CrdModel):
    label_selector: LabelSelector | None = None
    namespace_selector: LabelSelector | None = None
    namespaces: list[Annotated[str, StringConstraints(max_length=63, pattern=DNS_LABEL)]] = Field(
        default_factory=list, max_length=AFFINITY_ITEMS)
    topology_key: QualifiedName
    match_label_keys: list[QualifiedName] = Field(default_factory=list, max_length=AFFINITY_ITEMS)
    mismatch_label_keys: list[QualifiedName] = Field(default_factory=list, max_length=AFFINITY_ITEMS)


class WeightedPodAffinityTerm(CrdModel):
    weight: int = Field(ge=1, le=100)
    pod_affinity_term: PodAffinityTerm


class PodAffinity(CrdModel):
    required_during_scheduling_ignored_during_execution: list[PodAffinityTerm] = Field(
        default_factory=list, max_length=AFFINITY_ITEMS)
    preferred_during_scheduling_ignored_during_execution: list[WeightedPodAffinityTerm] = Field(
        default_factory=list, max_length=AFFINITY_ITEMS)


class Affinity(CrdModel):
    """As in a pod spec (core/v1 Affinity)."""
    node_affinity: NodeAffinity | None = None
    pod_affinity: PodAffinity | None = None
    pod_anti_affinity: PodAffinity | None = None


def _affinity(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """Checked against `Affinity`, kept as given (the pod spec takes it as it is)."""
    if value is not None:
        try:
            Affinity.model_validate(value)
        except ValidationError as e:
            raise ValueError("; ".join(".".join(str(p) for p in err["loc"]) + ": "
                                       + str(err["msg"]).removeprefix("Value error, ") for err in e.errors())) from e
    return value


def _inlined(schema: Any, defs: dict[str, Any]) -> Any:
    """References replaced by their definitions (a schema handed to pydantic whole may not
    refer to definitions of its own)."""
    if isinstance(schema, dict):
        if "$ref" in schema:
            return _inlined({**defs[schema["$ref"].split("/")[-1]],
                             **{k: v for k, v in schema.items() if k != "$ref"}}, defs)
        return {k: _inlined(v, defs) for k, v in schema.items() if k != "$defs"}
    if isinstance(schema, list):
        return [_inlined(v, defs) for v in schema]
    return schema


_affinity_json = Affinity.model_json_schema(by_alias=True, mode="validation")
AFFINITY_SCHEMA = {**_inlined(_affinity_json, _affinity_json.get("$defs", {})),
                   "description": "As in a pod spec (nodeAffinity, podAffinity, podAntiAffinity)."}


class PodTemplateOverrides(CrdModel):
    """What may be changed in the consumer pods; everything else is the operator's."""
    crd_rules = (
        Rule("pod-env-reserved", "!has(self.env) || self.env.all(e, !(e.name in ['POD_NAME', 'POD_NAMESPACE'])"
             " && !e.name.startsWith('AFC_'))",
             _env_not_reserved,
             "env must not set POD_NAME, POD_NAMESPACE or AFC_* (the operator sets them from the spec)",
             ".env"),
        qualified_keys("labels", "labels"),
        qualified_keys("annotations", "annotations"),
        qualified_keys("nodeSelector", "nodeSelector"),
    )
    labels: dict[str, LabelValue] = Field(default_factory=dict, max_length=64)
    annotations: dict[str, Annotated[str, StringConstraints(max_length=65_536)]] = Field(
        default_factory=dict, max_length=64)
    resources: ResourceRequirements | None = Field(None, description="Container resources; default "
                                                   "requests cpu 100m, memory 128Mi; limits memory 512Mi.")
    env: list[EnvVar] = Field(default_factory=list, max_length=64,
                              json_schema_extra={"x-kubernetes-list-type": "map",
                                                 "x-kubernetes-list-map-keys": ["name"]})
    node_selector: dict[str, LabelValue] = Field(default_factory=dict, max_length=32)
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    affinity: Annotated[dict[str, Any] | None, AfterValidator(_affinity), WithJsonSchema(AFFINITY_SCHEMA)] = None
    service_account_name: str | None = Field(None, max_length=253, pattern=DNS_SUBDOMAIN)
    priority_class_name: str | None = Field(None, max_length=253, pattern=DNS_SUBDOMAIN)
    image_pull_secrets: list[LocalObjectReference] = Field(default_factory=list, max_length=16)


# --------------------------------------------------------------------------- the resource

class AdaptiveConsumerSpec(CrdModel):
    crd_rules = (
        Rule("replicas-bounds", "self.minReplicas <= self.maxReplicas", lambda s: s.min_replicas <= s.max_replicas,
             "minReplicas must be <= maxReplicas", ".minReplicas"),
        *RuntimeSettings.rules,  # across sections: the spec has the same paths
    )

    image: str = Field(min_length=1, max_length=512, pattern=IMAGE,
                       description="The runtime image (runs `afc-consumer run`).")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    replicas: int = Field(1, ge=0, le=1_000, description="Wanted replicas (the scale subresource); "
                          "the operator keeps it within [minReplicas, maxReplicas].")
    min_replicas: int = Field(1, ge=0, le=1_000)
    max_replicas: int = Field(10, ge=1, le=1_000)
    handler: HandlerSpec = Field(description="What each message is handed to.")
    kafka: KafkaSpec = Field(description="Brokers, topics, group and security.")
    membership: MembershipSpec = section(MembershipSpec, "Consumer-group membership (static by default).")
    flow: FlowSpec = section(FlowSpec, "Flow-control bounds of the adaptive fetch loop.")
    idempotency: IdempotencySpec = section(IdempotencySpec, "Deduplication by idempotency key.")
    offsets: OffsetSettings = section(OffsetSettings, "Offset commits.")
    routing: RoutingSpec = section(RoutingSpec, "Failure routing: retry topic, dead-letter, poison.")
    backpressure: BackpressureSpec = section(BackpressureSpec, "The saturation signal published for producers.")
    server: ServerSpec = section(ServerSpec, "Health and metrics endpoints.")
    shutdown: ShutdownSettings = section(ShutdownSettings, "Graceful drain on SIGTERM.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    scaling: ScalingSpec = section(ScalingSpec, "Lag-based scaling inputs.")
    rollout: RolloutSpec = section(RolloutSpec, "How a new revision rolls through the pods.")
    pod_template: PodTemplateOverrides = section(PodTemplateOverrides, "Overrides for the consumer pods.")


class Condition(CrdModel):
    type: str = Field(max_length=64)
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(max_length=128)
    message: str = Field("", max_length=32_768)
    last_transition_time: str = Field(json_schema_extra={"format": "date-time"})
    observed_generation: int | None = None


class LagSummary(CrdModel):
    total: int | None = Field(None, description="Sum of the group's lag over its partitions (retention-deleted "
                              "messages excluded).")
    partitions: int | None = Field(None, description="Partitions measured.")
    max_partition_lag: int | None = None
    seconds: float | None = Field(None, description="Age of the oldest unconsumed message, estimated from the "
                                  "offset/time history (kafka-lag-exporter's method).")
    measured_at: str | None = Field(None, json_schema_extra={"format": "date-time"})
    error: str | None = Field(None, description="Why the lag could not be measured.")


class BackpressureStatus(CrdModel):
    level: str | None = Field(None, description="Engaged, Clear or Unknown: the group's backpressure signal as the "
                              "consumers publish it in Redis.")
    share: float | None = Field(None, description="Share of live members that are saturated.")
    members: int | None = Field(None, description="Live members publishing a level.")
    error: str | None = Field(None, description="Why the signal could not be read.")


class ScalingInputs(CrdModel):
    partitions: int | None = None
    lag: int | None = None
    effective_lag: int | None = Field(None, description="Lag of the partitions that are not stalled.")
    lagging_partitions: int | None = None
    stalled_partitions: list[str] = Field(default_factory=list, description="topic/partition")
    produce_rate: float | None = Field(None, description="msg/s")
    consume_rate: float | None = Field(None, description="msg/s")
    per_replica_rate: float | None = Field(None, description="msg/s one member consumed while busy")
    members: int | None = Field(None, description="Members of the consumer group.")
    lag_seconds: float | None = None
    backpressure: float | None = None
    rolling: bool | None = None


class ScalingStatus(CrdModel):
    mode: str | None = None
    replicas_owner: str | None = Field(None, description="Who writes spec.replicas: afc-operator, or external "
                                       "(users, kubectl scale, an HPA) in mode Off.")
    desired_replicas: int | None = Field(None, description="What the last decision asked for.")
    recommendation: int | None = Field(None, description="The formula's answer before stabilization and holds.")
    reason: str | None = None
    message: str | None = Field(None, max_length=4_096)
    decided_at: str | None = Field(None, json_schema_extra={"format": "date-time"})
    last_scale_time: str | None = Field(None, json_schema_extra={"format": "date-time"})
    inputs: ScalingInputs | None = None


class RolloutHold(CrdModel):
    partition: int = Field(description="The StatefulSet's rollingUpdate.partition the operator set: pods below it "
                           "keep the previous revision.")
    template: str = Field(description="Hash of the pod template held; a spec that renders another template "
                          "(a fix, or the previous spec back) releases the hold.")
    revision: str | None = Field(None, description="The StatefulSet revision held.")
    pod: str | None = None
    reason: str | None = None
    message: str | None = Field(None, max_length=4_096)
    since: str | None = Field(None, json_schema_extra={"format": "date-time"})


class CanaryGates(CrdModel):
    runs: int | None = Field(None, description="Handler runs of the canary members in the hold window.")
    error_rate: float | None = None
    stable_error_rate: float | None = None
    dlq_rate: float | None = None
    stable_runs: int | None = None
    lag_per_partition: float | None = None
    stable_lag_per_partition: float | None = None


class CanaryStatus(CrdModel):
    phase: str = Field(description="Canary (the canary pods roll, then hold while the gates collect data), "
                       "Promoting (every pod rolls), Promoted, RollingBack (the canary pods return to the stable "
                       "revision), RolledBack.")
    template: str = Field(description="Hash of the pod template under test; a spec that renders another "
                          "template starts over.")
    revision: str | None = Field(None, description="The StatefulSet revision under test.")
    stable_revision: str | None = Field(None, description="The revision the stable members run (a rollback "
                                        "restores its pod template).")
    pods: list[str] = Field(default_factory=list, description="The canary pods.")
    started_at: str | None = Field(None, json_schema_extra={"format": "date-time"})
    reason: str | None = Field(None, description="Why it was promoted or rolled back: GatesPassed, ErrorRate, "
                               "ErrorRateRatio, DlqRate, LagRatio, InsufficientData, or a canary pod's failure.")
    ready_at: str | None = Field(None, json_schema_extra={"format": "date-time"},
                                 description="When every canary pod was ready: the hold counts from here.")
    decided_at: str | None = Field(None, json_schema_extra={"format": "date-time"})
    gates: CanaryGates | None = None
    message: str | None = Field(None, max_length=4_096)


class RolloutStatus(CrdModel):
    current_revision: str | None = Field(None, description="The StatefulSet revision the pods ran before the rollout.")
    update_revision: str | None = Field(None, description="The revision being rolled out.")
    partition: int | None = Field(None, description="The StatefulSet's rollingUpdate.partition.")
    pod: str | None = Field(None, description="The pod being rolled (restarted, or waited for).")
    template: str | None = Field(None, description="Hash of the pod template the spec rendered at the last "
                                 "apply (a different one starts a canary).")
    held: RolloutHold | None = Field(None, description="Set when the operator stopped a failing rollout.")
    canary: CanaryStatus | None = Field(None, description="The staged rollout (spec.rollout.canary).")


class AdaptiveConsumerStatus(CrdModel):
    observed_generation: int | None = None
    replicas: int | None = Field(None, description="Pods of the StatefulSet (the scale subresource).")
    ready_replicas: int | None = None
    updated_replicas: int | None = None
    desired_replicas: int | None = Field(None, description="spec.replicas kept within [min, max].")
    selector: str | None = Field(None, description="Label selector of the pods (for the HPA).")
    conditions: list[Condition] = Field(default_factory=list, json_schema_extra={
        "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]})
    lag: LagSummary | None = None
    backpressure: BackpressureStatus | None = None
    scaling: ScalingStatus | None = None
    rollout: RolloutStatus | None = None


# --------------------------------------------------------------------------- structural schema

_DROP_KEYS = {"title", "examples", "writeOnly", "readOnly", "$defs"}
_FORMATS = {"date-time", "date", "int32", "int64", "float", "double", "byte", "uri", "email", "hostname",
            "ipv4", "ipv6", "uuid", "duration", "password"}


def structural(schema: dict[str, Any], defs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Turn pydantic's JSON schema into a Kubernetes structural schema: references inlined,
    `X | None` as an optional X (nulls are pruned), `int | str` as int-or-string, JSON-schema
    2020 exclusive bounds as OpenAPI 3.0 ones, no `additionalProperties: false`."""
    defs = schema.get("$defs", {}) if defs is None else defs
    s = dict(schema)
    if "$ref" in s:
        target = copy.deepcopy(defs[s.pop("$ref").split("/")[-1]])
        target.update(s)  # description, default and extensions given beside the reference
        return structural(target, defs)
    if "allOf" in s and len(s["allOf"]) == 1:
        inner = s.pop("allOf")[0]
        return structural({**inner, **s}, defs)
    if "anyOf" in s:
        options = [o for o in s.pop("anyOf") if o.get("type") != "null"]
        if s.get("default", "absent") is None:
            s.pop("default")
        types = sorted(o.get("type", "") for o in options)
        if len(options) == 1:
            return structural({**options[0], **s}, defs)
        if types == ["integer", "string"]:
            s["x-kubernetes-int-or-string"] = True
            return structural(s, defs)
        raise ValueError(f"no structural form for anyOf {options}")
    out: dict[str, Any] = {}
    for key, value in s.items():
        if key in _DROP_KEYS:
            continue
        if key == "additionalProperties":
            if value is False:
                continue
            if value is True:
                out["x-kubernetes-preserve-unknown-fields"] = True
                continue
            out[key] = structural(value, defs)
        elif key == "properties":
            out[key] = {k: structural(v, defs) for k, v in value.items()}
        elif key == "items":
            out[key] = structural(value, defs)
        elif key == "exclusiveMinimum" and not isinstance(value, bool):
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum" and not isinstance(value, bool):
            out["maximum"], out["exclusiveMaximum"] = value, True
        elif key == "const":
            out["enum"] = [value]
        elif key == "format":
            if value in _FORMATS and value != "password":
                out[key] = value
        elif key == "default":
            if value is None or value == [] or (value == {} and "properties" not in s):
                continue  # an absent optional field, not a value to store
            out[key] = value
        else:
            out[key] = value
    if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True
    if out.get("default") == {} and "properties" in out:
        # The apiserver checks a default against the CEL rules without defaulting inside it
        # first, so a section's default spells out its fields' defaults.
        out["default"] = {k: v["default"] for k, v in out["properties"].items() if "default" in v}
    return out


def _order(schema: dict[str, Any]) -> dict[str, Any]:
    """A stable, readable key order (type and description first)."""
    first = ["type", "description", "required"]
    out = {k: schema[k] for k in first if k in schema}
    out.update({k: schema[k] for k in sorted(schema) if k not in first})
    for k in ("properties",):
        if k in out:
            out[k] = {name: _order(v) for name, v in out[k].items()}
    for k in ("items", "additionalProperties"):
        if isinstance(out.get(k), dict):
            out[k] = _order(out[k])
    return out


def spec_schema() -> dict[str, Any]:
    return _order(structural(AdaptiveConsumerSpec.model_json_schema(by_alias=True, mode="validation")))


def status_schema() -> dict[str, Any]:
    return _order(structural(AdaptiveConsumerStatus.model_json_schema(by_alias=True, mode="validation")))


def crd() -> dict[str, Any]:
    spec = _order({**spec_schema(), "description": "What to consume, how to handle it, and how the consumers run."})
    status = _order({**status_schema(), "description": "Observed state, written by the operator."})
    root = {
        "type": "object",
        "description": "Kafka consumers that keep themselves healthy, run as a StatefulSet "
                       "whose pod names are their static group.instance.id.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        "x-kubernetes-validations": [
            {"rule": f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
             "message": f"metadata.name must be at most {MAX_NAME_LENGTH} characters "
                        "(pod names and revision labels derive from it)",
             "reason": "FieldValueInvalid"},
            {"rule": f"self.metadata.name.matches('{DNS_LABEL}')",
             "message": "metadata.name must be a DNS label (lowercase letters, digits, '-'): "
                        "it names a Service and the pods",
             "reason": "FieldValueInvalid"},
        ],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME, "labels": {"app.kubernetes.io/part-of": "afc"}},
        "spec": {
            "group": GROUP,
            "names": {"kind": KIND, "listKind": f"{KIND}List", "plural": PLURAL, "singular": SINGULAR,
                      "shortNames": SHORT_NAMES, "categories": ["afc"]},
            "scope": "Namespaced",
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {
                    "status": {},
                    "scale": {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
                              "labelSelectorPath": ".status.selector"},
                },
                "additionalPrinterColumns": [
                    {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
                    {"name": "Replicas", "type": "integer", "jsonPath": ".status.replicas"},
                    {"name": "Desired", "type": "integer", "jsonPath": ".status.desiredReplicas"},
                    {"name": "Lag", "type": "integer", "jsonPath": ".status.lag.total"},
                    {"name": "Backpressure", "type": "string", "jsonPath": ".status.backpressure.level"},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                ],
                "schema": {"openAPIV3Schema": root},
            }],
        },
    }


def render_yaml() -> str:
    header = ("# Generated by `python -m afc.operator.crd` from afc.operator.crd and afc.runtime.config;\n"
              "# do not edit by hand (tests/unit/test_operator_crd.py fails when it drifts).\n")
    return header + yaml.safe_dump(crd(), sort_keys=False, width=100, allow_unicode=True)


def main() -> None:
    sys.stdout.write(render_yaml())


if __name__ == "__main__":
    main()
