"""An AdaptiveConsumer rendered into ConfigMap, Service, StatefulSet and PodDisruptionBudget."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from afc.operator import render
from afc.operator.testing import resolve_env
from afc.runtime import config as runtime_config

ROOT = Path(__file__).resolve().parents[2]
OWNER = render.Owner(name="orders", namespace="shop", uid="0000-1111", generation=3)


def sample(name: str = "afc_v1alpha1_adaptiveconsumer_secure.yaml") -> dict[str, Any]:
    return yaml.safe_load((ROOT / "manifests" / "samples" / name).read_text())["spec"]


def objects(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {o["kind"]: o for o in render.desired_objects(OWNER, render.parse_spec(spec))}


def container(sts: dict[str, Any]) -> dict[str, Any]:
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    return c


def env_of(sts: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e for e in container(sts)["env"]}


def test_the_four_objects_in_apply_order_each_owned_by_the_consumer() -> None:
    objs = render.desired_objects(OWNER, render.parse_spec(sample("afc_v1alpha1_adaptiveconsumer.yaml")))
    assert [o["kind"] for o in objs] == ["ConfigMap", "Service", "StatefulSet", "PodDisruptionBudget"]
    for o in objs:
        assert o["metadata"]["namespace"] == "shop"
        assert o["metadata"]["ownerReferences"] == [{"apiVersion": "afc.dev/v1alpha1", "kind": "AdaptiveConsumer",
                                                    "name": "orders", "uid": "0000-1111", "controller": True}]
        assert o["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "afc-operator"


def test_statefulset_static_membership_probes_ports_and_drain() -> None:
    spec = sample()
    sts = objects(spec)["StatefulSet"]
    c = container(sts)
    assert sts["spec"]["replicas"] == 3
    assert sts["spec"]["serviceName"] == "orders"
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    # group.instance.id is <namespace>.<pod name>, through the downward API
    assert env_of(sts)["POD_NAME"] == {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
    assert resolve_env(c, "payments-2", "shop")["AFC_INSTANCE_ID"] == "shop.payments-2"
    assert c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["port"] == c["readinessProbe"]["httpGet"]["port"] == "http"
    pod = sts["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > spec["shutdown"]["drainTimeoutS"]
    assert sts["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"


def test_grace_period_is_above_any_drain_bound() -> None:
    for drain in (0, 0.5, 20, 29.9, 3600):
        spec = render.parse_spec({**sample(), "shutdown": {"drainTimeoutS": drain}})
        assert render.termination_grace_seconds(spec) > drain


def test_security_context_is_restricted() -> None:
    sts = objects(sample())["StatefulSet"]
    pod = sts["spec"]["template"]["spec"]
    sc = container(sts)["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    assert {"name": "tmp", "mountPath": "/tmp"} in container(sts)["volumeMounts"]  # writable scratch only


def test_secrets_are_referenced_never_copied() -> None:
    spec = sample()
    objs = objects(spec)
    env = env_of(objs["StatefulSet"])
    assert env[render.ENV_SASL_PASSWORD]["valueFrom"] == {"secretKeyRef": {"name": "payments-kafka", "key": "password"}}
    assert env[render.ENV_REDIS_URL]["valueFrom"] == {"secretKeyRef": {"name": "payments-redis", "key": "url"}}
    assert all("value" not in e for name, e in env.items() if name.startswith(("AFC_KAFKA__", "AFC_IDEMPOTENCY__", "AFC_BACKPRESSURE__")))
    doc = json.loads(objs["ConfigMap"]["data"][render.CONFIG_KEY])
    assert "saslPassword" not in doc["kafka"] and "redisUrl" not in doc["idempotency"]
    # the CA is a mounted Secret key, and the runtime is told where
    assert doc["kafka"]["sslCaLocation"] == f"{render.CA_DIR}/{render.CA_FILE}"
    volumes = {v["name"]: v for v in objs["StatefulSet"]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["kafka-ca"]["secret"] == {"secretName": "payments-kafka", "items": [{"key": "ca.crt", "path": "ca.crt"}]}


def test_the_config_map_is_what_the_runtime_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One schema: the rendered file plus the Secret env vars load in the runtime's own loader."""
    spec = render.parse_spec(sample())
    doc = render.config_document(spec)
    path = tmp_path / "config.json"
    path.write_text(doc)
    for k in [k for k in __import__("os").environ if k.startswith("AFC_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("AFC_CONFIG_FILE", str(path))
    monkeypatch.setenv(render.ENV_SASL_PASSWORD, "s3cret")
    monkeypatch.setenv(render.ENV_REDIS_URL, "redis://:pw@redis:6379/0")
    pod_env = resolve_env(container(objects(sample())["StatefulSet"]), "payments-2", "shop",
                          lambda name, key: "unused")
    for k in ("POD_NAME", "POD_NAMESPACE", "AFC_INSTANCE_ID"):
        monkeypatch.setenv(k, pod_env[k])
    settings = runtime_config.load_settings()
    settings.require_runnable()
    assert settings.kafka.topics == ["payments", "refunds"]
    assert settings.kafka.sasl_password.get_secret_value() == "s3cret"
    assert settings.idempotency.redis_url.get_secret_value().startswith("redis://")
    assert settings.membership.resolved_instance_id() == "shop.payments-2"
    assert settings.flow.max_inflight == 2000 and settings.shutdown.drain_timeout_s == 25
    assert settings.handler.http_sink_url == "http://payments-api.payments.svc:8080/events"
    assert settings.server.host == "0.0.0.0"


def test_rendering_ignores_the_operators_own_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AFC_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("AFC_KAFKA__GROUP_ID", "hijacked")
    doc = json.loads(render.config_document(render.parse_spec(sample())))
    assert doc["logLevel"] == "INFO" and doc["kafka"]["groupId"] == "payments"


def test_config_change_changes_the_pod_template_hash() -> None:
    a = objects(sample())["StatefulSet"]
    b = objects({**sample(), "flow": {"maxInflight": 10}})["StatefulSet"]
    c = objects({**sample(), "replicas": 4})["StatefulSet"]
    hash_of = lambda s: s["spec"]["template"]["metadata"]["annotations"][render.A_CONFIG_HASH]  # noqa: E731
    assert hash_of(a) != hash_of(b)
    assert hash_of(a) == hash_of(c)  # scaling does not restart pods


def test_pod_template_overrides() -> None:
    spec = sample()
    spec["podTemplate"].update({"serviceAccountName": "payments", "labels": {"team": "pay", render.L_INSTANCE: "x"},
                                "priorityClassName": "high"})
    sts = objects(spec)["StatefulSet"]
    pod = sts["spec"]["template"]["spec"]
    assert container(sts)["resources"] == {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}}
    assert env_of(sts)["TZ"] == {"name": "TZ", "value": "UTC"}
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["tolerations"] == [{"key": "workload", "operator": "Equal", "value": "streaming", "effect": "NoSchedule"}]
    assert pod["serviceAccountName"] == "payments" and pod["priorityClassName"] == "high"
    meta = sts["spec"]["template"]["metadata"]
    assert meta["annotations"]["team"] == "payments"
    assert meta["labels"]["team"] == "pay"
    # the selector's labels cannot be overridden, or the StatefulSet would lose its pods
    assert meta["labels"][render.L_INSTANCE] == "orders"


def test_defaults_without_overrides() -> None:
    sts = objects(sample("afc_v1alpha1_adaptiveconsumer.yaml"))["StatefulSet"]
    assert container(sts)["resources"] == render.DEFAULT_RESOURCES
    assert "nodeSelector" not in sts["spec"]["template"]["spec"]


def test_service_is_headless_and_pdb_allows_one_down() -> None:
    objs = objects(sample())
    svc, pdb = objs["Service"]["spec"], objs["PodDisruptionBudget"]["spec"]
    assert svc["clusterIP"] == "None" and svc["ports"][0]["port"] == 8080
    assert svc["selector"] == render.selector_labels("orders") == pdb["selector"]["matchLabels"]
    assert pdb["maxUnavailable"] == 1
    assert render.selector_string("orders") == "app.kubernetes.io/instance=orders,app.kubernetes.io/name=afc-consumer"


@pytest.mark.parametrize("replicas,lo,hi,want", [(1, 1, 10, 1), (0, 2, 5, 2), (20, 1, 10, 10), (3, 0, 3, 3), (0, 0, 4, 0)])
def test_desired_replicas_stay_within_bounds(replicas: int, lo: int, hi: int, want: int) -> None:
    spec = render.parse_spec({**sample(), "replicas": replicas, "minReplicas": lo, "maxReplicas": hi})
    assert render.desired_replicas(spec) == want


def test_diff_ignores_server_defaults_and_finds_real_changes() -> None:
    desired = objects(sample())["StatefulSet"]
    live = json.loads(json.dumps(desired))
    live["metadata"].update({"uid": "u", "resourceVersion": "7", "generation": 2})
    c = live["spec"]["template"]["spec"]["containers"][0]
    c["terminationMessagePath"] = "/dev/termination-log"  # a server default
    c["resources"]["requests"]["cpu"] = "0.25"  # the same quantity, written differently
    c["env"].append({"name": "ADDED_BY_SOMEONE", "value": "1"})  # another manager's field
    live["status"] = {"replicas": 3}
    assert render.object_drift(desired, live) == []
    c["image"] = "evil:1"
    live["spec"]["replicas"] = 9
    del live["spec"]["template"]["spec"]["volumes"][0]
    assert render.object_drift(desired, live) == [
        ".spec.replicas", ".spec.template.spec.containers[consumer].image", ".spec.template.spec.volumes[config]"]
    assert render.object_drift(desired, None) == ["(missing)"]


def test_diff_of_config_data() -> None:
    cm = objects(sample())["ConfigMap"]
    live = json.loads(json.dumps(cm))
    live["data"][render.CONFIG_KEY] = "{}"
    assert render.object_drift(cm, live) == [".data.config.json"]


def test_instance_ids_are_unique_per_namespace_and_within_kafkas_limits() -> None:
    """Two AdaptiveConsumers `orders` in two namespaces on one group must not fence each other;
    the id is stable (pod name and namespace only) and valid for Kafka however long the names."""
    assert render.instance_id("shop", "orders-0") != render.instance_id("billing", "orders-0")
    assert render.instance_id("shop", "orders-0") == render.instance_id("shop", "orders-0") == "shop.orders-0"
    longest = render.instance_id("n" * 63, "o" * 52 + "-999")  # DNS-label namespace, 52-char name, ordinal < 1000
    assert len(longest) <= 249 and re.fullmatch(r"[a-zA-Z0-9._-]+", longest)
    # what the kubelet computes from the rendered env is the same string the operator uses
    sts = objects(sample())["StatefulSet"]
    names = [e["name"] for e in container(sts)["env"]]
    assert names.index("AFC_INSTANCE_ID") > max(names.index("POD_NAME"), names.index("POD_NAMESPACE"))
    assert resolve_env(container(sts), "orders-7", "n" * 63)["AFC_INSTANCE_ID"] == render.instance_id("n" * 63, "orders-7")


def test_config_is_an_immutable_configmap_per_content_referenced_by_the_pods() -> None:
    """A config change is a new ConfigMap and a new pod template (a new StatefulSet revision);
    the old revision's pods keep reading theirs, which nothing changes in place."""
    a, b = objects(sample()), objects({**sample(), "flow": {"maxInflight": 10}})
    for objs in (a, b):
        cm = objs["ConfigMap"]
        digest = render.config_hash(cm["data"][render.CONFIG_KEY])
        assert cm["metadata"]["name"] == f"orders-config-{digest}" and cm["immutable"] is True
        assert cm["metadata"]["labels"][render.L_CONFIG_HASH] == digest
        assert render.config_volume(objs["StatefulSet"]["spec"]["template"]) == cm["metadata"]["name"]
    assert a["ConfigMap"]["metadata"]["name"] != b["ConfigMap"]["metadata"]["name"]
    assert render.template_hash(a["StatefulSet"]) != render.template_hash(b["StatefulSet"])
    scaled = objects({**sample(), "replicas": 4})
    assert scaled["ConfigMap"]["metadata"]["name"] == a["ConfigMap"]["metadata"]["name"]
    assert render.template_hash(scaled["StatefulSet"]) == render.template_hash(a["StatefulSet"])


@pytest.mark.parametrize("spec_partition,held,want", [(None, None, 0), (2, None, 2), (None, 3, 3), (2, 1, 2), (1, 2, 2)])
def test_the_update_partition_is_the_spec_or_the_hold_whichever_holds_more(
        spec_partition: int | None, held: int | None, want: int) -> None:
    spec = render.parse_spec({**sample(), "rollout": {"partition": spec_partition} if spec_partition is not None else {}})
    (sts,) = [o for o in render.desired_objects(OWNER, spec, held=held) if o["kind"] == "StatefulSet"]
    assert sts["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"partition": want}}
    assert spec.rollout.progress_deadline_seconds == 600  # as a Deployment's default


@pytest.mark.parametrize("given,want", [(None, 0), (5, 5)])
def test_min_ready_seconds_comes_from_the_rollout_spec(given: int | None, want: int) -> None:
    spec = render.parse_spec({**sample(), "rollout": {} if given is None else {"minReadySeconds": given}})
    (sts,) = [o for o in render.desired_objects(OWNER, spec) if o["kind"] == "StatefulSet"]
    assert sts["spec"].get("minReadySeconds", 0) == want


def test_unused_configs_are_ours_and_used_by_nothing() -> None:
    def cm(name: str, uid: str = OWNER.uid, deleting: bool = False) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": name, "ownerReferences": [{"controller": True, "uid": uid}]}
        if deleting:
            meta["deletionTimestamp"] = "2027-01-01T00:00:00Z"
        return {"metadata": meta}
    cms = [cm("orders-config-a"), cm("orders-config-b"), cm("orders-config-c"), cm("orders-config-d", uid="other"),
           cm("orders-config"), cm("orders-config-e", deleting=True)]
    gone = render.unused_configs(OWNER, cms, {"orders-config-a", "orders-config-c"})
    assert [c["metadata"]["name"] for c in gone] == ["orders-config-b", "orders-config"]


def test_the_id_a_pod_joined_with_is_read_from_its_own_spec() -> None:
    """A restarted pod of the same render keeps its id (nothing to remove from the group); a pod
    of an older render that used the bare pod name is told apart (its id is removed when it goes)."""
    sts = objects(sample())["StatefulSet"]
    pod = {"metadata": {"name": "orders-1", "namespace": "shop"}, "spec": sts["spec"]["template"]["spec"]}
    assert render.pod_instance_id(pod) == render.instance_id("shop", "orders-1") == "shop.orders-1"
    legacy = json.loads(json.dumps(pod))
    (c,) = legacy["spec"]["containers"]
    c["env"] = [e for e in c["env"] if e["name"] != render.ENV_INSTANCE_ID]
    assert render.pod_instance_id(legacy) == "orders-1"
    assert render.pod_instance_id({"metadata": {"name": "x"}, "spec": {"containers": [{"name": "sidecar"}]}}) is None
