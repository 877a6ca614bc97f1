"""The adaptive fetch decision: how many messages may be in flight and how many to fetch.

Loss-based AIMD (as in Netflix concurrency-limits): once per window, if the handler's mean
latency is above target or its error rate above the bound, the in-flight limit is cut by
`decrease_factor`; otherwise it grows by `increase_ratio` of itself (at least +1), or doubles
while in slow start (from the start until the first overload, as TCP does). Growth
happens only when the limit was actually used, so an idle consumer does not inflate a limit
it never tested, and only while messages wait in their lanes less than a handler call takes:
queueing means the lanes are the bottleneck, and a larger limit would only buffer more
(bufferbloat) and leave more to drain when the downstream slows (as CoDel judges a queue by
its sojourn time, not its length). The limit bounds messages fetched but not finished, so it bounds memory
too; when it is reached, the loop pauses its partitions and keeps polling.

Errors that do not respond to load (every first attempt fails, bad luck of the data) must
not pin the limit at its floor: after a cut for errors, if the next window's error rate did
not fall by a quarter, that rate is taken as the load-independent *baseline*, and only
errors above baseline + maxErrorRate count as overload. The baseline follows the error
rate down at once, so errors that do respond to load are cut again.

The buffer serves the handler-concurrency limit (concurrency.py): while not overloaded it
never falls below twice that limit (`WindowStats.concurrency_limit`), so one fetch's worth can
be claimed while the previous runs and the calls the downstream can take are never starved by
a buffer still growing (a limit of messages waiting for a free call slot reads as `queued`,
which holds growth here). Overloaded (latency over target, errors), the cut wins.

Pure: no clock, no I/O. The loop feeds it one `WindowStats` per window.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .config import FlowSettings


QUEUED_FLOOR_S = 0.005   # a wait below this is no queue: CoDel's target, and the GIL's switch interval

REFILL_AT = 4          # fetch once 1/REFILL_AT of the in-flight limit is free (not for every freed slot)


@dataclass(frozen=True)
class WindowStats:
    """What the handler did during one window."""
    completed: int          # messages whose handler returned or raised
    errors: int             # of which failed transiently (bad data does not count)
    latency_sum_s: float    # total handler time of `completed`
    peak_outstanding: int   # most messages fetched-but-unfinished at any time in the window
    queue_wait_sum_s: float = 0.0   # total time `completed` messages waited in their lanes
    concurrency_limit: int = 0      # the handler-concurrency limit: the buffer keeps twice that

    @property
    def mean_latency_ms(self) -> float:
        return 1000.0 * self.latency_sum_s / self.completed if self.completed else 0.0

    @property
    def queued(self) -> bool:
        """Did messages wait longer in their lanes than the handler took (at least 5 ms)?

        A sojourn under 5 ms is no standing queue (CoDel's target), and in a process whose
        loop is busy a worker thread waits that long for the GIL anyway (`sys.getswitchinterval`):
        a 1 ms floor read every fast handler in a busy process as queued and held the buffer
        at twice the concurrency limit, so fetches shrank to its slack."""
        if not self.completed:
            return False
        return self.queue_wait_sum_s / self.completed > max(QUEUED_FLOOR_S, self.latency_sum_s / self.completed)

    @property
    def error_rate(self) -> float:
        return self.errors / self.completed if self.completed else 0.0


@dataclass(frozen=True)
class FetchDecision:
    inflight_limit: int
    batch_size: int
    reason: str             # "overload-latency", "overload-errors", "grow", "grow-early", "hold-idle", "hold", ...


class FetchController:
    def __init__(self, flow: FlowSettings) -> None:
        self.flow = flow
        self.limit = flow.start_inflight
        self.slow_start = True
        self.overloaded = False     # the last window with completions was over target
        self.error_baseline = 0.0   # error rate that cutting the limit did not reduce
        self._cut_at_rate: float | None = None   # error rate of the window that caused the last error cut

    def decide(self, w: WindowStats) -> FetchDecision:
        f = self.flow
        if w.completed:
            rate = w.error_rate
            if self._cut_at_rate is not None and rate > 0 and rate >= 0.75 * self._cut_at_rate:
                self.error_baseline = rate      # cutting did not help: these errors are not load
            elif rate < self.error_baseline:
                self.error_baseline = rate
            self._cut_at_rate = None
        if w.completed and w.mean_latency_ms > f.target_latency_ms:
            self.limit = max(f.min_inflight, math.floor(self.limit * f.decrease_factor))
            self.slow_start = False
            reason = "overload-latency"
        elif w.completed and w.error_rate > self.error_baseline + f.max_error_rate:
            self.limit = max(f.min_inflight, math.floor(self.limit * f.decrease_factor))
            self.slow_start = False
            self._cut_at_rate = w.error_rate
            reason = "overload-errors"
        elif w.peak_outstanding >= self.limit * 0.5 and w.completed and not w.queued:
            step = self.limit if self.slow_start else max(1, math.ceil(self.limit * f.increase_ratio))
            self.limit = min(f.max_inflight, self.limit + step)
            reason = "grow"
        else:
            reason = "hold-idle" if not w.completed else ("hold-queued" if w.queued else "hold")
        if w.completed:             # a window with nothing finished says nothing about the downstream
            self.overloaded = reason.startswith("overload")
        if not reason.startswith("overload") and not self.overloaded:
            floor = min(f.max_inflight, 2 * w.concurrency_limit)
            if floor > self.limit:
                self.limit = floor
                reason = "follow-concurrency"
        return FetchDecision(self.limit, self.batch_size(), reason)

    def early(self, w: WindowStats) -> FetchDecision | None:
        """Slow start per round trip, not per window: once a whole limit's worth of messages
        completed since the last step (`w` covers them), none of them over target, erroring
        above the bound or queued, with the limit in use, the limit doubles now instead of at
        the window's end. TCP's slow start doubles per round trip for the same reason: a fast
        handler goes through a limit of 100 in a millisecond, and doubling once per 250 ms
        window took 1.5 s to reach 5,000 (the bench's consumer ran at a fraction of its speed
        meanwhile). None: no step (the window's own decision still comes)."""
        f = self.flow
        if not self.slow_start or w.completed < self.limit or self.limit >= f.max_inflight:
            return None
        if (w.mean_latency_ms > f.target_latency_ms or w.error_rate > self.error_baseline + f.max_error_rate
                or w.queued or w.peak_outstanding < self.limit * 0.5):
            return None
        self.limit = min(f.max_inflight, 2 * self.limit)
        return FetchDecision(self.limit, self.batch_size(), "grow-early")

    def batch_size(self) -> int:
        return max(self.flow.min_batch, min(self.flow.max_batch, self.limit))

    def fetch_budget(self, outstanding: int, starved: bool = True) -> int:
        """How many messages the next fetch may take; 0 means pause and only poll.

        `starved`: the handler could take more calls now and nothing is on its way to it.
        Otherwise a fetch waits until a share of the limit is free: a fetch, and its claim
        call, for each slot a result frees cost more than the slot (a 30 ms handler on 64
        threads: ~1,000 store calls a second, 466 us of CPU per message)."""
        room = self.limit - outstanding
        if room <= 0 or (room < self.limit // REFILL_AT and not starved):
            return 0
        return min(self.batch_size(), room)

    @property
    def at_floor(self) -> bool:
        return self.limit <= self.flow.min_inflight


PAUSE_AFTER_S = 0.5    # saturation shorter than this waits for results; longer pauses
RESUME_BELOW = 0.5     # paused partitions resume once in flight is at most this share of the limit


def should_pause(*, paused: bool, outstanding: int, limit: int, overloaded: bool, store_down: bool,
                 saturated_for_s: float) -> bool:
    """Whether every partition should be paused now (prefetch stopped, polling goes on).

    - The idempotency store is down: take nothing new (it could not be deduplicated).
    - The downstream is overloaded: stay paused, topping up only to half the limit, so
      librdkafka holds no prefetched backlog while the handler crawls.
    - Healthy but at the limit: momentary saturation just waits for results (a pause
      purges the prefetch, which would be refetched at once); saturation lasting
      PAUSE_AFTER_S pauses, so polling continues and max.poll.interval.ms is never hit.
    - Once paused, resume only below half the limit (hysteresis against flapping).
    """
    if store_down:
        return True
    low = outstanding <= limit * RESUME_BELOW
    if overloaded or paused:
        return not low
    return saturated_for_s >= PAUSE_AFTER_S
