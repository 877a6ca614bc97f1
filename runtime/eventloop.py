"""The event loop the runtime runs on (handler.eventLoop), chosen in one place."""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("afc.runtime.eventloop")


def loop_factory(name: str) -> Any:
    """The `asyncio.Runner` loop factory for handler.eventLoop (None: asyncio's own loop).

    uvloop runs the loop's machinery (polling, callbacks, sockets) in C: the runtime's loop
    takes a few ticks per fetched batch (the Kafka thread's hand-over, the store call's
    socket, handler results), which at a modest rate is most of its CPU. Without uvloop
    installed (a platform it does not build on) the runtime says so and runs on asyncio's."""
    if name != "uvloop":
        return None
    try:
        import uvloop
    except ImportError:
        log.warning("event=event-loop-fallback wanted=uvloop using=asyncio reason=\"uvloop is not installed\"")
        return None
    return uvloop.new_event_loop


def loop_name(loop: Any) -> str:
    """The name handler.eventLoop gives a running loop's kind: uvloop | asyncio."""
    return type(loop).__module__.split(".")[0]
