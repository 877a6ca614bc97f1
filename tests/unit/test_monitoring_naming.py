"""afc's metric names and labels against Prometheus's naming conventions
(https://prometheus.io/docs/practices/naming/): one `afc_` namespace, base units in the name
(seconds), `_total` on counters only, and labels of bounded cardinality (no per-message or
per-key labels). docs/observability.md has the review behind these rules."""
from __future__ import annotations

import re

import pytest
from prometheus_client import generate_latest

from afc.operator.metrics import OperatorMetrics
from afc.operator.scaling import REASONS
from afc.runtime.metrics import ProducerMetrics, RuntimeMetrics

# label -> why its values are bounded
BOUNDED_LABELS = {
    "error_class": "exception class names: bounded by the handler's code",
    "topic": "the consumer's subscribed topics",
    "partition": "partitions of those topics",
    "kind": "fixed sets: rebalance kind (assign/revoke/lost), route kind, operator poll error kind",
    "reason": "fixed sets: fetch controller reasons, operator scaling reasons",
    "route": "retry/dlq/poison",
    "classification": "TRANSIENT/PERMANENT/POISON",
    "group": "consumer groups a producer watches (its configuration)",
    "namespace": "the AdaptiveConsumer's namespace (operator)",
    "name": "the AdaptiveConsumer's name (operator); its series are removed when it is deleted",
    "verb": "HTTP verbs of the operator's Kubernetes API requests",
    "resource": "the Kubernetes API resources the operator reads and writes (afc.operator.kube.RESOURCES)",
}
PER_MESSAGE = re.compile(r"key|offset|message|token|member|instance|pod|id$")
TIME_WORDS = re.compile(r"(^|_)(latency|duration|age|wait|time)(_|$)")


def families() -> list:
    out = []
    for m in (RuntimeMetrics(), ProducerMetrics(), OperatorMetrics()):
        out += list(m.registry.collect())
    return out


@pytest.mark.parametrize("fam", families(), ids=lambda f: f.name)
def test_metric_follows_the_conventions(fam) -> None:
    assert fam.name.startswith("afc_"), "one namespace for all of afc's metrics"
    assert re.fullmatch(r"[a-z][a-z0-9_]*", fam.name)
    assert fam.documentation.strip(), "HELP text"
    if TIME_WORDS.search(fam.name):
        assert fam.name.endswith("_seconds"), "times in seconds, the unit in the name"
    if fam.type != "counter":
        assert not fam.name.endswith("_total"), "_total is for counters"
    assert not fam.name.endswith(("_count", "_sum", "_bucket")), "reserved for histograms' series"


def test_labels_are_bounded() -> None:
    labels_seen: set[str] = set()
    # labelled metrics expose no samples until used: read the label names from the metric objects
    for m in (RuntimeMetrics(), ProducerMetrics(), OperatorMetrics()):
        for attr in vars(m).values():
            labels_seen |= set(getattr(attr, "_labelnames", ()) or ())
    assert labels_seen <= set(BOUNDED_LABELS), f"labels without a bound: {labels_seen - set(BOUNDED_LABELS)}"
    assert not {l for l in labels_seen if PER_MESSAGE.search(l)}, "no per-message or per-key labels"


def test_counter_samples_end_in_total() -> None:
    m = RuntimeMetrics()
    m.consumed.inc()
    m.errors.labels("ValueError").inc()
    m.routed.labels("dlq", "PERMANENT").inc()
    text = generate_latest(m.registry).decode()
    assert "afc_messages_consumed_total 1.0" in text
    assert 'afc_handler_errors_total{error_class="ValueError"} 1.0' in text
    assert 'afc_routed_records_total{classification="PERMANENT",route="dlq"} 1.0' in text


def test_operator_reasons_are_a_fixed_set() -> None:
    assert len(REASONS) == len(set(REASONS)) and all(re.fullmatch(r"[A-Za-z]+", r) for r in REASONS)
