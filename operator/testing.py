"""Helpers to run the operator against a real cluster in tests (as `kopf.testing` does for kopf).

- `OperatorProcess`: `afc-operator` as a subprocess (the console script the image runs),
  logs to a file, stopped by its pid; its log tail is added to a failed wait's message.
- `mark_pods_ready`: what a kubelet would report for a running, ready pod, for control
  planes without nodes (Pods otherwise stay Pending and a StatefulSet never gets ready).
- `resolve_env`: a container's environment as a kubelet builds it (downward API, Secret keys,
  `$(VAR)` references to variables defined before).
- `set_container_waiting`, `set_container_running`: a kubelet's report of a failing container
  (CrashLoopBackOff, ...), and of one running and ready again.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

from afc.operator.render import expand, resolve_env  # noqa: F401 - re-exported for the tests

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent


def operator_command() -> list[str]:
    exe = shutil.which("afc-operator", path=str(Path(sys.executable).parent)) or shutil.which("afc-operator")
    if not exe:
        raise RuntimeError("afc-operator is not installed (pip install -e '.[operator]')")
    return [exe]


def terminate(proc: subprocess.Popen, timeout: float) -> int | None:
    """SIGTERM and wait up to `timeout` for a graceful stop (a drain), then SIGKILL; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


class OperatorProcess:
    """`afc-operator ARGS` with KUBECONFIG=kubeconfig; a context manager that stops it.
    `command`/`cwd`: another checkout's operator (bench/operator.py measures main's beside this one)."""

    def __init__(self, args: Sequence[str], kubeconfig: str, log_path: Path,
                 env: Mapping[str, str] | None = None, command: Sequence[str] | None = None,
                 cwd: Path | None = None) -> None:
        self.args, self.kubeconfig, self.log_path = list(args), kubeconfig, Path(log_path)
        self.extra_env = dict(env or {})
        self.command, self.cwd = list(command) if command else None, cwd or REPO
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, ready_timeout: float = 60) -> "OperatorProcess":
        env = {k: v for k, v in os.environ.items() if not k.startswith("AFC_OPERATOR_")}
        env.update({"KUBECONFIG": self.kubeconfig, "PYTHONUNBUFFERED": "1"})
        env.update(self.extra_env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            # no fixed ports (tests run beside other operators): a test that reads /metrics passes --metrics
            self.proc = subprocess.Popen([*(self.command or operator_command()), "--liveness", "none", "--metrics",
                                          "none", *self.args], stdout=log, stderr=subprocess.STDOUT, env=env,
                                         cwd=self.cwd)
        self.wait_until(lambda: self.logged("operator started"), ready_timeout, "the operator to start")
        return self

    def logged(self, message: str) -> bool:
        return any(r.get("message") == message for r in self.records())

    def records(self) -> list[dict[str, Any]]:
        out = []
        if not self.log_path.exists():
            return out
        with open(self.log_path, "rb") as f:
            f.seek(self._log_offset)
            for line in f.read().decode(errors="replace").splitlines():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    out.append({"message": line})
        return out

    def tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_until(self, fn: Callable[[], T], timeout: float, what: str, interval: float = 0.2) -> T:
        deadline = time.monotonic() + timeout
        last: T | None = None
        while time.monotonic() < deadline:
            last = fn()
            if last:
                return last
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"afc-operator exited ({self.proc.returncode}) while waiting for {what}:\n"
                                     + self.tail())
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})\n"
                             f"--- operator log ({self.log_path}) ---\n{self.tail()}")

    def stop(self, timeout: float = 15) -> int | None:
        """SIGTERM and wait (kopf stops gracefully), then SIGKILL."""
        return None if self.proc is None else terminate(self.proc, timeout)

    def kill(self) -> None:
        """SIGKILL: no cleanup, as when a node dies or the OOM killer strikes."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def freeze(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGSTOP)

    def __enter__(self) -> "OperatorProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGCONT)
            except ProcessLookupError:
                pass
        self.stop()


def mark_pods_ready(core_api: Any, namespace: str, selector: str, names: Iterable[str] | None = None) -> list[str]:
    """Report Pending pods as Running and Ready through the status subresource, as a kubelet
    would once the containers pass their readiness probes. Returns the names marked."""
    from kubernetes.client.exceptions import ApiException
    wanted = set(names) if names is not None else None
    marked = []
    for pod in core_api.list_namespaced_pod(namespace, label_selector=selector).items:
        if wanted is not None and pod.metadata.name not in wanted:
            continue
        if pod.metadata.deletion_timestamp is not None:
            continue
        ready = any(c.type == "Ready" and c.status == "True" for c in (pod.status.conditions or []))
        if pod.status.phase == "Running" and ready:
            continue
        try:
            core_api.patch_namespaced_pod_status(pod.metadata.name, namespace, {"status": {
                "phase": "Running",
                "conditions": [{"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"}],
            }})
        except ApiException as e:
            if e.status != 404:
                raise
            continue  # deleted between the list and the patch (a rollout replaces it): a kubelet would skip it too
        marked.append(pod.metadata.name)
    return marked


def delete_consumers(kubectl: Sequence[str], namespace: str, timeout: float = 30) -> None:
    """Delete every AdaptiveConsumer of a namespace while the operator still runs (its poll
    daemon holds a finalizer that kopf removes once the daemon stopped); whatever is left
    after `timeout` (no operator) loses its finalizers, so the namespace can go."""
    base = [*kubectl, "-n", namespace]
    subprocess.run([*base, "delete", "adaptiveconsumers.afc.dev", "--all", "--wait=true", f"--timeout={int(timeout)}s"],
                   capture_output=True, timeout=timeout + 30)
    left = subprocess.run([*base, "get", "adaptiveconsumers.afc.dev", "-o", "name"], capture_output=True, text=True,
                          timeout=30).stdout.split()
    for name in left:
        subprocess.run([*base, "patch", name, "--type=merge", "-p", '{"metadata":{"finalizers":null}}'],
                       capture_output=True, timeout=30)


def set_container_waiting(core_api: Any, namespace: str, pod: str, reason: str, message: str = "",
                          container: str = "consumer", restarts: int = 5) -> None:
    """Report the pod's container as a kubelet does when it cannot keep it running: waiting
    with `reason` (CrashLoopBackOff, ImagePullBackOff, ...), not ready."""
    core_api.patch_namespaced_pod_status(pod, namespace, {"status": {
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "False", "reason": "ContainersNotReady"},
                       {"type": "ContainersReady", "status": "False", "reason": "ContainersNotReady"}],
        "containerStatuses": [{"name": container, "ready": False, "restartCount": restarts, "image": "afc",
                               "imageID": "", "started": False,
                               "state": {"waiting": {"reason": reason, "message": message}},
                               "lastState": {}}],
    }})


def set_container_running(core_api: Any, namespace: str, pod: str, container: str = "consumer") -> None:
    """Report the pod's container running and ready (a pod that recovered)."""
    core_api.patch_namespaced_pod_status(pod, namespace, {"status": {
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"}],
        "containerStatuses": [{"name": container, "ready": True, "restartCount": 0, "image": "afc", "imageID": "",
                               "started": True, "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}},
                               "lastState": {}}],
    }})
