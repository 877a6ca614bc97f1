"""The install manifests on the real apiserver, and the operator driven by its own ServiceAccount
token (not the admin's): the RBAC is enough to do the whole job, and not more."""
from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from afc.operator.kube import Kube, KubeError, path_for
from afc.operator.testing import OperatorProcess, delete_consumers, mark_pods_ready
from afctest import Testbed, wait_for

pytestmark = [pytest.mark.k8s, pytest.mark.kafka]

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
SAMPLE = MANIFESTS / "samples" / "afc_v1alpha1_adaptiveconsumer.yaml"
SELECTOR = "app.kubernetes.io/instance=orders,app.kubernetes.io/name=afc-consumer"
FAST = {"AFC_OPERATOR_BACKOFF_MAX_S": "4", "AFC_OPERATOR_KAFKA_TIMEOUT_S": "2"}

# What the operator may do, exactly: (apiGroup, resource) -> verbs. Anything else is refused.
EXPECTED_RULES = {
    ("afc.dev", "adaptiveconsumers"): {"list", "watch", "patch"},
    ("afc.dev", "adaptiveconsumers/status"): {"patch"},
    ("", "pods"): {"get", "list", "watch"},
    ("apps", "statefulsets"): {"get", "list", "watch", "create", "patch"},
    ("", "services"): {"get", "list", "watch", "create", "patch"},
    ("", "configmaps"): {"get", "list", "watch", "create", "patch", "delete"},
    ("apps", "controllerrevisions"): {"get"},
    ("policy", "poddisruptionbudgets"): {"get", "list", "watch", "create", "patch"},
    ("", "secrets"): {"get"},
    ("", "events"): {"create"},
}


def admin(testbed: Testbed) -> list[str]:
    return [testbed.kubectl, f"--kubeconfig={testbed.kubeconfig}"]


def render_install(testbed: Testbed, tmp_path: Path, variant: Path, namespace: str, prefix: str = "") -> list[dict]:
    """`kubectl kustomize` of an install variant, moved into the test's namespace by an overlay
    (the way a user installs elsewhere than afc-system), without the Namespace object."""
    overlay = tmp_path / "overlay"
    overlay.mkdir(parents=True)
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        **({"namePrefix": prefix} if prefix else {}),
        "resources": [os.path.relpath(variant, overlay)],
        "transformers": [yaml.safe_dump({
            "apiVersion": "builtin", "kind": "NamespaceTransformer",
            "metadata": {"name": "into-test-namespace", "namespace": namespace},
            "setRoleBindingSubjects": "allServiceAccounts", "unsetOnly": False})],
    }))
    docs = list(yaml.safe_load_all(testbed.run_kubectl("kustomize", str(overlay)).stdout))
    return [d for d in docs if d and d["kind"] != "Namespace"]


def apply_docs(testbed: Testbed, docs: list[dict]) -> None:
    testbed.run_kubectl("apply", "-f", "-", input="\n---\n".join(yaml.safe_dump(d) for d in docs))


def token_kubeconfig(testbed: Testbed, tmp_path: Path, namespace: str, sa: str) -> Path:
    """A kubeconfig that authenticates as the ServiceAccount, with a token from the TokenRequest API."""
    token = testbed.run_kubectl("create", "token", sa, "-n", namespace, "--duration=30m").stdout.strip()
    admin = yaml.safe_load(Path(testbed.kubeconfig).read_text())
    cluster = admin["clusters"][0]
    path = tmp_path / "sa-kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "clusters": [cluster],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": sa, "context": {"cluster": cluster["name"], "user": sa, "namespace": namespace}}],
        "current-context": sa}))
    return path


def as_sa(testbed: Testbed, kubeconfig: Path, *args: str, check: bool = False):
    return testbed.run_kubectl(f"--kubeconfig={kubeconfig}", *args, check=check)


def can_i(testbed: Testbed, kubeconfig: Path, *args: str) -> bool:
    r = as_sa(testbed, kubeconfig, "auth", "can-i", *args)
    assert r.stdout.strip() in ("yes", "no"), r.stderr
    return r.stdout.strip() == "yes"


def consumer(testbed: Testbed, names, topic: str, namespace: str, **spec: Any) -> dict[str, Any]:
    obj = yaml.safe_load(SAMPLE.read_text())
    obj["metadata"]["namespace"] = namespace
    obj["spec"]["kafka"].update(bootstrapServers=testbed.bootstrap, topics=[topic], groupId=names.group)
    obj["spec"].update(spec)
    return obj


def condition(api: Kube, namespace: str, type_: str, name: str = "orders") -> dict[str, Any]:
    try:
        ac = api.request("GET", path_for("AdaptiveConsumer", namespace, name))
    except KubeError:
        return {}
    return next((c for c in (ac.get("status") or {}).get("conditions") or [] if c["type"] == type_), {})


def forbidden_lines(op: OperatorProcess) -> list[str]:
    """Log records that tell of a refused API call (a 403 status or a Forbidden reason; a bare
    "403" inside a timestamp or a hash is not one)."""
    return [line for line in map(json.dumps, op.records()) if re.search(r"\b403\b|orbidden", line)]


def test_manifest_rules_are_exactly_the_expected_ones(testbed: Testbed, tmp_path: Path) -> None:
    for variant, kind in ((MANIFESTS, "Role"), (MANIFESTS / "cluster-wide", "ClusterRole")):
        docs = list(yaml.safe_load_all(testbed.run_kubectl("kustomize", str(variant)).stdout))
        (role,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == "afc-operator"]
        # the replicas' peering (kopf's KopfPeering / ClusterKopfPeering), in a Role of its own
        (peering,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == "afc-operator-peering"]
        assert peering["rules"] == [{"apiGroups": ["kopf.dev"], "verbs": ["get", "list", "watch", "patch", "create"],
                                     "resources": ["kopfpeerings" if kind == "Role" else "clusterkopfpeerings"]}]
        got: dict[tuple[str, str], set[str]] = {}
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    got.setdefault((group, resource), set()).update(rule["verbs"])
        assert got == EXPECTED_RULES, variant
        deployment = next(d for d in docs if d["kind"] == "Deployment")
        c = deployment["spec"]["template"]["spec"]["containers"][0]
        assert {"livenessProbe", "readinessProbe", "startupProbe"} <= set(c)
        env = {e["name"]: e for e in c["env"]}
        if kind == "Role":
            assert env["AFC_OPERATOR_NAMESPACES"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
        else:
            assert env["AFC_OPERATOR_ALL_NAMESPACES"]["value"] == "true" and "AFC_OPERATOR_NAMESPACES" not in env


def test_namespaced_install_with_the_service_account_token(
        testbed: Testbed, api: Kube, core, crd_installed: None, namespace: str, names, make_topic,
        tmp_path: Path) -> None:
    docs = render_install(testbed, tmp_path, MANIFESTS, namespace)
    assert {d["kind"] for d in docs} == {"ServiceAccount", "Role", "RoleBinding", "Deployment"}
    testbed.run_kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    apply_docs(testbed, docs)
    kubeconfig = token_kubeconfig(testbed, tmp_path, namespace, "afc-operator")
    whoami = json.loads(as_sa(testbed, kubeconfig, "auth", "whoami", "-o", "json", check=True).stdout)
    assert whoami["status"]["userInfo"]["username"] == f"system:serviceaccount:{namespace}:afc-operator"
    # the operator's own Deployment passes the "restricted" Pod Security Standard
    wait_for(lambda: [p for p in core.list_namespaced_pod(namespace, label_selector="app.kubernetes.io/name=afc-operator").items],
             60, what="the operator's pod (admitted under pod-security restricted)")

    topic = make_topic("orders")
    with OperatorProcess(["--namespace", namespace], str(kubeconfig), tmp_path / "operator.log", env=FAST) as op:
        testbed.run_kubectl("apply", "-f", "-", input=json.dumps(consumer(testbed, names, topic, namespace)))

        def is_ready() -> bool:
            mark_pods_ready(core, namespace, SELECTOR)  # the kubelet's part, as admin
            return condition(api, namespace, "Ready").get("status") == "True"
        op.wait_until(is_ready, 60, "Ready, reconciled with the ServiceAccount's token")
        # the consumer pods were admitted under "restricted" too
        assert len(core.list_namespaced_pod(namespace, label_selector=SELECTOR).items) == 2

        testbed.run_kubectl("scale", "statefulset/orders", "-n", namespace, "--replicas=4")
        op.wait_until(lambda: api.request("GET", path_for("StatefulSet", namespace, "orders"))["spec"]["replicas"] == 2,
                      30, "drift reverted with the ServiceAccount's token")
        def reasons() -> set[str]:
            events = json.loads(testbed.run_kubectl("get", "events", "-n", namespace, "-o", "json", "--field-selector",
                                                    "involvedObject.kind=AdaptiveConsumer").stdout)["items"]
            return {e["reason"] for e in events}
        # the Event is posted just after the drift is reverted: wait for it, do not race it
        op.wait_until(lambda: {"Created", "Ready", "DriftCorrected"} <= reasons(), 15,
                      "Created, Ready and DriftCorrected Events")
        assert forbidden_lines(op) == []
        delete_consumers(admin(testbed), namespace)  # the poll daemon's finalizer goes with the operator's help

    # ... and not more
    ns = ["-n", namespace]
    assert can_i(testbed, kubeconfig, "patch", "statefulsets", *ns)
    assert can_i(testbed, kubeconfig, "get", "secrets", *ns)
    assert can_i(testbed, kubeconfig, "delete", "configmaps", *ns)  # configs no revision uses any more
    for verb, resource in [("delete", "statefulsets"), ("update", "statefulsets"), ("deletecollection", "configmaps"),
                           ("list", "secrets"), ("watch", "secrets"), ("create", "secrets"), ("delete", "secrets"),
                           ("patch", "pods"), ("delete", "pods"), ("create", "pods"), ("list", "controllerrevisions"),
                           ("update", "adaptiveconsumers"), ("delete", "adaptiveconsumers"), ("create", "deployments"),
                           ("create", "roles"), ("patch", "rolebindings"), ("delete", "events"),
                           ("get", "adaptiveconsumers.afc.dev")]:
        assert not can_i(testbed, kubeconfig, verb, resource, *ns), f"may {verb} {resource}"
    assert not can_i(testbed, kubeconfig, "get", "secrets", "-n", "default")
    assert not can_i(testbed, kubeconfig, "list", "adaptiveconsumers.afc.dev", "--all-namespaces")
    assert not can_i(testbed, kubeconfig, "create", "customresourcedefinitions.apiextensions.k8s.io")
    assert not can_i(testbed, kubeconfig, "list", "namespaces")
    r = as_sa(testbed, kubeconfig, "delete", "statefulset/orders", *ns)
    assert r.returncode != 0 and "forbidden" in r.stderr.lower()
    r = as_sa(testbed, kubeconfig, "create", "secret", "generic", "stolen", "--from-literal=a=b", *ns)
    assert r.returncode != 0 and "forbidden" in r.stderr.lower()
    # what the ServiceAccount may do, as the apiserver lists it, for the resources it touches
    table = as_sa(testbed, kubeconfig, "auth", "can-i", "--list", *ns, check=True).stdout
    listed: dict[str, set[str]] = {}
    for line in table.splitlines()[1:]:
        m = re.match(r"^(\S+)\s+\[.*?\]\s+\[.*?\]\s+\[(.*)\]\s*$", line)
        if m:
            listed[m.group(1)] = set(m.group(2).split())
    for (group, resource), verbs in EXPECTED_RULES.items():
        name = resource if not group else f"{resource.split('/')[0]}.{group}" + (
            f"/{resource.split('/')[1]}" if "/" in resource else "")
        assert listed.get(name) == verbs, f"{name}: {listed.get(name)}"


def test_a_forbidden_call_degrades_and_is_retried(
        testbed: Testbed, api: Kube, core, crd_installed: None, namespace: str, names, make_topic,
        tmp_path: Path) -> None:
    """A Role without the PodDisruptionBudget rule: Degraded/Forbidden, retried with backoff,
    recovered once the rule is granted; the other objects are served meanwhile."""
    docs = render_install(testbed, tmp_path, MANIFESTS, namespace)
    role = next(d for d in docs if d["kind"] == "Role")
    role["rules"] = [r for r in role["rules"] if "poddisruptionbudgets" not in r["resources"]]
    apply_docs(testbed, [d for d in docs if d["kind"] != "Deployment"])
    kubeconfig = token_kubeconfig(testbed, tmp_path, namespace, "afc-operator")
    topic = make_topic("orders")
    with OperatorProcess(["--namespace", namespace], str(kubeconfig), tmp_path / "operator.log", env=FAST) as op:
        testbed.run_kubectl("apply", "-f", "-", input=json.dumps(consumer(testbed, names, topic, namespace)))
        degraded = op.wait_until(lambda: (c := condition(api, namespace, "Degraded")).get("reason") == "Forbidden" and c,
                                 30, "Degraded/Forbidden")
        assert "poddisruptionbudgets" in degraded["message"] and "403" in degraded["message"]
        assert api.request("GET", path_for("StatefulSet", namespace, "orders"))  # applied before the PDB
        tries = op.wait_until(lambda: (n := sum(1 for r in op.records() if r.get("problem") == "Forbidden")) >= 3 and n,
                              30, "retries")
        assert tries >= 3 and op.alive

        full_role = next(d for d in render_install(testbed, tmp_path / "full", MANIFESTS, namespace) if d["kind"] == "Role")
        apply_docs(testbed, [full_role])

        def recovered() -> bool:
            mark_pods_ready(core, namespace, SELECTOR)
            return condition(api, namespace, "Ready").get("status") == "True"
        op.wait_until(recovered, 30, "recovery once the Role allows PodDisruptionBudgets")
        assert api.request("GET", path_for("PodDisruptionBudget", namespace, "orders"))
        assert condition(api, namespace, "Degraded")["status"] == "False"
        delete_consumers(admin(testbed), namespace)


@pytest.fixture
def second_namespace(core) -> Iterator[str]:
    from kubernetes import client
    name = f"t-other-{uuid.uuid4().hex[:6]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels={"afc.dev/test": "true"})))
    yield name
    core.delete_namespace(name, propagation_policy="Background")


def test_cluster_wide_install_serves_every_namespace(
        testbed: Testbed, api: Kube, core, crd_installed: None, namespace: str, second_namespace: str, names,
        make_topic, tmp_path: Path) -> None:
    prefix = f"{names.stem[:30]}-"
    docs = render_install(testbed, tmp_path, MANIFESTS / "cluster-wide", namespace, prefix=prefix)
    assert {d["kind"] for d in docs} == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment"}
    cluster_scoped = [d for d in docs if d["kind"].startswith("Cluster")]
    try:
        apply_docs(testbed, docs)
        sa = f"{prefix}afc-operator"
        kubeconfig = token_kubeconfig(testbed, tmp_path, namespace, sa)
        assert can_i(testbed, kubeconfig, "patch", "statefulsets", "-n", second_namespace)
        assert can_i(testbed, kubeconfig, "list", "adaptiveconsumers.afc.dev", "--all-namespaces")
        assert not can_i(testbed, kubeconfig, "list", "secrets", "--all-namespaces")
        assert not can_i(testbed, kubeconfig, "delete", "statefulsets", "-n", second_namespace)
        assert not can_i(testbed, kubeconfig, "list", "namespaces")
        topic = make_topic("orders")
        with OperatorProcess(["--all-namespaces"], str(kubeconfig), tmp_path / "operator.log", env=FAST) as op:
            for ns in (namespace, second_namespace):
                testbed.run_kubectl("apply", "-f", "-", input=json.dumps(consumer(testbed, names, topic, ns)))
            for ns in (namespace, second_namespace):
                def is_ready(ns: str = ns) -> bool:
                    mark_pods_ready(core, ns, SELECTOR)
                    return condition(api, ns, "Ready").get("status") == "True"
                op.wait_until(is_ready, 60, f"Ready in {ns}")
            assert [line for line in forbidden_lines(op) if namespace in line or second_namespace in line] == []
            for ns in (namespace, second_namespace):
                delete_consumers(admin(testbed), ns)
    finally:
        for d in cluster_scoped:
            testbed.run_kubectl("delete", d["kind"].lower(), d["metadata"]["name"], "--ignore-not-found", check=False)
