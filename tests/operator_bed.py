"""Helpers for the operator's tests on the test bed: the sample pointed at the test bed, kubectl
apply, reads of the AdaptiveConsumer, its children, conditions and Events, and `ready` (playing
the kubelet until the consumer is Ready and no longer Progressing)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from afc.operator.kube import Kube, KubeError, path_for
from afc.operator.testing import OperatorProcess, mark_pods_ready
from afctest import Testbed

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "manifests" / "samples" / "afc_v1alpha1_adaptiveconsumer.yaml"
CRD = ROOT / "crds" / "afc.dev_adaptiveconsumers.yaml"
SELECTOR = "app.kubernetes.io/instance={name},app.kubernetes.io/name=afc-consumer"
CHILD_KINDS = ("ConfigMap", "Service", "StatefulSet", "PodDisruptionBudget")
FAST = {"AFC_OPERATOR_BACKOFF_MAX_S": "4", "AFC_OPERATOR_KAFKA_TIMEOUT_S": "2"}


def admin(testbed: Testbed) -> list[str]:
    return [testbed.kubectl, f"--kubeconfig={testbed.kubeconfig}"]


def consumer(testbed: Testbed, names, topic: str, name: str = "orders", **spec: Any) -> dict[str, Any]:
    """The sample, pointed at the test bed's broker, this test's topic and group."""
    obj = yaml.safe_load(SAMPLE.read_text())
    obj["metadata"]["name"] = name
    obj["spec"]["kafka"].update(bootstrapServers=testbed.bootstrap, topics=[topic], groupId=f"{names.group}-{name}")
    obj["spec"].update(spec)
    return obj


def kubectl_apply(testbed: Testbed, namespace: str, obj: dict[str, Any]) -> None:
    testbed.run_kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj))


def get(api: Kube, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return api.request("GET", path_for(kind, namespace, name))
    except KubeError as e:
        if e.not_found:
            return None
        raise


def children(api: Kube, namespace: str, name: str = "orders") -> dict[str, list[dict[str, Any]]]:
    sel = SELECTOR.format(name=name)
    return {kind: api.request("GET", path_for(kind, namespace), query=[("labelSelector", sel)])["items"]
            for kind in CHILD_KINDS}


def condition(ac: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    for c in ((ac or {}).get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return c
    return {}


def event_reasons(testbed: Testbed, namespace: str, name: str = "orders") -> list[str]:
    out = testbed.run_kubectl("get", "events", "-n", namespace, "-o", "json", "--field-selector",
                              f"involvedObject.kind=AdaptiveConsumer,involvedObject.name={name}").stdout
    items = sorted(json.loads(out)["items"], key=lambda e: e["metadata"]["creationTimestamp"])
    return [e["reason"] for e in items]


def event_messages(testbed: Testbed, namespace: str, reason: str, name: str = "orders") -> list[str]:
    out = testbed.run_kubectl("get", "events", "-n", namespace, "-o", "json", "--field-selector",
                              f"involvedObject.name={name},reason={reason}").stdout
    return [e["message"] for e in json.loads(out)["items"]]


def config_of(api: Kube, namespace: str, sts: dict[str, Any] | None = None, name: str = "orders") -> dict[str, Any]:
    """The ConfigMap a StatefulSet's pod template mounts (by default the live one's)."""
    sts = sts or get(api, "StatefulSet", namespace, name)
    (volume,) = [v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == "config"]
    return get(api, "ConfigMap", namespace, volume["configMap"]["name"])


def configs(api: Kube, namespace: str, name: str = "orders") -> set[str]:
    return {c["metadata"]["name"] for c in children(api, namespace, name)["ConfigMap"]}


def ready(api: Kube, core, op: OperatorProcess, namespace: str, name: str = "orders", timeout: float = 60) -> dict:
    """Play the kubelet until the consumer reports Ready and no longer Progressing (pods come
    and go during rollouts; Ready alone means consuming, which one pod already does)."""
    def check() -> dict[str, Any] | None:
        mark_pods_ready(core, namespace, SELECTOR.format(name=name))
        ac = get(api, "AdaptiveConsumer", namespace, name)
        settled = (condition(ac, "Ready").get("status") == "True" and condition(ac, "Progressing").get("status") == "False"
                   and condition(ac, "Ready").get("observedGeneration") == (ac or {}).get("metadata", {}).get("generation"))
        return ac if settled else None
    return op.wait_until(check, timeout, f"{name} Ready", interval=0.5)


def serve_this_crd(testbed: Testbed, namespace: str, probe: dict[str, Any], timeout: float = 15) -> None:
    """Apply this checkout's CRD again and wait until the apiserver accepts `probe` (a server-side
    dry run). The test bed's CRD is cluster-wide and every checkout's test session applies its own
    at start, so a newer field may vanish under a running session; tests that need one call this."""
    testbed.run_kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    deadline = time.monotonic() + timeout
    while True:
        r = testbed.run_kubectl("apply", "-n", namespace, "--dry-run=server", "-f", "-", input=json.dumps(probe),
                                check=False)
        if r.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the apiserver does not serve this checkout's CRD: {r.stderr}")
        time.sleep(0.5)
