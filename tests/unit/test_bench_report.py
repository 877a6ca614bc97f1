"""`make bench-report`: every results file becomes a labelled section with its plot."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import report  # noqa: E402

pytestmark = pytest.mark.unit


def test_the_checked_in_results_become_a_report_with_plots(tmp_path: Path) -> None:
    results = tmp_path / "results"
    shutil.copytree(ROOT / "bench" / "results", results)
    md = report.report(results, tmp_path / "docs").read_text()
    for fname in ("runtime.json", "backpressure.json", "scaling.json", "chaos.json"):
        doc = json.loads((results / fname).read_text())
        assert report.label(doc, fname) in md              # machine and date beside the figures
    for png in ("bench-throughput.png", "bench-latency.png", "bench-backpressure.png", "bench-scaling.png"):
        assert (tmp_path / "docs" / "img" / png).stat().st_size > 10_000
        assert f"](img/{png})" in md
    runtime = json.loads((results / "runtime.json").read_text())
    assert f"| afc | {runtime['throughput']['afc']['msgs_per_s']:,} |" in md


def test_a_missing_file_is_named_and_an_unknown_one_is_listed(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "new.json").write_text(json.dumps({"date": "2026-01-01T00:00:00Z", "findings": ["x went 1 -> 2"],
                                                  "environment": {"machine": {"nproc": 2, "cpu_model": "c"}}}))
    md = report.report(results, tmp_path / "docs").read_text()
    assert "Not run yet: `make bench` writes it." in md
    assert "Not run yet: `make bench-rollout` writes it." in md
    assert "## new.json" in md and "- x went 1 -> 2" in md and "ran 2026-01-01T00:00:00Z, on 2 cores (c)" in md


def test_every_throughput_variant_gets_a_row_with_cpu_rss_and_redis_commands(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    row = {"status": "ok", "cpu_us_per_message": 4.6, "cpu_cores_avg": 0.5, "redis_commands_per_message": 3.002,
           "resources": {"cpu_s": 0.93, "peak_rss_mib": 88.5}}
    tput = {v: {**row, "msgs_per_s": r} for v, r in (("afc", 48_341), ("naive", 115_022), ("naive-batch", 133_538),
                                                      ("raw", 814_595), ("redis_per_message", 143))}
    goals = [{"goal": "afc >= 0.6x the raw consume() loop", "target": 0.6, "value": 0.059, "met": False}]
    (results / "runtime.json").write_text(json.dumps({"date": "2026-01-01T00:00:00Z", "throughput": tput,
                                                      "goals": goals}))
    md = report.report(results, tmp_path / "docs").read_text()
    for v, t in tput.items():
        assert f"| {v} | {t['msgs_per_s']:,} | 0.93 | 4.6 | 0.50 | 88.5 | 3.002 | ok |" in md
    assert "- **not met**: afc >= 0.6x the raw consume() loop (value 0.059, target 0.6)" in md


def test_the_rounds_get_a_table_and_the_goal_names_its_basis(tmp_path: Path) -> None:
    tput = {"afc": {"msgs_per_s": 120_000}, "raw": {"msgs_per_s": 250_000}}
    rounds = {"throughput": {"afc": [{"msgs_per_s": 120_000}, {"msgs_per_s": 130_000}],
                             "raw": [{"msgs_per_s": 250_000}, {"msgs_per_s": 200_000}]},
              "latency": {"afc": [{"p99_ms": 30.0, "ack_p99_ms": 20.0, "over_ack_ms": 10.0, "after_ack_p99_ms": 12.0,
                                   "stall_max_ms": 9.5}]}}
    goals = [{"goal": "afc >= 0.6x the raw consume() loop", "target": 0.6, "value": 0.565, "met": False,
              "basis": "median of 2 rounds' ratios", "per_round": [0.48, 0.65]}]
    lat = {"afc": {"p99_ms": 30.0, "after_producer_ack": {"p50_ms": 1.0, "p99_ms": 12.0}}}
    md = "\n".join(report.runtime_section({"date": "2026-01-01T00:00:00Z", "throughput": tput, "latency": lat,
                                           "rounds": rounds, "goals": goals}, tmp_path, "runtime.json"))
    assert "| afc | 120,000 | 130,000 |" in md and "| raw | 250,000 | 200,000 |" in md
    assert "| 1 | 30.0 | 20.0 | +10.0 | 12.0 | 9.5 |" in md
    assert ("- **not met**: afc >= 0.6x the raw consume() loop (value 0.565, target 0.6; median of 2 rounds' "
            "ratios: 0.48, 0.65)") in md


def test_the_lowrate_run_gets_a_row_per_variant_and_rate_with_its_cpu_by_thread(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    rate = {"rate": 5000.0, "msgs_per_s": 4998.2, "msgs_per_store_call": 6.53, "cpu_us_per_msg": 118.4,
            "cpu_pct": {"loop": 38.9, "librdkafka": 11.2, "python": 9.1, "total": 59.2}}
    (results / "lowrate.json").write_text(json.dumps({"date": "2026-01-01T00:00:00Z", "variants": {
        "afc": {"rates": [rate]}, "afc-fetchwait": {"rates": [{**rate, "msgs_per_store_call": 10.04}]}}}))
    md = report.report(results, tmp_path / "docs").read_text()
    assert "| afc | 5,000 | 4,998 | 6.5 | 118.4 | 59.2 | 38.9 | 11.2 | 9.1 |" in md
    assert "| afc-fetchwait | 5,000 | 4,998 | 10.0 | 118.4 |" in md


def test_the_stages_run_gets_a_row_per_run_and_a_failed_one_says_why(tmp_path: Path) -> None:
    step = {"p50_ms": 0.5, "p99_ms": 3.0}
    doc = {"date": "2026-11-27T20:00:00Z", "runs": [
        {"rate": 5000.0, "fetch_linger_ms": 1.0, "event_loop": "uvloop", "round": 0, "records_per_store_call": 14.0,
         "cpu_us_per_record": 91.2,
         "steps": {s: step for s in ("fetched->loop", "loop->submitted", "submitted->handler", "fetched->handler")},
         "store_call": {"p50_ms": 0.68, "p99_ms": 8.3}, "scheduler_stalls": {"max_ms": 13.2}},
        {"rate": 500.0, "fetch_linger_ms": 0.0, "round": 1, "error": "Traceback: broker down"}]}
    lines = report.stages_section(doc, tmp_path, "stages.json")
    rows = [x for x in lines if x.startswith("| ") and not x.startswith("| msg/s")]
    assert rows[0].startswith("| 5,000 | 1 | uvloop | 0 | 14.0 | 91 | 0.50 / 3.0 |") and rows[0].endswith("| 0.68 / 8.3 | 13.2 |")
    assert "failed" in rows[1] and "broker down" in rows[1] and "| asyncio |" in rows[1]   # (runs before the loop choice)
    i = next(i for i, x in enumerate(lines) if x.startswith("| msg/s"))
    assert lines[i].count("|") == lines[i + 1].count("|") == rows[0].count("|")   # a table that renders
    assert not any("claim step" in x for x in lines)            # runs from before the split: no second table


def test_the_stages_claim_split_and_gc_pauses_get_a_table_of_their_own(tmp_path: Path) -> None:
    names = ("fetched->loop", "loop->submitted", "submitted->handler", "fetched->handler", "loop->sent",
             "sent->answered", "answered->submitted")
    run = {"rate": 5000.0, "fetch_linger_ms": 1.0, "round": 0, "records_per_store_call": 14.0,
           "steps": {s: {"p50_ms": 0.25 * (i + 1), "p99_ms": 2.0 * (i + 1)} for i, s in enumerate(names)},
           "store_call": {"p50_ms": 0.7, "p99_ms": 5.3}, "gc_pauses": {"gen0": {"count": 1, "max_ms": 10.36}}}
    lines = report.stages_section({"date": "2026-11-28T03:00:00Z", "runs": [run, {**run, "round": 1, "gc_pauses": {}}]},
                                  tmp_path, "stages.json")
    i = next(i for i, x in enumerate(lines) if x.startswith("| msg/s | linger ms | loop | round | loop->sent"))
    assert lines[i + 2] == "| 5,000 | 1 | asyncio | 0 | 1.25 / 10.0 | 1.50 / 12.0 | 1.75 / 14.0 | gen0: 1, 10.4 |"
    assert lines[i + 3].endswith("| none |")
    assert lines[i].count("|") == lines[i + 1].count("|") == lines[i + 2].count("|")
