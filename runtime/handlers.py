"""Finding the user's handler, and the built-in ones (HTTP sink, no-op).

A handler is `func(msg)`, sync or async; returning means done, raising means failed (see
`errors` and `routing` for how a failure is treated).
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
    """POST each message (or a micro-batch of messages) to a URL.

    2xx is success; 408, 429, 5xx and connection failures are transient; other 4xx permanent.
    In batch mode each call waits for the batch it joined, so the runtime still sees one
    result per message.
    """

    def __init__(self, settings: HandlerSettings, max_batch: int = 500, linger_s: float = 0.005) -> None:
        assert settings.http_sink_url
        self.url = settings.http_sink_url
        self.timeout = settings.http_timeout_s
        self.batch = settings.http_batch
        self.max_batch, self.linger_s = max_batch, linger_s
        self._session: Any = None
        self._pending: list[tuple[Message, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

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
        if not self.batch:
            await self._post(message_document(msg))
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((msg, fut))
        if len(self._pending) >= self.max_batch:
            await self._flush()
        elif self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._linger())
        await fut

    async def _linger(self) -> None:
        await asyncio.sleep(self.linger_s)
        await self._flush()

    async def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            await self._post([message_document(m) for m, _ in batch])
        except Exception as e:  # noqa: BLE001 - every waiter gets the same failure
            for _, f in batch:
                if not f.done():
                    f.set_exception(e)
        else:
            for _, f in batch:
                if not f.done():
                    f.set_result(None)

    async def close(self) -> None:
        await self._flush()
        if self._session is not None:
            await self._session.close()


def build_handler(settings: HandlerSettings) -> tuple[Handler, Callable[[], Awaitable[None]] | None]:
    """The handler to run and an optional async close hook."""
    if settings.http_sink_url:
        sink = HttpSink(settings)
        return sink, sink.close
    if not settings.handler:
        raise HandlerLoadError("no handler: set handler.handler (pkg.module:func) or handler.httpSinkUrl")
    return load_handler(settings.handler), None
