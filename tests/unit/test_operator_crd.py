"""The CRD is generated from the models, structural, checked in, and embeds the runtime's schema."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from pydantic import SecretStr

from afc.operator import crd, render
from afc.runtime import config as runtime_config

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / crd.CRD_FILE


def minimal_spec(**over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"image": "example.invalid/afc-runtime:1", "handler": {"handler": "app.h:handle"},
                            "kafka": {"bootstrapServers": "kafka:9092", "topics": ["orders"], "groupId": "orders"}}
    for path, value in over.items():
        node = spec
        keys = path.split("__")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return spec


def walk(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], f"{path}{{}}")


def openapi() -> dict[str, Any]:
    return crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_checked_in_crd_is_what_the_models_generate() -> None:
    assert CRD_PATH.exists(), f"generate it: python -m afc.operator.crd > {CRD_PATH.relative_to(ROOT)}"
    assert CRD_PATH.read_text() == crd.render_yaml(), (
        f"{CRD_PATH.relative_to(ROOT)} drifted from the models; regenerate it with "
        f"`python -m afc.operator.crd > {CRD_PATH.relative_to(ROOT)}`")


def test_names_and_subresources() -> None:
    doc = yaml.safe_load(CRD_PATH.read_text())
    assert doc["metadata"]["name"] == "adaptiveconsumers.afc.dev"
    names = doc["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == ("AdaptiveConsumer", "adaptiveconsumers", ["ac"])
    version = doc["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"] == {"specReplicasPath": ".spec.replicas",
                                                "statusReplicasPath": ".status.replicas",
                                                "labelSelectorPath": ".status.selector"}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert {"Replicas", "Lag", "Backpressure", "Age"} <= set(columns)
    assert columns["Lag"] == ".status.lag.total"


def test_schema_is_structural() -> None:
    """What the apiserver demands of a structural schema, checked on every node."""
    for path, node in walk(openapi()):
        for forbidden in ("$ref", "anyOf", "oneOf", "allOf", "not", "$defs", "title", "nullable"):
            assert forbidden not in node, f"{path or '.'} has {forbidden}"
        assert node.get("additionalProperties") is not False, path
        assert not ("properties" in node and "additionalProperties" in node), path
        assert ("type" in node or node.get("x-kubernetes-int-or-string")
                or node.get("x-kubernetes-preserve-unknown-fields")), f"{path} has no type"
        if isinstance(node.get("exclusiveMinimum"), (int, float)) and not isinstance(node["exclusiveMinimum"], bool):
            pytest.fail(f"{path}: exclusiveMinimum must be a boolean in OpenAPI v3.0")


def test_every_runtime_section_is_in_the_spec() -> None:
    spec_props = openapi()["properties"]["spec"]["properties"]
    for name, field in runtime_config.RuntimeSettings.model_fields.items():
        alias = crd.AdaptiveConsumerSpec.model_fields[name].alias or name
        assert alias in spec_props, f"runtime section {name} missing from the CRD spec"


def test_runtime_fields_keep_their_bounds_defaults_and_descriptions() -> None:
    flow = openapi()["properties"]["spec"]["properties"]["flow"]
    runtime_flow = runtime_config.FlowSettings.model_json_schema(by_alias=True)["properties"]
    assert flow["properties"]["maxBatch"]["maximum"] == runtime_flow["maxBatch"]["maximum"]
    assert flow["properties"]["windowMs"]["default"] == runtime_flow["windowMs"]["default"]
    assert flow["properties"]["maxInflight"]["description"] == runtime_flow["maxInflight"]["description"]
    # a section left out is defaulted in full, to the runtime's own defaults
    defaults = runtime_config.FlowSettings().model_dump(by_alias=True, exclude_none=True)
    assert flow["default"] == defaults
    membership = openapi()["properties"]["spec"]["properties"]["membership"]
    assert membership["default"]["static"] is True


def secret_fields() -> list[tuple[str, str]]:
    out = []
    for section, field in runtime_config.RuntimeSettings.model_fields.items():
        model = field.annotation
        for name, f in getattr(model, "model_fields", {}).items():
            if SecretStr in (getattr(f.annotation, "__args__", None) or (f.annotation,)):
                out.append((section, f.alias or name))
    return out


def test_runtime_secrets_are_not_in_the_schema_but_come_from_secret_refs() -> None:
    found = secret_fields()
    assert ("kafka", "saslPassword") in found and ("idempotency", "redisUrl") in found
    spec_props = openapi()["properties"]["spec"]["properties"]
    handled = {("kafka", "saslPassword"): render.ENV_SASL_PASSWORD,
               ("idempotency", "redisUrl"): render.ENV_REDIS_URL,
               ("backpressure", "redisUrl"): render.ENV_SIGNAL_REDIS_URL}
    for section, name in found:
        assert name not in spec_props[section]["properties"], f"{section}.{name} is a secret"
        assert (section, name) in handled, f"the operator does not know how to pass secret {section}.{name}"
        assert f"{name}SecretRef" in spec_props[section]["properties"]


def test_cel_rules_name_their_field() -> None:
    rules = [(p, r) for p, node in walk(openapi()) for r in node.get("x-kubernetes-validations", [])]
    assert len(rules) >= 10
    for path, rule in rules:
        assert rule["message"], path
        if path and "oldSelf" not in rule["rule"]:  # the root's rules are about metadata.name, which the message names
            assert rule.get("fieldPath", "").startswith("."), f"{path}: {rule['rule']} has no fieldPath"


def test_group_and_membership_kind_are_immutable() -> None:
    """A transition rule on exactly these fields: the apiserver names the field itself."""
    immutable = {p for p, node in walk(openapi()) for r in node.get("x-kubernetes-validations", [])
                 if r["rule"] == "self == oldSelf"}
    assert immutable == {".spec.kafka.groupId", ".spec.membership.static"}, immutable


VALID = minimal_spec()

INVALID = {
    "min above max": (minimal_spec(minReplicas=5, maxReplicas=2), "minReplicas"),
    "no topics": (minimal_spec(kafka__topics=[]), "topics"),
    "bad handler path": (minimal_spec(handler__handler="not a path"), "handler"),
    "negative drain timeout": (minimal_spec(shutdown__drainTimeoutS=-1), "drainTimeoutS"),
    "handler and sink": (minimal_spec(handler__httpSinkUrl="http://sink"), "handler"),
    "inflight bounds": (minimal_spec(flow__minInflight=10, flow__maxInflight=5), "minInflight"),
    "sasl without password ref": (minimal_spec(kafka__securityProtocol="SASL_SSL", kafka__saslMechanism="PLAIN",
                                               kafka__saslUsername="u"), "saslPasswordSecretRef"),
    "reserved env": (minimal_spec(podTemplate__env=[{"name": "AFC_KAFKA__TOPICS", "value": "x"}]), "env"),
    "routing suffixes clash": (minimal_spec(routing__dlqSuffix=".retry"), "dlqSuffix"),
    "routing backoff bounds": (minimal_spec(routing__backoffInitialMs=10_000, routing__backoffMaxMs=10), "backoffMaxMs"),
    "bad topic name": (minimal_spec(kafka__topics=["no spaces"]), "topics"),
    "secret in extra": (minimal_spec(kafka__extra={"sasl.password": "x"}), "extra"),
    "unknown field": (minimal_spec(kafka__saslPassword="x"), "saslPassword"),
    "env value and valueFrom": (minimal_spec(podTemplate__env=[{"name": "T", "value": "x", "valueFrom": {
        "secretKeyRef": {"name": "s", "key": "k"}}}]), "spec.podTemplate.env.0.valueFrom: set value or valueFrom"),
    "env valueFrom without a source": (minimal_spec(podTemplate__env=[{"name": "T", "valueFrom": {}}]),
                                       "exactly one of secretKeyRef"),
    "invalid label key": (minimal_spec(podTemplate__labels={"team name": "a"}), "spec.podTemplate.labels: labels keys"),
    "invalid label value": (minimal_spec(podTemplate__labels={"team": "a b"}), "spec.podTemplate.labels.team"),
    "invalid node selector key": (minimal_spec(podTemplate__nodeSelector={"a/b/c": "x"}), "nodeSelector keys"),
    "negative quantity": (minimal_spec(podTemplate__resources={"requests": {"cpu": "-1"}}),
                          "not a non-negative quantity"),
    "negative int quantity": (minimal_spec(podTemplate__resources={"limits": {"cpu": -1}}),
                              "not a non-negative quantity"),
    "request above limit": (minimal_spec(podTemplate__resources={"requests": {"cpu": "2"}, "limits": {"cpu": "1500m"}}),
                            "must be <= their limits"),
    "toleration Exists with value": (minimal_spec(podTemplate__tolerations=[{"key": "k", "operator": "Exists",
                                                                              "value": "v"}]), "must be empty"),
    "image with whitespace": (minimal_spec(image="a b"), "spec.image"),
    "affinity without node selector terms": (minimal_spec(podTemplate__affinity={"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}}),
        "spec.podTemplate.affinity: nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms"),
    "affinity Gt with a word": (minimal_spec(podTemplate__affinity={"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [
            {"key": "cores", "operator": "Gt", "values": ["many"]}]}]}}}), "exactly one integer for Gt"),
    "affinity matchFields on a label": (minimal_spec(podTemplate__affinity={"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchFields": [
            {"key": "zone", "operator": "In", "values": ["a"]}]}]}}}), "only metadata.name"),
    "anti-affinity without topology key": (minimal_spec(podTemplate__affinity={"podAntiAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": [{"labelSelector": {}}]}}), "topologyKey"),
}


def test_a_valid_affinity_is_rendered_as_given() -> None:
    """Typed for validation only: the pod spec gets the user's affinity unchanged."""
    affinity = {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100,
                "podAffinityTerm": {"labelSelector": {"matchLabels": {"app": "x"}}, "topologyKey": "kubernetes.io/hostname"}}]}}
    spec = render.parse_spec(minimal_spec(podTemplate__affinity=affinity))
    assert spec.pod_template.affinity == affinity


def test_quantities_compare_as_kubernetes_does() -> None:
    """1500m < 2 and 512Mi < 1Gi: a request equal in value but written otherwise passes."""
    render.parse_spec(minimal_spec(podTemplate__resources={"requests": {"cpu": "1500m", "memory": "1Gi"},
                                                           "limits": {"cpu": 2, "memory": "1024Mi"}}))


def test_a_valid_spec_parses_with_defaults() -> None:
    spec = render.parse_spec(VALID)
    assert spec.membership.static is True
    assert spec.flow.max_inflight == runtime_config.FlowSettings().max_inflight
    assert spec.replicas == 1 and spec.min_replicas == 1


@pytest.mark.parametrize("case", sorted(INVALID))
def test_the_operator_refuses_what_the_crd_refuses(case: str) -> None:
    """The same rules the apiserver runs as CEL (tested against it in the integration tests)."""
    spec, field = INVALID[case]
    with pytest.raises(render.InvalidSpec) as e:
        render.parse_spec(spec)
    assert field in str(e.value)
