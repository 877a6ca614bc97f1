"""Running the handler: key-ordered lanes, concurrent across keys.

A message goes to lane `hash(key) % workers` (keyless messages spread by offset), and a lane
runs its messages one after another, so messages with the same key are handled in order
while different keys run concurrently. Sync handlers run on one thread per lane, async
handlers as one task per busy lane on the runtime's loop.

Results go back to the loop in chunks (one wake-up per chunk, not per message), and at
least every `REPORT_EVERY_S` so a slow handler still reports promptly.

Before running a message the lane checks its partition was not revoked (then the message is
abandoned: the next owner will get it) and waits on a BUSY claim (someone else holds the
key) until it is ours or done, which keeps key order without parking messages elsewhere.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from enum import IntEnum
from typing import Any, Callable, Container

from .errors import StoreUnavailable
from .idempotency import Claim, IdempotencyStore
from .message import Message

log = logging.getLogger("afc.runtime.dispatch")
REPORT_EVERY_S = 0.02
BUSY_BACKOFF_S = (0.05, 1.0)


class Outcome(IntEnum):
    OK = 0
    FAILED = 1
    SKIPPED = 2       # its key turned out done while waiting
    ABANDONED = 3     # partition revoked or shutting down before it ran


# (message, outcome, error, handler seconds, end-to-end seconds at start, seconds queued in its lane)
Result = tuple[Message, Outcome, BaseException | None, float, float, float]
OnResults = Callable[[list[Result]], None]


def gone(msg: Message, stopping: bool) -> bool:
    """The message must not start: its partition was revoked, or the runtime is stopping."""
    part = msg._part
    return stopping or (part is not None and part.revoked)


def lane_of(msg: Message, lanes: int) -> int:
    if msg.key is not None:
        return hash(msg.key) % lanes
    return (msg.offset + msg.partition) % lanes


def settle(claim: Claim, key: str, holds: Container[str]) -> Claim:
    """MINE means ours: still BUSY while another copy here holds the key, else CLAIMED."""
    if claim is Claim.MINE:
        return Claim.BUSY if key in holds else Claim.CLAIMED
    return claim


class ThreadDispatcher:
    def __init__(self, handler: Callable[[Message], Any], lanes: int, loop: asyncio.AbstractEventLoop,
                 on_results: OnResults, store: IdempotencyStore | None, holds: Container[str] = ()) -> None:
        self.handler, self.lanes, self.loop, self.on_results, self.store = handler, lanes, loop, on_results, store
        self.holds = holds
        self.stopping = False
        self._queues: list[queue.SimpleQueue[list[tuple[Message, bool]] | None]] = [
            queue.SimpleQueue() for _ in range(lanes)]
        self._threads = [threading.Thread(target=self._work, args=(q,), name=f"afc-lane-{i}", daemon=True)
                         for i, q in enumerate(self._queues)]
        for t in self._threads:
            t.start()

    def submit(self, items: list[tuple[Message, bool]]) -> None:
        """items: (message, busy) where busy means another worker holds its claim."""
        n = self.lanes
        t = time.perf_counter()
        if n == 1:
            for item in items:
                item[0]._queued = t
            self._queues[0].put(items)
            return
        chunks: list[list[tuple[Message, bool]] | None] = [None] * n
        for item in items:
            item[0]._queued = t
            i = lane_of(item[0], n)
            c = chunks[i]
            if c is None:
                chunks[i] = [item]
            else:
                c.append(item)
        for i, c in enumerate(chunks):
            if c:
                self._queues[i].put(c)

    def _report(self, results: list[Result]) -> None:
        try:
            self.loop.call_soon_threadsafe(self.on_results, results)
        except RuntimeError:     # loop closed during a hard exit
            pass

    def _work(self, q: "queue.SimpleQueue[list[tuple[Message, bool]] | None]") -> None:
        while True:
            chunk = q.get()
            if chunk is None:
                return
            self.run_chunk(chunk, self._report)

    def run_chunk(self, chunk: list[tuple[Message, bool]], report: OnResults) -> None:
        """Run a lane's messages in order, reporting at least every REPORT_EVERY_S."""
        handler = self.handler
        perf, now = time.perf_counter, time.time
        results: list[Result] = []
        last_report = perf()
        for msg, busy in chunk:
            if gone(msg, self.stopping):
                results.append((msg, Outcome.ABANDONED, None, 0.0, 0.0, 0.0))
                continue
            if busy:
                claim = self._wait_claim(msg)
                msg.claimed = claim is Claim.CLAIMED
                if claim is not Claim.CLAIMED:
                    results.append((msg, Outcome.SKIPPED if claim is Claim.DONE else Outcome.ABANDONED,
                                    None, 0.0, 0.0, 0.0))
                    continue
            e2e = now() - msg.timestamp / 1000.0
            t0 = perf()
            try:
                handler(msg)
                results.append((msg, Outcome.OK, None, perf() - t0, e2e, t0 - msg._queued))
            except Exception as e:  # noqa: BLE001 - every failure is routed, none escapes
                results.append((msg, Outcome.FAILED, e, perf() - t0, e2e, t0 - msg._queued))
            t = perf()
            if t - last_report >= REPORT_EVERY_S:
                report(results)
                results, last_report = [], t
        if results:
            report(results)

    def _wait_claim(self, msg: Message) -> Claim | None:
        """Block this lane until the key is ours or done; None if the message is gone."""
        assert self.store is not None
        delay = BUSY_BACKOFF_S[0]
        while not gone(msg, self.stopping):
            try:
                claim = settle(self.store.claim_one_blocking(msg.idempotency_key), msg.idempotency_key,
                               self.holds)
            except StoreUnavailable as e:
                log.warning("event=busy-claim-check-failed key=%s error=%s", msg.idempotency_key, e)
                claim = Claim.BUSY
            if claim is not Claim.BUSY:
                return claim
            time.sleep(delay)
            delay = min(BUSY_BACKOFF_S[1], delay * 2)
        return None

    async def close(self, timeout: float) -> None:
        self.stopping = True
        for q in self._queues:
            q.put(None)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            await asyncio.to_thread(t.join, max(0.0, deadline - time.monotonic()))


class SyncDispatcher:
    """Sync handlers: inline on the loop while the handler is fast, thread lanes when slow.

    A handler that returns in microseconds gains nothing from threads (the GIL serialises
    it anyway) and loses to the hand-offs, so it runs on the loop. Once its mean latency
    passes INLINE_MAX_S it moves to the lanes, where different keys overlap. It moves back
    only when the lanes are empty, so a key's messages never run out of order; messages
    that must wait for a busy claim always go to the lanes (waiting must not block the loop).
    """

    INLINE_MAX_S = 0.00005

    def __init__(self, handler: Callable[[Message], Any], lanes: int, loop: asyncio.AbstractEventLoop,
                 on_results: OnResults, store: IdempotencyStore | None, holds: Container[str] = ()) -> None:
        self.on_results = on_results
        self.lanes = ThreadDispatcher(handler, lanes, loop, self._from_lanes, store, holds)
        self.inline = False
        self.queued = 0

    @property
    def stopping(self) -> bool:
        return self.lanes.stopping

    def _from_lanes(self, results: list[Result]) -> None:
        self.queued -= len(results)
        self.on_results(results)

    def submit(self, items: list[tuple[Message, bool]]) -> None:
        if self.inline and self.queued == 0 and not any(busy for _, busy in items):
            t = time.perf_counter()
            for item in items:
                item[0]._queued = t
            self.lanes.run_chunk(items, self.on_results)
            return
        self.queued += len(items)
        self.lanes.submit(items)

    def tune(self, mean_latency_s: float, samples: int) -> None:
        """Called once per controller window with the handler's mean latency."""
        if not samples:
            return
        if self.inline and mean_latency_s > self.INLINE_MAX_S:
            self.inline = False
            log.info("event=dispatch-mode mode=lanes mean_latency_us=%.0f", mean_latency_s * 1e6)
        elif not self.inline and mean_latency_s < self.INLINE_MAX_S / 2:
            self.inline = True
            log.info("event=dispatch-mode mode=inline mean_latency_us=%.0f", mean_latency_s * 1e6)

    async def close(self, timeout: float) -> None:
        await self.lanes.close(timeout)


class AsyncDispatcher:
    def __init__(self, handler: Callable[[Message], Any], lanes: int, loop: asyncio.AbstractEventLoop,
                 on_results: OnResults, store: IdempotencyStore | None, holds: Container[str] = ()) -> None:
        self.handler, self.lanes, self.loop, self.on_results, self.store = handler, lanes, loop, on_results, store
        self.holds = holds
        self.stopping = False
        self._lanes: list[deque[tuple[Message, bool]]] = [deque() for _ in range(lanes)]
        self._tasks: list[asyncio.Task[None] | None] = [None] * lanes

    def submit(self, items: list[tuple[Message, bool]]) -> None:
        n = self.lanes
        t = time.perf_counter()
        for item in items:
            item[0]._queued = t
            i = lane_of(item[0], n)
            self._lanes[i].append(item)
            t = self._tasks[i]
            if t is None or t.done():
                self._tasks[i] = self.loop.create_task(self._drain(i), name=f"afc-lane-{i}")

    async def _drain(self, i: int) -> None:
        lane, handler = self._lanes[i], self.handler
        perf, now = time.perf_counter, time.time
        results: list[Result] = []
        last_report = perf()
        while lane:
            msg, busy = lane.popleft()
            if gone(msg, self.stopping):
                results.append((msg, Outcome.ABANDONED, None, 0.0, 0.0, 0.0))
                continue
            if busy:
                claim = await self._wait_claim(msg)
                msg.claimed = claim is Claim.CLAIMED
                if claim is not Claim.CLAIMED:
                    results.append((msg, Outcome.SKIPPED if claim is Claim.DONE else Outcome.ABANDONED,
                                    None, 0.0, 0.0, 0.0))
                    continue
            e2e = now() - msg.timestamp / 1000.0
            t0 = perf()
            try:
                await handler(msg)
                results.append((msg, Outcome.OK, None, perf() - t0, e2e, t0 - msg._queued))
            except Exception as e:  # noqa: BLE001 - every failure is routed, none escapes
                results.append((msg, Outcome.FAILED, e, perf() - t0, e2e, t0 - msg._queued))
            t = perf()
            if t - last_report >= REPORT_EVERY_S or len(results) >= 256:
                self.on_results(results)
                results, last_report = [], t
        if results:
            self.on_results(results)

    async def _wait_claim(self, msg: Message) -> Claim | None:
        assert self.store is not None
        delay = BUSY_BACKOFF_S[0]
        while not gone(msg, self.stopping):
            try:
                claim = settle((await self.store.claim([msg.idempotency_key], []))[0], msg.idempotency_key,
                               self.holds)
            except StoreUnavailable as e:
                log.warning("event=busy-claim-check-failed key=%s error=%s", msg.idempotency_key, e)
                claim = Claim.BUSY
            if claim is not Claim.BUSY:
                return claim
            await asyncio.sleep(delay)
            delay = min(BUSY_BACKOFF_S[1], delay * 2)
        return None

    def tune(self, mean_latency_s: float, samples: int) -> None:
        """Async handlers always run as tasks on the loop."""

    async def close(self, timeout: float) -> None:
        self.stopping = True
        tasks = [t for t in self._tasks if t is not None and not t.done()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for t in pending:
                t.cancel()
