"""The test bed's Redis Cluster for tests: its health, and a master failover that puts the
cluster back as it was afterwards.

    with cluster.failover(key) as fo:      # kills (SIGKILL) the master serving `key`'s slot,
        ...                                # returns once its replica is promoted and every
                                           # live node says cluster_state:ok
    # here: the killed node was restarted (it rejoined as a replica), failed back to master
    # with CLUSTER FAILOVER, and the cluster is healthy again (3 masters, a replica each)

Every wait is bounded. The health rules and the restart are the bed's own
(scripts/testbed.py: `cluster_problems`, `up redis-cluster`), loaded from the script, so a
test and `make testbed-status` judge the cluster alike.
"""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Iterator

from afctest import ROOT, wait_for

SCRIPT = ROOT / "scripts" / "testbed.py"


def load_bed_script(state_dir: str) -> ModuleType:
    """scripts/testbed.py as a module, pointed at this bed's state folder."""
    spec = importlib.util.spec_from_file_location("afc_testbed_script", SCRIPT)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod          # its dataclasses look their module up while it loads
    spec.loader.exec_module(mod)
    mod.STATE = Path(state_dir)          # read at call time by every function of the script
    return mod


@dataclass
class Failover:
    killed_port: int            # the master that was SIGKILLed
    promoted_port: int          # its replica, master now
    slot: int | None            # the slot asked for (None: the first master was taken)
    failover_s: float           # from the kill to the promotion with cluster_state:ok everywhere
    restored_s: float = 0.0     # (after the block) restart + rejoin + fail back, seconds


class RedisClusterBed:
    def __init__(self, url: str, state_dir: str) -> None:
        self.url = url
        self.state_dir = state_dir
        self.bed = load_bed_script(state_dir)

    def problems(self) -> list[str]:
        return self.bed.cluster_problems()

    def wait_healthy(self, timeout: float = 60) -> None:
        wait_for(lambda: not self.problems(), timeout, 0.2, what=f"a healthy Redis Cluster ({self.problems()})")

    def nodes(self, port: int | None = None) -> list[dict]:
        """CLUSTER NODES as `port` sees it; without a port, as the first node that answers does."""
        if port is not None:
            return self.bed.cluster_nodes(port)
        for p in self.bed.cluster_ports():
            try:
                return self.bed.cluster_nodes(p)
            except (OSError, ValueError, ConnectionError):
                continue
        raise AssertionError("no Redis Cluster node answers")

    def node_index(self, port: int) -> int:
        return self.bed.cluster_ports().index(port) + 1

    def master_of_slot(self, slot: int) -> dict:
        for n in self.nodes():
            if "master" in n["flags"]:
                for rng in n["slots"]:
                    if rng.startswith("["):          # a slot being migrated
                        continue
                    lo, _, hi = rng.partition("-")
                    if int(lo) <= slot <= int(hi or lo):
                        return n
        raise AssertionError(f"no master serves slot {slot}: {self.nodes()}")

    def kill(self, port: int) -> None:
        """SIGKILL the bed's redis-server on this port (only a process the bed started)."""
        part = self.bed.BY_NAME[f"redis-cluster-{self.node_index(port)}"]
        pid = self.bed.owned_pid(part)
        assert pid, f"no running test-bed process for {part.name}"
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not self.bed.port_open(port), 10, 0.05, what=f"redis {port} gone")

    def restore(self, timeout: float = 90) -> None:
        """Start what is not running (the killed node) through the bed, which waits until the
        cluster is healthy again (the node rejoins as a replica of its promoted one)."""
        env = {**os.environ, "AFC_TESTBED_DIR": self.state_dir, "AFC_TESTBED_READY_TIMEOUT": str(timeout)}
        r = subprocess.run([sys.executable, str(SCRIPT), "up", "redis-cluster"], capture_output=True, text=True,
                           env=env, timeout=timeout + 30)
        assert r.returncode == 0, f"testbed.py up redis-cluster failed:\n{r.stderr[-3000:]}"

    def fail_back(self, port: int, timeout: float = 30) -> None:
        """Make the replica on `port` master again (CLUSTER FAILOVER, a coordinated switch with
        no data lost), so later tests see the layout `redis-cli --cluster create` made."""
        me = next(n for n in self.nodes(port) if "myself" in n["flags"])
        if "master" in me["flags"]:
            return
        wait_for(lambda: self._synced(port), timeout, 0.2, what=f"replica {port} in sync")
        self.bed.redis_cmd(port, "CLUSTER", "FAILOVER")
        wait_for(lambda: "master" in next(n for n in self.nodes(port) if "myself" in n["flags"])["flags"]
                 and not self.problems(), timeout, 0.2, what=f"{port} master again, cluster healthy")

    def _synced(self, port: int) -> bool:
        info = self.bed.redis_cmd(port, "INFO", "replication")
        return "master_link_status:up" in info and "master_sync_in_progress:0" in info

    @contextmanager
    def failover(self, key: str | None = None, timeout: float = 30) -> Iterator[Failover]:
        """Kill the master serving `key` (or the first master), wait for its replica's promotion
        and cluster_state:ok on every live node; after the block, restore and fail back."""
        from redis.crc import key_slot
        self.wait_healthy()
        slot = key_slot(key.encode()) if key is not None else None
        victim = self.master_of_slot(slot) if slot is not None else min(
            (n for n in self.nodes() if "master" in n["flags"] and n["slots"]), key=lambda n: n["port"])
        replica = next(n for n in self.nodes() if n["master"] == victim["id"])
        t0 = time.monotonic()
        self.kill(victim["port"])
        try:
            def promoted() -> bool:
                me = next(n for n in self.nodes(replica["port"]) if "myself" in n["flags"])
                live = [p for p in self.bed.cluster_ports() if p != victim["port"]]
                return "master" in me["flags"] and all(
                    self.bed.cluster_info(p).get("cluster_state") == "ok" for p in live)
            wait_for(promoted, timeout, 0.1, what=f"replica {replica['port']} promoted after killing {victim['port']}")
            fo = Failover(victim["port"], replica["port"], slot, time.monotonic() - t0)
            yield fo
        finally:
            t1 = time.monotonic()
            self.restore()
            self.fail_back(victim["port"])
            self.wait_healthy()
        fo.restored_s = time.monotonic() - t1
