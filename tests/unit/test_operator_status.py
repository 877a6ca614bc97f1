"""Conditions, rollout, lag, backoff and the operator's settings: the pure decisions."""
from __future__ import annotations

from typing import Any

import pytest

from afc.operator import cli, kafka, reconcile, status as st
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
    (sts(generation=2, observed=1), 2, True, "RollingOut"),
    (sts(updated=1, update="r2"), 2, True, "RollingOut"),
    (sts(replicas=3, ready=3, updated=3), 2, True, "ScalingDown"),
    (sts(ready=1), 2, True, "WaitingForReady"),
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


def test_not_ready_while_pods_are_not() -> None:
    assert conds(build(sts=sts(ready=1)))["Ready"] == ("False", "WaitingForReady")
    assert conds(build(sts=None))["Ready"] == ("False", "NotCreated")


def test_a_problem_degrades_and_unreadies() -> None:
    p = st.Problem(st.SECRET_NOT_FOUND, "spec.kafka.saslPasswordSecretRef: Secret ns/x not found")
    s = build(problem=p)
    assert conds(s)["Degraded"] == ("True", "SecretNotFound")
    assert conds(s)["Ready"] == ("False", "SecretNotFound")
    degraded = next(c for c in s["conditions"] if c["type"] == "Degraded")
    assert degraded["message"] == p.message


def test_transition_time_moves_only_when_status_flips() -> None:
    first = build(sts=sts(ready=1))
    same = build(previous=first, sts=sts(ready=1), now=LATER)
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


@pytest.mark.parametrize("committed,earliest,latest,reset,lag", [
    (40, 0, 100, "earliest", 60),
    (-1001, 10, 100, "earliest", 90),  # never committed: from the start
    (-1001, 10, 100, "latest", 0),     # never committed: from the end
    (5, 10, 100, "earliest", 90),      # committed offset deleted by retention
    (100, 0, 100, "earliest", 0),
])
def test_partition_lag(committed: int, earliest: int, latest: int, reset: str, lag: int) -> None:
    assert kafka.partition_lag(kafka.PartitionOffsets(committed, earliest, latest), reset) == lag


def test_lag_summary() -> None:
    parts = {("t", 0): kafka.PartitionOffsets(10, 0, 30), ("t", 1): kafka.PartitionOffsets(-1001, 0, 5)}
    assert kafka.lag_summary(parts, "earliest", NOW) == {"total": 25, "partitions": 2, "maxPartitionLag": 20,
                                                          "measuredAt": NOW}
    assert kafka.lag_summary({}, "earliest", NOW)["total"] == 0


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
