"""The canary's verdict (afc.operator.canary) over synthetic windows of member health records."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from afc.operator import canary as ca
from afc.operator.crd import AdaptiveConsumerSpec

G = ca.Gates(hold_s=60, max_hold_s=300, min_runs=20, max_error_rate=0.05, max_dlq_rate=0.01)
CANARY, STABLE = ["orders-3"], ["orders-0", "orders-1", "orders-2"]


def window(per_s: dict[str, tuple[int, int, int]], seconds: int = 60, step: int = 10,
           start: dict[str, ca.Counts] | None = None) -> list[ca.Sample]:
    """Samples every `step` seconds; each pod's counters grow by (handled, failed, dlq) per second."""
    out = []
    for t in range(0, seconds + 1, step):
        counts = {}
        for pod, (h, f, d) in per_s.items():
            base = (start or {}).get(pod, ca.Counts())
            counts[pod] = ca.Counts(base.handled + h * t, base.failed + f * t, base.dead_lettered + d * t)
        out.append((float(t), counts))
    return out


def healthy_stable() -> dict[str, tuple[int, int, int]]:
    return {p: (10, 0, 0) for p in STABLE}


def test_a_healthy_canary_is_promoted_after_the_hold() -> None:
    w = window({**healthy_stable(), "orders-3": (10, 0, 0)}, start={"orders-3": ca.Counts(5000, 3, 1)})
    v = ca.judge(w, CANARY, STABLE, G, elapsed_s=60)
    assert v.action == ca.PROMOTE, v
    assert v.gates["runs"] == 600 and v.gates["errorRate"] == 0.0 and v.gates["stableRuns"] == 1800


def test_a_healthy_canary_holds_until_hold_seconds() -> None:
    w = window({**healthy_stable(), "orders-3": (10, 0, 0)}, seconds=30)
    v = ca.judge(w, CANARY, STABLE, G, elapsed_s=30)
    assert v.action == ca.HOLD and v.reason == ca.CANARY_HOLD


def test_a_failing_canary_is_rolled_back_at_once_with_enough_runs() -> None:
    w = window({**healthy_stable(), "orders-3": (0, 5, 0)}, seconds=10)
    v = ca.judge(w, CANARY, STABLE, G, elapsed_s=10)
    assert v.action == ca.ROLLBACK and v.reason == "ErrorRate", v
    assert v.gates["errorRate"] == 1.0 and v.gates["stableErrorRate"] == 0.0


def test_a_canary_that_dead_letters_is_rolled_back() -> None:
    # Handler "succeeds" from the loop's view only after routing: failed runs are few, DLQ many.
    w = window({**healthy_stable(), "orders-3": (98, 2, 2)}, seconds=60)
    v = ca.judge(w, CANARY, STABLE, ca.Gates(hold_s=60, max_hold_s=300, min_runs=20, max_error_rate=0.05,
                                                max_dlq_rate=0.01), elapsed_s=60)
    assert v.action == ca.ROLLBACK and v.reason == "DlqRate", v


def test_the_relative_gate_compares_with_the_stable_members() -> None:
    g = ca.Gates(hold_s=60, max_hold_s=300, min_runs=20, max_error_rate=0.5, max_error_rate_ratio=2.0,
                 max_dlq_rate=1.0)
    # canary 10% errors, stable 1%: 10x the stable rate -> rolled back
    w = window({**{p: (99, 1, 0) for p in STABLE}, "orders-3": (90, 10, 0)})
    assert ca.judge(w, CANARY, STABLE, g, 60).reason == "ErrorRateRatio"
    # the same canary while the stable members fail as much (a downstream outage): promoted
    w = window({**{p: (90, 10, 0) for p in STABLE}, "orders-3": (90, 10, 0)})
    assert ca.judge(w, CANARY, STABLE, g, 60).action == ca.PROMOTE


def test_not_enough_data_holds_then_fails_safe_at_the_deadline() -> None:
    idle = window({**healthy_stable(), "orders-3": (0, 0, 0)}, seconds=60)
    assert ca.judge(idle, CANARY, STABLE, G, elapsed_s=120).action == ca.HOLD
    v = ca.judge(idle, CANARY, STABLE, G, elapsed_s=300)
    assert v.action == ca.ROLLBACK and v.reason == "InsufficientData", v
    # a canary whose record never appears (not publishing) is no evidence either
    missing = window(healthy_stable(), seconds=60)
    assert ca.judge(missing, CANARY, STABLE, G, elapsed_s=300).reason == "InsufficientData"


def test_a_restarted_canary_process_counts_from_zero() -> None:
    samples: list[ca.Sample] = [(0.0, {"orders-3": ca.Counts(1000, 0, 0)}), (10.0, {"orders-3": ca.Counts(1100, 0, 0)}),
                                (20.0, {"orders-3": ca.Counts(30, 0, 0)}), (30.0, {"orders-3": ca.Counts(60, 0, 0)})]
    assert ca.totals(samples, ["orders-3"]) == ca.Counts(100 + 30 + 30, 0, 0)


def test_canary_size_and_partition() -> None:
    assert ca.canary_size(SimpleNamespace(replicas=None, percent=None), 4) == 1
    assert ca.canary_size(SimpleNamespace(replicas=2, percent=None), 4) == 2
    assert ca.canary_size(SimpleNamespace(replicas=9, percent=None), 4) == 4
    assert ca.canary_size(SimpleNamespace(replicas=None, percent=10), 4) == 1
    assert ca.canary_size(SimpleNamespace(replicas=None, percent=50), 5) == 3
    assert ca.canary_partition(SimpleNamespace(replicas=1, percent=None), 4) == 3


def test_records_map_to_pods_by_instance_id_or_pod() -> None:
    records = {"ns.orders-0": {"level": 0, "counts": {"handled": 5, "failed": 1, "deadLettered": 0}},
               "dyn:12:ab": {"pod": "orders-1", "counts": {"handled": 2}},
               "ns.orders-2": {"level": 0},   # an older runtime: no counters
               "other.orders-3": {"counts": {"handled": 1}}}
    assert ca.pods_by_member("ns", records) == {"orders-0": ca.Counts(5, 1, 0), "orders-1": ca.Counts(2, 0, 0)}


def test_the_spec_validates_the_canary_block() -> None:
    base = {"image": "x", "kafka": {"bootstrapServers": "k:9092", "groupId": "g", "topics": ["t"]},
            "handler": {"handler": "a:b"}}
    spec = AdaptiveConsumerSpec.model_validate({**base, "rollout": {"canary": {}}})
    assert spec.rollout.canary is not None and spec.rollout.canary.hold_seconds == 60
    assert ca.Gates.of(spec.rollout.canary) == ca.Gates()
    for bad in ({"replicas": 1, "percent": 10}, {"holdSeconds": 100, "maxHoldSeconds": 50}, {"replicas": 0},
                {"maxErrorRate": 2}):
        with pytest.raises(ValueError):
            AdaptiveConsumerSpec.model_validate({**base, "rollout": {"canary": bad}})


def test_the_member_record_carries_the_counters_and_the_pod() -> None:
    from afc.runtime.backpressure import LevelRule, SignalPublisher
    counts = {"handled": 3, "failed": 1, "deadLettered": 0}
    pub = SignalPublisher("redis://127.0.0.1:1/0", "afc", "g", "ns.orders-0", LevelRule(200, 0.2), 3000, 1000,
                          counts=lambda: counts, pod="orders-0")
    rec = json.loads(pub.payload())
    assert rec["member"] == "ns.orders-0" and rec["pod"] == "orders-0" and rec["counts"] == counts
    counts["handled"] = 4   # read at each publish, never copied into the publisher
    assert json.loads(pub.payload())["counts"]["handled"] == 4
