"""Finding the user's handler, and the built-in ones (HTTP sink, no-op).

A handler is `func(msg)`, sync or async; returning means done, raising means failed (see
`errors` and `routing` for how a failure is treated). A *batch handler* is
`func(batch: list[Message])`, marked with `@batch` (docs/batch-handlers.md): returning means
every message of the batch is done; `BatchFailure({msg: exc})` fails only the named ones.
"""
from __future__ import annotations

import asyncio
import base64
import importlib
import inspect
import re
from typing import Any, Awaitable, Callable

from .config import HANDLER_PATH, HandlerSettings
from .errors import PermanentError, TransientError
from .message import Message

Handler = Callable[[Message], Any]


class HandlerLoadError(ValueError):
    pass


def load_handler(path: str) -> Handler:
    if not re.match(HANDLER_PATH, path):
        raise HandlerLoadError(f"handler {path!r} is not of the form pkg.module:func")
    mod_name, func_name = path.split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise HandlerLoadError(f"handler {path!r}: cannot import {mod_name}: {e}") from e
    func = getattr(mod, func_name, None)
    if not callable(func):
        raise HandlerLoadError(f"handler {path!r}: {mod_name} has no callable {func_name}")
    return func


BATCH_ATTR = "__afc_batch__"


def batch(func: Any) -> Any:
    """Mark `func` (sync or async, or a class whose instances are called) as a batch
    handler: it is called with a `list[Message]` of up to `handler.maxBatch` messages that
    are ready to run, and says per message how it went (returning: all done;
    `BatchFailure({msg: exc, ...})`: the named ones failed, the rest done; any other
    exception: all failed). The function is returned unchanged, only marked."""
    setattr(func, BATCH_ATTR, True)
    return func


def is_batch(handler: Any) -> bool:
    return bool(getattr(handler, BATCH_ATTR, False))


def is_async(handler: Handler) -> bool:
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(getattr(handler, "__call__", None))


def noop(msg: Message) -> None:
    """Does nothing: for benchmarks and for draining a topic."""


def message_document(msg: Message) -> dict[str, Any]:
    """The JSON body the HTTP sink posts for one message."""
    doc: dict[str, Any] = {
        "topic": msg.topic, "partition": msg.partition, "offset": msg.offset, "timestamp": msg.timestamp,
        "key": None if msg.key is None else base64.b64encode(msg.key).decode(),
        "headers": [[k, base64.b64encode(v or b"").decode()] for k, v in msg.headers],
        "idempotencyKey": msg.idempotency_key,
    }
    if msg.decode_error is None and not isinstance(msg.payload, bytes):
        doc["payload"] = msg.payload
    else:
        doc["value"] = None if msg.value is None else base64.b64encode(msg.value).decode()
    return doc


class HttpSink:
    """POST each message to a URL as a JSON object (`message_document`).

    2xx is success; 408, 429, 5xx and connection failures are transient; other 4xx permanent.
    """

    def __init__(self, settings: HandlerSettings) -> None:
        assert settings.http_sink_url
        self.url = settings.http_sink_url
        self.timeout = settings.http_timeout_s
        self._session: Any = None

    async def _post(self, body: Any) -> None:
        import aiohttp
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        try:
            async with self._session.post(self.url, json=body) as resp:
                if 200 <= resp.status < 300:
                    return
                text = (await resp.text())[:200]
                if resp.status in (408, 429) or resp.status >= 500:
                    raise TransientError(f"http sink {resp.status}: {text}")
                raise PermanentError(f"http sink {resp.status}: {text}")
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise TransientError(f"http sink unreachable: {type(e).__name__}: {e}") from e

    async def __call__(self, msg: Message) -> None:
        await self._post(message_document(msg))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


@batch
class HttpBatchSink(HttpSink):
    """`handler.httpBatch`: a batch handler, one POST per batch whose body is a JSON array of
    `message_document`s in the batch's order. The response decides for the whole batch (a
    non-2xx fails every message of it, classified as above)."""

    async def __call__(self, msgs: list[Message]) -> None:  # type: ignore[override]
        await self._post([message_document(m) for m in msgs])


def build_handler(settings: HandlerSettings) -> tuple[Handler, Callable[[], Awaitable[None]] | None]:
    """The handler to run and an optional async close hook."""
    if settings.http_sink_url:
        sink = HttpBatchSink(settings) if settings.http_batch else HttpSink(settings)
        return sink, sink.close
    if not settings.handler:
        raise HandlerLoadError("no handler: set handler.handler (pkg.module:func) or handler.httpSinkUrl")
    return load_handler(settings.handler), None
