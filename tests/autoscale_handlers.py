"""Handlers the autoscaling tests run inside `afc-consumer` (imported by path)."""
from __future__ import annotations

import os
import time

from afc_test_handlers import _redis  # one Redis client per process, made under a lock


def record(msg) -> None:
    """Sleeps as long as the Redis key AFC_TEST_LATENCY_KEY says (ms, if set), then records when
    the message's partition was consumed: RPUSH <AFC_TEST_HASH>:p<partition> <unix time>."""
    r = _redis()
    key = os.environ.get("AFC_TEST_LATENCY_KEY")
    ms = float(r.get(key) or 0) if key else 0.0
    if ms:
        time.sleep(ms / 1000)
    r.rpush(f"{os.environ['AFC_TEST_HASH']}:p{msg.partition}", repr(time.time()))


def poison_on_partition(msg) -> None:
    """Fails every message of partition AFC_TEST_POISON_PARTITION (with routing off the runtime
    retries it in place, holding that partition: a stuck partition); records the others."""
    if msg.partition == int(os.environ["AFC_TEST_POISON_PARTITION"]):
        raise ConnectionError("downstream refuses this partition's records")
    record(msg)


def fail_always(msg) -> None:
    """A broken release: every message fails (a transient error, so it is retried and routed)."""
    raise ConnectionError("this release cannot reach its downstream")
