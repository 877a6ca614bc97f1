"""Handlers the benchmark gives to `afc-consumer` (and the recorder the baselines share).

- `noop`: does nothing, so the throughput figure is the runtime's own cost.
- `batch_noop` / `batch_record_latency`: the same as batch handlers (`@afc.runtime.batch`):
  one call per batch of up to `handler.maxBatch` messages (the `afc-batch` variant).
- `record_latency`: notes (produce timestamp, handler start - produce timestamp) per message
  in memory and writes them at process exit, so the measurement itself adds no I/O on the hot
  path. afc exits cleanly on SIGTERM, so `atexit` runs.

The file named by `AFC_BENCH_LAT_FILE` holds native doubles (array('d')), four per message:
partition, offset, producer CreateTime (s), handler start - CreateTime (s). The orchestrator
uses CreateTime to skip the warm-up, and (partition, offset) to join each record with the
producer's acknowledgement time, which separates the broker's share of the latency from the
consumer's.
"""
from __future__ import annotations

import atexit
import os
import threading
import time
from array import array
from typing import Any

__all__ = ["noop", "record_latency", "batch_noop", "batch_record_latency", "slow_downstream", "LatencyRecorder", "RECORDER"]


def noop(msg: Any) -> None:
    """Does nothing (same as afc.runtime.handlers:noop; kept here so all variants share one)."""


def _batch(func: Any) -> Any:
    """`afc.runtime.batch`, without importing the runtime into the baselines' processes."""
    func.__afc_batch__ = True
    return func


@_batch
def batch_noop(msgs: list[Any]) -> None:
    """A batch handler that does nothing: the runtime's cost per message with one call per batch."""


class LatencyRecorder:
    """Appends one 4-tuple per message; a lock keeps each tuple together when lanes run concurrently."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.samples = array("d")
        self._lock = threading.Lock()
        if path:
            atexit.register(self.dump)

    def record(self, partition: int, offset: int, ts_ms: int) -> None:
        now = time.time()
        ts = ts_ms / 1000.0
        with self._lock:
            self.samples.extend((partition, offset, ts, now - ts))

    def dump(self) -> None:
        if not self.path:
            return
        tmp = self.path + ".tmp"
        with self._lock, open(tmp, "wb") as f:
            self.samples.tofile(f)
        os.replace(tmp, self.path)


RECORDER = LatencyRecorder(os.environ.get("AFC_BENCH_LAT_FILE"))


def record_latency(msg: Any) -> None:
    """afc handler: the runtime's Message carries the record timestamp in ms."""
    RECORDER.record(msg.partition, msg.offset, msg.timestamp)


@_batch
def batch_record_latency(msgs: list[Any]) -> None:
    """`record_latency` as a batch handler: each message's handler start is its batch's."""
    for m in msgs:
        RECORDER.record(m.partition, m.offset, m.timestamp)


def read_doubles(path: str, width: int) -> list[tuple[float, ...]]:
    """Rows of `width` doubles from a file written with array('d').tofile."""
    a = array("d")
    with open(path, "rb") as f:
        a.frombytes(f.read())
    return [tuple(a[i:i + width]) for i in range(0, len(a) - width + 1, width)]


def read_latencies(path: str) -> list[tuple[float, ...]]:
    """(partition, offset, CreateTime s, latency s) rows written by `LatencyRecorder.dump`."""
    return read_doubles(path, 4)


def slow_downstream(msg: Any) -> None:
    """A downstream 300x slower than a 0.1 ms call: 30 ms per message (bench/run.py's slowdown phase)."""
    time.sleep(0.030)
