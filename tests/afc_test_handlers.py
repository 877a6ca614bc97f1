"""Handlers the integration tests run inside `afc-consumer` (imported by path)."""
from __future__ import annotations

import os
import threading
import time

import redis

_r: redis.Redis | None = None
_r_lock = threading.Lock()


def _redis() -> redis.Redis:
    """One client per process. The lock matters: handlers start on 16 lanes at once, and a
    second client made by a racing thread is garbage-collected, closing sockets in use."""
    global _r
    with _r_lock:
        if _r is None:
            _r = redis.Redis.from_url(os.environ["AFC_TEST_REDIS_URL"])
        return _r


def append_effect(msg) -> None:
    """The effect is an RPUSH of the message id; it commits atomically with the done mark."""
    pipe = _redis().pipeline(transaction=True)
    pipe.rpush(os.environ["AFC_TEST_LIST"], f"{msg.partition}:{msg.offset}:{msg.payload['n']}")
    msg.mark_done_in(pipe)
    pipe.execute()


def append_with_latency(msg) -> None:
    """Sleeps as long as the Redis key AFC_TEST_LATENCY_KEY says (ms), then appends."""
    r = _redis()
    ms = float(r.get(os.environ["AFC_TEST_LATENCY_KEY"]) or 0)
    if ms:
        time.sleep(ms / 1000)
    r.rpush(os.environ["AFC_TEST_LIST"], msg.offset)


def count_runs(msg) -> None:
    """HINCRBY per idempotency key: counts how often the handler really ran for a key."""
    ms = float(os.environ.get("AFC_TEST_SLEEP_MS", "0"))
    if ms:
        time.sleep(ms / 1000)
    _redis().hincrby(os.environ["AFC_TEST_HASH"], msg.idempotency_key, 1)


def record_time(msg) -> None:
    """Remember when the handler ran for each idempotency key."""
    _redis().hset(os.environ["AFC_TEST_HASH"], msg.idempotency_key, repr(time.time()))


def slow_count(msg) -> None:
    """Sleeps AFC_TEST_SLEEP_MS, then counts the run (for drain and shutdown tests)."""
    time.sleep(float(os.environ.get("AFC_TEST_SLEEP_MS", "0")) / 1000)
    _redis().hincrby(os.environ["AFC_TEST_HASH"], msg.idempotency_key, 1)


_running = 0


async def async_ordered(msg) -> None:
    """Async: records the sequence of each key, the highest concurrency seen, and the event
    loop it runs on (its class's top-level module: uvloop or asyncio)."""
    import asyncio
    import random
    global _running
    _running += 1
    try:
        r = _redis()
        if "AFC_TEST_LOOP_KEY" in os.environ:
            r.set(os.environ["AFC_TEST_LOOP_KEY"], type(asyncio.get_running_loop()).__module__.split(".")[0])
        r.set(os.environ["AFC_TEST_MAX_CONC"], _running, get=False) if _running > int(
            r.get(os.environ["AFC_TEST_MAX_CONC"]) or 0) else None
        await asyncio.sleep(random.random() * 0.01)
        r.rpush(f"{os.environ['AFC_TEST_LIST']}:{msg.key.decode()}", msg.payload["seq"])
    finally:
        _running -= 1


def fails_until(msg) -> None:
    """Raises ConnectionError while the Redis flag AFC_TEST_FAIL_KEY is set, then counts."""
    r = _redis()
    if r.get(os.environ["AFC_TEST_FAIL_KEY"]):
        r.hincrby(os.environ["AFC_TEST_HASH"] + ":failures", msg.idempotency_key, 1)
        raise ConnectionError("downstream refused")
    r.hincrby(os.environ["AFC_TEST_HASH"], msg.idempotency_key, 1)


def scripted(msg) -> None:
    """Behaves as the payload says; records every call (time, due header, attempts).

    {"fail": "always"}                -> ValueError (PERMANENT) every time
    {"fail": "transient", "times": n} -> TimeoutError the first n calls for this key
    AFC_TEST_FAIL_KEY set in Redis    -> ValueError until it is cleared ("broken until fixed")
    """
    import json as _json
    r = _redis()
    h, key = os.environ["AFC_TEST_HASH"], msg.idempotency_key
    due = msg.header("afc-due-at")
    r.rpush(f"{h}:calls:{key}", _json.dumps({"at": time.time() * 1000, "due": float(due) if due else None,
                                             "attempts": msg.attempts, "topic": msg.topic}))
    p = msg.payload if isinstance(msg.payload, dict) else {}
    if p.get("fail") == "always":
        raise ValueError("invalid order")
    if p.get("fail") == "transient" and r.hincrby(f"{h}:tries", key, 1) <= p.get("times", 2):
        raise TimeoutError("downstream timed out")
    flag = os.environ.get("AFC_TEST_FAIL_KEY")
    if flag and r.get(flag):
        raise ValueError("broken until fixed")
    r.hincrby(h, key, 1)


# ---------------------------------------------------------------------------- issue 9 (runtime core)

def fail_first_attempt(msg) -> None:
    """TimeoutError (TRANSIENT) on a record's first run, success on its retry: counts
    successes per payload id (HINCRBY), so duplicates and losses both show."""
    if msg.attempts == 0:
        raise TimeoutError("downstream timed out")
    _redis().hincrby(os.environ["AFC_TEST_HASH"], msg.payload["n"], 1)


def count_by_id(msg) -> None:
    """HINCRBY per payload id (not per idempotency key, which may collide)."""
    _redis().hincrby(os.environ["AFC_TEST_HASH"], msg.payload["n"], 1)


def sleep_and_record(msg) -> None:
    """Sleeps payload.sleep_ms (default AFC_TEST_SLEEP_MS), then counts `partition:offset`."""
    p = msg.payload if isinstance(msg.payload, dict) else {}
    ms = float(p.get("sleep_ms", os.environ.get("AFC_TEST_SLEEP_MS", "0")))
    if ms:
        time.sleep(ms / 1000)
    _redis().hincrby(os.environ["AFC_TEST_HASH"], f"{msg.partition}:{msg.offset}", 1)


_seen: list[tuple[str, str]] = []
_seen_lock = threading.Lock()
_flusher: threading.Thread | None = None


def _flush_seen() -> None:
    """Writes what `fast_unless_told` saw to Redis every 50 ms, off the handler's path, so the
    handler itself stays at microseconds (the runtime then picks its inline dispatch mode)."""
    r = _redis()
    h = os.environ["AFC_TEST_HASH"]
    while True:
        time.sleep(0.05)
        with _seen_lock:
            batch = _seen[:]
            del _seen[:]
        if batch:
            r.hset(h, mapping=dict(batch))


def fast_unless_told(msg) -> None:
    """Microseconds per record; a payload {"sleep_s": s} sleeps s seconds instead (a stuck call).

    Remembers `n -> "<record timestamp ms> <handler start s> <handler end s or ->"` in
    AFC_TEST_HASH (written by a background thread, so it shows even while the loop is frozen)."""
    global _flusher
    if _flusher is None:
        with _seen_lock:
            if _flusher is None:
                _flusher = threading.Thread(target=_flush_seen, name="test-flusher", daemon=True)
                _flusher.start()
    start = time.time()
    p = msg.payload
    s = p.get("sleep_s") if isinstance(p, dict) else None
    if s:
        with _seen_lock:
            _seen.append((str(p["n"]), f"{msg.timestamp} {start} -"))
        time.sleep(s)
    with _seen_lock:
        _seen.append((str(p["n"]), f"{msg.timestamp} {start} {time.time()}"))


def ordered_flaky(msg) -> None:
    """Sync: appends payload.seq to `<AFC_TEST_LIST>:<record key>`; a payload {"fail_times": n}
    raises TimeoutError on its first n runs (counted in Redis by payload id)."""
    r = _redis()
    p = msg.payload
    if p.get("fail_times") and r.hincrby(os.environ["AFC_TEST_LIST"] + ":tries", p["n"], 1) <= p["fail_times"]:
        raise TimeoutError("downstream timed out")
    r.rpush(f"{os.environ['AFC_TEST_LIST']}:{msg.key.decode()}", p["seq"])


def guarded_effect(msg) -> None:
    """Notes its start, sleeps payload.sleep_ms, then RPUSHes `<AFC_TEST_WHO>:<n>` in one MULTI
    with the done mark (mark_done_in); notes `<who>:ok` or `<who>:<exception class>` and
    re-raises. Lists: AFC_TEST_LIST (effects), AFC_TEST_LIST:started, AFC_TEST_LIST:outcome."""
    r, lst, who = _redis(), os.environ["AFC_TEST_LIST"], os.environ["AFC_TEST_WHO"]
    r.rpush(f"{lst}:started", f"{who}:{msg.payload['n']}")
    if msg.payload.get("sleep_ms"):
        time.sleep(msg.payload["sleep_ms"] / 1000)
    try:
        pipe = r.pipeline(transaction=True)
        pipe.rpush(lst, f"{who}:{msg.payload['n']}")
        msg.mark_done_in(pipe)
        pipe.execute()
    except Exception as e:
        r.rpush(f"{lst}:outcome", f"{who}:{type(e).__module__}.{type(e).__qualname__}")
        raise
    r.rpush(f"{lst}:outcome", f"{who}:ok")


_ds_active = 0
_ds_peak = 0


async def capacity_downstream(msg) -> None:
    """A downstream of capacity AFC_TEST_CAPACITY: 5 ms while at most that many calls run, 5 ms *
    n / capacity beyond. The most calls seen at once goes to the hash AFC_TEST_HASH (field
    peak) whenever it rises, so the test can hold it against the limit afc reported."""
    import asyncio
    global _ds_active, _ds_peak
    cap = int(os.environ["AFC_TEST_CAPACITY"])
    _ds_active += 1
    try:
        if _ds_active > _ds_peak:
            _ds_peak = _ds_active
            await asyncio.to_thread(_redis().hset, os.environ["AFC_TEST_HASH"], "peak", _ds_peak)
        await asyncio.sleep(0.005 * max(1.0, _ds_active / cap))
    finally:
        _ds_active -= 1


def value_or_caught_payload(msg) -> None:
    """Records `value` for records whose value starts with b"v:" (never reading `payload`);
    reads `payload` of the others and swallows the DecodeError (to show it is poison anyway)."""
    from afc.runtime.errors import DecodeError
    if msg.value and msg.value.startswith(b"v:"):
        _redis().hset(os.environ["AFC_TEST_HASH"], str(msg.offset), msg.value)
        return
    try:
        doc = msg.payload
    except DecodeError:
        _redis().hset(os.environ["AFC_TEST_HASH"], str(msg.offset), b"caught")
        return
    _redis().hset(os.environ["AFC_TEST_HASH"], str(msg.offset), repr(doc))


_rc = None


def cluster_effect(msg) -> None:
    """RPUSHes the idempotency key to `<AFC_TEST_LIST>:<the claim's hash tag>` on the Redis Cluster
    (AFC_TEST_CLUSTER_URL) in one MULTI with the done mark (mark_done_in): exactly-once effects."""
    global _rc
    with _r_lock:
        if _rc is None:
            from afc.runtime.redisconn import sync_client
            _rc = sync_client(os.environ["AFC_TEST_CLUSTER_URL"], socket_timeout=5, retries=3)
    key = msg.idempotency_key
    pipe = _rc.pipeline(transaction=True)
    pipe.rpush(f"{os.environ['AFC_TEST_LIST']}:{msg.hash_tag}", key)
    msg.mark_done_in(pipe)
    pipe.execute()
