"""The test bed script under faults: clear errors, non-zero exits, no orphan processes."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from afctest import ROOT

pytestmark = pytest.mark.testbed
SCRIPT = ROOT / "scripts" / "testbed.py"


def run_bed(state: Path, base: int, *args: str, path: str | None = None,
            cache: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AFC_TESTBED_DIR": str(state), "AFC_TESTBED_PORT_BASE": str(base),
           "AFC_TESTBED_READY_TIMEOUT": "60"}
    if path is not None:
        env["PATH"] = path
    if cache is not None:
        env["AFC_CACHE"] = str(cache)
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env=env, timeout=180)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


def free_base() -> int:
    """A port base whose test-bed ports are all free on this machine."""
    for base in range(23000, 60000, 1000):
        offsets = (23, 24, 43, 57, 59, 79, 92, 93, *range(81, 87), *range(181, 187))   # 8x: Redis Cluster
        if all(_free(base + off) for off in offsets):
            return base
    raise RuntimeError("no free port range for a second test bed")


def _free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture
def bed(tmp_path: Path):
    state, base = tmp_path / "bed", free_base()
    yield state, base
    run_bed(state, base, "down")


def test_port_taken_names_the_port_and_leaves_no_orphans(bed) -> None:
    state, base = bed
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.1", base + 92))     # Kafka's port in that bed
    blocker.listen()
    try:
        r = run_bed(state, base, "up", "redis", "kafka")
    finally:
        blocker.close()
    assert r.returncode == 1
    assert f"port {base + 92} (kafka) is already taken" in r.stderr
    assert "AFC_TESTBED_PORT_BASE" in r.stderr
    # Redis was started first by this invocation; it must have been stopped again.
    started = [line for line in r.stderr.splitlines() if "event=started part=redis" in line]
    assert started, r.stderr
    pid = int(started[0].split("pid=")[1].split()[0])
    assert not alive(pid)
    assert not (state / "pids" / "redis.pid").exists()


def test_half_started_bed_is_recovered(bed) -> None:
    state, base = bed
    dead = subprocess.Popen(["sleep", "0"])
    dead.wait()
    (state / "pids").mkdir(parents=True)
    (state / "pids" / "redis.pid").write_text(str(dead.pid))   # a pid file left by a crash
    r = run_bed(state, base, "up", "redis")
    assert r.returncode == 0, r.stderr
    assert "event=stale part=redis" in r.stderr
    pid = int((state / "pids" / "redis.pid").read_text())
    assert alive(pid)
    again = run_bed(state, base, "up", "redis")            # idempotent: nothing new started
    assert again.returncode == 0 and "event=running part=redis" in again.stderr
    assert int((state / "pids" / "redis.pid").read_text()) == pid
    assert run_bed(state, base, "down").returncode == 0
    assert not alive(pid)


def test_missing_java_is_a_clear_error(bed, tmp_path: Path) -> None:
    state, base = bed
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("ss",):
        if shutil.which(tool):
            (bin_dir / tool).symlink_to(shutil.which(tool))
    r = run_bed(state, base, "up", "kafka", path=str(bin_dir))
    assert r.returncode == 1
    assert "java not found" in r.stderr and "install a JDK" in r.stderr


def test_missing_go_is_a_clear_error(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("python3", "sed", "mkdir", "dirname", "bash"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    env = {**os.environ, "PATH": str(bin_dir), "AFC_CACHE": str(tmp_path / "cache")}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "build-k8s.sh")], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 2
    assert "go not found" in r.stderr


def node_ids(state: Path) -> dict[str, str]:
    """Each cluster node's own id, from its nodes.conf."""
    out = {}
    for conf in sorted(state.glob("redis-cluster/*/nodes.conf")):
        me = next(line for line in conf.read_text().splitlines() if "myself" in line)
        out[conf.parent.name] = me.split()[0]
    return out


@pytest.mark.skipif(shutil.which("redis-cli") is None, reason="redis-cli (Debian redis-tools) not installed")
def test_redis_cluster_is_formed_once_and_rejoins_after_down_and_a_lost_node(bed) -> None:
    state, base = bed
    r = run_bed(state, base, "up", "redis-cluster")
    assert r.returncode == 0, r.stderr
    assert "event=formed part=redis-cluster" in r.stderr and "event=ready part=redis-cluster" in r.stderr
    assert f"AFC_REDIS_CLUSTER_URL=redis+cluster://127.0.0.1:{base + 81}," in r.stdout
    ids = node_ids(state)
    assert len(ids) == 6 and len(set(ids.values())) == 6
    status = json.loads(run_bed(state, base, "status").stdout)
    row = next(p for p in status["parts"] if p["part"] == "redis-cluster")
    assert row["ready"] and row["problems"] == []

    assert run_bed(state, base, "down").returncode == 0
    assert not any(_free(base + 80 + i) is False for i in range(1, 7))      # every node stopped
    again = run_bed(state, base, "up", "redis-cluster")
    assert again.returncode == 0, again.stderr
    assert "event=formed" not in again.stderr                               # the same cluster, not a new one
    assert "event=ready part=redis-cluster" in again.stderr and node_ids(state) == ids

    # A node that lost its state (folder removed) comes back as a replica of the cluster.
    pid = int((state / "pids" / "redis-cluster-6.pid").read_text())
    os.kill(pid, 9)
    shutil.rmtree(state / "redis-cluster" / "6")
    healed = run_bed(state, base, "up", "redis-cluster")
    assert healed.returncode == 0, healed.stderr
    assert "event=rejoined part=redis-cluster" in healed.stderr and "event=ready part=redis-cluster" in healed.stderr
