#!/usr/bin/env python3
"""A node agent for the afc test bed: it stands in for a kubelet on a machine without a
container runtime. Test-bed tooling, not part of the product.

It registers a Node, keeps its Lease in `kube-node-lease` fresh, and runs every Pod the
scheduler binds to that Node as local processes, one per container, reporting status back
through the pods' status subresource. What it does, and where it differs from a kubelet:

Images are not pulled. An image maps to a local entrypoint by substring (first match wins,
`--map-image SUBSTRING=COMMAND [ARGS]` adds mappings ahead of the defaults):

    afc-operator                -> <venv>/bin/afc-operator
    afc-runtime / afc-consumer  -> <venv>/bin/afc-consumer run    (the image's ENTRYPOINT+CMD)
    python:                     -> <venv>/bin/python3
    anything else               -> no entrypoint: the container must give `command`

`command` replaces the entrypoint and `args` the default args, as in Kubernetes; a bare
`command[0]` is looked up in the venv's bin first, then the host's PATH (so `python3` is
the venv's Python). `$(VAR)` references in command/args/env expand as a kubelet does.

Environment: never the agent's own. PATH (venv bin first), HOME (the pod's work dir),
HOSTNAME (the pod name), KUBERNETES_SERVICE_HOST/PORT pointing at the API server of the
agent's kubeconfig, the mapped image's env, `--env` extras, then `envFrom` and `env`
(literal values, downward-API fieldRef/resourceFieldRef, ConfigMap and Secret keys).

Files at fixed paths: each container runs in a private mount namespace (unshare(CLONE_NEWNS)
in a small exec helper; root with CAP_SYS_ADMIN, tried at start), where the pod's volumes are bind-mounted at their
mountPaths: configMap, secret, downwardAPI, emptyDir, hostPath and projected volumes
(serviceAccountToken via a TokenRequest bound to the pod, so the admission-injected
`kube-api-access-*` volume puts token, ca.crt and namespace at
/var/run/secrets/kubernetes.io/serviceaccount). Missing mount points are created as empty
directories on the host (the mounts themselves are visible only inside the pod). Without
root (or with --no-mount-ns) no namespace is made: env values that start with a mountPath
are rewritten to the volume's host directory instead (best effort; fixed paths in code
will not resolve). Processes run as the agent's user (runAsUser is not honoured).

Ports: all pods share the host's network, so every declared containerPort gets its own
free host port for the pod's life. The container sees it as AFC_NODEAGENT_PORT_<NAME> and
AFC_NODEAGENT_PORT_<containerPort>; literal env values and args that name the port
(`8080`, `...:8080`, `...:8080/path`) are rewritten to it; containers of a mapped afc image
also get AFC_SERVER__PORT (the runtime's health/metrics port, env beats its config file).
Probes on a port number or name go to the mapped port. The mapping is written to the pod's
annotation `nodeagent.afc.dev/ports` ({"container": {"name-or-port": hostPort}}).
Pod IP and host IP are 127.0.0.1.

Status and probes: phase, conditions and containerStatuses (waiting/running/terminated,
lastState, restartCount, ready, started). httpGet, tcpSocket and exec probes with
initialDelay/period/timeout/success/failure thresholds; startup and liveness failures kill
the container, which then restarts per restartPolicy with exponential back-off (initial
--backoff-initial, doubling to --backoff-max; the first restart is immediate), shown as
the waiting reason CrashLoopBackOff. Exec probes run the command with `nsenter --mount`
in the container's mount namespace. Events: Started, Killing, BackOff, Unhealthy,
FailedMount. Deletion: SIGTERM to each container's process group, up to the pod's grace
period, SIGKILL, then the pod is deleted with grace 0 (so a StatefulSet proceeds).

Stopping the agent (SIGTERM/SIGINT, or leaving the context manager) stops every process
(SIGTERM, at most 30 s, SIGKILL) and deletes the Node and its Lease (`--keep-node` keeps
them); the pods are left to the pod garbage collector, as after a node loss. Each process
carries marker env vars (AFC_NODEAGENT_NODE/_STATE/_POD_UID): an agent that was SIGKILLed
leaves its processes behind, and the next agent for the same node and state dir kills
them first (`agent_processes()` finds them, for tests that want to SIGKILL a "container").

Init containers run one at a time, in order, to completion before the containers (a
failed one restarts with back-off unless restartPolicy is Never; sidecars, i.e. init
containers with restartPolicy Always, are not supported).

Not done: ephemeral containers, sidecar init containers, lifecycle hooks, resource limits,
runAsUser, image pull secrets, hostNetwork semantics, persistent volumes, and the kubelet
API (`kubectl logs/exec/port-forward` do not work: read the log files, use the mapped
ports). On a bed shared with other test runs, give the Node a taint (`--taint`,
`NodeAgentProcess(taint=True)`) or it will also run their pending pods.

Usage:
    python -P scripts/nodeagent.py --kubeconfig $KUBECONFIG --node afc-node-1
From Python: `with NodeAgent(...)` runs it in threads, `with NodeAgentProcess(...)` as a
subprocess of the CLI. Logs: <state>/pods/<namespace>/<pod>/logs/<container>.log.

Only the standard library is imported at module level: the exec helper mode
(`--exec-container SPEC`) runs with `python -I -S`.
"""
from __future__ import annotations

import argparse
import base64
import ctypes
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
VENV_BIN = Path(os.environ.get("AFC_NODEAGENT_VENV_BIN", ROOT / ".venv" / "bin"))
HOST_IP = "127.0.0.1"
PORTS_ANNOTATION = "nodeagent.afc.dev/ports"
MARK_NODE = "AFC_NODEAGENT_NODE"
MARK_STATE = "AFC_NODEAGENT_STATE"
MARK_POD = "AFC_NODEAGENT_POD_UID"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
KUBELET_VERSION = "v1.33.13"
IMAGE_ENV = {"PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}


@dataclass(frozen=True)
class ImageMapping:
    """An image whose name contains `match` runs `entrypoint` with `args` by default."""
    match: str
    entrypoint: list[str]
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    afc_runtime: bool = False  # gets AFC_SERVER__PORT set to its mapped http port


def default_image_map(venv_bin: Path = VENV_BIN) -> list[ImageMapping]:
    return [
        ImageMapping("afc-operator", [str(venv_bin / "afc-operator")], [], dict(IMAGE_ENV)),
        ImageMapping("afc-runtime", [str(venv_bin / "afc-consumer")], ["run"], dict(IMAGE_ENV), afc_runtime=True),
        ImageMapping("afc-consumer", [str(venv_bin / "afc-consumer")], ["run"], dict(IMAGE_ENV), afc_runtime=True),
        ImageMapping("python:", [str(venv_bin / "python3")]),
    ]


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def micro_now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1e6):06d}Z"


def log(msg: str, **kv: Any) -> None:
    fields = " ".join(f"{k}={v}" for k, v in kv.items())
    print(f"{time.strftime('%H:%M:%S')} nodeagent {msg} {fields}".rstrip(), file=sys.stderr, flush=True)


def pod_log_path(state_dir: str | Path, namespace: str, pod: str, container: str) -> Path:
    """Where a container's output goes (appended across restarts and pod re-creations)."""
    return Path(state_dir) / "pods" / namespace / pod / "logs" / f"{container}.log"


def agent_processes(node: str, state_dir: str | Path | None = None, pod_uid: str | None = None) -> list[int]:
    """Live processes an agent started for `node` (and state dir, and pod), by their marker env."""
    marks = [f"{MARK_NODE}={node}".encode()]
    if state_dir is not None:
        marks.append(f"{MARK_STATE}={Path(state_dir).resolve()}".encode())
    if pod_uid is not None:
        marks.append(f"{MARK_POD}={pod_uid}".encode())
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            env = (p / "environ").read_bytes().split(b"\0")
            state = (p / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and all(m in env for m in marks):
            out.append(int(p.name))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST_IP, 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- exec helper

CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18


def exec_container(spec_path: str) -> None:
    """Runs inside the new process: private mount namespace, bind mounts, chdir, exec.
    Exit 126 when the sandbox cannot be built, 127 when the command cannot be executed."""
    spec = json.loads(Path(spec_path).read_text())
    os.unlink(spec_path)  # it holds secret env values
    if spec["mountns"]:
        libc = ctypes.CDLL(None, use_errno=True)

        def check(rc: int, what: str) -> None:
            if rc != 0:
                e = ctypes.get_errno()
                print(f"nodeagent: {what}: {os.strerror(e)}", file=sys.stderr, flush=True)
                os._exit(126)

        if not spec["cwd_in_container"]:
            os.chdir(spec["cwd"])  # the sandbox dir may lie below a mountPath (e.g. /tmp)
        check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
        # Sources are held open (in the new namespace) before any mount: a mount over /tmp must
        # not hide a volume kept below /tmp.
        held = [(os.open(src, os.O_PATH), os.path.isdir(src), src, dst, ro) for src, dst, ro in spec["mounts"]]
        for fd, is_dir, src, dst, ro in held:
            try:  # the mount point: made on the host file system if missing, left empty there
                if is_dir:
                    os.makedirs(dst, exist_ok=True)
                else:
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                    if not os.path.exists(dst):
                        open(dst, "a").close()
            except OSError as e:
                print(f"nodeagent: mount point {dst}: {e}", file=sys.stderr, flush=True)
                os._exit(126)
            via = f"/proc/self/fd/{fd}".encode()
            check(libc.mount(via, dst.encode(), None, MS_BIND | MS_REC, None), f"bind {src} -> {dst}")
            if ro:
                check(libc.mount(via, dst.encode(), None, MS_BIND | MS_REMOUNT | MS_RDONLY, None),
                      f"read-only {dst}")
            os.close(fd)
        if not spec["cwd_in_container"]:
            return _exec(spec)
    try:
        os.chdir(spec["cwd"])
    except OSError as e:
        print(f"nodeagent: workingDir {spec['cwd']}: {e}", file=sys.stderr, flush=True)
        os._exit(126)
    _exec(spec)


def _exec(spec: dict[str, Any]) -> None:
    argv = spec["argv"]
    try:
        os.execve(argv[0], argv, spec["env"])
    except OSError as e:
        print(f"nodeagent: exec {argv[0]}: {e}", file=sys.stderr, flush=True)
        os._exit(127)


def mountns_available() -> bool:
    """Whether this process may make private mount namespaces (root with CAP_SYS_ADMIN),
    tried in a child so that nothing here changes."""
    r = subprocess.run([sys.executable, "-I", "-S", str(HERE), "--probe-mountns"], capture_output=True, timeout=30)
    return r.returncode == 0


def probe_mountns() -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        return 1
    return 0 if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) == 0 else 1


# --------------------------------------------------------------------------- API client

class ApiError(Exception):
    def __init__(self, status: int, method: str, path: str, body: str) -> None:
        super().__init__(f"{method} {path}: {status} {body[:300]}")
        self.status = status


class Api:
    """Plain-dict requests to the API server with the credentials of a kubeconfig."""

    def __init__(self, kubeconfig: str | None) -> None:
        import urllib3
        from kubernetes import client, config
        cfg = client.Configuration()
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        self.host = cfg.host.rstrip("/")
        self.headers = {"Accept": "application/json"}
        for a in cfg.auth_settings().values():  # bearer token (client certificates go to the pool)
            if a.get("in") == "header" and a.get("value"):
                self.headers[a["key"]] = a["value"]
        self.pool = urllib3.PoolManager(
            maxsize=32, block=False, cert_reqs="CERT_REQUIRED" if cfg.verify_ssl else "CERT_NONE",
            ca_certs=cfg.ssl_ca_cert, cert_file=cfg.cert_file, key_file=cfg.key_file)
        self.ca_file = cfg.ssl_ca_cert
        u = urllib.parse.urlparse(self.host)
        self.api_host, self.api_port = u.hostname or HOST_IP, u.port or 443

    def request(self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None,
                content_type: str = "application/json", timeout: float = 30) -> dict[str, Any]:
        url = self.host + path + ("?" + urllib.parse.urlencode(query) if query else "")
        headers = dict(self.headers)
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body).encode()
        r = self.pool.request(method, url, body=data, headers=headers, timeout=timeout, retries=False)
        text = r.data.decode(errors="replace")
        if r.status >= 400:
            raise ApiError(r.status, method, path, text)
        return json.loads(text) if text else {}

    def watch(self, path: str, query: dict[str, Any], stop: threading.Event) -> Iterator[dict[str, Any]]:
        import urllib3
        q = {**query, "watch": "true", "allowWatchBookmarks": "true"}
        url = self.host + path + "?" + urllib.parse.urlencode(q)
        r = self.pool.request("GET", url, headers=self.headers, preload_content=False, retries=False,
                              timeout=urllib3.Timeout(connect=10, read=float(q.get("timeoutSeconds", 60)) + 10))
        try:
            if r.status >= 400:
                raise ApiError(r.status, "WATCH", path, r.read().decode(errors="replace"))
            buf = b""
            for chunk in r.stream(4096):
                if stop.is_set():
                    return
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)
        finally:
            r.release_conn()


# --------------------------------------------------------------------------- helpers

def parse_quantity(q: Any) -> float:
    from kubernetes.utils.quantity import parse_quantity as pq
    return float(pq(q))


VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(s: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined names are replaced, $$ escapes, others stay."""
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return VAR_REF.sub(sub, s)


def rewrite_ports(s: str, ports: dict[int, int]) -> str:
    for p, h in ports.items():
        if s == str(p):
            return str(h)
        s = re.sub(rf"(?<=:){p}(?![0-9])", str(h), s)
    return s


def field_ref(pod: dict[str, Any], path: str) -> str:
    meta, spec, status = pod["metadata"], pod["spec"], pod.get("status") or {}
    m = re.fullmatch(r"metadata\.(labels|annotations)\['(.*)'\]", path)
    if m:
        return (meta.get(m.group(1)) or {}).get(m.group(2), "")
    simple = {
        "metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"), "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
        "status.hostIP": HOST_IP, "status.hostIPs": HOST_IP, "status.podIP": HOST_IP, "status.podIPs": HOST_IP,
    }
    if path in simple:
        return str(simple[path] or "")
    if path in ("metadata.labels", "metadata.annotations"):
        d = meta.get(path.split(".")[1]) or {}
        return "\n".join(f'{k}="{v}"' for k, v in sorted(d.items()))
    raise ValueError(f"unsupported fieldRef {path}")


def resource_ref(container: dict[str, Any] | None, ref: dict[str, Any], node_alloc: dict[str, str]) -> str:
    res = ref["resource"]  # limits.cpu, requests.memory, ...
    kind, _, name = res.partition(".")
    value = ((container or {}).get("resources") or {}).get(kind, {}).get(name)
    if value is None:
        value = node_alloc.get(name, "0")
    divisor = parse_quantity(ref.get("divisor") or "1")
    import math
    return str(math.ceil(parse_quantity(value) / divisor))


# --------------------------------------------------------------------------- probes

@dataclass
class Probe:
    kind: str          # startup | liveness | readiness
    spec: dict[str, Any]
    due: float
    successes: int = 0
    failures: int = 0
    result: bool | None = None

    @property
    def period(self) -> float:
        return float(self.spec.get("periodSeconds") or 10)

    @property
    def timeout(self) -> float:
        return float(self.spec.get("timeoutSeconds") or 1)

    @property
    def failure_threshold(self) -> int:
        return int(self.spec.get("failureThreshold") or 3)

    @property
    def success_threshold(self) -> int:
        return int(self.spec.get("successThreshold") or 1)


# --------------------------------------------------------------------------- containers

@dataclass
class ContainerRun:
    spec: dict[str, Any]
    ports: dict[int, int]                      # containerPort -> host port
    port_names: dict[str, int]                 # port name -> containerPort
    proc: subprocess.Popen[bytes] | None = None
    state: str = "waiting"                     # waiting | running | terminated
    reason: str = "ContainerCreating"
    message: str = ""
    restart_count: int = 0
    started_at: str = ""
    started_mono: float = 0.0
    last_terminated: dict[str, Any] | None = None
    terminated: dict[str, Any] | None = None
    next_start: float = 0.0
    backoff: float = 0.0
    ever_started: bool = False
    probes: dict[str, Probe] = field(default_factory=dict)
    ready: bool = False
    startup_ok: bool = False
    kill_deadline: float | None = None
    kill_reason: str = ""
    env: dict[str, str] = field(default_factory=dict)  # the running process's environment
    init: bool = False                          # an init container: runs to completion first
    done: bool = False                          # terminated and not restarting
    run_id: int = 0

    @property
    def name(self) -> str:
        return self.spec["name"]

    def host_port(self, port: Any) -> int:
        if isinstance(port, str) and not port.isdigit():
            cp = self.port_names.get(port)
            if cp is None:
                raise ValueError(f"no port named {port}")
            return self.ports.get(cp, cp)
        return self.ports.get(int(port), int(port))


class PodWorker:
    """One pod: its sandbox, its containers' processes, probes and status."""

    def __init__(self, agent: "NodeAgent", pod: dict[str, Any]) -> None:
        self.agent, self.pod = agent, pod
        meta = pod["metadata"]
        self.ns, self.name, self.uid = meta["namespace"], meta["name"], meta["uid"]
        self.key = f"{self.ns}/{self.name}"
        self.logs = pod_log_path(agent.state_dir, self.ns, self.name, "-").parent
        self.sandbox = self.logs.parent / self.uid[:8]
        self.wake = threading.Event()
        self.gone = False                       # the pod vanished from the API
        self.prepared = False
        self.prepare_error = ""
        self.volumes: dict[str, Path] = {}
        self.tokens: dict[str, float] = {}  # token file -> when to request a fresh one
        self.last_volume_sync = 0.0
        self.start_time = now_iso()
        self.conditions: dict[str, tuple[str, str]] = {}
        self.last_status: Any = None
        self.finished = False
        self.terminal = pod.get("status", {}).get("phase") in ("Succeeded", "Failed")
        status = pod.get("status") or {}
        self.inits = [self.container_run(c, status.get("initContainerStatuses"), init=True)
                      for c in pod["spec"].get("initContainers") or []]
        self.containers = [self.container_run(c, status.get("containerStatuses"))
                           for c in pod["spec"]["containers"]]
        if any(c["type"] == "Initialized" and c["status"] == "True" for c in status.get("conditions") or []):
            for r in self.inits:  # initialised under an earlier agent: not again
                r.state, r.done = "terminated", True
                r.terminated = {"exitCode": 0, "reason": "Completed"}
        self.thread = threading.Thread(target=self.run, name=f"pod-{self.key}", daemon=True)

    def container_run(self, c: dict[str, Any], prev: list[dict[str, Any]] | None, init: bool = False) -> ContainerRun:
        ports = {int(p["containerPort"]): free_port() for p in c.get("ports") or []}
        names = {p["name"]: int(p["containerPort"]) for p in c.get("ports") or [] if p.get("name")}
        before = next((s for s in prev or [] if s["name"] == c["name"]), {})
        return ContainerRun(c, ports, names, restart_count=int(before.get("restartCount") or 0), init=init,
                            reason="ContainerCreating" if init or not self.pod["spec"].get("initContainers")
                            else "PodInitializing")

    @property
    def initialized(self) -> bool:
        return all(r.done and (r.terminated or {}).get("exitCode") == 0 for r in self.inits)

    @property
    def init_failed(self) -> bool:
        return any(r.done and (r.terminated or {}).get("exitCode") != 0 for r in self.inits)

    # ------------------------------------------------------------------ plumbing

    def update(self, pod: dict[str, Any]) -> None:
        self.pod = pod
        self.wake.set()

    def vanish(self) -> None:
        self.gone = True
        self.wake.set()

    @property
    def deleting(self) -> bool:
        return self.gone or bool(self.pod["metadata"].get("deletionTimestamp"))

    def log_path(self, container: str) -> Path:
        return self.logs / f"{container}.log"

    def run(self) -> None:
        try:
            self._loop()
        except Exception:  # noqa: BLE001 - the agent must outlive one pod's bug
            log("pod-worker-crashed", pod=self.key, error=traceback.format_exc().replace("\n", " | "))
            self.kill_all(0)
        finally:
            self.finished = True
            self.agent.forget(self)

    def _loop(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.agent.annotate_ports(self)
        while not self.agent.stopping.is_set():
            if self.deleting:
                self.terminate()
                return
            if self.terminal:
                self.wake.wait(1)
                self.wake.clear()
                continue
            if not self.prepared:
                self.prepare()
            elif time.monotonic() - self.last_volume_sync > self.agent.volume_sync_s:
                self.sync_volumes()
            if self.prepared and not self.initialized:
                nxt = next((r for r in self.inits if not r.done), None)
                if nxt is not None:  # one init container at a time, in order
                    self.step(nxt)
                if self.initialized:
                    continue
            elif self.prepared:
                for c in self.containers:
                    self.step(c)
            self.report()
            self.wake.wait(self.agent.tick_s)
            self.wake.clear()
        # agent stopping: stop the processes, leave the pod object (its node goes away)
        self.kill_all(min(self.grace(), self.agent.stop_grace_s))

    # ------------------------------------------------------------------ sandbox

    def prepare(self) -> None:
        try:
            self.sandbox.mkdir(parents=True, exist_ok=True)
            (self.sandbox / "work").mkdir(exist_ok=True)
            for v in self.pod["spec"].get("volumes") or []:
                d = self.sandbox / "volumes" / v["name"]
                d.mkdir(parents=True, exist_ok=True)
                self.volumes[v["name"]] = d
            self.sync_volumes(first=True)
            self.prepared, self.prepare_error = True, ""
        except Exception as e:  # noqa: BLE001 - shown as the containers' waiting reason, retried
            msg = str(e)
            if msg != self.prepare_error:
                log("sandbox-not-ready", pod=self.key, error=msg)
                self.agent.event(self.pod, "FailedMount", msg, "Warning")
            self.prepare_error = msg
            for c in self.containers:
                c.reason, c.message = "ContainerCreating", msg
            self.wake.wait(1)

    def sync_volumes(self, first: bool = False) -> None:
        self.last_volume_sync = time.monotonic()
        for v in self.pod["spec"].get("volumes") or []:
            d = self.volumes.get(v["name"])
            if d is None:
                continue
            try:
                self.fill_volume(v, d)
            except Exception:
                if first:
                    raise

    def fill_volume(self, v: dict[str, Any], d: Path) -> None:
        if "configMap" in v:
            self.write_keys(d, self.source_data("configmaps", v["configMap"]), v["configMap"].get("items"))
        elif "secret" in v:
            src = dict(v["secret"], name=v["secret"]["secretName"])
            self.write_keys(d, self.source_data("secrets", src), v["secret"].get("items"))
        elif "downwardAPI" in v:
            self.write_downward(d, v["downwardAPI"].get("items") or [])
        elif "projected" in v:
            for s in v["projected"].get("sources") or []:
                if "configMap" in s:
                    self.write_keys(d, self.source_data("configmaps", s["configMap"]), s["configMap"].get("items"))
                elif "secret" in s:
                    self.write_keys(d, self.source_data("secrets", s["secret"]), s["secret"].get("items"))
                elif "downwardAPI" in s:
                    self.write_downward(d, s["downwardAPI"].get("items") or [])
                elif "serviceAccountToken" in s:
                    self.write_token(d, s["serviceAccountToken"])
        elif "hostPath" in v:
            hp = v["hostPath"]["path"]
            if v["hostPath"].get("type") in ("DirectoryOrCreate",):
                os.makedirs(hp, exist_ok=True)
            self.volumes[v["name"]] = Path(hp)
        elif "emptyDir" in v:
            pass
        else:
            raise ValueError(f"volume {v['name']}: unsupported type {sorted(set(v) - {'name'})}")

    def source_data(self, plural: str, ref: dict[str, Any]) -> dict[str, bytes] | None:
        try:
            obj = self.agent.api.request("GET", f"/api/v1/namespaces/{self.ns}/{plural}/{ref['name']}")
        except ApiError as e:
            if e.status == 404 and ref.get("optional"):
                return None
            raise ValueError(f"{plural[:-1]} {ref['name']!r}: {'not found' if e.status == 404 else e}") from e
        out: dict[str, bytes] = {}
        if plural == "secrets":
            out.update({k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()})
        else:
            out.update({k: v.encode() for k, v in (obj.get("data") or {}).items()})
            out.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        return out

    @staticmethod
    def write_file(path: Path, data: bytes, mode: int | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and path.read_bytes() == data:
            return
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        if mode is not None:
            tmp.chmod(mode)
        tmp.replace(path)

    def write_keys(self, d: Path, data: dict[str, bytes] | None, items: list[dict[str, Any]] | None) -> None:
        if data is None:
            return
        if items:
            for it in items:
                if it["key"] not in data:
                    raise ValueError(f"key {it['key']!r} not found")
                self.write_file(d / it["path"], data[it["key"]], it.get("mode"))
        else:
            for k, v in data.items():
                self.write_file(d / k, v)

    def write_downward(self, d: Path, items: list[dict[str, Any]]) -> None:
        for it in items:
            if "fieldRef" in it:
                val = field_ref(self.pod, it["fieldRef"]["fieldPath"])
            else:
                ref = it["resourceFieldRef"]
                c = next((c for c in self.pod["spec"]["containers"] if c["name"] == ref.get("containerName")), None)
                val = resource_ref(c, ref, self.agent.allocatable)
            self.write_file(d / it["path"], val.encode(), it.get("mode"))

    def write_token(self, d: Path, src: dict[str, Any]) -> None:
        path = d / src["path"]
        exp = int(src.get("expirationSeconds") or 3607)
        key = str(path)
        if key in self.tokens and time.monotonic() < self.tokens[key]:
            return
        spec: dict[str, Any] = {"expirationSeconds": exp, "boundObjectRef": {
            "kind": "Pod", "apiVersion": "v1", "name": self.name, "uid": self.uid}}
        if src.get("audience"):
            spec["audiences"] = [src["audience"]]
        sa = self.pod["spec"].get("serviceAccountName") or "default"
        tr = self.agent.api.request("POST", f"/api/v1/namespaces/{self.ns}/serviceaccounts/{sa}/token",
                                    {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec})
        self.write_file(path, tr["status"]["token"].encode(), 0o600)
        self.tokens[key] = time.monotonic() + 0.8 * exp  # the pod's volume sync renews it

    # ------------------------------------------------------------------ environment

    def container_env(self, c: ContainerRun, mapping: ImageMapping | None) -> dict[str, str]:
        spec = c.spec
        env: dict[str, str] = {
            "PATH": f"{self.agent.venv_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(self.sandbox / "work"), "LANG": "C.UTF-8", "HOSTNAME": self.name,
        }
        if mapping:
            env.update(mapping.env)
        env.update(self.agent.extra_env)
        host, port = self.agent.api.api_host, self.agent.api.api_port
        env.update({"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": str(port),
                    "KUBERNETES_SERVICE_PORT_HTTPS": str(port), "KUBERNETES_PORT": f"tcp://{host}:{port}",
                    f"KUBERNETES_PORT_{port}_TCP": f"tcp://{host}:{port}"})
        for name, cp in c.port_names.items():
            env[f"AFC_NODEAGENT_PORT_{re.sub(r'[^A-Za-z0-9]', '_', name).upper()}"] = str(c.ports[cp])
        for cp, hp in c.ports.items():
            env[f"AFC_NODEAGENT_PORT_{cp}"] = str(hp)
        if mapping and mapping.afc_runtime and c.ports:
            cp = c.port_names.get("http", next(iter(c.ports)))
            env["AFC_SERVER__PORT"] = str(c.ports[cp])
        for ef in spec.get("envFrom") or []:
            prefix = ef.get("prefix", "")
            if "configMapRef" in ef:
                data = self.source_data("configmaps", ef["configMapRef"])
            else:
                data = self.source_data("secrets", ef["secretRef"])
            for k, v in (data or {}).items():
                env[prefix + k] = v.decode(errors="replace")
        for e in spec.get("env") or []:
            if "value" in e or "valueFrom" not in e:
                env[e["name"]] = rewrite_ports(expand(e.get("value", ""), env), c.ports)
                continue
            vf = e["valueFrom"]
            if "fieldRef" in vf:
                env[e["name"]] = field_ref(self.pod, vf["fieldRef"]["fieldPath"])
            elif "resourceFieldRef" in vf:
                ref = vf["resourceFieldRef"]
                target = next((x for x in self.pod["spec"]["containers"]
                               if x["name"] == (ref.get("containerName") or spec["name"])), spec)
                env[e["name"]] = resource_ref(target, ref, self.agent.allocatable)
            else:
                plural, ref = (("configmaps", vf["configMapKeyRef"]) if "configMapKeyRef" in vf
                               else ("secrets", vf["secretKeyRef"]))
                data = self.source_data(plural, ref)
                if data is None or ref["key"] not in data:
                    if ref.get("optional"):
                        continue
                    raise ValueError(f"{plural[:-1]} {ref['name']!r} has no key {ref['key']!r}")
                env[e["name"]] = data[ref["key"]].decode(errors="replace")
        if not self.agent.mountns:  # no private mounts: point path-valued env at the host copies
            for m in spec.get("volumeMounts") or []:
                src = self.volumes.get(m["name"])
                if src is None:
                    continue
                for k, v in env.items():
                    if v == m["mountPath"] or v.startswith(m["mountPath"].rstrip("/") + "/"):
                        env[k] = str(src / m.get("subPath", "")).rstrip("/") + v[len(m["mountPath"].rstrip("/")):]
        env.update({MARK_NODE: self.agent.node, MARK_STATE: str(self.agent.state_dir), MARK_POD: self.uid})
        return env

    def argv(self, c: ContainerRun, env: dict[str, str]) -> tuple[list[str], ImageMapping | None]:
        spec = c.spec
        mapping = self.agent.map_image(spec.get("image") or "")
        if spec.get("command"):
            cmd = list(spec["command"]) + list(spec.get("args") or [])
        elif mapping:
            cmd = list(mapping.entrypoint) + list(spec["args"] if "args" in spec else mapping.args)
        else:
            raise LookupError(f"image {spec.get('image')!r} has no local mapping and the container has no command")
        cmd = [rewrite_ports(expand(a, env), c.ports) for a in cmd]
        exe = cmd[0]
        if "/" not in exe:
            found = shutil.which(exe, path=env["PATH"])
            if not found:
                raise FileNotFoundError(f"executable {exe!r} not found in {env['PATH']}")
            cmd[0] = found
        return cmd, mapping

    def mounts(self, c: ContainerRun) -> list[tuple[str, str, bool]]:
        out = []
        for m in c.spec.get("volumeMounts") or []:
            src = self.volumes.get(m["name"])
            if src is None:
                raise ValueError(f"volumeMount {m['name']!r}: no such volume")
            if m.get("subPath"):
                src = src / m["subPath"]
            out.append((str(src), m["mountPath"], bool(m.get("readOnly"))))
        return sorted(out, key=lambda t: t[1].count("/"))

    # ------------------------------------------------------------------ lifecycle

    def start(self, c: ContainerRun) -> None:
        try:
            env_probe = self.container_env(c, self.agent.map_image(c.spec.get("image") or ""))
            argv, _ = self.argv(c, env_probe)
            mounts = self.mounts(c)
        except LookupError as e:
            c.state, c.reason, c.message = "waiting", "ErrImageNeverPull", str(e)
            c.next_start = time.monotonic() + 5
            return
        except Exception as e:  # noqa: BLE001 - a missing key or object, or the API unreachable: retried
            c.state, c.reason, c.message = "waiting", "CreateContainerConfigError", str(e)[:500]
            c.next_start = time.monotonic() + 2
            return
        cwd = c.spec.get("workingDir") or str(self.sandbox / "work")
        if not self.agent.mountns and c.spec.get("workingDir") and not os.path.isdir(cwd):
            cwd = str(self.sandbox / "work")
        spec_file = self.sandbox / f".exec-{c.name}.json"
        fd = os.open(spec_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"mountns": self.agent.mountns, "mounts": mounts, "cwd": cwd, "argv": argv, "env": env_probe,
                       "cwd_in_container": bool(c.spec.get("workingDir"))}, f)
        out = open(self.log_path(c.name), "ab")
        try:
            c.proc = subprocess.Popen([sys.executable, "-I", "-S", str(HERE), "--exec-container", str(spec_file)],
                                      stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True, env={MARK_NODE: self.agent.node,
                                                                   MARK_STATE: str(self.agent.state_dir),
                                                                   MARK_POD: self.uid})
        finally:
            out.close()
        c.run_id += 1
        c.env = env_probe
        c.state, c.reason, c.message = "running", "", ""
        c.started_at, c.started_mono = now_iso(), time.monotonic()
        c.ever_started, c.ready, c.kill_deadline, c.kill_reason, c.terminated = True, False, None, "", None
        now = time.monotonic()
        c.probes = {}
        for kind in ("startup", "liveness", "readiness"):
            p = c.spec.get(f"{kind}Probe")
            if p:
                c.probes[kind] = Probe(kind, p, now + float(p.get("initialDelaySeconds") or 0))
        c.startup_ok = "startup" not in c.probes
        log("container-started", pod=self.key, container=c.name, pid=c.proc.pid, run=c.run_id,
            argv=shlex.join(argv)[:200])
        self.agent.event(self.pod, "Started", f"Started container {c.name}")

    def restart_policy(self) -> str:
        return self.pod["spec"].get("restartPolicy") or "Always"

    def step(self, c: ContainerRun) -> None:
        now = time.monotonic()
        if c.proc is not None:
            code = c.proc.poll()
            if code is None:
                if c.kill_deadline is not None and now >= c.kill_deadline:
                    self.signal(c, signal.SIGKILL)
                    c.kill_deadline = now + 5
                elif c.kill_deadline is None:
                    self.run_probes(c)
                return
            self.exited(c, code)
        if c.done or c.state == "running":
            return
        if now >= c.next_start:
            self.start(c)

    def exited(self, c: ContainerRun, code: int) -> None:
        assert c.proc is not None
        self.signal(c, signal.SIGKILL)  # the rest of the group goes with the main process
        exit_code = 128 - code if code < 0 else code
        ran = time.monotonic() - c.started_mono
        reason = "Completed" if exit_code == 0 else "Error"
        term = {"exitCode": exit_code, "reason": reason, "startedAt": c.started_at, "finishedAt": now_iso(),
                "containerID": self.container_id(c)}
        if c.kill_reason:
            term["message"] = c.kill_reason
        log("container-exited", pod=self.key, container=c.name, code=exit_code, ran_s=round(ran, 1),
            why=c.kill_reason or "-")
        c.proc, c.ready, c.kill_deadline = None, False, None
        policy = self.restart_policy()
        restart = policy == "Always" or (policy == "OnFailure" and exit_code != 0)
        if c.init:  # init containers run to completion: Always means OnFailure for them
            restart = policy != "Never" and exit_code != 0
        if not restart:
            c.state, c.terminated, c.done = "terminated", term, True
            return
        c.last_terminated = term
        c.restart_count += 1
        if ran >= self.agent.backoff_reset_s:
            c.backoff = 0.0
        delay = c.backoff
        c.backoff = min(self.agent.backoff_max_s, max(self.agent.backoff_initial_s, c.backoff * 2))
        c.next_start = time.monotonic() + delay
        if delay > 0:
            c.state, c.reason = "waiting", "CrashLoopBackOff"
            c.message = f"back-off {delay:g}s restarting failed container={c.name} pod={self.name}_{self.ns}({self.uid})"
            self.agent.event(self.pod, "BackOff", f"Back-off restarting failed container {c.name}", "Warning")
        else:
            c.state, c.reason, c.message = "waiting", "ContainerCreating", ""

    def container_id(self, c: ContainerRun) -> str:
        return f"nodeagent://{self.uid[:8]}-{c.name}-{c.run_id}"

    def signal(self, c: ContainerRun, sig: int) -> None:
        if c.proc is None:
            return
        try:
            os.killpg(c.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def kill(self, c: ContainerRun, grace: float, why: str) -> None:
        if c.proc is None or c.kill_deadline is not None:
            return
        c.kill_reason = why
        self.signal(c, signal.SIGTERM)
        c.kill_deadline = time.monotonic() + grace
        self.agent.event(self.pod, "Killing", f"Stopping container {c.name}: {why}")

    # ------------------------------------------------------------------ probes

    def run_probes(self, c: ContainerRun) -> None:
        now = time.monotonic()
        for kind in ("startup", "liveness", "readiness"):
            p = c.probes.get(kind)
            if p is None or now < p.due:
                continue
            if kind != "startup" and not c.startup_ok:
                continue
            if kind == "startup" and c.startup_ok:
                continue
            p.due = now + p.period
            ok, detail = self.probe_once(c, p)
            if ok:
                p.successes, p.failures = p.successes + 1, 0
            else:
                p.failures, p.successes = p.failures + 1, 0
                self.agent.event(self.pod, "Unhealthy", f"{kind.capitalize()} probe failed: {detail}", "Warning")
            if kind == "startup":
                if ok:
                    c.startup_ok = True
                elif p.failures >= p.failure_threshold:
                    self.kill(c, self.probe_grace(p), f"startup probe failed: {detail}")
            elif kind == "liveness":
                if not ok and p.failures >= p.failure_threshold:
                    self.kill(c, self.probe_grace(p), f"liveness probe failed: {detail}")
            else:
                if ok and p.successes >= p.success_threshold:
                    c.ready = True
                elif not ok and p.failures >= p.failure_threshold:
                    c.ready = False
        if "readiness" not in c.probes:
            c.ready = c.startup_ok

    def probe_grace(self, p: Probe) -> float:
        g = p.spec.get("terminationGracePeriodSeconds")
        return float(g) if g is not None else self.grace()

    def probe_once(self, c: ContainerRun, p: Probe) -> tuple[bool, str]:
        s = p.spec
        try:
            if "httpGet" in s:
                h = s["httpGet"]
                port = c.host_port(h.get("port", 80))
                scheme = (h.get("scheme") or "HTTP").lower()
                url = f"{scheme}://{h.get('host') or HOST_IP}:{port}{h.get('path') or '/'}"
                req = urllib.request.Request(url, headers={x["name"]: x["value"] for x in h.get("httpHeaders") or []})
                import ssl
                ctx = ssl._create_unverified_context() if scheme == "https" else None
                try:
                    with urllib.request.urlopen(req, timeout=p.timeout, context=ctx) as r:
                        code = r.status
                except urllib.error.HTTPError as e:
                    code = e.code
                return 200 <= code < 400, f"HTTP probe failed with statuscode: {code}"
            if "tcpSocket" in s:
                port = c.host_port(s["tcpSocket"]["port"])
                with socket.create_connection((s["tcpSocket"].get("host") or HOST_IP, port), timeout=p.timeout):
                    return True, ""
            if "exec" in s:
                assert c.proc is not None
                cmd = ["nsenter", "--mount", "--target", str(c.proc.pid), "--", *s["exec"]["command"]]
                if not self.agent.mountns:
                    cmd = cmd[5:]
                r = subprocess.run(cmd, capture_output=True, timeout=p.timeout, cwd=str(self.sandbox / "work"),
                                   env=c.env)
                return r.returncode == 0, f"exit {r.returncode}: {r.stdout[-200:]!r}"
            if "grpc" in s:
                return False, "grpc probes are not supported by the node agent"
        except (OSError, ValueError, subprocess.SubprocessError) as e:
            return False, str(e)
        return True, ""

    # ------------------------------------------------------------------ termination

    def grace(self) -> float:
        g = self.pod["metadata"].get("deletionGracePeriodSeconds")
        if g is None:
            g = self.pod["spec"].get("terminationGracePeriodSeconds", 30)
        return float(g)

    def kill_all(self, grace: float) -> None:
        for c in self.inits + self.containers:
            if c.proc is not None and c.proc.poll() is None:
                self.kill(c, grace, "pod is being deleted" if self.deleting else "node agent stopping")
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(c.proc and c.proc.poll() is None for c in self.inits + self.containers):
            time.sleep(0.1)
        for c in self.inits + self.containers:
            if c.done:
                continue
            if c.proc is not None:
                if c.proc.poll() is None:
                    self.signal(c, signal.SIGKILL)
                    try:
                        c.proc.wait(10)
                    except subprocess.TimeoutExpired:
                        pass
                code = c.proc.poll()
                self.signal(c, signal.SIGKILL)
                if code is not None:
                    exit_code = 128 - code if code < 0 else code
                    c.terminated = {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error",
                                    "startedAt": c.started_at, "finishedAt": now_iso(),
                                    "containerID": self.container_id(c)}
                    log("container-stopped", pod=self.key, container=c.name, code=exit_code)
                c.proc = None
            c.terminated = c.terminated or c.last_terminated or {
                "exitCode": 137, "reason": "ContainerStatusUnknown", "finishedAt": now_iso(),
                "message": "the container never ran before the pod was terminated"}
            c.state, c.done, c.ready = "terminated", True, False

    def terminate(self) -> None:
        grace = 2.0 if self.gone else self.grace()
        log("pod-terminating", pod=self.key, grace_s=grace)
        self.kill_all(grace)
        if not self.gone:
            try:
                self.report(force=True)
            except ApiError:
                pass
            try:
                self.agent.api.request("DELETE", f"/api/v1/namespaces/{self.ns}/pods/{self.name}",
                                       {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0,
                                        "preconditions": {"uid": self.uid}})
            except ApiError as e:
                if e.status not in (404, 409):
                    log("pod-delete-failed", pod=self.key, error=e)
        shutil.rmtree(self.sandbox, ignore_errors=True)
        log("pod-removed", pod=self.key)

    # ------------------------------------------------------------------ status

    def container_status(self, c: ContainerRun) -> dict[str, Any]:
        if c.state == "running":
            state: dict[str, Any] = {"running": {"startedAt": c.started_at}}
        elif c.state == "terminated" and c.terminated:
            state = {"terminated": c.terminated}
        else:
            w: dict[str, Any] = {"reason": c.reason or "ContainerCreating"}
            if c.message:
                w["message"] = c.message
            state = {"waiting": w}
        st = {"name": c.name, "image": c.spec.get("image") or "", "imageID": "", "restartCount": c.restart_count,
              "ready": bool(c.ready and c.state == "running"), "started": c.state == "running" and c.startup_ok,
              "state": state, "lastState": {"terminated": c.last_terminated} if c.last_terminated else {}}
        if c.ever_started:
            st["containerID"] = self.container_id(c)
        return st

    def phase(self) -> str:
        if self.init_failed:
            return "Failed"
        if not self.initialized:
            return "Pending"
        cs = self.containers
        if all(c.done for c in cs):
            return "Succeeded" if all((c.terminated or {}).get("exitCode") == 0 for c in cs) else "Failed"
        if any(c.ever_started for c in cs):
            return "Running"
        return "Pending"

    def condition(self, type_: str, ok: bool) -> dict[str, Any]:
        status = "True" if ok else "False"
        prev = self.conditions.get(type_)
        if prev is None or prev[0] != status:
            self.conditions[type_] = (status, now_iso())
        return {"type": type_, "status": status, "lastTransitionTime": self.conditions[type_][1],
                "lastProbeTime": None}

    def report(self, force: bool = False) -> None:
        phase = self.phase()
        if self.terminal and not force:
            return
        ready = all(c.ready and c.state == "running" for c in self.containers)
        statuses = [self.container_status(c) for c in self.containers]
        status = {
            "phase": phase, "hostIP": HOST_IP, "hostIPs": [{"ip": HOST_IP}], "podIP": HOST_IP,
            "podIPs": [{"ip": HOST_IP}], "startTime": self.start_time,
            "conditions": [self.condition("PodReadyToStartContainers", self.prepared),
                           self.condition("Initialized", self.initialized),
                           self.condition("ContainersReady", ready), self.condition("Ready", ready)],
            "containerStatuses": statuses,
        }
        if self.inits:
            status["initContainerStatuses"] = [self.container_status(r) for r in self.inits]
        if self.prepare_error and not self.prepared:
            status["message"] = self.prepare_error
        if status == self.last_status:
            return
        try:
            self.agent.api.request("PATCH", f"/api/v1/namespaces/{self.ns}/pods/{self.name}/status",
                                   {"status": status}, content_type="application/strategic-merge-patch+json")
        except ApiError as e:
            if e.status == 404:
                self.gone = True
            elif e.status != 409:
                log("status-failed", pod=self.key, error=str(e)[:300])
            return
        except Exception as e:  # noqa: BLE001 - a connection problem: the next tick retries
            log("status-failed", pod=self.key, error=e)
            return
        self.last_status = status
        if phase in ("Succeeded", "Failed"):
            self.terminal = True
            log("pod-finished", pod=self.key, phase=phase)


# --------------------------------------------------------------------------- the agent

class NodeAgent:
    """Registers `node`, keeps it alive and runs the pods bound to it (see the module docstring).
    A context manager: `with NodeAgent(kubeconfig, "afc-node-1") as agent: ...`."""

    def __init__(self, kubeconfig: str | None, node: str, state_dir: str | Path | None = None,
                 taints: list[dict[str, str]] | None = None, labels: dict[str, str] | None = None,
                 cpu: str = "16", memory: str = "64Gi", pods: int = 110,
                 backoff_initial_s: float = 10, backoff_max_s: float = 300, backoff_reset_s: float = 600,
                 image_map: list[ImageMapping] | None = None, extra_env: dict[str, str] | None = None,
                 mountns: bool | None = None, keep_node: bool = False, venv_bin: Path = VENV_BIN,
                 tick_s: float = 0.25, stop_grace_s: float = 30, ready_timeout_s: float = 60,
                 heartbeat_s: float = 10) -> None:
        self.kubeconfig, self.node = kubeconfig, node
        base = os.environ.get("AFC_TESTBED_DIR") or str(ROOT / ".testbed")
        self.state_dir = Path(state_dir or Path(base) / "nodeagent" / node).resolve()
        self.taints = list(taints or [])
        self.labels = {"kubernetes.io/hostname": node, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                       "afc.dev/node-agent": "true", **(labels or {})}
        self.allocatable = {"cpu": cpu, "memory": memory, "pods": str(pods), "ephemeral-storage": "100Gi"}
        self.backoff_initial_s, self.backoff_max_s, self.backoff_reset_s = backoff_initial_s, backoff_max_s, backoff_reset_s
        self.image_map = list(image_map or []) + default_image_map(venv_bin)
        self.extra_env = dict(extra_env or {})
        self.mountns = mountns_available() if mountns is None else mountns
        self.keep_node, self.venv_bin = keep_node, venv_bin
        self.tick_s, self.stop_grace_s, self.ready_timeout_s = tick_s, stop_grace_s, ready_timeout_s
        self.volume_sync_s = 10.0
        self.heartbeat_s = heartbeat_s  # Lease renewal; the Node's status every 2 beats
        self.stopping = threading.Event()
        self.workers: dict[str, PodWorker] = {}
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.api: Api
        self.node_uid = ""

    # ------------------------------------------------------------------ public

    def __enter__(self) -> "NodeAgent":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.api = Api(self.kubeconfig)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.kill_orphans()
        self.register()
        for target, name in ((self.heartbeat_loop, "heartbeat"), (self.watch_loop, "watch")):
            t = threading.Thread(target=target, name=f"nodeagent-{name}", daemon=True)
            t.start()
            self.threads.append(t)
        self.wait_schedulable()
        log("ready", node=self.node, state=self.state_dir, mountns=self.mountns)

    def stop(self) -> None:
        if self.stopping.is_set():
            return
        self.stopping.set()
        with self.lock:
            workers = list(self.workers.values())
        for w in workers:
            w.wake.set()
        for w in workers:
            w.thread.join(self.stop_grace_s + 15)
        for t in self.threads:
            t.join(5)
        self.kill_orphans()
        if not self.keep_node:
            for path in (f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.node}",
                         f"/api/v1/nodes/{self.node}"):
                try:
                    self.api.request("DELETE", path)
                except ApiError:
                    pass
        log("stopped", node=self.node)

    def log_path(self, namespace: str, pod: str, container: str) -> Path:
        return pod_log_path(self.state_dir, namespace, pod, container)

    def map_image(self, image: str) -> ImageMapping | None:
        return next((m for m in self.image_map if m.match in image), None)

    # ------------------------------------------------------------------ node

    def node_status(self) -> dict[str, Any]:
        now = now_iso()

        def cond(type_: str, status: str, reason: str, message: str) -> dict[str, Any]:
            return {"type": type_, "status": status, "reason": reason, "message": message,
                    "lastHeartbeatTime": now, "lastTransitionTime": self.started_iso}

        return {
            "capacity": self.allocatable, "allocatable": self.allocatable,
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "node agent: no pressure tracking"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "node agent: no pressure tracking"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", "node agent: no pressure tracking"),
                cond("Ready", "True", "KubeletReady", "afc test-bed node agent is posting ready status"),
            ],
            "addresses": [{"type": "InternalIP", "address": HOST_IP}, {"type": "Hostname", "address": self.node}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            "nodeInfo": {"machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": os.uname().release,
                         "osImage": "afc test bed", "containerRuntimeVersion": "afc-nodeagent://0.1",
                         "kubeletVersion": KUBELET_VERSION, "kubeProxyVersion": "", "operatingSystem": "linux",
                         "architecture": "amd64"},
        }

    def register(self) -> None:
        self.started_iso = now_iso()
        body = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": self.node, "labels": self.labels,
                             "annotations": {"nodeagent.afc.dev/state-dir": str(self.state_dir)}},
                "spec": {"taints": self.taints} if self.taints else {}}
        try:
            node = self.api.request("POST", "/api/v1/nodes", body)
        except ApiError as e:
            if e.status != 409:
                raise
            node = self.api.request("PATCH", f"/api/v1/nodes/{self.node}",
                                    {"metadata": {"labels": self.labels},
                                     "spec": {"taints": self.taints or None, "unschedulable": None}},
                                    content_type="application/merge-patch+json")
        self.node_uid = node["metadata"]["uid"]
        self.post_status()
        self.renew_lease()

    def post_status(self) -> None:
        self.api.request("PATCH", f"/api/v1/nodes/{self.node}/status", {"status": self.node_status()},
                         content_type="application/strategic-merge-patch+json")

    def renew_lease(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.node}"
        spec = {"holderIdentity": self.node, "leaseDurationSeconds": max(40, int(4 * self.heartbeat_s)),
                "renewTime": micro_now()}
        try:
            self.api.request("PATCH", path, {"spec": spec}, content_type="application/merge-patch+json")
        except ApiError as e:
            if e.status != 404:
                raise
            self.api.request("POST", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", {
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.node, "ownerReferences": [
                    {"apiVersion": "v1", "kind": "Node", "name": self.node, "uid": self.node_uid}]},
                "spec": spec})

    def wait_schedulable(self) -> None:
        """The node lifecycle controller lifts `node.kubernetes.io/not-ready` once it sees
        Ready; wait for that (bounded), then lift it ourselves if it is still there."""
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            node = self.api.request("GET", f"/api/v1/nodes/{self.node}")
            taints = node["spec"].get("taints") or []
            system = [t for t in taints if t["key"].startswith("node.kubernetes.io/")]
            if not system:
                return
            if time.monotonic() > deadline - self.ready_timeout_s / 2:
                log("lifting-taints", taints=[t["key"] for t in system])
                self.api.request("PATCH", f"/api/v1/nodes/{self.node}",
                                 {"spec": {"taints": [t for t in taints if t not in system] or None}},
                                 content_type="application/merge-patch+json")
            time.sleep(0.5)
        raise TimeoutError(f"node {self.node} still tainted after {self.ready_timeout_s}s")

    def heartbeat_loop(self) -> None:
        last_status = time.monotonic()
        while not self.stopping.wait(self.heartbeat_s):
            try:
                if time.monotonic() - last_status >= 2 * self.heartbeat_s:
                    try:
                        self.post_status()
                    except ApiError as e:
                        if e.status != 404:
                            raise
                        log("node-gone", action="registering again")
                        self.register()
                    last_status = time.monotonic()
                self.renew_lease()
            except Exception as e:  # noqa: BLE001 - retried on the next beat
                log("heartbeat-failed", error=e)

    # ------------------------------------------------------------------ pods

    def watch_loop(self) -> None:
        sel = {"fieldSelector": f"spec.nodeName={self.node}"}
        while not self.stopping.is_set():
            try:
                lst = self.api.request("GET", "/api/v1/pods", query=sel)
                seen = set()
                for pod in lst.get("items") or []:
                    seen.add(pod["metadata"]["uid"])
                    self.on_pod(pod)
                with self.lock:
                    missing = [w for uid, w in self.workers.items() if uid not in seen]
                for w in missing:
                    w.vanish()
                rv = lst["metadata"]["resourceVersion"]
                for ev in self.api.watch("/api/v1/pods", {**sel, "resourceVersion": rv, "timeoutSeconds": 30},
                                         self.stopping):
                    if ev["type"] == "ERROR":
                        break
                    if ev["type"] == "BOOKMARK":
                        continue
                    pod = ev["object"]
                    if ev["type"] == "DELETED":
                        with self.lock:
                            w = self.workers.get(pod["metadata"]["uid"])
                        if w:
                            w.vanish()
                    else:
                        self.on_pod(pod)
            except Exception as e:  # noqa: BLE001 - re-list and watch again
                if not self.stopping.is_set():
                    log("watch-failed", error=str(e)[:300])
                    self.stopping.wait(1)

    def on_pod(self, pod: dict[str, Any]) -> None:
        if self.stopping.is_set():
            return
        uid = pod["metadata"]["uid"]
        with self.lock:
            w = self.workers.get(uid)
            if w is None:
                phase = (pod.get("status") or {}).get("phase")
                if phase in ("Succeeded", "Failed"):
                    if pod["metadata"].get("deletionTimestamp"):
                        self.delete_now(pod)
                    return
                w = PodWorker(self, pod)
                self.workers[uid] = w
                log("pod-added", pod=w.key, uid=uid[:8])
                w.thread.start()
                return
        w.update(pod)

    def delete_now(self, pod: dict[str, Any]) -> None:
        m = pod["metadata"]
        try:
            self.api.request("DELETE", f"/api/v1/namespaces/{m['namespace']}/pods/{m['name']}",
                             {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0,
                              "preconditions": {"uid": m["uid"]}})
        except ApiError:
            pass

    def forget(self, w: PodWorker) -> None:
        with self.lock:
            if self.workers.get(w.uid) is w:
                del self.workers[w.uid]

    def annotate_ports(self, w: PodWorker) -> None:
        ports = {c.name: {**{n: c.ports[cp] for n, cp in c.port_names.items()},
                          **{str(cp): hp for cp, hp in c.ports.items()}} for c in w.containers if c.ports}
        if not ports:
            return
        try:
            self.api.request("PATCH", f"/api/v1/namespaces/{w.ns}/pods/{w.name}",
                             {"metadata": {"annotations": {PORTS_ANNOTATION: json.dumps(ports, sort_keys=True)}}},
                             content_type="application/merge-patch+json")
        except ApiError as e:
            log("annotate-failed", pod=w.key, error=e)

    def event(self, pod: dict[str, Any], reason: str, message: str, type_: str = "Normal") -> None:
        m = pod["metadata"]
        now = now_iso()
        try:
            self.api.request("POST", f"/api/v1/namespaces/{m['namespace']}/events", {
                "apiVersion": "v1", "kind": "Event",
                "metadata": {"generateName": f"{m['name']}.", "namespace": m["namespace"]},
                "involvedObject": {"kind": "Pod", "apiVersion": "v1", "namespace": m["namespace"],
                                   "name": m["name"], "uid": m["uid"]},
                "reason": reason, "message": message[:1000], "type": type_, "count": 1,
                "firstTimestamp": now, "lastTimestamp": now,
                "source": {"component": "afc-nodeagent", "host": self.node}}, timeout=5)
        except Exception:  # noqa: BLE001 - events are best effort (the namespace may be going)
            pass

    def kill_orphans(self) -> None:
        """Processes a previous agent for this node and state dir left behind (it was killed)."""
        for pid in agent_processes(self.node, self.state_dir):
            try:
                os.kill(pid, signal.SIGKILL)
                log("killed-orphan", pid=pid)
            except (ProcessLookupError, PermissionError):
                pass


# --------------------------------------------------------------------------- as a subprocess

class NodeAgentProcess:
    """The CLI as a subprocess, for tests and scripts; entered once it logged `ready`.

        with NodeAgentProcess("afc-node-1", state_dir, log_path, kubeconfig) as agent:
            agent.pod_log("ns", "pod-0", "consumer"); agent.processes(pod_uid)

    With `taint=True` the Node carries `afc.dev/node-agent=<node>:NoSchedule`, so only pods
    with `agent.placement()` (a toleration and a nodeSelector) land on it: tests that share
    a control plane with other runs keep their pods to themselves."""

    TAINT_KEY = "afc.dev/node-agent"

    def __init__(self, node: str, state_dir: str | Path, log_path: str | Path, kubeconfig: str | None = None,
                 args: list[str] | tuple[str, ...] = (), taint: bool = False, python: str | None = None,
                 timeout: float = 90) -> None:
        self.node, self.state_dir, self.log_path = node, Path(state_dir).resolve(), Path(log_path)
        self.args, self.taint, self.timeout = list(args), taint, timeout
        self.python = python or str(VENV_BIN / "python")
        self.kubeconfig = kubeconfig
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def placement(self) -> dict[str, Any]:
        """Pod spec fields that put a pod on this node (and, with the taint, only there)."""
        out: dict[str, Any] = {"nodeSelector": {"kubernetes.io/hostname": self.node}}
        if self.taint:
            out["tolerations"] = [{"key": self.TAINT_KEY, "operator": "Equal", "value": self.node,
                                   "effect": "NoSchedule"}]
        return out

    def pod_log_path(self, namespace: str, pod: str, container: str) -> Path:
        return pod_log_path(self.state_dir, namespace, pod, container)

    def pod_log(self, namespace: str, pod: str, container: str) -> str:
        p = self.pod_log_path(namespace, pod, container)
        return p.read_text(errors="replace") if p.exists() else ""

    def processes(self, pod_uid: str | None = None) -> list[int]:
        return agent_processes(self.node, self.state_dir, pod_uid)

    def start(self) -> "NodeAgentProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [self.python, "-P", str(HERE), "--node", self.node, "--state-dir", str(self.state_dir), *self.args]
        if self.taint:
            cmd += ["--taint", f"{self.TAINT_KEY}={self.node}:NoSchedule"]
        if self.kubeconfig:
            cmd += ["--kubeconfig", self.kubeconfig]
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_bytes()[offset:].decode(errors="replace")
            if self.proc.poll() is not None:
                raise RuntimeError(f"node agent exited {self.proc.returncode}:\n{text[-3000:]}")
            if " nodeagent ready " in text:
                return self
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"node agent not ready after {self.timeout}s:\n{text[-3000:]}")

    def stop(self) -> None:
        """SIGTERM: the agent stops its pods' processes and removes its Node."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._log:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        """SIGKILL, as a crash: the pods' processes outlive it (the next start kills them)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self._log:
            self._log.close()
            self._log = None

    def __enter__(self) -> "NodeAgentProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- CLI

def parse_taint(s: str) -> dict[str, str]:
    kv, _, effect = s.rpartition(":")
    if not kv or effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
        raise argparse.ArgumentTypeError(f"taint {s!r}: want key[=value]:NoSchedule|PreferNoSchedule|NoExecute")
    k, _, v = kv.partition("=")
    return {"key": k, "value": v, "effect": effect} if v else {"key": k, "effect": effect}


def parse_kv(s: str) -> tuple[str, str]:
    k, sep, v = s.partition("=")
    if not sep or not k:
        raise argparse.ArgumentTypeError(f"{s!r}: want KEY=VALUE")
    return k, v


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--exec-container"]:
        exec_container(argv[1])
        return 127
    if argv[:1] == ["--probe-mountns"]:
        return probe_mountns()
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"))
    ap.add_argument("--node", default="afc-node-1")
    ap.add_argument("--state-dir", help="pods' sandboxes and logs (default $AFC_TESTBED_DIR/nodeagent/<node>)")
    ap.add_argument("--taint", type=parse_taint, action="append", default=[], help="key[=value]:Effect")
    ap.add_argument("--label", type=parse_kv, action="append", default=[], help="KEY=VALUE")
    ap.add_argument("--cpu", default="16")
    ap.add_argument("--memory", default="64Gi")
    ap.add_argument("--pods", type=int, default=110)
    ap.add_argument("--backoff-initial", type=float, default=10.0)
    ap.add_argument("--backoff-max", type=float, default=300.0)
    ap.add_argument("--map-image", type=parse_kv, action="append", default=[],
                    help="SUBSTRING=COMMAND [ARGS] (before the default mappings)")
    ap.add_argument("--env", type=parse_kv, action="append", default=[], help="KEY=VALUE for every container")
    ap.add_argument("--no-mount-ns", action="store_true", help="no private mount namespaces (see docstring)")
    ap.add_argument("--keep-node", action="store_true", help="leave the Node object when stopping")
    ap.add_argument("--heartbeat", type=float, default=10.0, help="seconds between Lease renewals")
    a = ap.parse_args(argv)
    maps = []
    for sub, cmd in a.map_image:
        words = shlex.split(cmd)
        maps.append(ImageMapping(sub, words[:1], words[1:], dict(IMAGE_ENV)))
    agent = NodeAgent(a.kubeconfig, a.node, a.state_dir, taints=a.taint, labels=dict(a.label), cpu=a.cpu,
                      memory=a.memory, pods=a.pods, backoff_initial_s=a.backoff_initial, backoff_max_s=a.backoff_max,
                      image_map=maps, extra_env=dict(a.env), mountns=False if a.no_mount_ns else None,
                      keep_node=a.keep_node, heartbeat_s=a.heartbeat)
    done = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        agent.start()
        while not done.wait(1):
            pass
    finally:
        agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
