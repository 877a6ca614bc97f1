"""One invalid example per cross-field rule of the runtime's model (afc.runtime.config.Rule),
shared by the unit test (pydantic refuses it: the runtime at start, the operator on a spec)
and the integration test (the apiserver refuses it with `kubectl apply --dry-run=server`).
tests/unit/test_config_rules.py asserts the examples cover exactly the rules there are, so a
new rule cannot be added without showing both sides refuse it."""
from __future__ import annotations

import copy
from typing import Any

from afc.runtime.config import KafkaSettings, RuntimeSettings, Rule, Section

# rule name -> (sections to merge into a valid spec / the runtime's settings, the field named)
RULE_EXAMPLES: dict[str, tuple[dict[str, Any], str]] = {
    "kafka-extra-allowed": ({"kafka": {"extra": {"enable.auto.commit": "true", "fetch.wait.max.ms": "100"}}},
                            "kafka.extra"),
    "kafka-extra-assignor": ({"kafka": {"extra": {"partition.assignment.strategy": "range,cooperative-sticky"}}},
                             "kafka.extra"),
    "kafka-extra-assignor-classic": ({"kafka": {"extra": {"partition.assignment.strategy": "range"}},
                                      "membership": {"groupProtocol": "consumer"}}, "kafka.extra"),
    "membership-session-within-poll": ({"membership": {"sessionTimeoutMs": 600_000, "maxPollIntervalMs": 300_000}},
                                       "membership.sessionTimeoutMs"),
    "flow-inflight-bounds": ({"flow": {"minInflight": 100, "maxInflight": 10}}, "flow.minInflight"),
    "flow-batch-bounds": ({"flow": {"minBatch": 500, "maxBatch": 10}}, "flow.minBatch"),
    "flow-initial-inflight": ({"flow": {"maxInflight": 50, "initialInflight": 60}}, "flow.initialInflight"),
    "flow-concurrency-bounds": ({"flow": {"workers": 8, "minConcurrency": 16}}, "flow.minConcurrency"),
    "flow-initial-concurrency": ({"flow": {"workers": 8, "initialConcurrency": 9}}, "flow.initialConcurrency"),
    "backpressure-beat-within-ttl": ({"backpressure": {"ttlMs": 3_000, "heartbeatMs": 3_000}},
                                     "backpressure.heartbeatMs"),
    "handler-one-target": ({"handler": {"handler": "app.h:handle", "httpSinkUrl": "http://sink:8080/"}},
                           "handler.handler"),
    "routing-distinct-suffixes": ({"routing": {"dlqSuffix": ".retry"}}, "routing.dlqSuffix"),
    "routing-backoff-bounds": ({"routing": {"backoffInitialMs": 10_000, "backoffMaxMs": 10}},
                               "routing.backoffMaxMs"),
}


def runtime_rules() -> dict[str, tuple[str, Rule]]:
    """Every rule of the runtime's model: name -> (where the CRD must carry it, the rule).
    The place is the spec's path of the section (`.spec.flow`), `.spec` for RuntimeSettings'."""
    out: dict[str, tuple[str, Rule]] = {}

    def add(path: str, rules: tuple[Rule, ...]) -> None:
        for r in rules:
            assert r.name not in out, f"two rules named {r.name}"
            out[r.name] = (path, r)

    add(".spec", RuntimeSettings.rules)
    for name, field in RuntimeSettings.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, Section):
            add(f".spec.{field.alias or name}", field.annotation.rules)
    return out


def sections_of_runtime() -> list[type[Section]]:
    return [f.annotation for f in RuntimeSettings.model_fields.values()
            if isinstance(f.annotation, type) and issubclass(f.annotation, Section)]


def merged(base: dict[str, Any], sections: dict[str, Any]) -> dict[str, Any]:
    """`sections` deep-merged into a copy of `base`."""
    out = copy.deepcopy(base)
    for k, v in sections.items():
        out[k] = merged(out.get(k) or {}, v) if isinstance(v, dict) and k != "extra" else copy.deepcopy(v)
    return out


assert KafkaSettings.rules  # the import is the model under test, not a copy
