"""What the orchestrator measures from outside the consumers: committed offsets, process
resources, afc's /metrics, latency percentiles, and the summary of a cProfile run.

Nothing here runs inside a consumer, so every variant is observed the same way.
"""
from __future__ import annotations

import json
import math
import os
import sys
import pstats
import socket
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from confluent_kafka import Consumer, KafkaException, TopicPartition


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- offsets

class OffsetWatch:
    """Reads a group's committed offsets without joining it (OffsetFetch only)."""

    def __init__(self, bootstrap: str, group: str, topic: str, partitions: int) -> None:
        self.tps = [TopicPartition(topic, p) for p in range(partitions)]
        self.c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})

    def committed(self) -> int | None:
        """Sum of committed offsets (no commit yet counts 0); None if the broker did not answer."""
        try:
            parts = self.c.committed(self.tps, timeout=5)
        except KafkaException:
            return None
        return sum(max(0, p.offset) for p in parts)

    def close(self) -> None:
        self.c.close()


# ---------------------------------------------------------------------------- processes

@dataclass
class ProcSampler:
    """Peak RSS (sampled, and the kernel's VmHWM at the end) and CPU seconds of one process."""
    pid: int
    peak_rss: int = 0
    cpu_s: float = 0.0
    samples: int = 0
    proc: psutil.Process = field(init=False)

    def __post_init__(self) -> None:
        self.proc = psutil.Process(self.pid)

    def sample(self) -> None:
        try:
            with self.proc.oneshot():
                self.peak_rss = max(self.peak_rss, self.proc.memory_info().rss)
                t = self.proc.cpu_times()
                self.cpu_s = t.user + t.system
            self.samples += 1
        except psutil.Error:
            pass

    def vm_hwm(self) -> int | None:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def _thread_times(self) -> list[tuple[int, str, float]]:
        """(thread id, OS thread name, CPU seconds) of every live thread; [] once the process is gone."""
        out = []
        try:
            for th in self.proc.threads():
                try:
                    name = Path(f"/proc/{self.pid}/task/{th.id}/comm").read_text().strip()
                except OSError:
                    name = "?"
                out.append((th.id, name, th.user_time + th.system_time))
        except psutil.Error:
            return []
        return out

    def threads(self) -> list[dict[str, Any]]:
        """CPU per OS thread, grouped by thread name (librdkafka names its threads rdk:*;
        Python threads carry the process name)."""
        groups: dict[str, dict[str, Any]] = {}
        for _, name, cpu in self._thread_times():
            if name.startswith("rdk:broker"):
                name = "rdk:broker*"
            g = groups.setdefault(name, {"threads": 0, "cpu_s": 0.0})
            g["threads"] += 1
            g["cpu_s"] += cpu
        return sorted(({"name": k, "threads": v["threads"], "cpu_s": round(v["cpu_s"], 2)}
                       for k, v in groups.items()), key=lambda d: -d["cpu_s"])

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds so far by role: loop (the main thread, afc's event loop), librdkafka
        (its rdk:* threads) and python: the rest of the process's CPU, which the kernel keeps
        for threads that ended too (handler workers leave when idle; summing the live threads
        lost their CPU, and a difference of two readings could come out negative)."""
        out = {"loop": 0.0, "librdkafka": 0.0, "python": 0.0}
        try:
            t = self.proc.cpu_times()
        except psutil.Error:
            return out
        for tid, name, cpu in self._thread_times():
            if tid == self.pid:
                out["loop"] += cpu
            elif name.startswith("rdk:"):
                out["librdkafka"] += cpu
        out["python"] = max(0.0, t.user + t.system - out["loop"] - out["librdkafka"])
        return out

    def summary(self) -> dict[str, Any]:
        hwm = self.vm_hwm()
        peak = max(self.peak_rss, hwm or 0)
        return {"peak_rss_mib": round(peak / 2**20, 1), "cpu_s": round(self.cpu_s, 2),
                "rss_source": "max(psutil samples every ~0.1 s, /proc VmHWM)"}


class ServerCpu:
    """CPU seconds the test bed's Kafka and Redis spend during a phase (they share the cores),
    and Redis's own per-command time (INFO commandstats; commands run inside Lua scripts are
    counted both under their own name and in the script's EVALSHA)."""

    def __init__(self, testbed_dir: str | None, redis_url: str | None = None,
                 parts: tuple[str, ...] = ("kafka", "redis")) -> None:
        """`parts`: the bed's process names to time (e.g. one node of the Redis Cluster,
        `redis-cluster-1`, with that node's `redis://` URL for its commandstats)."""
        self.procs: dict[str, psutil.Process] = {}
        for name in parts:
            try:
                pid = int(Path(testbed_dir or "", "pids", f"{name}.pid").read_text())
                self.procs[name] = psutil.Process(pid)
            except (OSError, ValueError, psutil.Error):
                pass
        self.redis_url = redis_url
        self._redis: Any = None
        self.start: dict[str, float] = {}
        self.start_cmds: dict[str, dict[str, int]] = {}

    def cpu_now(self) -> dict[str, float]:
        """CPU seconds so far of each timed part, by name (begin/end, or a window of one's own)."""
        out = {}
        for name, p in self.procs.items():
            try:
                t = p.cpu_times()
                out[name] = t.user + t.system
            except psutil.Error:
                pass
        return out

    def _cmds(self) -> dict[str, dict[str, int]]:
        if not self.redis_url:
            return {}
        import redis
        try:
            # One connection kept open, so that the only commands of ours between two readings
            # are the first reading's INFO (a new connection would add its HELLO).
            if self._redis is None:
                self._redis = redis.Redis.from_url(self.redis_url)
            stats = self._redis.info("commandstats")
        except redis.RedisError:
            return {}
        return {k.removeprefix("cmdstat_"): {"calls": int(v["calls"]), "usec": int(v["usec"])}
                for k, v in stats.items()}

    def begin(self) -> None:
        self.start = self.cpu_now()
        self.start_cmds = self._cmds()

    def end(self) -> dict[str, Any]:
        now = self.cpu_now()
        out: dict[str, Any] = {f"{k}_cpu_s": round(now[k] - self.start[k], 2) for k in now if k in self.start}
        out.update(commandstats_delta(self.start_cmds, self._cmds()))
        return out


def machine_cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies of all cores from /proc/stat (idle counts iowait too); None if unreadable."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return v[3] + v[4], sum(v[:8])         # user nice system idle iowait irq softirq steal


def idle_pct(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """The share of the machine's cores left idle between two readings: whether a phase was
    short of CPU, or waited with cores to spare."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return round(100 * (after[0] - before[0]) / (after[1] - before[1]), 1)


# The orchestrator's own commands in a window: the INFO commandstats that opened it (Redis
# counts a command after it ran, so the closing one is not in the window; one connection kept
# open, so no HELLO either). A consumer's own INFO calls still count.
ORCHESTRATOR_CALLS = {"info": 1}


def commandstats_delta(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]],
                       top: int = 6) -> dict[str, Any]:
    """What Redis executed between two `INFO commandstats` readings ({command: {calls, usec}}):
    the `top` commands by time, and the number of calls of every command less the orchestrator's
    own (`redis_calls`, which commands per message are computed from). Commands run
    inside a Lua script count under their own name and in the script's EVALSHA, as Redis
    counts them. Empty when Redis could not be read."""
    if not after:
        return {}
    delta = []
    for k, v in after.items():
        old = before.get(k, {"calls": 0, "usec": 0})
        calls, usec = v["calls"] - old["calls"], v["usec"] - old["usec"]
        if calls > 0:
            delta.append((k, calls, usec))
    delta.sort(key=lambda d: -d[2])
    out: dict[str, Any] = {"redis_calls": sum(max(0, c - ORCHESTRATOR_CALLS.get(k, 0)) for k, c, _ in delta)}
    if delta:
        out["redis_commands"] = {k: {"calls": c, "usec": u, "usec_per_call": round(u / c, 2)}
                                 for k, c, u in delta[:top]}
    return out


def per_message(total: float | None, messages: int | None, digits: int = 3) -> float | None:
    """total / messages, rounded; None when either is unknown or there were no messages."""
    if total is None or not messages:
        return None
    return round(total / messages, digits)


def ratio_goal(goal: str, numerator: float | None, denominator: float | None, target: float,
               at_most: bool = False) -> dict[str, Any]:
    """A goal 'numerator / denominator >= target' (or <= with `at_most`), computed from this
    run's figures: the ratio (None when either figure is missing) and whether it is met."""
    ratio = round(numerator / denominator, 3) if numerator and denominator else None
    met = ratio is not None and (ratio <= target if at_most else ratio >= target)
    return {"goal": goal, "target": target, "value": ratio, "numerator": numerator, "denominator": denominator,
            "ratio_to_target": round(ratio / target, 3) if ratio is not None else None, "met": met}


# ---------------------------------------------------------------------------- afc's endpoints

def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""
    except OSError:
        return 0, ""


def scrape(port: int) -> dict[str, float]:
    """afc's /metrics as {name{labels}: value}; empty when the server is not up."""
    status, body = http_get(f"http://127.0.0.1:{port}/metrics")
    out: dict[str, float] = {}
    if status != 200:
        return out
    for line in body.splitlines():
        if not line or line[0] == "#":
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out


def histogram_quantiles(metrics: dict[str, float], name: str, qs: tuple[float, ...] = (0.5, 0.99)) -> dict[str, Any]:
    """Bucket upper bounds holding each quantile of a Prometheus histogram (coarse, a cross-check)."""
    buckets = []
    prefix = f'{name}_bucket{{le="'
    for k, v in metrics.items():
        if k.startswith(prefix):
            le = k[len(prefix):-2]
            buckets.append((math.inf if le == "+Inf" else float(le), v))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0
    out: dict[str, Any] = {"count": int(total)}
    for q in qs:
        bound = next((b for b, c in buckets if c >= q * total), None) if total else None
        out[f"p{int(q * 100)}_le_ms"] = None if bound is None or bound == math.inf else round(bound * 1000, 3)
    return out


# ---------------------------------------------------------------------------- latency

def percentiles(values: list[float]) -> dict[str, float | int | None]:
    """Nearest-rank percentiles, in ms."""
    if not values:
        return {"count": 0, "p50_ms": None, "p90_ms": None, "p99_ms": None, "p999_ms": None, "max_ms": None}
    v = sorted(values)

    def rank(q: float) -> float:
        return round(1000 * v[min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))], 3)

    return {"count": len(v), "p50_ms": rank(0.5), "p90_ms": rank(0.9), "p99_ms": rank(0.99),
            "p999_ms": rank(0.999), "max_ms": round(1000 * v[-1], 3),
            "mean_ms": round(1000 * sum(v) / len(v), 3)}


# ---------------------------------------------------------------------------- scheduler

# What StallProbe measures, in the words every results file and report carries.
STALLS_WHAT = ("how late a separate process woke from 1 ms sleeps beside the run: the wait of a ready thread "
               "for a core on this machine, which every hop of a consumer's path can meet")
# The probe's process: prints one JSON line of oversleeps in s.
_STALL_CODE = """
import json, sys, time
end = time.monotonic() + float(sys.argv[1]); late = []
while time.monotonic() < end:
    t0 = time.perf_counter(); time.sleep(0.001); late.append(time.perf_counter() - t0 - 0.001)
print(json.dumps(late))
"""


class StallProbe:
    """STALLS_WHAT, measured beside a run."""

    def __init__(self, seconds: float) -> None:
        import subprocess
        self.p = subprocess.Popen([sys.executable, "-c", _STALL_CODE, str(seconds)], stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        self.seconds = seconds

    def result(self) -> dict[str, Any]:
        """Percentiles of the oversleep (a 1 ms sleep that took 1 ms + x: x), and how many
        wake-ups came more than 10 ms late; stops the probe if it is still running."""
        import subprocess
        try:
            out, _ = self.p.communicate(timeout=self.seconds + 30)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.communicate()
            return {"error": "stall probe did not finish"}
        try:
            late = json.loads(out)
        except ValueError:
            return {"error": "stall probe printed no result"}
        return {**percentiles(late), "late_over_10ms": sum(1 for x in late if x > 0.010), "what": STALLS_WHAT}

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(5)


# ---------------------------------------------------------------------------- profile

BLOCKING = ("poll' of 'cimpl", "consume' of 'cimpl", "commit' of 'cimpl", "'get' of '_queue",
            "'acquire' of '_thread.lock", "'poll' of 'select.epoll", "method 'control' of 'select",
            "built-in method time.sleep", "'wait' of", "'join' of", "method 'close' of 'cimpl",
            "'recv_into' of '_socket", "'select' of 'select",
            # uvloop's loop is C, run inside asyncio.Runner.run: cProfile books its epoll wait and
            # its machinery there as one own time that cannot be told apart (the process's CPU
            # by thread, measured apart, says what the loop's thread spent)
            "asyncio/runners.py")


def _fname(key: tuple[str, int, str], root: str) -> str:
    file, line, func = key
    if file == "~":
        return func
    file = file.replace(root + "/", "")
    for marker in ("site-packages/", "lib/python3.11/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{file}:{line}({func})"


def _rows(stats: pstats.Stats, root: str, sort: int, n: int) -> list[dict[str, Any]]:
    """sort: 2 = own (tottime), 3 = cumulative."""
    entries = sorted(stats.stats.items(), key=lambda kv: -kv[1][sort])  # type: ignore[attr-defined]
    out = []
    for key, (cc, nc, tt, ct, _callers) in entries[:n]:
        name = _fname(key, root)
        out.append({"function": name, "calls": nc, "own_s": round(tt, 3), "cum_s": round(ct, 3),
                    **({"blocking": True} if any(b in name for b in BLOCKING) else {})})
    return out


def thread_group(name: str) -> str:
    if name.startswith("MainThread"):
        return "loop (MainThread)"
    if name.startswith("afc-kafka"):
        return "kafka thread (afc-kafka)"
    if name.startswith("afc-lane"):
        return "handler lanes (afc-lane-*)"
    return "other threads"


def summarize_profile(prof_dir: Path, root: str, top: int = 15) -> dict[str, Any]:
    """Top functions over all threads, and per thread group, from profile_afc.py's output."""
    index = json.loads((prof_dir / "threads.json").read_text())
    merged: pstats.Stats | None = None
    groups: dict[str, pstats.Stats] = {}
    cpu: dict[str, float] = {}
    for th in index:
        st = pstats.Stats(str(prof_dir / th["file"]))
        g = thread_group(th["name"])
        cpu[g] = cpu.get(g, 0.0) + (th.get("cpu_s") or 0.0)
        if merged is None:
            merged = pstats.Stats(str(prof_dir / th["file"]))
        else:
            merged.add(str(prof_dir / th["file"]))
        if g in groups:
            groups[g].add(str(prof_dir / th["file"]))
        else:
            groups[g] = st
    assert merged is not None
    non_blocking = [r for r in _rows(merged, root, 2, top * 3) if not r.get("blocking")][:top]
    return {
        "python_thread_cpu_s": {k: round(v, 2) for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])},
        "top_own_time_all_threads": _rows(merged, root, 2, top),
        "top_own_time_excluding_blocking_calls": non_blocking,
        "top_cumulative_all_threads": _rows(merged, root, 3, top),
        "per_thread_group_top_own_time": {g: _rows(s, root, 2, 8) for g, s in groups.items()},
    }


def busy_processes(window_s: float = 1.0, min_pct: float = 5.0) -> list[dict[str, Any]]:
    """Processes using CPU right now (the machine is shared): context for every figure."""
    procs = list(psutil.process_iter(["name", "cmdline"]))
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(window_s)
    out = []
    for p in procs:
        try:
            pct = p.cpu_percent(None)
        except psutil.Error:
            continue
        if pct >= min_pct:
            cmd = " ".join(p.info.get("cmdline") or [p.info.get("name") or "?"])
            out.append({"pid": p.pid, "cpu_pct": round(pct), "cmd": cmd[:120]})
    return sorted(out, key=lambda d: -d["cpu_pct"])


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def doc_header(schema: str, script: str, argv: list[str] | None) -> dict[str, Any]:
    """The opening fields of a bench/results document: what ran, when, on what machine."""
    return {
        "schema": schema, "date": now_iso(),
        "command": " ".join([script, *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"nproc": os.cpu_count(), "load_avg_at_start": list(os.getloadavg()),
                    "note": "2 cores shared with the test bed (Kafka, Redis, kube-apiserver...) and other work"},
    }
