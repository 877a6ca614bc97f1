"""The test bed's node agent (scripts/nodeagent.py) against the real control plane: pods go
through the real scheduler and StatefulSet controller onto the agent's Node and run as
local processes.

One agent runs for the module, as its CLI in a subprocess, on a Node with a unique name and
a taint: only these tests' pods (which tolerate it and select the node) land on it, so pods
of tests that run side by side on the shared bed never do.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from afctest import ROOT, Testbed, wait_for

pytestmark = [pytest.mark.k8s]


def load_nodeagent() -> Any:
    if "nodeagent" in sys.modules:
        return sys.modules["nodeagent"]
    spec = importlib.util.spec_from_file_location("nodeagent", ROOT / "scripts" / "nodeagent.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["nodeagent"] = mod
    spec.loader.exec_module(mod)
    return mod


na = load_nodeagent()


Agent = na.NodeAgentProcess
# Files at fixed paths need private mount namespaces (root); without them the agent falls
# back to rewriting env (tested below) and these tests cannot hold.
needs_mountns = pytest.mark.skipif(not na.mountns_available(), reason="no private mount namespaces here (not root)")


@pytest.fixture(scope="module")
def agent(testbed: Testbed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    node = f"na-{uuid.uuid4().hex[:6]}"
    d = tmp_path_factory.mktemp("nodeagent")
    with Agent(node, d / "state", d / "agent.log", testbed.kubeconfig, taint=True,
               args=["--backoff-initial", "1", "--backoff-max", "8", "--heartbeat", "2"]) as a:
        yield a
    # stopping the agent stops every process it ran and removes its Node
    assert not na.agent_processes(node), "processes of the agent's pods outlived it"
    r = testbed.run_kubectl("get", "node", node, check=False)
    assert r.returncode != 0 and "NotFound" in r.stderr


def kubectl_json(testbed: Testbed, *args: str) -> dict[str, Any]:
    return json.loads(testbed.run_kubectl(*args, "-o", "json").stdout)


def apply(testbed: Testbed, namespace: str, *objs: dict[str, Any]) -> None:
    testbed.run_kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                               "items": list(objs)}))


def pod(testbed: Testbed, namespace: str, name: str) -> dict[str, Any] | None:
    r = testbed.run_kubectl("get", "pod", "-n", namespace, name, "-o", "json", check=False)
    return json.loads(r.stdout) if r.returncode == 0 else None


def is_ready(p: dict[str, Any] | None) -> bool:
    if not p or p["status"].get("phase") != "Running":
        return False
    return any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions") or [])


def http_json(port: int, path: str = "/") -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return json.loads(r.read())


def test_node_is_ready_schedulable_and_renews_its_lease(testbed: Testbed, agent: Agent) -> None:
    node = kubectl_json(testbed, "get", "node", agent.node)
    ready = next(c for c in node["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"
    assert node["status"]["allocatable"]["cpu"] == "16" and node["status"]["allocatable"]["pods"] == "110"
    assert node["metadata"]["labels"]["kubernetes.io/hostname"] == agent.node
    # only the agent's own taint: no node.kubernetes.io/not-ready left to block scheduling
    assert [t["key"] for t in node["spec"].get("taints") or []] == [Agent.TAINT_KEY]
    lease = kubectl_json(testbed, "get", "lease", "-n", "kube-node-lease", agent.node)
    assert lease["spec"]["holderIdentity"] == agent.node
    assert lease["metadata"]["ownerReferences"][0]["uid"] == node["metadata"]["uid"]
    first = lease["spec"]["renewTime"]
    wait_for(lambda: kubectl_json(testbed, "get", "lease", "-n", "kube-node-lease", agent.node)["spec"]["renewTime"]
             != first, timeout=10, interval=0.5, what="the Lease renewed (every 2 s here)")


# A small server: reports what it sees (env, files) as JSON on $PORT, says so on SIGTERM.
SERVER = """
import http.server, json, os, pathlib, signal, sys, time
def files(d):
    p = pathlib.Path(d)
    return {f.name: f.read_text() for f in sorted(p.iterdir()) if f.is_file()} if p.is_dir() else None
info = {"env": {k: v for k, v in os.environ.items() if k.startswith(("T_", "CFG_"))},
        "config_volume": files("/etc/t/config"), "secret_volume": files("/etc/t/secret"),
        "pid": os.getpid(), "port": os.environ["PORT"]}
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps(info).encode()
        self.send_response(200); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
def term(*a):
    print("got SIGTERM", flush=True); time.sleep(0.3); sys.exit(0)
signal.signal(signal.SIGTERM, term)
print("serving on", os.environ["PORT"], flush=True)
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"""


def server_container(name: str = "app") -> dict[str, Any]:
    return {
        "name": name, "image": "python:3.11-slim", "command": ["python3", "-c", SERVER],
        "env": [{"name": "PORT", "value": "8080"}],
        "ports": [{"name": "http", "containerPort": 8080}],
        "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
        "livenessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 5},
    }


def mapped_port(p: dict[str, Any], container: str = "app", port: str = "http") -> int:
    return json.loads(p["metadata"]["annotations"][na.PORTS_ANNOTATION])[container][port]


# ---------------------------------------------------------------------------------------------

@needs_mountns
def test_pod_runs_ready_with_downward_api_configmap_and_secret(testbed: Testbed, agent: Agent,
                                                                namespace: str) -> None:
    c = server_container()
    c["env"] += [
        {"name": "T_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "T_POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "T_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "T_NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "T_TEAM", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['team']"}}},
        {"name": "T_MEM_MI", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}},
        {"name": "T_COLOR", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "color"}}},
        {"name": "T_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
        {"name": "T_GREETING", "value": "hi $(T_POD_NAME)"},
        {"name": "T_LISTEN", "value": "0.0.0.0:8080"},
    ]
    c["envFrom"] = [{"configMapRef": {"name": "settings"}, "prefix": "CFG_"}, {"secretRef": {"name": "creds"}, "prefix": "T_S_"}]
    c["resources"] = {"limits": {"memory": "64Mi"}}
    # an exec probe runs inside the pod's mount namespace: it sees the ConfigMap volume
    c["startupProbe"] = {"exec": {"command": ["test", "-f", "/etc/t/config/color"]}, "periodSeconds": 1}
    c["volumeMounts"] = [{"name": "config", "mountPath": "/etc/t/config", "readOnly": True},
                         {"name": "secret", "mountPath": "/etc/t/secret", "readOnly": True}]
    objs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"},
         "data": {"color": "blue", "size": "L"}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"}, "stringData": {"password": "s3cret"}},
    ]
    for name in ("web-a", "web-b"):  # the same containerPort twice on one host
        objs.append({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"team": "afc"}},
                     "spec": {**agent.placement(), "terminationGracePeriodSeconds": 5, "containers": [c],
                              "volumes": [{"name": "config", "configMap": {"name": "settings"}},
                                          {"name": "secret", "secret": {"secretName": "creds"}}]}})
    apply(testbed, namespace, *objs)
    pods = {n: wait_for(lambda n=n: (p := pod(testbed, namespace, n)) and is_ready(p) and p, timeout=40,
                        what=f"pod {n} Running and Ready") for n in ("web-a", "web-b")}

    ports = {n: mapped_port(p) for n, p in pods.items()}
    assert ports["web-a"] != ports["web-b"] and 8080 not in ports.values()
    for n, p in pods.items():
        assert p["spec"]["nodeName"] == agent.node  # bound by the real scheduler
        assert p["status"]["podIP"] == "127.0.0.1"
        (st,) = p["status"]["containerStatuses"]
        assert st["ready"] and st["started"] and "running" in st["state"] and st["restartCount"] == 0
        seen = http_json(ports[n])
        assert seen["port"] == str(ports[n])  # literal "8080" rewritten to the pod's own host port
        env = seen["env"]
        assert env["T_POD_NAME"] == n and env["T_POD_NAMESPACE"] == namespace
        assert env["T_POD_IP"] == "127.0.0.1" and env["T_NODE"] == agent.node and env["T_TEAM"] == "afc"
        assert env["T_MEM_MI"] == "64"
        assert env["T_COLOR"] == "blue" and env["T_PASSWORD"] == "s3cret"
        assert env["CFG_color"] == "blue" and env["CFG_size"] == "L" and env["T_S_password"] == "s3cret"
        assert env["T_GREETING"] == f"hi {n}"
        assert env["T_LISTEN"] == f"0.0.0.0:{ports[n]}"
        assert seen["config_volume"] == {"color": "blue", "size": "L"}
        assert seen["secret_volume"] == {"password": "s3cret"}
        assert "serving on" in agent.pod_log(namespace, n, "app")
    # the volumes are mounted only inside the pods' mount namespaces
    assert not any(Path("/etc/t/config").iterdir())


def test_statefulset_runs_through_scheduler_and_scales_to_zero_with_sigterm(
        testbed: Testbed, agent: Agent, namespace: str) -> None:
    sts = {
        "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "db"},
        "spec": {"replicas": 2, "serviceName": "db", "podManagementPolicy": "Parallel",
                 "selector": {"matchLabels": {"app": "db"}},
                 "template": {"metadata": {"labels": {"app": "db"}},
                              "spec": {**agent.placement(), "terminationGracePeriodSeconds": 10,
                                       "containers": [server_container()]}}},
    }
    apply(testbed, namespace, sts)
    names = ("db-0", "db-1")
    pods = {n: wait_for(lambda n=n: (p := pod(testbed, namespace, n)) and is_ready(p) and p, timeout=60,
                        what=f"StatefulSet pod {n} Running and Ready") for n in names}
    wait_for(lambda: kubectl_json(testbed, "get", "statefulset", "-n", namespace, "db")["status"]
             .get("readyReplicas") == 2, timeout=30, what="the StatefulSet counting 2 ready replicas")
    uids = {n: p["metadata"]["uid"] for n, p in pods.items()}
    for n in names:
        assert agent.processes(uids[n]), f"no process runs pod {n}"
        assert http_json(mapped_port(pods[n]))["port"] == str(mapped_port(pods[n]))

    t0 = time.monotonic()
    testbed.run_kubectl("scale", "statefulset", "-n", namespace, "db", "--replicas=0")
    wait_for(lambda: all(pod(testbed, namespace, n) is None for n in names), timeout=40,
             what="the StatefulSet's pods to disappear")
    took = time.monotonic() - t0
    for n in names:
        assert "got SIGTERM" in agent.pod_log(namespace, n, "app"), agent.pod_log(namespace, n, "app")
        assert not agent.processes(uids[n]), f"pod {n}'s processes outlived it"
    assert took < 10, f"graceful stop took {took:.1f}s: the processes exit on SIGTERM at once"


def test_a_process_that_ignores_sigterm_is_killed_after_the_grace_period(
        testbed: Testbed, agent: Agent, namespace: str) -> None:
    script = ("import signal, time; signal.signal(signal.SIGTERM, lambda *a: print('ignoring SIGTERM', flush=True)); "
              "print('up', flush=True); time.sleep(600)")
    apply(testbed, namespace, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "stubborn"}, "spec": {
        **agent.placement(), "terminationGracePeriodSeconds": 3,
        "containers": [{"name": "app", "image": "python:3.11-slim", "command": ["python3", "-c", script]}]}})
    p = wait_for(lambda: (p := pod(testbed, namespace, "stubborn")) and is_ready(p) and p, timeout=40, what="Ready")
    uid = p["metadata"]["uid"]
    wait_for(lambda: "up" in agent.pod_log(namespace, "stubborn", "app"), timeout=10, what="the process up")
    t0 = time.monotonic()
    testbed.run_kubectl("delete", "pod", "-n", namespace, "stubborn", "--wait=false")
    wait_for(lambda: pod(testbed, namespace, "stubborn") is None, timeout=20, what="the pod gone")
    took = time.monotonic() - t0
    assert "ignoring SIGTERM" in agent.pod_log(namespace, "stubborn", "app")
    assert 2.5 <= took < 8, f"deletion took {took:.1f}s for a 3 s grace period"
    assert not agent.processes(uid)


def test_crashing_container_goes_into_crash_loop_back_off(testbed: Testbed, agent: Agent, namespace: str) -> None:
    apply(testbed, namespace, {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "crash"},
        "spec": {**agent.placement(), "containers": [{
            "name": "app", "image": "python:3.11-slim",
            "command": ["python3", "-c", "import sys; print('starting and failing', flush=True); sys.exit(1)"]}]}})
    seen_backoffs: list[str] = []
    counts: list[int] = []

    def crash_looping() -> bool:
        p = pod(testbed, namespace, "crash")
        st = ((p or {}).get("status") or {}).get("containerStatuses") or [{}]
        waiting = st[0].get("state", {}).get("waiting") or {}
        counts.append(int(st[0].get("restartCount") or 0))
        if waiting.get("reason") == "CrashLoopBackOff":
            msg = waiting["message"].split()[1]  # "back-off 4s restarting failed container=..."
            if msg not in seen_backoffs:
                seen_backoffs.append(msg)
            assert st[0]["lastState"]["terminated"]["exitCode"] == 1
            assert st[0]["lastState"]["terminated"]["reason"] == "Error"
        return len(seen_backoffs) >= 3

    wait_for(crash_looping, timeout=45, interval=0.3, what="three growing back-off delays")
    assert seen_backoffs[:3] == ["1s", "2s", "4s"], seen_backoffs
    assert counts == sorted(counts) and counts[-1] >= 3, counts
    out = kubectl_json(testbed, "get", "pod", "-n", namespace, "crash")
    assert out["status"]["phase"] == "Running"  # restartPolicy Always: never a terminal phase
    assert agent.pod_log(namespace, "crash", "app").count("starting and failing") >= 3
    # `kubectl get pod` shows it the way users know it
    assert "CrashLoopBackOff" in testbed.run_kubectl("get", "pod", "-n", namespace, "crash").stdout


@needs_mountns
def test_service_account_token_is_mounted_at_the_fixed_path_and_authenticates(
        testbed: Testbed, agent: Agent, namespace: str) -> None:
    sa_dir = na.SA_DIR
    apply(testbed, namespace, {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "reader"}})
    script = (f"import os, pathlib; d = pathlib.Path('{sa_dir}'); "
              "print('files', sorted(p.name for p in d.iterdir()), flush=True); "
              "print('namespace', (d / 'namespace').read_text(), flush=True); "
              "os.execvp(os.environ['KUBECTL'], [os.environ['KUBECTL'], 'auth', 'whoami', '-o', 'json'])")
    apply(testbed, namespace, {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "whoami"},
        "spec": {**agent.placement(), "serviceAccountName": "reader", "restartPolicy": "Never",
                 "containers": [{"name": "app", "image": "python:3.11-slim", "command": ["python3", "-c", script],
                                 "env": [{"name": "KUBECTL", "value": testbed.kubectl}]}]}})
    p = wait_for(lambda: (p := pod(testbed, namespace, "whoami")) and p["status"].get("phase") in ("Succeeded", "Failed")
                 and p, timeout=40, what="the whoami pod to finish")
    out = agent.pod_log(namespace, "whoami", "app")
    assert p["status"]["phase"] == "Succeeded", out
    (st,) = p["status"]["containerStatuses"]
    assert st["state"]["terminated"]["exitCode"] == 0 and st["state"]["terminated"]["reason"] == "Completed"
    assert "files ['ca.crt', 'namespace', 'token']" in out and f"namespace {namespace}" in out
    review = json.loads(out[out.index("{"):])
    assert review["status"]["userInfo"]["username"] == f"system:serviceaccount:{namespace}:reader"
    # the token is bound to the pod (a TokenRequest with the pod as bound object)
    extra = review["status"]["userInfo"].get("extra") or {}
    assert extra.get("authentication.kubernetes.io/pod-name") == ["whoami"], extra
    # ...and lives only in the pod's mount namespace
    assert not os.path.exists(f"{sa_dir}/token")


@needs_mountns
def test_init_containers_run_in_order_before_the_container_and_share_its_volumes(
        testbed: Testbed, agent: Agent, namespace: str) -> None:
    step = "import pathlib, sys; p = pathlib.Path('/data/steps'); p.write_text(p.read_text() + sys.argv[1] + ' ') if p.exists() else p.write_text(sys.argv[1] + ' ')"
    # the second init container fails once (no marker yet), then succeeds: a restart with back-off
    flaky = ("import pathlib, sys; m = pathlib.Path('/data/tried'); "
             "sys.exit(0) if m.exists() else (m.write_text('x'), sys.exit(3))")
    apply(testbed, namespace, {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "inits"},
        "spec": {**agent.placement(), "restartPolicy": "Always", "volumes": [{"name": "data", "emptyDir": {}}],
                 "initContainers": [
                     {"name": "one", "image": "python:3.11-slim", "command": ["python3", "-c", step, "one"],
                      "volumeMounts": [{"name": "data", "mountPath": "/data"}]},
                     {"name": "two", "image": "python:3.11-slim", "command": ["python3", "-c", flaky],
                      "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
                 "containers": [{
                     "name": "app", "image": "python:3.11-slim",
                     "command": ["python3", "-c", "import pathlib, time; print('saw', pathlib.Path('/data/steps')"
                                 ".read_text(), flush=True); time.sleep(600)"],
                     "volumeMounts": [{"name": "data", "mountPath": "/data"}]}]}})
    p = wait_for(lambda: (p := pod(testbed, namespace, "inits")) and is_ready(p) and p, timeout=40,
                 what="the pod Running after its init containers")
    one, two = p["status"]["initContainerStatuses"]
    assert one["state"]["terminated"]["reason"] == "Completed" and one["restartCount"] == 0
    assert two["state"]["terminated"]["reason"] == "Completed" and two["restartCount"] == 1
    assert two["lastState"]["terminated"]["exitCode"] == 3
    assert any(c["type"] == "Initialized" and c["status"] == "True" for c in p["status"]["conditions"])
    wait_for(lambda: "saw one" in agent.pod_log(namespace, "inits", "app"), timeout=10, what="the app's output")


def test_liveness_failure_restarts_the_container(testbed: Testbed, agent: Agent, namespace: str) -> None:
    # healthy for the first two liveness probes, then 500 for ever: the agent must kill and restart it
    script = """
import http.server, os, sys
n = 0
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        global n
        n += 1
        self.send_response(200 if n <= 2 else 500); self.end_headers()
    def log_message(self, *a): pass
print("up", flush=True)
http.server.HTTPServer(("127.0.0.1", int(os.environ["AFC_NODEAGENT_PORT_HEALTH"])), H).serve_forever()
"""
    apply(testbed, namespace, {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "sick"},
        "spec": {**agent.placement(), "terminationGracePeriodSeconds": 2, "containers": [{
            "name": "app", "image": "python:3.11-slim", "command": ["python3", "-c", script],
            "ports": [{"name": "health", "containerPort": 9000}],
            "livenessProbe": {"httpGet": {"path": "/healthz", "port": "health"}, "periodSeconds": 1,
                              "failureThreshold": 2}}]}})

    def restarted() -> dict[str, Any] | None:
        p = pod(testbed, namespace, "sick")
        st = ((p or {}).get("status") or {}).get("containerStatuses") or [{}]
        return st[0] if st[0].get("restartCount", 0) >= 1 and st[0].get("lastState") else None

    st = wait_for(restarted, timeout=30, what="a restart after failed liveness probes")
    last = st["lastState"]["terminated"]
    assert "liveness probe failed" in last.get("message", ""), last
    assert last["exitCode"] == 128 + 15  # SIGTERM ended it (the server has no handler)
    wait_for(lambda: agent.pod_log(namespace, "sick", "app").count("up") >= 2, timeout=10, what="the restarted process")
    reasons = [e["reason"] for e in kubectl_json(testbed, "get", "events", "-n", namespace)["items"]]
    assert "Unhealthy" in reasons and "Killing" in reasons


@pytest.mark.kafka
@pytest.mark.redis
def test_statefulset_the_operator_renders_runs_afc_consumers(
        testbed: Testbed, agent: Agent, namespace: str, names, make_topic, redis_client) -> None:
    """The image mapping end to end: the operator's own StatefulSet (render.desired_objects),
    config file from the ConfigMap volume at /etc/afc/config, probes on the runtime's port."""
    import yaml
    from confluent_kafka import Producer

    from afc.operator.render import Owner, desired_objects, parse_spec

    topic = make_topic("in", partitions=4)
    hits = f"{names.redis_prefix}hits"
    spec = yaml.safe_load((ROOT / "manifests" / "samples" / "afc_v1alpha1_adaptiveconsumer.yaml").read_text())["spec"]
    spec["kafka"].update(bootstrapServers=testbed.bootstrap, topics=[topic], groupId=names.group)
    spec["handler"] = {"handler": "afc_test_handlers:count_runs"}
    spec.update(replicas=2, minReplicas=1, maxReplicas=2)
    spec["idempotency"] = {"redisUrlSecretRef": {"name": "redis", "key": "url"},
                           "keyPrefix": names.redis_prefix.rstrip(":")}
    spec["podTemplate"] = {**agent.placement(), "env": [{"name": "PYTHONPATH", "value": str(ROOT / "tests")}]}
    spec.pop("scaling", None)
    objs = desired_objects(Owner("orders", namespace, str(uuid.uuid4())), parse_spec(spec))
    for o in objs:
        o["metadata"].pop("ownerReferences", None)  # no AdaptiveConsumer here: the GC would take them
        if o["kind"] == "StatefulSet":  # what the test handler needs (AFC_* is the operator's in the spec)
            o["spec"]["template"]["spec"]["containers"][0]["env"] += [
                {"name": "AFC_TEST_REDIS_URL", "value": testbed.redis_url}, {"name": "AFC_TEST_HASH", "value": hits}]
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "redis"}, "stringData": {"url": testbed.redis_url}}
    apply(testbed, namespace, secret, *objs)

    names_ = ("orders-0", "orders-1")
    pods = {n: wait_for(lambda n=n: (p := pod(testbed, namespace, n)) and is_ready(p) and p, timeout=90,
                        what=f"consumer pod {n} Ready (its /readyz)") for n in names_}
    ports = {n: mapped_port(p, "consumer", "http") for n, p in pods.items()}
    assert len(set(ports.values())) == 2
    for n in names_:
        with urllib.request.urlopen(f"http://127.0.0.1:{ports[n]}/metrics", timeout=5) as r:
            assert r.status == 200

    p = Producer({"bootstrap.servers": testbed.bootstrap})
    for i in range(40):
        p.produce(topic, value=json.dumps({"n": i}).encode(), key=str(i).encode(), partition=i % 4)
    assert p.flush(30) == 0
    wait_for(lambda: redis_client.hlen(hits) == 40, timeout=60, what="40 messages handled by the two pods")
    uids = [p["metadata"]["uid"] for p in pods.values()]
    testbed.run_kubectl("scale", "statefulset", "-n", namespace, "orders", "--replicas=0")
    wait_for(lambda: all(pod(testbed, namespace, n) is None for n in names_), timeout=60,
             what="the consumer pods to drain and go")
    for n, uid in zip(names_, uids):
        assert not agent.processes(uid)
        out = agent.pod_log(namespace, n, "consumer")
        assert "event=signal signal=SIGTERM action=drain" in out, out[-2000:]


def crd_properties(crd: dict[str, Any]) -> set[str]:
    return set(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"])


@pytest.mark.kafka
@pytest.mark.redis
@needs_mountns
def test_operator_from_manifests_runs_as_a_pod_and_its_consumers_run_too(
        testbed: Testbed, agent: Agent, namespace: str, names, make_topic, redis_client) -> None:
    """The install path a user takes: `kubectl kustomize manifests/` (ServiceAccount, Role,
    RoleBinding, Deployment) in a namespace of its own; the operator pod authenticates with
    its mounted service-account token, and the AdaptiveConsumer it reconciles gets pods.

    The CRD is cluster-wide and shared by every branch testing on this bed: it is applied
    only when missing (re-applying it would break other branches' runs), and the consumer
    half is skipped when the installed CRD is another branch's version."""
    import yaml
    crd_file = yaml.safe_load((ROOT / "crds" / "afc.dev_adaptiveconsumers.yaml").read_text())
    r = testbed.run_kubectl("get", "crd", "adaptiveconsumers.afc.dev", "-o", "json", check=False)
    if r.returncode != 0:
        testbed.run_kubectl("apply", "--server-side", "-f", str(ROOT / "crds" / "afc.dev_adaptiveconsumers.yaml"))
        testbed.wait_established("adaptiveconsumers.afc.dev")
        installed = crd_file
    else:
        installed = json.loads(r.stdout)
    objs = list(yaml.safe_load_all(testbed.run_kubectl("kustomize", str(ROOT / "manifests")).stdout))
    install = []
    for o in objs:
        if o["kind"] == "Namespace":
            continue
        o["metadata"]["namespace"] = namespace
        for s in o.get("subjects") or []:
            s["namespace"] = namespace
        if o["kind"] == "Deployment":
            o["spec"]["template"]["spec"].update(agent.placement())
        install.append(o)
    apply(testbed, namespace, *install)
    sel = "app.kubernetes.io/name=afc-operator"

    def operator_ready() -> dict[str, Any] | None:
        items = kubectl_json(testbed, "get", "pods", "-n", namespace, "-l", sel)["items"]
        return next((p for p in items if is_ready(p)), None)

    try:
        op = wait_for(operator_ready, timeout=60, what="the operator pod Ready (its /healthz)")
    except AssertionError as e:           # say why: the pods' phases and the operator's log
        pods = kubectl_json(testbed, "get", "pods", "-n", namespace, "-l", sel)["items"]
        logs = "\n".join(f"--- {p['metadata']['name']} {p.get('status', {}).get('phase')}\n"
                         + agent.pod_log(namespace, p["metadata"]["name"], "operator")[-3000:] for p in pods)
        raise AssertionError(f"{e}\n{logs or '(no operator pod)'}") from None
    op_log = lambda: agent.pod_log(namespace, op["metadata"]["name"], "operator")  # noqa: E731
    assert op["spec"]["serviceAccountName"] == "afc-operator"
    health = mapped_port(op, "operator", "health")
    assert health != 8081
    with urllib.request.urlopen(f"http://127.0.0.1:{health}/healthz", timeout=5) as r:
        assert r.status == 200

    if crd_properties(installed) != crd_properties(crd_file):
        pytest.skip("the test bed's AdaptiveConsumer CRD is another branch's (spec fields "
                    f"{sorted(crd_properties(installed) ^ crd_properties(crd_file))} differ); "
                    "the operator pod ran and authenticated, the consumer half needs this branch's CRD")
    topic = make_topic("in", partitions=2)
    hits = f"{names.redis_prefix}hits"
    ac = yaml.safe_load((ROOT / "manifests" / "samples" / "afc_v1alpha1_adaptiveconsumer.yaml").read_text())
    ac["spec"]["kafka"].update(bootstrapServers=testbed.bootstrap, topics=[topic], groupId=names.group)
    ac["spec"]["handler"] = {"handler": "na_handlers:record"}
    ac["spec"].update(replicas=2, minReplicas=2, maxReplicas=2)
    ac["spec"]["podTemplate"] = {**agent.placement(), "env": [
        {"name": "PYTHONPATH", "value": str(ROOT / "tests" / "nodeagent")},
        {"name": "NA_REDIS_URL", "value": testbed.redis_url}, {"name": "NA_HASH", "value": hits}]}
    apply(testbed, namespace, ac)
    for n in ("orders-0", "orders-1"):
        wait_for(lambda n=n: is_ready(pod(testbed, namespace, n)), timeout=90,
                 what=f"consumer pod {n} (made by the operator pod) Ready\n{op_log()[-3000:]}")
    from confluent_kafka import Producer
    p = Producer({"bootstrap.servers": testbed.bootstrap})
    for i in range(20):
        p.produce(topic, value=json.dumps({"n": i}).encode(), key=str(i).encode(), partition=i % 2)
    assert p.flush(30) == 0
    wait_for(lambda: redis_client.hlen(hits) == 20, timeout=60, what="20 messages handled by the operator's pods")
    assert "Forbidden" not in op_log() and " 403 " not in op_log()
    testbed.run_kubectl("delete", "adaptiveconsumer", "-n", namespace, "orders", "--wait=false")
    wait_for(lambda: all(pod(testbed, namespace, n) is None for n in ("orders-0", "orders-1")), timeout=60,
             what="the consumer pods to go after the AdaptiveConsumer was deleted")


def test_a_killed_agent_leaves_processes_that_its_successor_kills_and_replaces(
        testbed: Testbed, namespace: str, tmp_path: Path) -> None:
    """A SIGKILLed agent cannot stop its pods' processes; the next agent for the same node
    and state dir kills them before anything else, then runs the pod again."""
    node = f"na-{uuid.uuid4().hex[:6]}"
    first = Agent(node, tmp_path / "state", tmp_path / "agent.log", testbed.kubeconfig, taint=True,
                  args=["--keep-node"])
    try:
        first.start()
        c = server_container()
        apply(testbed, namespace, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web"},
                                   "spec": {**first.placement(), "terminationGracePeriodSeconds": 3, "containers": [c]}})
        p = wait_for(lambda: (p := pod(testbed, namespace, "web")) and is_ready(p) and p, timeout=40, what="web Ready")
        uid = p["metadata"]["uid"]
        old = first.processes(uid)
        assert old
        first.kill()
        time.sleep(0.5)
        assert first.processes(uid) == old  # orphans now
        with Agent(node, tmp_path / "state", tmp_path / "agent.log", testbed.kubeconfig, taint=True) as second:
            assert not any(pid in second.processes(uid) for pid in old)
            assert "killed-orphan" in second.log_path.read_text()
            wait_for(lambda: (p := pod(testbed, namespace, "web")) and is_ready(p)
                     and http_json(mapped_port(p))["pid"] not in old, timeout=40,
                     what="the pod running again under the new agent")
            testbed.run_kubectl("delete", "pod", "-n", namespace, "web", "--wait=false")
            wait_for(lambda: pod(testbed, namespace, "web") is None, timeout=20, what="the pod gone")
        assert not na.agent_processes(node)
    finally:
        first.kill()
        testbed.run_kubectl("delete", "node", node, "--ignore-not-found", check=False)


def test_without_a_mount_namespace_path_env_points_at_the_volumes_host_copy(
        testbed: Testbed, namespace: str, tmp_path: Path) -> None:
    """The documented fallback (--no-mount-ns, or not root): no private mounts, so env values
    under a mountPath are rewritten to the volume's directory on the host."""
    node = f"na-{uuid.uuid4().hex[:6]}"
    with Agent(node, tmp_path / "state", tmp_path / "agent.log", testbed.kubeconfig, taint=True,
               args=["--no-mount-ns"]) as a:
        assert "mountns=False" in a.log_path.read_text()
        apply(testbed, namespace,
              {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"color": "green"}},
              {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "plain"},
               "spec": {**a.placement(), "restartPolicy": "Never",
                        "volumes": [{"name": "cfg", "configMap": {"name": "cfg"}}],
                        "containers": [{
                            "name": "app", "image": "python:3.11-slim",
                            "command": ["python3", "-c", "import os; print('path', os.environ['COLOR_FILE']); "
                                        "print('color', open(os.environ['COLOR_FILE']).read())"],
                            "env": [{"name": "COLOR_FILE", "value": "/etc/na-fallback/color"}],
                            "volumeMounts": [{"name": "cfg", "mountPath": "/etc/na-fallback"}]}]}})
        p = wait_for(lambda: (p := pod(testbed, namespace, "plain")) and p["status"].get("phase") in
                     ("Succeeded", "Failed") and p, timeout=40, what="the pod to finish")
        out = a.pod_log(namespace, "plain", "app")
        assert p["status"]["phase"] == "Succeeded", out
        assert "color green" in out and f"path {a.state_dir}" in out
        assert not os.path.exists("/etc/na-fallback")  # nothing made on the host's fixed paths
    assert not na.agent_processes(node)


def test_the_agent_runs_in_process_as_a_context_manager(testbed: Testbed, namespace: str, tmp_path: Path) -> None:
    node = f"na-{uuid.uuid4().hex[:6]}"
    taint = {"key": Agent.TAINT_KEY, "value": node, "effect": "NoSchedule"}
    with na.NodeAgent(testbed.kubeconfig, node, tmp_path / "state", taints=[taint]) as agent_:
        apply(testbed, namespace, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "once"}, "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node}, "restartPolicy": "OnFailure",
            "tolerations": [{**taint, "operator": "Equal"}],
            "containers": [{"name": "app", "image": "python:3.11-slim", "command": ["python3", "-c", "print('done')"]}]}})
        p = wait_for(lambda: (p := pod(testbed, namespace, "once")) and p["status"].get("phase") == "Succeeded" and p,
                     timeout=40, what="the pod Succeeded")
        assert p["status"]["containerStatuses"][0]["state"]["terminated"]["reason"] == "Completed"
        assert agent_.log_path(namespace, "once", "app").read_text() == "done\n"
    assert testbed.run_kubectl("get", "node", node, check=False).returncode != 0


def test_env_expansion_and_port_rewriting_follow_kubernetes() -> None:
    env = {"A": "x", "PORT": "1"}
    assert na.expand("$(A)-$(B)-$$(A)-$$", env) == "x-$(B)-$(A)-$"
    ports = {8080: 31000}
    assert na.rewrite_ports("8080", ports) == "31000"
    assert na.rewrite_ports("http://0.0.0.0:8080/healthz", ports) == "http://0.0.0.0:31000/healthz"
    assert na.rewrite_ports("0.0.0.0:80801", ports) == "0.0.0.0:80801"
    assert na.rewrite_ports("18080", ports) == "18080"
    assert na.parse_taint("a=b:NoSchedule") == {"key": "a", "value": "b", "effect": "NoSchedule"}
    pod_ = {"metadata": {"name": "p", "namespace": "n", "uid": "u", "labels": {"k": "v"}}, "spec": {"nodeName": "nd"}}
    assert [na.field_ref(pod_, f) for f in ("metadata.name", "metadata.labels['k']", "spec.nodeName",
                                            "status.podIP")] == ["p", "v", "nd", "127.0.0.1"]
