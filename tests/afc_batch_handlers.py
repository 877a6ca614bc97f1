"""Batch handlers the integration tests run inside `afc-consumer` (tests/integration/test_batch_handlers.py)."""
from __future__ import annotations

import os

from afc.runtime import BatchFailure, Message, batch, mark_batch_done_in
from afc_test_handlers import _redis


@batch
def apply_batch(msgs: list[Message]) -> None:
    """One bulk write per batch: the effects of every message that did not fail and their
    done marks in ONE MULTI. Payload `{"fail": "permanent"}` fails the message (ValueError:
    dead-lettered), `{"fail": "transient", "times": n}` fails its first n runs (TimeoutError:
    retry topic), `{"boom": true}` anywhere in the batch fails the whole batch. Every call
    records its size; every message seen counts a run (outside the transaction)."""
    r = _redis()
    h = os.environ["AFC_TEST_HASH"]
    r.rpush(f"{h}:sizes", len(msgs))
    r.hincrby(f"{h}:calls", "calls", 1)
    for m in msgs:
        r.hincrby(f"{h}:runs", m.idempotency_key, 1)
    if any(isinstance(m.payload, dict) and m.payload.get("boom") for m in msgs):
        raise RuntimeError("bulk write refused")
    failed: dict[Message, BaseException] = {}
    for m in msgs:
        p = m.payload if isinstance(m.payload, dict) else {}
        if p.get("fail") == "permanent":
            failed[m] = ValueError(f"invalid record {p.get('n')}")
        elif p.get("fail") == "transient" and r.hincrby(f"{h}:tries", m.idempotency_key, 1) <= p.get("times", 1):
            failed[m] = TimeoutError(f"downstream timed out on {p.get('n')}")
    ok = [m for m in msgs if m not in failed]
    if ok:
        pipe = r.pipeline(transaction=True)
        for m in ok:
            pipe.rpush(os.environ["AFC_TEST_LIST"], f"{m.partition}:{m.offset}:{m.payload['n']}")
        mark_batch_done_in(pipe, ok)
        pipe.execute()
    if failed:
        raise BatchFailure(failed)


@batch
def guarded_batch(msgs: list[Message]) -> None:
    """`afc_test_handlers.guarded_effect` for a batch: notes the call (`<who>:<n>,<n>...`),
    sleeps the first message's payload.sleep_ms on the batch's first run only, then RPUSHes
    `<who>:<n>` per message in ONE MULTI with all the done marks; notes `<who>:ok` or
    `<who>:<exception class>` and re-raises."""
    r, lst, who = _redis(), os.environ["AFC_TEST_LIST"], os.environ["AFC_TEST_WHO"]
    r.rpush(f"{lst}:started", f"{who}:" + ",".join(str(m.payload["n"]) for m in msgs))
    ms = msgs[0].payload.get("sleep_ms")
    if ms and r.hsetnx(f"{lst}:slept", who, 1):
        import time
        time.sleep(ms / 1000)
    try:
        pipe = r.pipeline(transaction=True)
        for m in msgs:
            pipe.rpush(lst, f"{who}:{m.payload['n']}")
        mark_batch_done_in(pipe, msgs)
        pipe.execute()
    except Exception as e:
        r.rpush(f"{lst}:outcome", f"{who}:{type(e).__module__}.{type(e).__qualname__}")
        raise
    r.rpush(f"{lst}:outcome", f"{who}:ok")
