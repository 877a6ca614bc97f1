"""The message object a handler receives, payload decoding and idempotency keys."""
from __future__ import annotations

import base64
import inspect
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


UNREAD: Any = object()          # the payload has not been decoded yet


class Message:
    """One Kafka record as the handler sees it.

    `payload` is the decoded value, decoded when first read (a handler that never reads it,
    or reads only `value`, costs no decoding). A payload that cannot be decoded raises
    `DecodeError` (a `PoisonError`) from `payload`; `decode_error` says why without raising.
    The runtime routes such a record as poison even if the handler caught the error, and
    never hands the handler a record it already knows to be undecodable or oversized.
    """
    __slots__ = ("topic", "partition", "offset", "key", "value", "headers", "timestamp",
                 "_payload", "_derr", "_decoder", "idempotency_key", "attempts", "claimed", "token", "queued_at",
                 "_part", "_store", "_fenced")

    def __init__(self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None,
                 headers: list[tuple[str, bytes]] | None, timestamp: int, payload: Any = UNREAD,
                 decode_error: Exception | None = None, idempotency_key: str = "",
                 decoder: Decoder | None = None, part: Any = None, store: Any = None) -> None:
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.key = key
        self.value = value
        self.headers = headers or []
        self.timestamp = timestamp          # ms since the epoch (producer or log-append time)
        self._payload = payload if payload is not UNREAD or decoder is not None else None
        self._derr = decode_error
        self._decoder = decoder             # decodes `value` at the first read of `payload`
        self.idempotency_key = idempotency_key
        self.attempts = 0
        self.claimed = False                # this message holds its idempotency claim (or needs none)
        self.token = ""                     # the claim's fencing token
        self.queued_at = 0.0                # perf_counter when handed to a worker
        self._part: Any = part              # the runtime's Partition
        self._store: Any = store            # the idempotency store, for mark_done_in
        self._fenced = False                # mark_done_in was used: a WatchError means the claim was lost

    @property
    def payload(self) -> Any:
        p = self._payload
        if p is UNREAD:
            if self._derr is not None:
                raise self._derr
            p = self._decode()
        return p

    @payload.setter
    def payload(self, value: Any) -> None:
        self._payload, self._derr = value, None

    @property
    def decode_error(self) -> Exception | None:
        """Why the payload cannot be decoded (None: it can); decodes it if not done yet."""
        if self._derr is None and self._payload is UNREAD:
            try:
                self._decode()
            except Exception:  # noqa: BLE001 - kept in _derr
                pass
        return self._derr

    def _decode(self) -> Any:
        assert self._decoder is not None
        try:
            p = self._decoder(self.value)
        except Exception as e:  # noqa: BLE001 - DecodeError and anything a decoder raises
            self._derr = e
            raise
        self._payload = p
        return p

    def mark_done_in(self, pipeline: Any) -> None:
        """Add this message's done mark to your own Redis MULTI/EXEC (same Redis as the
        idempotency store), so your effect and the mark commit atomically, and only while
        this worker still holds the message's claim: a crash can never leave the effect
        applied but the message unmarked, and a worker whose claim was taken over cannot
        apply it (raises `ClaimLost`, or `execute()` raises WatchError). Call it before
        `pipeline.multi()`; commands queued before it are kept. Exactly-once effects. On a
        Redis Cluster: a sync cluster pipeline, and your keys must carry `msg.hash_tag`."""
        if self._store is None:
            raise TypeError("idempotency is disabled: there is no done mark to add")
        if inspect.iscoroutinefunction(getattr(pipeline, "execute", None)):
            raise TypeError("an asyncio pipeline: use `await msg.mark_done_in_async(pipeline)`")
        self._fenced = True
        self._store.done_in(pipeline, self.idempotency_key, self.token)

    async def mark_done_in_async(self, pipeline: Any) -> None:
        """`mark_done_in` for a `redis.asyncio` pipeline."""
        if self._store is None:
            raise TypeError("idempotency is disabled: there is no done mark to add")
        self._fenced = True
        await self._store.done_in_async(pipeline, self.idempotency_key, self.token)

    @property
    def hash_tag(self) -> str:
        """The hash tag of this message's claim on a Redis Cluster ("" on one Redis): put it in
        the keys your `mark_done_in` transaction writes, so the MULTI stays in one slot."""
        return self._store.hash_tag(self.idempotency_key) if self._store is not None else ""

    def header(self, name: str) -> bytes | None:
        """The last value of a header, or None."""
        found = None
        for k, v in self.headers:
            if k == name:
                found = v
        return found

    def __repr__(self) -> str:
        return f"Message({self.topic}[{self.partition}]@{self.offset} key={self.key!r})"


def mark_batch_done_in(pipeline: Any, batch: "list[Message]") -> None:
    """`Message.mark_done_in` for a whole batch (a batch handler's), in ONE MULTI: the done
    marks of every message of `batch` join your transaction, fenced as for one message:
    every key is WATCHed and must still hold this worker's claim, so if any claim was lost
    the whole transaction is refused (`ClaimLost` here, or WatchError from `execute()`),
    your effect included, and no message of the batch counts as done. Call it before
    `pipeline.multi()`. For a `redis.asyncio` pipeline: `await mark_batch_done_in_async(...)`."""
    if inspect.iscoroutinefunction(getattr(pipeline, "execute", None)):
        raise TypeError("an asyncio pipeline: use `await mark_batch_done_in_async(pipeline, batch)`")
    store = _batch_store(batch)
    if store is not None:
        store.done_many_in(pipeline, [(m.idempotency_key, m.token) for m in batch])


async def mark_batch_done_in_async(pipeline: Any, batch: "list[Message]") -> None:
    """`mark_batch_done_in` for a `redis.asyncio` pipeline."""
    store = _batch_store(batch)
    if store is not None:
        await store.done_many_in_async(pipeline, [(m.idempotency_key, m.token) for m in batch])


def _batch_store(batch: "list[Message]") -> Any:
    if not batch:
        return None
    store = batch[0]._store
    if store is None:
        raise TypeError("idempotency is disabled: there is no done mark to add")
    for m in batch:
        if m._store is not store:
            raise TypeError(f"{m!r} is not from the same runtime as the rest of the batch")
        m._fenced = True
    return store


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


def idempotency_key(msg: Message, header: str, payload_field: str | None, topic_id: str | None = None) -> str:
    """The `idempotency-key` header, else the configured payload field, else the record's position.

    Keys are exact: a header value that is valid UTF-8 without NUL (the store's separator)
    and does not start with `~` is used as it is; any other value becomes `~` + its
    base64, so two different byte strings never share a key. A position names the topic
    by its id when known (`@<id>/<partition>/<offset>`): a topic deleted and re-created
    under the same name starts from fresh keys instead of finding its old done marks."""
    for k, v in msg.headers:
        if k == header and v:
            return exact(v)
    if payload_field:
        try:
            doc = msg.payload                                    # decodes it: the key is in it
        except Exception:  # noqa: BLE001 - undecodable (kept in the message): keyed by position
            doc = None
        v = field_path(doc, payload_field)
        if v is not None and v != "":
            if type(v) is str and v.isascii() and not v.startswith("~") and "\0" not in v:
                return v                # already what exact() would return, without the round trip
            return exact(str(v).encode("utf-8", "surrogatepass"))   # a lone surrogate: escaped, not a crash
    return position_key(msg.topic, msg.partition, msg.offset, topic_id)


def key_deriver(decoder: Decoder, header: str, payload_field: str | None) -> Callable[[Message, str | None], str]:
    """`idempotency_key` for one configuration, as a function of (message, topic id).

    The common case at full speed, a JSON payload keyed by a top-level string field and no
    key header, is done in one call: the payload is decoded here (and kept, so the handler
    does not decode it again) and the field taken as it is when `exact` would not change
    it. Anything else (a header, a nested or non-string field, an undecodable payload) is
    answered by `idempotency_key` itself, so the two never differ (tests compare them)."""
    def generic(msg: Message, topic_id: str | None) -> str:
        return idempotency_key(msg, header, payload_field, topic_id)

    if decoder is not decode_json or not payload_field or "." in payload_field:
        return generic
    name, loads, bad = payload_field, orjson.loads, orjson.JSONDecodeError

    def derive(msg: Message, topic_id: str | None) -> str:
        value = msg.value
        if not msg.headers and value is not None and msg._payload is UNREAD:
            try:
                doc = loads(value)
            except bad:
                return generic(msg, topic_id)        # keeps the DecodeError, keys by position
            msg._payload = doc
            if type(doc) is dict:
                v = doc.get(name)
                if type(v) is str and v and v.isascii() and v[0] != "~" and "\0" not in v:
                    return v
        return generic(msg, topic_id)
    return derive


def position_key(topic: str, partition: int, offset: int, topic_id: str | None) -> str:
    return f"@{topic_id}/{partition}/{offset}" if topic_id else f"{topic}/{partition}/{offset}"


def exact(v: bytes) -> str:
    if not v.startswith(b"~") and b"\0" not in v:
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError:
            pass
    return "~" + base64.b64encode(v).decode()
