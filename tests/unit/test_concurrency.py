"""The handler-concurrency limit against a downstream of known capacity, window by window,
and the dispatchers running at most that many handler calls.

The downstream is the bench's model without its noise: calls take L while at most C run at
once, L * n / C beyond (a queue in front of C servers). Each window the limit is fully used
(a backlog waits), so n = limit; every call of the window, the fastest included, takes that.
"""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from afc.runtime.concurrency import ConcurrencyLimit, ConcurrencyWindow
from afc.runtime.config import FlowSettings
from afc.runtime.dispatch import Outcome, TaskDispatcher, ThreadDispatcher
from afc.runtime.message import Message

pytestmark = pytest.mark.unit


def flow(**kw) -> FlowSettings:
    return FlowSettings(**{"workers": 1024, **kw})


def make(**kw) -> ConcurrencyLimit:
    f = flow(**kw)
    return ConcurrencyLimit(f, f.resolved_workers(True))


def latency(n: int, L: float, C: int) -> float:
    return L * max(1.0, n / C)


def window(n: int, L: float, C: int, *, drop: bool = False, running: int | None = None,
           calls: int = 100) -> ConcurrencyWindow:
    return ConcurrencyWindow(completed=calls, latency_min_s=latency(n, L, C),
                             running_at_start=n if running is None else running, drop=drop)


def run(c: ConcurrencyLimit, steps: int, L: float, C: int) -> list[int]:
    """Each window begins at the concurrency of the one before (the calls in progress) and
    reaches the current limit during it; its fastest call is at the lower of the two."""
    out = []
    before = c.limit
    for _ in range(steps):
        n = c.limit
        c.decide(window(min(before, n), L, C, running=before))
        before = n
        out.append(c.limit)
    return out


@pytest.mark.parametrize("C", [8, 64, 300])
def test_finds_the_capacity_and_keeps_latency_within_the_tolerance(C: int) -> None:
    c = make()
    L = 0.005
    limits = run(c, 15, L, C)
    assert C <= limits[-1] <= 1.5 * C, limits                   # found within 15 windows
    later = run(c, 200, L, C)
    # It keeps probing around C: never far below (throughput), never far above (latency).
    assert min(later) >= 0.6 * C and max(later) <= 1.5 * C, (min(later), max(later))
    mean_tput = sum(n / latency(n, L, C) for n in later) / len(later)      # Little: calls/s
    assert mean_tput >= 0.95 * C / L
    assert max(latency(n, L, C) for n in later) <= 1.5 * L      # within the tolerance of the no-load latency


def test_backs_off_when_the_downstream_slows_and_recovers_when_it_is_back() -> None:
    c = make()
    L = 0.005
    run(c, 40, L, 64)
    assert c.limit >= 60
    slow = run(c, 6, L, 16)                                      # another tenant took 3/4 of it
    assert slow[-1] <= 1.5 * 16, slow
    settled = run(c, 100, L, 16)
    assert max(settled) <= 24 and min(settled) >= 10
    back = run(c, 30, L, 64)
    assert back[-1] >= 56, back                                   # additive growth finds it again


def test_a_downstream_slower_but_not_congested_does_not_pin_the_limit_at_the_floor() -> None:
    """Its latency rose 4x at every concurrency: cutting does not lower it, so it becomes
    the new no-load latency instead of a reason to cut to 1."""
    c = make()
    run(c, 40, 0.005, 64)
    run(c, 3, 0.020, 64)
    assert c.limit >= 16
    limits = run(c, 60, 0.020, 64)
    assert limits[-1] >= 56 and abs(c.baseline_s - 0.020) < 1e-9


def run_supplied(c: ConcurrencyLimit, steps: int, L: float, C: int, supply: int) -> list[int]:
    """`run`, with at most `supply` calls in progress whatever the limit: the fetch path of a
    loaded machine, not the limit, holds the concurrency."""
    out = []
    before = min(c.limit, supply)
    for _ in range(steps):
        n = min(c.limit, supply)
        c.decide(window(min(before, n), L, C, running=before))
        before = n
        out.append(c.limit)
    return out


def test_a_limit_above_what_runs_is_cut_from_what_runs() -> None:
    """CI, 2026-11-28: slow start went 4 -> 16 -> 64 -> 256 on a downstream of capacity 32 while a
    loaded machine kept fewer calls going than the limit (70 here). The cut from 256 landed at
    131, still above what ran, so latency did not move, the unchanged latency was read as a
    slower downstream (the no-load latency reset to it), and 131 held with the downstream
    queueing. The cut must start from the calls that ran."""
    L, C = 0.005, 32
    c = make(workers=256)                             # the trace: the limit at 256, 70 calls running
    c.limit, c.baseline_s = 256, L
    limits = run_supplied(c, 30, L, C, supply=70)
    assert limits[0] < 70, limits                     # cut below what ran, in one step
    assert all(n <= 1.5 * C for n in limits[3:]), limits
    assert c.baseline_s == pytest.approx(L), "a cut that lowered latency is not a slower downstream"
    assert latency(min(limits[-1], 70), L, C) <= 1.5 * L


def test_errors_above_the_bound_halve_it() -> None:
    c = make(initial_concurrency=40)
    d = c.decide(window(40, 0.005, 1000, drop=True))
    assert (d.limit, d.reason) == (20, "cut-errors")
    d = c.decide(window(20, 0.005, 1000))
    assert (d.limit, d.reason) == (22, "grow")                   # slow start is over: +10 %


def test_an_unused_limit_does_not_grow_and_a_quiet_window_holds() -> None:
    c = make(initial_concurrency=32)
    d = c.decide(window(32, 0.005, 1000, running=10))
    assert (d.limit, d.reason) == (32, "hold-unused")
    d = c.decide(ConcurrencyWindow(completed=1, latency_min_s=1.0, running_at_start=32))
    assert (d.limit, d.reason) == (32, "hold-idle")
    d = c.decide(ConcurrencyWindow(completed=50, latency_min_s=float("inf"), running_at_start=32))   # all failed
    assert (d.limit, d.reason) == (32, "hold-idle")


def test_the_upper_bound_and_the_floor_hold() -> None:
    c = make(workers=48)
    assert max(run(c, 20, 0.005, 1000)) == 48
    c = make(workers=48, min_concurrency=4, initial_concurrency=8)
    c.decide(window(8, 0.005, 1000))
    for _ in range(10):
        c.decide(window(c.limit, 0.005, 1000, drop=True))
    assert c.limit == 4


def test_fixed_mode_is_always_workers() -> None:
    c = make(workers=64, concurrency="fixed")
    assert c.limit == 64
    assert c.decide(window(64, 0.5, 1, drop=True)).limit == 64


def test_workers_0_is_256_for_async_handlers_and_64_threads_for_sync_ones() -> None:
    f = FlowSettings()
    assert (f.workers, f.resolved_workers(True), f.resolved_workers(False)) == (0, 256, 64)
    assert FlowSettings(workers=8).resolved_workers(False) == 8
    c = ConcurrencyLimit(f, f.resolved_workers(False))
    assert max(run(c, 30, 0.005, 10_000)) == 64


def test_the_noload_latency_is_the_lowest_window_mean_and_only_a_failed_cut_raises_it() -> None:
    c = make(initial_concurrency=40)
    c.decide(window(40, 0.005, 1000, running=0))
    for _ in range(200):                                         # a standing 1.1x never becomes "no load"
        c.decide(window(40, 0.0055, 1000, running=0))
    assert c.baseline_s == pytest.approx(0.005)
    d = c.decide(window(40, 0.010, 1000))                        # 2x with 20 calls queued: cut...
    assert (d.limit, d.reason) == (23, "cut-latency")
    c.decide(window(23, 0.010, 1000))                            # ...and latency did not move
    assert c.baseline_s == pytest.approx(0.010)


def test_a_latency_rise_at_a_small_limit_is_not_a_queue() -> None:
    c = make(initial_concurrency=2)
    c.decide(window(2, 0.001, 1000, running=0))
    d = c.decide(window(2, 0.0019, 1000))                        # 1.9x, but at most 2 calls could queue
    assert (d.limit, d.reason) == (3, "grow")                     # +1: not x4, latency did rise


def test_slow_start_finds_the_capacity_from_the_default_start() -> None:
    c = make(workers=256)
    assert c.limit == 4
    limits = run(c, 8, 0.005, 256)
    # x4 every other window: the window after a step still ramps up to it.
    assert limits == [16, 16, 64, 64, 256, 256, 256, 256]


# ------------------------------------------------------------------ the dispatcher applies it
# Handlers block on events, so "how many run at once" is read at a point where nothing moves.

def _msg(offset: int, key: bytes | None) -> Message:
    m = Message("t", 0, offset, key, b"{}", None, int(time.time() * 1000), {}, None, f"id-{offset}")
    m.claimed = True
    return m


class Gauge:
    """Handler calls in progress, and the most at once (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.peak = 0
        self.order: list[tuple[bytes | None, int]] = []

    def enter(self, m: Message) -> None:
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
            self.order.append((m.key, m.offset))

    def leave(self) -> None:
        with self.lock:
            self.now -= 1


def _spin(loop: asyncio.AbstractEventLoop, until, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not until():
        loop.run_until_complete(asyncio.sleep(0.01))
    assert until()


def test_threads_run_at_most_the_limit_grow_with_it_and_leave_when_it_falls() -> None:
    g, gate, got = Gauge(), threading.Event(), []

    def handler(m: Message) -> None:
        g.enter(m)
        gate.wait(10)
        g.leave()

    loop = asyncio.new_event_loop()
    d = ThreadDispatcher(handler, 16, loop, got.extend, 0.0, 10.0, 4)
    try:
        d.set_limit(3)
        d.submit([_msg(i, b"k%d" % i) for i in range(12)])
        _spin(loop, lambda: g.now == 3)
        time.sleep(0.1)
        assert (g.now, g.peak, len(d.workers)) == (3, 3, 3)      # nine wait for a slot
        d.set_limit(6)
        _spin(loop, lambda: g.now == 6)
        d.set_limit(2)
        gate.set()
        _spin(loop, lambda: len(got) == 12)
        _spin(loop, lambda: sum(1 for w in d.workers if w.thread.is_alive()) == 2)   # four left between chunks
        assert d._live == 2
        gate.clear()
        g.peak = 0
        d.submit([_msg(100 + i, b"j%d" % i) for i in range(6)])
        _spin(loop, lambda: g.now == 2)
        time.sleep(0.1)
        assert g.peak == 2
        gate.set()
        _spin(loop, lambda: len(got) == 18)
    finally:
        gate.set()
        loop.run_until_complete(d.close(1))
        loop.close()


def test_tasks_run_at_most_the_limit_and_keep_each_keys_order() -> None:
    async def main() -> None:
        g, gate, got = Gauge(), asyncio.Event(), []

        async def handler(m: Message) -> None:
            g.enter(m)
            await gate.wait()
            g.leave()

        d = TaskDispatcher(handler, 64, asyncio.get_running_loop(), got.extend, 0.0, 10.0, 4)
        d.set_limit(4)
        msgs = [_msg(i, b"k%d" % (i % 5)) for i in range(40)]     # 5 keys, 8 records each
        d.submit(msgs)
        for _ in range(20):
            await asyncio.sleep(0)
        assert (g.now, g.peak) == (4, 4)
        d.set_limit(10)
        for _ in range(20):
            await asyncio.sleep(0)
        assert g.now == 5                        # one worker per key at most: 5 keys
        d.set_limit(1)
        gate.set()
        for _ in range(200):
            await asyncio.sleep(0)
            if len(got) == 40:
                break
        assert len(got) == 40 and all(r[1] is Outcome.OK for r in got)
        for k in {m.key for m in msgs}:
            offs = [o for key, o in g.order if key == k]
            assert offs == sorted(offs)
        assert d._live == 0
        await d.close(1)

    asyncio.run(main())


def test_jitter_of_a_handler_that_waits_on_nothing_is_not_a_queue() -> None:
    c = make(initial_concurrency=16)
    c.decide(window(16, 0.00001, 1000, running=0))               # 10 us: a noop handler
    d = c.decide(window(16, 0.00004, 1000))                      # 4x, but 40 us
    assert d.reason == "grow"
    d = c.decide(window(64, 0.002, 1000))                        # 2 ms is a queue
    assert d.reason == "cut-latency"


def test_a_stuck_call_does_not_hold_the_only_slot() -> None:
    """The limit fell to 1 while one call hangs: other keys must still run (test_core_stalls)."""
    release, started, got = threading.Event(), threading.Event(), []

    def handler(m: Message) -> None:
        if m.offset == 0:
            started.set()
            release.wait(10)

    loop = asyncio.new_event_loop()
    d = ThreadDispatcher(handler, 8, loop, got.extend, 0.0, 0.05, 4)
    try:
        d.set_limit(1)
        d.submit([_msg(0, b"a")])
        assert started.wait(5)
        d.submit([_msg(1, b"b")])
        time.sleep(0.2)
        assert got == []                          # the only slot is taken...
        d.watchdog()                              # ...until the watchdog sees the call is stuck
        _spin(loop, lambda: [r[0].offset for r in got] == [1])
        assert d.stuck == 1 and d.allowed == 2
        release.set()
        _spin(loop, lambda: len(got) == 2)
        d.watchdog()
        assert (d.stuck, d.allowed) == (0, 1)
    finally:
        release.set()
        loop.run_until_complete(d.close(1))
        loop.close()


@pytest.mark.parametrize("kind", [ThreadDispatcher, TaskDispatcher])
def test_a_handled_record_is_not_kept_by_the_dispatcher(kind) -> None:
    """Issue 9: the thread dispatcher kept every chunk it ever ran (its take-back list was only
    pruned on a revoke), so a sync handler's consumer held every record it had handled: 400k
    records of `make bench` grew its RSS from 150 to 685 MiB, and a long run would end OOM."""
    import gc

    async def ahandler(m: Message) -> None:
        return None

    got: list = []
    loop = asyncio.new_event_loop()
    h = ahandler if kind is TaskDispatcher else (lambda m: None)
    d = kind(h, 8, loop, got.extend, 0.0, 10.0, 4)
    try:
        d.set_limit(4)
        for b in range(50):
            d.submit([_msg(b * 100 + i, b"k%d" % i) for i in range(100)])
            _spin(loop, lambda: len(got) == (b + 1) * 100)
        got.clear()
        gc.collect()
        alive = sum(1 for o in gc.get_objects() if isinstance(o, Message) and o.topic == "t")
        assert alive <= 200, f"{alive} of 5,000 handled records still referenced"   # at most the last chunks
        assert not d.take_back(lambda m: False)                   # and none of them would be taken back
    finally:
        loop.run_until_complete(d.close(1))
        loop.close()


@pytest.mark.parametrize("kind,most", [("computes", 2), ("waits", 16)])
def test_sync_handler_threads_are_capped_by_the_handlers_cpu_share(kind: str, most: int) -> None:
    """A sync call holds the GIL while it computes: a handler that only computes gets about
    one thread (more would only trade the GIL), one that waits on I/O keeps all it may have."""
    def handler(m: Message) -> None:
        if kind == "computes":
            end = time.thread_time() + 0.0002
            while time.thread_time() < end:
                pass
        else:
            time.sleep(0.002)

    got: list = []
    loop = asyncio.new_event_loop()
    d = ThreadDispatcher(handler, 16, loop, got.extend, 0.0, 10.0, 4)
    try:
        d.set_limit(16)
        n = 0
        for b in range(8):
            d.submit([_msg(b * 100 + i, b"k%d" % i) for i in range(100)])
            n += 100
            _spin(loop, lambda: len(got) == n, timeout=20)
            d.tune(0.0002, 100)
        assert d.gil_cap <= most and (kind == "computes" or d.gil_cap == 16), d.gil_cap
        assert d.allowed == min(d.limit, d.gil_cap) + d.stuck
    finally:
        loop.run_until_complete(d.close(1))
        loop.close()
