from afc.runtime.config import FlowSettings
from afc.runtime.fetch_control import FetchController, WindowStats


def flow(**kw) -> FlowSettings:
    base = dict(min_inflight=2, max_inflight=1000, initial_inflight=100, max_batch=500,
                target_latency_ms=50, max_error_rate=0.2, decrease_factor=0.5, increase_ratio=0.1)
    return FlowSettings(**{**base, **kw})


def healthy(limit: int, n: int = 100) -> WindowStats:
    return WindowStats(completed=n, errors=0, latency_sum_s=n * 0.001, peak_outstanding=limit)


def test_slow_start_doubles_until_the_first_overload_then_grows_additively() -> None:
    c = FetchController(flow())
    assert c.decide(healthy(100)).inflight_limit == 200
    assert c.decide(healthy(200)).inflight_limit == 400
    slow = WindowStats(completed=10, errors=0, latency_sum_s=10 * 0.3, peak_outstanding=400)
    d = c.decide(slow)
    assert (d.inflight_limit, d.reason) == (200, "overload-latency")
    assert c.decide(healthy(200)).inflight_limit == 220          # +10%, no more doubling


def test_latency_above_target_cuts_to_the_floor_and_not_below() -> None:
    c = FetchController(flow())
    slow = WindowStats(completed=4, errors=0, latency_sum_s=4 * 0.3, peak_outstanding=100)
    limits = [c.decide(slow).inflight_limit for _ in range(10)]
    assert limits[:3] == [50, 25, 12]
    assert limits[-1] == 2 and c.at_floor
    assert c.fetch_budget(outstanding=2) == 0                    # saturated: pause and only poll


def test_error_rate_above_bound_cuts() -> None:
    c = FetchController(flow())
    d = c.decide(WindowStats(completed=100, errors=30, latency_sum_s=0.1, peak_outstanding=100))
    assert (d.inflight_limit, d.reason) == (50, "overload-errors")
    d = c.decide(WindowStats(completed=100, errors=10, latency_sum_s=0.1, peak_outstanding=50))
    assert d.reason == "grow"


def test_growth_stops_at_the_ceiling_and_batch_is_bounded() -> None:
    c = FetchController(flow(max_inflight=300))
    for _ in range(10):
        d = c.decide(healthy(c.limit))
    assert d.inflight_limit == 300
    assert d.batch_size == 300
    c2 = FetchController(flow(max_inflight=5000, max_batch=500))
    for _ in range(10):
        d = c2.decide(healthy(c2.limit))
    assert d.batch_size == 500


def test_unused_limit_does_not_grow() -> None:
    c = FetchController(flow())
    d = c.decide(WindowStats(completed=5, errors=0, latency_sum_s=0.005, peak_outstanding=3))
    assert (d.inflight_limit, d.reason) == (100, "hold")
    d = c.decide(WindowStats(completed=0, errors=0, latency_sum_s=0, peak_outstanding=0))
    assert (d.inflight_limit, d.reason) == (100, "hold-idle")


def test_budget_is_room_left_capped_by_batch() -> None:
    c = FetchController(flow(initial_inflight=800))
    assert c.fetch_budget(0) == 500
    assert c.fetch_budget(600, starved=False) == 200
    assert c.fetch_budget(700, starved=False) == 0     # work queued, a few free slots: wait for a quarter
    assert c.fetch_budget(700, starved=True) == 100    # the handler would idle: fetch what fits
    assert c.fetch_budget(800) == 0
    small = FetchController(flow(initial_inflight=3))
    assert small.fetch_budget(2, starved=False) == 1   # a limit of a few: every free slot counts


def test_queueing_in_the_lanes_stops_growth() -> None:
    """Messages waiting longer than a handler call: the lanes are the bottleneck, hold."""
    c = FetchController(flow())
    d = c.decide(WindowStats(completed=100, errors=0, latency_sum_s=0.1, peak_outstanding=100,
                             queue_wait_sum_s=100 * 0.05))
    assert (d.inflight_limit, d.reason) == (100, "hold-queued")
    d = c.decide(WindowStats(completed=100, errors=0, latency_sum_s=0.1, peak_outstanding=100,
                             queue_wait_sum_s=100 * 0.0005))
    assert d.reason == "grow"


def test_pause_rules() -> None:
    from afc.runtime.fetch_control import should_pause
    base = dict(paused=False, outstanding=10, limit=10, overloaded=False, store_down=False, saturated_for_s=0.0)
    assert not should_pause(**base)                                       # momentary saturation waits
    assert should_pause(**{**base, "saturated_for_s": 0.6})               # lasting saturation pauses
    assert should_pause(**{**base, "store_down": True, "outstanding": 0})
    assert should_pause(**{**base, "overloaded": True, "outstanding": 6})  # overloaded: paused above half
    assert not should_pause(**{**base, "overloaded": True, "outstanding": 5})  # top up to half
    assert should_pause(**{**base, "paused": True, "outstanding": 7})     # hysteresis
    assert not should_pause(**{**base, "paused": True, "outstanding": 4})


def errors(limit: int, rate: float, n: int = 100) -> WindowStats:
    return WindowStats(completed=n, errors=int(n * rate), latency_sum_s=n * 0.001, peak_outstanding=limit)


def test_errors_that_do_not_respond_to_load_stop_cutting_and_the_limit_recovers() -> None:
    """Issue 9 item 1: every first attempt fails (50 % transient errors whatever the load).
    The old controller cut to the floor of 1 and stayed there; now one cut, then growth."""
    c = FetchController(flow())
    assert c.decide(errors(100, 0.5)).inflight_limit == 50            # first: looks like overload
    d = c.decide(errors(50, 0.5))                                      # cutting did not help
    assert d.reason == "grow" and c.error_baseline == 0.5
    limits = [c.decide(errors(c.limit, 0.5)).inflight_limit for _ in range(10)]
    assert limits == sorted(limits) and limits[-1] > 100               # recovers past where it started
    assert not c.overloaded


def test_errors_that_fall_when_cut_keep_being_cut_and_the_baseline_follows_them_down() -> None:
    c = FetchController(flow())
    c.decide(errors(100, 0.5))
    c.decide(errors(50, 0.5))                                           # baseline 0.5
    assert c.decide(errors(100, 0.1)).reason == "grow" and c.error_baseline == 0.1
    d = c.decide(errors(110, 0.6))                                      # load-related errors again
    assert d.reason == "overload-errors"
    assert c.decide(errors(55, 0.2)).reason == "grow"                  # the cut helped: no new baseline
    assert c.error_baseline == 0.1


def test_the_buffer_keeps_twice_the_concurrency_limit_unless_overloaded() -> None:
    c = FetchController(flow())
    queued = WindowStats(completed=100, errors=0, latency_sum_s=0.5, peak_outstanding=100, queue_wait_sum_s=5.0,
                         concurrency_limit=300)
    d = c.decide(queued)                        # queued: would hold, but 300 calls need a buffer of 600
    assert (d.inflight_limit, d.reason) == (600, "follow-concurrency")
    slow = WindowStats(completed=10, errors=0, latency_sum_s=10 * 0.3, peak_outstanding=600, concurrency_limit=300)
    d = c.decide(slow)                          # over target: the cut wins
    assert (d.inflight_limit, d.reason) == (300, "overload-latency")
    assert c.decide(slow).inflight_limit == 150



def test_slow_start_steps_early_once_a_whole_limit_completed_within_target() -> None:
    c = FetchController(flow())
    assert c.early(healthy(100, n=99)) is None                   # not a round trip of the limit yet
    d = c.early(healthy(100, n=100))
    assert d is not None and (d.inflight_limit, d.reason) == (200, "grow-early")
    assert c.early(healthy(200, n=400)).inflight_limit == 400
    assert c.early(healthy(400, n=800)).inflight_limit == 800
    assert c.early(healthy(800, n=900)).inflight_limit == 1000   # the ceiling
    assert c.early(healthy(1000, n=5000)) is None


def test_no_early_step_when_over_target_erroring_queued_unused_or_past_slow_start() -> None:
    slow = WindowStats(completed=100, errors=0, latency_sum_s=100 * 0.3, peak_outstanding=100)
    failing = WindowStats(completed=100, errors=50, latency_sum_s=0.1, peak_outstanding=100)
    queued = WindowStats(completed=100, errors=0, latency_sum_s=0.1, peak_outstanding=100, queue_wait_sum_s=100 * 0.02)
    unused = WindowStats(completed=100, errors=0, latency_sum_s=0.1, peak_outstanding=40)
    for w in (slow, failing, queued, unused):
        c = FetchController(flow())
        assert c.early(w) is None and c.limit == 100, w
    c = FetchController(flow())
    c.decide(slow)                                               # the first overload ends slow start
    assert not c.slow_start and c.early(healthy(c.limit, n=10_000)) is None
