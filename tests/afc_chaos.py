"""The chaos scenario of issue 9 item 2, shared by tests/integration/test_core_chaos.py (one run)
and bench/chaos.py (`make soak`: N runs, results in bench/results/chaos.json).

Members (static ids) consume one topic with `afc_test_handlers:append_effect`: the effect (an
RPUSH of the record's id) and the done mark commit in one Redis MULTI (`mark_done_in`), so
the effect list must end with every id exactly once. Records are produced WHILE the members
consume, at a steady rate; members are SIGKILLed at random times and restarted with the same
instance id a second or two later.
"""
from __future__ import annotations

import random
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from afctest import ConsumerProcess, Testbed, group_lag


@dataclass
class ChaosConfig:
    n: int = 100_000
    rate: float = 4_000.0               # records per second, produced while consuming
    members: int = 3
    kills: int = 3
    restart_after_s: tuple[float, float] = (1.0, 2.0)
    min_kill_gap_s: float = 3.0         # so a member is back before the next kill
    catch_up_s: float = 120.0           # bound on the wait for lag 0 once producing ends
    lease_ms: int = 2_000
    session_timeout_ms: int = 10_000
    seed: int | None = None


@dataclass
class ChaosResult:
    n: int
    produced: int = 0
    applied: int = 0
    duplicates: int = 0
    missing: int = 0
    duplicate_ids: list[int] = field(default_factory=list)
    missing_ids: list[int] = field(default_factory=list)
    kills: list[dict[str, Any]] = field(default_factory=list)
    produce_s: float = 0.0
    duration_s: float = 0.0
    drained: bool = False
    final_lag: tuple[int, int] | None = None
    unexpected_exits: list[dict[str, Any]] = field(default_factory=list)
    seed: int = 0

    @property
    def ok(self) -> bool:
        return (self.drained and self.duplicates == 0 and self.missing == 0 and not self.unexpected_exits
                and self.produced == self.n)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def summary(self) -> str:
        return (f"duplicates={self.duplicates} {self.duplicate_ids[:10]} missing={self.missing} "
                f"{self.missing_ids[:10]} produced={self.produced}/{self.n} drained={self.drained} "
                f"final_lag={self.final_lag} kills={self.kills} unexpected_exits={self.unexpected_exits} "
                f"seed={self.seed}")


def kill_plan(rnd: random.Random, cfg: ChaosConfig, window_s: float) -> list[tuple[float, int]]:
    """`cfg.kills` (time, member) pairs within the production window, at least min_kill_gap_s apart."""
    lo, hi = min(2.0, window_s / 4), max(2.0, window_s - 2.0)
    for _ in range(1000):
        times = sorted(rnd.uniform(lo, hi) for _ in range(cfg.kills))
        if all(b - a >= cfg.min_kill_gap_s for a, b in zip(times, times[1:])):
            break
    return [(t, rnd.randrange(cfg.members)) for t in times]


def _produce_paced(bootstrap: str, topic: str, n: int, rate: float, out: dict[str, Any],
                   stop: threading.Event) -> None:
    """n records `{"n": i, "pad": ...}` keyed by i % 1000, at `rate` per second, then flush."""
    import orjson
    from confluent_kafka import Producer
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True})
    pad = "x" * 150
    t0 = time.monotonic()
    sent = 0
    try:
        while sent < n and not stop.is_set():
            due = min(n, int((time.monotonic() - t0) * rate) + 1)
            while sent < due:
                try:
                    p.produce(topic, value=orjson.dumps({"n": sent, "pad": pad}), key=str(sent % 1000).encode())
                    sent += 1
                except BufferError:
                    p.poll(0.05)
            p.poll(0)
            time.sleep(0.01)
        left = p.flush(60)
        out["produced"] = sent - left
    except Exception as e:  # noqa: BLE001 - reported by the scenario, not lost in a thread
        out["error"] = repr(e)
        out["produced"] = sent
    out["produce_s"] = time.monotonic() - t0


def run_chaos(testbed: Testbed, topic: str, group: str, redis_prefix: str, log_dir: Path,
              cfg: ChaosConfig | None = None) -> ChaosResult:
    """One run on an existing topic (12 partitions in the issue). Every process it starts is
    stopped before it returns. Reads the effect list from the test bed's Redis."""
    import redis
    cfg = cfg or ChaosConfig()
    seed = cfg.seed if cfg.seed is not None else random.SystemRandom().randrange(2**31)
    rnd = random.Random(seed)
    res = ChaosResult(n=cfg.n, seed=seed)
    r = redis.Redis.from_url(testbed.redis_url)
    effects = f"{redis_prefix}effects"
    env = {"AFC_TEST_LIST": effects, "AFC_IDEMPOTENCY__LEASE_MS": str(cfg.lease_ms),
           "AFC_MEMBERSHIP__SESSION_TIMEOUT_MS": str(cfg.session_timeout_ms)}
    stem = redis_prefix.rstrip(":")

    def member(i: int) -> ConsumerProcess:
        return ConsumerProcess(testbed, [topic], group, "afc_test_handlers:append_effect",
                               log_dir / f"member-{i}.log", instance_id=f"{stem}-m{i}", env=env,
                               redis_prefix=redis_prefix).start()

    members = [member(i) for i in range(cfg.members)]
    prod: dict[str, Any] = {}
    stop = threading.Event()
    producer = threading.Thread(target=_produce_paced, args=(testbed.bootstrap, topic, cfg.n, cfg.rate, prod, stop),
                                name="chaos-producer", daemon=True)
    t0 = time.monotonic()
    try:
        for c in members:
            c.wait_ready(90)
        t0 = time.monotonic()
        producer.start()
        for at, i in kill_plan(rnd, cfg, cfg.n / cfg.rate):
            time.sleep(max(0.0, at - (time.monotonic() - t0)))
            c = members[i]
            if c.proc is not None and c.proc.poll() is not None:
                res.unexpected_exits.append({"member": i, "code": c.proc.returncode, "at_s": round(at, 2)})
            c.kill9()
            c._log.close()
            res.kills.append({"at_s": round(time.monotonic() - t0, 2), "member": i,
                              "effects_at_kill": r.llen(effects)})
            time.sleep(rnd.uniform(*cfg.restart_after_s))
            members[i] = member(i)
        producer.join(cfg.n / cfg.rate + 120)
        stop.set()
        res.produced, res.produce_s = prod.get("produced", 0), round(prod.get("produce_s", 0.0), 2)
        deadline = time.monotonic() + cfg.catch_up_s
        while time.monotonic() < deadline:
            for i, c in enumerate(members):
                if c.proc is not None and c.proc.poll() is not None:      # died on its own: say so, restart
                    res.unexpected_exits.append({"member": i, "code": c.proc.returncode, "restarted": True,
                                                 "log_tail": c.log_tail(10)})
                    members[i] = member(i)
            res.final_lag = group_lag(testbed.bootstrap, topic, group)
            if res.final_lag == (res.produced, 0) and res.produced:
                res.drained = True
                break
            time.sleep(0.5)
    finally:
        stop.set()
        for c in members:
            try:
                c.stop(60)
            except AssertionError:
                pass
        res.duration_s = round(time.monotonic() - t0, 2)
    seen = [int(x.split(b":")[2]) for x in r.lrange(effects, 0, -1)]
    r.close()
    uniq = set(seen)
    res.applied = len(seen)
    res.duplicates = len(seen) - len(uniq)
    if res.duplicates:
        counts: dict[int, int] = {}
        for x in seen:
            counts[x] = counts.get(x, 0) + 1
        res.duplicate_ids = sorted(k for k, v in counts.items() if v > 1)[:100]
    missing = set(range(cfg.n)) - uniq
    res.missing = len(missing)
    res.missing_ids = sorted(missing)[:100]
    return res
