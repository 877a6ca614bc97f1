"""Monitoring test helpers: afc's monitoring generator (manifests/monitoring/generate.py) loaded
as a module, promtool, and `PrometheusBed`: a real `prometheus` (Debian's package) on a free
loopback port with a generated configuration and a temporary data folder, stopped on exit."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from afctest import ROOT, free_port, wait_for

MON = ROOT / "manifests" / "monitoring"


def _load_generator() -> Any:
    spec = importlib.util.spec_from_file_location("afc_monitoring_generate", MON / "generate.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gen = _load_generator()


def alerts(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for g in groups for r in g["rules"] if "alert" in r]


def binary(name: str) -> str:
    exe = shutil.which(name)
    assert exe, f"{name} missing: run scripts/install-deps.sh (Debian package prometheus)"
    return exe


def promtool() -> str:
    return binary("promtool")


class PrometheusBed:
    """`prometheus` on 127.0.0.1:<free port> with `rule_files` and static scrape targets.

    targets: {job: [(host:port, {label: value})], ...}; `honor_labels` jobs keep the labels
    the target exposes (the operator's `namespace`/`name`). Scrape and evaluation every
    `interval`. A context manager: the process is stopped (SIGTERM, then SIGKILL) on exit.
    """

    def __init__(self, workdir: Path, targets: dict[str, list[tuple[str, dict[str, str]]]],
                 rule_files: list[Path] = (), interval: str = "1s", honor_labels: tuple[str, ...] = ()) -> None:
        self.workdir, self.port = Path(workdir), free_port()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config = self.workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [{"job_name": job, "honor_labels": job in honor_labels,
                                "static_configs": [{"targets": [addr], "labels": labels} for addr, labels in ts]}
                               for job, ts in targets.items()],
        }, sort_keys=False))
        self.log_path = self.workdir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> "PrometheusBed":
        check = subprocess.run([promtool(), "check", "config", str(self.config)], capture_output=True, text=True,
                               timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([binary("prometheus"), f"--config.file={self.config}",
                                      f"--storage.tsdb.path={self.workdir / 'data'}",
                                      f"--web.listen-address=127.0.0.1:{self.port}",
                                      "--storage.tsdb.retention.time=1h", "--log.level=warn"],
                                     stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_for(lambda: self._ready() or self.proc.poll() is not None, timeout, 0.2, "prometheus /-/ready")
        assert self.proc.poll() is None, f"prometheus exited {self.proc.returncode}:\n{self.log_tail()}"
        return self

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def api(self, path: str, **params: str) -> Any:
        q = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}{q}", timeout=10) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:
            body = json.loads(e.read() or b"{}")
        assert body.get("status") == "success", f"/api/v1/{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] in ("vector", "scalar"), data
        return data["result"] if data["resultType"] == "vector" else [{"metric": {}, "value": data["result"]}]

    def alerts(self, state: str | None = None) -> list[dict[str, Any]]:
        return [a for a in self.api("alerts")["alerts"] if state is None or a["state"] == state]

    def targets(self) -> dict[str, str]:
        """scrape URL -> "up", or "<health>: <last error>"."""
        return {t["scrapeUrl"]: t["health"] if t["health"] == "up" else f'{t["health"]}: {t["lastError"]}'
                for t in self.api("targets")["activeTargets"]}

    def wait_targets_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (last := self.targets()) and set(last.values()) != {"up"}:
            assert time.monotonic() < deadline, f"targets not all up after {timeout}s: {last}"
            time.sleep(0.5)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc is not None:
            self._log.close()

    def __enter__(self) -> "PrometheusBed":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
