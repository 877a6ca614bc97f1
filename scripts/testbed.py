#!/usr/bin/env python3
"""The afc test bed: real Kafka, Redis and a Kubernetes control plane on 127.0.0.1.

Usage: testbed.py up [part ...] | down | status | env | clean

Parts: redis, redis-cluster (six redis-server nodes, 3 masters + 3 replicas, formed once
with `redis-cli --cluster create`), kafka, etcd, kube-apiserver, kube-controller-manager,
kube-scheduler.

`up` starts each part that is not already running and ready (idempotent), waits until it
answers a real request, writes `<state>/env` and prints the environment to use. A part
whose pid file points at a dead process (a half-started bed) is cleaned and restarted.
A port held by something that is not ours is an error that names the port and holder.
If any part fails to come up, every process this invocation started is stopped again; the
error shows the tail of the part's logs (Kafka's own server.log too). Kafka alone gets a
second start when the first does not get ready in time (the first error is printed).

Standard library only: it runs before the project's virtualenv exists.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
STATE = Path(os.environ.get("AFC_TESTBED_DIR", ROOT / ".testbed"))
CACHE = Path(os.environ.get("AFC_CACHE", Path.home() / ".cache" / "afc"))
KAFKA_VERSION = os.environ.get("KAFKA_VERSION", "4.1.2")
K8S_VERSION = os.environ.get("K8S_VERSION", "v1.33.13")
PORT_BASE = int(os.environ.get("AFC_TESTBED_PORT_BASE", "19000"))
HOST = "127.0.0.1"
ADMIN_TOKEN_FILE = "admin.token"
READY_TIMEOUT = float(os.environ.get("AFC_TESTBED_READY_TIMEOUT", "120"))


class TestbedError(Exception):
    """A fault the user can fix; the message says how."""


def log(event: str, **kv: object) -> None:
    fields = " ".join(f"{k}={v}" for k, v in kv.items())
    print(f"testbed event={event} {fields}".rstrip(), file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- ports

# The Redis Cluster part: six nodes (3 masters, 3 replicas). Node i (1-based) serves clients
# on PORT_BASE + 80 + i and talks to the other nodes on its cluster bus, PORT_BASE + 180 + i
# (set explicitly: redis' default, port + 10000, would leave the bed's port range).
CLUSTER_NODES = 6
CLUSTER_NODE_TIMEOUT_MS = 2000      # a dead master is failed over after ~2-4 s
CLUSTER_SLOTS = 16384


def default_ports() -> dict[str, int]:
    p = {
        "kafka": PORT_BASE + 92, "kafka_controller": PORT_BASE + 93, "redis": PORT_BASE + 79,
        "etcd": PORT_BASE + 23, "etcd_peer": PORT_BASE + 24, "apiserver": PORT_BASE + 43,
        "controller_manager": PORT_BASE + 57, "scheduler": PORT_BASE + 59,
    }
    for i in range(1, CLUSTER_NODES + 1):
        p[f"redis_cluster_{i}"] = PORT_BASE + 80 + i
        p[f"redis_cluster_bus_{i}"] = PORT_BASE + 180 + i
    return p


def ports(save: bool = False) -> dict[str, int]:
    """Ports are fixed at the first `up` and kept in the state folder, so later calls agree;
    `status` and `env` only read them (they must not fix ports before `up` does). A part
    added after a bed's first `up` (the Redis Cluster) gets its ports from the current
    PORT_BASE, written to the file at the next `up`."""
    f = STATE / "ports.json"
    saved = json.loads(f.read_text()) if f.exists() else {}
    p = {**default_ports(), **saved}
    if save and p != saved:
        STATE.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(p, indent=1))
    return p


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


def port_holder(port: int) -> str:
    try:
        out = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True,
                             text=True, timeout=5).stdout.strip()
        return out or "unknown process"
    except (OSError, subprocess.SubprocessError):
        return "unknown process"


# --------------------------------------------------------------------------- probes

def http_get(url: str, token: str | None = None, ca: Path | None = None, timeout: float = 2) -> tuple[int, str]:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    ctx = None
    if url.startswith("https"):
        ctx = ssl.create_default_context(cafile=str(ca)) if ca else ssl._create_unverified_context()
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def kafka_metadata_brokers(port: int) -> int:
    """Send a Metadata v4 request by hand and return how many brokers the answer lists."""
    client = b"afc-testbed"
    body = struct.pack(">hhih", 3, 4, 1, len(client)) + client + struct.pack(">i?", 0, False)
    with socket.create_connection((HOST, port), timeout=2) as s:
        s.sendall(struct.pack(">i", len(body)) + body)
        size = struct.unpack(">i", _recv(s, 4))[0]
        data = _recv(s, size)
    # correlation id (4), throttle_time_ms (4), brokers array length (4)
    return struct.unpack(">i", data[8:12])[0]


def _recv(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def redis_ping(port: int) -> bool:
    with socket.create_connection((HOST, port), timeout=2) as s:
        s.sendall(b"PING\r\n")
        return s.recv(16).startswith(b"+PONG")


def redis_cmd(port: int, *args: str, timeout: float = 2) -> str:
    """One command in RESP, for probes: returns a simple or bulk string reply as text,
    raises ValueError on an error reply (and on replies a probe never needs)."""
    req = f"*{len(args)}\r\n".encode() + b"".join(
        f"${len(a.encode())}\r\n".encode() + a.encode() + b"\r\n" for a in args)
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(req)
        f = s.makefile("rb")
        line = f.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError("closed")
        kind, rest = line[:1], line[1:-2].decode(errors="replace")
        if kind in (b"+", b":"):
            return rest
        if kind == b"-":
            raise ValueError(rest)
        if kind == b"$":
            n = int(rest)
            return "" if n < 0 else f.read(n + 2)[:-2].decode(errors="replace")
        raise ValueError(f"unexpected reply {line[:40]!r}")


def cluster_ports() -> list[int]:
    p = ports()
    return [p[f"redis_cluster_{i}"] for i in range(1, CLUSTER_NODES + 1)]


def cluster_info(port: int) -> dict[str, str]:
    return dict(line.split(":", 1) for line in redis_cmd(port, "CLUSTER", "INFO").splitlines() if ":" in line)


def cluster_nodes(port: int) -> list[dict[str, object]]:
    """CLUSTER NODES of one node, parsed: id, port, flags, master id, link state, slots."""
    out = []
    for line in redis_cmd(port, "CLUSTER", "NODES").splitlines():
        f = line.split()
        if len(f) < 8:
            continue
        out.append({"id": f[0], "port": int(f[1].split("@")[0].rsplit(":", 1)[1]), "flags": f[2].split(","),
                    "master": f[3], "link": f[7], "slots": f[8:]})
    return out


def cluster_problems() -> list[str]:
    """What keeps the Redis Cluster from being healthy; empty when it is: every node answers
    and says cluster_state:ok with all 16384 slots assigned and ok, and sees 3 masters that
    serve slots, each with a connected replica, and no node flagged fail."""
    problems = []
    for port in cluster_ports():
        try:
            info = cluster_info(port)
        except (OSError, ValueError, ConnectionError) as e:
            problems.append(f"{port}: {e}")
            continue
        if info.get("cluster_state") != "ok":
            problems.append(f"{port}: cluster_state:{info.get('cluster_state')}")
        for k in ("cluster_slots_assigned", "cluster_slots_ok"):
            if info.get(k) != str(CLUSTER_SLOTS):
                problems.append(f"{port}: {k}:{info.get(k)}")
        if info.get("cluster_known_nodes") != str(CLUSTER_NODES):
            problems.append(f"{port}: cluster_known_nodes:{info.get('cluster_known_nodes')}")
    if problems:
        return problems
    nodes = cluster_nodes(cluster_ports()[0])
    masters = [n for n in nodes if "master" in n["flags"] and n["slots"]]
    replicas = [n for n in nodes if "slave" in n["flags"]]
    if len(masters) != CLUSTER_NODES // 2:
        problems.append(f"{len(masters)} masters with slots")
    for m in masters:
        if not any(r["master"] == m["id"] and r["link"] == "connected" for r in replicas):
            problems.append(f"master {m['port']} has no connected replica")
    problems += [f"{n['port']}: flags {','.join(n['flags'])}" for n in nodes  # type: ignore[arg-type]
                 if {"fail", "fail?", "handshake", "noaddr"} & set(n["flags"])]  # type: ignore[arg-type]
    return problems


# --------------------------------------------------------------------------- parts

@dataclass
class Part:
    name: str
    port_keys: list[str]
    prepare: Callable[[], list[str]]          # returns the command line
    ready: Callable[[], bool]
    needs: list[str] = field(default_factory=list)
    # False: no process of its own; `prepare` acts on the parts it needs (the Redis Cluster's
    # formation) and returns no command; `ready` says when that is done.
    process: bool = True
    # A log the process writes itself, besides its stdout (`logfile`): Kafka logs through
    # log4j2 to its server.log, and its stdout has little more than the start line.
    own_log: Callable[[], Path] | None = None
    # Started once more when the first start does not get ready (see start_and_wait).
    restart_once: bool = False

    @property
    def pidfile(self) -> Path:
        return STATE / "pids" / f"{self.name}.pid"

    @property
    def logfile(self) -> Path:
        return STATE / "logs" / f"{self.name}.log"

    def last_lines(self) -> str:
        """What a start-up error shows: the tail of the stdout log, and of its own log if any."""
        # (with a log of its own, the stdout log has mostly start lines: a few suffice)
        text = f"last lines of {self.logfile}:\n{tail(self.logfile, 4 if self.own_log else 15)}"
        if self.own_log is not None:
            own = self.own_log()
            text += f"\nlast lines of {own}:\n{tail(own, 40)}"
        return text

    def probe(self) -> bool:
        try:
            return bool(self.ready())
        except (OSError, ValueError, ConnectionError, ssl.SSLError, struct.error):
            return False


def k8s_dir() -> Path:
    return STATE / "k8s"


def k8s_bin(name: str) -> str:
    return str(CACHE / "k8s" / K8S_VERSION / "bin" / name)


def admin_token() -> str:
    return (k8s_dir() / ADMIN_TOKEN_FILE).read_text().strip()


def need_binary(path: str, hint: str) -> None:
    if not (shutil.which(path) or os.access(path, os.X_OK)):
        raise TestbedError(f"{path} not found: {hint}")


def kafka_cluster_id() -> str:
    """A random cluster id as Kafka's own `Uuid.randomUuid()` makes it: URL-safe base64 of 16
    random bytes, drawn again while it starts with "-" (the storage tool's argument parser takes
    "-t -abc..." for a missing argument; one id in 64 began so and failed the bed's start)."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def prepare_kafka() -> list[str]:
    need_binary("java", "install a JDK >= 17 (apt-get install openjdk-17-jre-headless)")
    libs = CACHE / "kafka" / KAFKA_VERSION / "libs"
    if not (libs / ".complete").exists():
        raise TestbedError(f"Kafka jars missing in {libs}: run scripts/fetch-kafka.sh (needs mvn)")
    p = ports()
    d = STATE / "kafka"
    d.mkdir(parents=True, exist_ok=True)
    props = d / "server.properties"
    props.write_text("\n".join([
        "process.roles=broker,controller", "node.id=1",
        f"controller.quorum.voters=1@{HOST}:{p['kafka_controller']}",
        f"listeners=PLAINTEXT://{HOST}:{p['kafka']},CONTROLLER://{HOST}:{p['kafka_controller']}",
        f"advertised.listeners=PLAINTEXT://{HOST}:{p['kafka']}",
        "controller.listener.names=CONTROLLER", "inter.broker.listener.name=PLAINTEXT",
        "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        f"log.dirs={d / 'data'}", "num.partitions=1", "num.network.threads=2", "num.io.threads=4",
        "offsets.topic.replication.factor=1", "offsets.topic.num.partitions=8",
        "transaction.state.log.replication.factor=1", "transaction.state.log.min.isr=1",
        "transaction.state.log.num.partitions=4",
        "share.coordinator.state.topic.replication.factor=1", "share.coordinator.state.topic.min.isr=1",
        "group.initial.rebalance.delay.ms=0", "group.min.session.timeout.ms=1000",
        "message.max.bytes=8388608", "replica.fetch.max.bytes=8388608",
        "auto.create.topics.enable=true", "delete.topic.enable=true",
        "log.retention.hours=24", "log.segment.bytes=268435456",
    ]) + "\n")
    log4j = d / "log4j2.properties"
    log4j.write_text("\n".join([
        "status=warn", "appender.f.type=File", "appender.f.name=F",
        f"appender.f.fileName={d / 'server.log'}", "appender.f.layout.type=PatternLayout",
        "appender.f.layout.pattern=[%d] %p %m (%c)%n", "rootLogger.level=INFO",
        "rootLogger.appenderRef.f.ref=F", "logger.kafka.name=kafka", "logger.kafka.level=INFO",
        "logger.state.name=state.change.logger", "logger.state.level=WARN",
    ]) + "\n")
    cp = f"{libs}/*"
    if not (d / "data" / "meta.properties").exists():
        cluster_id = kafka_cluster_id()
        r = subprocess.run(["java", "-Xmx256m", f"-Dlog4j2.configurationFile={log4j}", "-cp", cp,
                            "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(props)],
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise TestbedError(f"kafka storage format failed: {r.stdout}{r.stderr}")
    return ["java", "-Xms256m", "-Xmx512m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={log4j}",
            f"-Dafc.testbed={STATE}", "-cp", cp, "kafka.Kafka", str(props)]


def prepare_redis() -> list[str]:
    need_binary("redis-server", "apt-get install redis-server")
    d = STATE / "redis"
    d.mkdir(parents=True, exist_ok=True)
    return ["redis-server", "--bind", HOST, "--port", str(ports()["redis"]), "--dir", str(d),
            "--save", "", "--appendonly", "no", "--daemonize", "no", "--protected-mode", "yes",
            "--maxmemory", "1gb", "--loglevel", "notice"]


def prepare_cluster_node(i: int) -> list[str]:
    """Node i of the Redis Cluster. Its nodes.conf (the cluster's view: ids, slots, who
    replicates whom) lives in its own folder and survives `down`, so `up` rejoins the same
    cluster instead of forming a new one. No persistence of data, as the single Redis."""
    need_binary("redis-server", "apt-get install redis-server")
    p = ports()
    d = STATE / "redis-cluster" / str(i)
    d.mkdir(parents=True, exist_ok=True)
    return ["redis-server", "--bind", HOST, "--port", str(p[f"redis_cluster_{i}"]), "--dir", str(d),
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-port", str(p[f"redis_cluster_bus_{i}"]),
            "--cluster-node-timeout", str(CLUSTER_NODE_TIMEOUT_MS),
            "--save", "", "--appendonly", "no", "--daemonize", "no", "--protected-mode", "yes",
            "--maxmemory", "256mb", "--loglevel", "notice"]


def form_cluster() -> list[str]:
    """Form the cluster once: while every node knows only itself and serves no slot, run
    `redis-cli --cluster create` (3 masters, 1 replica each). A node that comes back empty
    (its folder removed) while the others form a cluster is added as a replica. A restarted
    cluster (nodes.conf kept) needs nothing: its nodes find each other again, and readiness
    waits for that."""
    need_binary("redis-cli", "apt-get install redis-tools (it comes with redis-server)")
    infos = {port: cluster_info(port) for port in cluster_ports()}
    fresh = [port for port, i in infos.items()
             if i.get("cluster_known_nodes") == "1" and i.get("cluster_slots_assigned") == "0"]
    addrs = [f"{HOST}:{port}" for port in cluster_ports()]
    if len(fresh) == len(infos):
        r = subprocess.run(["redis-cli", "--cluster", "create", *addrs, "--cluster-replicas", "1",
                            "--cluster-yes"], capture_output=True, text=True, timeout=120)
        if r.returncode != 0 or "[OK] All 16384 slots covered" not in r.stdout:
            raise TestbedError(f"redis-cli --cluster create failed ({r.returncode}):\n{r.stdout[-2000:]}{r.stderr}")
        log("formed", part="redis-cluster", nodes=",".join(addrs))
        return []
    formed = [port for port in infos if port not in fresh]
    # The others still know the lost identities of the fresh nodes: forget every id that no
    # running node has, on every formed node (within a minute of each other, or gossip brings
    # it back), or they count more than 6 nodes.
    live = {redis_cmd(port, "CLUSTER", "MYID") for port in cluster_ports()}
    for other in formed:
        for n in cluster_nodes(other):
            if n["id"] not in live:
                try:
                    redis_cmd(other, "CLUSTER", "FORGET", str(n["id"]))
                except ValueError as e:
                    log("forget-refused", part="redis-cluster", node=other, forget=n["id"], error=e)
    for port in fresh:
        r = subprocess.run(["redis-cli", "--cluster", "add-node", f"{HOST}:{port}", f"{HOST}:{formed[0]}",
                            "--cluster-slave"], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise TestbedError(f"redis-cli --cluster add-node {port} failed ({r.returncode}):\n"
                               f"{r.stdout[-2000:]}{r.stderr}")
        log("rejoined", part="redis-cluster", node=port, role="replica")
    return []


def prepare_etcd() -> list[str]:
    need_binary("etcd", "apt-get install etcd-server")
    p = ports()
    peer = f"http://{HOST}:{p['etcd_peer']}"
    client = f"http://{HOST}:{p['etcd']}"
    return ["etcd", "--name", "afc", "--data-dir", str(STATE / "etcd"),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"afc={peer}", "--quota-backend-bytes", str(2 * 1024**3),
            "--snapshot-count", "10000", "--logger", "zap"]


def ensure_pki() -> None:
    """CA, apiserver serving cert, service-account key pair, admin token and kubeconfig."""
    d = k8s_dir()
    d.mkdir(parents=True, exist_ok=True)
    if (d / "kubeconfig").exists():
        return
    need_binary("openssl", "apt-get install openssl")

    def ossl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
         "-days", "3650", "-subj", "/CN=afc-testbed-ca")
    (d / "san.ext").write_text(
        "subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,"
        "DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n"
        "extendedKeyUsage=serverAuth\n")
    ossl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "apiserver.key", "-out", "apiserver.csr",
         "-subj", "/CN=kube-apiserver")
    ossl("x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
         "-out", "apiserver.crt", "-days", "3650", "-extfile", "san.ext")
    ossl("genrsa", "-out", "sa.key", "2048")
    ossl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub")
    token = uuid.uuid4().hex
    (d / ADMIN_TOKEN_FILE).write_text(token + "\n")
    (d / "tokens.csv").write_text(f'{token},afc-admin,afc-admin,"system:masters"\n')
    ca = base64.b64encode((d / "ca.crt").read_bytes()).decode()
    (d / "kubeconfig").write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "afc-testbed",
        "clusters": [{"name": "afc-testbed", "cluster": {
            "server": f"https://{HOST}:{ports()['apiserver']}", "certificate-authority-data": ca}}],
        "users": [{"name": "afc-admin", "user": {"token": token}}],
        "contexts": [{"name": "afc-testbed", "context": {"cluster": "afc-testbed", "user": "afc-admin"}}],
    }, indent=1))


def need_k8s_build() -> None:
    for b in ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl"):
        if not os.access(k8s_bin(b), os.X_OK):
            raise TestbedError(f"{k8s_bin(b)} missing: run scripts/build-k8s.sh (needs go >= 1.24)")


def prepare_apiserver() -> list[str]:
    need_k8s_build()
    ensure_pki()
    d, p = k8s_dir(), ports()
    return [k8s_bin("kube-apiserver"), f"--etcd-servers=http://{HOST}:{p['etcd']}",
            f"--cert-dir={d}", f"--tls-cert-file={d / 'apiserver.crt'}",
            f"--tls-private-key-file={d / 'apiserver.key'}", f"--client-ca-file={d / 'ca.crt'}",
            f"--secure-port={p['apiserver']}", f"--bind-address={HOST}", f"--advertise-address={HOST}",
            "--service-cluster-ip-range=10.0.0.0/24", "--authorization-mode=RBAC",
            f"--token-auth-file={d / 'tokens.csv'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={d / 'sa.pub'}",
            f"--service-account-signing-key-file={d / 'sa.key'}",
            "--allow-privileged=true", "--endpoint-reconciler-type=none",
            "--enable-priority-and-fairness=false", "--event-ttl=1h", "--v=1"]


def kcm_kubeconfig() -> str:
    return str(k8s_dir() / "kubeconfig")


def prepare_controller_manager() -> list[str]:
    need_k8s_build()
    d, p = k8s_dir(), ports()
    return [k8s_bin("kube-controller-manager"), f"--kubeconfig={kcm_kubeconfig()}",
            f"--authentication-kubeconfig={kcm_kubeconfig()}",
            f"--authorization-kubeconfig={kcm_kubeconfig()}",
            "--leader-elect=false", f"--service-account-private-key-file={d / 'sa.key'}",
            f"--root-ca-file={d / 'ca.crt'}", f"--secure-port={p['controller_manager']}",
            f"--bind-address={HOST}", f"--cert-dir={d / 'kcm'}", "--controllers=*",
            "--concurrent-statefulset-syncs=5", "--v=1"]


def prepare_scheduler() -> list[str]:
    need_k8s_build()
    d, p = k8s_dir(), ports()
    return [k8s_bin("kube-scheduler"), f"--kubeconfig={kcm_kubeconfig()}",
            f"--authentication-kubeconfig={kcm_kubeconfig()}",
            f"--authorization-kubeconfig={kcm_kubeconfig()}",
            "--leader-elect=false", f"--secure-port={p['scheduler']}", f"--bind-address={HOST}",
            f"--cert-dir={d / 'scheduler'}", "--v=1"]


def apiserver_ready() -> bool:
    code, body = http_get(f"https://{HOST}:{ports()['apiserver']}/readyz", admin_token(), k8s_dir() / "ca.crt")
    return code == 200 and body.strip() == "ok"


def controller_manager_ready() -> bool:
    code, _ = http_get(f"https://{HOST}:{ports()['controller_manager']}/healthz")
    if code != 200:
        return False
    # The service-account controller creating `default/default` shows it is reconciling.
    code, _ = http_get(f"https://{HOST}:{ports()['apiserver']}/api/v1/namespaces/default/serviceaccounts/default",
                       admin_token(), k8s_dir() / "ca.crt")
    return code == 200


def cluster_node_part(i: int) -> Part:
    return Part(f"redis-cluster-{i}", [f"redis_cluster_{i}", f"redis_cluster_bus_{i}"],
                lambda: prepare_cluster_node(i), lambda: redis_ping(ports()[f"redis_cluster_{i}"]))


CLUSTER_NODE_PARTS = [cluster_node_part(i) for i in range(1, CLUSTER_NODES + 1)]

PARTS: list[Part] = [
    Part("redis", ["redis"], prepare_redis, lambda: redis_ping(ports()["redis"])),
    *CLUSTER_NODE_PARTS,
    Part("redis-cluster", [], form_cluster, lambda: not cluster_problems(),
         needs=[n.name for n in CLUSTER_NODE_PARTS], process=False),
    Part("kafka", ["kafka", "kafka_controller"], prepare_kafka,
         lambda: kafka_metadata_brokers(ports()["kafka"]) >= 1, own_log=lambda: STATE / "kafka" / "server.log",
         restart_once=True),
    Part("etcd", ["etcd", "etcd_peer"], prepare_etcd,
         lambda: '"health":"true"' in http_get(f"http://{HOST}:{ports()['etcd']}/health")[1]),
    Part("kube-apiserver", ["apiserver"], prepare_apiserver, apiserver_ready, needs=["etcd"]),
    Part("kube-controller-manager", ["controller_manager"], prepare_controller_manager,
         controller_manager_ready, needs=["kube-apiserver"]),
    Part("kube-scheduler", ["scheduler"], prepare_scheduler,
         lambda: http_get(f"https://{HOST}:{ports()['scheduler']}/healthz")[0] == 200,
         needs=["kube-apiserver"]),
]
BY_NAME = {p.name: p for p in PARTS}


# --------------------------------------------------------------------------- lifecycle

def stop_pid(pid: int, name: str, timeout: float = 20) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)      # our own child (restarted by `up`): reaped, not left a zombie
        except ChildProcessError:
            pass
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            log("stopped", part=name, pid=pid)
            return
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    log("killed", part=name, pid=pid, reason="no exit after SIGTERM")


def start_part(part: Part) -> int:
    for key in part.port_keys:
        port = ports()[key]
        if port_open(port):
            raise TestbedError(
                f"port {port} ({part.name}) is already taken by {port_holder(port)}; stop that "
                f"process or choose other ports with AFC_TESTBED_PORT_BASE (now {PORT_BASE}) and "
                f"`make testbed-clean`")
    cmd = part.prepare()
    part.logfile.parent.mkdir(parents=True, exist_ok=True)
    part.pidfile.parent.mkdir(parents=True, exist_ok=True)
    with open(part.logfile, "ab") as out:
        out.write(f"\n==== {time.strftime('%F %T')} start {' '.join(cmd)}\n".encode())
        out.flush()
        # A new session: the part outlives this script and is stopped as a group.
        # The state path in the environment marks the process as ours for `pid()`.
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=STATE,
                                env={**os.environ, "AFC_TESTBED_OWNER": str(STATE)})
    part.pidfile.write_text(str(proc.pid))
    log("started", part=part.name, pid=proc.pid, log=part.logfile)
    return proc.pid


def wait_ready(part: Part, pid: int | None) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if part.probe():
            log("ready", part=part.name, pid=pid)
            return
        if pid is not None:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                raise TestbedError(f"{part.name} exited during start-up; {part.last_lines()}")
        time.sleep(0.3)
    if not part.process:
        raise TestbedError(f"{part.name} not ready after {READY_TIMEOUT:.0f}s: "
                           f"{'; '.join(cluster_problems()[:6]) if part.name == 'redis-cluster' else ''}")
    raise TestbedError(f"{part.name} not ready after {READY_TIMEOUT:.0f}s; {part.last_lines()}")


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def owned_pid(part: Part) -> int | None:
    """The recorded pid if that process is alive and ours. Pids get reused, so it must
    also carry our marker: the environment variable, or (redis rewrites its process title
    over its environment) a working directory inside the state folder."""
    try:
        pid = int(part.pidfile.read_text())
        env = Path(f"/proc/{pid}/environ").read_bytes()
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except (OSError, ValueError):
        return None
    ours = f"AFC_TESTBED_OWNER={STATE}".encode() in env or cwd == STATE or STATE in cwd.parents
    return pid if ours else None


def with_needs(names: list[str]) -> set[str]:
    out: set[str] = set()
    todo = list(names)
    while todo:
        n = todo.pop()
        if n not in BY_NAME:
            raise TestbedError(f"unknown part {n!r}; parts: {', '.join(BY_NAME)}")
        if n not in out:
            out.add(n)
            todo.extend(BY_NAME[n].needs)
    return out


def start_and_wait(part: Part, started: list[tuple[Part, int]]) -> None:
    """Start a part and wait until it is ready; a part with `restart_once` that does not get
    ready is stopped and started once more, after its error is printed whole (a Kafka that did
    not come up in 120 s in one of a dozen clean-clone runs, cause unknown: the next one shows its
    server.log, and the run goes on if a second start works). The process goes into `started`,
    for `up` to stop if anything fails."""
    pid = start_part(part)
    started.append((part, pid))
    try:
        wait_ready(part, pid)
    except TestbedError as e:
        if not part.restart_once:
            raise
        print(f"testbed: {e}", file=sys.stderr)
        log("restarting", part=part.name, pid=pid, reason=str(e).splitlines()[0], attempt=2)
        stop_pid(pid, part.name)
        started.pop()
        pid = start_part(part)
        started.append((part, pid))
        wait_ready(part, pid)


def up(only: list[str] | None = None) -> None:
    STATE.mkdir(parents=True, exist_ok=True)
    ports(save=True)
    started: list[tuple[Part, int]] = []
    names = with_needs(only) if only else set(BY_NAME)
    wanted = [p for p in PARTS if p.name in names]
    try:
        for part in wanted:
            if not part.process:
                if part.probe():
                    log("running", part=part.name)
                else:
                    part.prepare()
                    wait_ready(part, None)
                continue
            pid = owned_pid(part)
            if pid and part.probe():
                log("running", part=part.name, pid=pid)
                continue
            if pid:
                # Alive but not answering: give it the start-up window, else restart it.
                try:
                    wait_ready(part, pid)
                    continue
                except TestbedError as e:
                    log("restarting", part=part.name, pid=pid, reason=str(e).splitlines()[0])
                    stop_pid(pid, part.name)
            elif part.pidfile.exists():
                log("stale", part=part.name, action="removing pid file of a dead process")
                part.pidfile.unlink()
            start_and_wait(part, started)
    except (TestbedError, subprocess.CalledProcessError, OSError) as e:
        for part, pid in reversed(started):
            stop_pid(pid, part.name)
            part.pidfile.unlink(missing_ok=True)
        raise TestbedError(str(e)) from e
    write_env()
    print(env_text(), end="")


def down() -> None:
    for part in reversed(PARTS):
        pid = owned_pid(part)
        if pid:
            stop_pid(pid, part.name)
        part.pidfile.unlink(missing_ok=True)


def env_vars() -> dict[str, str]:
    p = ports()
    return {
        "AFC_TESTBED_DIR": str(STATE),
        "AFC_KAFKA_BOOTSTRAP": f"{HOST}:{p['kafka']}",
        "AFC_REDIS_URL": f"redis://{HOST}:{p['redis']}/0",
        # Every node as a seed (afc.runtime.redisconn's URL scheme), so a client can start
        # while any one node is down; it learns the slot layout from whichever answers.
        "AFC_REDIS_CLUSTER_URL": "redis+cluster://" + ",".join(f"{HOST}:{port}" for port in cluster_ports()) + "/0",
        "KUBECONFIG": str(k8s_dir() / "kubeconfig"),
        "AFC_KUBECTL": k8s_bin("kubectl"),
        "AFC_K8S_BIN": str(Path(k8s_bin("kubectl")).parent),
    }


def env_text() -> str:
    return "".join(f"export {k}={v}\n" for k, v in env_vars().items())


def write_env() -> None:
    (STATE / "env").write_text(env_text())
    (STATE / "env.json").write_text(json.dumps(env_vars(), indent=1))


def rss_kib(pid: int) -> int:
    """RSS of a process and its descendants, in KiB."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
            todo.extend(int(c) for c in children)
        except OSError:
            continue
    return total


def status() -> int:
    rows, bad, total = [], 0, 0
    for part in PARTS:
        pid = owned_pid(part)
        ok = (bool(pid) or not part.process) and part.probe()
        mem = rss_kib(pid) if pid else 0
        total += mem
        bad += not ok
        row: dict[str, object] = {"part": part.name, "pid": pid, "ready": ok, "rss_mib": round(mem / 1024, 1),
                                  "ports": {k: ports()[k] for k in part.port_keys}, "log": str(part.logfile)}
        if part.name == "redis-cluster":
            row.pop("log")
            row["problems"] = [] if ok else cluster_problems()
        rows.append(row)
    print(json.dumps({"parts": rows, "total_rss_mib": round(total / 1024, 1)}, indent=1))
    return 1 if bad else 0


def main(argv: list[str]) -> int:
    cmd = argv[1] if len(argv) > 1 else "up"
    try:
        if cmd == "up":
            up(argv[2:] or None)
        elif cmd == "down":
            down()
        elif cmd == "status":
            return status()
        elif cmd == "env":
            print(env_text(), end="")
        elif cmd == "clean":
            down()
            shutil.rmtree(STATE, ignore_errors=True)
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except TestbedError as e:
        print(f"testbed: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
