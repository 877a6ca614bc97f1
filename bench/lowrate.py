"""`make bench-lowrate`: what afc costs at the rates most consumers run at, idle, 500 and
5,000 msg/s, by thread, with librdkafka's fetch defaults and with a 2 ms broker-side fetch wait.

At full speed a fetched batch holds hundreds of records and afc's per-batch costs (a hop to
the Kafka thread and back, one idempotency store call, a hand-off to a handler thread and the
result back, two or three loop ticks) vanish in the per-message ones. At a modest rate every
fetch brings a few records, so the per-batch costs are most of the CPU: this measures them.

For each variant, one `afc-consumer run` (no-op handler, Redis idempotency keyed by the
message's unique id, defaults otherwise) on a fresh 12-partition topic; for each rate, a paced
producer (bench/workload.py, linger.ms 1) runs for warm-up + window seconds, and over the window:

- CPU % of one core of the consumer process, split by thread: the event loop (the main thread),
  librdkafka's threads (`rdk:*`) and the other Python threads (handler workers, the Kafka call
  thread, routing's producer), per thread as the kernel counts it (bench.measure.ProcSampler);
- messages handled per second and idempotency store calls per second (from /metrics), their
  ratio (records per fetched batch: one claim call per fetch), and CPU µs per message.

Variants: `afc` (librdkafka's fetch defaults: the broker answers a fetch as soon as one byte is
there) and `afc-fetchwait` (kafka.extra fetch.wait.max.ms=2, fetch.min.bytes=1 MiB: the broker
holds a fetch up to 2 ms, so fewer, larger batches; an idle consumer then fetches 500 times a
second, which the idle row shows).

The results file is written by this script only: bench/results/lowrate.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))             # appended: the repo's operator/ must not shadow `operator`

from bench import measure, workload  # noqa: E402
from bench.run import (PY, VARIANT_ENV, Child, Ctx, begin, child_pythonpath, delete_redis_keys,  # noqa: E402
                       dump_json, spawn, wait_ready)

log = logging.getLogger("bench.lowrate")
VARIANTS = ("afc", "afc-fetchwait", "afc-asyncio")


def counters(port: int) -> tuple[float, float]:
    m = measure.scrape(port)
    return m.get("afc_messages_handled_total", 0.0), m.get("afc_idempotency_claim_latency_seconds_count", 0.0)


def one_rate(ctx: Ctx, args: argparse.Namespace, child: Child, port: int, topic: str, rate: float) -> dict[str, Any]:
    prod = None
    if rate > 0:
        prod = subprocess.Popen([PY, "-m", "bench.workload", "paced", "--bootstrap", ctx.bootstrap, "--topic", topic,
                                 "--rate", str(rate), "--seconds", str(args.warmup_s + args.seconds + 1),
                                 "--run", f"{ctx.run}-r{rate:g}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                env=dict(os.environ, PYTHONPATH=child_pythonpath(ctx)))
    try:
        time.sleep(args.warmup_s)
        c0, (h0, k0), t0 = child.sampler.cpu_by_role(), counters(port), time.time()
        time.sleep(args.seconds)
        c1, (h1, k1), t1 = child.sampler.cpu_by_role(), counters(port), time.time()
    finally:
        produced = None
        if prod is not None:
            out, _ = prod.communicate(timeout=args.seconds + 120)
            try:
                produced = json.loads(out or b"{}")
            except ValueError:
                produced = {"error": "unreadable producer summary"}
    dt = t1 - t0
    cpu = {g: round((c1[g] - c0[g]) / dt * 100, 1) for g in c0}
    total = sum(c1[g] - c0[g] for g in c0)
    handled, calls = (h1 - h0) / dt, (k1 - k0) / dt
    res = {"rate": rate, "window_s": round(dt, 2), "cpu_pct": {**cpu, "total": round(total / dt * 100, 1)},
           "msgs_per_s": round(handled, 1), "store_calls_per_s": round(calls, 1),
           "msgs_per_store_call": round(handled / calls, 2) if calls else None,
           "cpu_us_per_msg": round(total / (h1 - h0) * 1e6, 1) if h1 > h0 else None,
           "producer_achieved_rate": (produced or {}).get("achieved_rate")}
    log.info("event=rate-done rate=%s cpu=%s msgs_per_s=%.0f per_call=%s", rate, res["cpu_pct"], handled,
             res["msgs_per_store_call"])
    return res


def one_variant(ctx: Ctx, args: argparse.Namespace, name: str) -> dict[str, Any]:
    topic = f"{ctx.run}-{name}"
    workload.create_topic(ctx.bootstrap, topic, args.partitions)
    ctx.topics.append(topic)
    child, port = spawn(ctx, name, topic, f"{ctx.run}-{name}-g")     # the no-op handler, as in make bench
    assert port is not None
    out: dict[str, Any] = {"variant": name, "env": VARIANT_ENV.get(name, {})}
    try:
        if not wait_ready(child, port, 90):
            out.update(status="failed: consumer not ready within 90 s", log_tail=child.tail())
            return out
        time.sleep(2.0)
        out["rates"] = [one_rate(ctx, args, child, port, topic, r) for r in args.rates]
        out["status"] = "ok"
    finally:
        out["exit"] = child.stop()
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="0,500,5000", help="comma-separated msg/s; 0 measures the idle consumer")
    ap.add_argument("--seconds", type=float, default=10, help="measured window per rate")
    ap.add_argument("--warmup-s", type=float, default=5, help="producer running before the window opens")
    ap.add_argument("--partitions", type=int, default=12)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "lowrate.json")
    ap.add_argument("--bootstrap", default=os.environ.get("AFC_KAFKA_BOOTSTRAP", "127.0.0.1:19092"))
    ap.add_argument("--redis-url", default=os.environ.get("AFC_REDIS_URL", "redis://127.0.0.1:19079/0"))
    ns = ap.parse_args(argv)
    ns.rates = [float(r) for r in ns.rates.split(",") if r]
    ns.variants = [v for v in ns.variants.split(",") if v]
    bad = set(ns.variants) - set(VARIANTS)
    if bad:
        ap.error(f"unknown variants: {sorted(bad)}")
    return ns


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ctx, doc = begin(args, "afc-bench-lowrate/1", "bench/lowrate.py", argv, __doc__)
    t_start = time.time()
    doc.update(load_avg_at_start=measure.load_avg(), variants={})
    try:
        for v in args.variants:
            doc["variants"][v] = one_variant(ctx, args, v)
    finally:
        for ch in ctx.children:
            if ch.alive():
                ch.stop(15)
        doc["cleanup"] = {"topics": workload.delete_topics(ctx.bootstrap, ctx.topics),
                          "groups": workload.delete_groups(ctx.bootstrap, ctx.groups),
                          "redis_keys_deleted": delete_redis_keys(args.redis_url, ctx.prefix)}
    doc["duration_s"] = round(time.time() - t_start, 1)
    doc["logs_dir"] = str(ctx.tmp)
    dump_json(doc, args.out)
    print(f"{'variant':<15}{'rate':>7}{'msgs/s':>9}{'per call':>9}{'us/msg':>8}{'cpu %':>7}{'loop':>7}"
          f"{'rdkafka':>8}{'python':>7}")
    for v, r in doc["variants"].items():
        for x in r.get("rates", []):
            c = x["cpu_pct"]
            print(f"{v:<15}{x['rate']:>7,.0f}{x['msgs_per_s']:>9,.0f}{x['msgs_per_store_call'] or 0:>9}"
                  f"{x['cpu_us_per_msg'] or 0:>8}{c['total']:>7}{c['loop']:>7}{c['librdkafka']:>8}{c['python']:>7}")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
