"""What the CRD lets through and the apiserver then refuses in a child (a 422 when the
StatefulSet is applied) becomes InvalidSpec: Degraded and not Ready, one Warning Event, and no
retry until the spec changes (before, the operator re-applied on every poll and handler retry,
forever). The spec fixed, the operator recovers by itself."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterator

import pytest

from afc.operator.kube import Kube
from afc.operator.testing import OperatorProcess, delete_consumers
from afctest import Testbed
from operator_bed import FAST, admin, condition, consumer, event_messages, get

pytestmark = [pytest.mark.k8s, pytest.mark.kafka]

REFUSED = "refused by the apiserver"


@pytest.fixture
def operator(testbed: Testbed, crd_installed: None, namespace: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    with OperatorProcess(["--namespace", namespace], testbed.kubeconfig, tmp_path / "operator.log", env=FAST) as op:
        yield op
        delete_consumers(admin(testbed), namespace)


def test_a_statefulset_the_apiserver_refuses_is_invalid_spec_and_not_retried_until_the_spec_changes(
        testbed: Testbed, api: Kube, operator: OperatorProcess, namespace: str, names, make_topic) -> None:
    # Each annotation is within the CRD's bounds; together they exceed the 256 KiB a pod
    # template's annotations may hold, which only the StatefulSet's validation checks.
    big = {f"example.com/note-{i}": "x" * 60_000 for i in range(5)}
    obj = consumer(testbed, names, make_topic("orders"), podTemplate={"annotations": big},
                   scaling={"pollIntervalS": 1})
    # created, not applied: kubectl's last-applied annotation would itself be too long
    testbed.run_kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(obj))

    ac = operator.wait_until(lambda: (a := get(api, "AdaptiveConsumer", namespace, "orders"))
                             and condition(a, "Degraded").get("reason") == "InvalidSpec" and a, 30, "InvalidSpec")
    degraded, ready = condition(ac, "Degraded"), condition(ac, "Ready")
    assert degraded["status"] == "True" and "StatefulSet" in degraded["message"], degraded
    assert "262144" in degraded["message"], degraded  # the apiserver's own reason, as it said it
    assert ready["status"] == "False" and ready["reason"] == "InvalidSpec", ready
    assert degraded["observedGeneration"] == ac["metadata"]["generation"]
    assert get(api, "StatefulSet", namespace, "orders") is None
    warnings = operator.wait_until(lambda: event_messages(testbed, namespace, "InvalidSpec"), 15,
                                   "the InvalidSpec Event")
    assert len(warnings) == 1 and "waiting for a spec change" in warnings[0], warnings

    # Polls keep running (every second), but the StatefulSet is not applied again.
    time.sleep(8)
    polls = [r for r in operator.records() if r.get("message") == "reconciled" and r.get("problem") == "InvalidSpec"]
    refusals = [r for r in operator.records() if r.get("message") == REFUSED]
    assert len(polls) >= 5, f"the poll did not run: {len(polls)} reconciles"
    assert len(refusals) == 1, f"applied again {len(refusals) - 1} times without a spec change"
    assert len(event_messages(testbed, namespace, "InvalidSpec")) == 1

    # The spec fixed (a new generation): applied at once, and no longer degraded.
    testbed.run_kubectl("patch", "ac/orders", "-n", namespace, "--type=json",
                        "-p", json.dumps([{"op": "remove", "path": "/spec/podTemplate/annotations"}]))
    operator.wait_until(lambda: get(api, "StatefulSet", namespace, "orders"), 30, "the StatefulSet")
    ac = operator.wait_until(lambda: (a := get(api, "AdaptiveConsumer", namespace, "orders"))
                             and condition(a, "Degraded").get("status") == "False" and a, 30, "recovery")
    assert condition(ac, "Degraded")["reason"] == "AsExpected"
    operator.wait_until(lambda: event_messages(testbed, namespace, "Recovered"), 15, "the Recovered Event")
    assert len([r for r in operator.records() if r.get("message") == REFUSED]) == 1
