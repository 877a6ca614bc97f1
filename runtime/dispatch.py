"""Running the handler: never on the loop's thread, in key order, under a deadline.

- `KeyGate` (owned by the loop) keeps records of one Kafka key in order: a key's records
  run only when none of its earlier records is still pending (parked on its idempotency
  key, failed and awaiting its route, or retried in place). Records without a key are free.
- Work goes to workers in *chunks* (a few to a few hundred records, sized from the
  handler's latency, so a fast handler pays one hand-off per chunk, not per record). A
  chunk holds whole runs of keys, so a key never runs on two workers at once.
- At most `limit` workers run at once (`set_limit`, from the loop's concurrency
  controller), within the upper bound `workers`: each worker runs one chunk, hence one
  handler call, at a time, so the limit bounds concurrent handler calls. Chunks are cut
  for up to `workers` workers, so a limit that grows finds chunks to give the new workers.
  Tasks and threads are started when chunks wait and the limit allows, and leave (after
  their current chunk, never in the middle of one) when the limit falls below them;
  threads also leave after `IDLE_EXIT_S` without work. A call running past `steal_after_s`
  (and four times the mean) does not count against the limit (one stuck call must not hold the only slot and stall
  every other partition, whatever the limit fell to).
- Sync handlers run on worker threads, async handlers as tasks on the loop. Either way the
  loop's own thread never runs user code, so fetching, commits, lease renewal and
  retries go on whatever a handler does (an async handler that blocks the loop is caught
  by the liveness probe).
- A record running past `steal_after_s` has the not-yet-started rest of its chunk taken
  away and given to other workers (records of its own key stay behind it). A record
  running past `timeout_s` is failed with `HandlerTimeout` (TRANSIENT: routed) and its
  worker is abandoned and replaced: a thread cannot be killed, so at most
  `max_abandoned` abandoned threads may be alive before the process asks to be restarted.
- After a record fails, the rest of its chunk's records *of the same key* are handed back
  unrun (`HELD`), so a retry in place keeps the key's order.
- A *batch handler* (`@batch`, docs/batch-handlers.md) is called once per batch: a worker
  cuts its chunk into batches of up to `max_batch` records, in order (`next_batch`), and
  turns the call's outcome into one result per record (`batch_outcomes`: returned = all
  OK, `BatchFailure` = the named ones FAILED, anything else = all FAILED). Chunks are then
  cut `max_batch` records long (not from the latency), across partitions. The deadline,
  stealing and HELD work per batch: a timed-out batch fails every record of it; records of
  a failed record's key in later batches of the chunk are HELD. Each record's handler
  time is its share of the call (call time / batch size).
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import math
import queue
import statistics
import threading
import time
from collections import deque
from enum import IntEnum
from typing import Any, Callable, Iterable

from .errors import BatchFailure, HandlerTimeout
from .handlers import is_batch
from .message import Message

log = logging.getLogger("afc.runtime.dispatch")
REPORT_EVERY_S = 0.02
CHUNK_TIME_S = 0.005        # aim for chunks that take about this long
MAX_CHUNK = 4096
GIL_SAMPLE_EVERY = 16      # a sync handler's CPU share is sampled on every 16th call
GIL_MIN_SAMPLES = 32       # sampled calls a window needs before the share counts
PRUNE_SWEEP_AT = 256       # finished chunks kept behind a slow one before a full sweep
IDLE_EXIT_S = 10.0          # a worker thread idle this long leaves (started again when work comes)


class Outcome(IntEnum):
    OK = 0
    FAILED = 1
    ABANDONED = 2     # not run: taken back by the loop (revoke, shutdown)
    HELD = 3          # not run: an earlier record of its key failed in the same chunk


# (message, outcome, error, handler seconds, end-to-end seconds at start, seconds queued)
Result = tuple[Message, Outcome, BaseException | None, float, float, float]
OnResults = Callable[[list[Result]], None]


class KeyGate:
    """Per Kafka key: how many admitted records are pending, and who waits behind them."""

    def __init__(self) -> None:
        self.busy: dict[bytes, int] = {}
        self.waiting: dict[bytes, deque[Message]] = {}

    def admit(self, msgs: Iterable[Message]) -> tuple[list[Message], list[Message]]:
        """Split records (in fetch order) into those to run now and those to park (their
        idempotency key is held elsewhere); the rest wait behind their key."""
        run: list[Message] = []
        park: list[Message] = []
        busy, waiting = self.busy, self.waiting
        fresh: set[bytes] = set()          # keys free at the start of this call and not blocked since
        for m in msgs:
            k = m.key
            if k is None:
                (run if m.claimed else park).append(m)
                continue
            w = waiting.get(k)
            if w is not None:
                w.append(m)
                continue
            n = busy.get(k, 0)
            if n and k not in fresh:
                waiting[k] = deque((m,))
                continue
            busy[k] = n + 1
            if m.claimed:
                fresh.add(k)
                run.append(m)
            else:
                fresh.discard(k)           # parked: everything behind it waits
                park.append(m)
        return run, park

    def settle(self, m: Message) -> list[Message]:
        """`m` is finished, routed or given up: records waiting behind its key, if now free."""
        k = m.key
        if k is None:
            return []
        n = self.busy.get(k, 0) - 1
        if n > 0:
            self.busy[k] = n
            return []
        self.busy.pop(k, None)
        w = self.waiting.pop(k, None)
        return list(w) if w else []

    def hand_back(self, msgs: list[Message]) -> None:
        """Admitted records that did not run (HELD, or taken from a stuck chunk) go back to
        the front of their key's queue, in order; an earlier record of the key is pending."""
        for m in reversed(msgs):
            k = m.key
            if k is None:
                continue
            self.busy[k] -= 1
            self.waiting.setdefault(k, deque()).appendleft(m)

    def forget(self, keep: Callable[[Message], bool]) -> list[Message]:
        """Drop waiting records for which keep() is False (revoked partitions); returns them."""
        gone: list[Message] = []
        for k in list(self.waiting):
            w = self.waiting[k]
            kept = deque(m for m in w if keep(m))
            gone.extend(m for m in w if not keep(m))
            if kept:
                self.waiting[k] = kept
            else:
                del self.waiting[k]
        return gone


class Chunk:
    """Records one worker runs in order. The loop may cut it: records from `cut` on are
    taken back (stolen), under `lock`, which the worker also takes per record."""
    __slots__ = ("msgs", "next", "cut", "cur", "batch", "t0", "lock", "queued")

    def __init__(self, msgs: list[Message]) -> None:
        self.msgs = msgs
        self.next = 0
        self.cut = len(msgs)
        self.cur: Message | None = None
        self.batch: list[Message] | None = None     # the batch running now (batch handlers), cur = its first
        self.t0 = 0.0
        self.lock = threading.Lock()
        self.queued = time.perf_counter()

    @property
    def finished(self) -> bool:
        """Every record taken and none running: nothing left to run or take back."""
        return self.next >= self.cut and self.cur is None

    def take_rest(self) -> list[Message]:
        """(lock held) The records not started yet; the worker stops before them."""
        rest = self.msgs[self.next:self.cut]
        self.cut = self.next
        return rest


class Worker:
    __slots__ = ("chunk", "abandoned", "thread", "task", "name", "ratios", "overdue")

    def __init__(self, name: str) -> None:
        self.name = name
        self.chunk: Chunk | None = None
        self.abandoned = False
        self.overdue = False            # an async call past its deadline, cancelled by the watchdog
        self.thread: threading.Thread | None = None
        self.task: asyncio.Task[None] | None = None
        # Sampled handler calls (every GIL_SAMPLE_EVERY-th): wall time / CPU time on the
        # worker's thread. The thread appends; the loop swaps the list (see ThreadDispatcher.tune).
        self.ratios: list[float] = []


class Stuck:
    """What the watchdog found: records to fail with a timeout, and records taken back."""
    __slots__ = ("timed_out", "taken")

    def __init__(self) -> None:
        self.timed_out: list[Result] = []
        self.taken: list[tuple[Message, list[Message]]] = []     # (the stuck record, records behind it)


def split_chunks(msgs: list[Message], n: int) -> list[list[Message]]:
    """`n` chunks of about equal size; all records of a key in the same chunk, in order."""
    if n <= 1:
        return [msgs]
    chunks: list[list[Message]] = [[] for _ in range(n)]
    where: dict[bytes, int] = {}
    rr = 0
    for m in msgs:
        k = m.key
        if k is None:
            i = rr
            rr = (rr + 1) % n
        else:
            i = where.get(k, -1)
            if i < 0:
                i = where[k] = rr
                rr = (rr + 1) % n
        chunks[i].append(m)
    return [c for c in chunks if c]


def next_batch(msgs: list[Message], start: int, stop: int, max_batch: int,
               failed: set[bytes] | None) -> tuple[list[Message], list[Message], int]:
    """The next batch from `msgs[start:stop]`, in order: up to `max_batch` records, skipping
    (to hand back as HELD) those whose key failed earlier in the chunk. Returns (batch,
    held, where the next batch starts)."""
    if failed is None:                 # no key failed in this chunk: the next slice as it is
        end = min(stop, start + max_batch)
        return msgs[start:end], [], end
    batch: list[Message] = []
    held: list[Message] = []
    i = start
    while i < stop and len(batch) < max_batch:
        m = msgs[i]
        i += 1
        if failed is not None and m.key in failed:
            held.append(m)
        else:
            batch.append(m)
    return batch, held, i


def batch_outcomes(batch: list[Message], err: BaseException | None) -> list[tuple[Message, BaseException | None]]:
    """Per record of a batch call, its error (None: done). Returning: all done.
    `BatchFailure`: the named records failed with their errors, the rest done. Anything
    else (a timeout, a lost claim, a bug): every record failed with it."""
    if err is None:
        return [(m, None) for m in batch]
    if isinstance(err, BatchFailure):
        f = err.failures
        named = [f.get(m) for m in batch]
        unknown = len(f) - sum(1 for e in named if e is not None)
        if unknown:
            log.warning("event=batch-failure-unknown-messages count=%d detail=\"BatchFailure named messages that "
                        "are not in this batch; ignored\"", unknown)
        return list(zip(batch, named))
    return [(m, err) for m in batch]


class Dispatcher:
    """Common part of the thread and task dispatchers (the loop calls all of it)."""
    abandons = True           # the watchdog times records out (tasks time out by themselves)
    _pending: deque[Chunk]    # chunks queued (the kinds keep their own)

    def __init__(self, handler: Callable[[Message], Any], workers: int, loop: asyncio.AbstractEventLoop,
                 on_results: OnResults, timeout_s: float, steal_after_s: float, max_abandoned: int,
                 max_batch: int = 1) -> None:
        self.handler, self.n, self.loop, self.on_results = handler, workers, loop, on_results
        self.batch = max(1, max_batch) if is_batch(handler) else 0     # records per call of a batch handler
        self.limit = workers              # concurrent handler calls allowed now (<= n); see set_limit
        self.stuck = 0                    # workers whose call runs past steal_after_s (the watchdog counts)
        self.allowed = workers            # workers that may run: limit + stuck, at most n
        self.timeout_s, self.steal_after_s, self.max_abandoned = timeout_s, steal_after_s, max_abandoned
        self.workers: list[Worker] = []
        self.abandoned: list[Worker] = []
        self.mean_latency_s = 0.0
        self.running = 0                  # records handed to workers and not reported back

    def chunk_count(self, n_msgs: int) -> int:
        """As many chunks as the most workers there may be (not the current limit: a limit
        that grows then finds chunks for its new workers), unless the handler is so fast that
        a chunk of fewer than CHUNK_TIME_S worth of records would cost more in hand-offs than
        it saves. A batch handler's chunks are `batch` records (one call each) when there are
        enough records for every worker; a chunk longer than that runs as several calls."""
        if self.batch:
            return max(1, min(self.n, math.ceil(n_msgs / self.batch)))
        size = 1 if self.mean_latency_s <= 0 else max(1, min(MAX_CHUNK, int(CHUNK_TIME_S / self.mean_latency_s)))
        return max(1, min(self.n, math.ceil(n_msgs / size)))

    def tune(self, mean_latency_s: float, samples: int) -> None:
        if samples:
            self.mean_latency_s = mean_latency_s

    def set_limit(self, limit: int) -> None:
        """The concurrency controller's limit (clamped to [1, workers]); surplus workers leave
        after their current chunk, missing ones start when chunks wait."""
        self.limit = max(1, min(self.n, limit))
        self._apply()

    def _apply(self) -> None:
        self.allowed = min(self.n, self.limit + self.stuck)
        self._grow()

    @property
    def busy(self) -> int:
        """Workers running a chunk now (the loop's view; threads set `chunk` themselves)."""
        return sum(1 for w in self.workers if w.chunk is not None)

    def reported(self, n: int) -> None:
        self.running -= n

    def watchdog(self) -> Stuck:
        """Called by the loop every tick: cut stuck chunks, time out overdue records."""
        out = Stuck()
        now = time.perf_counter()
        stuck = 0
        stuck_after = max(self.steal_after_s, 4 * self.mean_latency_s)    # slow for this handler, not just slow
        for w in self.workers:
            c = w.chunk
            if c is None:
                continue
            with c.lock:
                m = c.cur
                if m is None:
                    continue
                ran = now - c.t0
                running = c.batch or [m]
                # a batch call is slow for this handler past 4 x the mean time of its records
                slow = stuck_after if len(running) == 1 else max(stuck_after, 4 * self.mean_latency_s * len(running))
                if ran > slow and not w.abandoned:
                    stuck += 1
                if not self.abandons and self.timeout_s and ran > self.timeout_s and not w.overdue:
                    # An async call past its deadline: cancelled here, on the loop, once a tick
                    # (a timer per call cost more CPU than the rest of the dispatch); the lane
                    # turns the CancelledError into HandlerTimeout and goes on.
                    if w.task is not None and not w.task.done():
                        w.overdue = True
                        w.task.cancel()
                elif self.abandons and self.timeout_s and ran > self.timeout_s:
                    w.abandoned = True
                    c.cur = c.batch = None
                    err = HandlerTimeout(f"handler ran {ran:.1f}s, over handler.timeoutS={self.timeout_s:g}")
                    out.timed_out.extend((x, Outcome.FAILED, err, ran / len(running), 0.0, 0.0) for x in running)
                    rest = c.take_rest()
                    if rest:
                        out.taken.extend(_behind(running, rest))
                elif ran > self.steal_after_s and c.next < c.cut:
                    out.taken.extend(_behind(running, c.take_rest()))
        if out.timed_out:
            self._replace_abandoned()
        if stuck != self.stuck:
            self.stuck = stuck
            self._apply()
        for _, rest in out.taken:
            self.running -= len(rest)
        return out

    def _replace_abandoned(self) -> None:
        for i, w in enumerate(self.workers):
            if w.abandoned:
                self.abandoned.append(w)
                self.workers[i] = self._spawn(f"{w.name}r")

    def abandoned_alive(self) -> int:
        self.abandoned = [w for w in self.abandoned if self._alive(w)]
        return len(self.abandoned)

    def take_back(self, keep: Callable[[Message], bool]) -> list[Message]:
        """Take back every not-started record for which keep() is False (revoke/shutdown)."""
        back: list[Message] = []
        for c in self._chunks():
            with c.lock:
                rest = c.take_rest()
            kept = []
            for m in rest:
                (kept if keep(m) else back).append(m)
            if kept:
                self._enqueue([kept])
            self.running -= len(rest) - len(kept)
        return back

    def submit(self, msgs: list[Message]) -> None:
        if not msgs:
            return
        now = time.perf_counter()
        for m in msgs:
            m.queued_at = now
        self.running += len(msgs)
        if self.batch and self._merge(msgs):
            return
        self._enqueue(split_chunks(msgs, self.chunk_count(len(msgs))))

    def _merge(self, msgs: list[Message]) -> bool:
        """(batch handlers) Add `msgs` to the newest chunk no worker has started, if it stays
        one batch: records released a few at a time (as their keys' earlier records settle)
        then still make one call, not one call each. A key's records are never pending in two
        submissions (KeyGate), so merging whole submissions keeps each key in one chunk."""
        if not self._pending:
            return False
        c = self._pending[-1]
        with c.lock:
            if c.next or c.cur is not None or c.cut != len(c.msgs) or len(c.msgs) + len(msgs) > self.batch:
                return False
            c.msgs.extend(msgs)
            c.cut = len(c.msgs)
        return True

    def _start_batch(self, c: Chunk, failed: set[bytes] | None, results: list[Result]) -> list[Message] | None:
        """(batch handlers) Start the chunk's next batch: it becomes the running one, from
        `c.t0`; None when the chunk is done. Records skipped because an earlier record of
        their key failed go to `results` as HELD."""
        with c.lock:
            while c.next < c.cut:
                msgs, held, c.next = next_batch(c.msgs, c.next, c.cut, self.batch, failed)
                results.extend((m, Outcome.HELD, None, 0.0, 0.0, 0.0) for m in held)
                if msgs:
                    c.cur, c.batch = msgs[0], msgs
                    c.t0 = time.perf_counter()
                    return msgs
        return None

    # implemented by the two kinds
    def _spawn(self, name: str) -> Worker: ...
    def _grow(self) -> None: ...
    def _alive(self, w: Worker) -> bool: ...
    def _enqueue(self, chunks: list[list[Message]]) -> None: ...
    def _chunks(self) -> list[Chunk]: ...
    async def close(self, timeout: float) -> None: ...


def _behind(running: list[Message], rest: list[Message]) -> list[tuple[Message, list[Message]]]:
    """Records taken from behind a stuck call, as (a running record, records taken behind
    it): those of a running record's key go with that record (the loop hands them back to
    wait for it), every other one with the first."""
    if len(running) == 1:
        return [(running[0], rest)]
    by_key = {x.key: x for x in running if x.key is not None}
    first = running[0]
    groups: dict[bytes, list[Message]] = {}
    others: list[Message] = []
    for x in rest:
        if x.key is not None and x.key in by_key and x.key != first.key:
            groups.setdefault(x.key, []).append(x)
        else:
            others.append(x)
    return [(first, others), *((by_key[k], xs) for k, xs in groups.items())]


def _record_batch(results: list[Result], batch: list[Message], err: BaseException | None, t0: float, t1: float,
                  failed: set[bytes] | None) -> set[bytes] | None:
    """Append one result per record of a batch call (see `batch_outcomes`); each record's
    handler time is its share of the call, its end-to-end time counts the whole call."""
    span = t1 - t0
    share = span / len(batch)
    now = time.time() - span
    if err is None:                    # every record done: the common case, one comprehension
        ok = Outcome.OK
        results.extend([(m, ok, None, share, now - m.timestamp / 1000.0, t0 - m.queued_at) for m in batch])
        return failed
    for m, e in batch_outcomes(batch, err):
        e2e, wait = now - m.timestamp / 1000.0, t0 - m.queued_at
        if e is None:
            results.append((m, Outcome.OK, None, share, e2e, wait))
            continue
        results.append((m, Outcome.FAILED, e, share, e2e, wait))
        if m.key is not None:
            failed = failed or set()
            failed.add(m.key)
    return failed


def _result(msg: Message, outcome: Outcome, err: BaseException | None, t0: float, t1: float) -> Result:
    return (msg, outcome, err, t1 - t0, time.time() - msg.timestamp / 1000.0 - (t1 - t0), t0 - msg.queued_at)


def _record(results: list[Result], m: Message, err: BaseException | None, t0: float, t1: float,
            failed: set[bytes] | None) -> set[bytes] | None:
    """Append one run's result; a failed record's key joins `failed` (the rest of the
    chunk's records of that key are then handed back unrun)."""
    if err is None:
        results.append(_result(m, Outcome.OK, None, t0, t1))
        return failed
    results.append(_result(m, Outcome.FAILED, err, t0, t1))
    if m.key is not None:
        failed = failed or set()
        failed.add(m.key)
    return failed


class ThreadDispatcher(Dispatcher):
    """Sync handlers: worker threads, chunks from one queue, as many threads as the limit.

    `_live` (threads that count against the limit) and `_idle` (of which waiting for a chunk)
    are shared with the threads, under `_lock`; the loop alone owns `workers`."""
    _EMPTY = object()

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self._q: queue.SimpleQueue[Chunk | None] = queue.SimpleQueue()
        self._pending: deque[Chunk] = deque()        # chunks in the queue (for take_back)
        self._sweep_at = PRUNE_SWEEP_AT
        self._lock = threading.Lock()
        self._live = 0
        self._idle = 0
        self._seq = 0
        self.workers = []
        self.gil_cap = self.n                         # threads the handler can use (see tune)
        self._ratios: list[float] = []                # sampled calls' wall/CPU since the cap was last set

    def _apply(self) -> None:
        with self._lock:                             # threads read it under the lock when they retire
            self.allowed = min(self.n, min(self.limit, self.gil_cap) + self.stuck)
        self._grow()

    def tune(self, mean_latency_s: float, samples: int) -> None:
        """Also: how many threads the handler can use at all. A sync call holds the GIL for
        the CPU time it spends in Python; calls that spend a share s of their time on CPU
        cannot overlap more than 1/s at once, and more threads only trade the GIL (a no-op
        handler on 16 threads cost 25 % more CPU per message than on one, in the bench). The
        cap is the median sampled call's wall/CPU time, rounded: a handler that waits on I/O
        keeps its threads, one that computes gets one. The median, not the sums: a computing
        call preempted by the switch interval waits for every other thread, and those few
        outliers would make k computing threads look like they need k. A call stuck past
        stealAfterMs still adds a thread beside it (`stuck`), so a slow call never holds the
        others."""
        super().tune(mean_latency_s, samples)
        for w in self.workers:
            if w.ratios:
                got, w.ratios = w.ratios, []              # a sample appended meanwhile is lost: fine
                self._ratios.extend(got)
        if len(self._ratios) < GIL_MIN_SAMPLES:
            return
        r = statistics.median(self._ratios)
        self._ratios = []
        cap = max(1, min(self.n, round(r)))
        if cap != self.gil_cap:
            log.info("event=handler-threads-cap cap=%d wall_per_cpu=%.2f", cap, r)
            self.gil_cap = cap
            self._apply()

    def _spawn(self, name: str) -> Worker:
        w = Worker(name)
        with self._lock:
            self._live += 1
        w.thread = threading.Thread(target=self._work, args=(w,), name=name, daemon=True)
        w.thread.start()
        return w

    def _grow(self) -> None:
        """Start threads for waiting chunks, up to the limit; forget threads that left."""
        self.workers = [w for w in self.workers if self._alive(w)]
        with self._lock:
            want = min(self.allowed - self._live, self._q.qsize() - self._idle)
        for _ in range(max(0, want)):
            self._seq += 1
            self.workers.append(self._spawn(f"afc-worker-{self._seq}"))

    def _alive(self, w: Worker) -> bool:
        return w.thread is not None and w.thread.is_alive()

    def _enqueue(self, chunks: list[list[Message]]) -> None:
        self._prune()
        for msgs in chunks:
            c = Chunk(msgs)
            self._pending.append(c)
            self._q.put(c)
        self._grow()

    def _prune(self) -> None:
        """Forget finished chunks. The workers take chunks from the queue, not from `_pending`
        (the loop's list for take_back): without this it kept every record ever run. The head
        goes first (chunks finish about in queue order); a full sweep once a slow head chunk
        holds many finished ones behind it."""
        p = self._pending
        while p and p[0].finished:
            p.popleft()
        if len(p) > self._sweep_at:
            self._pending = p = deque(c for c in p if not c.finished)
            # many chunks still waiting: sweep again only once the list doubled (not at every enqueue)
            self._sweep_at = max(PRUNE_SWEEP_AT, 2 * len(p))

    def _replace_abandoned(self) -> None:
        for i, w in enumerate(self.workers):
            if w.abandoned:
                self.abandoned.append(w)
                with self._lock:
                    self._live -= 1                  # it never counts itself out (see _work)
                self._seq += 1
                self.workers[i] = self._spawn(f"{w.name}r")

    def _chunks(self) -> list[Chunk]:
        self._prune()
        live = [w.chunk for w in self.workers if w.chunk is not None]
        running = {id(c) for c in live}               # a running chunk is in both until it ends
        return [*live, *(c for c in self._pending if id(c) not in running)]

    def _report(self, results: list[Result]) -> None:
        try:
            self.loop.call_soon_threadsafe(self.on_results, results)
        except RuntimeError:     # loop closed during a hard exit
            pass

    def _work(self, w: Worker) -> None:
        lock, q = self._lock, self._q
        while True:
            with lock:
                if w.abandoned:                      # the loop counted it out when it replaced it
                    return
                if self._live > self.allowed:        # the limit fell: leave between chunks
                    self._live -= 1
                    return
                self._idle += 1
            try:
                c: Chunk | None | object = q.get(timeout=IDLE_EXIT_S)
            except queue.Empty:
                c = self._EMPTY
            with lock:
                self._idle -= 1
                if c is None or c is self._EMPTY or self._live > self.allowed:
                    self._live -= 1
                    if isinstance(c, Chunk):
                        q.put(c)                     # the limit fell while it waited: for a thread within it
                    return
            assert isinstance(c, Chunk)
            w.chunk = c
            if self.batch:
                self._run_batches(w, c)
            else:
                self._run(w, c)
            w.chunk = None

    def _run(self, w: Worker, c: Chunk) -> None:
        """Run the chunk's records in order. The chunk's lock is held between two handler
        calls (finishing one record and taking the next are one critical section: the loop's
        watchdog sees either the record running or none), and released around each call."""
        handler, perf, loop, lock, cpu = self.handler, time.perf_counter, self.loop, c.lock, time.thread_time
        wall, ok = time.time, Outcome.OK
        results: list[Result] = []
        failed: set[bytes] | None = None
        last = perf()
        sample = 0
        lock.acquire()
        try:
            while True:
                i = c.next
                if i >= c.cut:
                    break
                c.next = i + 1
                m = c.msgs[i]
                if failed is not None and m.key in failed:
                    results.append((m, Outcome.HELD, None, 0.0, 0.0, 0.0))
                    continue
                c.cur = m
                t0 = c.t0 = perf()
                lock.release()
                err: BaseException | None = None
                sample -= 1
                c0 = cpu() if sample < 0 else 0.0
                try:
                    r = handler(m)
                    if r is not None and inspect.isawaitable(r):     # a sync callable that returned a coroutine
                        r = asyncio.run_coroutine_threadsafe(_await(r), loop).result()
                except BaseException as e:  # noqa: BLE001 - every failure is routed, SystemExit included
                    err = e
                if sample < 0:
                    c1 = cpu()
                    t1 = perf()
                    w.ratios.append((t1 - t0) / max(c1 - c0, 1e-7))
                    sample = GIL_SAMPLE_EVERY - 1
                else:
                    t1 = perf()
                lock.acquire()
                c.cur = None
                if w.abandoned:                # timed out: the loop has failed this record already
                    break
                if err is None:                # _record's common case, inlined (one per message)
                    dt = t1 - t0
                    results.append((m, ok, None, dt, wall() - m.timestamp / 1000.0 - dt, t0 - m.queued_at))
                else:
                    failed = _record(results, m, err, t0, t1, failed)
                if t1 - last >= REPORT_EVERY_S:
                    lock.release()
                    try:
                        self._report(results)
                    finally:
                        lock.acquire()
                    results, last = [], t1
        finally:
            lock.release()
        if results:
            self._report(results)

    def _run_batches(self, w: Worker, c: Chunk) -> None:
        """`_run` for a batch handler: one call per batch of the chunk."""
        handler, perf, loop = self.handler, time.perf_counter, self.loop
        results: list[Result] = []
        failed: set[bytes] | None = None
        last = perf()
        while (msgs := self._start_batch(c, failed, results)) is not None:
            t0 = c.t0
            err: BaseException | None = None
            try:
                r = handler(list(msgs))
                if r is not None and inspect.isawaitable(r):
                    r = asyncio.run_coroutine_threadsafe(_await(r), loop).result()
            except BaseException as e:  # noqa: BLE001 - every failure is routed, SystemExit included
                err = e
            t1 = perf()
            with c.lock:
                c.cur = c.batch = None
                if w.abandoned:                # timed out: the loop has failed this batch already
                    break
            failed = _record_batch(results, msgs, err, t0, t1, failed)
            if t1 - last >= REPORT_EVERY_S:
                self._report(results)
                results, last = [], t1
        if results:
            self._report(results)

    async def close(self, timeout: float) -> None:
        for _ in range(max(self._live, len(self.workers))):
            self._q.put(None)
        deadline = time.monotonic() + timeout
        for w in self.workers:
            if w.thread is not None:
                await asyncio.to_thread(w.thread.join, max(0.0, deadline - time.monotonic()))


async def _await(a: Any) -> Any:
    return await a


async def _call_async(handler: Callable[[Any], Any], arg: Any, timeout: float | None, w: Worker,
                      me: "asyncio.Task[Any] | None") -> BaseException | None:
    """Await one handler call; its failure (None: it returned). Past the deadline the
    watchdog cancels the lane's task with `w.overdue` set: that is the call's timeout (as
    with `asyncio.timeout`, a handler that swallows the cancellation has returned)."""
    err: BaseException | None = None
    try:
        await handler(arg)
    except asyncio.CancelledError as e:
        if not w.overdue and me is not None and me.cancelling():
            raise                  # we are being cancelled (shutdown): not the handler's failure
        err = HandlerTimeout(f"handler ran over handler.timeoutS={timeout:g}") if w.overdue else e
    except BaseException as e:  # noqa: BLE001 - every failure is routed
        err = e
    if w.overdue:
        w.overdue = False
        if me is not None:
            me.uncancel()
    return err


class TaskDispatcher(Dispatcher):
    """Async handlers: up to `limit` tasks on the loop, each running chunks in order. A
    handler past its deadline is cancelled by the watchdog (its lane goes on with the next
    record); the watchdog also hands on the records behind a slow one."""
    abandons = False

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self._pending: deque[Chunk] = deque()
        self._live = 0                 # tasks started and not finished (all on the loop: no lock)
        self._seq = 0
        self.workers = []

    def _spawn(self, name: str) -> Worker:
        w = Worker(name)
        self._live += 1
        w.task = self.loop.create_task(self._work(w), name=name)
        return w

    def _alive(self, w: Worker) -> bool:
        return w.task is not None and not w.task.done()

    def _enqueue(self, chunks: list[list[Message]]) -> None:
        for msgs in chunks:
            self._pending.append(Chunk(msgs))
        self._grow()

    def _grow(self) -> None:
        self.workers = [w for w in self.workers if self._alive(w) and not w.abandoned]
        while self._live < self.allowed and self._live < len(self._pending) + sum(
                1 for w in self.workers if w.chunk is not None):
            self._seq += 1
            self.workers.append(self._spawn(f"afc-task-{self._seq}"))

    def _replace_abandoned(self) -> None:
        for w in self.workers:
            if w.abandoned and w.task is not None:
                w.task.cancel()
        self.workers = [w for w in self.workers if not w.abandoned]
        self._enqueue([])

    def _chunks(self) -> list[Chunk]:
        return [*(w.chunk for w in self.workers if w.chunk is not None), *self._pending]

    async def _work(self, w: Worker) -> None:
        try:
            while self._pending and not w.abandoned and self._live <= self.allowed:
                c = self._pending.popleft()
                w.chunk = c
                try:
                    await (self._run_batches(w, c) if self.batch else self._run(w, c))
                finally:
                    w.chunk = None
        finally:
            self._live -= 1

    async def _run(self, w: Worker, c: Chunk) -> None:
        handler, perf, timeout = self.handler, time.perf_counter, self.timeout_s or None
        results: list[Result] = []
        failed: set[bytes] | None = None
        last = perf()
        me = asyncio.current_task()
        while True:
            i = c.next
            if i >= c.cut:
                break
            c.next = i + 1
            m = c.msgs[i]
            if failed is not None and m.key in failed:
                results.append((m, Outcome.HELD, None, 0.0, 0.0, 0.0))
                continue
            c.cur = m
            t0 = c.t0 = perf()
            err = await _call_async(handler, m, timeout, w, me)
            t1 = perf()
            c.cur = None
            failed = _record(results, m, err, t0, t1, failed)
            if t1 - last >= REPORT_EVERY_S or len(results) >= 256:
                self.on_results(results)
                results, last = [], t1
                await asyncio.sleep(0)
        if results:
            self.on_results(results)

    async def _run_batches(self, w: Worker, c: Chunk) -> None:
        """`_run` for an async batch handler: one call per batch, under the deadline."""
        handler, perf, timeout = self.handler, time.perf_counter, self.timeout_s or None
        results: list[Result] = []
        failed: set[bytes] | None = None
        me = asyncio.current_task()
        while (msgs := self._start_batch(c, failed, results)) is not None:
            t0 = c.t0
            err = await _call_async(handler, list(msgs), timeout, w, me)
            t1 = perf()
            c.cur = c.batch = None
            failed = _record_batch(results, msgs, err, t0, t1, failed)
            self.on_results(results)
            results = []
            await asyncio.sleep(0)
        if results:
            self.on_results(results)

    async def close(self, timeout: float) -> None:
        tasks = [w.task for w in self.workers if w.task is not None and not w.task.done()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for t in pending:
                t.cancel()
