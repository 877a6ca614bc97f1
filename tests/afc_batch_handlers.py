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
