"""Pure functions from an AdaptiveConsumer to the objects the operator applies.

No I/O here: `desired_objects(owner, spec)` is everything the cluster should hold for one
AdaptiveConsumer, so it can be unit-tested, diffed against the live objects and explained.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from pydantic import ValidationError

from afc.operator.crd import API_VERSION, KIND, AdaptiveConsumerSpec, SecretKeyRef
from afc.runtime.config import FREE_FORM_MAPS, RuntimeSettings

FIELD_MANAGER = "afc-operator"
MANAGED_BY = "afc-operator"
APP = "afc-consumer"
L_NAME = "app.kubernetes.io/name"
L_INSTANCE = "app.kubernetes.io/instance"
L_MANAGED_BY = "app.kubernetes.io/managed-by"
L_PART_OF = "app.kubernetes.io/part-of"
L_COMPONENT = "app.kubernetes.io/component"
A_CONFIG_HASH = "afc.dev/config-hash"
L_CONFIG_HASH = "afc.dev/config-hash"  # on the ConfigMaps: which content each holds

CONTAINER = "consumer"
CONFIG_KEY = "config.json"
CONFIG_DIR = "/etc/afc/config"
CA_DIR = "/etc/afc/kafka-ca"
CA_FILE = "ca.crt"
RUN_AS = 10001
GRACE_MARGIN_S = 10  # terminationGracePeriodSeconds = drain bound + this margin
DEFAULT_RESOURCES = {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}
ENV_SASL_PASSWORD = "AFC_KAFKA__SASL_PASSWORD"
ENV_REDIS_URL = "AFC_IDEMPOTENCY__REDIS_URL"
ENV_SIGNAL_REDIS_URL = "AFC_BACKPRESSURE__REDIS_URL"
ENV_INSTANCE_ID = "AFC_INSTANCE_ID"  # the runtime's group.instance.id (afc.runtime.config.MembershipSettings)


class InvalidSpec(ValueError):
    """A spec the operator cannot render (the CRD normally refuses it first)."""


@dataclass(frozen=True)
class Owner:
    """The AdaptiveConsumer the objects belong to."""
    name: str
    namespace: str
    uid: str
    generation: int = 0

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> "Owner":
        meta = body["metadata"]
        return cls(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"],
                   generation=int(meta.get("generation") or 0))

    def reference(self) -> dict[str, Any]:
        # No blockOwnerDeletion: it would need `update` on adaptiveconsumers/finalizers where the
        # OwnerReferencesPermissionEnforcement admission plugin runs; background GC needs neither.
        return {"apiVersion": API_VERSION, "kind": KIND, "name": self.name, "uid": self.uid,
                "controller": True}


def parse_spec(spec: Mapping[str, Any]) -> AdaptiveConsumerSpec:
    """The spec as the operator's model; errors name the field as kubectl would (spec.a.b)."""
    try:
        return AdaptiveConsumerSpec.model_validate(dict(spec))
    except ValidationError as e:
        raise InvalidSpec("; ".join(_describe(err) for err in e.errors())) from e


def _describe(err: Mapping[str, Any]) -> str:
    loc = [str(p) for p in err["loc"]]
    path = ".".join(["spec", *loc])
    for m in FREE_FORM_MAPS:                  # a map's key in brackets, as Kubernetes writes it
        if len(loc) > len(m) and tuple(loc[:len(m)]) == m:
            path = ".".join(["spec", *m]) + f"[{'.'.join(loc[len(m):])}]"
    if err["type"] == "crd_rule":
        return "; ".join(f"{path}.{f}: {m}" if f else f"{path}: {m}" for f, m in err["ctx"]["failures"])
    return f"{path}: {str(err['msg']).removeprefix('Value error, ')}"


def desired_replicas(spec: AdaptiveConsumerSpec) -> int:
    """spec.replicas (written by users, `kubectl scale` or an HPA) kept within [min, max]."""
    return max(spec.min_replicas, min(spec.max_replicas, spec.replicas))


def selector_labels(name: str) -> dict[str, str]:
    return {L_NAME: APP, L_INSTANCE: name}


def selector_string(name: str) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector_labels(name).items()))


def labels(name: str) -> dict[str, str]:
    return {**selector_labels(name), L_MANAGED_BY: MANAGED_BY, L_PART_OF: "afc", L_COMPONENT: "consumer"}


def config_name(name: str, cfg_hash: str) -> str:
    """One immutable ConfigMap per content: a pod of an older revision keeps reading the config
    it was started with, even when it restarts before its turn in a rollout."""
    return f"{name}-config-{cfg_hash}"


def instance_id(namespace: str, pod: str) -> str:
    """A pod's group.instance.id: `<namespace>.<pod>`, so AdaptiveConsumers of the same name in
    two namespaces sharing a group do not fence each other, and a restarted pod (same name) keeps
    its id. Namespaces (63) and pod names (52 + '-' + ordinal) are DNS labels, so the id has at
    most 121 characters of [a-z0-9.-], within Kafka's 249, and no '.' inside either part: no two
    pods share an id. No hash fallback: the kubelet computes the same string (instance_id_env)."""
    return f"{namespace}.{pod}"


def instance_id_env() -> dict[str, str]:
    """instance_id() as the kubelet computes it: dependent env vars expand `$(VAR)` of the
    variables defined before them (POD_NAMESPACE, POD_NAME from the downward API)."""
    return {"name": ENV_INSTANCE_ID, "value": "$(POD_NAMESPACE).$(POD_NAME)"}


def secret_refs(spec: AdaptiveConsumerSpec) -> list[tuple[str, str, SecretKeyRef]]:
    """Every Secret key the pods need: (the spec field naming it, what it is, the reference)."""
    refs = []
    if spec.kafka.sasl_password_secret_ref:
        refs.append(("spec.kafka.saslPasswordSecretRef", "sasl_password", spec.kafka.sasl_password_secret_ref))
    if spec.kafka.tls_ca_secret_ref:
        refs.append(("spec.kafka.tlsCaSecretRef", "tls_ca", spec.kafka.tls_ca_secret_ref))
    if spec.idempotency.redis_url_secret_ref:
        refs.append(("spec.idempotency.redisUrlSecretRef", "redis_url", spec.idempotency.redis_url_secret_ref))
    if spec.backpressure.redis_url_secret_ref:
        refs.append(("spec.backpressure.redisUrlSecretRef", "signal_redis_url", spec.backpressure.redis_url_secret_ref))
    return refs


_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(value: str, env: Mapping[str, str]) -> str:
    """The kubelet's expansion of `$(VAR)` in an env value: defined variables are replaced,
    undefined references stay as written, `$$` is a literal `$`."""
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return _REF.sub(sub, value)


def resolve_env(container: Mapping[str, Any], pod_name: str, namespace: str,
                secret: Callable[[str, str], str] | None = None) -> dict[str, str]:
    """What a kubelet puts in the container's environment. `secret(name, key)` reads a Secret
    key; without it those variables are left out."""
    env: dict[str, str] = {}
    for e in container.get("env") or []:
        if "value" in e:
            env[e["name"]] = expand(e["value"], env)
            continue
        src = e["valueFrom"]
        if "fieldRef" in src:
            value = {"metadata.name": pod_name, "metadata.namespace": namespace}.get(src["fieldRef"]["fieldPath"])
            if value is not None:
                env[e["name"]] = value
        elif "secretKeyRef" in src:
            if secret is not None:  # without a reader, Secret-backed variables are left out
                env[e["name"]] = secret(src["secretKeyRef"]["name"], src["secretKeyRef"]["key"])
        # other sources (configMapKeyRef, resourceFieldRef, ...) are left out
    return env


def pod_instance_id(pod: Mapping[str, Any]) -> str | None:
    """The group.instance.id a pod joined with, read from its own spec as the runtime resolves
    it (AFC_INSTANCE_ID, then POD_NAME): a pod of an older render (the bare pod name) differs
    from instance_id()."""
    meta = pod.get("metadata") or {}
    container = next((c for c in (pod.get("spec") or {}).get("containers") or [] if c.get("name") == CONTAINER), None)
    if container is None:
        return None
    env = resolve_env(container, meta.get("name", ""), meta.get("namespace", ""))
    return env.get(ENV_INSTANCE_ID) or env.get("POD_NAME") or None


# --------------------------------------------------------------------------- runtime configuration

def runtime_settings(spec: AdaptiveConsumerSpec) -> RuntimeSettings:
    """The runtime's settings for the pods, secrets left out (they arrive as env vars).

    Each section is validated by the runtime's own model; the whole is assembled without
    reading the operator's environment (a BaseSettings constructor would)."""
    sections: dict[str, Any] = {}
    overrides: dict[str, dict[str, Any]] = {
        "kafka": {"sasl_password": None,
                  "ssl_ca_location": f"{CA_DIR}/{CA_FILE}" if spec.kafka.tls_ca_secret_ref else None},
        "membership": {"instance_id": None},  # <namespace>.<pod>, from AFC_INSTANCE_ID (instance_id_env)
        "idempotency": {"redis_url": None},
        "backpressure": {"redis_url": None},      # falls back to the idempotency URL (a Secret env var)
        "server": {"host": "0.0.0.0"},
    }
    for name, field in RuntimeSettings.model_fields.items():
        value = getattr(spec, name)
        model = field.annotation
        if isinstance(model, type) and hasattr(model, "model_fields"):
            data = value.model_dump(include=set(model.model_fields))
            data.update(overrides.get(name, {}))
            try:
                sections[name] = model.model_validate(data)
            except ValidationError as e:
                raise InvalidSpec(f"spec.{field.alias or name}: {e}") from e
        else:
            sections[name] = value
    return RuntimeSettings.model_construct(**sections)


def config_document(spec: AdaptiveConsumerSpec) -> str:
    """The ConfigMap's `config.json`: stable text, so its hash changes only with content."""
    return json.dumps(runtime_settings(spec).to_file_json(), indent=2, sort_keys=True) + "\n"


def config_hash(document: str) -> str:
    return hashlib.sha256(document.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- objects

def _meta(owner: Owner, name: str) -> dict[str, Any]:
    return {"name": name, "namespace": owner.namespace, "labels": labels(owner.name),
            "ownerReferences": [owner.reference()]}


def configmap(owner: Owner, document: str, cfg_hash: str) -> dict[str, Any]:
    meta = _meta(owner, config_name(owner.name, cfg_hash))
    meta["labels"][L_CONFIG_HASH] = cfg_hash
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "immutable": True,
            "data": {CONFIG_KEY: document}}


def service(owner: Owner, spec: AdaptiveConsumerSpec) -> dict[str, Any]:
    """Headless: stable DNS names for the pods, and the metrics port for scrapers."""
    return {
        "apiVersion": "v1", "kind": "Service", "metadata": _meta(owner, owner.name),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": selector_labels(owner.name),
            "ports": [{"name": "http", "port": spec.server.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def pod_disruption_budget(owner: Owner, spec: AdaptiveConsumerSpec) -> dict[str, Any]:
    """At most one consumer voluntarily down at a time: one member leaves the group, not many."""
    return {
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": _meta(owner, owner.name),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(owner.name)}},
    }


def _env(spec: AdaptiveConsumerSpec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        instance_id_env(),
        {"name": "AFC_CONFIG_FILE", "value": f"{CONFIG_DIR}/{CONFIG_KEY}"},
    ]
    for var, ref in ((ENV_SASL_PASSWORD, spec.kafka.sasl_password_secret_ref),
                     (ENV_REDIS_URL, spec.idempotency.redis_url_secret_ref),
                     (ENV_SIGNAL_REDIS_URL, spec.backpressure.redis_url_secret_ref)):
        if ref:
            env.append({"name": var, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    env += [e.model_dump(by_alias=True, exclude_none=True) for e in spec.pod_template.env]
    return env


def termination_grace_seconds(spec: AdaptiveConsumerSpec) -> int:
    return math.ceil(spec.shutdown.drain_timeout_s) + GRACE_MARGIN_S


def partition(spec: AdaptiveConsumerSpec, held: int | None = None) -> int:
    """The StatefulSet's rollingUpdate.partition: pods with a lower ordinal keep the previous
    revision. spec.rollout.partition stages a rollout; `held` is where the operator stopped a
    failing one (afc.operator.rollout); the higher of the two holds."""
    return max(spec.rollout.partition or 0, held or 0)


def statefulset(owner: Owner, spec: AdaptiveConsumerSpec, replicas: int, cfg_hash: str,
                held: int | None = None) -> dict[str, Any]:
    pt = spec.pod_template
    http = {"port": "http", "scheme": "HTTP"}
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": config_name(owner.name, cfg_hash)}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    if spec.kafka.tls_ca_secret_ref:
        ref = spec.kafka.tls_ca_secret_ref
        volumes.append({"name": "kafka-ca", "secret": {"secretName": ref.name,
                                                       "items": [{"key": ref.key, "path": CA_FILE}]}})
        mounts.append({"name": "kafka-ca", "mountPath": CA_DIR, "readOnly": True})
    resources = pt.resources.model_dump(by_alias=True) if pt.resources else DEFAULT_RESOURCES
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "env": _env(spec),
        "ports": [{"name": "http", "containerPort": spec.server.port, "protocol": "TCP"}],
        "startupProbe": {"httpGet": {"path": "/healthz", **http}, "periodSeconds": 2, "failureThreshold": 30},
        "livenessProbe": {"httpGet": {"path": "/healthz", **http}, "periodSeconds": 10, "timeoutSeconds": 2,
                          "failureThreshold": 3},
        "readinessProbe": {"httpGet": {"path": "/readyz", **http}, "periodSeconds": 5, "timeoutSeconds": 2,
                           "failureThreshold": 2},
        "resources": resources,
        "securityContext": {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": mounts,
    }
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "terminationGracePeriodSeconds": termination_grace_seconds(spec),
        "automountServiceAccountToken": False,  # the runtime never calls the Kubernetes API
        "enableServiceLinks": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
                            "seccompProfile": {"type": "RuntimeDefault"}},
    }
    if pt.service_account_name:
        pod_spec["serviceAccountName"] = pt.service_account_name
    if pt.priority_class_name:
        pod_spec["priorityClassName"] = pt.priority_class_name
    if pt.node_selector:
        pod_spec["nodeSelector"] = dict(pt.node_selector)
    if pt.tolerations:
        pod_spec["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in pt.tolerations]
    if pt.affinity:
        pod_spec["affinity"] = pt.affinity
    if pt.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [r.model_dump(by_alias=True) for r in pt.image_pull_secrets]
    annotations = {
        **pt.annotations,
        A_CONFIG_HASH: cfg_hash,  # a changed config rolls the pods
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(spec.server.port),
        "prometheus.io/path": "/metrics",
    }
    sts = {
        "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": _meta(owner, owner.name),
        "spec": {
            "replicas": replicas,
            "serviceName": owner.name,
            # All members start and stop together; static membership keeps their identities.
            "podManagementPolicy": "Parallel",
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": partition(spec, held)}},
            "revisionHistoryLimit": 5,
            "selector": {"matchLabels": selector_labels(owner.name)},
            "template": {
                "metadata": {"labels": {**pt.labels, **labels(owner.name)}, "annotations": annotations},
                "spec": pod_spec,
            },
        },
    }
    if spec.rollout.min_ready_seconds:   # 0 is the server's default, which it leaves out of the object
        sts["spec"]["minReadySeconds"] = spec.rollout.min_ready_seconds
    return sts


def desired_objects(owner: Owner, spec: AdaptiveConsumerSpec, held: int | None = None) -> list[dict[str, Any]]:
    """In the order they are applied: the config before the pods that read it. `held`: the
    partition at which the operator holds a failing rollout (see `partition`)."""
    document = config_document(spec)
    cfg_hash = config_hash(document)
    return [configmap(owner, document, cfg_hash), service(owner, spec),
            statefulset(owner, spec, desired_replicas(spec), cfg_hash, held), pod_disruption_budget(owner, spec)]


def template_hash(sts: Mapping[str, Any]) -> str:
    """The identity of a StatefulSet's pod template as rendered (a hold applies to one template:
    a new spec that changes the pods starts a new rollout)."""
    return hashlib.sha256(json.dumps(sts["spec"]["template"], sort_keys=True).encode()).hexdigest()[:16]


def config_volume(template: Mapping[str, Any]) -> str | None:
    """The ConfigMap a pod template (or a pod's spec) mounts as the runtime's config."""
    spec = template.get("spec") or {}
    for v in spec.get("volumes") or []:
        if v.get("name") == "config" and v.get("configMap"):
            return v["configMap"].get("name")
    return None


def unused_configs(owner: Owner, configmaps: list[Mapping[str, Any]], in_use: set[str]) -> list[Mapping[str, Any]]:
    """The ConfigMaps of this AdaptiveConsumer (controlled by it) that no pod, no revision the
    StatefulSet may still create pods from, and not the current render uses: safe to delete."""
    out = []
    for cm in configmaps:
        meta = cm.get("metadata") or {}
        refs = [r for r in meta.get("ownerReferences") or [] if r.get("controller")]
        if not refs or refs[0].get("uid") != owner.uid or meta.get("name") in in_use:
            continue
        if meta.get("deletionTimestamp"):
            continue
        out.append(cm)
    return out


# --------------------------------------------------------------------------- comparison

def _quantity_equal(a: Any, b: Any) -> bool:
    from kubernetes.utils.quantity import parse_quantity
    try:
        return parse_quantity(a) == parse_quantity(b)
    except (ValueError, TypeError):
        return False


def _empty(v: Any) -> bool:
    return v is None or v == {} or v == [] or v == ""


def diff_paths(desired: Any, live: Any, path: str = "") -> list[str]:
    """Where `live` differs from `desired`, looking only at what `desired` sets (the server
    adds defaults, other managers add their own fields). Lists of named items (containers,
    env, ports, volumes) are matched by name."""
    if isinstance(desired, dict):
        if live is None:
            live = {}
        if not isinstance(live, dict):
            return [path or "."]
        out: list[str] = []
        for k, v in desired.items():
            out += diff_paths(v, live.get(k), f"{path}.{k}")
        return out
    if isinstance(desired, list):
        live = live if isinstance(live, list) else ([] if live is None else None)
        if live is None:
            return [path]
        if desired and all(isinstance(d, dict) and "name" in d for d in desired):
            by_name = {x.get("name"): x for x in live if isinstance(x, dict)}
            out = []
            for d in desired:
                if d["name"] not in by_name:
                    out.append(f"{path}[{d['name']}]")
                else:
                    out += diff_paths(d, by_name[d["name"]], f"{path}[{d['name']}]")
            return out
        if len(desired) != len(live):
            return [path]
        out = []
        for i, (d, v) in enumerate(zip(desired, live)):
            out += diff_paths(d, v, f"{path}[{i}]")
        return out
    if desired == live or (_empty(desired) and _empty(live)):
        return []
    if ".resources." in path and _quantity_equal(desired, live):
        return []
    return [path]


def object_drift(desired: Mapping[str, Any], live: Mapping[str, Any] | None) -> list[str]:
    """What of `desired` (metadata labels/owners and spec/data) the live object lacks."""
    if live is None:
        return ["(missing)"]
    wanted = {k: v for k, v in desired.items() if k not in ("apiVersion", "kind")}
    return diff_paths(wanted, live)
