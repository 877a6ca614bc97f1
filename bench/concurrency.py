"""The concurrency benchmark: afc's adaptive handler-concurrency limit against fixed settings,
on a simulated downstream of known capacity.

    .venv/bin/python -P bench/concurrency.py          # ~3-4 minutes; bench/results/concurrency.json + .png
    .venv/bin/python -P bench/concurrency.py --help

The downstream (bench/downstream.py, inside the consumer process as its handler): a call
takes L while at most C calls are in progress, L * n / C beyond (queueing), so no
concurrency does better than C / L calls/s and every call beyond C only adds latency.

Phases (one `afc-consumer run` per variant, each its own group and Redis key prefix, all
reading one pre-produced topic of 12 partitions, Redis idempotency on, as a new user would):
- `async_5ms`: an async handler, L = 5 ms, C = 64 (12,800 calls/s at best).
- `sync_1ms`: a sync handler, L = 1 ms, C = 8 (8,000 calls/s at best).
  Each: afc by default (flow.concurrency adaptive, flow.workers 0: at most 256 tasks or 64
  threads) and with `flow.concurrency=fixed` at several `flow.workers`; each variant handles
  `--async-messages` (80,000) or `--sync-messages` (40,000) records. Throughput = records /
  seconds from the first downstream call to the N-th completion (start-up ramp included).
  Downstream latency: the model's own per call (L * max(1, n / C)), as a multiple of L,
  mean and p90.
- `slowdown`: async 5 ms; C = 64, then 16 from 8 s (another tenant took three quarters of
  it), then 64 again from 16 s; adaptive and fixed at 64 (the best fixed setting for the
  first part). Concurrency over time: afc's limit (its /metrics, every 0.25 s) and the calls
  in progress at the downstream; latency over time.

Goals (issue 13): adaptive >= 80 % of the best fixed setting's throughput in both handler
phases; the downstream's latency within 2x of L while C is exceeded (slowdown phase); the
limit comes down when the downstream slows.

Cleanup: topics, groups, this run's Redis keys, every process; also on failure.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    # -P keeps the repo root off sys.path; append (not prepend) so that `bench` imports but
    # the standard library's `operator` still wins over ours.
    sys.path.append(str(ROOT))

from bench import measure, workload  # noqa: E402
from bench.handlers import read_doubles  # noqa: E402
from bench.run import AFC_CONSUMER, Child, Ctx, cleanup, dump_json, environment  # noqa: E402

log = logging.getLogger("bench.concurrency")
SAMPLE_S = 0.25
GOAL_SHARE = 0.8
GOAL_LATENCY_X = 2.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--async-messages", type=int, default=80_000, help="records each variant of the async phase handles")
    ap.add_argument("--sync-messages", type=int, default=40_000, help="records each variant of the sync phase handles")
    ap.add_argument("--async-fixed", default="16,32,64,128,256,1024", help="fixed flow.workers, async phase")
    ap.add_argument("--sync-fixed", default="4,8,16,32,64", help="fixed flow.workers, sync phase")
    ap.add_argument("--async-capacity", type=int, default=64)
    ap.add_argument("--sync-capacity", type=int, default=8)
    ap.add_argument("--slowdown", default="0:64,8:16,16:64", help="capacity schedule of the slowdown phase")
    ap.add_argument("--slowdown-s", type=float, default=24.0)
    ap.add_argument("--phases", default="async_5ms,sync_1ms,slowdown")
    ap.add_argument("--partitions", type=int, default=12)
    ap.add_argument("--budget-s", type=float, default=60, help="most seconds one variant may take")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "concurrency.json")
    ap.add_argument("--keep", action="store_true", help="keep topics, groups and Redis keys")
    ap.add_argument("--group-wait-s", type=float, default=60)
    ap.add_argument("--bootstrap", default=os.environ.get("AFC_KAFKA_BOOTSTRAP", "127.0.0.1:19092"))
    ap.add_argument("--redis-url", default=os.environ.get("AFC_REDIS_URL", "redis://127.0.0.1:19079/0"))
    return ap.parse_args(argv)


def env_for(ctx: Ctx, topic: str, group: str, name: str, port: int, flow: dict[str, str],
            ds: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "AFC_KAFKA__BOOTSTRAP_SERVERS": ctx.bootstrap,
        "AFC_KAFKA__TOPICS": json.dumps([topic]),
        "AFC_KAFKA__GROUP_ID": group,
        "AFC_IDEMPOTENCY__REDIS_URL": ctx.redis_url,
        "AFC_IDEMPOTENCY__KEY_PREFIX": f"{ctx.prefix}:{name}",   # own keys per variant (<= 64 chars)
        "AFC_SERVER__HOST": "127.0.0.1",
        "AFC_SERVER__PORT": str(port),
        "AFC_INSTANCE_ID": group,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ctx.pypath), os.environ.get("PYTHONPATH")])),
        **{f"AFC_FLOW__{k.upper()}": v for k, v in flow.items()},
        **ds,
    })
    return env


def run_variant(ctx: Ctx, topic: str, name: str, handler: str, flow: dict[str, str], latency_ms: float,
                schedule: str, stop_at: int | None, stop_after_s: float | None) -> dict[str, Any]:
    """One consumer until the downstream has seen `stop_at` handled records (or `stop_after_s`
    since its first, for the slowdown phase); returns throughput, latency and timelines."""
    group = f"{ctx.run}-{name}"
    ctx.groups.append(group)
    port = measure.free_port()
    calls_file = ctx.tmp / f"{name}.calls"
    ds = {"AFC_BENCH_DS_LATENCY_MS": str(latency_ms), "AFC_BENCH_DS_SCHEDULE": schedule,
          "AFC_BENCH_DS_FILE": str(calls_file)}
    child = Child(ctx, name, [AFC_CONSUMER, "run", "--handler", handler],
                  env_for(ctx, topic, group, name, port, flow, ds), events=False)
    log.info("event=variant-start variant=%s flow=%s pid=%d", name, flow, child.p.pid)
    samples: list[list[float]] = []
    first: float | None = None

    def step(tick: float) -> bool:
        nonlocal first
        m = measure.scrape(port)
        handled = m.get("afc_messages_handled_total", 0.0)
        if first is None and handled > 0:
            first = tick
        if first is not None:
            samples.append([round(tick - first, 2), handled, m.get("afc_handler_concurrency_limit", 0.0),
                            m.get("afc_handler_concurrency", 0.0), m.get("afc_inflight_limit", 0.0)])
        return ((stop_at is not None and handled >= stop_at)
                or (stop_after_s is not None and first is not None and tick - first >= stop_after_s))

    status = child.watch(step, time.time() + ctx.args.budget_s, SAMPLE_S)
    child.sampler.sample()
    ex = child.stop()
    res: dict[str, Any] = {"variant": name, "flow": flow, "status": status, "exit": ex,
                           "cpu_s": round(child.sampler.cpu_s, 2),
                           "peak_rss_mib": round(child.sampler.peak_rss / 2**20, 1)}
    calls = read_doubles(str(calls_file), 4) if calls_file.exists() else []
    res.update(analyse(calls, latency_ms / 1000, stop_at))
    res["metrics_columns"] = ["t_s", "handled", "afc_handler_concurrency_limit", "afc_handler_concurrency",
                              "afc_inflight_limit"]
    res["metrics"] = samples
    if not status.startswith("ok"):
        res["log_tail"] = child.tail()
    log.info("event=variant-done variant=%s status=%r msgs_per_s=%s latency_x_mean=%s latency_x_p90=%s",
             name, status, res.get("msgs_per_s"), res.get("latency_x_mean"), res.get("latency_x_p90"))
    return res


def analyse(calls: list[tuple[float, ...]], L: float, n: int | None) -> dict[str, Any]:
    """Throughput and the model's latency from the downstream's own record of its calls
    (start s, modelled latency s, measured s, calls in progress at start)."""
    if not calls:
        return {"msgs_per_s": None, "calls": 0}
    ends = sorted(t + took for t, _, took, _ in calls)
    upto = ends[min(len(ends), n) - 1] if n else ends[-1]
    done = sum(1 for e in ends if e <= upto)
    model = sorted(d / L for _, d, _, _ in calls)
    took = sorted(x / L for _, _, x, _ in calls)
    q = lambda xs, p: round(xs[min(len(xs) - 1, int(p * len(xs)))], 2)  # noqa: E731
    bucket: dict[int, list[tuple[float, ...]]] = {}
    for c in calls:
        bucket.setdefault(int(c[0] / 0.5), []).append(c)
    timeline = [[round(k * 0.5, 1), round(len(v) / 0.5), round(statistics.fmean(x[3] for x in v), 1),
                 round(statistics.fmean(x[1] for x in v) / L, 2), round(statistics.fmean(x[2] for x in v) / L, 2)]
                for k, v in sorted(bucket.items())]
    return {"calls": len(calls), "measured_calls": done, "measured_s": round(upto, 2),
            "msgs_per_s": round(done / upto) if upto > 0 else None,
            "latency_x_mean": round(statistics.fmean(model), 2), "latency_x_p90": q(model, 0.9),
            "latency_x_p99": q(model, 0.99), "measured_latency_x_mean": round(statistics.fmean(took), 2),
            "measured_latency_x_p90": q(took, 0.9),
            "downstream_columns": ["t_s", "calls_per_s", "concurrency_mean", "latency_x_model", "latency_x_measured"],
            "downstream": timeline}


def handler_phase(ctx: Ctx, topic: str, kind: str, latency_ms: float, capacity: int, fixed: list[int],
                  messages: int) -> dict[str, Any]:
    handler = f"bench.downstream:{'async_call' if kind == 'async' else 'sync_call'}"
    schedule = f"0:{capacity}"
    tag = f"{kind}{latency_ms:g}ms"
    variants = {"adaptive": run_variant(ctx, topic, f"{tag}-adaptive", handler, {}, latency_ms, schedule,
                                        messages, None)}
    for w in fixed:
        variants[f"fixed-{w}"] = run_variant(ctx, topic, f"{tag}-fixed-{w}", handler,
                                             {"concurrency": "fixed", "workers": str(w)}, latency_ms, schedule,
                                             messages, None)
    ok = {k: v for k, v in variants.items() if k != "adaptive" and v.get("msgs_per_s")}
    best = max(ok, key=lambda k: ok[k]["msgs_per_s"]) if ok else None
    a = variants["adaptive"].get("msgs_per_s")
    ratio = round(a / ok[best]["msgs_per_s"], 3) if best and a else None
    return {"handler": handler, "latency_ms": latency_ms, "capacity": capacity,
            "capacity_msgs_per_s": round(capacity / (latency_ms / 1000)), "messages": messages,
            "best_fixed": best, "best_fixed_msgs_per_s": ok[best]["msgs_per_s"] if best else None,
            "adaptive_msgs_per_s": a, "adaptive_over_best_fixed": ratio,
            "adaptive_final_limit": last_limit(variants["adaptive"]),
            "table": [{"variant": k, "msgs_per_s": v.get("msgs_per_s"), "latency_x_mean": v.get("latency_x_mean"),
                       "latency_x_p90": v.get("latency_x_p90"), "cpu_s": v.get("cpu_s"), "status": v["status"]}
                      for k, v in variants.items()],
            "variants": variants}


def last_limit(v: dict[str, Any]) -> float | None:
    return v["metrics"][-1][2] if v.get("metrics") else None


def slowdown_phase(ctx: Ctx, topic: str, schedule: str, seconds: float) -> dict[str, Any]:
    handler = "bench.downstream:async_call"
    out: dict[str, Any] = {"handler": handler, "latency_ms": 5.0, "schedule": schedule, "seconds": seconds}
    from bench.downstream import parse_schedule
    sched = parse_schedule(schedule)
    for name, flow in (("adaptive", {}), ("fixed-64", {"concurrency": "fixed", "workers": "64"})):
        v = run_variant(ctx, topic, f"slowdown-{name}", handler, flow, 5.0, schedule, None, seconds)
        # Per capacity period, after a 2 s settling time: the limit and the model's latency.
        periods = []
        for i, (t0, cap) in enumerate(sched):
            t1 = sched[i + 1][0] if i + 1 < len(sched) else seconds
            rows = [r for r in v.get("downstream", []) if t0 + 2 <= r[0] < t1]
            lims = [r[2] for r in v["metrics"] if t0 + 2 <= r[0] < t1]
            periods.append({"from_s": t0, "to_s": t1, "capacity": cap,
                            "limit_mean": round(statistics.fmean(lims), 1) if lims else None,
                            "downstream_concurrency_mean": round(statistics.fmean(r[2] for r in rows), 1) if rows else None,
                            "latency_x_model_mean": round(statistics.fmean(r[3] for r in rows), 2) if rows else None,
                            "latency_x_model_max": max((r[3] for r in rows), default=None),
                            "calls_per_s": round(statistics.fmean(r[1] for r in rows)) if rows else None})
        v["periods"] = periods
        out[name] = v
    return out


def goals(doc: dict[str, Any]) -> list[dict[str, Any]]:
    g = []
    for ph in ("async_5ms", "sync_1ms"):
        p = doc["phases"].get(ph)
        if p:
            g.append({"goal": f"{ph}: adaptive >= {GOAL_SHARE:.0%} of the best fixed setting",
                      "value": p["adaptive_over_best_fixed"], "best_fixed": p["best_fixed"],
                      "met": bool(p["adaptive_over_best_fixed"] and p["adaptive_over_best_fixed"] >= GOAL_SHARE)})
    s = doc["phases"].get("slowdown")
    if s:
        per = s["adaptive"]["periods"]
        worst = max((x["latency_x_model_mean"] or 0) for x in per)
        g.append({"goal": f"slowdown: downstream latency (mean per period, after 2 s) within {GOAL_LATENCY_X:g}x "
                          "of unloaded", "value": worst, "met": worst <= GOAL_LATENCY_X})
        if len(per) >= 2 and per[0]["limit_mean"] and per[1]["limit_mean"]:
            g.append({"goal": "slowdown: the limit comes down when the downstream slows",
                      "value": [per[0]["limit_mean"], per[1]["limit_mean"]],
                      "met": per[1]["limit_mean"] <= per[0]["limit_mean"] * 0.5})
    return g


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for ax, ph in zip(axes[0], ("async_5ms", "sync_1ms")):
        p = doc["phases"].get(ph)
        if not p:
            ax.set_visible(False)
            continue
        names = [r["variant"] for r in p["table"]]
        vals = [r["msgs_per_s"] or 0 for r in p["table"]]
        lat = [r["latency_x_mean"] or 0 for r in p["table"]]
        ax.bar(names, vals, color=["tab:green" if n == "adaptive" else "tab:gray" for n in names])
        ax.axhline(p["capacity_msgs_per_s"], ls="--", color="k", lw=0.8, label="downstream capacity C/L")
        for i, (v, x) in enumerate(zip(vals, lat)):
            ax.text(i, v, f"{x:g}x L", ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{ph}: msgs/s (label: mean downstream latency / L), C={p['capacity']}")
        ax.tick_params(axis="x", rotation=30)
        ax.legend(fontsize=8)
    s = doc["phases"].get("slowdown")
    if s:
        from bench.downstream import parse_schedule
        sched = parse_schedule(s["schedule"])
        xs = [0.0]
        cs = [sched[0][1]]
        for t, c in sched[1:]:
            xs += [t, t]
            cs += [cs[-1], c]
        xs.append(s["seconds"])
        cs.append(cs[-1])
        ax = axes[1][0]
        ax.plot(xs, cs, "k--", lw=1, label="downstream capacity C")
        for name, color in (("adaptive", "tab:green"), ("fixed-64", "tab:gray")):
            v = s[name]
            ax.plot([r[0] for r in v["metrics"]], [r[2] for r in v["metrics"]], color=color, label=f"{name}: limit")
            ax.plot([r[0] for r in v["downstream"]], [r[2] for r in v["downstream"]], color=color, ls=":",
                    label=f"{name}: calls in progress")
        ax.set_title("slowdown: concurrency over time")
        ax.set_xlabel("s")
        ax.legend(fontsize=8)
        ax = axes[1][1]
        for name, color in (("adaptive", "tab:green"), ("fixed-64", "tab:gray")):
            v = s[name]
            ax.plot([r[0] for r in v["downstream"]], [r[3] for r in v["downstream"]], color=color,
                    label=f"{name}: latency / L")
            ax.plot([r[0] for r in v["downstream"]], [r[1] / 1000 for r in v["downstream"]], color=color, ls=":",
                    label=f"{name}: k calls/s")
        ax.axhline(GOAL_LATENCY_X, color="r", lw=0.8, ls="--", label="2x L")
        ax.set_title("slowdown: downstream latency and throughput")
        ax.set_xlabel("s")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def _raise_interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    ctx = Ctx(args)
    phases = args.phases.split(",")
    doc: dict[str, Any] = {"date": measure.now_iso(), "environment": environment(ctx), "phases": {}}
    t0 = time.monotonic()
    try:
        topic = f"{ctx.run}-conc"
        workload.create_topic(ctx.bootstrap, topic, args.partitions)
        ctx.topics.append(topic)
        # Enough for the slowdown phase at full capacity; the handler phases read the first part.
        need = max(args.async_messages, args.sync_messages,
                   int(12_800 * args.slowdown_s) if "slowdown" in phases else 0)
        doc["produce"] = workload.produce_bulk(ctx.bootstrap, topic, need, ctx.run)
        if "async_5ms" in phases:
            doc["phases"]["async_5ms"] = handler_phase(ctx, topic, "async", 5.0, args.async_capacity,
                                                       [int(x) for x in args.async_fixed.split(",")],
                                                       args.async_messages)
        if "sync_1ms" in phases:
            doc["phases"]["sync_1ms"] = handler_phase(ctx, topic, "sync", 1.0, args.sync_capacity,
                                                      [int(x) for x in args.sync_fixed.split(",")],
                                                      args.sync_messages)
        if "slowdown" in phases:
            doc["phases"]["slowdown"] = slowdown_phase(ctx, topic, args.slowdown, args.slowdown_s)
    finally:
        doc["cleanup"] = cleanup(ctx)
    doc["seconds"] = round(time.monotonic() - t0, 1)
    doc["load_avg_at_end"] = measure.load_avg()
    doc["goals"] = goals(doc)
    dump_json(doc, args.out)
    plot(doc, args.out.with_suffix(".png"))
    for g in doc["goals"]:
        print(f"{'MET ' if g['met'] else 'MISS'} {g['goal']}: {g['value']}")
    for ph in ("async_5ms", "sync_1ms"):
        p = doc["phases"].get(ph)
        if p:
            print(ph, " ".join(f"{r['variant']}={r['msgs_per_s']}({r['latency_x_mean']}x)" for r in p["table"]))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} in {doc['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
