"""`make bench-report`: bench/results/*.json -> docs/benchmarks.md with PNG plots.

Reads only what the benchmarks wrote (never edits a result) and labels every section with
the machine and the date its run reports, so a figure is never read without its context.
A results file that is missing is named as not run yet; one this script does not know is
listed with its goals and findings, so a new benchmark shows up before it has a plot.

    .venv/bin/python -P bench/report.py [--results bench/results] [--out docs]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")               # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VARIANT_COLOURS = {"afc": "tab:blue", "afc-asyncio": "tab:purple", "afc-batch": "tab:cyan", "afc-nodedup": "tab:olive", "naive": "tab:gray", "naive-tuned": "dimgray", "naive-batch": "silver", "raw": "black",
                   "redis_per_message": "tab:red"}


def _machine(doc: dict[str, Any]) -> dict[str, Any]:
    env = doc.get("environment") or {}
    return env.get("machine") or doc.get("machine") or {}


def label(doc: dict[str, Any], name: str) -> str:
    """'ran 2026-11-27T00:17:31Z on 2 cores (Intel Xeon), load 5.8 at start'."""
    m = _machine(doc)
    parts = [f"ran {doc.get('date') or 'at an unrecorded time'}"]
    if m:
        detail = ", ".join(x for x in (m.get("cpu_model"), m.get("kernel") and f"kernel {m['kernel']}") if x)
        parts.append(f"on {m.get('nproc', '?')} cores" + (f" ({detail})" if detail else ""))
        load = m.get("load_avg_at_start")
        if load:
            parts.append(f"load average {round(load[0], 2)} at start")
    elif "model" in doc:
        parts.append("a simulation: no server involved, the machine does not matter")
    else:
        parts.append("on a machine the file does not record")
    return f"`{name}` " + ", ".join(parts)


def _fmt(x: Any, spec: str = "{:,.0f}") -> str:
    if x is None:
        return "-"
    if isinstance(x, (int, float)):
        return spec.format(x)
    return str(x)


def _save(fig: Any, out: Path, name: str, stamp: str) -> str:
    fig.text(0.01, 0.005, stamp, fontsize=7, color="dimgray", ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path = out / "img" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"img/{name}"


def _goals(doc: dict[str, Any]) -> list[str]:
    goals = doc.get("goals")
    lines: list[str] = []
    if isinstance(goals, list):
        for g in goals:
            if isinstance(g, dict) and "goal" in g:
                verdict = ("above" if g.get("met") else "below") + " the same target, not a goal" \
                    if g.get("informational") else ("met" if g.get("met") else "**not met**")
                rounds = (f"; {g['basis']}: {', '.join(_fmt(x, '{:,}') for x in g['per_round'])}"
                          if g.get("basis") and g.get("per_round") else "")
                lines.append(f"- {verdict}: {g['goal']} (value {_fmt(g.get('value'), '{:,}')}"
                             + (f", target {_fmt(g['target'], '{:,}')}" if g.get("target") is not None else "")
                             + rounds + ")")
    elif isinstance(goals, dict):
        for k, g in goals.items():
            if isinstance(g, dict) and "holds" in g:
                failed = [c for c, v in g.items() if v is False and c != "holds"]
                lines.append(f"- {'holds' if g['holds'] else '**does not hold**'}: {k}"
                             + (f" (fails: {', '.join(failed)})" if failed else ""))
    return lines


def _stall_caption(runs: Any) -> list[str]:
    """What the scheduler-stall columns measured, in the results file's own words."""
    what = next((r["scheduler_stalls"]["what"] for r in runs if (r.get("scheduler_stalls") or {}).get("what")), None)
    return ["", f"Scheduler stall: {what}."] if what else []


def _findings(doc: dict[str, Any], limit: int = 12) -> list[str]:
    f = doc.get("findings") or []
    return [f"- {x}" for x in f[:limit] if isinstance(x, str)]


# ----------------------------------------------------------------------------- sections

def runtime_section(doc: dict[str, Any], out: Path, name: str) -> list[str]:
    stamp = label(doc, name)
    lines = ["## Runtime: throughput and latency", "", stamp + ".", ""]
    tp = doc.get("throughput") or {}
    if tp:
        vs = list(tp)
        rates = [tp[v].get("msgs_per_s") or 0 for v in vs]
        cpu = [tp[v].get("cpu_us_per_message") for v in vs]
        fig, ax = plt.subplots(figsize=(7, 3.2))
        bars = ax.barh(vs, rates, color=[VARIANT_COLOURS.get(v, "tab:green") for v in vs])
        for b, r, c in zip(bars, rates, cpu):
            ax.text(b.get_width(), b.get_y() + b.get_height() / 2, f" {r:,.0f} msg/s, {_fmt(c, '{:.1f}')} µs CPU/msg",
                    va="center", fontsize=8)
        ax.set_xlabel("messages per second, one process (higher is better)")
        ax.set_xlim(0, max(rates + [1]) * 1.6)
        ax.set_title("Throughput: committed progress to the target")
        lines += [f"![throughput]({_save(fig, out, 'bench-throughput.png', stamp)})", "",
                  "| variant | msg/s | CPU s | CPU µs/msg | cores | peak RSS MiB | Redis cmds/msg | status |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
        for v in vs:
            t = tp[v]
            res = t.get("resources") or {}
            lines.append(f"| {v} | {_fmt(t.get('msgs_per_s'))} | {_fmt(res.get('cpu_s'), '{:.2f}')} | "
                         f"{_fmt(t.get('cpu_us_per_message'), '{:.1f}')} | {_fmt(t.get('cpu_cores_avg'), '{:.2f}')} | "
                         f"{_fmt(res.get('peak_rss_mib'), '{:.1f}')} | {_fmt(t.get('redis_commands_per_message'), '{:.3f}')} | "
                         f"{t.get('status', '-')} |")
        lines.append("")
        rt = (doc.get("rounds") or {}).get("throughput") or {}
        if rt:
            n = max(len(r) for r in rt.values())
            lines += ["Rounds (the first pass above, then interleaved; the ratio goals take their median):", "",
                      "| variant | " + " | ".join(f"round {i + 1} msg/s" for i in range(n)) + " |",
                      "|---|" + "---:|" * n]
            for v, rs in rt.items():
                lines.append(f"| {v} | " + " | ".join(_fmt(r.get("msgs_per_s")) for r in rs) + " |")
            lines.append("")
    lat = doc.get("latency") or {}
    if lat:
        qs = ("p50_ms", "p90_ms", "p99_ms", "p999_ms")
        fig, ax = plt.subplots(figsize=(7, 3.2))
        width = 0.8 / max(1, len(lat))
        for i, (v, l) in enumerate(lat.items()):
            src = l.get("after_producer_ack") or {}
            ys = [src.get(q) or 0 for q in qs]
            ax.bar([j + i * width for j in range(len(qs))], ys, width, label=v, color=VARIANT_COLOURS.get(v, "tab:green"))
        ax.set_xticks([j + width * (len(lat) - 1) / 2 for j in range(len(qs))], [q.removesuffix("_ms") for q in qs])
        ax.set_yscale("log")
        ax.set_ylabel("ms, handler start after the producer's ack")
        rate = (doc.get("latency_setup") or {}).get("rate")
        ax.set_title(f"Latency at {_fmt(rate)} msg/s (the consumer's share; lower is better)")
        ax.legend(fontsize=8)
        lines += [f"![latency]({_save(fig, out, 'bench-latency.png', stamp)})", "",
                  "| variant | p50 ms | p99 ms | after ack p50 | after ack p99 | broker ack p99 "
                  "| scheduler stall p99 / max ms |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for v, l in lat.items():
            a, b = l.get("after_producer_ack") or {}, l.get("producer_ack_after_createtime") or {}
            st = l.get("scheduler_stalls") or {}
            lines.append(f"| {v} | {_fmt(l.get('p50_ms'), '{:.1f}')} | {_fmt(l.get('p99_ms'), '{:.1f}')} | "
                         f"{_fmt(a.get('p50_ms'), '{:.1f}')} | {_fmt(a.get('p99_ms'), '{:.1f}')} | "
                         f"{_fmt(b.get('p99_ms'), '{:.1f}')} | "
                         f"{_fmt(st.get('p99_ms'), '{:.1f}')} / {_fmt(st.get('max_ms'), '{:.1f}')} |")
        lr = ((doc.get("rounds") or {}).get("latency") or {}).get("afc") or []
        if lr:
            lines += ["", "afc's latency rounds (the first is the row above; the goal takes the median of "
                      "p99 over the ack p99):", "",
                      "| round | p99 ms | broker ack p99 | over ack | after ack p99 | stall max ms |",
                      "|---:|---:|---:|---:|---:|---:|"]
            lines += [f"| {i + 1} | {_fmt(r.get('p99_ms'), '{:.1f}')} | {_fmt(r.get('ack_p99_ms'), '{:.1f}')} | "
                      f"{_fmt(r.get('over_ack_ms'), '{:+.1f}')} | {_fmt(r.get('after_ack_p99_ms'), '{:.1f}')} | "
                      f"{_fmt(r.get('stall_max_ms'), '{:.1f}')} |" for i, r in enumerate(lr)]
        lines += _stall_caption(lat.values()) + [""]
    return lines + ["Goals:", ""] + _goals(doc) + ["", "Findings:", ""] + _findings(doc, limit=40) + [""]


def backpressure_section(doc: dict[str, Any], out: Path, name: str) -> list[str]:
    stamp = label(doc, name)
    lines = ["## Backpressure: the producer library honouring the signal", "", stamp + ".", ""]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 4.6), sharex=True)
    for key, colour in (("without_signal", "tab:red"), ("with_signal", "tab:blue")):
        run = doc.get(key) or {}
        cols, rows = run.get("timeline_columns") or [], run.get("timeline") or []
        if not rows or "t_s" not in cols:
            continue
        c = {n: i for i, n in enumerate(cols)}
        t = [r[c["t_s"]] for r in rows]
        if "delivered" in c and "committed" in c:
            ax1.plot(t, [r[c["delivered"]] - r[c["committed"]] for r in rows], color=colour, label=key.replace("_", " "))
        if "allowed_rate" in c:
            ax2.plot(t, [r[c["allowed_rate"]] for r in rows], color=colour, label=key.replace("_", " "))
    ax1.set_ylabel("lag, messages")
    ax1.set_title("A burst against a slow downstream: lag (top), the producers' allowed rate (bottom)", fontsize=9)
    ax1.legend(fontsize=8)
    ax2.set_ylabel("allowed msg/s")
    ax2.set_xlabel("seconds")
    lines += [f"![backpressure]({_save(fig, out, 'bench-backpressure.png', stamp)})", "",
              "| | peak lag | peak RSS MiB | drain after burst s | downstream calls/s peak |", "|---|---:|---:|---:|---:|"]
    for key in ("without_signal", "with_signal"):
        r = doc.get(key) or {}
        lines.append(f"| {key.replace('_', ' ')} | {_fmt(r.get('peak_lag'))} | {_fmt(r.get('peak_rss_mib'), '{:.1f}')} | "
                     f"{_fmt(r.get('drain_after_burst_s'), '{:.1f}')} | {_fmt(r.get('downstream_calls_per_s_peak'), '{:.1f}')} |")
    return lines + [""] + _findings(doc) + [""]


def lowrate_section(doc: dict[str, Any], out: Path, name: str) -> list[str]:
    lines = ["## At a modest rate: CPU by thread", "", label(doc, name) + ".", "",
             "| variant | offered msg/s | handled msg/s | records per store call | µs CPU per message | "
             "CPU % of a core | loop | librdkafka | other Python |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for v, run in (doc.get("variants") or {}).items():
        for r in run.get("rates") or []:
            c = r.get("cpu_pct") or {}
            lines.append(f"| {v} | {_fmt(r.get('rate'))} | {_fmt(r.get('msgs_per_s'))} | "
                         f"{_fmt(r.get('msgs_per_store_call'), '{:.1f}')} | {_fmt(r.get('cpu_us_per_msg'), '{:.1f}')} | "
                         f"{_fmt(c.get('total'), '{:.1f}')} | {_fmt(c.get('loop'), '{:.1f}')} | "
                         f"{_fmt(c.get('librdkafka'), '{:.1f}')} | {_fmt(c.get('python'), '{:.1f}')} |")
    return lines + [""]


def stages_section(doc: dict[str, Any], out: Path, name: str) -> list[str]:
    """bench/stages.py: a record's time inside afc, step by step, per rate and fetch linger."""
    steps = ("fetched->loop", "loop->submitted", "submitted->handler", "fetched->handler")
    lines = ["## Inside afc at a modest rate: a record's steps (in-process, stamped)", "", label(doc, name) + ".", "",
             "| msg/s | linger ms | loop | round | records per store call | µs CPU per record | "
             + " | ".join(f"{s} p50 / p99 ms" for s in steps) + " | store call p50 / p99 ms | scheduler stall max ms |",
             "|" + "---:|" * 2 + "---|" + "---:|" * (5 + len(steps))]
    for r in doc.get("runs") or []:
        if r.get("error"):
            lines.append(f"| {_fmt(r.get('rate'))} | {_fmt(r.get('fetch_linger_ms'), '{:g}')} | {_loop(r)} | "
                         f"{r.get('round')} | failed: {str(r['error'])[-120:]!r} |")
            continue
        st = r.get("steps") or {}
        cells = [f"{_fmt((st.get(s) or {}).get('p50_ms'), '{:.2f}')} / {_fmt((st.get(s) or {}).get('p99_ms'), '{:.1f}')}"
                 for s in steps]
        sc = r.get("store_call") or {}
        lines.append(f"| {_fmt(r.get('rate'))} | {_fmt(r.get('fetch_linger_ms'), '{:g}')} | {_loop(r)} | {r.get('round')} | "
                     f"{_fmt(r.get('records_per_store_call'), '{:.1f}')} | {_fmt(r.get('cpu_us_per_record'), '{:.0f}')} | "
                     + " | ".join(cells) + f" | {_fmt(sc.get('p50_ms'), '{:.2f}')} / {_fmt(sc.get('p99_ms'), '{:.1f}')} | "
                     f"{_fmt((r.get('scheduler_stalls') or {}).get('max_ms'), '{:.1f}')} |")
    return lines + _stall_caption(doc.get("runs") or []) + [""] + _claim_split(doc.get("runs") or [])


def _loop(run: dict[str, Any]) -> str:
    """The run's event loop (runs from before handler.eventLoop ran on asyncio's)."""
    return str(run.get("event_loop") or "asyncio")


def _claim_split(runs: list[dict[str, Any]]) -> list[str]:
    """The claim step in three, and the collector's pauses (runs from before the split: none)."""
    split = ("loop->sent", "sent->answered", "answered->submitted")
    runs = [r for r in runs if not r.get("error") and all(k in (r.get("steps") or {}) for k in split)]
    if not runs:
        return []
    lines = ["The claim step (`loop->submitted`) split at its store call: waiting for a call to carry the "
             "claim, the call, and the answer's way to the workers (in call order, applied by the loop, past the "
             "key gate); and the garbage collector's pauses in the window.", "",
             "| msg/s | linger ms | loop | round | " + " | ".join(f"{s} p50 / p99 ms" for s in split)
             + " | GC pauses (gen: count, max ms) |", "|" + "---:|" * 2 + "---|" + "---:|" * (2 + len(split))]
    for r in runs:
        st = r["steps"]
        gcs = ", ".join(f"{g}: {v['count']}, {_fmt(v['max_ms'], '{:.1f}')}" for g, v in (r.get("gc_pauses") or {}).items())
        lines.append(f"| {_fmt(r.get('rate'))} | {_fmt(r.get('fetch_linger_ms'), '{:g}')} | {_loop(r)} | {r.get('round')} | "
                     + " | ".join(f"{_fmt(st[s].get('p50_ms'), '{:.2f}')} / {_fmt(st[s].get('p99_ms'), '{:.1f}')}"
                                  for s in split) + f" | {gcs or 'none'} |")
    return lines + [""]


def scaling_section(doc: dict[str, Any], out: Path, name: str) -> list[str]:
    stamp = label(doc, name)
    lines = ["## Autoscaling: afc's policy against KEDA + HPA (simulated)", "", stamp + ".", ""]
    series, every = doc.get("series") or {}, doc.get("series_every_s") or 10
    if series:
        fig, axes = plt.subplots(len(series), 2, figsize=(9, 2.0 * len(series)), squeeze=False)
        for row, (trace, by) in enumerate(series.items()):
            for policy, s in by.items():
                t = [i * every for i in range(len(s.get("replicas", [])))]
                axes[row][0].plot(t, s.get("replicas", []), label=policy, lw=1)
                axes[row][1].plot(t, s.get("lag_seconds", []), label=policy, lw=1)
            axes[row][0].set_ylabel(trace, fontsize=8)
            axes[row][0].set_title("replicas" if row == 0 else "", fontsize=9)
            axes[row][1].set_title("oldest unconsumed message, s" if row == 0 else "", fontsize=9)
        axes[0][0].legend(fontsize=7)
        lines += [f"![scaling]({_save(fig, out, 'bench-scaling.png', stamp)})", ""]
    results = doc.get("results") or {}
    if results:
        lines += ["| trace | policy | s over target drain | replica-s | scale events | scale-ups in window |",
                  "|---|---|---:|---:|---:|---:|"]
        for trace, by in results.items():
            for policy, r in by.items():
                lines.append(f"| {trace} | {policy} | {_fmt(r.get('seconds_over_target_drain'))} | "
                             f"{_fmt(r.get('replica_seconds'))} | {_fmt(r.get('scale_events'))} | "
                             f"{_fmt(r.get('scale_ups_in_window'))} |")
        lines.append("")
    return lines + ["Goals:", ""] + _goals(doc) + [""]


def chaos_section(doc: dict[str, Any], out: Path, name: str) -> list[str]:
    stamp = label(doc, name)
    sc, tot = doc.get("scenario") or {}, doc.get("totals") or {}
    lines = ["## Chaos soak: nothing lost, nothing twice", "", stamp + ".", "",
             f"Scenario: {_fmt(sc.get('n'))} records at {_fmt(sc.get('rate'))}/s, {sc.get('members', '?')} members, "
             f"{sc.get('kills', '?')} SIGKILLs, handler `{sc.get('handler', '?')}`.", "",
             "| run | produced | applied | duplicates | missing |", "|---:|---:|---:|---:|---:|"]
    for r in doc.get("runs") or []:
        lines.append(f"| {r.get('run')} | {_fmt(r.get('produced'))} | {_fmt(r.get('applied'))} | "
                     f"{_fmt(r.get('duplicates'))} | {_fmt(r.get('missing'))} |")
    lines += ["", f"Totals: {tot.get('ok_runs', '?')}/{tot.get('runs', '?')} runs clean, "
                  f"{_fmt(tot.get('duplicates'))} duplicates, {_fmt(tot.get('missing'))} missing.", ""]
    return lines


def rollout_section(doc: dict[str, Any], out: Path, name: str) -> list[str]:
    """The rollout benchmark: one bar group per (members, variant), whatever fields it reports."""
    stamp = label(doc, name)
    lines = ["## Rollouts: rebalances and stalls during a rolling restart", "", stamp + ".", ""]
    rows = doc.get("table") or doc.get("results") or doc.get("runs") or []
    if isinstance(rows, dict):
        rows = [{"name": k, **v} for k, v in rows.items() if isinstance(v, dict)]
    numeric = [k for k in ("rebalances", "longest_gap_s", "partition_seconds_stopped", "peak_lag", "duplicates")
               if any(isinstance(r.get(k), (int, float)) for r in rows)]
    if rows and numeric:
        names = [str(r.get("name") or f"{r.get('variant', '?')} x{r.get('members', '?')}") for r in rows]
        fig, axes = plt.subplots(1, len(numeric), figsize=(3.2 * len(numeric), 3.4), squeeze=False)
        for ax, k in zip(axes[0], numeric):
            ax.barh(names, [r.get(k) or 0 for r in rows])
            ax.set_title(k.replace("_", " "), fontsize=9)
            ax.tick_params(labelsize=7)
        lines += [f"![rollout]({_save(fig, out, 'bench-rollout.png', stamp)})", "",
                  "| run | " + " | ".join(numeric) + " |", "|---|" + "---:|" * len(numeric)]
        for n, r in zip(names, rows):
            lines.append(f"| {n} | " + " | ".join(_fmt(r.get(k), "{:,.1f}" if isinstance(r.get(k), float) else "{:,}")
                                                 for k in numeric) + " |")
        lines.append("")
    for g in doc.get("goal") or []:
        if isinstance(g, dict) and "met" in g:
            lines.append(f"- {'met' if g['met'] else '**not met**'}: {g.get('members')} static members rolled with "
                         f"{g.get('rebalances')} rebalances, longest stall {g.get('longest_gap_s')} s against the "
                         f"longest restart {g.get('max_restart_s')} s")
    return lines + [""] + _goals(doc) + _findings(doc) + [""]


SECTIONS: dict[str, Callable[[dict[str, Any], Path, str], list[str]]] = {
    "runtime.json": runtime_section,
    "backpressure.json": backpressure_section,
    "scaling.json": scaling_section,
    "rollout.json": rollout_section,
    "chaos.json": chaos_section,
    "lowrate.json": lowrate_section,
    "stages.json": stages_section,
}
COMMANDS = {"runtime.json": "make bench", "backpressure.json": "make bench", "scaling.json": "make bench-scaling",
            "rollout.json": "make bench-rollout", "chaos.json": "make soak",
            "lowrate.json": "make bench-lowrate", "stages.json": "make bench-stages"}


def report(results: Path, out: Path) -> Path:
    lines = ["# Benchmarks", "",
             "Generated by `make bench-report` from `bench/results/*.json`, which the benchmarks write "
             "themselves. Each section names the machine and date of its run; the test bed shares its "
             "cores with Kafka, Redis and the control plane, so figures from a loaded machine read low.", ""]
    for fname, section in SECTIONS.items():
        path = results / fname
        if not path.exists():
            lines += [f"## {fname}", "", f"Not run yet: `{COMMANDS[fname]}` writes it.", ""]
            continue
        doc = json.loads(path.read_text())
        lines += section(doc, out, fname)
    for path in sorted(results.glob("*.json")):
        if path.name in SECTIONS:
            continue
        doc = json.loads(path.read_text())
        lines += [f"## {path.name}", "", label(doc, path.name) + ".", ""] + _goals(doc) + _findings(doc) + [""]
    md = out / "benchmarks.md"
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text("\n".join(lines).rstrip() + "\n")
    return md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--out", type=Path, default=ROOT / "docs")
    a = ap.parse_args(argv)
    md = report(a.results, a.out)
    print(f"wrote {md} and {a.out / 'img'}/bench-*.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
