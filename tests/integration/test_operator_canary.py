"""A staged rollout (`spec.rollout.canary`) on the test bed: the operator (`afc-operator`
subprocess) against the real apiserver and controller-manager (the StatefulSet controller rolls
the pods), real Kafka and Redis, and real `afc-consumer` processes playing the pods
(`RevisionKubelet`: each pod's process runs the handler of the pod's own revision, read from
the ConfigMap its pod template mounts, as a container would).

The operator judges the canary from the members' health records in Redis (counters of handled,
failed and dead-lettered records that every consumer publishes), so these are real numbers.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from afc.operator.kube import Kube
from afc.operator.testing import OperatorProcess, delete_consumers
from afctest import Load, Testbed
from fake_kubelet import Kubelet
from operator_bed import FAST, admin, condition, consumer, event_messages, event_reasons, get, kubectl_apply, \
    serve_this_crd

pytestmark = [pytest.mark.k8s, pytest.mark.kafka, pytest.mark.redis]

REVISION = "controller-revision-hash"
HEALTHY, BROKEN = "autoscale_handlers:record", "autoscale_handlers:fail_always"
CANARY = {"replicas": 1, "holdSeconds": 6, "minRuns": 20, "maxHoldSeconds": 60}


class RevisionKubelet(Kubelet):
    """Each pod's process runs the handler its pod template's config names."""

    def handler_of(self, pod: Any) -> str:
        (volume,) = [v for v in pod.spec.volumes if v.name == "config"]
        cm = self.core.read_namespaced_config_map(volume.config_map.name, self.namespace)
        return json.loads(cm.data["config.json"])["handler"]["handler"]


@pytest.fixture
def operator(testbed: Testbed, crd_installed: None, namespace: str, names, tmp_path: Path) -> Iterator[OperatorProcess]:
    # spec.rollout.canary and status.rollout.canary are new: another checkout may have applied an older CRD
    serve_this_crd(testbed, namespace, consumer(testbed, names, "probe", rollout={"canary": CANARY}))
    with OperatorProcess(["--namespace", namespace], testbed.kubeconfig, tmp_path / "operator.log", env=FAST) as op:
        yield op
        delete_consumers(admin(testbed), namespace)


def redis_secret(testbed: Testbed, namespace: str) -> dict[str, Any]:
    testbed.run_kubectl("create", "secret", "generic", "redis", "-n", namespace, f"--from-literal=url={testbed.redis_url}")
    return {"redisUrlSecretRef": {"name": "redis", "key": "url"}}


def revisions(core: Any, namespace: str) -> dict[str, str | None]:
    pods = core.list_namespaced_pod(namespace, label_selector="app.kubernetes.io/instance=orders").items
    return {p.metadata.name: p.metadata.labels.get(REVISION) for p in pods if not p.metadata.deletion_timestamp}


def canary_status(api: Kube, namespace: str) -> dict[str, Any]:
    ac = get(api, "AdaptiveConsumer", namespace, "orders") or {}
    return ((ac.get("status") or {}).get("rollout") or {}).get("canary") or {}


def test_a_failing_canary_is_rolled_back_with_the_stable_members_untouched_and_a_healthy_one_promoted(
        testbed: Testbed, api: Kube, core: Any, operator: OperatorProcess, namespace: str, names, make_topic,
        redis_client: Any, tmp_path: Path) -> None:
    topic = make_topic("orders", partitions=8)
    idem = {**redis_secret(testbed, namespace), "keyPrefix": names.redis_prefix.rstrip(":")}
    obj = consumer(testbed, names, topic, replicas=4, minReplicas=1, maxReplicas=8, idempotency=idem,
                   handler={"handler": HEALTHY}, scaling={"mode": "Off", "pollIntervalS": 1},
                   rollout={"canary": CANARY})
    # Routing off (a failure is retried in place): the members subscribe to the source topic
    # only, so cooperative-sticky gives each 2 of the 8 partitions. With the .retry topics as well
    # it may leave a member only idle retry partitions, and a canary without work cannot be judged
    # (it would be rolled back at maxHoldSeconds, InsufficientData).
    env = {"AFC_TEST_HASH": f"{names.redis_prefix}seen", "AFC_MEMBERSHIP__SESSION_TIMEOUT_MS": "10000",
           "AFC_ROUTING__ENABLED": "false"}
    group = obj["spec"]["kafka"]["groupId"]
    kubectl_apply(testbed, namespace, obj)
    with RevisionKubelet(testbed, core, namespace, topic, group, HEALTHY, tmp_path, names.redis_prefix, env) as kubelet, \
            Load(testbed.bootstrap, topic, 8, per_second=10):
        def settled() -> dict[str, Any] | None:
            ac = get(api, "AdaptiveConsumer", namespace, "orders") or {}
            s = ac.get("status") or {}
            revs = revisions(core, namespace)
            prefix = names.redis_prefix.rstrip(":")
            members = [m.decode() for m in redis_client.zrange(f"{prefix}:bpm:{group}", 0, -1)]
            records = [json.loads(r) for r in redis_client.mget([f"{prefix}:bp:{group}:{m}" for m in members]) if r]
            # every member consumes (a canary without partitions would have nothing to be judged on)
            holding = len(records) == 4 and all((r.get("counts") or {}).get("handled") for r in records)
            return ac if (condition(ac, "Ready").get("status") == "True" and len(revs) == 4
                          and len(set(revs.values())) == 1 and (s.get("rollout") or {}).get("template")
                          and set(kubelet.procs) == set(revs) and holding) else None
        operator.wait_until(settled, 60, "4 pods ready on one revision, their consumers consuming")
        stable_rev = next(iter(revisions(core, namespace).values()))
        pids = {n: p.proc.pid for n, p in kubelet.procs.items()}
        assert set(pids) == {f"orders-{i}" for i in range(4)}

        # A broken release with a canary of 1: only orders-3 rolls, fails its gates, rolls back.
        t0 = time.monotonic()
        serve_this_crd(testbed, namespace, obj)  # (again: another checkout's session may have applied its CRD)
        kubectl_apply(testbed, namespace, {**obj, "spec": {**obj["spec"], "handler": {"handler": BROKEN}}})
        seen_partition: set[int] = set()

        def rolled_back() -> dict[str, Any] | None:
            sts = get(api, "StatefulSet", namespace, "orders") or {}
            seen_partition.add(sts["spec"]["updateStrategy"]["rollingUpdate"]["partition"])
            cs = canary_status(api, namespace)
            return cs if cs.get("phase") == "RolledBack" else None
        cs = operator.wait_until(rolled_back, 120, "the failing canary rolled back", interval=0.3)
        print(f"rolled back {time.monotonic() - t0:.1f}s after the change: {cs}")
        assert 3 in seen_partition, f"the canary partition (3) was never set: {seen_partition}"
        assert cs["pods"] == ["orders-3"] and cs["stableRevision"] == stable_rev and cs["revision"] != stable_rev
        assert cs["reason"] == "ErrorRate", cs
        assert cs["gates"]["runs"] >= CANARY["minRuns"] and cs["gates"]["errorRate"] > 0.05, cs
        assert revisions(core, namespace) == {f"orders-{i}": stable_rev for i in range(4)}
        for i in range(3):
            assert kubelet.procs[f"orders-{i}"].proc.pid == pids[f"orders-{i}"], f"stable orders-{i} was restarted"
        assert kubelet.procs["orders-3"].proc.pid != pids["orders-3"]
        ac = get(api, "AdaptiveConsumer", namespace, "orders")
        assert condition(ac, "Degraded")["status"] == "True" and condition(ac, "Degraded")["reason"] == "CanaryFailed"
        assert condition(ac, "Progressing")["reason"] == "RolledBack"
        operator.wait_until(lambda: {"CanaryStarted", "CanaryFailed", "RolledBack"} <= set(event_reasons(
            testbed, namespace)), 10, "the canary's Events")
        assert "error rate" in event_messages(testbed, namespace, "CanaryFailed")[0]
        # the spec's ConfigMap (of the rolled-back revision) is kept, not collected and recreated
        assert "DriftCorrected" not in event_reasons(testbed, namespace)

        # A healthy release with the canary: promoted, every pod on the new revision.
        t1 = time.monotonic()
        pt = {"env": [{"name": "RELEASE", "value": "2"}]}
        serve_this_crd(testbed, namespace, obj)
        kubectl_apply(testbed, namespace, {**obj, "spec": {**obj["spec"], "podTemplate": pt}})

        def promoted() -> dict[str, Any] | None:
            cs = canary_status(api, namespace)
            revs = revisions(core, namespace)
            return cs if (cs.get("phase") == "Promoted" and len(revs) == 4
                          and set(revs.values()) == {cs["revision"]}) else None
        cs = operator.wait_until(promoted, 120, "the healthy canary promoted and rolled to every pod", interval=0.3)
        print(f"promoted and rolled {time.monotonic() - t1:.1f}s after the change: {cs}")
        assert cs["reason"] == "GatesPassed" and cs["gates"]["errorRate"] <= 0.05 and cs["revision"] != stable_rev
        assert cs["pods"] == ["orders-3"] and cs["gates"]["runs"] >= CANARY["minRuns"], cs
        operator.wait_until(lambda: "CanaryPromoted" in event_reasons(testbed, namespace), 10, "CanaryPromoted")
        ac = operator.wait_until(lambda: (a := get(api, "AdaptiveConsumer", namespace, "orders"))
                                 and condition(a, "Degraded").get("status") == "False" and a, 30, "no longer Degraded")
        assert kubelet.error is None, kubelet.error
