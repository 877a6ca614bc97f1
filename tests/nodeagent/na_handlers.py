"""A handler for consumer pods the node agent runs (tests/integration/test_node_agent.py).

Configured by env vars a pod template may set (AFC_* belongs to the operator): NA_REDIS_URL
and NA_HASH; each message bumps its offset's field in that hash, so a test sees every
message handled and how often.
"""
from __future__ import annotations

import os
import threading

import redis

_client: redis.Redis | None = None
_lock = threading.Lock()


def record(msg) -> None:
    global _client
    with _lock:
        if _client is None:
            _client = redis.Redis.from_url(os.environ["NA_REDIS_URL"])
    _client.hincrby(os.environ["NA_HASH"], f"{msg.partition}:{msg.offset}", 1)
