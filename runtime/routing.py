"""What happens to a message whose handler failed.

The router answers with a verdict the loop acts on:
- "resubmit": run the handler again now (the router already waited its backoff);
- "finished": the failure was dealt with (e.g. routed to another topic, produce
  acknowledged), so the offset may move past it;
- "abandoned": the partition moved away or the runtime stops; leave it unfinished.

A failed message is never finished without a verdict, so its offset is never committed
past an unhandled failure.
"""
from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING, Literal, Protocol

from .message import Message

if TYPE_CHECKING:
    from .consumer import Runtime

log = logging.getLogger("afc.runtime.routing")
Verdict = Literal["resubmit", "finished", "abandoned"]


class Router(Protocol):
    async def route(self, msg: Message, err: BaseException, runtime: "Runtime") -> Verdict: ...


def backoff_s(attempt: int, base_s: float, cap_s: float, jitter: float = 0.2, rnd: random.Random | None = None) -> float:
    """Capped exponential backoff with proportional jitter: base * 2^(attempt-1), +-jitter."""
    d = min(cap_s, base_s * (2 ** max(0, attempt - 1)))
    r = (rnd or random).uniform(-jitter, jitter)
    return max(0.0, d * (1 + r))


class InPlaceRetry:
    """Retry in place with capped exponential backoff, holding the partition's commit point
    (Karafka-style pause). Used when no failure topics are configured: nothing is lost,
    the message simply is not passed."""

    def __init__(self, base_s: float = 0.2, cap_s: float = 30.0) -> None:
        self.base_s, self.cap_s = base_s, cap_s

    async def route(self, msg: Message, err: BaseException, runtime: "Runtime") -> Verdict:
        delay = backoff_s(msg.attempts + 1, self.base_s, self.cap_s)
        log.warning("event=handler-failed action=retry-in-place topic=%s partition=%d offset=%d attempt=%d "
                    "delay_s=%.2f error_class=%s error=\"%s\"", msg.topic, msg.partition, msg.offset,
                    msg.attempts + 1, delay, type(err).__name__, str(err)[:200])
        end = asyncio.get_running_loop().time() + delay
        while asyncio.get_running_loop().time() < end:
            if msg._part.revoked or runtime.stopping:
                return "abandoned"
            await asyncio.sleep(min(0.05, end - asyncio.get_running_loop().time()))
        return "resubmit"
