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
                          health=lambda: {"counts": counts, "lag": {"records": 7, "partitions": 2}}, pod="orders-0")
    rec = json.loads(pub.payload())
    assert rec["member"] == "ns.orders-0" and rec["pod"] == "orders-0" and rec["counts"] == counts
    assert ca.Counts.of(rec) == ca.Counts(3, 1, 0, lag=7, partitions=2)
    counts["handled"] = 4   # read at each publish, never copied into the publisher
    assert json.loads(pub.payload())["counts"]["handled"] == 4


# ------------------------------------------------------------------------------- the phases

ISO = "2027-01-15T08:00:00Z"
SPEC = SimpleNamespace(replicas=1, percent=None)


def pod(name: str, rev: str, ready: bool = True) -> dict:
    return {"metadata": {"name": name, "labels": {"controller-revision-hash": rev}},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def sts(current: str = "r1", update: str = "r2", replicas: int = 4, updated: int = 1, generation: int = 2,
        observed: int = 2) -> dict:
    return {"metadata": {"name": "orders", "generation": generation}, "spec": {"replicas": replicas},
            "status": {"observedGeneration": observed, "replicas": replicas, "updatedReplicas": updated,
                       "currentRevision": current, "updateRevision": update}}


def test_a_canary_starts_only_when_the_spec_renders_another_template() -> None:
    assert ca.current(SPEC, None, "t2", ISO) is None                      # the first apply
    assert ca.current(SPEC, {"template": "t2"}, "t2", ISO) is None        # nothing changed in the pods
    assert ca.current(None, {"template": "t1"}, "t2", ISO) is None        # not configured
    cs = ca.current(SPEC, {"template": "t1"}, "t2", ISO)
    assert cs == {"phase": ca.CANARY, "template": "t2", "startedAt": ISO}
    kept = {"phase": ca.ROLLED_BACK, "template": "t2"}
    assert ca.current(SPEC, {"template": "t2", "canary": kept}, "t2", ISO) == kept
    # the canary removed from the spec mid-canary: every pod rolls
    cs = ca.current(None, {"template": "t2", "canary": {"phase": ca.CANARY, "template": "t2"}}, "t2", ISO)
    assert cs is not None and cs["phase"] == ca.PROMOTING


def test_observe_follows_the_canary_pods_to_ready_then_judges() -> None:
    cs = {"phase": ca.CANARY, "template": "t2"}
    unobserved = ca.observe(cs, sts(generation=3, observed=2), [], canary_spec=SPEC, failures=(), now_iso=ISO)
    assert "revision" not in unobserved.canary and not unobserved.judging
    pods = [pod(f"orders-{i}", "r1") for i in range(3)] + [pod("orders-3", "r1")]
    o = ca.observe(cs, sts(), pods, canary_spec=SPEC, failures=(), now_iso=ISO)
    assert o.canary["revision"] == "r2" and o.canary["stableRevision"] == "r1" and o.canary["pods"] == ["orders-3"]
    assert not o.judging and not o.canary.get("readyAt")
    pods[3] = pod("orders-3", "r2")
    o = ca.observe(o.canary, sts(), pods, canary_spec=SPEC, failures=(), now_iso=ISO)
    assert o.judging and o.canary["readyAt"] == ISO
    assert o.canary_pods == ("orders-3",) and o.stable_pods == ("orders-0", "orders-1", "orders-2")
    assert ca.conditions(o.canary)[0][1] == ca.CANARY_HOLD  # type: ignore[index]


def test_a_failing_canary_pod_rolls_back_at_once() -> None:
    from afc.operator.rollout import PodFailure
    cs = {"phase": ca.CANARY, "template": "t2", "revision": "r2", "stableRevision": "r1"}
    pods = [pod(f"orders-{i}", "r1") for i in range(3)] + [pod("orders-3", "r2", ready=False)]
    o = ca.observe(cs, sts(), pods, canary_spec=SPEC, now_iso=ISO,
                   failures=[PodFailure("orders-3", "CrashLoopBackOff", "pod orders-3: CrashLoopBackOff", "r2")])
    assert o.changed_phase and o.canary["phase"] == ca.ROLLING_BACK and o.canary["reason"] == "CrashLoopBackOff"
    assert ca.rolls_back(o.canary)
    progressing, degraded = ca.conditions(o.canary)
    assert degraded is not None and degraded[0] == ca.CANARY_FAILED


def test_rolled_back_once_every_pod_runs_the_stable_revision_and_promoted_once_all_run_the_new() -> None:
    cs = {"phase": ca.ROLLING_BACK, "template": "t2", "revision": "r2", "stableRevision": "r1", "pods": ["orders-3"]}
    pods = [pod(f"orders-{i}", "r1") for i in range(4)]
    assert ca.observe(cs, sts(current="r1", update="r1", updated=3), pods[:3] + [pod("orders-3", "r1", False)],
                      canary_spec=SPEC, failures=(), now_iso=ISO).canary["phase"] == ca.ROLLING_BACK
    o = ca.observe(cs, sts(current="r1", update="r1", updated=4), pods, canary_spec=SPEC, failures=(), now_iso=ISO)
    assert o.canary["phase"] == ca.ROLLED_BACK
    progressing, degraded = ca.conditions(o.canary)
    assert progressing is not None and progressing[:2] == (False, ca.ROLLED_BACK_REASON) and degraded is not None
    promoting = {**cs, "phase": ca.PROMOTING}
    assert ca.observe(promoting, sts(current="r1", update="r2", updated=2), pods, canary_spec=SPEC, failures=(),
                      now_iso=ISO).canary["phase"] == ca.PROMOTING
    assert ca.observe(promoting, sts(current="r2", update="r2", updated=4), pods, canary_spec=SPEC, failures=(),
                      now_iso=ISO).canary["phase"] == ca.PROMOTED


def test_nothing_to_test_when_the_new_template_is_the_stable_revision() -> None:
    o = ca.observe({"phase": ca.CANARY, "template": "t1"}, sts(current="r1", update="r1", updated=4), [],
                   canary_spec=SPEC, failures=(), now_iso=ISO)
    assert o.canary["phase"] == ca.PROMOTED


def test_the_verdict_moves_the_phase() -> None:
    cs = {"phase": ca.CANARY, "stableRevision": "r1"}
    back = ca.decided(cs, ca.Verdict(ca.ROLLBACK, "ErrorRate", "bad", {"runs": 30, "errorRate": 1.0}), ISO)
    assert back["phase"] == ca.ROLLING_BACK and back["gates"] == {"runs": 30, "errorRate": 1.0}
    assert "rolling back to r1" in back["message"]
    assert ca.decided(cs, ca.Verdict(ca.PROMOTE, "GatesPassed", "ok", {}), ISO)["phase"] == ca.PROMOTING
    assert ca.decided(cs, ca.Verdict(ca.HOLD, ca.CANARY_HOLD, "wait", {}), ISO)["phase"] == ca.CANARY


def test_the_render_raises_the_partition_for_the_canary_and_restores_the_stable_template() -> None:
    from afc.operator import render
    from afc.operator.reconcile import rendered
    spec = AdaptiveConsumerSpec.model_validate({
        "image": "x", "replicas": 4, "maxReplicas": 8, "kafka": {"bootstrapServers": "k:9092", "groupId": "g",
                                                                  "topics": ["t"]},
        "handler": {"handler": "a:b"}, "rollout": {"canary": {"replicas": 1}}})
    owner = render.Owner("orders", "ns", "uid-1", 1)

    def the_sts(objs: list) -> dict:
        return next(o for o in objs if o["kind"] == "StatefulSet")

    objs, template, held = rendered(owner, spec, {}, {"phase": ca.CANARY, "template": "t"})
    assert the_sts(objs)["spec"]["updateStrategy"]["rollingUpdate"]["partition"] == 3
    objs, _, _ = rendered(owner, spec, {}, {"phase": ca.PROMOTING, "template": "t"})
    assert the_sts(objs)["spec"]["updateStrategy"]["rollingUpdate"]["partition"] == 0
    stable = {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "old"}]}}
    objs, _, held = rendered(owner, spec, {}, {"phase": ca.ROLLING_BACK, "template": "t"}, stable)
    assert the_sts(objs)["spec"]["template"] == stable and held is None
    assert the_sts(objs)["spec"]["updateStrategy"]["rollingUpdate"]["partition"] == 0
    # the stable template unknown: the canary's partition holds instead (nothing further rolls)
    objs, _, _ = rendered(owner, spec, {}, {"phase": ca.ROLLED_BACK, "template": "t"}, None)
    assert the_sts(objs)["spec"]["template"] != stable
    assert the_sts(objs)["spec"]["updateStrategy"]["rollingUpdate"]["partition"] == 3


def test_the_lag_gate_compares_lag_per_partition_with_the_stable_members() -> None:
    g = ca.Gates(hold_s=60, max_hold_s=300, min_runs=20, max_error_rate=1, max_dlq_rate=1, max_lag_ratio=3)

    def sample(t: float, canary_lag: int, stable_lag: int) -> ca.Sample:
        stable = {p: ca.Counts(int(t) * 10, 0, 0, lag=stable_lag, partitions=2) for p in STABLE}
        return t, {**stable, "orders-3": ca.Counts(int(t) * 10, 0, 0, lag=canary_lag, partitions=2)}
    behind = [sample(t, 2000, 100) for t in (0, 30, 60)]    # 1000/partition vs 50 (counted 100): 10x
    v = ca.judge(behind, CANARY, STABLE, g, 60)
    assert v.action == ca.ROLLBACK and v.reason == "LagRatio", v
    assert v.gates["lagPerPartition"] == 1000 and v.gates["stableLagPerPartition"] == 50
    jitter = [sample(t, 500, 20) for t in (0, 30, 60)]      # 250/partition: under 3 x the 100 floor
    assert ca.judge(jitter, CANARY, STABLE, g, 60).action == ca.PROMOTE
    assert ca.judge(behind, CANARY, STABLE, ca.Gates(max_error_rate=1, max_dlq_rate=1), 60).action == ca.PROMOTE
