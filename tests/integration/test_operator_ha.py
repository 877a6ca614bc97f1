"""Two operator replicas with kopf's peering (the Deployment's `replicas: 2`, `--peering`):
exactly one works, and when it is killed (SIGKILL: no goodbye) the other takes over within the
bound docs/operator.md states: the peering lifetime after the dead one's last keep-alive, plus
kopf's resume and one reconcile. A replica that stops gracefully hands over at once, and a
restarted replica does not take the work back.

Which replica did what is read from the apiserver, not only from logs: each runs under its own
field manager, so the managedFields of the status and of every child name the writer.
"""
from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from afc.operator.kube import Kube
from afc.operator.testing import OperatorProcess, delete_consumers
from afctest import Testbed, free_port
from operator_bed import FAST, admin, children, consumer, event_reasons, get, kubectl_apply, ready

pytestmark = [pytest.mark.k8s, pytest.mark.kafka]

ROOT = Path(__file__).resolve().parents[2]
PEERING_CRD = ROOT / "crds" / "kopf.dev_peerings.yaml"
LIFETIME_S = 10           # AFC_OPERATOR_PEERING_LIFETIME_S (15 in the Deployment)
BOUND_S = LIFETIME_S + 10  # docs/operator.md, "HA": lifetime + 10 s (kopf's resume, a reconcile)
OURS = {"afc-operator-a", "afc-operator-b"}


@pytest.fixture
def peering(testbed: Testbed, crd_installed: None) -> None:
    """kopf's peering CRDs (cluster-scoped, shared, never deleted: like the AdaptiveConsumer CRD)."""
    testbed.run_kubectl("apply", "--server-side", "--force-conflicts", "-f", str(PEERING_CRD))
    testbed.wait_established("kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev")


def replica(testbed: Testbed, namespace: str, tmp_path: Path, name: str, *args: str) -> OperatorProcess:
    """One replica as the Deployment runs it (--peering), under its own field manager."""
    return OperatorProcess(["--namespace", namespace, "--peering", "afc-operator", "--verbose", *args], testbed.kubeconfig,
                           tmp_path / f"operator-{name}.log",
                           env={**FAST, "AFC_OPERATOR_FIELD_MANAGER": f"afc-operator-{name}", "POD_ID": f"replica-{name}",
                                "AFC_OPERATOR_PEERING_LIFETIME_S": str(LIFETIME_S)})


def working(op: OperatorProcess) -> bool:
    """kopf starts a peered operator paused and says when it resumes (no higher priority alive)."""
    return any(str(r.get("message", "")).startswith("Resuming operations") for r in op.records())


def reconciles(op: OperatorProcess) -> list[dict[str, Any]]:
    return [r for r in op.records() if r.get("message") == "reconciled"]


def managers(obj: dict[str, Any] | None) -> set[str]:
    return {m["manager"] for m in ((obj or {}).get("metadata") or {}).get("managedFields") or []} & OURS


def test_one_replica_works_and_the_other_takes_over_after_kill_9(
        testbed: Testbed, api: Kube, core, peering: None, namespace: str, names, make_topic, tmp_path: Path) -> None:
    a = replica(testbed, namespace, tmp_path, "a").start()
    b = None
    try:
        a.wait_until(lambda: working(a), 30, "replica a to work (alone)")
        b = replica(testbed, namespace, tmp_path, "b").start()
        peers = b.wait_until(lambda: (p := get_peering(api, namespace)) and len(p) == 2 and p, 20, "both in the peering")
        assert peers["replica-a"]["priority"] > peers["replica-b"]["priority"]  # the elder works

        obj = consumer(testbed, names, make_topic("orders", partitions=2), scaling={"mode": "Off", "pollIntervalS": 1})
        kubectl_apply(testbed, namespace, obj)
        ready(api, core, a, namespace)
        testbed.run_kubectl("patch", "ac/orders", "-n", namespace, "--type=merge", "-p", '{"spec":{"replicas":3}}')
        a.wait_until(lambda: get(api, "StatefulSet", namespace, "orders")["spec"]["replicas"] == 3, 20, "a scales to 3")
        polls = len([r for r in reconciles(a) if r.get("trigger") == "poll"])
        a.wait_until(lambda: len([r for r in reconciles(a) if r.get("trigger") == "poll"]) >= polls + 3, 20,
                     "three more polls by a")

        # while both run, only a works: b reconciled nothing, wrote nothing, posted nothing
        assert not working(b) and reconciles(b) == [] and b.alive
        assert not [r for r in b.records() if "event_reason" in r]
        assert managers(get(api, "AdaptiveConsumer", namespace, "orders")) == {"afc-operator-a"}
        for kind, objs in children(api, namespace).items():
            assert objs and all(managers(o) == {"afc-operator-a"} for o in objs), kind
        reasons = event_reasons(testbed, namespace)
        assert reasons.count("Created") == 1 and reasons.count("Ready") == 1, reasons
        assert "Logging" not in reasons  # kopf posts no Event per handler run (settings.posting.loggers)

        # fail-over: a dies without a word; a spec change made right then is applied by b
        a.kill()
        killed = time.monotonic()
        testbed.run_kubectl("patch", "ac/orders", "-n", namespace, "--type=merge", "-p",
                            json.dumps({"spec": {"image": "example.invalid/afc-runtime:0.2.0"}}))

        def taken_over() -> bool:
            sts = get(api, "StatefulSet", namespace, "orders")
            return (sts["spec"]["template"]["spec"]["containers"][0]["image"] == "example.invalid/afc-runtime:0.2.0"
                    and "afc-operator-b" in managers(sts))
        b.wait_until(taken_over, BOUND_S + 5, "b to take over and apply the change")
        took = time.monotonic() - killed
        assert took <= BOUND_S, f"fail-over took {took:.1f}s, bound {BOUND_S}s"
        assert working(b)
        ac = ready(api, core, b, namespace)
        assert "afc-operator-b" in managers(ac)  # b writes the status now
        print(f"fail-over after SIGKILL: {took:.1f}s (bound {BOUND_S}s)")
    finally:
        delete_consumers(admin(testbed), namespace)  # while b runs
        a.kill()
        if b is not None:
            b.stop()


def test_a_stopped_replica_hands_over_at_once_and_a_restarted_one_waits(
        testbed: Testbed, api: Kube, peering: None, namespace: str, tmp_path: Path) -> None:
    """SIGTERM (a rolling update, a drained node): kopf removes the replica from the peering on
    its way out, so the other works well before the lifetime; the replica started again has the
    lower priority (a later start) and waits: no second hand-over."""
    a = replica(testbed, namespace, tmp_path, "a").start()
    port = free_port()
    b = replica(testbed, namespace, tmp_path, "b", "--liveness", f"http://127.0.0.1:{port}/healthz")
    a2 = None
    try:
        a.wait_until(lambda: working(a), 30, "replica a to work")
        b.start()
        b.wait_until(lambda: len(get_peering(api, namespace)) == 2, 20, "both in the peering")
        time.sleep(1)
        assert not working(b)
        # the waiting replica answers the Deployment's probes (else the kubelet would restart it forever)
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).status == 200
        stopped = time.monotonic()
        assert a.stop() == 0
        b.wait_until(lambda: working(b), LIFETIME_S, "b to work after a stopped")
        assert time.monotonic() - stopped < LIFETIME_S / 2
        assert set(get_peering(api, namespace)) == {"replica-b"}

        a2 = replica(testbed, namespace, tmp_path, "a2").start()
        b.wait_until(lambda: len(get_peering(api, namespace)) == 2, 20, "the restarted replica in the peering")
        time.sleep(3)
        assert not working(a2) and b.alive
    finally:
        for op in (a, b, a2):
            if op is not None:
                op.stop()


def get_peering(api: Kube, namespace: str) -> dict[str, Any]:
    """The live peers of the KopfPeering the replicas share (identity -> priority, lastseen, lifetime)."""
    try:
        obj = api.request("GET", f"/apis/kopf.dev/v1/namespaces/{namespace}/kopfpeerings/afc-operator")
    except Exception:  # noqa: BLE001 - not created yet
        return {}
    return dict((obj.get("status") or {}))
