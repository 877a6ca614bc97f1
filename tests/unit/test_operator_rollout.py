"""The rollout and pod-failure decisions (afc.operator.rollout), from StatefulSet and pod states
as the apiserver holds them."""
from __future__ import annotations

import json
from typing import Any

import pytest

from afc.operator import rollout as ro

T0 = 1_800_000_000.0  # "now" in these tests
ISO = "2027-01-15T08:00:00Z"
TEMPLATE = "tmpl-b"


def iso(seconds_before: float) -> str:
    from datetime import datetime, timezone
    return datetime.fromtimestamp(T0 - seconds_before, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod(name: str, rev: str = "r2", ready: bool = True, waiting: str | None = None, age: float = 30,
        not_ready_for: float | None = None, phase: str = "Running", deleting: bool = False) -> dict[str, Any]:
    conditions = [{"type": "Ready", "status": "True" if ready else "False",
                   "lastTransitionTime": iso(not_ready_for if not_ready_for is not None else age)}]
    status: dict[str, Any] = {"phase": phase, "conditions": conditions}
    if waiting:
        status["containerStatuses"] = [{"name": "consumer", "ready": False, "restartCount": 4,
                                        "state": {"waiting": {"reason": waiting, "message": "back-off 40s"}}}]
    meta: dict[str, Any] = {"name": name, "creationTimestamp": iso(age), "labels": {ro.REVISION_LABEL: rev}}
    if deleting:
        meta["deletionTimestamp"] = iso(0)
    return {"metadata": meta, "status": status}


def sts(replicas: int = 3, current: str = "r1", update: str = "r2", updated: int = 1, partition: int = 0,
        generation: int = 2, observed: int = 2) -> dict[str, Any]:
    return {"metadata": {"name": "orders", "generation": generation},
            "spec": {"replicas": replicas, "updateStrategy": {"type": "RollingUpdate",
                                                              "rollingUpdate": {"partition": partition}}},
            "status": {"observedGeneration": observed, "replicas": replicas, "updatedReplicas": updated,
                       "readyReplicas": replicas, "currentRevision": current, "updateRevision": update}}


def decide(s: dict[str, Any] | None, pods: list[dict[str, Any]], held: dict[str, Any] | None = None,
           deadline: float = 600) -> ro.Step:
    return ro.decide(s, pods, template=TEMPLATE, held=held, deadline_s=deadline, now=T0, now_iso=ISO)


# ------------------------------------------------------------------------------- pod failures

@pytest.mark.parametrize("reason", ["CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull",
                                    "CreateContainerConfigError", "CreateContainerError", "InvalidImageName",
                                    "RunContainerError"])
def test_a_failing_container_is_a_pod_failure_naming_the_pod(reason: str) -> None:
    f = ro.pod_failure(pod("orders-1", ready=False, waiting=reason), T0, 600)
    assert f is not None and (f.pod, f.reason, f.revision) == ("orders-1", reason, "r2")
    assert "orders-1" in f.message and reason in f.message


def test_not_ready_is_a_failure_only_past_the_deadline_with_a_stable_message() -> None:
    assert ro.pod_failure(pod("orders-0", ready=False, not_ready_for=599), T0, 600) is None
    late = ro.pod_failure(pod("orders-0", ready=False, not_ready_for=601), T0, 600)
    assert late is not None and late.reason == ro.POD_NOT_READY and "progressDeadlineSeconds" in late.message
    # the same message a poll later: no new Event, no status write every poll
    assert ro.pod_failure(pod("orders-0", ready=False, not_ready_for=601), T0 + 30, 600) == late
    # a pod with no Ready condition yet counts from its creation
    fresh = pod("orders-0", ready=False, age=700)
    fresh["status"]["conditions"] = []
    assert ro.pod_failure(fresh, T0, 600).reason == ro.POD_NOT_READY  # type: ignore[union-attr]


def test_ready_waiting_for_other_reasons_or_terminating_pods_are_not_failures() -> None:
    assert ro.pod_failure(pod("orders-0"), T0, 600) is None
    assert ro.pod_failure(pod("orders-0", ready=False, waiting="ContainerCreating"), T0, 600) is None
    assert ro.pod_failure(pod("orders-0", ready=False, waiting="CrashLoopBackOff", deleting=True), T0, 600) is None
    assert ro.pod_failure(pod("orders-0", ready=False, phase="Failed"), T0, 600).reason == ro.POD_FAILED  # type: ignore[union-attr]


def test_degraded_names_the_first_failing_pod_and_counts_the_others() -> None:
    fs = [ro.PodFailure("orders-1", "CrashLoopBackOff", "pod orders-1 ..."),
          ro.PodFailure("orders-2", "ErrImagePull", "pod orders-2 ...")]
    assert ro.degraded([], None) is None
    reason, message = ro.degraded(fs, None)  # type: ignore[misc]
    assert reason == "CrashLoopBackOff" and message.startswith("pod orders-1") and "orders-2 ErrImagePull" in message


# ------------------------------------------------------------------------------- rollouts

def test_in_progress_is_a_new_revision_or_pods_behind_it_not_a_scale() -> None:
    assert ro.in_progress(sts())
    assert ro.in_progress(sts(current="r2", update="r2", updated=2))  # revisions equal, a pod still behind
    assert not ro.in_progress(sts(current="r2", update="r2", updated=3))
    assert not ro.in_progress(sts(generation=3, observed=2))  # not observed yet
    assert not ro.in_progress(None)


def test_a_healthy_rollout_reports_the_pod_being_rolled() -> None:
    pods = [pod("orders-0", rev="r1"), pod("orders-1", rev="r1"), pod("orders-2")]
    step = decide(sts(updated=1), pods)
    assert step.rolling and step.pod == "orders-1" and step.hold is None and not step.failures
    assert step.progressing == (True, ro.ROLLING_UPDATE, "rolling orders-1 to revision r2: 1/3 pods updated")
    assert step.status == {"currentRevision": "r1", "updateRevision": "r2", "partition": 0, "pod": "orders-1"}
    # the restarted pod not ready yet (within the deadline): it is the one being rolled
    step = decide(sts(updated=2), [pod("orders-0", rev="r1"), pod("orders-1", ready=False), pod("orders-2")])
    assert step.pod == "orders-1" and step.progressing[0] is True and step.hold is None  # type: ignore[index]


def test_a_failing_pod_of_the_new_revision_holds_the_rollout_at_its_ordinal() -> None:
    pods = [pod("orders-0", rev="r1"), pod("orders-1", rev="r1"), pod("orders-2", ready=False, waiting="CrashLoopBackOff")]
    step = decide(sts(updated=1), pods)
    assert step.new_hold and step.hold is not None
    assert (step.hold["partition"], step.hold["pod"], step.hold["reason"], step.hold["template"]) == (
        2, "orders-2", ro.ROLLOUT_HELD, TEMPLATE)
    assert step.progressing is not None and step.progressing[:2] == (False, ro.ROLLOUT_HELD)
    assert "CrashLoopBackOff" in step.hold["message"] and "held at partition 2" in step.hold["message"]
    assert ro.degraded(step.failures, step.hold)[0] == "CrashLoopBackOff"  # type: ignore[index]


def test_a_restarted_pod_not_ready_past_the_deadline_exceeds_progress() -> None:
    pods = [pod("orders-0", rev="r1"), pod("orders-1", ready=False, not_ready_for=700), pod("orders-2")]
    step = decide(sts(updated=2), pods)
    assert step.hold is not None and step.hold["partition"] == 1 and step.hold["reason"] == ro.DEADLINE_EXCEEDED
    assert step.progressing is not None and step.progressing[:2] == (False, ro.DEADLINE_EXCEEDED)


def test_a_restarted_member_that_has_not_rejoined_within_the_session_timeout_holds_the_rollout() -> None:
    """Issue 11: a restarted static member that is not back (not ready: not holding its
    assignment) within the session timeout has been dropped by the broker: stop rolling."""
    pods = [pod("orders-0", rev="r1"), pod("orders-1", ready=False, not_ready_for=50), pod("orders-2")]
    step = ro.decide(sts(updated=2), pods, template=TEMPLATE, held=None, deadline_s=600, now=T0, now_iso=ISO,
                     rejoin_s=45)
    assert step.new_hold and step.hold is not None and step.hold["partition"] == 1 and step.hold["pod"] == "orders-1"
    assert step.hold["reason"] == ro.ROLLOUT_HELD and "not rejoined" in step.hold["message"]
    assert ro.degraded(step.failures, step.hold)[0] == ro.NOT_REJOINED  # type: ignore[index]
    # within the session timeout it is still restarting: no hold
    pods[1] = pod("orders-1", ready=False, not_ready_for=30)
    assert ro.decide(sts(updated=2), pods, template=TEMPLATE, held=None, deadline_s=600, now=T0, now_iso=ISO,
                     rejoin_s=45).hold is None
    # dynamic members (no session to outlive): only the progress deadline applies
    pods[1] = pod("orders-1", ready=False, not_ready_for=50)
    assert ro.decide(sts(updated=2), pods, template=TEMPLATE, held=None, deadline_s=600, now=T0, now_iso=ISO,
                     rejoin_s=None).hold is None
    # an old-revision pod not ready is not a rejoin of this rollout
    pods = [pod("orders-0", rev="r1", ready=False, not_ready_for=50), pod("orders-1"), pod("orders-2")]
    assert ro.decide(sts(updated=2), pods, template=TEMPLATE, held=None, deadline_s=600, now=T0, now_iso=ISO,
                     rejoin_s=45).hold is None


def test_a_failing_pod_of_the_old_revision_degrades_but_does_not_hold() -> None:
    pods = [pod("orders-0", rev="r1", ready=False, waiting="CrashLoopBackOff"), pod("orders-1", rev="r1"), pod("orders-2")]
    step = decide(sts(updated=1), pods)
    assert step.hold is None and step.progressing[1] == ro.ROLLING_UPDATE  # type: ignore[index]
    assert [f.pod for f in step.failures] == ["orders-0"]


def test_a_hold_lasts_for_its_template_and_is_released_by_another() -> None:
    held = {"partition": 2, "template": TEMPLATE, "revision": "r2", "pod": "orders-2", "reason": ro.ROLLOUT_HELD,
            "message": "pod orders-2 ...; rollout of r2 held at partition 2", "since": ISO}
    # the pod recovered meanwhile: still held (the stop lasts), still Degraded, no new hold
    pods = [pod("orders-0", rev="r1"), pod("orders-1", rev="r1"), pod("orders-2")]
    step = decide(sts(updated=1, partition=2), pods, held=held)
    assert step.hold == held and not step.new_hold and step.status["held"] == held
    assert step.progressing is not None and step.progressing[:2] == (False, ro.ROLLOUT_HELD)
    assert "change the spec to release" in step.progressing[2]
    assert ro.degraded(step.failures, step.hold) == (ro.ROLLOUT_HELD, held["message"])
    # another template (a fix, or the previous spec back): released
    step = decide(sts(updated=1), pods, held={**held, "template": "tmpl-a"})
    assert step.hold is None and step.progressing[1] == ro.ROLLING_UPDATE  # type: ignore[index]
    # the rollout over: nothing left to hold
    step = decide(sts(current="r2", update="r2", updated=3), [pod(f"orders-{i}") for i in range(3)], held=held)
    assert step.hold is None and not step.rolling and step.progressing is None


def test_a_hold_outlasts_its_own_partition_write_until_the_controller_observes_it() -> None:
    """The hold's partition write makes a new generation of the StatefulSet; a reconcile a
    moment later (the watch event of that write, a pod event) sees it not yet observed. That
    says nothing about the rollout: the hold and status.rollout.held stay (dropping them wrote
    a status without `held`, and the next render undid the partition)."""
    held = {"partition": 2, "template": TEMPLATE, "revision": "r2", "pod": "orders-2", "reason": ro.ROLLOUT_HELD,
            "message": "pod orders-2 ...; rollout of r2 held at partition 2", "since": ISO}
    pods = [pod("orders-0", rev="r1"), pod("orders-1", rev="r1"), pod("orders-2", ready=False, waiting="CrashLoopBackOff")]
    step = decide(sts(updated=1, partition=2, generation=3, observed=2), pods, held=held)
    assert step.rolling and step.hold == held and not step.new_hold and step.status["held"] == held
    assert step.progressing is not None and step.progressing[:2] == (False, ro.ROLLOUT_HELD)
    assert ro.degraded(step.failures, step.hold)[0] == "CrashLoopBackOff"  # type: ignore[index]
    # a member held for not rejoining stays the reason for Degraded (no flap to RolloutHeld and back)
    pods = [pod("orders-0", rev="r1"), pod("orders-1", ready=False, not_ready_for=50), pod("orders-2")]
    rejoin = {**held, "partition": 1, "pod": "orders-1"}
    step = ro.decide(sts(updated=2, partition=1, generation=3, observed=2), pods, template=TEMPLATE, held=rejoin,
                     deadline_s=600, now=T0, now_iso=ISO, rejoin_s=45)
    assert step.hold == rejoin and ro.degraded(step.failures, step.hold)[0] == ro.NOT_REJOINED  # type: ignore[index]
    # not observed and nothing held: no rollout to report yet, as before
    step = decide(sts(current="r2", update="r2", updated=3, generation=3, observed=2), [pod(f"orders-{i}") for i in range(3)])
    assert step.hold is None and not step.rolling
    # observed and over: the hold is released
    step = decide(sts(current="r2", update="r2", updated=3, generation=3, observed=3),
                  [pod(f"orders-{i}") for i in range(3)], held=held)
    assert step.hold is None and not step.rolling


def test_a_staged_rollout_waits_at_the_spec_partition_without_holding() -> None:
    pods = [pod("orders-0", rev="r1"), pod("orders-1", rev="r1"), pod("orders-2")]
    step = decide(sts(updated=1, partition=2), pods)
    assert step.rolling and step.hold is None and step.pod is None
    assert step.progressing is not None and step.progressing[:2] == (False, ro.ROLLOUT_STAGED)


def test_the_reconcile_renders_the_hold_only_for_its_template() -> None:
    """status.rollout.held sets the StatefulSet's partition while the spec renders the template
    it held; another template (a fix, or the previous spec back) renders spec.rollout.partition."""
    from afc.operator import reconcile, render
    owner = render.Owner(name="orders", namespace="shop", uid="u1")
    spec = render.parse_spec({"image": "afc:1", "handler": {"handler": "a.b:c"},
                              "kafka": {"bootstrapServers": "k:9092", "topics": ["t"], "groupId": "g"}})

    def part(objs: list[dict[str, Any]]) -> int:
        (sts,) = [o for o in objs if o["kind"] == "StatefulSet"]
        return sts["spec"]["updateStrategy"]["rollingUpdate"]["partition"]
    objs, template, held = reconcile.rendered(owner, spec, None)
    assert part(objs) == 0 and held is None
    hold = {"partition": 2, "template": template}
    objs, same, held = reconcile.rendered(owner, spec, {"rollout": {"held": hold}})
    assert part(objs) == 2 and same == template and held == hold
    objs, _, _ = reconcile.rendered(owner, spec, {"rollout": {"held": {**hold, "template": "another"}}})
    assert part(objs) == 0


def test_a_pod_that_only_carries_the_labels_is_not_rolled() -> None:
    pods = [pod("orders-0", rev="r1"), pod("orders-1"), pod("orders-2"), pod("debug-shell", rev="r1")]
    step = decide(sts(updated=2), pods)
    assert step.pod == "orders-0" and step.hold is None


def test_a_crash_loop_is_one_failure_through_its_whole_cycle() -> None:
    """Back-off (waiting), restarted (running, not ready), back-off again with a longer delay:
    the same reason and message throughout, so Degraded does not flap nor post an Event each time."""
    last = {"terminated": {"reason": "OOMKilled", "exitCode": 137}}
    waiting = pod("orders-1", ready=False, waiting="CrashLoopBackOff")
    waiting["status"]["containerStatuses"][0]["lastState"] = last
    longer = json.loads(json.dumps(waiting))
    longer["status"]["containerStatuses"][0]["state"]["waiting"]["message"] = "back-off 2m40s"
    running = pod("orders-1", ready=False)
    running["status"]["containerStatuses"] = [{"name": "consumer", "ready": False, "restartCount": 5,
                                               "state": {"running": {}}, "lastState": last}]
    failures = {ro.pod_failure(p, T0, 600) for p in (waiting, longer, running)}
    assert len(failures) == 1
    (f,) = failures
    assert f is not None and f.reason == "CrashLoopBackOff" and "OOMKilled (code 137)" in f.message
    # a clean exit before (a rolling restart) is not a crash
    clean = pod("orders-1", ready=False)
    clean["status"]["containerStatuses"] = [{"name": "consumer", "ready": False, "restartCount": 1,
                                             "state": {"running": {}},
                                             "lastState": {"terminated": {"reason": "Completed", "exitCode": 0}}}]
    assert ro.pod_failure(clean, T0, 600) is None
