"""One assigned partition, as the control loop sees it: its offset window, its pause
reasons, a pending seek and its assignment epoch. Owned by the loop alone.

Offsets: a record is *accepted* when the loop takes it into work; accepted offsets only
grow. The commit point is the lowest accepted offset not yet finished, or one past the
highest accepted when all are finished. Only unfinished offsets are kept (a sorted list,
bounded by the in-flight limit), so a stuck record costs no memory per record behind it;
`window` (highest accepted + 1 - commit point) bounds how much a crash would re-deliver,
and a partition whose window is full pauses ("window-full").

A retry record that is not due yet *defers* its partition: nothing at or above it is
accepted until the seek back to it has taken effect (records of fetches already under way
are dropped and fetched again), and the partition stays paused until the due time.
"""
from __future__ import annotations

from bisect import bisect_left

TP = tuple[str, int]

# Pause reasons (a set per partition, recomputed into pause/resume every tick).
FLOW = "flow"                   # the in-flight limit is reached or the downstream is overloaded
RETRY_DUE = "retry-not-due"     # a retry record waits for its due time
ROUTE_BLOCKED = "route-blocked" # routing one of its records keeps failing
WINDOW_FULL = "window-full"     # too far ahead of its commit point


class Partition:
    __slots__ = ("tp", "epoch", "retry", "_u", "_h", "high", "committed", "reasons", "due_at",
                 "seek_to", "skip_from", "skip_until_fetch", "route_blocked", "revoking", "inflight", "marking", "topic_id")

    def __init__(self, tp: TP, epoch: int, retry: bool = False, topic_id: str | None = None) -> None:
        self.tp = tp
        self.epoch = epoch
        self.retry = retry                  # a retry topic: records wait for their due time
        self.topic_id = topic_id            # the topic's id: keys by position survive a re-created topic
        # Accepted and not finished: `_u[_h:]`, sorted. Records mostly finish in offset order,
        # so the head moves by an index (`del u[0]` moved the whole list: O(in flight) per record).
        self._u: list[int] = []
        self._h = 0
        self.high: int | None = None        # highest accepted offset + 1
        self.committed: int | None = None   # what the broker last acknowledged (or we last sent)
        self.reasons: set[str] = set()
        self.due_at: float | None = None    # monotonic time the deferred record becomes due
        self.seek_to: int | None = None     # a seek the loop still has to send
        self.skip_from: int | None = None   # drop records at/above this from fetches sent before the seek
        self.skip_until_fetch = 0           # ...i.e. from fetches numbered below this
        self.route_blocked = 0
        self.revoking = False
        self.inflight = 0                   # accepted messages not finished (running, parked, routing)
        self.marking = 0                    # ...of which handled, their done mark not yet written

    # ------------------------------------------------------------------ offsets

    def admissible(self, offset: int, fetch_seq: int) -> bool:
        """Would `offset` be taken into work? False: a re-fetch of something accepted, or a
        record behind a deferral that will be fetched again after the seek."""
        if self.skip_from is not None:
            if fetch_seq < self.skip_until_fetch:
                if offset >= self.skip_from:
                    return False
            else:
                self.skip_from = None
        return self.high is None or offset >= self.high

    def accept(self, offset: int, fetch_seq: int) -> bool:
        """Take `offset` into work, if admissible."""
        h = self.high
        if (self.skip_from is not None or (h is not None and offset < h)) and not self.admissible(offset, fetch_seq):
            return False
        self._u.append(offset)
        self.high = offset + 1
        self.inflight += 1
        return True

    @property
    def unfinished(self) -> list[int]:
        """Accepted offsets not finished, in order."""
        return self._u[self._h:]

    def finish(self, offset: int) -> None:
        u, h = self._u, self._h
        if h < len(u) and u[h] == offset:
            self._move_head(h + 1)
        else:
            i = bisect_left(u, offset, h)
            if i == len(u) or u[i] != offset:
                return                      # not ours (a stale result): nothing to do
            del u[i]
        self.inflight -= 1

    def finish_many(self, offsets: list[int]) -> None:
        """`finish` for many offsets. The common case, the head's next offsets in order (a
        batch's done marks land together), is one list comparison and a move of the head."""
        u, h = self._u, self._h
        n = len(offsets)
        if n > 1 and u[h:h + n] == offsets:
            self._move_head(h + n)
            self.inflight -= n
            return
        for o in offsets:
            self.finish(o)

    def _move_head(self, h: int) -> None:
        """The unfinished offsets now start at index `h` of `_u`."""
        u = self._u
        if h == len(u):
            u.clear()
            h = 0
        elif h >= 512 and 2 * h >= len(u):
            del u[:h]                       # amortised: the finished head goes in one move
            h = 0
        self._h = h

    def drop(self, offset: int) -> None:
        """Forget an accepted record that will be fetched again (it holds the commit point)."""
        self.inflight -= 1

    def commit_point(self) -> int | None:
        u, h = self._u, self._h
        return u[h] if h < len(u) else self.high

    def to_commit(self) -> int | None:
        """The commit point if it moved past what was last committed."""
        p = self.commit_point()
        if p is None or (self.committed is not None and p <= self.committed):
            return None
        return p

    @property
    def window(self) -> int:
        p = self.commit_point()
        return 0 if p is None or self.high is None else self.high - p

    # ------------------------------------------------------------------ deferral

    def rewind(self, offset: int) -> None:
        """Do not take `offset` now: drop it and everything after it until a seek back to it
        has taken effect (the caller also pauses the partition for a reason of its own)."""
        if self.skip_from is None or offset < self.skip_from:
            self.skip_from = offset
        self.seek_to = offset if self.seek_to is None else min(self.seek_to, offset)
        self.skip_until_fetch = 1 << 62     # until the seek is sent (take_seek)

    def defer(self, offset: int, due_at: float) -> None:
        """Hold the partition at `offset` until `due_at`: seek back to it and pause."""
        self.rewind(offset)
        self.due_at = due_at
        self.reasons.add(RETRY_DUE)

    def take_seek(self, next_fetch: int) -> int | None:
        """The seek to send now; fetches numbered from `next_fetch` on come after it."""
        s, self.seek_to = self.seek_to, None
        if s is not None:
            self.skip_until_fetch = next_fetch
        return s

    def refresh(self, now: float, window_max: int) -> None:
        """Recompute the reasons that depend on time and the window (every tick)."""
        if self.due_at is not None and now >= self.due_at:
            self.due_at = None
            self.reasons.discard(RETRY_DUE)
        if self.window > window_max:
            self.reasons.add(WINDOW_FULL)
        elif WINDOW_FULL in self.reasons and self.window <= window_max // 2:
            self.reasons.discard(WINDOW_FULL)
        if self.route_blocked > 0:
            self.reasons.add(ROUTE_BLOCKED)
        else:
            self.reasons.discard(ROUTE_BLOCKED)
