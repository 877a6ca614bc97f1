"""A fake kubelet for the operator's tests on the test bed (which has no kubelet).

`Kubelet` runs an `afc-consumer` per pod of one AdaptiveConsumer, with the pod's
group.instance.id (`<namespace>.<pod>`, resolved from the pod's env as a kubelet would), and
reports the pod Ready; when a pod is deleted it stops that process (SIGTERM: drain, commit,
close) before it lets the pod object go (a finalizer stands in for the kubelet's graceful
deletion: the pod object stays until its containers stopped, as on a real node).
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from afc.operator import render
from afctest import ConsumerProcess, Testbed

SELECTOR = "app.kubernetes.io/instance={name},app.kubernetes.io/name=afc-consumer"
FINALIZER = "test.afc.dev/kubelet"


class Kubelet:
    """Runs an afc-consumer per pod of one AdaptiveConsumer and stops it when the pod goes."""

    def __init__(self, testbed: Testbed, core: Any, namespace: str, topic: str, group: str, handler: str,
                 tmp_path: Path, redis_prefix: str, env: dict[str, str] | None = None, name: str = "orders") -> None:
        self.testbed, self.core, self.namespace = testbed, core, namespace
        self.topic, self.group, self.handler, self.tmp_path = topic, group, handler, tmp_path
        self.redis_prefix, self.env, self.name = redis_prefix, dict(env or {}), name
        self.procs: dict[str, ConsumerProcess] = {}
        self.exited: dict[str, float] = {}   # pod -> when its process had drained and exited
        self.started: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def sync(self) -> None:
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=SELECTOR.format(name=self.name)).items
        leaving = []
        for pod in pods:
            n, finalizers = pod.metadata.name, list(pod.metadata.finalizers or [])
            if pod.metadata.deletion_timestamp is not None:
                leaving.append((n, finalizers))
                continue
            if FINALIZER not in finalizers:
                self.core.patch_namespaced_pod(n, self.namespace, {"metadata": {"finalizers": [*finalizers, FINALIZER]}})
            if n not in self.procs:
                self.procs[n] = ConsumerProcess(self.testbed, [self.topic], self.group, self.handler_of(pod),
                                                self.tmp_path / f"{n}.log", instance_id=self.instance_id(pod),
                                                env=self.env,
                                                redis_prefix=self.redis_prefix).start()
                self.started[n] = time.time()
            if pod.status.phase != "Running":
                self.core.patch_namespaced_pod_status(n, self.namespace, {"status": {
                    "phase": "Running", "conditions": [{"type": "Ready", "status": "True"},
                                                       {"type": "ContainersReady", "status": "True"}]}})
        for n, _ in leaving:  # SIGTERM them all first: they drain side by side
            if n in self.procs and self.procs[n].proc.poll() is None:
                self.procs[n].proc.terminate()
        for n, finalizers in leaving:
            if n in self.procs:
                p = self.procs.pop(n)
                p.proc.wait(60)  # SIGTERM sent above; a second one would mean "exit now"
                p._log.close()
                self.exited[n] = time.time()
            if FINALIZER in finalizers:
                self.release(n, finalizers)

    def report(self, lines: int = 12) -> str:
        """Each pod's process state and the tail of its log: what a failed wait prints, so that a
        member missing from the group says whether its process died, and why."""
        out = []
        for n, p in sorted(self.procs.items()):
            rc = p.proc.poll() if p.proc else None
            try:
                tail = p.log_path.read_text(errors="replace").splitlines()[-lines:]
            except OSError as e:
                tail = [f"(no log: {e})"]
            out.append(f"--- {n}: {'running' if rc is None else f'exited {rc}'}\n" + "\n".join(tail))
        return "\n".join(out) or "(no pods)"

    def handler_of(self, pod: Any) -> str:
        """The handler the pod's process runs (here: the one given; see subclasses)."""
        return self.handler

    def instance_id(self, pod: Any) -> str:
        """The group.instance.id the pod's container gets: its env as the kubelet resolves it,
        read as the runtime does (AFC_INSTANCE_ID, then POD_NAME)."""
        iid = render.pod_instance_id(self.core.api_client.sanitize_for_serialization(pod))
        assert iid, f"pod {pod.metadata.name} has no group.instance.id in its env"
        return iid

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync()
            except BaseException as e:  # noqa: BLE001 - reported by the test
                self.error = e
            self._stop.wait(0.3)

    def __enter__(self) -> "Kubelet":
        self._thread = threading.Thread(target=self._run, name="kubelet", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(30)
        for p in self.procs.values():
            if p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait(10)
        for pod in self.core.list_namespaced_pod(self.namespace, label_selector=SELECTOR.format(name=self.name)).items:
            if FINALIZER in (pod.metadata.finalizers or []):
                self.release(pod.metadata.name, pod.metadata.finalizers)

    def release(self, pod: str, finalizers: list[str]) -> None:
        """Let the pod object go (a JSON patch: a strategic merge would merge the list)."""
        try:
            self.core.patch_namespaced_pod(pod, self.namespace, [
                {"op": "test", "path": "/metadata/finalizers", "value": finalizers},
                {"op": "replace", "path": "/metadata/finalizers", "value": [f for f in finalizers if f != FINALIZER]}])
        except Exception:  # noqa: BLE001 - gone already, or changed meanwhile (the next sync retries)
            pass
