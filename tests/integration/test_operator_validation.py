"""The CRD on the real apiserver: defaults filled by the schema, invalid specs refused by
kubectl with a message naming the field (OpenAPI schema and CEL rules), each cross-field rule
of the runtime's model refused by the apiserver as by pydantic, and the edge cases that must
still pass accepted."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from afc.runtime.config import ConfigError, load_settings
from afctest import Testbed
from config_rules_cases import RULE_EXAMPLES, merged, runtime_rules

pytestmark = [pytest.mark.k8s]

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "manifests" / "samples"


def sample(name: str = "afc_v1alpha1_adaptiveconsumer.yaml") -> dict[str, Any]:
    return yaml.safe_load((SAMPLES / name).read_text())


def apply(testbed: Testbed, namespace: str, obj: dict[str, Any], *extra: str):
    return testbed.run_kubectl("apply", "-n", namespace, "-f", "-", *extra, input=json.dumps(obj), check=False)


def with_spec(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    obj = copy.deepcopy(base)
    for path, value in changes.items():
        node = obj
        keys = path.split("__")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        if value is DELETE:
            node.pop(keys[-1], None)
        else:
            node[keys[-1]] = value
    return obj


DELETE = object()
BASE = sample()

# case -> (object, what kubectl's error must contain: the field, and the reason)
INVALID: dict[str, tuple[dict[str, Any], list[str]]] = {
    "min above max": (with_spec(BASE, spec__minReplicas=5, spec__maxReplicas=2),
                      ["spec.minReplicas", "minReplicas must be <= maxReplicas"]),
    "no topics": (with_spec(BASE, spec__kafka__topics=[]), ["spec.kafka.topics", "at least 1 items"]),
    "topics missing": (with_spec(BASE, spec__kafka__topics=DELETE), ["spec.kafka.topics", "Required value"]),
    "bad handler path": (with_spec(BASE, spec__handler__handler="handlers.py"),
                         ["spec.handler.handler", "should match"]),
    "negative drain timeout": (with_spec(BASE, spec__shutdown={"drainTimeoutS": -1}),
                               ["spec.shutdown.drainTimeoutS", "greater than or equal to 0"]),
    "negative session timeout": (with_spec(BASE, spec__membership={"sessionTimeoutMs": -1}),
                                 ["spec.membership.sessionTimeoutMs", "greater than or equal to 6000"]),
    "session below the brokers' minimum": (with_spec(BASE, spec__membership={"sessionTimeoutMs": 1000}),
                                           ["spec.membership.sessionTimeoutMs", "greater than or equal to 6000"]),
    "session above max poll": (with_spec(BASE, spec__membership={"sessionTimeoutMs": 600000,
                                                                 "maxPollIntervalMs": 300000}),
                               ["spec.membership.sessionTimeoutMs", "must be <= maxPollIntervalMs"]),
    "session above the default max poll": (with_spec(BASE, spec__membership={"sessionTimeoutMs": 400000}),
                                           ["spec.membership.sessionTimeoutMs", "must be <= maxPollIntervalMs"]),
    "heartbeat not below ttl": (with_spec(BASE, spec__backpressure={"ttlMs": 3000, "heartbeatMs": 5000}),
                                ["spec.backpressure.heartbeatMs", "heartbeatMs must be < ttlMs"]),
    "handler and sink": (with_spec(BASE, spec__handler={"handler": "a.b:c", "httpSinkUrl": "http://sink"}),
                         ["spec.handler.handler", "not both"]),
    "no handler target": (with_spec(BASE, spec__handler={"decoder": "raw"}),
                          ["spec.handler.handler", "exactly one of handler"]),
    "inflight bounds": (with_spec(BASE, spec__flow={"minInflight": 100, "maxInflight": 10}),
                        ["spec.flow.minInflight", "minInflight must be <= maxInflight"]),
    "sasl without secret": (with_spec(BASE, spec__kafka__securityProtocol="SASL_SSL"),
                            ["spec.kafka.saslPasswordSecretRef", "spec.kafka.saslMechanism"]),
    "ca without tls": (with_spec(BASE, spec__kafka__tlsCaSecretRef={"name": "ca", "key": "ca.crt"}),
                       ["spec.kafka.tlsCaSecretRef", "needs securityProtocol SSL"]),
    "reserved env": (with_spec(BASE, spec__podTemplate={"env": [{"name": "POD_NAME", "value": "x"}]}),
                     ["spec.podTemplate.env", "must not set POD_NAME"]),
    "duplicate topics": (with_spec(BASE, spec__kafka__topics=["a", "a"]), ["spec.kafka.topics[1]", "Duplicate"]),
    "bad topic name": (with_spec(BASE, spec__kafka__topics=["has space"]), ["spec.kafka.topics[0]", "should match"]),
    "no image": (with_spec(BASE, spec__image=DELETE), ["spec.image", "Required value"]),
    "unknown protocol": (with_spec(BASE, spec__kafka__securityProtocol="TLS"),
                         ["spec.kafka.securityProtocol", "Unsupported value"]),
    "negative replicas": (with_spec(BASE, spec__replicas=-1), ["spec.replicas", "greater than or equal to 0"]),
    "routing suffixes clash": (with_spec(BASE, spec__routing={"dlqSuffix": ".retry"}),
                               ["spec.routing.dlqSuffix", "must differ"]),
    "routing backoff bounds": (with_spec(BASE, spec__routing={"backoffInitialMs": 10000, "backoffMaxMs": 10}),
                               ["spec.routing.backoffMaxMs", "backoffMaxMs must be >= backoffInitialMs"]),
    "password in extra": (with_spec(BASE, spec__kafka__extra={"sasl.password": "hunter2"}),
                          ["spec.kafka.extra", "not allowed in extra"]),
    "auto commit in extra": (with_spec(BASE, spec__kafka__extra={"enable.auto.commit": "true"}),
                             ["spec.kafka.extra", "not allowed in extra"]),
    "group id in extra": (with_spec(BASE, spec__kafka__extra={"group.id": "other"}),
                          ["spec.kafka.extra", "not allowed in extra"]),
    "instance id in extra": (with_spec(BASE, spec__kafka__extra={"group.instance.id": "x"}),
                             ["spec.kafka.extra", "not allowed in extra"]),
    "brokers in extra": (with_spec(BASE, spec__kafka__extra={"bootstrap.servers": "evil:9092"}),
                         ["spec.kafka.extra", "not allowed in extra"]),
    "offset store in extra": (with_spec(BASE, spec__kafka__extra={"enable.auto.offset.store": "true"}),
                              ["spec.kafka.extra", "not allowed in extra"]),
    "oauth config in extra": (with_spec(BASE, spec__kafka__extra={"sasl.oauthbearer.config": "principal=x"}),
                              ["spec.kafka.extra", "not allowed in extra"]),
    "assignor with the consumer protocol": (
        with_spec(BASE, spec__kafka__extra={"partition.assignment.strategy": "range"},
                  spec__membership={"groupProtocol": "consumer"}),
        ["spec.kafka.extra", "needs membership.groupProtocol classic"]),
    "env value and valueFrom": (
        with_spec(BASE, spec__podTemplate={"env": [{"name": "TOKEN", "value": "x", "valueFrom": {
            "secretKeyRef": {"name": "s", "key": "k"}}}]}),
        ["spec.podTemplate.env[0].valueFrom", "set value or valueFrom, not both"]),
    "env valueFrom without a source": (
        with_spec(BASE, spec__podTemplate={"env": [{"name": "TOKEN", "valueFrom": {}}]}),
        ["spec.podTemplate.env[0].valueFrom", "exactly one of secretKeyRef"]),
    "env valueFrom unknown source": (
        with_spec(BASE, spec__podTemplate={"env": [{"name": "TOKEN", "valueFrom": {"vaultRef": {"path": "x"}}}]}),
        ['unknown field "spec.podTemplate.env[0].valueFrom.vaultRef"']),
    "env fieldRef the downward API lacks": (
        with_spec(BASE, spec__podTemplate={"env": [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "spec.bogus"}}}]}),
        ["spec.podTemplate.env[0].valueFrom.fieldRef.fieldPath", "should match"]),
    "env resourceFieldRef unknown": (
        with_spec(BASE, spec__podTemplate={"env": [{"name": "X", "valueFrom": {"resourceFieldRef": {"resource": "cpu"}}}]}),
        ["spec.podTemplate.env[0].valueFrom.resourceFieldRef.resource", "should match"]),
    "invalid label key": (with_spec(BASE, spec__podTemplate={"labels": {"team name": "a"}}),
                          ["spec.podTemplate.labels", "qualified names"]),
    "label key prefix too long": (with_spec(BASE, spec__podTemplate={"labels": {"a" * 254 + "/x": "a"}}),
                                  ["spec.podTemplate.labels", "qualified names"]),
    "invalid label value": (with_spec(BASE, spec__podTemplate={"labels": {"team": "a b"}}),
                            ["spec.podTemplate.labels.team", "should match"]),
    "label value too long": (with_spec(BASE, spec__podTemplate={"labels": {"team": "a" * 64}}),
                             ["spec.podTemplate.labels.team", "may not be more than 63"]),
    "invalid annotation key": (with_spec(BASE, spec__podTemplate={"annotations": {"-bad/key": "a"}}),
                               ["spec.podTemplate.annotations", "qualified names"]),
    "invalid node selector key": (with_spec(BASE, spec__podTemplate={"nodeSelector": {"zone/": "a"}}),
                                  ["spec.podTemplate.nodeSelector", "qualified names"]),
    "negative cpu request": (with_spec(BASE, spec__podTemplate={"resources": {"requests": {"cpu": "-100m"}}}),
                             ["spec.podTemplate.resources.requests.cpu", "should match"]),
    "negative memory limit": (with_spec(BASE, spec__podTemplate={"resources": {"limits": {"memory": -1}}}),
                              ["spec.podTemplate.resources.limits.memory", "greater than or equal to 0"]),
    "request above limit": (with_spec(BASE, spec__podTemplate={"resources": {"requests": {"memory": "1Gi"},
                                                                             "limits": {"memory": "512Mi"}}}),
                            ["spec.podTemplate.resources.requests", "must be <= their limits"]),
    "toleration Exists with a value": (
        with_spec(BASE, spec__podTemplate={"tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]}),
        ["spec.podTemplate.tolerations[0].value", "must be empty when operator is Exists"]),
    "toleration key not a qualified name": (
        with_spec(BASE, spec__podTemplate={"tolerations": [{"key": "a b", "operator": "Exists"}]}),
        ["spec.podTemplate.tolerations[0].key", "should match"]),
    "toleration without key": (with_spec(BASE, spec__podTemplate={"tolerations": [{"operator": "Equal",
                                                                                   "value": "v"}]}),
                               ["spec.podTemplate.tolerations[0].key", "key is required"]),
    "tolerationSeconds without NoExecute": (
        with_spec(BASE, spec__podTemplate={"tolerations": [{"key": "k", "operator": "Exists",
                                                            "effect": "NoSchedule", "tolerationSeconds": 5}]}),
        ["spec.podTemplate.tolerations[0].tolerationSeconds", "needs effect NoExecute"]),
    "affinity without node selector terms": (
        with_spec(BASE, spec__podTemplate={"affinity": {"nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}}}),
        ["nodeSelectorTerms", "should have at least 1 items"]),
    "affinity unknown operator": (
        with_spec(BASE, spec__podTemplate={"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "Bogus"}]}]}}}}),
        ["matchExpressions[0].operator", "Unsupported value"]),
    "affinity In without values": (
        with_spec(BASE, spec__podTemplate={"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In"}]}]}}}}),
        ["matchExpressions[0].values", "at least one for In and NotIn"]),
    "anti-affinity without topology key": (
        with_spec(BASE, spec__podTemplate={"affinity": {"podAntiAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [{"labelSelector": {"matchLabels": {"a": "b"}}}]}}}),
        ["topologyKey", "Required value"]),
    "affinity weight out of range": (
        with_spec(BASE, spec__podTemplate={"affinity": {"podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 0, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname"}}]}}}),
        ["weight", "greater than or equal to 1"]),
    "affinity unknown field": (with_spec(BASE, spec__podTemplate={"affinity": {"nodeAfinity": {}}}),
                               ['unknown field "spec.podTemplate.affinity.nodeAfinity"']),
    "image with a space": (with_spec(BASE, spec__image="ghcr.io/afc/runtime :1"), ["spec.image", "should match"]),
    "password in spec": (with_spec(BASE, spec__kafka__saslPassword="hunter2"),
                         ['unknown field "spec.kafka.saslPassword"']),
    "name not a dns label": (with_spec(BASE, metadata__name="orders.v2"), ["metadata.name must be a DNS label"]),
    "name too long": (with_spec(BASE, metadata__name="o" * 53), ["metadata.name must be at most 52"]),
}


def test_the_corpus_is_large() -> None:
    assert len(INVALID) >= 30


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_spec_is_refused_naming_the_field(case: str, testbed: Testbed, crd_installed: None,
                                                  namespace: str) -> None:
    obj, expected = INVALID[case]
    r = apply(testbed, namespace, obj)
    assert r.returncode != 0, f"{case}: accepted\n{r.stdout}"
    for text in expected:
        assert text in r.stderr, f"{case}: {text!r} not in kubectl's error:\n{r.stderr}"
    got = testbed.run_kubectl("get", "adaptiveconsumers", "-n", namespace, "-o", "name").stdout
    assert got.strip() == ""


@pytest.mark.parametrize("name", sorted(RULE_EXAMPLES))
def test_each_runtime_rule_is_refused_by_pydantic_and_by_the_apiserver(name: str, testbed: Testbed,
                                                                       crd_installed: None, namespace: str) -> None:
    """The rule's example (tests/config_rules_cases.py): the runtime refuses it at start, and
    the apiserver refuses it at apply with the same message, on the same field."""
    sections, field = RULE_EXAMPLES[name]
    rule = runtime_rules()[name][1]
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_settings(**sections)
    obj = {**BASE, "spec": merged(BASE["spec"], sections)}
    r = apply(testbed, namespace, obj, "--dry-run=server")
    assert r.returncode != 0, f"{name}: accepted\n{r.stdout}"
    assert f"spec.{field}" in r.stderr and rule.message in r.stderr, r.stderr


# every part of a pod's affinity, as a platform team writes it
AFFINITY = {
    "nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64", "arm64"]},
                                  {"key": "example.com/cores", "operator": "Gt", "values": ["4"]},
                                  {"key": "spot", "operator": "DoesNotExist"}]},
            {"matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": ["node-7"]}]}]},
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 50, "preference": {"matchExpressions": [{"key": "topology.kubernetes.io/zone",
                                                                "operator": "In", "values": ["eu-1a"]}]}}]},
    "podAntiAffinity": {
        "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "podAffinityTerm": {
            "labelSelector": {"matchLabels": {"app.kubernetes.io/instance": "orders"}},
            "topologyKey": "kubernetes.io/hostname"}}],
        "requiredDuringSchedulingIgnoredDuringExecution": [{
            "labelSelector": {"matchExpressions": [{"key": "app", "operator": "Exists"}]},
            "namespaceSelector": {}, "namespaces": ["other"], "topologyKey": "topology.kubernetes.io/zone"}]},
    "podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": {"app": "cache"}}, "topologyKey": "kubernetes.io/hostname"}]},
}

# edge cases the rules must not refuse
VALID_EDGES: dict[str, dict[str, Any]] = {
    "session equal to max poll": with_spec(BASE, spec__membership={"sessionTimeoutMs": 300000,
                                                                   "maxPollIntervalMs": 300000}),
    "least session": with_spec(BASE, spec__membership={"sessionTimeoutMs": 6000, "maxPollIntervalMs": 10000}),
    "consumer protocol with a short max poll": with_spec(BASE, spec__membership={"groupProtocol": "consumer",
                                                                                 "maxPollIntervalMs": 10000}),
    "tuning in extra": with_spec(BASE, spec__kafka__extra={"fetch.wait.max.ms": "100", "client.rack": "zone-a",
                                                           "partition.assignment.strategy": "range"}),
    "heartbeat just below ttl": with_spec(BASE, spec__backpressure={"ttlMs": 3000, "heartbeatMs": 2999}),
    "pod overrides": with_spec(BASE, spec__podTemplate={
        "labels": {"team": "payments", "example.com/tier": "gold", "empty": ""},
        "annotations": {"prometheus.io/scrape": "true"},
        "nodeSelector": {"topology.kubernetes.io/zone": "eu-1a"},
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"cpu": 1, "memory": "256Mi"}},
        "env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
                {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                {"name": "TEAM", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['team']", "apiVersion": "v1"}}},
                {"name": "MEM", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}},
                {"name": "COLOR", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "color",
                                                                    "optional": True}}},
                {"name": "PLAIN", "value": ""}],
        "tolerations": [{"operator": "Exists"}, {"key": "", "operator": "Exists"},
                        {"key": "k", "operator": "Exists", "effect": "NoExecute",
                                                 "tolerationSeconds": 30}],
        "affinity": AFFINITY}),
    "replicas outside bounds (clamped by the operator)": with_spec(BASE, spec__replicas=9),
}


@pytest.mark.parametrize("case", list(VALID_EDGES))
def test_valid_edge_cases_are_accepted(case: str, testbed: Testbed, crd_installed: None, namespace: str) -> None:
    r = apply(testbed, namespace, VALID_EDGES[case], "--dry-run=server")
    assert r.returncode == 0, f"{case}: {r.stderr}"


def test_defaults_are_filled_by_the_schema(testbed: Testbed, crd_installed: None, namespace: str) -> None:
    r = apply(testbed, namespace, BASE)
    assert r.returncode == 0, r.stderr
    spec = json.loads(testbed.run_kubectl("get", "ac", "orders", "-n", namespace, "-o", "json").stdout)["spec"]
    assert spec["membership"] == {"static": True, "sessionTimeoutMs": 45000, "maxPollIntervalMs": 300000,
                                  "groupProtocol": "classic", "remoteAssignor": "range"}
    assert spec["flow"]["maxInflight"] == 5000 and spec["flow"]["minInflight"] == 1
    assert spec["kafka"]["securityProtocol"] == "PLAINTEXT"
    assert spec["server"]["port"] == 8080 and spec["shutdown"]["drainTimeoutS"] == 20
    assert spec["scaling"]["pollIntervalS"] == 30 and spec["idempotency"]["enabled"] is True
    assert spec["imagePullPolicy"] == "IfNotPresent"
    # the short name and the printer columns
    table = testbed.run_kubectl("get", "ac", "-n", namespace).stdout.split("\n")[0].split()
    assert table == ["NAME", "READY", "REPLICAS", "DESIRED", "LAG", "BACKPRESSURE", "AGE"]


def test_both_samples_are_valid(testbed: Testbed, crd_installed: None, namespace: str) -> None:
    r = testbed.run_kubectl("apply", "-n", namespace, "--dry-run=server", "-k", str(SAMPLES), check=False)
    assert r.returncode == 0, r.stderr
    assert "orders" in r.stdout and "payments" in r.stdout


# field changed on update -> the field kubectl's error names
IMMUTABLE = {
    "group id": ({"kafka": {**BASE["spec"]["kafka"], "groupId": "another-group"}}, "spec.kafka.groupId",
                 "kafka.groupId is immutable"),
    "static membership": ({"membership": {"static": False}}, "spec.membership.static",
                          "membership.static is immutable"),
}


@pytest.mark.parametrize("case", list(IMMUTABLE))
def test_group_and_membership_kind_cannot_change_in_place(case: str, testbed: Testbed, crd_installed: None,
                                                          namespace: str) -> None:
    """An update changing kafka.groupId or membership.static is refused with a message naming the
    field and why; the stored object keeps its value, and other edits still pass."""
    assert apply(testbed, namespace, BASE).returncode == 0
    change, field, message = IMMUTABLE[case]
    r = apply(testbed, namespace, with_spec(BASE, **{f"spec__{k}": v for k, v in change.items()}))
    assert r.returncode != 0, f"{case}: accepted\n{r.stdout}"
    assert field in r.stderr and message in r.stderr, r.stderr
    assert "create a new AdaptiveConsumer" in r.stderr, r.stderr
    spec = json.loads(testbed.run_kubectl("get", "ac", "orders", "-n", namespace, "-o", "json").stdout)["spec"]
    assert spec["kafka"]["groupId"] == BASE["spec"]["kafka"]["groupId"] and spec["membership"]["static"] is True
    # any other edit, and re-applying the same values, still pass
    r = apply(testbed, namespace, with_spec(BASE, spec__replicas=3, spec__membership={"static": True,
                                                                                      "sessionTimeoutMs": 30000}))
    assert r.returncode == 0, r.stderr
    spec = json.loads(testbed.run_kubectl("get", "ac", "orders", "-n", namespace, "-o", "json").stdout)["spec"]
    assert spec["replicas"] == 3 and spec["membership"]["sessionTimeoutMs"] == 30000
