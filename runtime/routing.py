"""What happens to a message whose handler failed: the one place that decides.

`classify` maps an exception to TRANSIENT, PERMANENT or POISON (configuration first, then
afc's own error types, then defaults; the most specific class in the exception's MRO wins).
`decide` turns the classification and the record's history (carried in its headers, as
Spring Kafka does) into a route: the retry topic with a due time, the dead-letter topic, or
the poison topic. Both are pure. `TopicRouter` performs the route: produce, wait for the
broker's acknowledgement, and only then let the source offset move on.

The router answers the loop with a verdict (it never calls into the consumer; what it needs
of the loop comes through a `RouteContext`):
- "routed": the record is safely on another topic; its offset may be committed, its
  idempotency claim is released (a retry or a replay must be able to claim it);
- "marked": routed, and its routing marker handed to the idempotency session with the
  message as its target: the message finishes when the marker is written;
- "resubmit": run the handler again now (in-place retry, when routing is off);
- "abandoned": the partition moved away or the runtime stops; leave it unfinished.
A failed message is never finished without a verdict, so no offset passes an unrouted failure.
"""
from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
import traceback
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal, Protocol

from confluent_kafka import KafkaError

from .config import RoutingSettings, RuntimeSettings
from .errors import PermanentError, PoisonError, TransientError
from .idempotency import Claim
from .message import Message

log = logging.getLogger("afc.runtime.routing")
Verdict = Literal["resubmit", "routed", "marked", "abandoned"]

# Headers every routed record carries (the record's own headers are kept as they were).
H_ORIG_TOPIC = "afc-original-topic"
H_ORIG_PARTITION = "afc-original-partition"
H_ORIG_OFFSET = "afc-original-offset"
H_ORIG_TIMESTAMP = "afc-original-timestamp"
H_GROUP = "afc-consumer-group"
H_ERR_CLASS = "afc-exception-class"
H_ERR_MESSAGE = "afc-exception-message"
H_ERR_STACK = "afc-exception-stacktrace"
H_ATTEMPTS = "afc-attempts"
H_FAILED_AT = "afc-failed-at"
H_FAILURES = "afc-failure-times"
H_CLASS = "afc-classification"
H_DUE = "afc-due-at"
H_ROUTING_ID = "afc-routing-id"
H_TRUNCATED = "afc-value-truncated-from"
AFC_HEADERS = frozenset({H_ORIG_TOPIC, H_ORIG_PARTITION, H_ORIG_OFFSET, H_ORIG_TIMESTAMP, H_GROUP, H_ERR_CLASS,
                         H_ERR_MESSAGE, H_ERR_STACK, H_ATTEMPTS, H_FAILED_AT, H_FAILURES, H_CLASS, H_DUE,
                         H_ROUTING_ID, H_TRUNCATED})


class Classification(str, Enum):
    TRANSIENT = "TRANSIENT"
    PERMANENT = "PERMANENT"
    POISON = "POISON"


DEFAULTS: dict[type, Classification] = {
    PoisonError: Classification.POISON,             # DecodeError, oversized values
    PermanentError: Classification.PERMANENT,
    TransientError: Classification.TRANSIENT,
    TimeoutError: Classification.TRANSIENT,         # asyncio.TimeoutError too (3.11)
    ConnectionError: Classification.TRANSIENT,
    OSError: Classification.TRANSIENT,
    ValueError: Classification.PERMANENT,           # validation: retrying cannot help
    TypeError: Classification.PERMANENT,
    LookupError: Classification.PERMANENT,
}


def classify(err: BaseException, rules: RoutingSettings) -> Classification:
    """Walk the exception's classes from the most specific; configured names win over
    defaults at the same class. Unknown exceptions are TRANSIENT (retried, then
    dead-lettered), as in Spring Kafka."""
    configured: dict[str, Classification] = {}
    for names, cls in ((rules.transient, Classification.TRANSIENT), (rules.permanent, Classification.PERMANENT),
                       (rules.poison, Classification.POISON)):
        for n in names:
            configured[n] = cls
    for k in type(err).__mro__:
        for name in (f"{k.__module__}.{k.__qualname__}", k.__qualname__, k.__name__):
            if name in configured:
                return configured[name]
        if k in DEFAULTS:
            return DEFAULTS[k]
    return Classification.TRANSIENT


@dataclass(frozen=True)
class History:
    """What a record's headers say about its earlier failures."""
    attempts: int = 0                    # handler runs that failed before this one
    failure_times_ms: tuple[int, ...] = ()
    original: tuple[str, int, int, int] | None = None   # topic, partition, offset, timestamp

    @classmethod
    def of(cls, msg: Message) -> "History":
        def get(name: str) -> str | None:
            v = msg.header(name)
            return v.decode("utf-8", "replace") if v is not None else None
        try:
            attempts = int(get(H_ATTEMPTS) or 0)
            times = tuple(int(x) for x in (get(H_FAILURES) or "").split(",") if x)
            ot = get(H_ORIG_TOPIC)
            original = (ot, int(get(H_ORIG_PARTITION) or 0), int(get(H_ORIG_OFFSET) or 0),
                        int(get(H_ORIG_TIMESTAMP) or 0)) if ot else None
        except ValueError:                 # headers mangled by someone: start a fresh history
            return cls()
        return cls(attempts, times, original)


@dataclass(frozen=True)
class Route:
    kind: Literal["retry", "dlq", "poison"]
    topic: str
    classification: Classification
    attempts: int                        # failed handler runs including this one
    due_ms: int | None                   # retry only: not to be run before this time
    reason: str                          # why this route, for logs and headers


def backoff_s(attempt: int, base_s: float, cap_s: float, jitter: float = 0.2, rnd: random.Random | None = None,
              multiplier: float = 2.0) -> float:
    """Capped exponential backoff with proportional jitter: base * multiplier^(attempt-1), +-jitter."""
    d = min(cap_s, base_s * (multiplier ** max(0, attempt - 1)))
    r = (rnd or random).uniform(-jitter, jitter)
    return max(0.0, d * (1 + r))


def decide(classification: Classification, history: History, source_topic: str, now_ms: int,
           rules: RoutingSettings, rnd: random.Random | None = None) -> Route:
    attempts = history.attempts + 1
    recent = [t for t in (*history.failure_times_ms, now_ms) if now_ms - t <= rules.poison_window_s * 1000]
    if classification is Classification.POISON:
        return Route("poison", source_topic + rules.poison_suffix, classification, attempts, None, "poison")
    if rules.poison_failures and len(recent) >= rules.poison_failures:
        return Route("poison", source_topic + rules.poison_suffix, Classification.POISON, attempts, None,
                     f"failed {len(recent)} times within {rules.poison_window_s:g}s")
    if classification is Classification.PERMANENT:
        return Route("dlq", source_topic + rules.dlq_suffix, classification, attempts, None, "permanent")
    if attempts >= rules.max_attempts:
        return Route("dlq", source_topic + rules.dlq_suffix, classification, attempts, None,
                     f"exhausted {attempts} attempts")
    delay = backoff_s(attempts, rules.backoff_initial_ms / 1000, rules.backoff_max_ms / 1000, rules.jitter, rnd,
                      rules.backoff_multiplier)
    return Route("retry", source_topic + rules.retry_suffix, classification, attempts,
                 now_ms + int(delay * 1000), f"retry {attempts}/{rules.max_attempts - 1}")


def routed_headers(msg: Message, err: BaseException, route: Route, history: History, group: str, now_ms: int,
                   rules: RoutingSettings) -> list[tuple[str, bytes]]:
    """The record's own headers (afc's earlier ones replaced) plus its failure history."""
    topic, partition, offset, ts = history.original or (msg.topic, msg.partition, msg.offset, msg.timestamp)
    stack = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    stack_b = stack.encode("utf-8", "replace")
    if len(stack_b) > rules.stacktrace_bytes:
        stack_b = stack_b[: rules.stacktrace_bytes - 15] + b"...[truncated]"
    keep = rules.poison_failures or 10
    failures = (*history.failure_times_ms, now_ms)[-keep:]
    own = [(k, v) for k, v in msg.headers if k not in AFC_HEADERS]
    if msg.header("idempotency-key") is None and msg.idempotency_key:
        # The key travels with the record, so a retry or a replay is deduplicated as the original.
        own.append(("idempotency-key", msg.idempotency_key.encode()))
    add = {
        H_ORIG_TOPIC: topic, H_ORIG_PARTITION: partition, H_ORIG_OFFSET: offset, H_ORIG_TIMESTAMP: ts,
        H_GROUP: group, H_ERR_CLASS: f"{type(err).__module__}.{type(err).__qualname__}",
        H_ERR_MESSAGE: str(err)[:1024], H_ATTEMPTS: route.attempts, H_FAILED_AT: now_ms,
        H_FAILURES: ",".join(str(t) for t in failures), H_CLASS: route.classification.value,
        H_ROUTING_ID: f"{group}/{topic}/{partition}/{offset}/{route.attempts}",
    }
    if route.due_ms is not None:
        add[H_DUE] = route.due_ms
    return own + [(k, str(v).encode("utf-8", "replace")) for k, v in add.items()] + [(H_ERR_STACK, stack_b)]


# --------------------------------------------------------------------------- routers (I/O)

class RouteContext(Protocol):
    """What a router may ask of the loop that owns the message."""
    metrics: Any
    markers: Any          # the idempotency session (routing markers), or None

    def alive(self, msg: Message) -> bool: ...           # still ours, and the runtime is not stopping
    def blocked(self, msg: Message, on: bool) -> None: ...   # routing it keeps failing / works again
    def routed_to(self, kind: str) -> None: ...          # a record went to .retry/.dlq/.poison (health counters)
    def position(self, msg: Message) -> str: ...         # the record's position key (topic id aware)


class Router(Protocol):
    async def route(self, msg: Message, err: BaseException, ctx: RouteContext) -> Verdict: ...
    async def close(self) -> None: ...


async def _sleep_unless_gone(msg: Message, ctx: RouteContext, delay: float) -> bool:
    """Sleep, waking early if the message's partition is revoked or the runtime stops."""
    loop = asyncio.get_running_loop()
    end = loop.time() + delay
    while loop.time() < end:
        if not ctx.alive(msg):
            return False
        await asyncio.sleep(min(0.05, max(0.0, end - loop.time())))
    return ctx.alive(msg)


async def _unless_gone(fut: "asyncio.Future[Any]", msg: Message, ctx: RouteContext) -> tuple[bool, Any]:
    """Wait for `fut`, giving up (False) if the message leaves us meanwhile."""
    while True:
        done, _ = await asyncio.wait([fut], timeout=0.2)
        if done:
            return True, fut.result()
        if not ctx.alive(msg):
            fut.cancel()
            return False, None


class InPlaceRetry:
    """Routing off: retry in place with capped exponential backoff, holding the partition's
    commit point (Karafka-style). Nothing is lost; the message simply is not passed."""

    def __init__(self, base_s: float = 0.2, cap_s: float = 30.0) -> None:
        self.base_s, self.cap_s = base_s, cap_s

    async def route(self, msg: Message, err: BaseException, ctx: RouteContext) -> Verdict:
        delay = backoff_s(msg.attempts + 1, self.base_s, self.cap_s)
        log.warning("event=handler-failed action=retry-in-place topic=%s partition=%d offset=%d attempt=%d "
                    "delay_s=%.2f error_class=%s error=\"%s\"", msg.topic, msg.partition, msg.offset,
                    msg.attempts + 1, delay, type(err).__name__, str(err)[:200].replace('"', "'"))
        return "resubmit" if await _sleep_unless_gone(msg, ctx, delay) else "abandoned"

    async def close(self) -> None:
        return None


def producer_config(s: RuntimeSettings) -> dict[str, Any]:
    k = s.kafka
    conf: dict[str, Any] = {
        "bootstrap.servers": k.bootstrap_servers, "enable.idempotence": True, "acks": "all",
        "linger.ms": 5, "message.max.bytes": 16 * 1024 * 1024, "security.protocol": k.security_protocol,
        "delivery.timeout.ms": 30_000,
    }
    if k.sasl_mechanism:
        conf.update({"sasl.mechanism": k.sasl_mechanism, "sasl.username": k.sasl_username or "",
                     "sasl.password": k.sasl_password.get_secret_value() if k.sasl_password else ""})
    if k.ssl_ca_location:
        conf["ssl.ca.location"] = k.ssl_ca_location
    return conf


class TopicRouter:
    """Routes failures to `<topic>.retry`, `<topic>.dlq` and `<topic>.poison`.

    A route is done once the broker acknowledged the produce. A position already routed
    (the marker `routed:<topic>/<partition>/<offset>` is done in the idempotency store) is
    not routed again after a crash between the acknowledgement and the offset commit.
    """

    def __init__(self, settings: RuntimeSettings, loop: asyncio.AbstractEventLoop) -> None:
        from confluent_kafka import Producer
        self.s, self.rules, self.loop = settings, settings.routing, loop
        self.producer = Producer(producer_config(settings), logger=logging.getLogger("afc.runtime.librdkafka"))
        self._closing = False
        self._poller = threading.Thread(target=self._poll, name="afc-route-producer", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._closing:
            self.producer.poll(0.1)

    async def _produce(self, topic: str, key: bytes | None, value: bytes | None,
                       headers: list[tuple[str, bytes]]) -> None:
        fut: asyncio.Future[None] = self.loop.create_future()

        def delivered(err: Any, _msg: Any) -> None:
            def settle() -> None:
                if fut.done():
                    return
                if err is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(RouteFailed(err))
            self.loop.call_soon_threadsafe(settle)

        while True:
            try:
                self.producer.produce(topic, value=value, key=key, headers=headers, on_delivery=delivered)
                break
            except BufferError:
                await asyncio.sleep(0.05)           # local queue full: wait for deliveries
            except Exception as e:  # noqa: BLE001 - e.g. KafkaException(MSG_SIZE_TOO_LARGE) raised locally
                raise RouteFailed(e) from e
        await fut

    async def route(self, msg: Message, err: BaseException, ctx: RouteContext) -> Verdict:
        cls = Classification.POISON if err is msg._derr else classify(err, self.rules)
        history = History.of(msg)
        source = history.original[0] if history.original else msg.topic
        now_ms = int(time.time() * 1000)
        route = decide(cls, history, source, now_ms, self.rules)
        headers = routed_headers(msg, err, route, history, self.s.kafka.group_id, now_ms, self.rules)
        marker = "routed:" + ctx.position(msg)
        session = ctx.markers
        token = None
        if session is not None:
            ok, answer = await _unless_gone(asyncio.ensure_future(session.claim_key(marker)), msg, ctx)
            while ok and answer[0] is Claim.BUSY:          # another worker is routing it: wait for it
                if not await _sleep_unless_gone(msg, ctx, 0.5):
                    return "abandoned"
                ok, answer = await _unless_gone(asyncio.ensure_future(session.claim_key(marker)), msg, ctx)
            if not ok:
                return "abandoned"
            if answer[0] is Claim.DONE:
                ctx.metrics.route_skipped.inc()
                log.info("event=route-skipped reason=already-routed topic=%s partition=%d offset=%d", msg.topic,
                         msg.partition, msg.offset)
                return "routed"
            token = answer[1]
        if not await self._deliver(msg, route, headers, ctx):
            if session is not None and token is not None:
                session.release_key(marker, token)
            return "abandoned"
        if session is not None and token is not None:
            # The record is routed; the marker is written with the next store call. Until it
            # is, a crash before the commit could route it twice, which replay deduplicates by
            # routing id and idempotency key.
            session.done(marker, token, msg)
        m = ctx.metrics
        m.routed.labels(route.kind, route.classification.value).inc()
        m.route_attempts.observe(route.attempts)
        if route.kind == "poison":
            m.poison.inc()
        if hasattr(ctx, "routed_to"):
            ctx.routed_to(route.kind)
        log.info("event=routed to=%s kind=%s classification=%s attempts=%d reason=\"%s\" topic=%s partition=%d "
                 "offset=%d error_class=%s due_ms=%s", route.topic, route.kind, route.classification.value,
                 route.attempts, route.reason, msg.topic, msg.partition, msg.offset, type(err).__name__,
                 route.due_ms)
        return "marked" if token is not None else "routed"

    async def _deliver(self, msg: Message, route: Route, headers: list[tuple[str, bytes]],
                       ctx: RouteContext) -> bool:
        """Produce until the broker acknowledges; False if the message left us meanwhile.

        While it fails, the source partition is paused (its commit point is held anyway):
        retrying one record must not turn into fetching ever more behind it."""
        value, delay, blocked = msg.value, 0.5, False
        try:
            while True:
                try:
                    await self._produce(route.topic, msg.key, value, headers)
                    return True
                except RouteFailed as e:
                    if e.too_large and value is not None and len(value) > 65_536:
                        # Never drop: keep the headers and the first 64 KiB; the original stays at
                        # its source coordinates (in the headers) until retention.
                        headers = headers + [(H_TRUNCATED, str(len(value)).encode())]
                        value = value[:65_536]
                        continue
                    ctx.metrics.route_errors.labels(route.kind).inc()
                    if not blocked:
                        ctx.blocked(msg, True)
                        blocked = True
                    log.error("event=route-failed topic=%s partition=%d offset=%d to=%s error=\"%s\" "
                              "action=pause-partition-and-retry delay_s=%.1f", msg.topic, msg.partition, msg.offset,
                              route.topic, str(e).replace('"', "'"), delay)
                    if not await _sleep_unless_gone(msg, ctx, delay):
                        return False
                    delay = min(30.0, delay * 2)
        finally:
            if blocked:
                ctx.blocked(msg, False)

    async def close(self) -> None:
        await asyncio.to_thread(self.producer.flush, 10)
        self._closing = True


_TOO_LARGE = {KafkaError.MSG_SIZE_TOO_LARGE, getattr(KafkaError, "_MSG_SIZE_TOO_LARGE", KafkaError.MSG_SIZE_TOO_LARGE)}


class RouteFailed(Exception):
    def __init__(self, err: Any) -> None:
        super().__init__(str(err))
        code = None
        inner = err.args[0] if isinstance(err, Exception) and err.args else err
        if hasattr(inner, "code"):
            code = inner.code()
        self.too_large = code in _TOO_LARGE
