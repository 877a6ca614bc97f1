"""A simulated downstream of known capacity, run by `afc-consumer` as its handler (bench/concurrency.py).

Model (no semaphore: nothing is refused, calls only get slower): a call that starts while
n calls are in progress (itself included) takes L * max(1, n / C). Up to C concurrent calls
the latency is flat at L; beyond, it grows as in a queue in front of C servers, so the
throughput n / latency never exceeds C / L however many calls are made.

- `async_call`: `await asyncio.sleep(...)` (an async handler).
- `sync_call`: `time.sleep(...)` (a sync handler on afc's worker threads).

Configured by environment (read at import, in the consumer process):
  AFC_BENCH_DS_LATENCY_MS   L (default 5)
  AFC_BENCH_DS_SCHEDULE     capacity over time, "0:64" or "0:64,8:16,16:64" (seconds since
                            the first call: C from then on)
  AFC_BENCH_DS_FILE         where the calls are written at exit: native doubles
                            (array('d')), four per call: start (s since the first call),
                            the model's latency (s), the measured latency (s), calls in
                            progress at its start
Only the standard library is imported, so the model costs the consumer nothing extra.
"""
from __future__ import annotations

import asyncio
import atexit
import os
import threading
import time
from array import array
from typing import Any

__all__ = ["Downstream", "async_call", "sync_call", "parse_schedule"]


def parse_schedule(text: str) -> list[tuple[float, int]]:
    """"0:64,8:16" -> [(0.0, 64), (8.0, 16)], sorted by time."""
    out = []
    for part in text.split(","):
        t, c = part.split(":")
        out.append((float(t), int(c)))
    return sorted(out)


class Downstream:
    def __init__(self, latency_s: float, schedule: list[tuple[float, int]], path: str | None) -> None:
        self.latency_s = latency_s
        self.schedule = schedule
        self.path = path
        self.active = 0
        self.t0: float | None = None
        self.calls = array("d")
        self._lock = threading.Lock()     # sync calls come from many threads
        if path:
            atexit.register(self.dump)

    def capacity(self, t: float) -> int:
        c = self.schedule[0][1]
        for at, cap in self.schedule:
            if t >= at:
                c = cap
        return c

    def _enter(self) -> tuple[float, float, int]:
        now = time.perf_counter()
        with self._lock:
            if self.t0 is None:
                self.t0 = now
            self.active += 1
            n = self.active
        t = now - self.t0
        return t, self.latency_s * max(1.0, n / self.capacity(t)), n

    def _leave(self, t: float, delay: float, start: float, n: int) -> None:
        took = time.perf_counter() - start
        with self._lock:
            self.active -= 1
            self.calls.extend((t, delay, took, n))

    async def acall(self) -> None:
        start = time.perf_counter()
        t, delay, n = self._enter()
        try:
            await asyncio.sleep(delay)
        finally:
            self._leave(t, delay, start, n)

    def call(self) -> None:
        start = time.perf_counter()
        t, delay, n = self._enter()
        try:
            time.sleep(delay)
        finally:
            self._leave(t, delay, start, n)

    def dump(self) -> None:
        if not self.path:
            return
        tmp = self.path + ".tmp"
        with self._lock, open(tmp, "wb") as f:
            self.calls.tofile(f)
        os.replace(tmp, self.path)


DOWNSTREAM = Downstream(float(os.environ.get("AFC_BENCH_DS_LATENCY_MS", "5")) / 1000,
                        parse_schedule(os.environ.get("AFC_BENCH_DS_SCHEDULE", "0:64")),
                        os.environ.get("AFC_BENCH_DS_FILE"))


async def async_call(msg: Any) -> None:
    """afc handler (async): one call to the downstream."""
    await DOWNSTREAM.acall()


def sync_call(msg: Any) -> None:
    """afc handler (sync): one call to the downstream."""
    DOWNSTREAM.call()
