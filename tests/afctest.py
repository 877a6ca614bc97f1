"""Helpers for tests that use the real test bed (imported by conftest and by tests)."""
from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


@dataclass(frozen=True)
class Testbed:
    __test__ = False  # not a test class, despite the name
    bootstrap: str
    redis_url: str
    kubeconfig: str
    kubectl: str
    k8s_bin: str
    state_dir: str

    @classmethod
    def load(cls) -> "Testbed":
        """From the environment `make test` exports, else by starting the bed (idempotent)."""
        env = {k: os.environ[k] for k in ("AFC_KAFKA_BOOTSTRAP", "AFC_REDIS_URL", "KUBECONFIG",
                                           "AFC_KUBECTL", "AFC_K8S_BIN", "AFC_TESTBED_DIR")
               if k in os.environ}
        if len(env) < 6:
            r = subprocess.run(["python3", str(ROOT / "scripts" / "testbed.py"), "up"],
                               capture_output=True, text=True, timeout=600)
            if r.returncode != 0:
                raise RuntimeError(f"test bed did not start:\n{r.stderr}")
            env = json.loads(Path(os.environ.get("AFC_TESTBED_DIR", ROOT / ".testbed"), "env.json").read_text())
        return cls(bootstrap=env["AFC_KAFKA_BOOTSTRAP"], redis_url=env["AFC_REDIS_URL"],
                   kubeconfig=env["KUBECONFIG"], kubectl=env["AFC_KUBECTL"],
                   k8s_bin=env["AFC_K8S_BIN"], state_dir=env["AFC_TESTBED_DIR"])

    def run_kubectl(self, *args: str, input: str | None = None, check: bool = True,
                    timeout: float = 60) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([self.kubectl, f"--kubeconfig={self.kubeconfig}", *args], input=input,
                           capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({r.returncode}): {r.stderr}")
        return r


def wait_for(fn: Callable[[], T], timeout: float = 30, interval: float = 0.2, what: str = "condition") -> T:
    """Poll until fn() is truthy; bounded, and says what it waited for when it gives up."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
