"""The rollout harness (issue 11): a StatefulSet-style rolling restart of N `afc-consumer`
processes on one group, measured from the broker's side.

    python -P bench/rollout.py                       # `make bench-rollout`: N = 4 and 8, every variant
    python -P bench/rollout.py --members 4 --variants static,eager --out /tmp/r.json

One scenario: a fresh 12-partition topic and group; a producer at a steady rate, round-robin
over the partitions; N members started and settled; then each member in turn gets SIGTERM,
is waited for, started again (a static member with the same `group.instance.id`) and waited
for until /readyz answers 200 (what a StatefulSet rolling update does; readiness means
"holding its assignment"). Measured:

- rebalances, from the broker: the group coordinator's own log lines for this group in the
  broker's log (classic: "Stabilized group G generation N", one per completed rebalance, so
  the generation before and after the roll too; KIP-848: "[GroupId G] Bumped group epoch to
  N"). `describe_consumer_groups` does not expose the generation of a classic group.
- revoked partitions, from the members: their `event=revoked` lines during the roll, except
  the revoke each member's own shutdown fires.
- stalls: the handler (`record`, below) pushes the time of every record it handles to a
  per-partition list in Redis; the longest gap between two handled records of a partition
  during the roll is its stall, and the gaps longer than `--stall-s` summed over partitions
  are the partition-seconds stopped.
- duplicates: the handler counts its runs per idempotency key (HINCRBY); a count above 1 is a
  duplicate handler run. Distinct keys against records produced gives what was missed.
- peak lag: log-end offsets minus the group's committed offsets, sampled every 0.5 s.

Variants (`VARIANTS`): static (classic protocol, cooperative-sticky, `group.instance.id`),
eager (dynamic, classic `range`), cooperative (dynamic, classic cooperative-sticky), kip848
(static, `group.protocol=consumer`), kip848-dynamic. Then static membership against its
session timeout: 4 static members, a 10 s session, each restart delayed 3 s (back in time) and
14 s (back too late, as a pod slower than its session). `run_scenario` is what
tests/integration/test_rollout.py runs; `main` writes bench/results/rollout.json itself.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # appended, not prepended: our operator/ must not shadow the stdlib's
sys.path.insert(0, str(ROOT / "scripts"))
import brokerlog  # noqa: E402  (scripts/brokerlog.py: the coordinator's lines, shared with the demo)
from afc.operator.testing import terminate  # noqa: E402
log = logging.getLogger("bench.rollout")

# -- the handler (runs inside afc-consumer: only the standard library at import) ----------

_r = None
_r_lock = threading.Lock()


def record(msg) -> None:  # noqa: ANN001 - an afc handler
    """Pushes when this record's partition was consumed and counts runs of its idempotency key."""
    global _r
    if _r is None:
        with _r_lock:
            if _r is None:
                import redis
                _r = redis.Redis.from_url(os.environ["AFC_IDEMPOTENCY__REDIS_URL"])
    prefix = os.environ["AFC_ROLLOUT_PREFIX"]
    pipe = _r.pipeline(transaction=False)
    pipe.rpush(f"{prefix}:t:{msg.partition}", repr(time.time()))
    pipe.hincrby(f"{prefix}:runs", msg.idempotency_key, 1)
    pipe.execute()


# -- variants ---------------------------------------------------------------------------

VARIANTS: dict[str, dict[str, Any]] = {
    "static": {"static": True, "env": {},
               "what": "static membership (group.instance.id), classic protocol, cooperative-sticky"},
    "eager": {"static": False, "env": {"AFC_KAFKA__EXTRA": json.dumps({"partition.assignment.strategy": "range"})},
              "what": "dynamic membership, classic protocol, eager range assignor"},
    "cooperative": {"static": False, "env": {},
                    "what": "dynamic membership, classic protocol, cooperative-sticky"},
    "kip848": {"static": True, "env": {"AFC_MEMBERSHIP__GROUP_PROTOCOL": "consumer"},
               "what": "static membership, KIP-848 (group.protocol=consumer, the broker-side range assignor afc sets)"},
    "kip848-dynamic": {"static": False, "env": {"AFC_MEMBERSHIP__GROUP_PROTOCOL": "consumer"},
                       "what": "dynamic membership, KIP-848 (group.protocol=consumer)"},
}
@dataclass
class RolloutConfig:
    variant: str = "static"
    members: int = 4
    partitions: int = 12
    rate: float = 240.0                  # records per second, round-robin over the partitions
    session_timeout_ms: int = 45_000     # classic only (KIP-848: the broker's, 45 s)
    settle_s: float = 4.0                # steady consumption before the roll, after the group settled
    tail_s: float = 4.0                  # steady consumption after the last restart
    min_ready_s: float = 0.0             # wait after a member is ready before the next (minReadySeconds)
    restart_delay_s: float = 0.0         # between the exit and the new start (a pod's deletion, scheduling, pull)
    stall_s: float = 1.0                 # a gap longer than this counts as stopped (spacing ~50 ms)
    ready_timeout_s: float = 90.0
    stop_timeout_s: float = 40.0


@dataclass
class Restart:
    member: int
    stop_s: float                        # SIGTERM to exit
    start_to_ready_s: float              # process start to /readyz 200
    restart_s: float                     # SIGTERM to /readyz 200
    exit_code: int | None
    ready_at: float = 0.0                # unix time of /readyz 200
    resume_after_ready_s: float | None = None   # ready to the first record handled on each of its partitions (max)


@dataclass
class RolloutResult:
    variant: str
    members: int
    what: str = ""
    session_timeout_ms: int = 0
    restart_delay_s: float = 0.0
    rebalances: int = 0                  # broker log: completed rebalances (classic) / epoch bumps (KIP-848)
    generation_before: int | None = None
    generation_after: int | None = None
    broker_lines: list[str] = field(default_factory=list)
    revoked_partitions: int = 0          # members' logs, own shutdowns excluded
    longest_gap_s: float = 0.0
    longest_gap_partition: int | None = None
    gap_by_partition_s: list[float] = field(default_factory=list)
    partition_seconds_stopped: float = 0.0
    peak_lag: int = 0
    lag_before_roll: int = 0
    produced: int = 0                    # records in the topic (log-end offsets) after the producer stopped
    delivered: int = 0                   # the producer's delivery reports without error
    handled_keys: int = 0
    duplicates: int = 0                  # handler runs beyond the first, summed over keys
    missing: int = 0
    restarts: list[Restart] = field(default_factory=list)
    max_restart_s: float = 0.0
    roll_s: float = 0.0
    duration_s: float = 0.0
    logs_dir: str = ""
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["broker_lines"] = d["broker_lines"][:20]
        return d

    def summary(self) -> str:
        return (f"{self.variant} N={self.members}: rebalances={self.rebalances} generation "
                f"{self.generation_before}->{self.generation_after} revoked={self.revoked_partitions} "
                f"longest_gap={self.longest_gap_s:.2f}s (max restart {self.max_restart_s:.2f}s) "
                f"stopped={self.partition_seconds_stopped:.1f} partition-s peak_lag={self.peak_lag} "
                f"duplicates={self.duplicates} missing={self.missing}"
                + (f" errors={self.errors}" if self.errors else ""))


# -- members ----------------------------------------------------------------------------

class Member:
    """One `afc-consumer run` incarnation: its own log file and HTTP port."""

    def __init__(self, index: int, incarnation: int, env: dict[str, str], logs: Path) -> None:
        self.index, self.incarnation = index, incarnation
        from bench.measure import free_port
        self.port = free_port()
        self.log_path = logs / f"member-{index}.{incarnation}.log"
        self.env = {**env, "AFC_SERVER__PORT": str(self.port)}
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    def start(self) -> "Member":
        exe = str(Path(sys.executable).parent / "afc-consumer")
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen([exe, "run", "--handler", "bench.rollout:record"], env=self.env,
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        self.started = time.monotonic()
        return self

    def ready(self) -> bool:
        import urllib.error
        import urllib.request
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float) -> float:
        """Seconds from start to /readyz 200; raises if it exits or the bound passes."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"member {self.index} exited {self.proc.returncode}: {self.tail()}")
            if self.ready():
                return time.monotonic() - self.started
            time.sleep(0.05)
        raise RuntimeError(f"member {self.index} not ready within {timeout:.0f} s: {self.tail()}")

    def assigned(self) -> int:
        import urllib.request
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=1) as r:
                m = re.search(rb"^afc_assigned_partitions (\S+)$", r.read(), re.M)
                return int(float(m.group(1))) if m else -1
        except OSError:
            return -1

    def stop(self, timeout: float) -> tuple[float, int | None]:
        """SIGTERM, wait for the drain; SIGKILL past `timeout`. Returns (seconds, exit code)."""
        t0 = time.monotonic()
        code = terminate(self.proc, timeout) if self.proc is not None else None
        return time.monotonic() - t0, code

    def tail(self, n: int = 8) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


# -- producer and lag -------------------------------------------------------------------

class Producer(threading.Thread):
    """`rate` records per second, round-robin over the partitions, until stopped."""

    def __init__(self, bootstrap: str, topic: str, partitions: int, rate: float) -> None:
        super().__init__(name="rollout-producer", daemon=True)
        self.bootstrap, self.topic, self.partitions, self.rate = bootstrap, topic, partitions, rate
        self.halt = threading.Event()
        self.sent = 0
        self.delivered = 0
        self.failed = 0
        self.error: str | None = None

    def _report(self, err: Any, _msg: Any) -> None:
        if err is None:
            self.delivered += 1
        else:
            self.failed += 1

    def run(self) -> None:
        from confluent_kafka import Producer as KProducer
        p = KProducer({"bootstrap.servers": self.bootstrap, "linger.ms": 5, "enable.idempotence": True})
        t0 = time.monotonic()
        try:
            while not self.halt.is_set():
                due = int((time.monotonic() - t0) * self.rate)
                while self.sent < due:
                    try:
                        p.produce(self.topic, value=b'{"n": %d}' % self.sent, partition=self.sent % self.partitions,
                                  on_delivery=self._report)
                        self.sent += 1
                    except BufferError:
                        p.poll(0.05)
                p.poll(0)
                time.sleep(0.01)
            left = p.flush(30)
            self.sent -= left
        except Exception as e:  # noqa: BLE001 - reported in the result, not lost in a thread
            self.error = repr(e)


class LagSampler(threading.Thread):
    """(time, total lag) every `every` seconds: log-end offsets minus committed offsets."""

    def __init__(self, bootstrap: str, topic: str, group: str, partitions: int, every: float = 0.5) -> None:
        super().__init__(name="rollout-lag", daemon=True)
        self.bootstrap, self.topic, self.group, self.partitions, self.every = bootstrap, topic, group, partitions, every
        self.halt = threading.Event()
        self.samples: list[tuple[float, int]] = []

    def run(self) -> None:
        from confluent_kafka import Consumer, TopicPartition
        c = Consumer({"bootstrap.servers": self.bootstrap, "group.id": self.group, "enable.auto.commit": False})
        tps = [TopicPartition(self.topic, p) for p in range(self.partitions)]
        try:
            while not self.halt.wait(self.every):
                try:
                    committed = c.committed(tps, timeout=5)
                    lag = sum(c.get_watermark_offsets(tp, timeout=5)[1] - max(tp.offset, 0) for tp in committed)
                    self.samples.append((time.time(), lag))
                except Exception as e:  # noqa: BLE001 - a missed sample is a gap in the series, not a failure
                    log.debug("event=lag-sample-failed error=%r", e)
        finally:
            c.close()

    def log_end(self) -> int:
        """Records in the topic: the sum of its log-end offsets."""
        from confluent_kafka import Consumer, TopicPartition
        c = Consumer({"bootstrap.servers": self.bootstrap, "group.id": self.group})
        try:
            return sum(c.get_watermark_offsets(TopicPartition(self.topic, p), timeout=10)[1]
                       for p in range(self.partitions))
        finally:
            c.close()

    def peak(self, t0: float, t1: float) -> int:
        return max((v for t, v in self.samples if t0 <= t <= t1), default=0)


# -- measurements -----------------------------------------------------------------------

def broker_log_path() -> Path:
    return brokerlog.path(ROOT)


broker_rebalances = brokerlog.rebalances
read_from = brokerlog.read_from


def _log_time(line: str) -> float | None:
    m = re.match(r"ts=(\S+)Z", line)
    if not m:
        return None
    return datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=timezone.utc).timestamp()


def revoked_in(logs: list[Path], topic: str, t0: float, t1: float) -> int:
    """Partitions of `topic` revoked from members within [t0, t1], except the revoke that a
    member's own shutdown fires (after its `event=signal`)."""
    n = 0
    for p in logs:
        try:
            lines = p.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for ln in lines:
            if "event=signal" in ln:
                break
            if "event=revoked " in ln and (t := _log_time(ln)) is not None and t0 <= t <= t1:
                parts = ln.split("partitions=", 1)[1].split()[0]
                n += sum(1 for x in parts.split(",") if x.startswith(topic + "["))
    return n


def first_assigned(path: Path, topic: str) -> list[int]:
    """The partitions of `topic` in a member's first `event=assigned` line."""
    try:
        for ln in path.read_text(errors="replace").splitlines():
            if "event=assigned " in ln:
                parts = ln.split("partitions=", 1)[1].split()[0]
                return [int(x[len(topic) + 1:-1]) for x in parts.split(",") if x.startswith(topic + "[")]
    except OSError:
        pass
    return []


def gaps(times: list[float], t0: float, t1: float) -> float:
    """The longest gap between handled records within [t0, t1], counting the window's edges:
    a partition that stopped and never came back shows its whole silence."""
    ts = sorted(t for t in times if t0 <= t <= t1)
    if not ts:
        return t1 - t0
    pts = [t0, *ts, t1]
    return max(b - a for a, b in zip(pts, pts[1:]))


def stopped(times: list[float], t0: float, t1: float, over: float) -> float:
    ts = sorted(t for t in times if t0 <= t <= t1)
    pts = [t0, *ts, t1]
    return sum(g for g in (b - a for a, b in zip(pts, pts[1:])) if g > over)


# -- one scenario -----------------------------------------------------------------------

def member_env(bootstrap: str, redis_url: str, topic: str, group: str, prefix: str, pypath: Path,
               cfg: RolloutConfig) -> dict[str, str]:
    v = VARIANTS[cfg.variant]
    return {**os.environ,
            # Children import `bench.rollout` through a folder holding only a link to bench/: the
            # repo root on PYTHONPATH would shadow the standard library's `operator` with ours.
            "PYTHONPATH": str(pypath),
            "AFC_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
            "AFC_KAFKA__TOPICS": json.dumps([topic]),
            "AFC_KAFKA__GROUP_ID": group,
            "AFC_IDEMPOTENCY__REDIS_URL": redis_url,
            "AFC_IDEMPOTENCY__KEY_PREFIX": prefix,
            "AFC_ROUTING__ENABLED": "false",            # the handler never fails: no retry topic in the group
            "AFC_BACKPRESSURE__ENABLED": "false",
            "AFC_SERVER__HOST": "127.0.0.1",
            "AFC_MEMBERSHIP__STATIC": "true" if v["static"] else "false",
            "AFC_MEMBERSHIP__SESSION_TIMEOUT_MS": str(cfg.session_timeout_ms),
            "AFC_ROLLOUT_PREFIX": prefix,
            **v["env"]}


def run_scenario(bootstrap: str, redis_url: str, cfg: RolloutConfig, logs: Path,
                 broker_log: Path | None = None) -> RolloutResult:
    """One rolling restart on a fresh topic and group; every process it starts is stopped and
    the topic and Redis keys it made are deleted before it returns."""
    import redis
    from confluent_kafka.admin import AdminClient, NewTopic
    v = VARIANTS[cfg.variant]
    kip848 = v["env"].get("AFC_MEMBERSHIP__GROUP_PROTOCOL") == "consumer"
    stem = f"roll-{cfg.variant}-{cfg.members}-{uuid.uuid4().hex[:6]}"
    topic, group, prefix = f"{stem}.in", f"{stem}-group", stem
    res = RolloutResult(cfg.variant, cfg.members, what=v["what"], session_timeout_ms=cfg.session_timeout_ms,
                        restart_delay_s=cfg.restart_delay_s, logs_dir=str(logs / stem))
    run_logs = logs / stem
    run_logs.mkdir(parents=True, exist_ok=True)
    pypath = run_logs / "pypath"
    pypath.mkdir(exist_ok=True)
    (pypath / "bench").symlink_to(ROOT / "bench")
    broker_log = broker_log or broker_log_path()
    log_offset = broker_log.stat().st_size
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, cfg.partitions, 1)], operation_timeout=30)[topic].result(timeout=30)
    env = member_env(bootstrap, redis_url, topic, group, prefix, pypath, cfg)

    def member(i: int, inc: int) -> Member:
        e = dict(env)
        if v["static"]:
            e["AFC_INSTANCE_ID"] = f"{stem}-{i}"          # the pod name: stable across restarts
        return Member(i, inc, e, run_logs).start()

    producer = Producer(bootstrap, topic, cfg.partitions, cfg.rate)
    lag = LagSampler(bootstrap, topic, group, cfg.partitions)
    members: list[Member] = []
    t_start = time.monotonic()
    roll_t0 = roll_t1 = time.time()
    try:
        producer.start()
        lag.start()
        for i in range(cfg.members):
            members.append(member(i, 0))
        for m in members:
            m.wait_ready(cfg.ready_timeout_s)
        _settle(members, cfg.partitions, 60)
        time.sleep(cfg.settle_s)
        roll_t0 = time.time()
        res.lag_before_roll = lag.peak(roll_t0 - cfg.settle_s, roll_t0)
        for i in range(cfg.members):
            t_term = time.monotonic()
            stop_s, code = members[i].stop(cfg.stop_timeout_s)
            time.sleep(cfg.restart_delay_s)
            members[i] = member(i, members[i].incarnation + 1)
            ready_s = members[i].wait_ready(cfg.ready_timeout_s)
            res.restarts.append(Restart(i, round(stop_s, 2), round(ready_s, 2),
                                        round(time.monotonic() - t_term, 2), code, time.time()))
            if cfg.min_ready_s:
                time.sleep(cfg.min_ready_s)
        res.roll_s = round(time.time() - roll_t0, 2)
        time.sleep(cfg.tail_s)
        roll_t1 = time.time()
        producer.halt.set()
        producer.join(40)
        _drained(lag, 60)
    except Exception as e:  # noqa: BLE001 - recorded; the scenario still cleans up
        res.errors.append(f"{type(e).__name__}: {e}")
        log.exception("event=scenario-failed variant=%s members=%d", cfg.variant, cfg.members)
    finally:
        producer.halt.set()
        lag.halt.set()
        for m in members:
            m.stop(cfg.stop_timeout_s)
        lag.join(10)
    if producer.error or producer.failed:
        res.errors.append(f"producer: {producer.error} ({producer.failed} delivery errors)")
    res.delivered = producer.delivered
    try:
        res.produced = lag.log_end()
    except Exception as e:  # noqa: BLE001
        res.errors.append(f"log end: {e!r}")
    res.peak_lag = lag.peak(roll_t0, roll_t1)
    res.max_restart_s = max((r.restart_s for r in res.restarts), default=0.0)
    # Broker: the coordinator's lines for this group, before and during the roll.
    marks = broker_rebalances(read_from(broker_log, log_offset), group, kip848)
    before = [g for t, g, _ in marks if t < roll_t0]
    during = [(t, g, ln) for t, g, ln in marks if roll_t0 <= t <= roll_t1]
    res.generation_before = before[-1] if before else None
    res.generation_after = during[-1][1] if during else res.generation_before
    res.rebalances = len(during)
    res.broker_lines = [ln for _, _, ln in during]
    res.revoked_partitions = revoked_in(sorted(run_logs.glob("member-*.log")), topic, roll_t0, roll_t1)
    # Handler: per-partition stalls and duplicate runs.
    r = redis.Redis.from_url(redis_url)
    try:
        by_part = [[float(x) for x in r.lrange(f"{prefix}:t:{p}", 0, -1)] for p in range(cfg.partitions)]
        runs = [int(x) for x in r.hvals(f"{prefix}:runs")]
        res.gap_by_partition_s = [round(gaps(ts, roll_t0, roll_t1), 2) for ts in by_part]
        res.longest_gap_s = max(res.gap_by_partition_s, default=0.0)
        res.longest_gap_partition = res.gap_by_partition_s.index(res.longest_gap_s) if by_part else None
        res.partition_seconds_stopped = round(sum(stopped(ts, roll_t0, roll_t1, cfg.stall_s) for ts in by_part), 2)
        for rs in res.restarts:
            held = first_assigned(run_logs / f"member-{rs.member}.{1}.log", topic)
            firsts = [min((t for t in by_part[p] if t >= rs.ready_at), default=roll_t1) - rs.ready_at for p in held]
            rs.resume_after_ready_s = round(max(firsts), 2) if firsts else None
        res.handled_keys = len(runs)
        res.duplicates = sum(n - 1 for n in runs if n > 1)
        res.missing = max(0, res.produced - res.handled_keys)
        keys = [] if os.environ.get("AFC_ROLLOUT_KEEP") else list(r.scan_iter(match=f"{prefix}:*", count=1000))
        for k in range(0, len(keys), 1000):
            r.delete(*keys[k:k + 1000])
    finally:
        r.close()
    for f in admin.delete_topics([topic], operation_timeout=30).values():
        try:
            f.result(timeout=30)
        except Exception:  # noqa: BLE001 - the name is unique; the broker may lag behind
            pass
    res.duration_s = round(time.monotonic() - t_start, 1)
    log.info("event=scenario %s", res.summary())
    return res


def _settle(members: list[Member], partitions: int, timeout: float) -> None:
    """Until the members together hold every partition (dynamic groups rebalance as they join)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if sum(max(0, m.assigned()) for m in members) == partitions and all(m.ready() for m in members):
            return
        time.sleep(0.25)
    raise RuntimeError(f"group did not settle on {partitions} partitions within {timeout:.0f} s: "
                       f"{[m.assigned() for m in members]}")


def _drained(lag: LagSampler, timeout: float) -> None:
    """Until a lag sample after the producer stopped reads 0."""
    t0, end = time.time(), time.monotonic() + timeout
    while time.monotonic() < end:
        if any(t > t0 and v == 0 for t, v in lag.samples):
            return
        time.sleep(0.25)
    raise RuntimeError(f"lag not drained within {timeout:.0f} s: {lag.samples[-3:]}")


# -- the benchmark ----------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--members", default="4,8", help="comma-separated N values")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    ap.add_argument("--rate", type=float, default=RolloutConfig.rate)
    ap.add_argument("--min-ready-s", type=float, default=0.0)
    ap.add_argument("--no-session", action="store_true",
                    help="skip the session-timeout scenarios (static N=4, session 10 s, restarts delayed 3 s and 14 s)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "rollout.json")
    ap.add_argument("--bootstrap", default=os.environ.get("AFC_KAFKA_BOOTSTRAP", "127.0.0.1:19092"))
    ap.add_argument("--redis-url", default=os.environ.get("AFC_REDIS_URL", "redis://127.0.0.1:19079/0"))
    a = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)   # cleanup (members, topic, keys) runs on SIGTERM too
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")
    variants = [x for x in a.variants.split(",") if x]
    bad = set(variants) - set(VARIANTS)
    if bad:
        ap.error(f"unknown variants: {sorted(bad)}")
    from bench.measure import doc_header
    logs = Path(tempfile.mkdtemp(prefix="afc-rollout-"))
    cfg0 = RolloutConfig(rate=a.rate, min_ready_s=a.min_ready_s)
    doc: dict[str, Any] = {
        **doc_header("afc-bench-rollout/1", "rollout.py", argv),
        "logs_dir": str(logs),
        "setup": {**{k: v for k, v in asdict(cfg0).items() if k not in ("variant", "members")},
                  "handler": "bench.rollout:record (RPUSH handle time per partition, HINCRBY runs per key)",
                  "restart": "SIGTERM, wait for exit, start again (static: same group.instance.id), "
                             "wait for /readyz 200 (assigned and holding), next member"},
        "method": {
            "rebalances": "broker log (the group coordinator's lines for the group): classic = 'Stabilized group G "
                          "generation N' lines during the roll (one per completed rebalance); KIP-848 = '[GroupId G] "
                          "Bumped group epoch to N' lines during the roll",
            "revoked_partitions": "members' event=revoked lines during the roll, the revoke of a member's own "
                                  "shutdown excluded",
            "longest_gap_s": "per partition, the longest gap between two handled records during the roll (window "
                             "edges included); the maximum over partitions",
            "partition_seconds_stopped": f"sum over partitions of the gaps longer than stall_s ({cfg0.stall_s} s)",
            "peak_lag": "max over 0.5 s samples of log-end minus committed offsets (broker), during the roll",
            "duplicates": "handler runs beyond the first per idempotency key (Redis HINCRBY)"},
        "variants": {k: v["what"] for k, v in VARIANTS.items() if k in variants},
        "scenarios": []}
    t0 = time.monotonic()
    for n in [int(x) for x in a.members.split(",") if x]:
        for variant in variants:
            cfg = RolloutConfig(variant=variant, members=n, rate=a.rate, min_ready_s=a.min_ready_s)
            res = run_scenario(a.bootstrap, a.redis_url, cfg, logs)
            doc["scenarios"].append(res.to_json())
            print(res.summary(), flush=True)
            doc["duration_s"] = round(time.monotonic() - t0, 1)
            doc["table"] = table(doc["scenarios"])
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(doc, indent=1) + "\n")   # after every scenario: partial runs still say something
    # Static membership against its session timeout: restarts that come back within it and
    # restarts that do not (a pod slower to return than the session lasts).
    doc["session_timeout"] = []
    if "static" in variants and not a.no_session:
        for delay in (3.0, 14.0):
            cfg = RolloutConfig(variant="static", members=4, rate=a.rate, session_timeout_ms=10_000,
                                restart_delay_s=delay)
            res = run_scenario(a.bootstrap, a.redis_url, cfg, logs)
            doc["session_timeout"].append(res.to_json())
            print(f"session 10 s, restart delay {delay:.0f} s: {res.summary()}", flush=True)
            a.out.write_text(json.dumps(doc, indent=1) + "\n")
        doc["session_timeout_table"] = table(doc["session_timeout"])
    doc["goal"] = goal(doc["scenarios"])
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc["goal"], indent=1))
    print(f"results: {a.out}")
    return 0 if all(g["met"] for g in doc["goal"]) else 1


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def table(scenarios: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per scenario, the figures the issue asks for."""
    return [{"variant": s["variant"], "members": s["members"], "session_timeout_ms": s["session_timeout_ms"],
             "restart_delay_s": s["restart_delay_s"], "rebalances": s["rebalances"],
             "generation": f"{s['generation_before']}->{s['generation_after']}",
             "revoked_partitions": s["revoked_partitions"], "longest_gap_s": s["longest_gap_s"],
             "max_restart_s": s["max_restart_s"], "partition_seconds_stopped": s["partition_seconds_stopped"],
             "peak_lag": s["peak_lag"], "duplicates": s["duplicates"], "missing": s["missing"],
             "errors": len(s["errors"])} for s in scenarios]


def goal(scenarios: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 11's goal: static membership rolls with 0 rebalances and stalls no longer than a
    restart (+1 s: the first fetch after the assignment)."""
    out = []
    for s in scenarios:
        if s["variant"] != "static":
            continue
        met = (s["rebalances"] == 0 and s["longest_gap_s"] <= s["max_restart_s"] + 1.0 and not s["errors"]
               and s["duplicates"] == 0)
        out.append({"members": s["members"], "rebalances": s["rebalances"], "longest_gap_s": s["longest_gap_s"],
                    "max_restart_s": s["max_restart_s"], "met": met})
    return out


if __name__ == "__main__":
    sys.exit(main())
