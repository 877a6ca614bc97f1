"""Rollouts and failing pods on the test bed: the operator (`afc-operator` subprocess) against the
real apiserver, controller-manager (the StatefulSet controller rolls the pods) and Kafka.

There is no kubelet: the tests report pod states through the status subresource as a kubelet
would (`mark_pods_ready`, `set_container_waiting`, `set_container_running`).
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from afc.operator.kube import Kube
from afc.operator.testing import (OperatorProcess, delete_consumers, mark_pods_ready, set_container_running,
                                  set_container_waiting)
from afctest import Testbed
from operator_bed import (FAST, SELECTOR, admin, condition, config_of, configs, consumer, event_messages,
                          event_reasons, get, kubectl_apply, ready, serve_this_crd)

pytestmark = [pytest.mark.k8s, pytest.mark.kafka]

REVISION = "controller-revision-hash"


@pytest.fixture
def operator(testbed: Testbed, crd_installed: None, namespace: str, names, tmp_path: Path) -> Iterator[OperatorProcess]:
    # spec.rollout and status.rollout are new: another checkout's session may have applied an older CRD
    serve_this_crd(testbed, namespace, consumer(testbed, names, "probe", rollout={"partition": 0}))
    with OperatorProcess(["--namespace", namespace], testbed.kubeconfig, tmp_path / "operator.log", env=FAST) as op:
        yield op
        delete_consumers(admin(testbed), namespace)


def pods(core, namespace: str) -> dict[str, Any]:
    return {p.metadata.name: p for p in core.list_namespaced_pod(namespace, label_selector=SELECTOR.format(name="orders")).items}


def revision_of(core, namespace: str, pod: str) -> str | None:
    p = pods(core, namespace).get(pod)
    return None if p is None or p.metadata.deletion_timestamp else p.metadata.labels.get(REVISION)


def sts_status(api: Kube, namespace: str) -> dict[str, Any]:
    return get(api, "StatefulSet", namespace, "orders")["status"]


def partition(api: Kube, namespace: str) -> int:
    return get(api, "StatefulSet", namespace, "orders")["spec"]["updateStrategy"]["rollingUpdate"]["partition"]


def changed(obj: dict[str, Any], **spec: Any) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    out["spec"].update(spec)
    return out


# ---------------------------------------------------------------------------------------------

def test_a_crashlooping_pod_degrades_the_consumer_naming_it(testbed: Testbed, api: Kube, core,
                                                            operator: OperatorProcess, namespace: str, names,
                                                            make_topic) -> None:
    """A kubelet's CrashLoopBackOff on one pod: Degraded=True, reason CrashLoopBackOff, the pod
    named, a Warning Event; the pod running again: Degraded=False and a Recovered Event. Reported
    at once (the pod is watched), not at the next poll (every 60 s here)."""
    kubectl_apply(testbed, namespace, consumer(testbed, names, make_topic("orders"), scaling={"pollIntervalS": 60}))
    ready(api, core, operator, namespace)
    set_container_waiting(core, namespace, "orders-1", "CrashLoopBackOff",
                          "back-off 20s restarting failed container=consumer pod=orders-1")
    ac = operator.wait_until(lambda: (a := get(api, "AdaptiveConsumer", namespace, "orders"))
                             and condition(a, "Degraded").get("status") == "True" and a, 10, "Degraded")
    degraded = condition(ac, "Degraded")
    assert degraded["reason"] == "CrashLoopBackOff" and "orders-1" in degraded["message"], degraded
    messages = operator.wait_until(lambda: event_messages(testbed, namespace, "CrashLoopBackOff"), 15, "the Event")
    assert any("orders-1" in m for m in messages), messages
    assert get(api, "StatefulSet", namespace, "orders")["spec"]["replicas"] == 2  # nothing else changed
    assert partition(api, namespace) == 0  # no rollout: nothing to hold

    set_container_running(core, namespace, "orders-1")
    operator.wait_until(lambda: condition(get(api, "AdaptiveConsumer", namespace, "orders"), "Degraded")
                        .get("status") == "False", 10, "Degraded=False")
    operator.wait_until(lambda: "Recovered" in event_reasons(testbed, namespace), 15, "a Recovered Event")


def test_a_rollout_reports_the_pod_holds_autoscaling_and_stops_at_a_failing_pod(
        testbed: Testbed, api: Kube, core, operator: OperatorProcess, namespace: str, names, make_topic) -> None:
    """A config change rolls the pods highest ordinal first: Progressing=True RollingUpdate names
    the pod being rolled and the autoscaler holds (RollingOut). The restarted pod crash-loops: the
    operator sets the StatefulSet's partition to hold the pods below on the old revision,
    Degraded=True and Progressing=False RolloutHeld, a RolloutHeld Event; the stop lasts even when
    the pod runs again. The previous spec back releases the hold and rolls the pod back; a fix
    rolls through."""
    obj = consumer(testbed, names, make_topic("orders"), replicas=3, minReplicas=3, maxReplicas=3,
                   scaling={"mode": "Lag", "pollIntervalS": 1})
    kubectl_apply(testbed, namespace, obj)
    ready(api, core, operator, namespace)
    old = sts_status(api, namespace)["currentRevision"]

    kubectl_apply(testbed, namespace, changed(obj, flow={"maxInflight": 64}))
    ac = operator.wait_until(lambda: (a := get(api, "AdaptiveConsumer", namespace, "orders"))
                             and condition(a, "Progressing").get("reason") == "RollingUpdate"
                             and "orders-2" in condition(a, "Progressing")["message"] and a, 30,
                             "Progressing RollingUpdate on orders-2")
    assert condition(ac, "Progressing")["status"] == "True"
    new = ac["status"]["rollout"]["updateRevision"]
    assert new != old and ac["status"]["rollout"]["currentRevision"] == old and ac["status"]["rollout"]["pod"] == "orders-2"
    operator.wait_until(lambda: (get(api, "AdaptiveConsumer", namespace, "orders")["status"].get("scaling") or {})
                        .get("reason") == "RollingOut", 15, "the autoscaler holding during the rollout")
    assert "RollingUpdate" in event_reasons(testbed, namespace)

    # the restarted pod (new revision) crash-loops
    operator.wait_until(lambda: revision_of(core, namespace, "orders-2") == new, 30, "orders-2 at the new revision")
    set_container_waiting(core, namespace, "orders-2", "CrashLoopBackOff", "back-off 10s restarting failed container")
    operator.wait_until(lambda: partition(api, namespace) == 2, 15, "the StatefulSet's partition held at 2")
    # the status follows the StatefulSet's apply in the same reconcile
    ac = operator.wait_until(lambda: (a := get(api, "AdaptiveConsumer", namespace, "orders"))
                             and (a["status"].get("rollout") or {}).get("held") and a, 10, "status.rollout.held")
    assert condition(ac, "Degraded")["status"] == "True" and condition(ac, "Degraded")["reason"] == "CrashLoopBackOff"
    assert "orders-2" in condition(ac, "Degraded")["message"]
    progressing = condition(ac, "Progressing")
    assert (progressing["status"], progressing["reason"]) == ("False", "RolloutHeld") and "orders-2" in progressing["message"]
    held = ac["status"]["rollout"]["held"]
    assert (held["partition"], held["pod"], held["revision"]) == (2, "orders-2", new)
    operator.wait_until(lambda: "RolloutHeld" in event_reasons(testbed, namespace), 15, "a RolloutHeld Event")

    # it runs again: the StatefulSet controller would roll orders-1 next; the hold keeps it,
    # also across a restart of the operator (the hold lives in the status)
    set_container_running(core, namespace, "orders-2")
    operator.stop()
    operator.start()
    time.sleep(4)
    assert revision_of(core, namespace, "orders-1") == old and revision_of(core, namespace, "orders-0") == old
    assert partition(api, namespace) == 2
    degraded = condition(get(api, "AdaptiveConsumer", namespace, "orders"), "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "RolloutHeld") and "partition 2" in degraded["message"]

    # the previous spec back renders another template: released, and orders-2 rolled back
    kubectl_apply(testbed, namespace, obj)
    operator.wait_until(lambda: partition(api, namespace) == 0, 15, "the hold released")
    ac = ready(api, core, operator, namespace, timeout=90)
    assert condition(ac, "Progressing")["reason"] == "RolloutComplete"
    assert condition(ac, "Degraded")["status"] == "False" and "held" not in ac["status"]["rollout"]
    assert ac["status"]["rollout"]["updateRevision"] == ac["status"]["rollout"]["currentRevision"] == old
    assert {revision_of(core, namespace, f"orders-{i}") for i in range(3)} == {old}
    assert "RolloutComplete" in event_reasons(testbed, namespace)

    # a fix (another new spec) rolls through every pod
    kubectl_apply(testbed, namespace, changed(obj, flow={"maxInflight": 128}))
    operator.wait_until(lambda: sts_status(api, namespace).get("updateRevision") not in (old, new), 15, "a third revision")
    ac = ready(api, core, operator, namespace, timeout=90)
    fixed = ac["status"]["rollout"]["currentRevision"]
    assert fixed not in (old, new) and {revision_of(core, namespace, f"orders-{i}") for i in range(3)} == {fixed}


def test_a_restarted_pod_not_ready_within_the_deadline_exceeds_progress(
        testbed: Testbed, api: Kube, core, operator: OperatorProcess, namespace: str, names, make_topic) -> None:
    """Like a Deployment: a restarted pod not ready within rollout.progressDeadlineSeconds gives
    Progressing=False ProgressDeadlineExceeded, Degraded, and the rollout held at that pod."""
    obj = consumer(testbed, names, make_topic("orders"), replicas=2, rollout={"progressDeadlineSeconds": 10},
                   scaling={"pollIntervalS": 1})
    kubectl_apply(testbed, namespace, obj)
    ready(api, core, operator, namespace)
    kubectl_apply(testbed, namespace, changed(obj, flow={"maxInflight": 64}))
    started = time.monotonic()
    new = operator.wait_until(lambda: (s := sts_status(api, namespace)).get("updateRevision") != s.get("currentRevision")
                              and s["updateRevision"], 30, "a new revision")
    operator.wait_until(lambda: revision_of(core, namespace, "orders-1") == new, 30, "orders-1 restarted")
    mark_pods_ready(core, namespace, SELECTOR.format(name="orders"), names=["orders-0"])  # never orders-1
    ac = operator.wait_until(lambda: (a := get(api, "AdaptiveConsumer", namespace, "orders"))
                             and condition(a, "Progressing").get("reason") == "ProgressDeadlineExceeded" and a, 40,
                             "ProgressDeadlineExceeded")
    assert time.monotonic() - started >= 10 - 1  # creationTimestamp has a resolution of one second
    assert condition(ac, "Progressing")["status"] == "False" and "orders-1" in condition(ac, "Progressing")["message"]
    degraded = condition(ac, "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "PodNotReady" and "orders-1" in degraded["message"]
    assert partition(api, namespace) == 1 and revision_of(core, namespace, "orders-0") != new


def test_a_restarted_member_not_back_within_the_session_timeout_holds_the_rollout(
        testbed: Testbed, api: Kube, core, operator: OperatorProcess, namespace: str, names, make_topic) -> None:
    """A restarted static member not ready (not holding its assignment) within the session
    timeout has been dropped by the broker: the rollout stops there (RolloutHeld, Degraded
    MemberNotRejoined) long before the progress deadline."""
    obj = consumer(testbed, names, make_topic("orders"), replicas=2, rollout={"progressDeadlineSeconds": 600},
                   membership={"sessionTimeoutMs": 6000}, scaling={"pollIntervalS": 1})
    kubectl_apply(testbed, namespace, obj)
    ready(api, core, operator, namespace)
    kubectl_apply(testbed, namespace, changed(obj, flow={"maxInflight": 64}))
    new = operator.wait_until(lambda: (s := sts_status(api, namespace)).get("updateRevision") != s.get("currentRevision")
                              and s["updateRevision"], 30, "a new revision")
    operator.wait_until(lambda: revision_of(core, namespace, "orders-1") == new, 30, "orders-1 restarted")
    mark_pods_ready(core, namespace, SELECTOR.format(name="orders"), names=["orders-0"])  # never orders-1
    ac = operator.wait_until(lambda: (a := get(api, "AdaptiveConsumer", namespace, "orders"))
                             and condition(a, "Progressing").get("reason") == "RolloutHeld" and a, 40, "RolloutHeld")
    assert "not rejoined" in condition(ac, "Progressing")["message"]
    degraded = condition(ac, "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "MemberNotRejoined" and "orders-1" in degraded["message"]
    assert partition(api, namespace) == 1 and revision_of(core, namespace, "orders-0") != new


def test_a_staged_rollout_keeps_the_old_config_until_no_pod_uses_it(
        testbed: Testbed, api: Kube, core, operator: OperatorProcess, namespace: str, names, make_topic) -> None:
    """spec.rollout.partition stages a rollout: only pods from that ordinal get the new revision.
    A config change is a new immutable ConfigMap; the old one stays while pods of the old revision
    exist, and is deleted once none uses it."""
    obj = consumer(testbed, names, make_topic("orders"), replicas=2, rollout={"partition": 1},
                   scaling={"pollIntervalS": 1})
    kubectl_apply(testbed, namespace, obj)
    ready(api, core, operator, namespace)
    first = config_of(api, namespace)["metadata"]["name"]
    assert configs(api, namespace) == {first}

    kubectl_apply(testbed, namespace, changed(obj, flow={"maxInflight": 64}))
    second = operator.wait_until(lambda: (n := config_of(api, namespace)["metadata"]["name"]) != first and n, 30,
                                 "the new ConfigMap in the pod template")

    def staged() -> dict[str, Any] | None:
        mark_pods_ready(core, namespace, SELECTOR.format(name="orders"))
        a = get(api, "AdaptiveConsumer", namespace, "orders")
        return a if condition(a, "Progressing").get("reason") == "RolloutStaged" else None
    ac = operator.wait_until(staged, 60, "the rollout staged at partition 1")
    assert condition(ac, "Degraded")["status"] == "False" and partition(api, namespace) == 1
    s = sts_status(api, namespace)
    assert revision_of(core, namespace, "orders-1") == s["updateRevision"]
    assert revision_of(core, namespace, "orders-0") == s["currentRevision"] != s["updateRevision"]
    time.sleep(3)  # several polls: the old config is still in use by orders-0
    assert configs(api, namespace) == {first, second}
    assert get(api, "ConfigMap", namespace, first)["immutable"] is True

    kubectl_apply(testbed, namespace, changed(obj, flow={"maxInflight": 64}, rollout={}))  # go on with every pod
    ready(api, core, operator, namespace, timeout=90)
    operator.wait_until(lambda: configs(api, namespace) == {second}, 30, "the old ConfigMap deleted")
    assert any(r.get("message") == "config deleted" and r.get("configmap") == first for r in operator.records())
