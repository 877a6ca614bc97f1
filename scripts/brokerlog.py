"""The test bed's Kafka log, read for the group coordinator's own account of a group: each
completed rebalance (classic: "Stabilized group G generation N"; KIP-848: "[GroupId G]
Bumped group epoch to N") and each static member's rejoin. `describe_consumer_groups` does
not expose a classic group's generation, so the demo and the rollout benchmark count
rebalances here. Standard library only."""
from __future__ import annotations

import os
import re
from datetime import datetime
from pathlib import Path

CLASSIC_REBALANCE = "Stabilized group {g} generation (\\d+)"
KIP848_EPOCH = "\\[GroupId {g}\\] Bumped group epoch to (\\d+)"
STATIC_REJOIN = "Static member with groupInstanceId=(\\S+) and unknown member id joins group {g} in"


def path(root: Path) -> Path:
    """The broker's log of the test bed under `root` (or $AFC_TESTBED_DIR)."""
    return Path(os.environ.get("AFC_TESTBED_DIR", str(root / ".testbed"))) / "kafka" / "server.log"


def line_time(line: str) -> float | None:
    """Unix time of a log4j line ("[2026-11-27 04:00:34,479] ..."), None for continuation lines."""
    if not line.startswith("["):
        return None
    try:
        return datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    except ValueError:
        return None


def pattern(template: str, group: str) -> re.Pattern[str]:
    return re.compile(template.format(g=re.escape(group)) + r"\b")


def rebalances(lines: list[str], group: str, kip848: bool) -> list[tuple[float, int, str]]:
    """(unix time, generation or group epoch, line) of each of the coordinator's lines that
    mark a rebalance of `group`: a completed generation (classic) or an epoch bump (KIP-848)."""
    pat = pattern(KIP848_EPOCH if kip848 else CLASSIC_REBALANCE, group)
    out = []
    for ln in lines:
        m = pat.search(ln)
        ts = line_time(ln) if m else None
        if m and ts is not None:
            out.append((ts, int(m.group(1)), ln.strip()))
    return out


def read_from(log: Path, offset: int) -> list[str]:
    with open(log, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace").splitlines()


class Tail:
    """Reads the log incrementally from where it stood when made: whole lines only."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.offset = log.stat().st_size if log.exists() else 0

    def lines(self) -> list[str]:
        if not self.log.exists():
            return []
        with open(self.log, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        cut = chunk.rfind(b"\n") + 1
        self.offset += cut
        return chunk[:cut].decode(errors="replace").splitlines()
