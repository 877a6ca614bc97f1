"""The handler-concurrency decision: how many handler calls may run at once.

A handler that waits on a downstream (a database, an HTTP service) is fastest at the
concurrency the downstream can take, and no fixed number fits every downstream: too few
calls leave it idle, too many only queue inside it (latency grows, throughput does not).
So the limit is found the way Netflix's concurrency-limits (Vegas, Gradient) and BBR find
theirs, from latency alone:

- The latency of a window is its *fastest* successful call, as TCP Vegas takes the minimum
  RTT of each round as its actual RTT: a downstream that queues delays every call, the
  fastest included, while afc's own delays (a busy event loop, the GIL handing a thread its
  turn) add to most calls but rarely to all. A window mean would read a busy consumer as a
  busy downstream and cut concurrency that the downstream could still use.
- The *no-load latency* is the lowest window latency seen (BBR's min RTT): what a call
  costs when nothing queues. Below `NOISE_FLOOR_S` (0.5 ms) it counts as 0.5 ms, so the
  jitter of a handler that waits on nothing is not read as a queue. The limit starts low
  (`initialConcurrency`, 4) so that it is measured below the downstream's capacity, then
  grows fast (slow start) until latency rises.
- Each window compares its latency with it (`ratio`) and estimates, as Vegas does, the
  calls queued inside the downstream: `queue = n * (1 - 1 / ratio)` (n: see the cut below).
  - ratio above `latencyTolerance` (1.5) and more than `BETA` calls queued: the downstream
    queues. Cut to n * knee / ratio (at most / 4, one slow-start step), n being the limit, or
    the calls in progress when fewer ran (the limit was not in use), the *knee* being a third of the
    way from 1 to the tolerance (1.17 at 1.5): a downstream that queues beyond capacity C
    has latency about L * n / C, so this lands just above C in one step, where it is fully
    used and its latency is about 1.2 L.
  - ratio at or below the knee, or at most `ALPHA` calls queued (a latency rise at a small
    limit is noise, not a queue of ours), and the limit used: grow, x4 in slow start (until
    the first cut), then by `increaseRatio` (at least +1). Only a window that began with the
    limit in use counts (calls in progress >= 90 % of it): a window still ramping up to a
    limit just raised would measure its fastest call below it, so growth waits a window
    after each step (Vegas's slow start grows every other RTT for the same reason; x4 every
    other window is TCP's doubling per round). An unused limit is not grown: nothing tested it.
  - otherwise hold: latency between the knee and the tolerance is the price of keeping the
    downstream busy.
- Transient errors and timeouts above the bound (judged by the fetch controller, which
  knows the load-independent error baseline) halve the limit, like a drop in TCP.
- A latency cut that does not lower latency (by less than a third of the fall the cut
  predicts) shows the latency is not load: the downstream itself got slower. That latency
  becomes the new no-load latency at once and slow start begins again (the capacity is
  unknown again), so a slower but not congested downstream does not pin the limit low (Gradient2 drifts its baseline
  for the same reason; a one-off test does not ratchet it upward as a drift would).

`workers` (`FlowSettings.resolved_workers`) is only the upper bound. Mode `fixed` pins the limit at it (the behaviour
before this controller, and the benchmark's comparison).

Pure: no clock, no I/O. The loop feeds it one `ConcurrencyWindow` per flow window.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .config import FlowSettings

SLOW_START = 4                 # growth factor of a slow-start step (every other window: 2x per window)
USED = 0.9                     # a window that began with this share of the limit in progress tested it
MIN_SAMPLES = 3                # fewer completions in a window say nothing about latency
MAX_CUT = 1 / SLOW_START       # a latency cut undoes at most one slow-start step
ALPHA = 2                      # queued calls (estimated) below which the limit may still grow
BETA = 4                       # queued calls above which a latency over the tolerance is cut
NOISE_FLOOR_S = 0.0005         # latency differences this small are the process's own jitter (GC, GIL), not a queue


@dataclass(frozen=True)
class ConcurrencyWindow:
    """What the handler calls did during one window."""
    completed: int             # handler calls that returned or raised
    latency_min_s: float       # the fastest successful one (inf if none succeeded)
    running_at_start: int      # handler calls in progress when the window began
    drop: bool = False         # transient errors or timeouts above the bound


@dataclass(frozen=True)
class ConcurrencyDecision:
    limit: int
    reason: str                # "grow", "cut-latency", "cut-errors", "drain", "hold", "hold-unused", "fixed", ...
    ratio: float               # window latency / no-load latency (0 when unknown)
    baseline_ms: float         # the no-load latency (0 until measured)


class ConcurrencyLimit:
    def __init__(self, flow: FlowSettings, workers: int) -> None:
        """`workers`: the upper bound for this handler (`FlowSettings.resolved_workers`)."""
        self.flow = flow
        self.workers = workers
        self.fixed = flow.concurrency == "fixed"
        floor = min(flow.min_concurrency, workers)
        self.limit = workers if self.fixed else min(workers, flow.initial_concurrency or max(floor, 4))
        self.slow_start = True
        self.baseline_s = 0.0                            # the no-load latency; 0 until measured
        self._cut: tuple[float, float] | None = None     # (latency before, factor) of the last latency cut

    @property
    def knee(self) -> float:
        return 1.0 + (self.flow.latency_tolerance - 1.0) / 3

    def decide(self, w: ConcurrencyWindow) -> ConcurrencyDecision:
        f = self.flow
        if self.fixed:
            return ConcurrencyDecision(self.limit, "fixed", 0.0, 1000 * self.baseline_s)
        if w.completed < MIN_SAMPLES or not math.isfinite(w.latency_min_s):
            return ConcurrencyDecision(self.limit, "hold-idle", 0.0, 1000 * self.baseline_s)
        lat = w.latency_min_s
        cut, self._cut = self._cut, None
        if cut is not None and lat > cut[0] * (1 - (1 - cut[1]) / 3):
            self.baseline_s = lat              # the cut did not help: this latency is the downstream's own
            self.slow_start = True             # and its capacity is unknown again
        elif self.baseline_s <= 0 or lat < self.baseline_s:
            self.baseline_s = lat
        ratio = lat / max(self.baseline_s, NOISE_FLOOR_S)
        top = self.workers
        floor = min(f.min_concurrency, top)
        # The concurrency the window's latency belongs to: the limit when the window began with
        # it in use, else the calls then in progress (the fetch path of a loaded machine, not the
        # limit, held them lower). A cut from an unused limit lands above what runs and changes
        # nothing, and the unchanged latency then reads as a slower downstream (seen in a CI run:
        # 256 cut to 131 on a capacity of 32, and held there).
        used = w.running_at_start >= math.floor(USED * self.limit)
        basis = self.limit if used else max(1, w.running_at_start)     # (not used: below the limit)
        queue = basis * (1 - 1 / ratio) if ratio > 1 else 0.0
        if w.drop:
            self.limit = max(floor, math.floor(self.limit * f.decrease_factor))
            self.slow_start = False
            reason = "cut-errors"
        elif ratio > f.latency_tolerance and queue > BETA:
            factor = max(MAX_CUT, self.knee / ratio)
            new = max(floor, min(self.limit - 1, math.floor(basis * factor)))
            if new < self.limit:
                self._cut = (lat, factor)
            self.limit = new
            self.slow_start = False
            reason = "cut-latency"
        elif ratio <= self.knee or queue <= ALPHA:
            if used:
                step = (SLOW_START - 1) * self.limit if self.slow_start and ratio <= self.knee \
                    else max(1, math.ceil(self.limit * f.increase_ratio))
                self.limit = min(top, self.limit + step)
                reason = "grow"
            else:
                reason = "hold-unused"
        else:
            reason = "hold"
        return ConcurrencyDecision(self.limit, reason, ratio, 1000 * self.baseline_s)
