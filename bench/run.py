"""`make bench`: afc's runtime against the two usual ways of consuming, on the test bed.

Phases (each bounded in time; a variant that hangs is killed, recorded as failed, and the run
goes on):

1. produce: one topic, N ~200-byte JSON messages (unique `id`), 12 partitions, keys spread
   over 100,000 users. Every throughput variant reads this same topic with its own group.
2. throughput: afc (Redis idempotency + commits), the naive loop (poll, and consume batches),
   a raw consume loop (the ceiling), the per-message Redis pattern, one after the other, each
   a subprocess with a no-op handler. Measured from outside the same way for all that commit:
   the group's committed offsets, read every 0.1 s; the raw loop commits nothing and is
   measured by its own count. Each row also has Redis commands per message (INFO
   commandstats around the variant's run).
3. profile: afc again under cProfile (all threads) for a shorter run, to say what limits it.
4. latency: per variant, a fresh topic, the consumer started and assigned first, then a
   paced producer at 5,000 msg/s for 20 s; the handler records handler-start minus the
   record's CreateTime.
5. rounds: the goals that compare runs (afc against the naive and raw loops; afc's p99 over
   the broker's ack) are noisy on a shared machine (raw alone moved 214-276k msg/s between
   runs), so afc, naive and raw run --rounds times in all (after the first pass, interleaved:
   afc, naive, raw, afc, ...), afc's latency too, and those goals take the median of the
   per-round figures (each round's ratio pairs runs minutes apart, not a whole bench apart).
6. cleanup: topics, groups and the run's Redis keys are deleted; every process is stopped.

The results file is written by this script only: bench/results/runtime.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    # Appended, not prepended: the repo's top level has an `operator/` folder that would
    # shadow the standard library's `operator` module.
    sys.path.append(str(ROOT))

from bench import measure, workload  # noqa: E402
from bench.handlers import read_doubles, read_latencies  # noqa: E402
from afc.runtime.config import KafkaSettings  # noqa: E402

log = logging.getLogger("bench")
PY = sys.executable
AFC_CONSUMER = str(Path(sys.executable).parent / "afc-consumer")
SAMPLE_S = 0.1
VARIANTS = ("afc", "afc-asyncio", "afc-batch", "afc-nodedup", "naive", "naive-tuned", "naive-batch", "raw",
            "redis_per_message")
PHASE_VARIANTS = ("afc-slow", "afc-fetchwait")  # run by a phase of their own, not chosen with --variants


def is_afc(variant: str) -> bool:
    """afc-consumer runs (with an HTTP port and idempotency keys), not a baseline loop."""
    return variant == "afc" or variant.startswith("afc-")


# afc-fetchwait: the broker holds each fetch until FETCH_WAIT_MS passed (or a MiB is there), so a
# consumer at a modest rate is handed fewer, larger batches (latency phase only, beside afc).
FETCH_WAIT_MS = 2
FETCH_WAIT_EXTRA = {"fetch.wait.max.ms": str(FETCH_WAIT_MS), "fetch.min.bytes": str(1 << 20)}
VARIANT_ENV = {"afc-fetchwait": {"AFC_KAFKA__EXTRA": json.dumps(FETCH_WAIT_EXTRA)},   # afc variants' own settings
               "afc-asyncio": {"AFC_HANDLER__EVENT_LOOP": "asyncio"},
               "afc-nodedup": {"AFC_IDEMPOTENCY__ENABLED": "false"}}
ALIASES = {"redis": "redis_per_message"}
BASELINE_ARG = {"naive": "naive", "naive-tuned": "naive", "naive-batch": "naive-batch", "raw": "raw",
                "redis_per_message": "redis"}
# afc's default kafka.fetchQueueBackoffMs, given to the naive loop as `naive-tuned` (librdkafka's own is 1000)
TUNED_BACKOFF_MS = KafkaSettings.model_fields["fetch_queue_backoff_ms"].default
BASELINE_EXTRA = {"naive-tuned": ["--fetch-queue-backoff-ms", str(TUNED_BACKOFF_MS)]}
# Variants that commit nothing: done when their own count reaches the target, rated by it.
OWN_COUNT_ONLY = ("raw",)
DESCRIPTIONS = {
    "afc-slow": "afc as above with a handler that sleeps 30 ms (a downstream 300x slower than 0.1 ms), for "
                "--slowdown-s on the same backlog: memory under a slowdown, not a throughput figure",
    "afc": "afc-consumer run: Redis idempotency (claim per fetched batch via Lua, done marks batched), "
           "offset commits every offsets.commitIntervalMs, a sync no-op handler per message on adaptive "
           "concurrency (threads capped by the handler's CPU share), defaults otherwise",
    "afc-fetchwait": f"afc as above with kafka.extra {FETCH_WAIT_EXTRA} (latency phase only): the broker "
                     f"answers a fetch after {FETCH_WAIT_MS} ms unless a MiB is waiting, so at a modest rate "
                     "afc takes fewer, larger batches (less CPU per message) for up to "
                     f"{FETCH_WAIT_MS} ms more latency; an idle consumer then fetches {1000 // FETCH_WAIT_MS} "
                     "times a second (librdkafka's default, 1 byte / 500 ms: twice)",
    "afc-asyncio": "afc as above on asyncio's own event loop (handler.eventLoop=asyncio) instead of uvloop, "
                   "the default: what uvloop saves",
    "afc-nodedup": "afc as above with idempotency.enabled=false: no claims and no done marks (the backpressure "
                   "level still goes to Redis, a command a second); the key still derived, per-key order, commits "
                   "and routing as afc. Not a way to run afc (a redelivered record is handled again): it shows what "
                   "deduplication costs in rate and in latency",
    "afc-batch": "afc as above with a batch handler (@batch, handler.maxBatch=500): one call per batch of "
                 "ready records, idempotency and done marks still per message",
    "naive": "confluent Consumer, poll() per message, enable.auto.commit=True (interval 100 ms), "
             "json.loads, no-op handler, no dedup",
    "naive-tuned": f"the naive loop with fetch.queue.backoff.ms={TUNED_BACKOFF_MS}, the librdkafka setting afc's defaults change "
                   "(kafka.fetchQueueBackoffMs; librdkafka's default is 1000 ms): not a goal's baseline, it shows "
                   "what of afc's lead over naive is that setting",
    "naive-batch": "confluent Consumer, consume(num_messages=1000, timeout=1) batches, enable.auto.commit=True "
                   "(interval 100 ms), json.loads, no-op handler per message, no dedup",
    "raw": "confluent Consumer, consume(num_messages=1000) in a loop counting what it returns: no decode, no "
           "handler, no commit (the ceiling). It commits nothing, so its completion and msgs_per_s come from its "
           "own count (progress events with the time of the batch that reached them), not committed offsets; "
           "that count has no commit lag, which favours it over the variants measured by committed offsets",
    "redis_per_message": "poll() per message, json.loads, Redis EXISTS key then handler + SET key 1 EX, "
                         "then synchronous commit(message=msg) per message",
}
GOAL_THROUGHPUT = 180_000
GOAL_RATIO = 5.0
GOAL_P99_MS = 12.0
GOAL_VS_NAIVE = 1.0
GOAL_VS_RAW = 0.6
GOAL_OVER_ACK_MS = 2.0          # afc's p99 over the producer's ack p99 (issue 13)
ROUND_VARIANTS = ("afc", "afc-asyncio", "naive", "raw")   # run --rounds times: the ratio goals compare afc, naive and raw
SLOW_CALL_MS = 30               # the slowdown phase's downstream call...
SLOWDOWN_X = 300                # ...300x a 0.1 ms one
GOAL_SLOW_RSS_X = 1.5           # memory bounded: peak RSS with the slow downstream <= 1.5x the full-speed peak


# ---------------------------------------------------------------------------- context

class Ctx:
    """One benchmark run: names, the resources it created (for cleanup), its children."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.run = f"afcbench-{time.strftime('%m%d%H%M%S')}-{uuid.uuid4().hex[:4]}"
        self.bootstrap = args.bootstrap
        self.redis_url = args.redis_url
        self.prefix = self.run                       # every Redis key of this run starts with it
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.run}-"))
        # Children import `bench.*` through a folder holding only a link to bench/: putting the
        # repo root on PYTHONPATH would shadow the standard library's `operator` with ours.
        self.pypath = self.tmp / "pypath"
        self.pypath.mkdir()
        (self.pypath / "bench").symlink_to(ROOT / "bench")
        self.topics: list[str] = []
        self.groups: list[str] = []
        self.children: list[Child] = []
        self.servers = measure.ServerCpu(os.environ.get("AFC_TESTBED_DIR", str(ROOT / ".testbed")), self.redis_url)


class Child:
    """A consumer subprocess in its own session. stderr goes to a log file; the baselines'
    JSON events on stdout are collected by a reader thread."""

    def __init__(self, ctx: Ctx, name: str, argv: list[str], env: dict[str, str], events: bool) -> None:
        self.name = name
        self.log_path = ctx.tmp / f"{name}.log"
        self._log = open(self.log_path, "ab")
        self.events: list[dict[str, Any]] = []
        self.t_spawn = time.time()
        self.p = subprocess.Popen(argv, env=env, cwd=ctx.tmp, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE if events else self._log, stderr=self._log,
                                  start_new_session=True)
        ctx.children.append(self)
        self.sampler = measure.ProcSampler(self.p.pid)
        if events:
            threading.Thread(target=self._read, daemon=True, name=f"read-{name}").start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            try:
                self.events.append(json.loads(line))
            except ValueError:
                self._log.write(line)

    def event(self, name: str) -> dict[str, Any] | None:
        return next((e for e in list(self.events) if e["event"] == name), None)

    def progress(self) -> list[tuple[float, int]]:
        return [(e["t"], e["count"]) for e in list(self.events) if e["event"] == "progress"]

    def alive(self) -> bool:
        return self.p.poll() is None

    def watch(self, step: Callable[[float], bool], deadline: float, period: float) -> str:
        """The sampling loop of a phase that waits on this consumer: `step(tick)` every `period`
        s until it returns True ("ok"), the consumer exits, or `deadline` (time.time()) passes;
        returns the phase's status."""
        while True:
            tick = time.time()
            if step(tick):
                return "ok"
            if not self.alive():
                return f"failed: exited with {self.p.returncode} before finishing"
            if time.time() >= deadline:
                return "partial: budget exhausted"
            time.sleep(max(0.0, period - (time.time() - tick)))

    def stop(self, timeout: float = 30) -> dict[str, Any]:
        """SIGTERM (drain and exit cleanly), SIGKILL after `timeout`."""
        t0, killed = time.monotonic(), False
        if self.alive():
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("event=kill child=%s pid=%d reason=no-exit-after-sigterm timeout_s=%.0f",
                            self.name, self.p.pid, timeout)
                self.p.kill()
                self.p.wait(10)
                killed = True
        self._log.flush()
        return {"exit_code": self.p.returncode, "killed": killed, "stop_s": round(time.monotonic() - t0, 2)}

    def tail(self, n: int = 15) -> list[str]:
        self._log.flush()
        try:
            return self.log_path.read_text(errors="replace").splitlines()[-n:]
        except OSError:
            return []


# ---------------------------------------------------------------------------- spawning variants

def child_pythonpath(ctx: Ctx) -> str:
    return os.pathsep.join(filter(None, [str(ctx.pypath), os.environ.get("PYTHONPATH")]))


def afc_env(ctx: Ctx, topic: str, group: str, port: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "AFC_KAFKA__BOOTSTRAP_SERVERS": ctx.bootstrap,
        "AFC_KAFKA__TOPICS": json.dumps([topic]),
        "AFC_KAFKA__GROUP_ID": group,
        "AFC_IDEMPOTENCY__REDIS_URL": ctx.redis_url,
        "AFC_IDEMPOTENCY__KEY_PREFIX": ctx.prefix,
        # The same dedup key as the Redis baseline: the message's unique id, not its position.
        "AFC_IDEMPOTENCY__KEY_FIELD": "id",
        "AFC_SERVER__HOST": "127.0.0.1",
        "AFC_SERVER__PORT": str(port),
        "AFC_INSTANCE_ID": group,
        "PYTHONPATH": child_pythonpath(ctx),
    })
    env.update(extra or {})
    return env


def spawn(ctx: Ctx, variant: str, topic: str, group: str, latency_file: Path | None = None,
          profile_dir: Path | None = None) -> tuple[Child, int | None]:
    """Start one consumer; returns it and afc's HTTP port (None for the baselines)."""
    ctx.groups.append(group)
    extra = {"AFC_BENCH_LAT_FILE": str(latency_file)} if latency_file else {}
    name = group.removeprefix(ctx.run + "-")
    if is_afc(variant):
        port = measure.free_port()
        extra.update(VARIANT_ENV.get(variant, {}))
        handler = ("bench.handlers:" + ("batch_" if variant == "afc-batch" else "")
                   + ("record_latency" if latency_file else "slow_downstream" if variant == "afc-slow" else "noop"))
        if profile_dir is not None:
            extra["AFC_BENCH_PROF_DIR"] = str(profile_dir)
            argv = [PY, str(ROOT / "bench" / "profile_afc.py"), "run", "--handler", handler]
        else:
            argv = [AFC_CONSUMER, "run", "--handler", handler]
        return Child(ctx, name, argv, afc_env(ctx, topic, group, port, extra), events=False), port
    argv = [PY, "-m", "bench.baselines", BASELINE_ARG[variant],
            "--bootstrap", ctx.bootstrap, "--topic", topic, "--group", group,
            "--redis-url", ctx.redis_url, "--prefix", f"{ctx.prefix}:base:{group}:", *BASELINE_EXTRA.get(variant, [])]
    if latency_file:
        argv.append("--latency")
    env = dict(os.environ, PYTHONPATH=child_pythonpath(ctx), **extra)
    return Child(ctx, name, argv, env, events=True), None


# ---------------------------------------------------------------------------- throughput

def _own_counter(child: Child, port: int | None, metrics: dict[str, float]) -> tuple[float | None, int | None]:
    """(time, messages handled) by the consumer's own count: afc's /metrics or the baseline's events."""
    if port is not None:
        v = metrics.get("afc_messages_handled_total")
        return (time.time(), int(v)) if v is not None else (None, None)
    prog = child.progress()
    return prog[-1] if prog else (None, None)


def _rate(a: tuple[float, int] | None, b: tuple[float, int] | None) -> float | None:
    if a is None or b is None or b[0] <= a[0] or b[1] <= a[1]:
        return None
    return (b[1] - a[1]) / (b[0] - a[0])


def throughput(ctx: Ctx, variant: str, topic: str, target: int, budget_s: float,
               profile_dir: Path | None = None, tag: str = "tput") -> dict[str, Any]:
    """Run one variant until its committed offsets reach `target` (or the budget runs out);
    a variant that commits nothing (OWN_COUNT_ONLY) until its own count does."""
    own_only = variant in OWN_COUNT_ONLY
    group = f"{ctx.run}-{variant}-{tag}"
    watch = measure.OffsetWatch(ctx.bootstrap, group, topic, ctx.args.partitions)
    load0 = measure.load_avg()
    ctx.servers.begin()
    child, port = spawn(ctx, variant, topic, group, profile_dir=profile_dir)
    log.info("event=variant-start phase=%s variant=%s group=%s target=%d budget_s=%.0f pid=%d",
             tag, variant, group, target, budget_s, child.p.pid)
    committed: list[tuple[float, int]] = []
    own: list[tuple[float, int]] = []
    timeline: list[list[Any]] = []
    first_msg: float | None = None
    next_tl, last_cpu = 0.0, (child.t_spawn, 0.0)
    window0: dict[str, Any] = {}

    def step(_tick: float) -> bool:
        nonlocal first_msg, next_tl, last_cpu, window0
        c = watch.committed()
        child.sampler.sample()
        metrics = measure.scrape(port) if port else {}
        if port and first_msg is None and metrics.get("afc_messages_consumed_total", 0) > 0:
            first_msg = time.time()
            window0 = busy_reading(ctx, child)
        t_own, n_own = _own_counter(child, port, metrics)
        if n_own is not None and t_own is not None and (not own or own[-1] != (t_own, n_own)):
            own.append((t_own, n_own))
        now = time.time()
        if c is not None:
            committed.append((now, c))
        if now >= next_tl:
            cpu_pct = 100 * (child.sampler.cpu_s - last_cpu[1]) / max(1e-6, now - last_cpu[0])
            last_cpu = (now, child.sampler.cpu_s)
            timeline.append([round(now - child.t_spawn, 2), c, n_own, round(cpu_pct),
                             round(child.sampler.peak_rss / 2**20, 1), metrics.get("afc_inflight_limit")])
            next_tl = now + 1.0
        done = n_own if own_only else c
        return done is not None and done >= target

    status = child.watch(step, child.t_spawn + budget_s, SAMPLE_S)
    child.sampler.sample()
    window = busy_window(window0, busy_reading(ctx, child)) if window0 else None
    if own_only:
        # Every progress event the loop sent, each stamped with its own time (the polled `own`
        # may have skipped some); the first at the target ends the measurement as a commit would.
        own = child.progress()
        reached = next((i for i, s in enumerate(own) if s[1] >= target), len(own) - 1)
        res = _throughput_result(ctx, variant, child, own[:reached + 1], own, first_msg, target, status)
        res.update(msgs_per_s_basis=res["msgs_per_s_basis"].replace("committed", "own count") + " (commits nothing)",
                   committed_at_end=None, own_count_at_end=own[reached][1] if own else None,
                   time_to_first_commit_s=None)
    else:
        res = _throughput_result(ctx, variant, child, committed, own, first_msg, target, status)
    res["threads_cpu"] = child.sampler.threads()
    if window:
        res["consuming_window"] = window
    res["resources"] = {**child.sampler.summary(), **ctx.servers.end(), "load_avg_at_start": load0,
                        "load_avg_at_end": measure.load_avg()}
    handled = res["own_count_at_end"] if own_only else res.get("committed_at_end")
    res["redis_commands_per_message"] = measure.per_message(res["resources"].get("redis_calls"), handled)
    res["exit"] = child.stop()
    _drop_claims(ctx, variant, group, res)
    reported = child.event("stopped")
    if reported:
        res["self_reported"] = {k: v for k, v in reported.items() if k not in ("event", "t")}
    watch.close()
    res["timeline_columns"] = ["t_s", "committed", "own_count", "cpu_pct", "peak_rss_mib", "afc_inflight_limit"]
    res["timeline"] = timeline
    if not status.startswith("ok"):
        res["log_tail"] = child.tail()
    log.info("event=variant-done phase=%s variant=%s status=%r msgs_per_s=%s cpu_s=%s",
             tag, variant, status, res.get("msgs_per_s"), res["resources"].get("cpu_s"))
    return res


def busy_reading(ctx: Ctx, child: Child) -> dict[str, Any]:
    """One end of a busy window: the time, afc's CPU by thread role, the servers' CPU, the
    machine's idle and total jiffies."""
    return {"t": time.monotonic(), "afc": child.sampler.cpu_by_role(), "servers": ctx.servers.cpu_now(),
            "machine": measure.machine_cpu_times()}


def busy_window(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any] | None:
    """How busy afc's threads, the servers and the machine were between two readings (afc's
    first message and the target), each as % of one core; the machine's idle share of all
    cores. An event loop near 100 % is the limit; well below it, with cores idle, it waits
    (on the store's answers, a fetch or a handler thread)."""
    secs = b["t"] - a["t"]
    if secs <= 0 or not a["afc"] or not b["afc"]:
        return None
    pct = {(f"{k}_thread" if k == "loop" else f"{k}_threads"): round(100 * (v - a["afc"].get(k, 0.0)) / secs, 1)
           for k, v in b["afc"].items()}
    pct.update({k: round(100 * (b["servers"][k] - a["servers"][k]) / secs, 1)
                for k in b["servers"] if k in a["servers"]})
    return {"seconds": round(secs, 2), "cpu_pct_of_a_core": pct,
            "machine_idle_pct": measure.idle_pct(a["machine"], b["machine"])}


def _drop_claims(ctx: Ctx, variant: str, group: str, res: dict[str, Any]) -> None:
    """Delete an afc run's idempotency keys once it has stopped: each run claims every message
    under its own group's namespace, and a run of 1M leaves ~200 MiB of done keys; kept to the
    end, the rounds filled the test bed's 1 GiB Redis and the next afc run met OOM (store down,
    paused, as it should). (A variant's figures are taken before this.)"""
    if is_afc(variant) and not ctx.args.keep:
        res["redis_keys_deleted_after"] = delete_redis_keys(ctx.redis_url, f"{ctx.prefix}:idem:{group}")


def slowdown(ctx: Ctx, topic: str, fast: dict[str, Any]) -> dict[str, Any]:
    """afc on the same backlog with a downstream SLOWDOWN_X times slower than a 0.1 ms call
    (bench.handlers:slow_downstream sleeps 30 ms), for --slowdown-s: the backlog cannot drain,
    so what is measured is whether memory stays bounded (peak RSS against the full-speed run's)
    while the fetch buffer, the in-flight limit and the handler threads absorb the slowdown."""
    r = throughput(ctx, "afc-slow", topic, ctx.args.messages, ctx.args.slowdown_s, tag="slow")
    peak = (r.get("resources") or {}).get("peak_rss_mib")
    tl = r.get("timeline") or []
    return {"handler": f"bench.handlers:slow_downstream ({SLOW_CALL_MS} ms a call = {SLOWDOWN_X}x a 0.1 ms call)",
            "seconds": ctx.args.slowdown_s, "status": r.get("status"),
            "handled": r.get("committed_at_end"), "msgs_per_s": r.get("msgs_per_s"),
            "peak_rss_mib": peak, "fast_peak_rss_mib": (fast.get("resources") or {}).get("peak_rss_mib"),
            "inflight_limit_at_end": tl[-1][5] if tl else None, "rss_timeline_mib": [row[4] for row in tl],
            "exit": r.get("exit")}


def _throughput_result(ctx: Ctx, variant: str, child: Child, committed: list[tuple[float, int]],
                       own: list[tuple[float, int]], first_msg: float | None, target: int,
                       status: str) -> dict[str, Any]:
    """Rates from the committed-offset samples: from the first observed progress to the
    first sample at the target (or the last sample, for a partial run)."""
    first = next((s for s in committed if s[1] > 0), None)
    last = committed[-1] if committed else None
    if first is None:
        status = status if status.startswith("failed") else "failed: no committed progress"
    if child.event("first"):
        first_msg = child.event("first")["t"]  # type: ignore[index]
    rate, basis = _rate(first, last), "first committed progress to target committed"
    if rate is None and first_msg and last and last[1] and status == "ok":
        # Everything arrived in one commit (small runs): count from the first message instead.
        rate, basis = last[1] / max(1e-6, last[0] - first_msg), "first message to target committed (one commit)"
    own_first = next((s for s in own if s[1] > 0), None)
    own_end = next((s for s in own if s[1] >= target), own[-1] if own else None)
    own_rate = _rate(own_first, own_end)
    steady = _rate(next((s for s in own if s[1] >= 0.2 * target), None),
                   next((s for s in own if s[1] >= 0.8 * target), None))
    t0 = child.t_spawn
    cpu = child.sampler.cpu_s
    measured = (last[1] - first[1]) if first and last else 0
    return {
        "variant": variant, "description": DESCRIPTIONS[variant], "status": status,
        "completed": status == "ok", "target_messages": target,
        "msgs_per_s": round(rate) if rate else None,
        "msgs_per_s_basis": basis,
        "measured_messages": measured,
        "measured_seconds": round(last[0] - first[0], 2) if first and last else None,
        "msgs_per_s_own_counter": round(own_rate) if own_rate else None,
        "msgs_per_s_steady_20_80pct_own_counter": round(steady) if steady else None,
        "time_to_first_message_s": round(first_msg - t0, 2) if first_msg else None,
        "time_to_first_commit_s": round(first[0] - t0, 2) if first else None,
        "time_to_target_committed_s": round(last[0] - t0, 2) if last and status == "ok" else None,
        "committed_at_end": last[1] if last else None,
        "cpu_us_per_message": round(1e6 * cpu / last[1], 1) if last and last[1] else None,
        "cpu_cores_avg": round(cpu / max(1e-6, (last[0] if last else time.time()) - t0), 2),
    }


# ---------------------------------------------------------------------------- latency

def wait_ready(child: Child, port: int | None, timeout: float) -> bool:
    """afc: /readyz answers 200 (joined, partitions assigned); baselines: their `assigned` event."""
    deadline = time.time() + timeout
    while time.time() < deadline and child.alive():
        if port is not None:
            if measure.http_get(f"http://127.0.0.1:{port}/readyz")[0] == 200:
                return True
        elif child.event("assigned"):
            return True
        time.sleep(0.1)
    return False


def latency(ctx: Ctx, variant: str, tag: str = "lat") -> dict[str, Any]:
    """Steady paced load on a fresh topic; percentiles of handler start - CreateTime."""
    a = ctx.args
    topic = f"{ctx.run}-{tag}-{variant.replace('_', '-')}"
    workload.create_topic(ctx.bootstrap, topic, a.partitions)
    ctx.topics.append(topic)
    lat_file = ctx.tmp / f"{variant}-{tag}.lat"
    group = f"{ctx.run}-{variant}-{tag}"
    child, port = spawn(ctx, variant, topic, group, latency_file=lat_file)
    out: dict[str, Any] = {"variant": variant, "topic_partitions": a.partitions}
    if not wait_ready(child, port, 90):
        out.update(status="failed: consumer not ready (no assignment) within 90 s", log_tail=child.tail(),
                   exit=child.stop())
        return out
    out["time_to_ready_s"] = round(time.time() - child.t_spawn, 2)
    time.sleep(1.0)                       # let the first fetch go out before producing
    watch = measure.OffsetWatch(ctx.bootstrap, group, topic, a.partitions)
    load0 = measure.load_avg()
    ctx.servers.begin()
    child.sampler.sample()
    cpu0, t0 = child.sampler.cpu_s, time.time()
    acks_file = ctx.tmp / f"{variant}-{tag}.acks"
    stalls = measure.StallProbe(a.latency_seconds)
    try:
        prod = _paced_producer(ctx, topic, child, acks_file)
        out["scheduler_stalls"] = stalls.result()
    finally:
        stalls.stop()
    target = prod.get("delivered", 0)
    drain_deadline = time.time() + a.drain_s
    c = None
    while time.time() < drain_deadline:
        c = watch.committed()
        child.sampler.sample()
        if c is not None and c >= target:
            break
        time.sleep(SAMPLE_S)
    child.sampler.sample()
    cpu1, t1 = child.sampler.cpu_s, time.time()
    metrics = measure.scrape(port) if port else {}
    out["resources"] = {**child.sampler.summary(), **ctx.servers.end(),
                        "cpu_pct_during_load": round(100 * (cpu1 - cpu0) / max(1e-6, t1 - t0), 1)}
    out["resources"].update(load_avg_at_start=load0, load_avg_at_end=measure.load_avg())
    out["exit"] = child.stop()
    _drop_claims(ctx, variant, group, out)
    watch.close()
    reported = child.event("stopped")
    if reported:
        out["self_reported"] = {k: v for k, v in reported.items() if k not in ("event", "t")}
    out["producer"] = prod
    out["committed_at_end"] = c
    out["kept_up"] = c is not None and c >= target
    out.update(_latency_stats(lat_file, acks_file, prod, a.warmup_s))
    if metrics:
        out["afc_e2e_histogram_crosscheck"] = measure.histogram_quantiles(metrics, "afc_end_to_end_latency_seconds")
    out["status"] = "ok" if out["kept_up"] and out.get("count") else (
        "saturated: could not keep up with the paced rate; percentiles cover only what it handled "
        f"within {a.drain_s:.0f} s after the producer stopped" if out.get("count") else "failed: no latencies")
    if not out["status"].startswith("ok"):
        out["log_tail"] = child.tail()
    log.info("event=latency-done variant=%s status=%r p50_ms=%s p99_ms=%s", variant, out["status"],
             out.get("p50_ms"), out.get("p99_ms"))
    return out


def _paced_producer(ctx: Ctx, topic: str, child: Child, acks_file: Path) -> dict[str, Any]:
    a = ctx.args
    argv = [PY, "-m", "bench.workload", "paced", "--bootstrap", ctx.bootstrap, "--topic", topic,
            "--rate", str(a.rate), "--seconds", str(a.latency_seconds), "--run", ctx.run,
            "--acks-file", str(acks_file)]
    p = subprocess.Popen(argv, cwd=ctx.tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=child_pythonpath(ctx)), start_new_session=True)
    deadline = time.time() + a.latency_seconds + 60
    while p.poll() is None and time.time() < deadline:
        child.sampler.sample()
        time.sleep(0.2)
    if p.poll() is None:
        p.kill()
        p.wait(10)
        return {"error": "paced producer did not finish in time", "delivered": 0}
    stdout, stderr = p.communicate()
    try:
        return json.loads(stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": f"paced producer failed: {stderr[-500:]}", "delivered": 0}


def _latency_stats(path: Path, acks_path: Path, prod: dict[str, Any], warmup_s: float) -> dict[str, Any]:
    """Percentiles of handler start - CreateTime after the warm-up; and the same records'
    handler start - producer acknowledgement (the consumer's share: the broker's produce path,
    which this shared test bed makes slow and noisy, is taken out)."""
    try:
        rows = read_latencies(str(path))
    except OSError as e:
        return {"error": f"no latency file: {e}"}
    start = prod.get("start_wall", 0.0)
    kept = [r for r in rows if r[2] >= start + warmup_s]
    out: dict[str, Any] = {"recorded": len(rows), "skipped_warmup": len(rows) - len(kept)}
    if len(rows) < 0.9 * prod.get("delivered", 0):
        # Saturated: it handled only the oldest records, possibly all inside the warm-up.
        # Keep them all; these are the lucky ones, the rest waited longer (a lower bound).
        kept = rows
        out["skipped_warmup"] = 0
        out["note"] = ("saturated: percentiles over every record it handled (warm-up included); records it "
                       "never reached waited longer, so these understate its latency")
    out.update(measure.percentiles([r[3] for r in kept]))
    try:
        acked = {(int(p), int(o)): t for p, o, t in read_doubles(str(acks_path), 3)}
    except OSError:
        return out
    after_ack = [r[2] + r[3] - acked[(int(r[0]), int(r[1]))] for r in kept if (int(r[0]), int(r[1])) in acked]
    out["after_producer_ack"] = {**measure.percentiles(after_ack), "note": (
        "handler start - the producer's delivery callback for the same record (joined by partition/offset); "
        "negative when the consumer saw the record before the producer heard the ack")}
    out["producer_ack_after_createtime"] = measure.percentiles(
        [acked[(int(r[0]), int(r[1]))] - r[2] for r in kept if (int(r[0]), int(r[1])) in acked])
    return out


# ---------------------------------------------------------------------------- profile

def profile(ctx: Ctx, topic: str) -> dict[str, Any]:
    a = ctx.args
    prof_dir = ctx.tmp / "profile"
    res = throughput(ctx, "afc", topic, min(a.profile_messages, a.messages), a.budget_s, profile_dir=prof_dir,
                     tag="profile")
    keep = {k: res.get(k) for k in ("status", "target_messages", "msgs_per_s", "time_to_first_message_s")}
    keep["threads_cpu"] = res.get("threads_cpu")
    keep["note"] = ("cProfile in every thread (bench/profile_afc.py), default wall-clock timer; the profiler "
                    "slows Python code several-fold, so msgs_per_s here is not a throughput figure. Own time "
                    "of blocking calls (marked blocking) includes waiting; the list excluding them shows "
                    "where Python CPU goes.")
    try:
        keep.update(measure.summarize_profile(prof_dir, str(ROOT)))
    except (OSError, ValueError) as e:
        keep["error"] = f"no profile written: {e}"
    return keep


# ---------------------------------------------------------------------------- report

def environment(ctx: Ctx) -> dict[str, Any]:
    import confluent_kafka
    import redis
    mem = Path("/proc/meminfo").read_text().split("\n")[0].split()[1]
    cpu_model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("model name")), platform.processor())
    try:
        rinfo = redis.Redis.from_url(ctx.redis_url).info()
        redis_v = rinfo.get("redis_version")
        redis_mem = {"used_mib": round(rinfo["used_memory"] / 2**20, 1),
                     "maxmemory_mib": round(rinfo.get("maxmemory", 0) / 2**20, 1),
                     "policy": rinfo.get("maxmemory_policy")}
    except redis.RedisError:
        redis_v, redis_mem = None, None
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    kafka_version, broker = broker_facts(ctx)
    return {
        "machine": {"nproc": os.cpu_count(), "cpu_model": cpu_model, "memory_mib": int(mem) // 1024,
                    "kernel": platform.release(), "load_avg_at_start": measure.load_avg(),
                    "busy_processes_at_start": measure.busy_processes(),
                    "note": "cores shared with the test bed (Kafka, Redis, kube-apiserver...) and other work"},
        "versions": {"python": platform.python_version(), "confluent_kafka": getattr(confluent_kafka, "__version__", None),
                     "librdkafka": confluent_kafka.libversion()[0],
                     "kafka": kafka_version, "redis": redis_v,
                     "afc_git": git.stdout.strip() or None,
                     "afc_runtime_tree": "uncommitted working tree (runtime under concurrent change)"},
        "redis_memory_at_start": redis_mem,
        "broker_config": broker,
        "afc_env_overrides": {k: v for k, v in os.environ.items() if k.startswith("AFC_") and "__" in k
                              and "REDIS_URL" not in k and "PASSWORD" not in k},
    }


BROKER_KEYS = ("group.coordinator.append.linger.ms", "num.io.threads", "num.network.threads",
               "log.flush.interval.messages", "group.initial.rebalance.delay.ms")


def broker_facts(ctx: Ctx) -> tuple[str | None, dict[str, str]]:
    """The broker's version (from the jars on its class path) and the settings that shape
    these numbers (the coordinator's append linger bounds every synchronous commit)."""
    from confluent_kafka.admin import ConfigResource
    version = None
    try:
        import psutil
        pid = int(Path(os.environ.get("AFC_TESTBED_DIR", str(ROOT / ".testbed")), "pids", "kafka.pid").read_text())
        m = re.search(r"kafka/([0-9][0-9.]*)/libs", " ".join(psutil.Process(pid).cmdline()))
        version = m.group(1) if m else None
    except (OSError, ValueError, ImportError, Exception):  # noqa: BLE001 - a fact we may not get
        pass
    conf: dict[str, str] = {}
    try:
        a = workload.admin(ctx.bootstrap)
        md = a.list_topics(timeout=10)
        res = ConfigResource("BROKER", str(next(iter(md.brokers))))
        got = a.describe_configs([res])[res].result(10)
        conf = {k: got[k].value for k in BROKER_KEYS if k in got}
    except Exception as e:  # noqa: BLE001
        conf = {"error": str(e)}
    return version, conf


METHOD = {
    "throughput": (
        "Each variant is a subprocess reading the same pre-produced topic from the beginning with its own "
        "group. The orchestrator reads the group's committed offsets every 0.1 s (OffsetFetch from a "
        "separate client that never joins) and computes msgs/s = (committed at the end - committed at the "
        "first sample showing progress) / (time between those samples), so process start, group join and "
        "the first commit interval are excluded. Committed offsets lag real progress by the commit cadence: "
        "afc commits every offsets.commitIntervalMs (default 1000 ms, kept), which can only lower its "
        "figure (an idle tail of up to one interval); the naive loops (poll and consume batches) "
        "auto-commit every 100 ms (auto.commit.interval.ms lowered from 5000 so their committed offsets lag "
        "by at most 0.1 s); the Redis pattern commits every message. The raw consume loop commits nothing: "
        "it is done when its own count reaches the target and rated from its own progress events (each "
        "stamped with the time of the batch that reached its count), which carries no commit lag and so "
        "favours it. msgs_per_s_own_counter uses each consumer's own count (afc: "
        "afc_messages_handled_total from /metrics, scraped every 0.1 s; baselines: their counter, reported "
        "every 0.2 s) between first message and target. A variant that cannot finish within its budget "
        "(the per-message Redis pattern) is measured over what it committed in the budget (status "
        "'partial'), which is its steady rate."),
    "latency": (
        "Per variant a fresh topic with the same partition count; the consumer is started and waits for its "
        "assignment (afc: /readyz 200; baselines: on_assign), then 1 s, then a separate producer process "
        "sends at a steady rate (message i due at start + i/rate, linger.ms 1) for latency_seconds. The "
        "handler records time.time() - CreateTime at handler start (afc: bench.handlers:record_latency, "
        "Redis idempotency on; baselines: the same recorder after json.loads and, for the Redis pattern, "
        "after EXISTS). Records produced in the first warmup_s seconds are skipped. CreateTime has whole-ms "
        "resolution (librdkafka truncates), so each latency reads 0-1 ms high (0.5 ms on average). "
        "afc_e2e_histogram_crosscheck is afc's own end-to-end histogram (bucket bounds)."),
    "resources": (
        "peak_rss_mib = max of psutil RSS samples and the kernel's VmHWM; cpu_s = the consumer process's "
        "user+system CPU from start to the end of the measurement (imports and group join included); "
        "kafka_cpu_s / redis_cpu_s = the test bed servers' CPU in the same window; threads_cpu = CPU per OS "
        "thread name (rdk:* are librdkafka's threads, the process name is Python's threads). "
        "redis_commands_per_message = the calls Redis counted in INFO commandstats between the variant's "
        "start and the end of its measurement (every command, including the consumer's connection set-up "
        "and commands run inside Lua scripts, which Redis counts again under their own names; less the "
        "orchestrator's own INFO that opens the window), divided by the messages it committed (raw: "
        "counted). commandstats are server-wide: anything else using the same Redis in that window counts "
        "too."),
    "afc_settings": (
        "Defaults, except idempotency.keyField=id (the same dedup key as the Redis baseline: the unique id "
        "in the payload, not the record position), a per-run key prefix, the server on a free port, "
        "instance id = group."),
}


def _round_of(res: dict[str, Any]) -> dict[str, Any]:
    """What a throughput round keeps: its rate, CPU and status (the first pass keeps its whole row)."""
    return {"msgs_per_s": res.get("msgs_per_s"), "cpu_us_per_message": res.get("cpu_us_per_message"),
            "status": res.get("status")}


def _latency_round_of(res: dict[str, Any]) -> dict[str, Any]:
    ack = (res.get("producer_ack_after_createtime") or {}).get("p99_ms")
    p99 = res.get("p99_ms")
    return {"p99_ms": p99, "ack_p99_ms": ack, "over_ack_ms": round(p99 - ack, 3) if p99 is not None and ack is not None
            else None, "after_ack_p99_ms": (res.get("after_producer_ack") or {}).get("p99_ms"),
            "stall_max_ms": (res.get("scheduler_stalls") or {}).get("max_ms"),
            "kept_up": res.get("kept_up"), "status": res.get("status")}


def _rounds_ratio(goal: dict[str, Any], rounds: dict[str, list[dict[str, Any]]], num: str, den: str,
                  target: float) -> dict[str, Any]:
    """Turn a single-run ratio goal into the median of the rounds' ratios (round i of `num`
    against round i of `den`); kept as it is unless at least two rounds have both figures."""
    pairs = [(a.get("msgs_per_s"), b.get("msgs_per_s")) for a, b in zip(rounds.get(num, []), rounds.get(den, []))]
    ratios = [round(x / y, 3) for x, y in pairs if x and y]
    if len(ratios) < 2:
        return goal
    m = round(statistics.median(ratios), 3)
    single = {k: v for k, v in goal.items() if k not in ("numerator", "denominator")}
    return {**single, "value": m, "ratio_to_target": round(m / target, 3), "met": m >= target,
            "basis": f"median of {len(ratios)} rounds' ratios", "per_round": ratios, "first_pass": goal["value"]}


def goals(tput: dict[str, Any], lat: dict[str, Any], slow: dict[str, Any] | None = None,
          rounds: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The issue's goals from this run's figures. With `rounds` (see --rounds), the ratio goals
    and the p99-over-ack goal are the medians of the per-round figures, with every round listed."""
    tr = (rounds or {}).get("throughput") or {}
    afc = (tput.get("afc") or {}).get("msgs_per_s")
    base = (tput.get("redis_per_message") or {}).get("msgs_per_s")
    p99 = (lat.get("afc") or {}).get("p99_ms")
    out = [{"goal": "afc >= 180,000 msg/s in one process", "target": GOAL_THROUGHPUT, "value": afc,
            "ratio_to_target": round(afc / GOAL_THROUGHPUT, 3) if afc else None,
            "met": bool(afc and afc >= GOAL_THROUGHPUT)}]
    out.append(measure.ratio_goal("afc >= 5x the per-message Redis pattern", afc, base, GOAL_RATIO))
    rate = {v: (tput.get(v) or {}).get("msgs_per_s") for v in ("naive", "naive-tuned", "raw", "afc-asyncio",
                                                                "afc-nodedup")}
    out.append(_rounds_ratio(measure.ratio_goal("afc >= 1.0x the naive poll() loop (msgs/s ratio, same run)",
                                                afc, rate["naive"], GOAL_VS_NAIVE), tr, "afc", "naive", GOAL_VS_NAIVE))
    if rate["naive-tuned"]:
        # Not a goal of the issue: the same ratio against the naive loop given afc's librdkafka
        # fetch.queue.backoff.ms, so a reader sees what of the lead is that one setting.
        info = measure.ratio_goal(f"(for comparison) afc vs the naive loop with fetch.queue.backoff.ms="
                                  f"{TUNED_BACKOFF_MS} like afc's defaults", afc, rate["naive-tuned"], GOAL_VS_NAIVE)
        info["informational"] = True
        out.append(info)
    if rate["afc-asyncio"]:
        # Not a goal either: what the default event loop (uvloop) gives over asyncio's own.
        info = _rounds_ratio(measure.ratio_goal("(for comparison) afc on uvloop (handler.eventLoop's default) vs "
                                                "afc on asyncio's own loop", afc, rate["afc-asyncio"], 1.0),
                             tr, "afc", "afc-asyncio", 1.0)
        info["informational"] = True
        out.append(info)
    if rate["afc-nodedup"]:
        # Not a goal: afc against itself without the store, what deduplication costs at full speed.
        info = measure.ratio_goal("(for comparison) afc vs afc without deduplication (idempotency.enabled=false)",
                                  afc, rate["afc-nodedup"], 1.0)
        info["informational"] = True
        out.append(info)
    out.append(_rounds_ratio(measure.ratio_goal("afc >= 0.6x the raw consume() loop (msgs/s ratio, same run)",
                                                afc, rate["raw"], GOAL_VS_RAW), tr, "afc", "raw", GOAL_VS_RAW))
    out.append({"goal": "afc p99 end-to-end latency <= 12 ms at 5,000 msg/s", "target": GOAL_P99_MS, "value": p99,
                "ratio_to_target": round(p99 / GOAL_P99_MS, 3) if p99 else None,
                "met": bool(p99 is not None and p99 <= GOAL_P99_MS and (lat.get("afc") or {}).get("kept_up"))})
    first = _latency_round_of(lat.get("afc") or {})
    ack, over = first["ack_p99_ms"], first["over_ack_ms"]
    g = {"goal": f"afc p99 end-to-end <= the broker's ack p99 + {GOAL_OVER_ACK_MS:g} ms at 5,000 msg/s "
                 "(the consumer's share of the tail)", "target": GOAL_OVER_ACK_MS, "value": over,
         "ack_p99_ms": ack, "afc_p99_ms": p99,
         "met": bool(over is not None and over <= GOAL_OVER_ACK_MS and (lat.get("afc") or {}).get("kept_up"))}
    lr = ((rounds or {}).get("latency") or {}).get("afc") or []
    overs = [r["over_ack_ms"] for r in lr if r.get("over_ack_ms") is not None and r.get("kept_up")]
    if len(overs) >= 2:
        m = round(statistics.median(overs), 3)
        g = {**g, "value": m, "met": m <= GOAL_OVER_ACK_MS and len(overs) == len(lr),
             "basis": f"median of {len(overs)} rounds", "per_round": overs, "first_pass": over}
    out.append(g)
    if slow and slow.get("peak_rss_mib") and slow.get("fast_peak_rss_mib"):
        out.append(measure.ratio_goal(f"afc's peak RSS with a {SLOWDOWN_X}x slower downstream <= "
                                      f"{GOAL_SLOW_RSS_X}x its peak at full speed (memory bounded)",
                                      slow["peak_rss_mib"], slow["fast_peak_rss_mib"], GOAL_SLOW_RSS_X,
                                      at_most=True))
    return out


def _machine_budget(afc: dict[str, Any], raw_rate: float | None, nproc: int) -> str | None:
    """afc's run as a share of the machine: its CPU, Redis's and the broker's per message (each
    over the variant's whole run, start-up included: an upper bound), the rate the machine's
    cores could sustain at that cost, and the cost 0.6x raw's rate would allow: an upper bound
    on a machine shared by all three. Whether the run reached it shows in `_loop_share` (idle
    cores mean the bound was not what held afc back)."""
    res, n = afc.get("resources") or {}, afc.get("committed_at_end")
    parts = [res.get("cpu_s"), res.get("redis_cpu_s"), res.get("kafka_cpu_s")]
    if not n or any(x is None for x in parts):
        return None
    us = 1e6 * sum(parts) / n
    c, r, k = (1e6 * x / n for x in parts)
    text = (f"afc: the machine's CPU per message in afc's run: {us:.1f} us (consumer {c:.1f}, Redis {r:.1f}, "
            f"broker {k:.1f}; whole run); {nproc} cores sustain at most {nproc * 1e6 / us:,.0f} msg/s at that cost")
    if raw_rate:
        text += (f"; 0.6x raw ({0.6 * raw_rate:,.0f} msg/s) allows at most {nproc * 1e6 / (0.6 * raw_rate):.1f} us "
                 "across the three")
    return text + "."


def _loop_share(variant: str, r: dict[str, Any]) -> str | None:
    """How busy afc's event loop, Redis and the machine were while afc consumed at full speed
    (`busy_window`): with cores idle, the loop and Redis took turns (each waiting on the other)
    instead of overlapping, which the machine-budget bound does not show."""
    w = r.get("consuming_window") or {}
    pct, idle = w.get("cpu_pct_of_a_core") or {}, w.get("machine_idle_pct")
    if not pct or idle is None:
        return None
    text = (f"{variant}: over the {w.get('seconds')} s from its first message to the target, its event loop's "
            f"thread used {pct.get('loop_thread')}% of a core, its other Python threads {pct.get('python_threads')}%, "
            f"librdkafka's {pct.get('librdkafka_threads')}%")
    if pct.get("redis") is not None:
        text += f"; Redis {pct['redis']}%, the broker {pct.get('kafka')}%"
    return text + f"; the machine's cores were {idle}% idle."


def findings(env: dict[str, Any], tput: dict[str, Any], lat: dict[str, Any], prof: dict[str, Any]) -> list[str]:
    """Statements computed from this run's numbers (no hand-written claims)."""
    out = []
    nproc = env["machine"]["nproc"]
    for v, r in tput.items():
        res = r.get("resources", {})
        if r.get("msgs_per_s"):
            out.append(f"{v}: {r.get('msgs_per_s')} msg/s; the consumer used {r.get('cpu_cores_avg')} cores on "
                       f"average from start to end ({r.get('cpu_us_per_message')} us CPU per message) on a "
                       f"{nproc}-core machine; in the same window Kafka used {res.get('kafka_cpu_s')} CPU s and "
                       f"Redis {res.get('redis_cpu_s')} CPU s, executing {r.get('redis_commands_per_message')} "
                       "commands per message.")
        th = r.get("threads_cpu") or []
        if th:
            tot = sum(t["cpu_s"] for t in th) or 1
            rdk = sum(t["cpu_s"] for t in th if t["name"].startswith("rdk:"))
            out.append(f"{v}: librdkafka threads {100 * rdk / tot:.0f}% of the process CPU, Python threads "
                       f"{100 * (tot - rdk) / tot:.0f}%.")
    a = tput.get("afc") or {}
    cmds = (a.get("resources") or {}).get("redis_commands") or {}
    if "evalsha" in cmds and a.get("committed_at_end"):
        us = cmds["evalsha"]["usec"] / a["committed_at_end"]
        out.append(f"afc: Redis spent {us:.1f} us per message inside the claim/done Lua scripts "
                   f"({cmds['evalsha']['calls']} calls, {a['committed_at_end'] / cmds['evalsha']['calls']:.0f} messages "
                   f"per call); Redis runs commands on one thread, so one Redis caps afc at about "
                   f"{1e6 / us:,.0f} msg/s before any other cost.")
    budget = _machine_budget(a, (tput.get("raw") or {}).get("msgs_per_s"), nproc)
    if budget:
        out.append(budget)
    for v in ("afc", "afc-nodedup"):
        waits = _loop_share(v, tput.get(v) or {})
        if waits:
            out.append(waits)
    tl = a.get("timeline") or []
    limits = [row for row in tl if row[5] is not None]
    if limits:
        top = max(row[5] for row in limits)
        reach = next(row[0] for row in limits if row[5] == top)
        out.append(f"afc: the adaptive in-flight limit (afc_inflight_limit, sampled each second) peaked at "
                   f"{top:.0f}, first seen {reach} s after start; messages committed by then: "
                   f"{next(row[1] for row in limits if row[5] == top)}.")
    if prof.get("python_thread_cpu_s"):
        out.append("afc under cProfile, Python CPU by thread group: " + ", ".join(
            f"{k} {v} s" for k, v in prof["python_thread_cpu_s"].items()))
    if prof.get("top_own_time_excluding_blocking_calls"):
        top5 = prof["top_own_time_excluding_blocking_calls"][:5]
        out.append("afc under cProfile, most own time outside blocking calls: " + "; ".join(
            f"{r['function']} {r['own_s']} s" for r in top5))
    rp = (tput.get("redis_per_message") or {}).get("self_reported") or {}
    if rp.get("commit_ms_per_msg") is not None:
        out.append(f"redis_per_message: {rp['commit_ms_per_msg']} ms per message in the synchronous commit and "
                   f"{rp['redis_ms_per_msg']} ms in Redis (EXISTS + SET); the broker's "
                   f"group.coordinator.append.linger.ms is {env.get('broker_config', {}).get('group.coordinator.append.linger.ms')}, "
                   "which every synchronous commit waits out.")
    for v, r in lat.items():
        aft = (r.get("after_producer_ack") or {})
        ack = (r.get("producer_ack_after_createtime") or {})
        if aft.get("p99_ms") is not None:
            out.append(f"{v} latency split: producer ack after CreateTime p50 {ack.get('p50_ms')} / p99 "
                       f"{ack.get('p99_ms')} ms (broker produce path); handler start after that ack p50 "
                       f"{aft.get('p50_ms')} / p99 {aft.get('p99_ms')} ms (consumer path).")
    for v, r in lat.items():
        if r.get("p99_ms") is not None:
            out.append(f"{v} at {r.get('producer', {}).get('achieved_rate')} msg/s: p50 {r['p50_ms']} ms, "
                       f"p99 {r['p99_ms']} ms, max {r['max_ms']} ms, consumer CPU "
                       f"{r.get('resources', {}).get('cpu_pct_during_load')}% of one core, kept up: {r.get('kept_up')}.")
    return out


def dump_json(doc: dict[str, Any], path: Path) -> None:
    """Pretty JSON, with short lists of numbers (timeline rows) kept on one line."""
    text = json.dumps(doc, indent=2)
    text = re.sub(r"\[\s+([-0-9.,\s\"a-z]+?)\s+\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]"
                  if "\n" in m.group(0) and len(m.group(1)) < 200 else m.group(0), text)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text + "\n")
    tmp.replace(path)


def summary(doc: dict[str, Any]) -> str:
    """One screen: throughput, latency, goals, the profile's top entries."""
    def f(x: Any, fmt: str = "{:,}") -> str:
        return "-" if x is None else fmt.format(x)

    w = doc["workload"]
    lines = [f"afc bench {doc['date']}  run={doc['run_id']}  messages={w['messages']:,}  "
             f"partitions={w['partitions']}  nproc={doc['environment']['machine']['nproc']}", "",
             f"{'throughput':<19}{'msgs/s':>10}{'own cnt':>10}{'1st msg':>8}{'cpu s':>7}{'us/msg':>7}{'cores':>6}"
             f"{'rss MiB':>8}{'redis/msg':>10}  status"]
    for v, t in doc["throughput"].items():
        res = t.get("resources", {})
        lines.append(f"{v:<19}{f(t.get('msgs_per_s')):>10}{f(t.get('msgs_per_s_own_counter')):>10}"
                     f"{f(t.get('time_to_first_message_s')):>8}{f(res.get('cpu_s')):>7}"
                     f"{f(t.get('cpu_us_per_message')):>7}{f(t.get('cpu_cores_avg')):>6}{f(res.get('peak_rss_mib')):>8}"
                     f"{f(t.get('redis_commands_per_message')):>10}  {t.get('status', '-')}")
    if doc["latency"]:
        lines += ["", f"{'latency @' + f(doc.get('latency_setup', {}).get('rate'), '{:,.0f}') + '/s':<19}"
                      f"{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'ack p99':>9}{'p99-ack':>9}{'cpu %':>7}  status"]
        for v, lt in doc["latency"].items():
            ack = lt.get("producer_ack_after_createtime") or {}
            aft = lt.get("after_producer_ack") or {}
            ms = "{:,.1f}"
            lines.append(f"{v:<19}{f(lt.get('p50_ms'), ms):>9}{f(lt.get('p99_ms'), ms):>9}{f(lt.get('max_ms'), ms):>9}"
                         f"{f(ack.get('p99_ms'), ms):>9}{f(aft.get('p99_ms'), ms):>9}"
                         f"{f((lt.get('resources') or {}).get('cpu_pct_during_load')):>7}  {lt.get('status', '-')[:48]}")
    lines.append("")
    for g in doc["goals"]:
        lines.append(f"{'MET    ' if g['met'] else 'NOT MET'} {g['goal']}: value={g['value']} target={g['target']}"
                     + (f" ({g['basis']}: {g['per_round']})" if g.get("basis") else ""))
    prof = doc.get("profile") or {}
    if prof.get("top_own_time_excluding_blocking_calls"):
        lines += ["", "afc under cProfile: Python CPU by thread " + ", ".join(
            f"{k}={v}s" for k, v in (prof.get("python_thread_cpu_s") or {}).items()), "top own time (non-blocking):"]
        for r in prof["top_own_time_excluding_blocking_calls"][:8]:
            lines.append(f"  {r['own_s']:>7.2f}s {r['calls']:>9,}  {r['function']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- cleanup

def cleanup(ctx: Ctx) -> dict[str, Any]:
    """Stop every child still running, delete topics, groups and this run's Redis keys.

    A static member (afc sets group.instance.id) sends no LeaveGroup, so its group stays
    non-empty until the session times out; such deletions are retried for a bounded time."""
    for ch in ctx.children:
        if ch.alive():
            ch.stop(15)
    if ctx.args.keep:
        return {"kept": True, "topics": ctx.topics, "groups": ctx.groups, "redis_prefix": ctx.prefix}
    out: dict[str, Any] = {"topics": workload.delete_topics(ctx.bootstrap, ctx.topics),
                           "redis_keys_deleted": delete_redis_keys(ctx.redis_url, ctx.prefix)}
    groups = workload.delete_groups(ctx.bootstrap, ctx.groups)
    deadline = time.time() + ctx.args.group_wait_s
    while time.time() < deadline:
        pending = [g for g, r in groups.items() if "NON_EMPTY_GROUP" in r]
        if not pending:
            break
        log.info("event=cleanup-wait groups=%d reason=static-members-until-session-timeout", len(pending))
        time.sleep(5)
        groups.update(workload.delete_groups(ctx.bootstrap, pending))
    out["groups"] = groups
    return out


def delete_redis_keys(url: str, prefix: str) -> int | str:
    import redis
    try:
        r = redis.Redis.from_url(url)
        n = 0
        batch: list[bytes] = []
        for k in r.scan_iter(match=f"{prefix}:*", count=10_000):
            batch.append(k)
            if len(batch) >= 5_000:
                n += r.unlink(*batch)
                batch = []
        if batch:
            n += r.unlink(*batch)
        return n
    except redis.RedisError as e:
        return f"error: {e}"


# ---------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--messages", type=int, default=1_000_000, help="messages in the throughput topic")
    ap.add_argument("--partitions", type=int, default=12)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS) + " ('redis' names redis_per_message)")
    ap.add_argument("--budget-s", type=float, default=300, help="most seconds one throughput variant may take")
    ap.add_argument("--slow-budget-s", type=float, default=60,
                    help="budget for the per-message Redis pattern (measured over what it commits in it)")
    ap.add_argument("--rate", type=float, default=5000, help="paced rate of the latency phase, msg/s")
    ap.add_argument("--latency-seconds", type=float, default=20)
    ap.add_argument("--warmup-s", type=float, default=1.0, help="latency: skip records produced in the first seconds")
    ap.add_argument("--drain-s", type=float, default=30, help="latency: how long to wait for the consumer to catch up")
    ap.add_argument("--profile-messages", type=int, default=200_000, help="afc run under cProfile; 0 skips it")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--slowdown-s", type=float, default=20,
                    help=f"afc with a {SLOWDOWN_X}x slower downstream for this long (peak RSS); 0 skips it")
    ap.add_argument("--no-throughput", action="store_true")
    ap.add_argument("--rounds", type=int, default=3,
                    help="runs of " + ", ".join(ROUND_VARIANTS) + " (throughput) and of afc (latency) in all; the "
                         "goals comparing runs take the median of the rounds (1: the first pass alone)")
    ap.add_argument("--group-wait-s", type=float, default=60,
                    help="cleanup: how long to retry deleting groups still held by static members")
    ap.add_argument("--no-backpressure", action="store_true",
                    help="skip the backpressure phase (bench/backpressure.py, bench/results/backpressure.json)")
    ap.add_argument("--keep", action="store_true", help="keep topics, groups and Redis keys (debugging)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "runtime.json")
    ap.add_argument("--bootstrap", default=os.environ.get("AFC_KAFKA_BOOTSTRAP", "127.0.0.1:19092"))
    ap.add_argument("--redis-url", default=os.environ.get("AFC_REDIS_URL", "redis://127.0.0.1:19079/0"))
    ns = ap.parse_args(argv)
    ns.variants = [ALIASES.get(v, v) for v in ns.variants.split(",") if v]
    bad = set(ns.variants) - set(VARIANTS)
    if bad:
        ap.error(f"unknown variants: {sorted(bad)}")
    return ns


def _raise_interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def begin(args: argparse.Namespace, schema: str, script: str, argv: list[str] | None,
          docstring: str) -> tuple[Ctx, dict[str, Any]]:
    """The common start of a bench script: SIGTERM runs its cleanup, one log event per line on
    stderr, a run context, and the results document's header with the method (the module
    docstring's middle, up to "The results file")."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")
    logging.Formatter.converter = time.gmtime
    ctx = Ctx(argparse.Namespace(bootstrap=args.bootstrap, redis_url=args.redis_url))
    return ctx, {**measure.doc_header(schema, script, argv),
                 "method": docstring.split("\n\n", 1)[1].split("\n\nThe results file")[0]}


def run(ctx: Ctx) -> dict[str, Any]:
    a = ctx.args
    t_start = time.time()
    doc: dict[str, Any] = {"schema": "afc-bench-runtime/1", "date": measure.now_iso(), "run_id": ctx.run,
                           "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                           "environment": environment(ctx), "method": METHOD, "throughput": {}, "latency": {},
                           "profile": None}
    log.info("event=start run=%s messages=%d variants=%s tmp=%s", ctx.run, a.messages, ",".join(a.variants), ctx.tmp)
    topic = f"{ctx.run}-tput"
    wl: dict[str, Any] = {"topic": topic, "messages": a.messages, "partitions": a.partitions,
                          "key_space": workload.KEY_SPACE, "value": "JSON object with unique id, ~200 bytes",
                          "compression": "none", "handler": "no-op (bench.handlers:noop)"}
    doc["workload"] = wl
    if not a.no_throughput or a.profile_messages:
        workload.create_topic(ctx.bootstrap, topic, a.partitions)
        ctx.topics.append(topic)
        log.info("event=produce topic=%s messages=%d", topic, a.messages)
        wl["produce"] = workload.produce_bulk(ctx.bootstrap, topic, a.messages, ctx.run)
        hw = workload.high_watermarks(ctx.bootstrap, topic, a.partitions)
        wl["per_partition"] = [hw[p] for p in sorted(hw)]
        log.info("event=produced %s", " ".join(f"{k}={v}" for k, v in wl["produce"].items()))
    warn = redis_headroom(ctx, a.messages + a.profile_messages)
    if warn:
        doc.setdefault("warnings", []).append(warn)
        log.warning("event=redis-headroom %s", warn)
    if not a.no_throughput:
        for v in a.variants:
            budget = a.slow_budget_s if v == "redis_per_message" else a.budget_s
            doc["throughput"][v] = _guard(lambda: throughput(ctx, v, topic, a.messages, budget), v)
    if a.profile_messages and "afc" in a.variants:
        doc["profile"] = _guard(lambda: profile(ctx, topic), "profile")
    if a.slowdown_s and "afc" in a.variants and not a.no_throughput:
        doc["slowdown"] = _guard(lambda: slowdown(ctx, topic, doc["throughput"].get("afc") or {}), "slowdown")
    if a.rounds > 1 and not a.no_throughput:
        doc["rounds"] = {"throughput": {v: [_round_of(doc["throughput"].get(v) or {})]
                                        for v in ROUND_VARIANTS if v in a.variants}}
        for r in range(1, a.rounds):
            for v in doc["rounds"]["throughput"]:
                res = _guard(lambda: throughput(ctx, v, topic, a.messages, a.budget_s, tag=f"tput-r{r}"), v)
                doc["rounds"]["throughput"][v].append(_round_of(res))
    if not a.no_latency:
        doc["latency_setup"] = {"rate": a.rate, "seconds": a.latency_seconds, "warmup_s": a.warmup_s,
                                "drain_s": a.drain_s, "handler": "bench.handlers:record_latency / same recorder"}
        for v in a.variants:
            if v in OWN_COUNT_ONLY:
                doc["latency_setup"].setdefault("not_measured", {})[v] = (
                    "no handler to record in and no commits to tell when it caught up")
                continue
            doc["latency"][v] = _guard(lambda: latency(ctx, v), v)
        if "afc" in a.variants:
            doc["latency"]["afc-fetchwait"] = _guard(lambda: latency(ctx, "afc-fetchwait"), "afc-fetchwait")
            if a.rounds > 1:
                rounds = [_latency_round_of(doc["latency"]["afc"])]
                for r in range(1, a.rounds):
                    rounds.append(_latency_round_of(_guard(lambda: latency(ctx, "afc", tag=f"lat-r{r}"), "afc")))
                doc.setdefault("rounds", {})["latency"] = {"afc": rounds}
    doc["goals"] = goals(doc["throughput"], doc["latency"], doc.get("slowdown"), doc.get("rounds"))
    doc["findings"] = findings(doc["environment"], doc["throughput"], doc["latency"], doc["profile"] or {})
    doc["duration_s"] = round(time.time() - t_start, 1)
    return doc


def redis_headroom(ctx: Ctx, keys: int, bytes_per_key: int = 160) -> str | None:
    """afc keeps one done key per message; with noeviction a full Redis fails the run midway."""
    import redis
    try:
        info = redis.Redis.from_url(ctx.redis_url).info("memory")
    except redis.RedisError as e:
        return f"redis not reachable: {e}"
    limit, used = info.get("maxmemory", 0), info.get("used_memory", 0)
    need = keys * bytes_per_key
    if limit and used + need > 0.9 * limit:
        return (f"redis may run out of memory: used {used >> 20} MiB + ~{need >> 20} MiB for this run "
                f"> 90% of maxmemory {limit >> 20} MiB")
    return None


def _guard(fn: Any, what: str) -> dict[str, Any]:
    """One variant's failure is recorded and the run goes on."""
    try:
        return fn()
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001
        log.exception("event=phase-failed what=%s", what)
        return {"status": f"failed: {type(e).__name__}: {e}"}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")
    logging.Formatter.converter = time.gmtime
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    ctx = Ctx(args)
    doc: dict[str, Any] | None = None
    try:
        doc = run(ctx)
    finally:
        cleaned = cleanup(ctx)
        log.info("event=cleanup %s", json.dumps(cleaned)[:500])
    doc["cleanup"] = cleaned
    doc["logs_dir"] = str(ctx.tmp)
    dump_json(doc, args.out)
    print(summary(doc))
    print(f"\nresults: {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    if not args.no_backpressure:
        # Its own phase, results file and cleanup: the same burst with and without the signal.
        from bench import backpressure
        backpressure.main(["--bootstrap", args.bootstrap, "--redis-url", args.redis_url])
    return 0


if __name__ == "__main__":
    sys.exit(main())
