"""The handler the demo's consumer pods run (`orders:apply`, on PYTHONPATH in the pods).

Applies an order as a team would: one write to its store (a Redis hash of order id -> times
applied), atomically with the idempotency done mark, after a few milliseconds of simulated
downstream work, so the backlog takes a while to drain and the autoscaler has work to see."""
from __future__ import annotations

import os
import threading
import time

_client = None
_lock = threading.Lock()


def _redis():
    global _client
    with _lock:
        if _client is None:
            import redis
            _client = redis.Redis.from_url(os.environ["AFC_IDEMPOTENCY__REDIS_URL"])
        return _client


def apply(msg) -> None:
    order = msg.payload
    time.sleep(float(os.environ.get("DEMO_WORK_MS", "4")) / 1000)   # the downstream's share
    pipe = _redis().pipeline(transaction=True)
    pipe.hincrby(os.environ["DEMO_APPLIED_HASH"], order["id"], 1)
    msg.mark_done_in(pipe)
    pipe.execute()
