"""Running the handler: key-ordered lanes, concurrent across keys.

A message goes to lane `hash(key) % workers` (keyless messages spread by offset), and a lane
runs its messages one after another, so messages with the same key are handled in order
while different keys run concurrently. Sync handlers run inline on the loop while they are
fast, on one thread per lane when they are slow; async handlers as one task per busy lane.

Results go back to the loop in chunks (one wake-up per chunk, not per message), and at
least every `REPORT_EVERY_S` so a slow handler still reports promptly.

A lane never waits on anything but the handler: a message whose idempotency key is held
elsewhere is parked by the loop, not queued here, because a lane blocked on a key whose
holder sits queued in another lane is a deadlock.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from enum import IntEnum
from typing import Any, Callable

from .message import Message

log = logging.getLogger("afc.runtime.dispatch")
REPORT_EVERY_S = 0.02


class Outcome(IntEnum):
    OK = 0
    FAILED = 1
    ABANDONED = 2     # partition revoked or shutting down before it ran


# (message, outcome, error, handler seconds, end-to-end seconds at start, seconds queued in its lane)
Result = tuple[Message, Outcome, BaseException | None, float, float, float]
OnResults = Callable[[list[Result]], None]


def gone(msg: Message, stopping: bool) -> bool:
    """The message must not start: its partition was revoked, or the runtime is stopping."""
    part = msg._part
    return stopping or (part is not None and part.revoked)


def not_to_run(msg: Message, stopping: bool) -> Result | None:
    """The result of a message that must not reach the handler: abandoned (its partition
    left us, or we stop) or poison (it could not be decoded; routed without running)."""
    if gone(msg, stopping):
        return (msg, Outcome.ABANDONED, None, 0.0, 0.0, 0.0)
    if msg.decode_error is not None:
        return (msg, Outcome.FAILED, msg.decode_error, 0.0, 0.0, 0.0)
    return None


def lane_of(msg: Message, lanes: int) -> int:
    if msg.key is not None:
        return hash(msg.key) % lanes
    return (msg.offset + msg.partition) % lanes


class ThreadDispatcher:
    def __init__(self, handler: Callable[[Message], Any], lanes: int, loop: asyncio.AbstractEventLoop,
                 on_results: OnResults) -> None:
        self.handler, self.lanes, self.loop, self.on_results = handler, lanes, loop, on_results
        self.stopping = False
        self._queues: list[queue.SimpleQueue[list[Message] | None]] = [queue.SimpleQueue() for _ in range(lanes)]
        self._threads = [threading.Thread(target=self._work, args=(q,), name=f"afc-lane-{i}", daemon=True)
                         for i, q in enumerate(self._queues)]
        for t in self._threads:
            t.start()

    def submit(self, msgs: list[Message]) -> None:
        n = self.lanes
        now = time.perf_counter()
        chunks: list[list[Message] | None] = [None] * n
        for m in msgs:
            m._queued = now
            i = lane_of(m, n) if n > 1 else 0
            c = chunks[i]
            if c is None:
                chunks[i] = [m]
            else:
                c.append(m)
        for i, c in enumerate(chunks):
            if c:
                self._queues[i].put(c)

    def _report(self, results: list[Result]) -> None:
        try:
            self.loop.call_soon_threadsafe(self.on_results, results)
        except RuntimeError:     # loop closed during a hard exit
            pass

    def _work(self, q: "queue.SimpleQueue[list[Message] | None]") -> None:
        while True:
            chunk = q.get()
            if chunk is None:
                return
            self.run_chunk(chunk, self._report)

    def run_chunk(self, chunk: list[Message], report: OnResults) -> None:
        """Run a lane's messages in order, reporting at least every REPORT_EVERY_S."""
        handler = self.handler
        perf, now = time.perf_counter, time.time
        results: list[Result] = []
        last_report = perf()
        for msg in chunk:
            skip = not_to_run(msg, self.stopping)
            if skip is not None:
                results.append(skip)
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
    only when the lanes are empty, so a key's messages never run out of order.
    """

    INLINE_MAX_S = 0.00005

    def __init__(self, handler: Callable[[Message], Any], lanes: int, loop: asyncio.AbstractEventLoop,
                 on_results: OnResults) -> None:
        self.on_results = on_results
        self.lanes = ThreadDispatcher(handler, lanes, loop, self._from_lanes)
        self.inline = False
        self.queued = 0

    @property
    def stopping(self) -> bool:
        return self.lanes.stopping

    def _from_lanes(self, results: list[Result]) -> None:
        self.queued -= len(results)
        self.on_results(results)

    def submit(self, msgs: list[Message]) -> None:
        if self.inline and self.queued == 0:
            now = time.perf_counter()
            for m in msgs:
                m._queued = now
            self.lanes.run_chunk(msgs, self.on_results)
            return
        self.queued += len(msgs)
        self.lanes.submit(msgs)

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
                 on_results: OnResults) -> None:
        self.handler, self.lanes, self.loop, self.on_results = handler, lanes, loop, on_results
        self.stopping = False
        self._lanes: list[deque[Message]] = [deque() for _ in range(lanes)]
        self._tasks: list[asyncio.Task[None] | None] = [None] * lanes

    def submit(self, msgs: list[Message]) -> None:
        n = self.lanes
        now = time.perf_counter()
        for m in msgs:
            m._queued = now
            i = lane_of(m, n)
            self._lanes[i].append(m)
            t = self._tasks[i]
            if t is None or t.done():
                self._tasks[i] = self.loop.create_task(self._drain(i), name=f"afc-lane-{i}")

    async def _drain(self, i: int) -> None:
        lane, handler = self._lanes[i], self.handler
        perf, now = time.perf_counter, time.time
        results: list[Result] = []
        last_report = perf()
        while lane:
            msg = lane.popleft()
            skip = not_to_run(msg, self.stopping)
            if skip is not None:
                results.append(skip)
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

    def tune(self, mean_latency_s: float, samples: int) -> None:
        """Async handlers always run as tasks on the loop."""

    async def close(self, timeout: float) -> None:
        self.stopping = True
        tasks = [t for t in self._tasks if t is not None and not t.done()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for t in pending:
                t.cancel()
