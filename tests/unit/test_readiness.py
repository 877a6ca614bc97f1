"""Issue 11: /readyz means "a member of the group holding its assignment".

The rebalance events are fed to the control loop's inbox exactly as the Kafka thread posts
them (no broker: the order of events is the test's, so every transition is deterministic);
the loop alone changes the state, and readiness() (what the HTTP server calls) only reads it.
The same transitions against the real broker: tests/integration/test_readiness.py."""
from __future__ import annotations

import asyncio
import concurrent.futures

from afc.runtime.config import load_settings
from afc.runtime.consumer import HOLDING, JOINING, LOST, REVOKING, Runtime
from afc.runtime.dispatch import TaskDispatcher


async def _noop(msg) -> None:  # noqa: ANN001 - an afc handler
    return None


async def runtime() -> Runtime:
    rt = Runtime(load_settings(kafka={"topics": ["t"]}, handler={"handler": "afc.runtime.handlers:noop"},
                               idempotency={"enabled": False}))
    rt.loop = asyncio.get_running_loop()
    rt.topic_ids = {"t": None}                  # known: no topic-id lookup (an admin call) on assign
    rt.dispatcher = TaskDispatcher(_noop, 1, rt.loop, rt.on_results, 0, 0.5, 4)
    rt.state = "running"
    return rt


def ready(rt: Runtime) -> bool:
    return rt.readiness()[0]


def revoke(rt: Runtime, *parts: int) -> concurrent.futures.Future:
    """What _on_revoke posts, then one loop pass that answers it (nothing in flight)."""
    reply: concurrent.futures.Future = concurrent.futures.Future()
    rt.inbox.append(("revoke", [("t", p) for p in parts], reply))
    rt._drain_inbox()
    return reply


async def test_ready_only_while_holding_an_assignment_through_every_rebalance_event() -> None:
    rt = await runtime()
    try:
        assert rt.membership == JOINING and not ready(rt), rt.readiness()
        rt.inbox.append(("assign", [(("t", 0), 1), (("t", 1), 2)]))
        rt._drain_inbox()
        assert rt.membership == HOLDING and ready(rt), rt.readiness()

        # Eager (or a cooperative round): revoke -> not ready while it is handled, and still
        # not ready once answered, until the rebalance ends with the next assignment.
        reply = revoke(rt, 0, 1)
        assert rt.membership == REVOKING and not ready(rt)
        assert "revoke" in rt.readiness()[1]
        rt._finish_revokes(asyncio.get_running_loop().time())
        assert reply.done() and not rt.parts and not ready(rt)
        rt.inbox.append(("assign", []))       # cooperative/KIP-848 end a round with an empty assign
        rt._drain_inbox()
        assert rt.membership == HOLDING and ready(rt)
        assert "idle" in rt.readiness()[1]

        # Lost (session timed out, or the group fenced our epoch): not ready until reassigned.
        rt.inbox.append(("assign", [(("t", 2), 3)]))
        rt._drain_inbox()
        rt.inbox.append(("lost", [("t", 2)]))
        rt._drain_inbox()
        assert rt.membership == LOST and not ready(rt) and not rt.parts
        rt.inbox.append(("assign", [(("t", 2), 4)]))
        rt._drain_inbox()
        assert ready(rt)

        # Fatal (a static member fenced by its own instance id): never ready again, even if an
        # assignment is still delivered afterwards.
        rt.inbox.append(("fatal", "kafka: Fatal consumer error: fenced"))
        rt._drain_inbox()
        assert not ready(rt) and rt.readiness()[1].startswith("fatal")
        rt.inbox.append(("assign", [(("t", 3), 5)]))
        rt._drain_inbox()
        assert not ready(rt)
    finally:
        await rt.dispatcher.close(1)


async def test_stopping_is_never_ready() -> None:
    rt = await runtime()
    try:
        rt.inbox.append(("assign", [(("t", 0), 1)]))
        rt._drain_inbox()
        rt.request_stop()
        assert not ready(rt) and rt.readiness()[1] == "stopping"
    finally:
        await rt.dispatcher.close(1)
