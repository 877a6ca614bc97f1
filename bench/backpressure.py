"""The backpressure benchmark: the same burst into a slow downstream, with and without the signal.

    .venv/bin/python bench/backpressure.py            # ~2 minutes; writes bench/results/backpressure.json
    .venv/bin/python bench/backpressure.py --help

Set-up (one run per variant, each with its own topic, group and consumer process):
- downstream: `downstream` below, run by `afc-consumer` as its handler: a service with
  `--slots` concurrent slots of `--service-ms` each (a semaphore then a sleep), so its
  capacity, the *target load*, is slots / service time (4 / 10 ms = 400 calls/s). Calls
  beyond the slots queue, which the consumer sees as handler latency.
- consumer: `afc-consumer run`, flow.targetLatencyMs 25 (2.5 service times), minInflight 2,
  windowMs 200; `backpressure.enabled` true or false; dedup on the payload's `id`.
- producer: `AdaptiveProducer` offering a burst of `--messages` at `--rate` msg/s (5x the
  capacity). With the signal it watches the group (floor `--floor` msg/s, maxWaitS 1); on
  ProducerThrottled it waits the retry-after and retries the same message: the burst is
  held upstream, never dropped. Without the signal the same producer has no group to watch.

Measured from outside every 0.25 s: lag (= messages acknowledged by the broker - the group's
committed offsets), the consumer's RSS (psutil; peak), messages held in memory (the
consumer's `afc_inflight_messages`: fetched, not finished; peak), downstream calls per second
(delta of `afc_messages_handled_total` over 1 s windows; peak and mean), the producer's
allowed rate and the group level. Times: `burst_send_s` (first to last send),
`drain_after_burst_s` (last send to everything committed), `total_s` (first send to
everything committed).

Cleanup: topics, groups, this run's Redis keys, every process; also on failure.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

# -- the downstream (runs inside the consumer: only the standard library at import) --------------

_SLOTS = threading.BoundedSemaphore(int(os.environ.get("AFC_BENCH_BP_SLOTS", "4")))
_SERVICE_S = float(os.environ.get("AFC_BENCH_BP_SERVICE_MS", "10")) / 1000


def downstream(msg) -> None:  # noqa: ANN001 - an afc handler
    """A downstream with a fixed number of slots: beyond them, calls queue."""
    with _SLOTS:
        time.sleep(_SERVICE_S)


# -- the orchestrator ---------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("bench.backpressure")


def parse_args(argv: list[str] | None):  # noqa: ANN201
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=10_000, help="burst size")
    ap.add_argument("--rate", type=float, default=2_000, help="offered burst rate, msg/s")
    ap.add_argument("--floor", type=float, default=50, help="producer floor rate with the signal, msg/s")
    ap.add_argument("--slots", type=int, default=4, help="downstream concurrent slots")
    ap.add_argument("--service-ms", type=float, default=10, help="downstream time per call")
    ap.add_argument("--target-latency-ms", type=float, default=25)
    ap.add_argument("--partitions", type=int, default=6)
    ap.add_argument("--budget-s", type=float, default=240, help="most seconds one variant may take (with the signal a run took 116-125 s)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "backpressure.json")
    ap.add_argument("--bootstrap", default=os.environ.get("AFC_KAFKA_BOOTSTRAP", "127.0.0.1:19092"))
    ap.add_argument("--redis-url", default=os.environ.get("AFC_REDIS_URL", "redis://127.0.0.1:19079/0"))
    return ap.parse_args(argv)


class Run:
    """Names and everything created, for cleanup."""

    def __init__(self, args) -> None:  # noqa: ANN001
        self.args = args
        self.id = f"afcbp-{time.strftime('%m%d%H%M%S')}-{uuid.uuid4().hex[:4]}"
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.id}-"))
        self.pypath = self.tmp / "pypath"          # only bench/ on the path (see bench/run.py)
        self.pypath.mkdir()
        (self.pypath / "bench").symlink_to(ROOT / "bench")
        self.topics: list[str] = []
        self.groups: list[str] = []
        self.procs: list[subprocess.Popen] = []


def consumer_env(run: Run, topic: str, group: str, port: int, with_signal: bool) -> dict[str, str]:
    a = run.args
    return {**os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(run.pypath), os.environ.get("PYTHONPATH")])),
            "AFC_KAFKA__BOOTSTRAP_SERVERS": a.bootstrap, "AFC_KAFKA__TOPICS": json.dumps([topic]),
            "AFC_KAFKA__GROUP_ID": group, "AFC_MEMBERSHIP__STATIC": "false",
            "AFC_IDEMPOTENCY__REDIS_URL": a.redis_url, "AFC_IDEMPOTENCY__KEY_PREFIX": run.id,
            "AFC_IDEMPOTENCY__KEY_FIELD": "id", "AFC_ROUTING__ENABLED": "false",
            "AFC_SERVER__HOST": "127.0.0.1", "AFC_SERVER__PORT": str(port),
            "AFC_FLOW__TARGET_LATENCY_MS": str(a.target_latency_ms), "AFC_FLOW__MIN_INFLIGHT": "2",
            "AFC_FLOW__WINDOW_MS": "200", "AFC_BACKPRESSURE__ENABLED": "true" if with_signal else "false",
            "AFC_BENCH_BP_SLOTS": str(a.slots), "AFC_BENCH_BP_SERVICE_MS": str(a.service_ms)}


class Burst:
    """Sends the burst from a thread; a throttled send waits its retry-after and retries."""

    def __init__(self, producer, topic: str, n: int, run_id: str) -> None:  # noqa: ANN001
        self.p, self.topic, self.n, self.run_id = producer, topic, n, run_id
        self.first: float | None = None
        self.last: float | None = None
        self.sent = 0
        self.throttled = 0
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True, name="burst")

    def _run(self) -> None:
        from bench.workload import make_key, make_value
        from afc.runtime.producer import ProducerThrottled
        rnd = random.Random(7)
        i = 0
        while i < self.n and not self.stop.is_set():
            value, key = make_value(self.run_id, i, rnd), make_key(rnd)
            while not self.stop.is_set():
                try:
                    self.p.produce(self.topic, value, key, idempotency_key=f"{self.run_id}-{i}")
                    break
                except ProducerThrottled as e:
                    self.throttled += 1
                    self.stop.wait(e.retry_after_s)
                except Exception as e:  # noqa: BLE001 - recorded in the results
                    self.errors.append(repr(e))
                    self.stop.wait(0.1)
            now = time.monotonic()
            self.first = self.first or now
            self.last = now
            self.sent += 1
            i += 1


def variant(run: Run, with_signal: bool) -> dict:
    from afc.runtime.config import ProducerSettings
    from afc.runtime.producer import AdaptiveProducer
    from bench import measure, workload
    a = run.args
    name = "with_signal" if with_signal else "without_signal"
    topic = f"{run.id}-{name.replace('_', '-')}"
    group = f"{topic}-g"
    workload.create_topic(a.bootstrap, topic, a.partitions)
    run.topics.append(topic)
    run.groups.append(group)
    port = measure.free_port()
    logf = open(run.tmp / f"{name}.log", "ab")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "afc-consumer"), "run", "--handler",
                             "bench.backpressure:downstream"], env=consumer_env(run, topic, group, port, with_signal),
                            cwd=run.tmp, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    run.procs.append(proc)
    deadline = time.monotonic() + 60
    while measure.http_get(f"http://127.0.0.1:{port}/readyz")[0] != 200:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{name}: consumer not ready (exit {proc.poll()}), log {run.tmp / f'{name}.log'}")
        time.sleep(0.2)
    time.sleep(1.0)                                  # assignment settles
    sampler = measure.ProcSampler(proc.pid)
    sampler.sample()
    rss0 = sampler.peak_rss
    prod = AdaptiveProducer(ProducerSettings(
        bootstrap_servers=a.bootstrap, groups=[group] if with_signal else [],
        redis_url=a.redis_url if with_signal else None, key_prefix=run.id, max_rate=a.rate, floor_rate=a.floor,
        max_wait_s=1.0, decrease_factor=0.5, increase_per_s=0.25, adjust_interval_ms=200, poll_interval_ms=250))
    watch = measure.OffsetWatch(a.bootstrap, group, topic, a.partitions)
    burst = Burst(prod, topic, a.messages, run.id)
    samples: list[tuple[float, int, int, float, float, float, float, float | None]] = []
    t0 = time.monotonic()
    burst.t.start()
    status, done_at = "ok", None
    try:
        while True:
            now = time.monotonic()
            committed = watch.committed() or (samples[-1][1] if samples else 0)
            delivered = int(prod.metrics.delivered._value.get())
            m = measure.scrape(port)
            sampler.sample()
            samples.append((now - t0, committed, delivered, m.get("afc_messages_handled_total", 0.0),
                            m.get("afc_inflight_messages", 0.0), sampler.peak_rss / 2**20, prod.allowed_rate,
                            prod.level))
            if committed >= a.messages:
                done_at = now
                break
            if proc.poll() is not None:
                status = f"failed: consumer exited {proc.returncode}"
                break
            if now - t0 > a.budget_s:
                status = "partial: budget exhausted"
                break
            time.sleep(max(0.0, 0.25 - (time.monotonic() - now)))
    finally:
        burst.stop.set()
        burst.t.join(10)
        prod.close(10)
        watch.close()
    res = summarize(samples, burst, t0, done_at, rss0, a)
    res.update(status=status, topic=topic, group=group, signal=with_signal,
               consumer_exit=stop_proc(proc), producer_throttled_errors=burst.throttled,
               producer_errors=burst.errors[:5])
    logf.close()
    log.info("event=variant-done variant=%s status=%r peak_lag=%s total_s=%s", name, status, res["peak_lag"],
             res["total_s"])
    return res


def summarize(samples: list, burst: Burst, t0: float, done_at: float | None, rss0: int, a) -> dict:  # noqa: ANN001
    lags = [max(0, d - c) for _, c, d, *_ in samples]
    rates = []                                       # downstream calls/s over 1 s windows
    j = 0
    for s in samples:
        while j + 1 < len(samples) and samples[j + 1][0] <= s[0] - 1.0:
            j += 1                                   # the last sample at least 1 s before s
        if s[0] - samples[j][0] >= 1.0:
            rates.append((s[3] - samples[j][3]) / (s[0] - samples[j][0]))
    first, last = burst.first, burst.last
    capacity = a.slots / (a.service_ms / 1000)
    return {
        "peak_lag": max(lags, default=0),
        "peak_rss_mib": round(max((s[5] for s in samples), default=0), 1),
        "rss_before_burst_mib": round(rss0 / 2**20, 1),
        "peak_messages_in_memory": int(max((s[4] for s in samples), default=0)),
        "burst_send_s": round(last - first, 2) if first and last else None,
        "drain_after_burst_s": round(done_at - last, 2) if done_at and last else None,
        "total_s": round(done_at - first, 2) if done_at and first else None,
        "downstream_calls_per_s_peak": round(max(rates, default=0), 1),
        "downstream_calls_per_s_mean": round(samples[-1][3] / max(1e-6, samples[-1][0]), 1) if samples else None,
        "downstream_target_calls_per_s": capacity,
        "min_allowed_rate": round(min((s[6] for s in samples), default=0), 1),
        "sent": burst.sent,
        "timeline_columns": ["t_s", "committed", "delivered", "handled", "inflight", "peak_rss_mib",
                             "allowed_rate", "group_level"],
        "timeline": [[round(s[0], 2), s[1], s[2], int(s[3]), int(s[4]), round(s[5], 1), round(s[6], 1),
                      None if s[7] is None else round(s[7], 2)] for s in samples[::4]],
    }


def stop_proc(p: subprocess.Popen, timeout: float = 20) -> int | None:
    from afc.operator.testing import terminate  # here: this module's top runs inside the consumer too
    return terminate(p, timeout)


def cleanup(run: Run) -> dict:
    from bench import workload
    for p in run.procs:
        stop_proc(p)
    out = {"topics": workload.delete_topics(run.args.bootstrap, run.topics),
           "groups": workload.delete_groups(run.args.bootstrap, run.groups)}
    try:
        import redis
        r = redis.Redis.from_url(run.args.redis_url)
        keys = list(r.scan_iter(match=f"{run.id}:*", count=10_000))
        out["redis_keys_deleted"] = r.unlink(*keys) if keys else 0
    except Exception as e:  # noqa: BLE001
        out["redis_keys_deleted"] = f"error: {e}"
    return out


def findings(doc: dict) -> list[str]:
    w, wo = doc["with_signal"], doc["without_signal"]
    out = []
    if "peak_lag" in w and "peak_lag" in wo:
        out.append(f"peak lag {wo['peak_lag']:,} -> {w['peak_lag']:,} with the signal "
                   f"({100 * (1 - w['peak_lag'] / max(1, wo['peak_lag'])):.0f}% lower)")
        out.append(f"peak consumer RSS {wo['peak_rss_mib']} -> {w['peak_rss_mib']} MiB; messages held in memory "
                   f"{wo['peak_messages_in_memory']} -> {w['peak_messages_in_memory']}")
        out.append(f"downstream peak {wo['downstream_calls_per_s_peak']} / {w['downstream_calls_per_s_peak']} "
                   f"calls/s (without / with) against a target of {w['downstream_target_calls_per_s']:.0f}")
        out.append(f"total time for the burst {wo['total_s']} s -> {w['total_s']} s; drain after the last send "
                   f"{wo['drain_after_burst_s']} s -> {w['drain_after_burst_s']} s")
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))                   # appended: ROOT/operator must not shadow `operator`
    from bench import measure
    args = parse_args(argv)
    run = Run(args)
    doc: dict = {"schema": "afc-bench-backpressure/1", "date": measure.now_iso(), "run_id": run.id,
                 "setup": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                 "method": __doc__.split("Set-up", 1)[1].strip()}
    t = time.time()
    try:
        for with_signal in (False, True):
            key = "with_signal" if with_signal else "without_signal"
            try:
                doc[key] = variant(run, with_signal)
            except Exception as e:  # noqa: BLE001 - one variant's failure is recorded
                log.exception("event=variant-failed variant=%s", key)
                doc[key] = {"status": f"failed: {type(e).__name__}: {e}"}
    finally:
        doc["cleanup"] = cleanup(run)
    doc["findings"] = findings(doc)
    doc["duration_s"] = round(time.time() - t, 1)
    doc["logs_dir"] = str(run.tmp)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print("\n".join(["backpressure:", *("  " + f for f in doc["findings"]), f"results: {args.out}"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
