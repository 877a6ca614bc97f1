"""Every cross-field rule of the runtime's model exists as CEL in the CRD, under the same name,
and has an example refused by the runtime and by the operator (the apiserver's side:
tests/integration/test_operator_validation.py runs the same examples with --dry-run=server).

Before, the runtime's validators and the CRD's rules were written apart and drifted: a
`backpressure.heartbeatMs >= ttlMs` was accepted by the apiserver and made every pod exit 2."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from confluent_kafka import Consumer, KafkaException

from afc.operator import crd, render
from afc.runtime import config as rc
from afc.runtime.consumer import kafka_config
from config_rules_cases import RULE_EXAMPLES, merged, runtime_rules, sections_of_runtime

ROOT = Path(__file__).resolve().parents[2]
VALID_SPEC: dict[str, Any] = {"image": "example.invalid/afc-runtime:1", "handler": {"handler": "app.h:handle"},
                              "kafka": {"bootstrapServers": "kafka:9092", "topics": ["orders"], "groupId": "orders"}}


def crd_rules() -> Iterator[tuple[str, dict[str, Any]]]:
    """(path, rule) of every x-kubernetes-validations entry of the checked-in CRD's spec."""
    doc = yaml.safe_load((ROOT / "crds" / crd.CRD_FILE).read_text())
    root = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]

    def walk(node: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
        for r in node.get("x-kubernetes-validations", []):
            yield path, r
        for name, sub in (node.get("properties") or {}).items():
            yield from walk(sub, f"{path}.{name}")
        if isinstance(node.get("items"), dict):
            yield from walk(node["items"], f"{path}[]")
    yield from walk(root, ".spec")


def test_the_runtime_has_no_cross_field_validator_outside_the_named_rules() -> None:
    """A bare model_validator would be a rule the CRD cannot carry: only `Section._rules` (and
    RuntimeSettings'), which runs the named rules, may exist."""
    for cls in [rc.RuntimeSettings, *sections_of_runtime()]:
        validators = set(cls.__pydantic_decorators__.model_validators)
        assert validators == {"_rules"}, f"{cls.__name__}: model validators {validators}; write a Rule instead"


def test_every_runtime_rule_is_a_cel_rule_of_the_crd_with_the_same_name() -> None:
    """The two sets are equal: the runtime's rules by name, and the CRD rules found at each
    rule's section carrying its CEL, message and field."""
    wanted = runtime_rules()
    found = {name for name, (path, r) in wanted.items()
             if (path, r.schema()) in list(crd_rules())}
    assert found == set(wanted), f"missing in crds/ (run `make crds`): {sorted(set(wanted) - found)}"


def test_every_rule_has_an_invalid_example() -> None:
    assert set(RULE_EXAMPLES) == set(runtime_rules())


@pytest.mark.parametrize("name", sorted(RULE_EXAMPLES))
def test_each_example_is_refused_by_the_runtime_and_by_the_operator(name: str) -> None:
    sections, field = RULE_EXAMPLES[name]
    _, rule = runtime_rules()[name]
    with pytest.raises(rc.ConfigError) as e:
        rc.load_settings(**sections)
    assert f"{field} (AFC_" in str(e.value) and rule.message in str(e.value), str(e.value)
    with pytest.raises(render.InvalidSpec) as e2:
        render.parse_spec(merged(VALID_SPEC, sections))
    assert f"spec.{field}: " in str(e2.value) and rule.message in str(e2.value), str(e2.value)


def test_the_valid_spec_passes_both() -> None:
    render.parse_spec(VALID_SPEC)
    rc.load_settings(kafka={"extra": {"partition.assignment.strategy": "range", "fetch.wait.max.ms": "50"}},
                     membership={"sessionTimeoutMs": 300_000, "maxPollIntervalMs": 300_000})


def test_extra_names_the_refused_properties() -> None:
    with pytest.raises(rc.ConfigError) as e:
        rc.load_settings(kafka={"extra": {"group.instance.id": "x", "sasl.oauthbearer.config": "s", "debug": "all"}})
    assert "group.instance.id, sasl.oauthbearer.config: not allowed" in str(e.value)
    assert "debug" not in str(e.value).split(":")[1]


@pytest.mark.parametrize("prop", ["bootstrap.servers", "group.id", "group.instance.id", "enable.auto.commit",
                                  "enable.auto.offset.store", "auto.commit.interval.ms", "session.timeout.ms",
                                  "heartbeat.interval.ms", "max.poll.interval.ms", "security.protocol",
                                  "sasl.mechanism", "sasl.username", "sasl.password", "sasl.oauthbearer.config",
                                  "sasl.oauthbearer.client.secret", "ssl.key.password", "ssl.key.pem",
                                  "ssl.keystore.password", "ssl.ca.location", "group.protocol", "group.remote.assignor",
                                  "plugin.library.paths", "fetch.max.bytes", "auto.offset.reset"])
def test_extra_refuses_what_afc_owns_or_a_secret(prop: str) -> None:
    """The issue's list and its neighbours: each would override afc's own setting (applied last)
    or put a secret into a ConfigMap."""
    assert prop not in rc.KAFKA_EXTRA_ALLOWED
    with pytest.raises(rc.ConfigError):
        rc.load_settings(kafka={"extra": {prop: "x"}})
    with pytest.raises(render.InvalidSpec):
        render.parse_spec(merged(VALID_SPEC, {"kafka": {"extra": {prop: "x"}}}))


@pytest.mark.parametrize("prop", rc.KAFKA_EXTRA_ALLOWED)
def test_every_allowed_property_is_one_librdkafka_knows(prop: str) -> None:
    """An allow-listed name librdkafka does not know would make every pod fail at start."""
    try:  # a string property takes any value, a typed one refuses this value: either way, not the name
        Consumer({"group.id": "g", prop: "\x01not-a-value"}).close()
    except KafkaException as e:
        assert "No such configuration property" not in str(e), e
    # an unknown name, for comparison, is refused as such
    with pytest.raises(KafkaException, match="No such configuration property"):
        Consumer({"group.id": "g", prop + ".nope": "1"}).close()


# settings the model accepts at its edges -> librdkafka must accept the configuration built from them
EDGES = {
    "session equals max poll": {"membership": {"sessionTimeoutMs": 300_000, "maxPollIntervalMs": 300_000}},
    "least session": {"membership": {"sessionTimeoutMs": 6_000, "maxPollIntervalMs": 10_000}},
    "consumer protocol, short max poll": {"membership": {"groupProtocol": "consumer", "maxPollIntervalMs": 10_000}},
    "eager assignor": {"kafka": {"extra": {"partition.assignment.strategy": "range"}}},
    "roundrobin": {"kafka": {"extra": {"partition.assignment.strategy": "roundrobin"}}},
    "tuning": {"kafka": {"extra": {"fetch.wait.max.ms": "100", "isolation.level": "read_uncommitted",
                                   "client.rack": "zone-a", "debug": "consumer"}}},
}


@pytest.mark.parametrize("case", sorted(EDGES))
def test_what_the_model_accepts_librdkafka_accepts(case: str) -> None:
    s = rc.load_settings(**merged({"kafka": {"bootstrapServers": "127.0.0.1:1", "topics": ["t"]}}, EDGES[case]))
    Consumer(kafka_config(s, "ns.pod-0")).close()


# what the issue found librdkafka refusing at start -> the model refuses it first
REFUSED_BY_LIBRDKAFKA = {
    "session above max poll": {"membership": {"sessionTimeoutMs": 600_000, "maxPollIntervalMs": 300_000}},
    "assignor with the consumer protocol": {"kafka": {"extra": {"partition.assignment.strategy": "range"}},
                                            "membership": {"groupProtocol": "consumer"}},
    "mixed assignors": {"kafka": {"extra": {"partition.assignment.strategy": "range,cooperative-sticky"}}},
}


@pytest.mark.parametrize("case", sorted(REFUSED_BY_LIBRDKAFKA))
def test_what_librdkafka_refuses_the_model_refuses(case: str) -> None:
    sections = merged({"kafka": {"bootstrapServers": "127.0.0.1:1", "topics": ["t"]}}, REFUSED_BY_LIBRDKAFKA[case])
    with pytest.raises(rc.ConfigError):
        rc.load_settings(**sections)
    # built without the model's check, librdkafka refuses it: the rule is not stricter than needed
    with pytest.raises(KafkaException):
        Consumer(kafka_config(unchecked(sections), "ns.pod-0")).close()


def unchecked(sections: dict[str, Any]) -> rc.RuntimeSettings:
    """Settings built without validation (model_construct), to hand librdkafka what the model refuses."""
    def section(cls: type[rc.Section], name: str) -> Any:
        given = {rc.to_snake(k): v for k, v in sections.get(name, {}).items()}
        return cls.model_construct(**{**cls().model_dump(), **given})
    return rc.RuntimeSettings.model_construct(kafka=section(rc.KafkaSettings, "kafka"),
                                              membership=section(rc.MembershipSettings, "membership"))


def test_session_below_the_brokers_minimum_is_refused() -> None:
    """group.min.session.timeout.ms is 6000 by default: a shorter session fails the JoinGroup."""
    with pytest.raises(rc.ConfigError, match="membership.sessionTimeoutMs"):
        rc.load_settings(membership={"sessionTimeoutMs": 1_000})
    with pytest.raises(render.InvalidSpec, match="spec.membership.sessionTimeoutMs"):
        render.parse_spec(merged(VALID_SPEC, {"membership": {"sessionTimeoutMs": 1_000}}))


def test_rule_names_are_unique_across_the_runtime_and_the_api() -> None:
    """A name identifies one rule; the API's own (`crd_rules`) share the namespace."""
    api = [r.name for cls in vars(crd).values() if isinstance(cls, type) and "crd_rules" in vars(cls)
           for r in vars(cls)["crd_rules"] if r not in rc.RuntimeSettings.rules]
    names = api + list(runtime_rules())
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    assert len(api) >= 20


def test_an_error_in_a_librdkafka_property_names_it_as_written() -> None:
    """kafka.extra's keys are librdkafka's names: an error names the key as the user wrote it
    and the one environment variable that holds the whole map (it read
    `kafka.extra.socket.Timeout.Ms (AFC_KAFKA__EXTRA__SOCKET.TIMEOUT.MS)` before)."""
    with pytest.raises(rc.ConfigError) as e:
        rc.load_settings(kafka={"extra": {"socket.timeout.ms": [1]}})
    assert "kafka.extra[socket.timeout.ms] (AFC_KAFKA__EXTRA): " in str(e.value)
    assert "Timeout" not in str(e.value)
    assert rc.field_label(("membership", "session_timeout_ms")) == \
        "membership.sessionTimeoutMs (AFC_MEMBERSHIP__SESSION_TIMEOUT_MS)"
    with pytest.raises(render.InvalidSpec) as s:          # the operator: the key in brackets, as kubectl
        render.parse_spec(merged(VALID_SPEC, {"kafka": {"extra": {"socket.timeout.ms": [1]}}}))
    assert str(s.value).startswith("spec.kafka.extra[socket.timeout.ms]: ")
