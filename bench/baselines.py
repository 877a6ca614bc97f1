"""The consumers afc is compared with, written the way people usually write them.

    python -m bench.baselines naive --bootstrap B --topic T --group G [--latency-file F]
    python -m bench.baselines naive-batch --bootstrap B --topic T --group G
    python -m bench.baselines raw --bootstrap B --topic T --group G
    python -m bench.baselines redis --bootstrap B --topic T --group G --redis-url U --prefix P

- naive: `poll()` one message at a time, `enable.auto.commit=True`, `json.loads` the value,
  call the handler. No dedup: a crash replays up to one auto-commit interval.
- naive with `--fetch-queue-backoff-ms 50` (the bench's `naive-tuned`): the same loop with the
  librdkafka setting afc's defaults change (kafka.fetchQueueBackoffMs), to show what of afc's
  lead over `naive` is that setting.
- naive-batch: the same, but `consume(num_messages=1000)` batches instead of `poll()`
  (auto-commit stores the offsets of every message a `consume()` returned).
- raw: `consume(num_messages=1000)` in a loop and count what came back: no decode, no handler,
  no commit, not even a per-message error check (no partition-EOF events are enabled, so a
  batch holds records). The ceiling of this client in Python. It commits nothing, so the
  orchestrator measures it by its own count, not by committed offsets.
- redis: the per-message dedup pattern: `EXISTS key`, and if absent handler + `SET key 1 EX`,
  then a synchronous `commit(message=msg)` per message, so the offset never runs ahead of
  the dedup mark.

Both print JSON lines on stdout so the orchestrator sees them like it sees afc's /metrics:
`assigned`, `first` (first message handled), `progress` (own counter, every ~0.2 s) and
`stopped`. A progress event is also sent when a `consume()` comes back empty after messages
(the loop caught up), stamped with the time of the last message, so a run's last count is
not dated by the idle wait after it. SIGTERM stops the loop after the current message; the consumer is closed (the
naive loop's close commits its last auto-commit offsets) and the latency recorder dumps.

`auto.commit.interval.ms` is 100 (default 5000) for the naive loop so that committed offsets,
which is how the orchestrator measures every variant, lag its real progress by at most 0.1 s.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any, Callable

from confluent_kafka import Consumer

from bench.handlers import RECORDER, noop

PROGRESS_EVERY_S = 0.2


def emit(event: str, **kv: Any) -> None:
    print(json.dumps({"event": event, "t": time.time(), **kv}), flush=True)


class Stop:
    """SIGTERM/SIGINT set a flag the loop checks per message (never mid-message)."""

    def __init__(self) -> None:
        self.flag = False
        signal.signal(signal.SIGTERM, self._set)
        signal.signal(signal.SIGINT, self._set)

    def _set(self, *_: Any) -> None:
        self.flag = True


def make_consumer(ns: argparse.Namespace, auto_commit: bool) -> Consumer:
    conf: dict[str, Any] = {"bootstrap.servers": ns.bootstrap, "group.id": ns.group,
                            "auto.offset.reset": "earliest", "enable.auto.commit": auto_commit}
    if auto_commit:
        conf["auto.commit.interval.ms"] = ns.auto_commit_interval_ms
    if ns.fetch_queue_backoff_ms is not None:
        conf["fetch.queue.backoff.ms"] = ns.fetch_queue_backoff_ms
    c = Consumer(conf)
    c.subscribe([ns.topic], on_assign=lambda _c, parts: emit("assigned", partitions=len(parts)))
    return c


def choose_handler(latency: bool) -> Callable[[Any, Any], None]:
    """(kafka message, decoded payload) -> None; the latency variant notes CreateTime."""
    if latency:
        rec = RECORDER.record
        return lambda m, _p: rec(m.partition(), m.offset(), m.timestamp()[1])
    return lambda _m, p: noop(p)


def run_naive(ns: argparse.Namespace) -> int:
    stop, c = Stop(), make_consumer(ns, auto_commit=True)
    handle, loads = choose_handler(ns.latency), json.loads
    n, last = 0, time.time()
    try:
        while not stop.flag:
            msg = c.poll(1.0)
            if msg is None or msg.error():
                continue
            handle(msg, loads(msg.value()))
            n += 1
            if n == 1:
                emit("first")
            if not n & 255 and time.time() - last >= PROGRESS_EVERY_S:
                last = time.time()
                emit("progress", count=n)
    finally:
        emit("progress", count=n)
        c.close()
        emit("stopped", count=n)
    return 0


class Progress:
    """The loop's own count, reported as `first` once, then `progress` at most every
    PROGRESS_EVERY_S, and once more (dated to the last message) when the loop goes idle."""

    def __init__(self) -> None:
        self.n, self.last_emit, self.emitted, self.t_last_msg = 0, time.time(), 0, 0.0

    def add(self, k: int) -> None:
        if not self.n and k:
            emit("first")
        self.n += k
        self.t_last_msg = now = time.time()
        if now - self.last_emit >= PROGRESS_EVERY_S:
            self.last_emit, self.emitted = now, self.n
            emit("progress", count=self.n)

    def idle(self) -> None:
        if self.n != self.emitted:
            self.emitted = self.n
            emit("progress", count=self.n, t=self.t_last_msg)


BATCH = 1000


def run_batch(ns: argparse.Namespace) -> int:
    """naive-batch (decode + handler per message, auto-commit) and raw (count only, no commit)."""
    raw = ns.variant == "raw"
    stop, c = Stop(), make_consumer(ns, auto_commit=not raw)
    handle, loads = choose_handler(ns.latency), json.loads
    prog = Progress()
    try:
        while not stop.flag:
            msgs = c.consume(BATCH, 1.0)
            if not msgs:
                prog.idle()
                continue
            if raw:
                prog.add(len(msgs))
                continue
            k = 0
            for msg in msgs:
                if msg.error():
                    continue
                handle(msg, loads(msg.value()))
                k += 1
            prog.add(k)
    finally:
        emit("progress", count=prog.n, **({"t": prog.t_last_msg} if prog.n else {}))
        c.close()
        emit("stopped", count=prog.n)
    return 0


def run_redis(ns: argparse.Namespace) -> int:
    """Also times its Redis calls and its commits (perf_counter, negligible next to the
    round trips), so the report can say which of the two limits this pattern."""
    import redis
    stop, c = Stop(), make_consumer(ns, auto_commit=False)
    r = redis.Redis.from_url(ns.redis_url)
    handle, loads, prefix, ttl = choose_handler(ns.latency), json.loads, ns.prefix, ns.ttl_s
    perf = time.perf_counter
    n, dup, last, t_redis, t_commit = 0, 0, time.time(), 0.0, 0.0

    def split() -> dict[str, float]:
        return {"redis_ms_per_msg": round(1000 * t_redis / max(1, n), 3),
                "commit_ms_per_msg": round(1000 * t_commit / max(1, n), 3)}

    try:
        while not stop.flag:
            msg = c.poll(1.0)
            if msg is None or msg.error():
                continue
            payload = loads(msg.value())
            key = prefix + payload["id"]
            t0 = perf()
            if not r.exists(key):
                handle(msg, payload)
                r.set(key, 1, ex=ttl)
            else:
                dup += 1
            t1 = perf()
            c.commit(message=msg, asynchronous=False)
            t_commit += perf() - t1
            t_redis += t1 - t0
            n += 1
            if n == 1:
                emit("first")
            if not n & 63 and time.time() - last >= PROGRESS_EVERY_S:
                last = time.time()
                emit("progress", count=n, **split())
    finally:
        emit("progress", count=n, **split())
        c.close()
        r.close()
        emit("stopped", count=n, duplicates=dup, **split())
    return 0


RUNNERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "naive": run_naive, "naive-batch": run_batch, "raw": run_batch, "redis": run_redis}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.baselines")
    ap.add_argument("variant", choices=tuple(RUNNERS))
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--group", required=True)
    ap.add_argument("--redis-url", default=os.environ.get("AFC_REDIS_URL"))
    ap.add_argument("--prefix", default="afcbench:base:", help="Redis key prefix (redis variant)")
    ap.add_argument("--ttl-s", type=int, default=7 * 86_400)
    ap.add_argument("--auto-commit-interval-ms", type=int, default=100)
    ap.add_argument("--fetch-queue-backoff-ms", type=int, default=None,
                    help="librdkafka's fetch.queue.backoff.ms (default: librdkafka's own, 1000)")
    ap.add_argument("--latency", action="store_true", help="record latencies (file from AFC_BENCH_LAT_FILE)")
    ns = ap.parse_args(argv)
    return RUNNERS[ns.variant](ns)


if __name__ == "__main__":
    sys.exit(main())
