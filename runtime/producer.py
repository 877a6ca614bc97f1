"""The adaptive producer: confluent-kafka with idempotence, paced by the consumers' signal.

    from afc.runtime.producer import AdaptiveProducer
    from afc.runtime.config import ProducerSettings

    p = AdaptiveProducer(ProducerSettings(bootstrapServers="...", groups=["orders"],
                                          redisUrl="redis://..."))
    try:
        p.produce("orders", b"{...}", key=b"user-1")              # waits at most maxWaitS
    except ProducerThrottled as e:
        retry_later(e.retry_after_s)                               # never dropped silently
    p.close()

What it adds to a plain Producer:
- `enable.idempotence=true` and an `idempotency-key` header on every message, which the
  consumers deduplicate on: the caller's `idempotency_key=`, else the caller's own
  `idempotency-key` header (kept as given), else a uuid4.
- A size check before sending: a message above `maxMessageBytes` (1 MiB) raises
  `MessageTooLarge`, so one oversized payload cannot blow up a consumer's memory.
- Pacing: a token bucket whose rate follows the watched groups' level (AIMD, `AimdRate`):
  while the level is above 0 the rate is cut by up to `decreaseFactor` per adjust step, in
  proportion to the level; while it is 0 the rate climbs back by `increasePerS` of
  `maxRate` per second, so recovery is gradual (a healthy group at full rate in
  1/increasePerS seconds from the floor). A send that would wait more than `maxWaitS`
  raises `ProducerThrottled(retry_after_s)`; nothing is ever dropped silently.
- The signal is watched by one thread: pub/sub for changes, a periodic read for expiries.
  If Redis is unreachable the rate falls to `floorRate` (fail open, with a warning and
  `afc_producer_signal_up 0`) and climbs back once Redis answers again.

Sync callers use `AdaptiveProducer.produce`; async callers use `AsyncAdaptiveProducer.send`,
which waits with `asyncio.sleep` and can await the broker's acknowledgement.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import deque
from typing import Any, Callable, Mapping, Sequence

from .backpressure import SignalKeys, read_group_sync
from .config import ProducerSettings
from .errors import AfcError
from .metrics import ProducerMetrics

log = logging.getLogger("afc.runtime.producer")

Headers = Mapping[str, bytes | str] | Sequence[tuple[str, bytes | str]] | None


class ProducerThrottled(AfcError):
    """The consumers are saturated: this send would wait longer than allowed. Retry later."""

    def __init__(self, retry_after_s: float, reason: str = "backpressure") -> None:
        self.retry_after_s = retry_after_s
        self.reason = reason
        super().__init__(f"producer throttled ({reason}): retry after {retry_after_s:.2f}s")


class MessageTooLarge(AfcError, ValueError):
    """Refused before sending: key + value + headers exceed maxMessageBytes."""

    def __init__(self, size: int, limit: int) -> None:
        self.size, self.limit = size, limit
        super().__init__(f"message of {size} bytes exceeds the maximum of {limit} bytes (maxMessageBytes)")


# ---------------------------------------------------------------------------- pure: bucket and AIMD

class TokenBucket:
    """Reservation-style token bucket; the caller passes the time.

    `reserve` takes a token if one is there; otherwise it books the next one in the future
    (tokens go negative) and says how long to wait, unless that exceeds `max_wait`, in which
    case nothing is booked. Depth is `burst_s` seconds of the current rate (at least one).
    """

    def __init__(self, rate: float, burst_s: float, now: float) -> None:
        self.rate = rate
        self.burst_s = burst_s
        self.tokens = self.capacity
        self.t = now

    @property
    def capacity(self) -> float:
        return max(1.0, self.rate * self.burst_s)

    def _refill(self, now: float) -> None:
        if now > self.t:
            self.tokens = min(self.capacity, self.tokens + (now - self.t) * self.rate)
            self.t = now

    def set_rate(self, rate: float, now: float) -> None:
        self._refill(now)
        self.rate = rate
        self.tokens = min(self.tokens, self.capacity)

    def reserve(self, now: float, max_wait: float) -> tuple[bool, float]:
        """(booked, wait seconds). Not booked: wait is the retry-after."""
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True, 0.0
        wait = (1.0 - self.tokens) / self.rate
        if wait > max_wait:
            return False, wait
        self.tokens -= 1.0
        return True, wait


class AimdRate:
    """The allowed rate from the group level, once per adjust step.

    - level None (signal unknown: Redis down): the floor rate (fail open, slowly);
    - level > 0: multiplicative decrease, `rate *= 1 - (1 - decrease_factor) * level`, from
      the rate actually used if that is lower (an allowance nobody used proves nothing,
      as TCP's congestion-window validation says), never below the floor;
    - level 0: additive increase of `increase_per_s * max_rate` per second, up to max_rate.
    """

    def __init__(self, max_rate: float, floor_rate: float, decrease_factor: float, increase_per_s: float) -> None:
        self.max_rate, self.floor_rate = max_rate, floor_rate
        self.decrease_factor, self.increase_per_s = decrease_factor, increase_per_s
        self.rate = max_rate

    def adjust(self, level: float | None, dt_s: float, used_rate: float | None = None) -> float:
        if level is None:
            self.rate = self.floor_rate
        elif level > 0:
            base = self.rate if used_rate is None else min(self.rate, max(used_rate, self.floor_rate))
            self.rate = max(self.floor_rate, base * (1 - (1 - self.decrease_factor) * min(1.0, level)))
        else:
            self.rate = min(self.max_rate, self.rate + self.increase_per_s * self.max_rate * dt_s)
        return self.rate


def message_size(key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]) -> int:
    return len(key or b"") + len(value or b"") + sum(len(k) + len(v) for k, v in headers)


def _bytes(v: bytes | str | None) -> bytes | None:
    return v.encode() if isinstance(v, str) else v


def _headers(h: Headers) -> list[tuple[str, bytes]]:
    if not h:
        return []
    items = h.items() if isinstance(h, Mapping) else h
    return [(k, _bytes(v) or b"") for k, v in items]


def with_idempotency_key(hs: list[tuple[str, bytes]], header: str,
                         idempotency_key: str | None) -> tuple[list[tuple[str, bytes]], str]:
    """The headers with exactly one idempotency key, and that key.

    - `idempotency_key=` given: it is the key (any header of that name is replaced);
    - else the caller's own non-empty header is kept as it is, byte for byte, so a retried
      send carries the same key and the consumers deduplicate it (the returned str is its
      UTF-8 reading, undecodable bytes as surrogate escapes);
    - else (no header, or only empty ones, which the consumers ignore) a uuid4 is added.
    """
    if not idempotency_key:
        own = next((v for name, v in hs if name == header and v), None)
        if own is not None:
            return hs, own.decode("utf-8", "surrogateescape")
        idempotency_key = uuid.uuid4().hex
    return [h for h in hs if h[0] != header] + [(header, idempotency_key.encode())], idempotency_key


# ---------------------------------------------------------------------------- the producer

class AdaptiveProducer:
    """Thread-safe; see the module docstring. Call `close()` (or use `with`) when done."""

    def __init__(self, settings: ProducerSettings | None = None, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        from confluent_kafka import Producer
        self.s = s = settings or ProducerSettings()
        self.metrics = ProducerMetrics()
        self._clock, self._sleep = clock, sleep
        conf: dict[str, Any] = {"bootstrap.servers": s.bootstrap_servers, "enable.idempotence": True,
                                "linger.ms": 5, **s.kafka}
        conf["enable.idempotence"] = True
        self._p = Producer(conf, logger=logging.getLogger("afc.runtime.librdkafka"))
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self.aimd = AimdRate(s.max_rate, s.floor_rate, s.decrease_factor, s.increase_per_s)
        self.bucket = TokenBucket(s.max_rate, s.burst_s, clock())
        self._sent_at: deque[float] = deque()       # send times of the last second (used rate)
        self.levels: dict[str, float] = {}
        self.level: float | None = 0.0               # None: signal unknown
        self.signal_ok_at: float | None = None
        self.signal_down = False
        self._set_rate_metrics(s.max_rate)
        self.metrics.signal_age.set_function(self.signal_age)
        self._threads = [threading.Thread(target=self._poll_loop, name="afc-producer-poll", daemon=True)]
        if s.groups and s.redis_url is not None:
            self._watch = _Watcher(self)
            self._watch.start()                     # start from the group's current level
            self._adjust(0.0)
            self._threads.append(threading.Thread(target=self._watch.run, name="afc-producer-signal", daemon=True))
        else:
            self._watch = None
            self.metrics.signal_up.set(0)
        for t in self._threads:
            t.start()

    # -- pacing

    def signal_age(self) -> float:
        """Seconds since the signal was last read successfully (-1: never, or no signal)."""
        return -1.0 if self.signal_ok_at is None else self._clock() - self.signal_ok_at

    @property
    def allowed_rate(self) -> float:
        return self.bucket.rate

    def used_rate(self, now: float) -> float:
        with self._lock:
            while self._sent_at and self._sent_at[0] < now - 1.0:
                self._sent_at.popleft()
            return float(len(self._sent_at))

    def _adjust(self, dt_s: float) -> None:
        now = self._clock()
        rate = self.aimd.adjust(self.level, dt_s, self.used_rate(now) if self.level else None)
        with self._lock:
            if rate != self.bucket.rate:
                self.bucket.set_rate(rate, now)
        self._set_rate_metrics(rate)

    def _set_rate_metrics(self, rate: float) -> None:
        self.metrics.allowed_rate.set(round(rate, 2))
        self.metrics.throttle_ratio.set(round(1 - rate / self.s.max_rate, 4))

    def _reserve(self) -> float:
        """Book a send slot; returns the wait. Raises ProducerThrottled past maxWaitS."""
        now = self._clock()
        with self._lock:
            ok, wait = self.bucket.reserve(now, self.s.max_wait_s)
            if ok:
                self._sent_at.append(now + wait)
        if not ok:
            self.metrics.throttled.inc()
            raise ProducerThrottled(round(wait, 3))
        if wait > 0:
            self.metrics.waited.inc()
            self.metrics.wait_seconds.inc(wait)
        return wait

    # -- sending

    def prepare(self, value: bytes | str | None, key: bytes | str | None, headers: Headers,
                idempotency_key: str | None) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]], str]:
        """Encode, add the idempotency header, check the size (before any waiting)."""
        v, k, hs = _bytes(value), _bytes(key), _headers(headers)
        hs, ikey = with_idempotency_key(hs, self.s.key_header, idempotency_key)
        size = message_size(k, v, hs)
        if size > self.s.max_message_bytes:
            self.metrics.too_large.inc()
            raise MessageTooLarge(size, self.s.max_message_bytes)
        return v, k, hs, ikey

    def produce(self, topic: str, value: bytes | str | None, key: bytes | str | None = None, *,
                headers: Headers = None, idempotency_key: str | None = None, partition: int | None = None,
                on_delivery: Callable[[Any, Any], None] | None = None) -> str:
        """Send one message (asynchronously to the broker); returns its idempotency key.

        Blocks at most maxWaitS for the rate limit; raises ProducerThrottled beyond that and
        MessageTooLarge for an oversized message. Neither sends anything."""
        v, k, hs, ikey = self.prepare(value, key, headers, idempotency_key)
        wait = self._reserve()
        if wait > 0:
            self._sleep(wait)
        self._send(topic, v, k, hs, partition, on_delivery, self._clock() + self.s.max_wait_s, self._sleep)
        return ikey

    def _send(self, topic: str, v: bytes | None, k: bytes | None, hs: list[tuple[str, bytes]],
              partition: int | None, on_delivery: Callable[[Any, Any], None] | None, deadline: float,
              sleep: Callable[[float], None]) -> None:
        kw: dict[str, Any] = {"partition": partition} if partition is not None else {}

        def delivered(err: Any, msg: Any) -> None:
            (self.metrics.delivery_errors if err is not None else self.metrics.delivered).inc()
            if on_delivery is not None:
                on_delivery(err, msg)

        while True:
            try:
                self._p.produce(topic, value=v, key=k, headers=hs, on_delivery=delivered, **kw)
                break
            except BufferError:
                # librdkafka's local queue is full (the broker is slow, not the consumers).
                if self._clock() >= deadline:
                    self.metrics.throttled.inc()
                    raise ProducerThrottled(1.0, "local-queue-full") from None
                sleep(0.01)
        self.metrics.sent.inc()

    def flush(self, timeout: float = 30) -> int:
        """Wait for acknowledgements; returns how many messages are still undelivered."""
        return self._p.flush(timeout)

    def close(self, timeout: float = 30) -> int:
        left = self.flush(timeout)
        self._closed.set()
        for t in self._threads:
            t.join(5)
        if self._watch is not None:
            self._watch.close()
        if left:
            log.warning("event=producer-closed undelivered=%d", left)
        return left

    def __enter__(self) -> "AdaptiveProducer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _poll_loop(self) -> None:
        """Serves delivery callbacks, so callers never have to call poll()."""
        while not self._closed.is_set():
            self._p.poll(0.05)


class _Watcher:
    """The signal thread: pub/sub for changes, a read every pollIntervalMs, an AIMD step
    every adjustIntervalMs. Redis errors set the level to None (floor rate) and are
    retried every second; the producer's callers never see them."""

    def __init__(self, prod: AdaptiveProducer) -> None:
        from .redisconn import is_cluster_url, redis_errors, sync_client
        self.p = prod
        s = prod.s
        assert s.redis_url is not None
        self.url = s.redis_url.get_secret_value()
        self.cluster = is_cluster_url(self.url)
        self.keys = {g: SignalKeys(s.key_prefix, g, cluster=self.cluster) for g in s.groups}
        self.r = sync_client(self.url, socket_timeout=1, socket_connect_timeout=1, retries=2)
        self.errors = redis_errors()
        self.pubsub: Any = None

    def read_once(self) -> bool:
        p = self.p
        try:
            sigs = {g: read_group_sync(self.r, k) for g, k in self.keys.items()}
        except self.errors as e:
            self._failed(e)
            return False
        p.levels = {g: sg.level for g, sg in sigs.items()}
        p.level = max(p.levels.values(), default=0.0)
        p.signal_ok_at = p._clock()
        for g, lv in p.levels.items():
            p.metrics.group_level.labels(g).set(lv)
        p.metrics.signal_up.set(1)
        if p.signal_down:
            p.signal_down = False
            log.info("event=producer-signal-back level=%.2f groups=%s", p.level, ",".join(p.levels))
        return True

    def _failed(self, e: Exception) -> None:
        p = self.p
        p.level = None
        p._adjust(0.0)                          # the floor at once, not at the next step
        p.metrics.signal_up.set(0)
        p.metrics.signal_errors.inc()
        if not p.signal_down:
            p.signal_down = True
            log.warning("event=producer-signal-down error=\"%s\" action=floor-rate floor_rate=%.1f", e,
                        p.s.floor_rate)
        if self.pubsub is not None:
            try:
                self.pubsub.close()
            except Exception:  # noqa: BLE001
                pass
            self.pubsub = None

    def start(self) -> None:
        if self.read_once():
            try:
                self._subscribe()
            except self.errors as e:
                self._failed(e)

    def _subscribe(self) -> None:
        ps = self.r.pubsub(ignore_subscribe_messages=True)
        if self.cluster:                        # sharded channels: one per group's slot (backpressure.py)
            ps.ssubscribe(*[k.channel for k in self.keys.values()])
        else:
            ps.subscribe(*[k.channel for k in self.keys.values()])
        self.pubsub = ps

    def _message(self, timeout: float) -> Any:
        if self.cluster:
            return self.pubsub.get_sharded_message(ignore_subscribe_messages=True, timeout=timeout)
        return self.pubsub.get_message(timeout=timeout)

    def run(self) -> None:
        p, s = self.p, self.p.s
        closed = p._closed
        poll_s, adjust_s = s.poll_interval_ms / 1000, s.adjust_interval_ms / 1000
        now = p._clock()
        next_read, next_adjust, last_adjust = now + poll_s, now + adjust_s, now
        while not closed.is_set():
            now = p._clock()
            try:
                if p.level is None or self.pubsub is None:
                    # Down (or never subscribed): retry once a second, adjusting meanwhile.
                    if now >= next_read:
                        next_read = now + 1.0
                        if self.read_once():
                            self._subscribe()
                            next_read = now + poll_s
                    closed.wait(max(0.0, min(next_adjust, next_read) - p._clock()))
                else:
                    msg = self._message(max(0.0, min(next_adjust, next_read) - now))
                    if msg is not None or p._clock() >= next_read:
                        if self.read_once():
                            next_read = p._clock() + poll_s
            except self.errors as e:
                self._failed(e)
                next_read = p._clock() + 1.0
            now = p._clock()
            if now >= next_adjust:
                p._adjust(now - last_adjust)
                last_adjust, next_adjust = now, now + adjust_s

    def close(self) -> None:
        try:
            if self.pubsub is not None:
                self.pubsub.close()
            self.r.close()
        except Exception:  # noqa: BLE001
            pass


class AsyncAdaptiveProducer:
    """The same producer for asyncio code: waits with asyncio.sleep, can await delivery."""

    def __init__(self, settings: ProducerSettings | None = None) -> None:
        self.sync = AdaptiveProducer(settings)
        self.metrics = self.sync.metrics

    @property
    def allowed_rate(self) -> float:
        return self.sync.allowed_rate

    async def send(self, topic: str, value: bytes | str | None, key: bytes | str | None = None, *,
                   headers: Headers = None, idempotency_key: str | None = None, partition: int | None = None,
                   wait_delivery: bool = False) -> str:
        """Send one message; with wait_delivery, return only once the broker acknowledged it
        (a delivery error is raised as KafkaException)."""
        from confluent_kafka import KafkaException
        p = self.sync
        v, k, hs, ikey = p.prepare(value, key, headers, idempotency_key)
        wait = p._reserve()
        if wait > 0:
            await asyncio.sleep(wait)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] | None = loop.create_future() if wait_delivery else None

        def done(err: Any, _msg: Any) -> None:
            if fut is not None:
                loop.call_soon_threadsafe(_settle, fut, err)

        deadline = p._clock() + p.s.max_wait_s
        while True:
            try:
                p._send(topic, v, k, hs, partition, done, deadline, _no_sleep)
                break
            except _QueueFull:
                await asyncio.sleep(0.01)
        if fut is not None:
            err = await fut
            if err is not None:
                raise KafkaException(err)
        return ikey

    async def flush(self, timeout: float = 30) -> int:
        return await asyncio.to_thread(self.sync.flush, timeout)

    async def close(self, timeout: float = 30) -> int:
        return await asyncio.to_thread(self.sync.close, timeout)

    async def __aenter__(self) -> "AsyncAdaptiveProducer":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


class _QueueFull(Exception):
    pass


def _no_sleep(_s: float) -> None:
    """In async code the wait for librdkafka's queue happens in the caller, with asyncio.sleep."""
    raise _QueueFull


def _settle(fut: "asyncio.Future[Any]", err: Any) -> None:
    if not fut.done():
        fut.set_result(err)
