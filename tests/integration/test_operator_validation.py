"""The CRD on the real apiserver: defaults filled by the schema, invalid specs refused by
kubectl with a message naming the field (OpenAPI schema and CEL rules)."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from afctest import Testbed

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
                                 ["spec.membership.sessionTimeoutMs", "greater than or equal to 1000"]),
    "handler and sink": (with_spec(BASE, spec__handler={"handler": "a.b:c", "httpSinkUrl": "http://sink"}),
                         ["spec.handler.handler", "exactly one of handler"]),
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
                          ["spec.kafka.extra", "must not carry secrets"]),
    "password in spec": (with_spec(BASE, spec__kafka__saslPassword="hunter2"),
                         ['unknown field "spec.kafka.saslPassword"']),
    "name not a dns label": (with_spec(BASE, metadata__name="orders.v2"), ["metadata.name must be a DNS label"]),
    "name too long": (with_spec(BASE, metadata__name="o" * 53), ["metadata.name must be at most 52"]),
}


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
