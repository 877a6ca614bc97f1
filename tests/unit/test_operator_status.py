"""Conditions, rollout, lag, backoff and the operator's settings: the pure decisions."""
from __future__ import annotations

from typing import Any

import pytest

import time

from afc.operator import cli, kafka, reconcile, rollout as ro, status as st
from afc.operator.scaling import Observation, Offsets
from afc.operator.settings import OperatorSettings

NOW, LATER = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"


def sts(replicas: int = 2, ready: int = 2, updated: int = 2, generation: int = 1, observed: int = 1,
        current: str = "r1", update: str = "r1") -> dict[str, Any]:
    return {"metadata": {"generation": generation},
            "status": {"replicas": replicas, "readyReplicas": ready, "updatedReplicas": updated,
                       "observedGeneration": observed, "currentRevision": current, "updateRevision": update}}


@pytest.mark.parametrize("obj,desired,progressing,reason", [
    (None, 2, False, "NotCreated"),
    (sts(), 2, False, "RolloutComplete"),
    (sts(generation=2, observed=1), 2, True, "RollingUpdate"),
    (sts(updated=1, update="r2"), 2, True, "RollingUpdate"),
    (sts(replicas=3, ready=3, updated=3), 2, True, "ScalingDown"),
    (sts(ready=1), 2, True, "WaitingForReady"),
    (sts(replicas=1, ready=1, updated=1), 2, True, "ScalingUp"),
    (sts(replicas=0, ready=0, updated=0), 0, False, "RolloutComplete"),
])
def test_rollout(obj: dict[str, Any] | None, desired: int, progressing: bool, reason: str) -> None:
    ro = st.rollout(obj, desired)
    assert (ro.progressing, ro.reason) == (progressing, reason)


def conds(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def build(**kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = dict(previous=None, generation=4, desired=2, selector="a=b", sts=sts(), problem=None,
                                lag=None, now=NOW)
    args.update(kw)
    return st.build_status(**args)


def test_ready_when_all_desired_replicas_are_ready() -> None:
    s = build()
    assert conds(s) == {"Ready": ("True", "Available"), "Progressing": ("False", "RolloutComplete"),
                        "Degraded": ("False", "AsExpected")}
    assert s["observedGeneration"] == 4 and s["desiredReplicas"] == 2 and s["replicas"] == 2
    assert all(c["observedGeneration"] == 4 for c in s["conditions"])
    assert [c["type"] for c in s["conditions"]] == ["Ready", "Progressing", "Degraded"]


def test_ready_means_consuming_and_does_not_flap_on_scale_or_rollout() -> None:
    assert conds(build(sts=sts(ready=0)))["Ready"] == ("False", "NoReadyReplica")
    assert conds(build(sts=None))["Ready"] == ("False", "NotCreated")
    # scaling 2 -> 6: two pods consume while four start; Progressing carries the scale
    up = build(desired=6, sts=sts(replicas=6, ready=2, updated=6))
    assert conds(up)["Ready"] == ("True", "Available") and conds(up)["Progressing"] == ("True", "WaitingForReady")
    # a rollout: still consuming
    rolling = build(sts=sts(updated=1, update="r2"))
    assert conds(rolling)["Ready"] == ("True", "Available") and conds(rolling)["Progressing"] == ("True", "RollingUpdate")
    assert conds(build(desired=0, sts=sts(replicas=0, ready=0, updated=0)))["Ready"] == ("True", "ScaledToZero")


def test_status_patch_removes_stale_keys_and_is_empty_when_unchanged() -> None:
    measured = build(lag={"total": 5, "partitions": 3, "maxPartitionLag": 4, "measuredAt": NOW})
    failed = build(previous=measured, lag={"error": "lag of group g: timed out", "measuredAt": LATER}, now=LATER)
    patch = st.merge_patch(measured, failed)
    assert patch["lag"] == {"total": None, "partitions": None, "maxPartitionLag": None,
                            "error": "lag of group g: timed out", "measuredAt": LATER}
    recovered = build(previous=failed, lag={"total": 0, "partitions": 3, "maxPartitionLag": 0, "measuredAt": LATER},
                      now=LATER)
    assert st.merge_patch(failed, recovered)["lag"]["error"] is None
    assert st.merge_patch(recovered, recovered) == {}
    assert st.merge_patch({"a": {"b": 1}}, {}) == {"a": None}


def test_scaling_conditions_are_added_beside_the_base_three() -> None:
    s = build(extra={"conditions": {st.STALLED: (True, "PartitionsStalled", "t/0")}, "scaling": {"mode": "Lag"}})
    assert [c["type"] for c in s["conditions"]] == ["Ready", "Progressing", "Degraded", "Stalled"]
    assert s["scaling"] == {"mode": "Lag"}
    again = build(previous=s)  # a reconcile that is not a poll keeps them
    assert conds(again)["Stalled"] == ("True", "PartitionsStalled") and again["scaling"] == {"mode": "Lag"}


def test_a_problem_degrades_and_unreadies() -> None:
    p = st.Problem(st.SECRET_NOT_FOUND, "spec.kafka.saslPasswordSecretRef: Secret ns/x not found")
    s = build(problem=p)
    assert conds(s)["Degraded"] == ("True", "SecretNotFound")
    assert conds(s)["Ready"] == ("False", "SecretNotFound")
    degraded = next(c for c in s["conditions"] if c["type"] == "Degraded")
    assert degraded["message"] == p.message


def test_transition_time_moves_only_when_status_flips() -> None:
    first = build(sts=sts(ready=0))
    same = build(previous=first, sts=sts(ready=0), now=LATER)
    flipped = build(previous=first, now=LATER)
    ready = lambda s: next(c for c in s["conditions"] if c["type"] == "Ready")  # noqa: E731
    assert ready(same)["lastTransitionTime"] == NOW
    assert ready(flipped)["lastTransitionTime"] == LATER


def test_status_keeps_fields_other_writers_own_and_an_unchanged_lag_keeps_its_time() -> None:
    lag = {"total": 5, "partitions": 3, "maxPartitionLag": 4, "measuredAt": NOW}
    first = build(lag=lag)
    first["scaling"] = {"lastDecision": "up"}
    again = build(previous=first, lag={**lag, "measuredAt": LATER}, now=LATER)
    assert again["lag"]["measuredAt"] == NOW and again["scaling"] == {"lastDecision": "up"}
    moved = build(previous=first, lag={**lag, "total": 6, "measuredAt": LATER}, now=LATER)
    assert moved["lag"] == {**lag, "total": 6, "measuredAt": LATER}
    assert build(previous=first, lag=None)["lag"] == first["lag"]  # not measured: the last value stays


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [st.backoff(r, 1, 20) for r in range(7)] == [1, 2, 4, 8, 16, 20, 20]
    assert st.backoff(10_000, 0.5, 60) == 60


def test_lag_summary() -> None:
    o = Observation(0, {("t", 0): Offsets(10, 0, 30), ("t", 1): Offsets(None, 0, 5)})
    assert kafka.lag_summary(o, "earliest", NOW) == {"total": 25, "partitions": 2, "maxPartitionLag": 20,
                                                      "measuredAt": NOW}
    assert kafka.lag_summary(o, "latest", NOW, seconds=1.26)["seconds"] == 1.3
    assert kafka.lag_summary(Observation(0, {}), "earliest", NOW)["total"] == 0


def test_departing_members_are_the_highest_ordinals() -> None:
    assert reconcile.departed_pods("orders", 4, 2) == ["orders-2", "orders-3"]
    assert reconcile.departed_pods("orders", 2, 4) == []


def test_rolling_out_is_a_new_revision_not_a_scale() -> None:
    def s(**kw: Any) -> dict[str, Any]:
        o = sts(**{k: v for k, v in kw.items() if k != "spec_replicas"})
        o["spec"] = {"replicas": kw.get("spec_replicas", 2)}
        return o
    assert not ro.in_progress(s(replicas=4, ready=2, updated=4, spec_replicas=4))
    assert ro.in_progress(s(updated=1, update="r2"))
    assert not ro.in_progress(None)


def test_one_admin_client_per_cluster() -> None:
    cache = kafka.ClientCache(timeout_s=1, idle_s=60)
    conf = {"bootstrap.servers": "127.0.0.1:1", "security.protocol": "PLAINTEXT", "socket.timeout.ms": 1000}
    a = cache.admin(conf)
    assert cache.admin(dict(conf)) is a and len(cache) == 1 and cache.created == 1
    other = cache.admin({**conf, "sasl.password": "x"})   # other credentials: another client
    assert other is not a and len(cache) == 2
    assert cache.sweep(now=time.monotonic() + 120) == 2 and len(cache) == 0


def test_applied_change_tells_spec_changes_from_status_writes() -> None:
    before = {"metadata": {"resourceVersion": "1", "generation": 1}}
    assert not reconcile.applied_change(before, before, [])
    assert reconcile.applied_change(before, {"metadata": {"resourceVersion": "2", "generation": 2}}, [])
    assert not reconcile.applied_change(before, {"metadata": {"resourceVersion": "2", "generation": 1}}, [])
    assert reconcile.applied_change(before, {"metadata": {"resourceVersion": "2", "generation": 1}}, [".metadata.labels"])
    cm = {"metadata": {"resourceVersion": "1"}}
    assert reconcile.applied_change(cm, {"metadata": {"resourceVersion": "2"}}, [])


def test_status_is_stale_when_the_statefulset_moved() -> None:
    current = build()
    assert not reconcile.status_stale(current, sts(), 2)
    assert reconcile.status_stale(current, sts(ready=1), 2)
    assert reconcile.status_stale(None, sts(), 2)


def test_settings_scope(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AFC_OPERATOR_NAMESPACES", "a, b,")
    assert OperatorSettings().namespaces == ["a", "b"]
    monkeypatch.delenv("AFC_OPERATOR_NAMESPACES")
    with pytest.raises(ValueError, match="no namespace to serve"):
        OperatorSettings()
    with pytest.raises(ValueError, match="either"):
        OperatorSettings(namespaces=["a"], all_namespaces=True)
    monkeypatch.setenv("AFC_OPERATOR_ALL_NAMESPACES", "true")
    assert OperatorSettings().all_namespaces
    # a flag wins over the environment
    cfg = cli.load_settings(cli.parse_args(["-n", "team-a", "--liveness", "none"]))
    assert cfg.namespaces == ["team-a"] and not cfg.all_namespaces and cfg.liveness_endpoint is None


def test_cli_refuses_to_start_without_a_scope(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for k in ("AFC_OPERATOR_NAMESPACES", "AFC_OPERATOR_ALL_NAMESPACES"):
        monkeypatch.delenv(k, raising=False)
    assert cli.main([]) == 2
    assert "no namespace to serve" in capsys.readouterr().err
