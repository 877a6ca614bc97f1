"""The runtime bench's pure logic: Redis commands per message from INFO commandstats deltas,
the goal ratios computed from a run's figures, and the baselines' own-count progress events."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))       # appended: the repo's operator/ must not shadow the stdlib's
from bench import baselines, measure  # noqa: E402
from bench import run as bench_run  # noqa: E402

pytestmark = pytest.mark.unit


def stats(**cmds: tuple[int, int]) -> dict[str, dict[str, int]]:
    return {k: {"calls": c, "usec": u} for k, (c, u) in cmds.items()}


def test_commandstats_delta_counts_every_command_in_the_window_but_the_orchestrators_info() -> None:
    before = stats(info=(10, 500), set=(100, 300), hello=(2, 10))
    after = stats(info=(12, 560), set=(1_100, 3_300), hello=(3, 15), evalsha=(4, 9_000), get=(0, 0))
    d = measure.commandstats_delta(before, after)
    assert d["redis_calls"] == 1_000 + 1 + 4 + 1      # set, hello, evalsha, the consumer's INFO; not ours
    assert list(d["redis_commands"]) == ["evalsha", "set", "info", "hello"]   # most Redis time first
    assert d["redis_commands"]["evalsha"] == {"calls": 4, "usec": 9_000, "usec_per_call": 2250.0}
    assert list(measure.commandstats_delta(before, after, top=2)["redis_commands"]) == ["evalsha", "set"]


def test_commandstats_delta_without_a_reading_says_nothing() -> None:
    assert measure.commandstats_delta(stats(set=(1, 1)), {}) == {}
    assert measure.commandstats_delta({}, stats(info=(1, 50))) == {
        "redis_calls": 0, "redis_commands": {"info": {"calls": 1, "usec": 50, "usec_per_call": 50.0}}}


def test_per_message() -> None:
    assert measure.per_message(2_001, 1_000) == 2.001
    assert measure.per_message(0, 1_000) == 0.0
    assert measure.per_message(None, 1_000) is None
    assert measure.per_message(5, 0) is None and measure.per_message(5, None) is None


def test_ratio_goal_is_computed_from_the_figures() -> None:
    g = measure.ratio_goal("a >= 0.6x b", 60_000, 100_000, 0.6)
    assert (g["value"], g["met"], g["ratio_to_target"]) == (0.6, True, 1.0)
    assert g["numerator"] == 60_000 and g["denominator"] == 100_000
    assert measure.ratio_goal("a >= 1x b", 80_093, 112_885, 1.0)["value"] == 0.71
    assert measure.ratio_goal("a >= 1x b", 80_093, 112_885, 1.0)["met"] is False
    for num, den in ((None, 5), (5, None), (5, 0), (0, 5)):
        g = measure.ratio_goal("x", num, den, 1.0)
        assert g["value"] is None and g["met"] is False and g["ratio_to_target"] is None


def test_the_run_reports_afc_against_naive_and_raw_as_goals() -> None:
    tput = {"afc": {"msgs_per_s": 90_000}, "naive": {"msgs_per_s": 100_000}, "raw": {"msgs_per_s": 150_000},
            "redis_per_message": {"msgs_per_s": 300}}
    by_goal = {g["goal"]: g for g in bench_run.goals(tput, {})}
    naive = next(g for k, g in by_goal.items() if "naive" in k)
    raw = next(g for k, g in by_goal.items() if "raw" in k)
    assert (naive["value"], naive["target"], naive["met"]) == (0.9, bench_run.GOAL_VS_NAIVE, False)
    assert (raw["value"], raw["target"], raw["met"]) == (0.6, bench_run.GOAL_VS_RAW, True)
    missing = {g["goal"]: g for g in bench_run.goals({"afc": {"msgs_per_s": 90_000}}, {})}
    assert not any(g["met"] for k, g in missing.items() if "naive" in k or "raw" in k)


def test_with_rounds_the_ratio_goals_are_the_median_of_each_rounds_ratio() -> None:
    tput = {"afc": {"msgs_per_s": 120_000}, "naive": {"msgs_per_s": 100_000}, "raw": {"msgs_per_s": 250_000}}
    rounds = {"throughput": {"afc": [{"msgs_per_s": 120_000}, {"msgs_per_s": 130_000}, {"msgs_per_s": 125_000}],
                             "naive": [{"msgs_per_s": 100_000}, {"msgs_per_s": 140_000}, {"msgs_per_s": 110_000}],
                             "raw": [{"msgs_per_s": 250_000}, {"msgs_per_s": 200_000}, {"msgs_per_s": 190_000}]}}
    by = {g["goal"]: g for g in bench_run.goals(tput, {}, rounds=rounds)}
    raw = next(g for k, g in by.items() if "raw" in k)
    naive = next(g for k, g in by.items() if "naive poll" in k)
    # per round: 0.48, 0.65, 0.658 -> median 0.65 (not the first pass's 0.48, nor the medians' ratio 0.625)
    assert raw["per_round"] == [0.48, 0.65, 0.658] and raw["value"] == 0.65 and raw["met"] is True
    assert raw["first_pass"] == 0.48 and "median of 3" in raw["basis"]
    assert naive["per_round"] == [1.2, 0.929, 1.136] and naive["value"] == 1.136 and naive["met"] is True
    # A round that failed (no rate) is left out; one usable round is not a median: the first pass stands.
    rounds["throughput"]["raw"] = [{"msgs_per_s": 250_000}, {"msgs_per_s": None}, {"msgs_per_s": None}]
    raw = next(g for g in bench_run.goals(tput, {}, rounds=rounds) if "raw" in g["goal"])
    assert raw["value"] == 0.48 and "basis" not in raw


def test_with_rounds_the_p99_over_ack_goal_is_their_median_and_every_round_must_keep_up() -> None:
    def lat(p99: float, ack: float, kept: bool = True) -> dict:
        return {"p99_ms": p99, "producer_ack_after_createtime": {"p99_ms": ack}, "kept_up": kept}
    first = lat(30.0, 20.0)
    rounds = {"latency": {"afc": [bench_run._latency_round_of(first), bench_run._latency_round_of(lat(11.5, 10.0)),
                                  bench_run._latency_round_of(lat(9.0, 8.0))]}}
    g = next(g for g in bench_run.goals({}, {"afc": first}, rounds=rounds) if "ack p99" in g["goal"])
    assert g["per_round"] == [10.0, 1.5, 1.0] and g["value"] == 1.5 and g["met"] is True and g["first_pass"] == 10.0
    rounds["latency"]["afc"][2] = bench_run._latency_round_of(lat(9.0, 8.0, kept=False))
    g = next(g for g in bench_run.goals({}, {"afc": first}, rounds=rounds) if "ack p99" in g["goal"])
    assert g["per_round"] == [10.0, 1.5] and g["met"] is False      # a round that fell behind fails the goal


def test_the_machine_budget_finding_adds_consumer_redis_and_broker_cpu_per_message() -> None:
    afc = {"committed_at_end": 1_000_000, "resources": {"cpu_s": 7.0, "redis_cpu_s": 6.0, "kafka_cpu_s": 2.0}}
    text = bench_run._machine_budget(afc, 250_000, 2)
    assert "15.0 us (consumer 7.0, Redis 6.0, broker 2.0" in text and "at most 133,333 msg/s" in text
    assert "0.6x raw (150,000 msg/s) allows at most 13.3 us" in text
    assert bench_run._machine_budget({**afc, "resources": {"cpu_s": 7.0}}, 250_000, 2) is None


def test_a_phase_waits_on_its_consumer_until_done_exited_or_out_of_budget(tmp_path) -> None:
    """Child.watch, the sampling loop of run.py's and concurrency.py's phases, on real processes."""
    ctx = SimpleNamespace(tmp=tmp_path, children=[])
    sleeper = bench_run.Child(ctx, "sleeper", [sys.executable, "-c", "import time; time.sleep(30)"], {}, False)
    try:
        calls: list[float] = []
        assert sleeper.watch(lambda t: calls.append(t) or len(calls) >= 3, time.time() + 30, 0.01) == "ok"
        assert len(calls) == 3
        assert sleeper.watch(lambda t: False, time.time() + 0.1, 0.01) == "partial: budget exhausted"
    finally:
        sleeper.stop(5)
    quitter = bench_run.Child(ctx, "quitter", [sys.executable, "-c", "raise SystemExit(3)"], {}, False)
    assert quitter.watch(lambda t: False, time.time() + 30, 0.01) == "failed: exited with 3 before finishing"


def test_variants_parse_with_the_redis_alias() -> None:
    ns = bench_run.parse_args(["--variants", "afc,afc-asyncio,afc-batch,afc-nodedup,naive,naive-tuned,naive-batch,raw,"
                                            "redis"])
    assert ns.variants == ["afc", "afc-asyncio", "afc-batch", "afc-nodedup", "naive", "naive-tuned", "naive-batch", "raw",
                           "redis_per_message"]
    assert set(ns.variants) == set(bench_run.VARIANTS)
    assert set(bench_run.VARIANTS) | set(bench_run.PHASE_VARIANTS) == set(bench_run.DESCRIPTIONS)
    assert set(bench_run.BASELINE_ARG.values()) == set(baselines.RUNNERS)


def test_progress_dates_the_idle_report_to_the_last_message(capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(baselines.time, "time", lambda: now[0])
    p = baselines.Progress()
    for t, k in ((100.05, 1_000), (100.3, 1_000), (100.35, 500)):
        now[0] = t
        p.add(k)                          # a batch: first at 100.05, progress 2000 at 100.3, 2500 too soon
    now[0] = 101.4
    p.idle()                              # caught up (an empty consume): 2500, dated to the last batch
    p.idle()                              # nothing new: no event
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(e["event"], e.get("count")) for e in events] == [("first", None), ("progress", 2_000), ("progress", 2_500)]
    assert events[1]["t"] == 100.3 and events[2]["t"] == 100.35


def test_lowrate_splits_a_process_cpu_by_thread_and_counts_it_all() -> None:
    """bench/lowrate.py's per-thread CPU (ProcSampler.cpu_by_role): the main thread is the loop,
    every thread is counted once."""
    import os
    import threading
    import time
    stop = time.process_time() + 0.3
    while time.process_time() < stop:          # the main thread burns a little CPU
        pass
    spin = threading.Thread(target=lambda: sum(range(3_000_000)))
    spin.start()
    spin.join()
    cpu = measure.ProcSampler(os.getpid()).cpu_by_role()
    assert set(cpu) == {"loop", "librdkafka", "python"}
    assert cpu["loop"] >= 0.2
    assert sum(cpu.values()) <= time.process_time() + 0.05    # nothing counted twice


def test_lowrate_counts_the_cpu_of_a_thread_that_ended_between_two_readings() -> None:
    """A handler worker that leaves mid-window still spent its CPU in the window."""
    import os
    import threading
    sampler = measure.ProcSampler(os.getpid())
    before = sampler.cpu_by_role()
    spent: list[float] = []

    def spin() -> None:
        import time
        stop = time.thread_time() + 0.3
        while time.thread_time() < stop:
            pass
        spent.append(time.thread_time())
    t = threading.Thread(target=spin)
    t.start()
    t.join()
    after = sampler.cpu_by_role()
    assert after["python"] - before["python"] >= 0.9 * spent[0]


def test_the_stall_probe_reports_how_late_a_1_ms_sleep_woke() -> None:
    """A real process of its own (nothing to stand in for): it sleeps 1 ms at a time for the
    given seconds and reports the oversleeps; a busy core here makes them later, not absent."""
    probe = measure.StallProbe(0.3)
    try:
        r = probe.result()
    finally:
        probe.stop()
    assert r["count"] >= 10                       # at most ~30 ms a round, even on a loaded machine
    assert 0 <= r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]
    assert 0 <= r["late_over_10ms"] <= r["count"]
    assert r["what"] == measure.STALLS_WHAT           # the results file says what it measured


def test_the_machine_idle_share_is_taken_between_two_readings_of_proc_stat() -> None:
    assert measure.idle_pct((100, 1000), (400, 2000)) == 30.0
    assert measure.idle_pct(None, (400, 2000)) is None and measure.idle_pct((100, 1000), (100, 1000)) is None
    now = measure.machine_cpu_times()
    assert now is not None and 0 <= now[0] <= now[1]


def test_the_consuming_window_is_afc_redis_and_broker_as_shares_of_a_core_and_the_idle_machine() -> None:
    a = {"t": 10.0, "afc": {"loop": 1.0, "python": 0.5, "librdkafka": 0.2}, "servers": {"redis": 3.0, "kafka": 1.0},
         "machine": (100, 1000)}
    b = {"t": 15.0, "afc": {"loop": 5.1, "python": 1.3, "librdkafka": 0.6}, "servers": {"redis": 6.1, "kafka": 1.1},
         "machine": (320, 2000)}
    w = bench_run.busy_window(a, b)
    assert w == {"seconds": 5.0, "machine_idle_pct": 22.0,
                 "cpu_pct_of_a_core": {"loop_thread": 82.0, "python_threads": 16.0, "librdkafka_threads": 8.0,
                                       "redis": 62.0, "kafka": 2.0}}
    assert bench_run.busy_window(a, {**b, "t": 10.0}) is None
    text = bench_run._loop_share("afc", {"consuming_window": w})
    assert "event loop's thread used 82.0% of a core" in text and "Redis 62.0%, the broker 2.0%" in text
    assert text.endswith("the machine's cores were 22.0% idle.")
    assert bench_run._loop_share("afc", {}) is None


def test_afc_without_deduplication_is_an_informational_comparison() -> None:
    tput = {"afc": {"msgs_per_s": 150_000}, "afc-nodedup": {"msgs_per_s": 240_000}}
    g = next(g for g in bench_run.goals(tput, {}) if "without deduplication" in g["goal"])
    assert g["value"] == 0.625 and g["informational"] is True
    assert not any("without deduplication" in g["goal"] for g in bench_run.goals({"afc": {"msgs_per_s": 1}}, {}))
