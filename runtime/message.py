"""The message object a handler receives, payload decoding and idempotency keys."""
from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Any, Callable

import orjson

from .errors import DecodeError

Decoder = Callable[[bytes | None], Any]


def decode_json(value: bytes | None) -> Any:
    if value is None:
        return None
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError as e:
        raise DecodeError(f"payload is not valid JSON: {e}") from e


def decode_text(value: bytes | None) -> Any:
    if value is None:
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DecodeError(f"payload is not valid UTF-8: {e}") from e


def decode_raw(value: bytes | None) -> Any:
    return value


DECODERS: dict[str, Decoder] = {"json": decode_json, "text": decode_text, "raw": decode_raw}


class Message:
    """One Kafka record as the handler sees it.

    `payload` is the decoded value; when decoding failed, `decode_error` holds the reason and
    the runtime routes the record as poison instead of calling the handler.
    """
    __slots__ = ("topic", "partition", "offset", "key", "value", "headers", "timestamp",
                 "payload", "decode_error", "idempotency_key", "attempts", "claimed", "_part", "_store", "_queued")

    def __init__(self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None,
                 headers: list[tuple[str, bytes]] | None, timestamp: int, payload: Any = None,
                 decode_error: DecodeError | None = None, idempotency_key: str = "") -> None:
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.key = key
        self.value = value
        self.headers = headers or []
        self.timestamp = timestamp          # ms since the epoch (producer or log-append time)
        self.payload = payload
        self.decode_error = decode_error
        self.idempotency_key = idempotency_key
        self.attempts = 0
        self.claimed = False                # this message won its idempotency claim
        self._part: Any = None              # the runtime's partition state (revocation flag)
        self._store: Any = None             # the idempotency store, for mark_done_in
        self._queued = 0.0                  # perf_counter when handed to a lane

    def mark_done_in(self, pipeline: Any) -> None:
        """Add this message's done mark to your own Redis MULTI/EXEC (same Redis as the
        idempotency store), so your effect and the mark commit atomically: a crash can then
        never leave the effect applied but the message unmarked (exactly-once effects)."""
        if self._store is None:
            raise TypeError("idempotency is disabled: there is no done mark to add")
        self._store.done_in(pipeline, self.idempotency_key)

    def header(self, name: str) -> bytes | None:
        """The last value of a header, or None."""
        found = None
        for k, v in self.headers:
            if k == name:
                found = v
        return found

    def __repr__(self) -> str:
        return f"Message({self.topic}[{self.partition}]@{self.offset} key={self.key!r})"


@lru_cache(maxsize=64)
def _path(dotted: str) -> tuple[str, ...]:
    return tuple(dotted.split("."))


def field_path(payload: Any, dotted: str) -> Any:
    cur = payload
    for part in _path(dotted):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def idempotency_key(msg: Message, header: str, payload_field: str | None) -> str:
    """The `idempotency-key` header, else the configured payload field, else the record's position.

    A key holding NUL (the store's batch separator) is replaced by its SHA-1."""
    for k, v in msg.headers:
        if k == header and v:
            return _safe(v.decode("utf-8", "replace"))
    if payload_field and msg.decode_error is None:
        v = field_path(msg.payload, payload_field)
        if v is not None and v != "":
            return _safe(str(v))
    return f"{msg.topic}/{msg.partition}/{msg.offset}"


def _safe(key: str) -> str:
    return key if "\0" not in key else "sha1:" + hashlib.sha1(key.encode()).hexdigest()
