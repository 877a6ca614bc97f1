"""The consumer loop: fetch -> decode -> claim -> handle -> finish -> commit.

One asyncio loop owns all state. Kafka calls run on one dedicated thread (librdkafka's
rebalance callbacks fire there, inside poll); handlers run in `dispatch` lanes. The loop:

1. asks the fetch controller how many messages it may take (0: pause every partition and
   keep polling, so `max.poll.interval.ms` is never exceeded and the member stays in the group);
2. fetches (blocks for the first message, then takes what is already buffered);
3. decodes, derives idempotency keys and claims them in one store round trip (the previous
   batch's done marks ride along);
4. hands claimed messages to the lanes; done ones finish at once; busy ones wait in their lane;
5. on results: marks offsets finished, queues done marks, routes failures;
6. periodically: commits each partition's safe offset, renews long claims, lets the
   controller decide, refreshes lag gauges.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import uuid
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from .backpressure import LevelInputs, SignalPublisher, build_publisher
from .config import RuntimeSettings
from .dispatch import AsyncDispatcher, Outcome, Result, SyncDispatcher
from .errors import PoisonError, StoreUnavailable
from .fetch_control import FetchController, WindowStats, should_pause
from .handlers import build_handler, is_async
from .idempotency import Claim, Coalescer, IdempotencyStore, RedisStore, SqliteStore
from .message import DECODERS, Message, idempotency_key
from .metrics import RuntimeMetrics
from .offsets import OffsetTracker
from .routing import H_ATTEMPTS, H_DUE, Classification, InPlaceRetry, Router, TopicRouter, classify

log = logging.getLogger("afc.runtime.consumer")
TP = tuple[str, int]
DONE_MEMORY_S = 120.0         # how long this process remembers the done marks it wrote...
DONE_MEMORY_MAX = 200_000     # ...and at most how many


class PartitionState:
    """Per assigned partition; messages point at it so lanes can see a revocation."""
    __slots__ = ("tp", "revoked", "inflight", "retry")

    def __init__(self, tp: TP, retry: bool = False) -> None:
        self.tp = tp
        self.revoked = False
        self.inflight = 0          # fetched, result not yet seen
        self.retry = retry         # a retry topic: records wait for their due time


def kafka_config(s: RuntimeSettings, instance_id: str | None) -> dict[str, Any]:
    k, m = s.kafka, s.membership
    conf: dict[str, Any] = {
        "bootstrap.servers": k.bootstrap_servers,
        "group.id": k.group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": k.auto_offset_reset,
        "fetch.max.bytes": k.fetch_max_bytes,
        "max.partition.fetch.bytes": k.max_partition_fetch_bytes,
        "queued.max.messages.kbytes": k.queued_max_messages_kbytes,
        "max.poll.interval.ms": m.max_poll_interval_ms,
        "client.id": f"afc-{instance_id or 'dynamic'}",
        "security.protocol": k.security_protocol,
    }
    if m.group_protocol == "consumer":
        conf["group.protocol"] = "consumer"
    else:
        conf["partition.assignment.strategy"] = "cooperative-sticky"
        conf["session.timeout.ms"] = m.session_timeout_ms
        conf["heartbeat.interval.ms"] = max(100, min(3000, m.session_timeout_ms // 3))
    if instance_id:
        conf["group.instance.id"] = instance_id
    if k.sasl_mechanism:
        conf["sasl.mechanism"] = k.sasl_mechanism
        conf["sasl.username"] = k.sasl_username or ""
        conf["sasl.password"] = k.sasl_password.get_secret_value() if k.sasl_password else ""
    if k.ssl_ca_location:
        conf["ssl.ca.location"] = k.ssl_ca_location
    conf.update(k.extra)
    return conf


def build_store(s: RuntimeSettings, owner: str) -> IdempotencyStore | None:
    i = s.idempotency
    if not i.enabled:
        return None
    args = (i.key_prefix, s.kafka.group_id, owner, i.lease_ms, i.done_ttl_s)
    if i.redis_url:
        return RedisStore(i.redis_url.get_secret_value(), *args)
    return SqliteStore(i.sqlite_path, *args)


class Runtime:
    def __init__(self, settings: RuntimeSettings, handler: Callable[[Message], Any] | None = None,
                 router: Router | None = None) -> None:
        self.s = settings
        self.instance_id = settings.membership.resolved_instance_id()
        # The owner of claims: this process incarnation, so a restart never mistakes an
        # old claim of its own for a live one.
        self.owner = f"{self.instance_id or 'dynamic'}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.metrics = RuntimeMetrics()
        self.ctl = FetchController(settings.flow)
        self.tracker = OffsetTracker()
        self.parts: dict[TP, PartitionState] = {}
        self.paused: set[TP] = set()
        self.joined = False
        self.flow_state = "open"
        self._last_limit = self.ctl.limit
        self.outstanding = 0
        self.decode = DECODERS[settings.handler.decoder]
        self._handler = handler
        self._close_handler: Callable[[], Any] | None = None
        self._router = router
        self.router: Router = InPlaceRetry()
        r = settings.routing
        self.retry_topics = {t + r.retry_suffix for t in settings.kafka.topics} if r.enabled else set()
        self.deferred: dict[TP, float] = {}         # retry partitions paused until a record's due time
        self.route_blocked: dict[TP, int] = {}      # partitions paused while routing one of theirs fails
        self._seeks: list[tuple[TP, int]] = []
        self.store: IdempotencyStore | None = None
        self.markers: Coalescer | None = None       # single-key store calls, joined per loop tick
        self.bp: SignalPublisher | None = None      # the backpressure signal (backpressure.py)
        self.store_down_since: float | None = None
        self._unclaimed: list[Message] = []         # fetched while the store was down
        self._parked: list[Message] = []            # their key is held elsewhere: re-checked, not queued
        self._claims: deque[asyncio.Task[None]] = deque()   # claim steps in flight, in batch order
        self._done_keys: list[str] = []
        self._release_keys: list[str] = []
        # Keys this process claimed and whose done mark is not yet written (value: claim time,
        # for lease renewal). A second copy of a held key waits instead of running.
        self._claimed_at: dict[str, float] = {}
        self._done_recent: OrderedDict[str, float] = OrderedDict()   # done marks written here lately
        self._win: list[Any] = [0, 0, 0.0, 0, 0.0]  # completed, errors, latency sum, peak outstanding, queue wait
        self._stop = asyncio.Event()
        self._results_in = asyncio.Event()
        self._commit_sent: float | None = None      # an async commit awaiting its answer
        self._hard_stop = False
        self.last_beat = time.monotonic()
        self.consumer: Consumer | None = None
        self._kafka = ThreadPoolExecutor(1, thread_name_prefix="afc-kafka")
        self.loop: asyncio.AbstractEventLoop | None = None
        self.dispatcher: SyncDispatcher | AsyncDispatcher | None = None
        self.stopped = asyncio.Event()

    # ------------------------------------------------------------------ kafka thread

    async def _k(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        assert self.loop is not None
        return await self.loop.run_in_executor(self._kafka, lambda: fn(*args, **kw))

    def _fetch(self, budget: int, timeout: float) -> list[Any]:
        """On the Kafka thread: wait for one message, then take what is already there."""
        c = self.consumer
        assert c is not None
        first = c.poll(timeout)
        if first is None:
            return []
        if budget <= 1:
            return [first]
        return [first, *c.consume(budget - 1, 0)]

    def _fetch_async(self, budget: int, timeout: float) -> "asyncio.Future[list[Any]]":
        assert self.loop is not None
        return self.loop.run_in_executor(self._kafka, self._fetch, budget, timeout)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for p in partitions:
            tp = (p.topic, p.partition)
            self.parts[tp] = PartitionState(tp, retry=p.topic in self.retry_topics)
        self.joined = True
        self.metrics.rebalances.labels("assign").inc()
        self.metrics.assigned.set(len(self.parts))
        log.info("event=assigned partitions=%s total=%d", _fmt(partitions), len(self.parts))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._give_up(consumer, partitions, commit=True)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._give_up(consumer, partitions, commit=False)

    def _give_up(self, consumer: Consumer, partitions: list[TopicPartition], commit: bool) -> None:
        """Partitions move away: finish or abandon their work, commit, forget them.

        Runs on the Kafka thread inside poll; the loop is free meanwhile (it awaits the poll),
        so it can collect the lanes' results for these partitions.
        """
        tps = {(p.topic, p.partition) for p in partitions}
        states = [self.parts[tp] for tp in tps if tp in self.parts]
        for st in states:
            st.revoked = True
        assert self.loop is not None
        bound = min(self.s.shutdown.drain_timeout_s, self.s.membership.max_poll_interval_ms / 2000)
        fut = asyncio.run_coroutine_threadsafe(self._drain(states, bound), self.loop)
        try:
            offsets = fut.result(bound + 5)
        except Exception as e:  # noqa: BLE001 - a failed drain must not kill the rebalance
            log.error("event=revoke-drain-failed error=%r", e)
            offsets = {}
        offsets = {tp: off for tp, off in offsets.items() if tp in tps}
        if commit and offsets:
            self._commit_sync(consumer, offsets, why="revoke")
        for tp in tps:
            self.parts.pop(tp, None)
            self.paused.discard(tp)
            self.deferred.pop(tp, None)
            self.route_blocked.pop(tp, None)
        self.tracker.drop(tps)
        self.metrics.rebalances.labels("revoke" if commit else "lost").inc()
        self.metrics.assigned.set(len(self.parts))
        log.info("event=%s partitions=%s committed_now=%s", "revoked" if commit else "lost", _fmt(partitions),
                 _fmt_offsets(offsets) if offsets else "nothing-new")

    def _commit_sync(self, consumer: Consumer, offsets: dict[TP, int], why: str) -> bool:
        t0 = time.perf_counter()
        try:
            consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                            asynchronous=False)
        except KafkaException as e:
            err = e.args[0] if e.args else e
            if isinstance(err, KafkaError) and err.code() == KafkaError._NO_OFFSET:
                return True
            self.metrics.commit_errors.inc()
            log.warning("event=commit-failed why=%s error=%s", why, err)
            return False
        self.metrics.commit_latency.observe(time.perf_counter() - t0)
        self.tracker.committed(offsets)
        return True

    # ------------------------------------------------------------------ loop side

    async def _drain(self, states: list[PartitionState], bound: float) -> dict[TP, int]:
        deadline = time.monotonic() + bound
        for attr in ("_unclaimed", "_parked"):
            held = getattr(self, attr)
            gone = [m for m in held if m._part.revoked]
            if gone:
                setattr(self, attr, [m for m in held if not m._part.revoked])
                for m in gone:
                    m._part.inflight -= 1
                self.outstanding -= len(gone)
        while any(st.inflight > 0 for st in states) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        left = sum(st.inflight for st in states)
        if left:
            log.warning("event=revoke-drain-timeout still_running=%d bound_s=%.1f", left, bound)
        await self._flush_store()
        tps = {st.tp for st in states}
        return {tp: off for tp, off in self.tracker.to_commit().items() if tp in tps}

    def on_results(self, results: list[Result]) -> None:
        """Called on the loop with a chunk of lane results."""
        tracker, done, win = self.tracker, self._done_keys, self._win
        self._results_in.set()
        latencies = []
        e2es = []
        handled = 0
        failures: list[tuple[Message, BaseException]] = []
        qwait = 0.0
        for msg, outcome, err, dt, e2e, wait in results:
            qwait += wait
            part = msg._part
            fk = self._store_key(msg)
            if outcome is not Outcome.FAILED:         # a failure stays outstanding until routed
                part.inflight -= 1
                self.outstanding -= 1
            if outcome is Outcome.OK:
                handled += 1
                latencies.append(dt)
                e2es.append(e2e)
                if fk is not None:
                    done.append(fk)               # held in _claimed_at until the mark is written
                tracker.finish(part.tp, msg.offset)
            elif outcome is Outcome.FAILED:
                latencies.append(dt)
                assert err is not None
                failures.append((msg, err))
            elif fk is not None and msg.claimed:  # ABANDONED: free its claim for the next owner now
                self._release_keys.append(fk)
        n_lat = len(latencies)
        win[0] += n_lat
        # Only transient failures (timeouts, refused connections) say the downstream is sick;
        # bad data (permanent, poison) is routed without slowing the healthy records behind it.
        rules = self.s.routing
        win[1] += sum(1 for msg, err in failures
                      if err is not msg.decode_error and classify(err, rules) is Classification.TRANSIENT)
        win[2] += sum(latencies)
        win[4] += qwait
        m = self.metrics
        if handled:
            m.handled.inc(handled)
            m.handler_latency.observe_many(latencies)
            m.e2e_latency.observe_many(e2es)
        for msg, err in failures:
            m.errors.labels(type(err).__name__).inc()
            self._route(msg, err)

    def _route(self, msg: Message, err: BaseException) -> None:
        """Hand a failure to the router; the message stays unfinished until it says so."""
        assert self.loop is not None
        self.loop.create_task(self._route_task(msg, err))

    async def _route_task(self, msg: Message, err: BaseException) -> None:
        assert self.dispatcher is not None
        verdict = await self.router.route(msg, err, self)
        part = msg._part
        if verdict == "resubmit" and not part.revoked and not self._stop.is_set():
            msg.attempts += 1
            self._dispatch([msg])
            return
        part.inflight -= 1
        self.outstanding -= 1
        if verdict == "routed":
            # On another topic now, produce acknowledged: the offset may pass it. Its claim is
            # released, not marked done: the retry (or a replay) must be able to claim it.
            self.tracker.finish(part.tp, msg.offset)
        fk = self._store_key(msg)
        if fk is not None and msg.claimed:
            self._release_keys.append(fk)

    def _store_key(self, msg: Message) -> str | None:
        return None if self.store is None else msg.idempotency_key

    def _dispatch(self, items: list[Message]) -> None:
        assert self.dispatcher is not None
        if self.outstanding > self._win[3]:
            self._win[3] = self.outstanding
        self.dispatcher.submit(items)

    def _wrap(self, raw: list[Any]) -> list[Message]:
        out = []
        decode, parts, tracker, store = self.decode, self.parts, self.tracker, self.store
        hdr, fld = self.s.idempotency.key_header, self.s.idempotency.key_field
        max_bytes, deferred = self.s.routing.max_message_bytes, self.deferred
        for m in raw:
            err = m.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("event=fetch-error error=%s", err)
                continue
            tp = (m.topic(), m.partition())
            part = parts.get(tp)
            if part is None or part.revoked or tp in deferred:
                continue                      # not ours, or waiting for a due time: fetched again later
            headers = m.headers()
            attempts = 0
            if part.retry and headers:
                due, attempts = _retry_header(headers)
                if due and due > time.time() * 1000:
                    self._defer(tp, m.offset(), due)
                    continue
            value = m.value()
            if value is not None and len(value) > max_bytes:
                payload, derr = None, PoisonError(f"value of {len(value)} bytes exceeds maxMessageBytes {max_bytes}")
            else:
                try:
                    payload, derr = decode(value), None
                except Exception as e:  # noqa: BLE001 - DecodeError and anything a decoder raises
                    payload, derr = None, e
            msg = Message(tp[0], tp[1], m.offset(), m.key(), value, headers, m.timestamp()[1],
                          payload, derr)
            msg.attempts = attempts
            msg.idempotency_key = idempotency_key(msg, hdr, fld)
            msg._part = part
            msg._store = store
            part.inflight += 1
            tracker.add(tp, msg.offset)
            out.append(msg)
        self.outstanding += len(out)
        self.metrics.consumed.inc(len(out))
        return out

    def _claim_and_dispatch(self, msgs: list[Message]) -> None:
        """Claim a batch and dispatch it, as a task: the next batch is fetched and decoded
        while this claim is in flight. Dispatch still happens in batch order (each step
        waits for the previous one before dispatching), which keeps same-key order."""
        if self.store is None:
            self._dispatch(msgs)
            return
        assert self.loop is not None
        prev = self._claims[-1] if self._claims else None
        self._claims.append(self.loop.create_task(self._claim_step(msgs, prev)))

    async def _claim_step(self, msgs: list[Message], prev: "asyncio.Task[None] | None") -> None:
        assert self.store is not None
        keys = [m.idempotency_key for m in msgs]
        done = self._done_keys
        self._done_keys = []
        codes: list[Claim] | None
        try:
            codes = await self.store.claim(keys, done)
        except StoreUnavailable as e:
            self._done_keys = done + self._done_keys
            self._store_failed(e)
            codes = None
        except Exception as e:  # noqa: BLE001 - never lose a batch to an unexpected error
            log.exception("event=claim-failed error=%r", e)
            self._done_keys = done + self._done_keys
            codes = None
        if prev is not None and not prev.done():
            await asyncio.shield(prev)
        if codes is None or self._unclaimed:
            # Retried, in order, once the store answers; a batch behind an unclaimed one
            # waits too, so no key overtakes its predecessor (re-claiming our own key is fine).
            self._unclaimed.extend(msgs)
            return
        self._store_ok()
        self._written_done(done)
        self._apply_claims(msgs, keys, codes)

    def _written_done(self, keys: list[str]) -> None:
        """Done marks of `keys` are in the store: stop holding them, and remember them for a
        while, so a claim answered MINE just before a mark landed is known to be done."""
        now = time.monotonic()
        recent, held = self._done_recent, self._claimed_at
        for k in keys:
            held.pop(k, None)
            recent[k] = now
            recent.move_to_end(k)
        cutoff = now - DONE_MEMORY_S
        while recent and (len(recent) > DONE_MEMORY_MAX or next(iter(recent.values())) < cutoff):
            recent.popitem(last=False)

    def _apply_claims(self, msgs: list[Message], keys: list[str], codes: list[Claim]) -> None:
        """Dispatch what we won, finish what is done, park what someone else holds."""
        now = time.monotonic()
        items: list[Message] = []
        skipped = dropped = 0
        claimed_at, tracker, parked = self._claimed_at, self.tracker, self._parked
        for m, k, c in zip(msgs, keys, codes):
            part = m._part
            if c is Claim.MINE:
                # Ours: another copy of this key is in flight here (wait for it); or its done
                # mark was written while this claim was on its way (skip: Redis answered
                # before the mark landed); or an earlier claim's answer was lost (take it).
                c = (Claim.BUSY if k in claimed_at else Claim.DONE if k in self._done_recent
                     else Claim.CLAIMED)
            m.claimed = c is Claim.CLAIMED
            if c is Claim.DONE:
                tracker.finish(part.tp, m.offset)
                part.inflight -= 1
                skipped += 1
            elif part.revoked:
                part.inflight -= 1
                dropped += 1
                if m.claimed:
                    self._release_keys.append(k)
            elif c is Claim.BUSY:
                parked.append(m)
            else:
                claimed_at[k] = now
                items.append(m)
        self.outstanding -= skipped + dropped
        if skipped:
            self.metrics.skipped.inc(skipped)
        if items:
            self._dispatch(items)

    async def _recheck_parked(self) -> None:
        """Parked messages: is their key done now (skip), free (run), or still held (wait)?"""
        if self.store is None or not self._parked:
            return
        msgs, self._parked = self._parked, []
        keys = [m.idempotency_key for m in msgs]
        done, self._done_keys = self._done_keys, []
        try:
            codes = await self.store.claim(keys, done)
        except StoreUnavailable as e:
            self._done_keys = done + self._done_keys
            self._parked = msgs + self._parked
            self._store_failed(e)
            return
        self._written_done(done)
        self._apply_claims(msgs, keys, codes)

    async def _settle_claims(self, keep: int) -> None:
        """Wait until at most `keep` claim steps are in flight."""
        claims = self._claims
        while claims and claims[0].done():
            claims.popleft()
        while len(claims) > keep:
            await claims.popleft()

    def _store_failed(self, e: Exception) -> None:
        self.metrics.store_errors.inc()
        if self.store_down_since is None:
            self.store_down_since = time.monotonic()
            log.error("event=idempotency-store-down action=pause-and-retry error=\"%s\"", e)

    def _store_ok(self) -> None:
        if self.store_down_since is not None:
            log.warning("event=idempotency-store-back down_s=%.1f", time.monotonic() - self.store_down_since)
            self.store_down_since = None

    async def _retry_unclaimed(self) -> None:
        msgs, self._unclaimed = self._unclaimed, []
        gone = [m for m in msgs if m._part.revoked]
        for m in gone:
            m._part.inflight -= 1
        self.outstanding -= len(gone)
        self._claim_and_dispatch([m for m in msgs if not m._part.revoked])
        await self._settle_claims(0)

    async def _flush_store(self) -> None:
        if self.store is None:
            return
        if self._done_keys:
            done, self._done_keys = self._done_keys, []
            try:
                await self.store.mark_done(done)
            except StoreUnavailable as e:
                self._done_keys = done + self._done_keys
                self._store_failed(e)
                return
            self._written_done(done)
        if self._release_keys:
            rel, self._release_keys = self._release_keys, []
            for k in rel:
                self._claimed_at.pop(k, None)
            try:
                await self.store.release(rel)
            except StoreUnavailable as e:
                self.metrics.store_errors.inc()
                log.warning("event=release-failed keys=%d error=\"%s\" detail=\"claims expire after the lease\"",
                            len(rel), e)

    async def _renew_leases(self) -> None:
        if self.store is None or not self._claimed_at:
            return
        cutoff = time.monotonic() - self.s.idempotency.lease_ms / 3000
        old = [k for k, t in self._claimed_at.items() if t < cutoff]
        if not old:
            return
        try:
            await self.store.renew(old)
        except StoreUnavailable as e:
            self._store_failed(e)
            return
        now = time.monotonic()
        for k in old:
            self._claimed_at[k] = now

    async def _wait_results(self, timeout: float) -> None:
        self._results_in.clear()
        try:
            await asyncio.wait_for(self._results_in.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def _flow_state(self, state: str) -> None:
        if state != self.flow_state:
            log.info("event=flow-state from=%s to=%s inflight=%d limit=%d", self.flow_state, state,
                     self.outstanding, self.ctl.limit)
            self.flow_state = state

    def block_route(self, tp: TP, blocked: bool) -> None:
        """The router cannot deliver a record of `tp`: pause it (its commit point is held
        anyway) until every failing route of it went through or was abandoned."""
        n = self.route_blocked.get(tp, 0) + (1 if blocked else -1)
        if n > 0:
            self.route_blocked[tp] = n
        else:
            self.route_blocked.pop(tp, None)
        if blocked and n == 1:
            log.warning("event=partition-blocked topic=%s partition=%d reason=route-failing", tp[0], tp[1])
        elif not blocked and n <= 0:
            log.info("event=partition-unblocked topic=%s partition=%d", tp[0], tp[1])

    def _defer(self, tp: TP, offset: int, due_ms: float) -> None:
        """A retry record not yet due: its partition pauses until then, rewound to it
        (Spring Kafka's retry topics pause likewise; nothing sleeps, nothing busy-polls)."""
        delay = max(0.0, due_ms / 1000 - time.time())
        self.deferred[tp] = time.monotonic() + delay
        self._seeks.append((tp, offset))
        log.debug("event=retry-deferred topic=%s partition=%d offset=%d due_in_s=%.2f", tp[0], tp[1], offset, delay)

    async def _apply_deferrals(self) -> None:
        """Seek deferred partitions back to their head record and resume those now due."""
        if self._seeks:
            seeks, self._seeks = self._seeks, []
            c = self.consumer
            assert c is not None

            def seek() -> None:
                c.pause([TopicPartition(t, p) for (t, p), _ in seeks])
                for (t, p), off in seeks:
                    c.seek(TopicPartition(t, p, off))
            await self._k(seek)
            self.paused |= {tp for tp, _ in seeks}
        if self.deferred:
            now = time.monotonic()
            for tp in [tp for tp, due in self.deferred.items() if due <= now]:
                del self.deferred[tp]

    async def _set_paused(self, pause_all: bool) -> None:
        """Pause every partition while saturated (prefetch stops), resume when there is room;
        retry partitions waiting for a due time stay paused either way."""
        c = self.consumer
        assert c is not None
        want = (set(self.parts) if pause_all else set()) | set(self.deferred) | (set(self.route_blocked) & set(self.parts))
        to_pause = [TopicPartition(t, p) for t, p in want - self.paused]
        to_resume = [TopicPartition(t, p) for t, p in self.paused - want if (t, p) in self.parts]
        if to_pause:
            await self._k(c.pause, to_pause)
        if to_resume:
            await self._k(c.resume, to_resume)
        if to_pause or to_resume:
            self.paused = want
            self.metrics.paused.set(len(want - set(self.deferred)))
            log.debug("event=%s partitions=%d inflight=%d limit=%d", "paused" if pause_all else "resumed",
                      len(to_pause or to_resume), self.outstanding, self.ctl.limit)

    async def _commit(self, why: str) -> None:
        """Interval commits are asynchronous (a synchronous one holds the Kafka thread, and
        so the next fetch, for a broker round trip); revoke and shutdown commit synchronously."""
        # Done marks first, and whether or not an offset moved: a parked copy of a key may be
        # waiting on them while its own partition's commit point cannot move.
        await self._flush_store()
        offsets = self.tracker.to_commit()
        if not offsets:
            return
        c = self.consumer
        assert c is not None
        if why != "interval":
            await self._k(self._commit_sync, c, offsets, why)
            return
        if self._commit_sent is not None:
            return                      # the previous async commit has not been answered yet
        self._commit_sent = time.perf_counter()
        tps = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        try:
            await self._k(c.commit, offsets=tps, asynchronous=True)
        except KafkaException as e:
            self._commit_sent = None
            self.metrics.commit_errors.inc()
            log.warning("event=commit-failed why=%s error=%s", why, e)

    def _on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """librdkafka's commit callback (Kafka thread): hand the outcome to the loop."""
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self._committed, err, [(p.topic, p.partition, p.offset, p.error)
                                                              for p in partitions])

    def _committed(self, err: KafkaError | None, parts: list[tuple[str, int, int, Any]]) -> None:
        sent, self._commit_sent = self._commit_sent, None
        if err is not None and err.code() != KafkaError._NO_OFFSET:
            self.metrics.commit_errors.inc()
            log.warning("event=commit-failed why=interval error=%s", err)
            return
        if sent is not None:
            self.metrics.commit_latency.observe(time.perf_counter() - sent)
        self.tracker.committed({(t, p): o for t, p, o, perr in parts if perr is None and o >= 0})

    def _decide(self) -> None:
        completed, errors, lat, peak, qwait = self._win
        self._win = [0, 0, 0.0, self.outstanding, 0.0]
        d = self.ctl.decide(WindowStats(completed, errors, lat, max(peak, self.outstanding), qwait))
        assert self.dispatcher is not None
        self.dispatcher.tune(lat / completed if completed else 0.0, completed)
        m = self.metrics
        m.controller_decisions.labels(d.reason).inc()
        m.inflight_limit.set(d.inflight_limit)
        m.batch_size.set(d.batch_size)
        m.inflight.set(self.outstanding)
        if d.inflight_limit != self._last_limit and d.reason.startswith("overload"):
            log.info("event=fetch-limit reason=%s limit=%d batch=%d mean_latency_ms=%.1f error_rate=%.2f",
                     d.reason, d.inflight_limit, d.batch_size,
                     1000 * lat / completed if completed else 0.0, errors / completed if completed else 0.0)
        self._last_limit = d.inflight_limit
        if self.bp is not None:
            # The level engages on the controller's `overloaded`, the verdict should_pause pauses
            # on, so partitions pause locally first; producers hear of it second (design.md).
            self.bp.observe(LevelInputs(completed, lat * 1000 / completed if completed else 0.0,
                                        errors / completed if completed else 0.0, self.ctl.overloaded,
                                        self.ctl.at_floor, len(self.paused), len(self.parts), self.outstanding))

    async def _update_lag(self) -> None:
        c = self.consumer
        if c is None or not self.parts:
            return
        tps = list(self.parts)

        def read() -> list[tuple[TP, int]]:
            out = []
            for t, p in tps:
                try:
                    _, high = c.get_watermark_offsets(TopicPartition(t, p), cached=True)
                except KafkaException:
                    continue
                st = self.tracker.parts.get((t, p))
                pos = st.committed if st is not None and st.committed is not None else None
                if high >= 0 and pos is not None:
                    out.append(((t, p), max(0, high - pos)))
            return out

        for (t, p), lag in await self._k(read):
            self.metrics.lag.labels(t, str(p)).set(lag)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Connect everything; after this the loop can run. Errors here are configuration errors."""
        self.loop = asyncio.get_running_loop()
        if self._handler is None:
            self._handler, self._close_handler = build_handler(self.s.handler)
        self.store = build_store(self.s, self.owner)
        self.markers = Coalescer(self.store) if self.store is not None else None
        self.bp = build_publisher(self.s, self.instance_id or self.owner, self.metrics)
        lanes = self.s.flow.workers
        disp = AsyncDispatcher if is_async(self._handler) else SyncDispatcher
        self.dispatcher = disp(self._handler, lanes, self.loop, self.on_results)
        conf = kafka_config(self.s, self.instance_id)
        conf["error_cb"] = lambda err: log.warning("event=kafka-error error=%s", err)
        conf["on_commit"] = self._on_commit

        def make() -> Consumer:
            c = Consumer(conf, logger=logging.getLogger("afc.runtime.librdkafka"))
            c.subscribe([*self.s.kafka.topics, *sorted(self.retry_topics)], on_assign=self._on_assign,
                        on_revoke=self._on_revoke, on_lost=self._on_lost)
            return c

        if self._router is not None:
            self.router = self._router
        elif self.s.routing.enabled:
            if self.s.routing.create_topics:
                await asyncio.to_thread(ensure_routing_topics, self.s)
            self.router = TopicRouter(self.s, self.loop)
        self.consumer = await self._k(make)
        log.info("event=started group=%s instance=%s topics=%s workers=%d handler=%s store=%s",
                 self.s.kafka.group_id, self.instance_id, ",".join(self.s.kafka.topics), lanes,
                 self.s.handler.handler or self.s.handler.http_sink_url or getattr(self._handler, "__name__", "?"),
                 type(self.store).__name__ if self.store else "none")

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def request_stop(self, hard: bool = False) -> None:
        if hard:
            self._hard_stop = True
        self._stop.set()

    async def run(self) -> None:
        if self.consumer is None:
            await self.start()
        assert self.consumer is not None
        interval = self.s.offsets.commit_interval_ms / 1000
        window = self.s.flow.window_ms / 1000
        now = time.monotonic()
        next_commit, next_decide, next_lag, next_renew = now + interval, now + window, now + 1, now + 1
        next_parked = now
        store_retry_at = 0.0
        saturated_since: float | None = None
        prefetch: asyncio.Future[list[Any]] | None = None
        ctl = self.ctl
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                self.last_beat = now
                if self._unclaimed and now >= store_retry_at:
                    store_retry_at = now + (1.0 if self.store_down_since is not None else 0.05)
                    await self._retry_unclaimed()
                store_down = self.store_down_since is not None
                budget = 0 if store_down else ctl.fetch_budget(self.outstanding)
                if budget > 0:
                    saturated_since = None
                elif saturated_since is None:
                    saturated_since = now
                want_pause = should_pause(
                    paused=bool(self.paused), outstanding=self.outstanding, limit=ctl.limit,
                    overloaded=ctl.overloaded, store_down=store_down,
                    saturated_for_s=0.0 if saturated_since is None else now - saturated_since)
                self._flow_state("store-down" if store_down else "overloaded" if ctl.overloaded
                                 else "saturated" if want_pause else "open")
                if prefetch is None:
                    if want_pause or budget > 0:
                        await self._set_paused(want_pause)
                        prefetch = self._fetch_async(1 if want_pause else budget, 0.1 if want_pause else 0.05)
                    else:
                        await self._wait_results(0.01)      # momentary saturation
                if prefetch is not None:
                    raw = await prefetch
                    prefetch = None
                    if raw:
                        # Fetch the next batch on the Kafka thread while this one is decoded
                        # and claimed here: the two overlap instead of taking turns.
                        nxt = 0 if want_pause else ctl.fetch_budget(self.outstanding + len(raw))
                        if nxt > 0:
                            prefetch = self._fetch_async(nxt, 0.05)
                        msgs = self._wrap(raw)
                        if msgs:
                            await self._settle_claims(1)
                            self._claim_and_dispatch(msgs)
                now = time.monotonic()
                if now >= next_decide:
                    self._decide()
                    next_decide = now + window
                if now >= next_commit:
                    await self._commit("interval")
                    next_commit = now + interval
                elif self._done_keys and (len(self._done_keys) >= 512 or not self._claims):
                    await self._flush_store()           # no claim step to carry them: send now
                if self._seeks or self.deferred:
                    await self._apply_deferrals()
                if self._parked and now >= next_parked:
                    await self._recheck_parked()
                    next_parked = now + 0.2
                if now >= next_renew:
                    await self._renew_leases()
                    next_renew = now + 1
                if now >= next_lag:
                    await self._update_lag()
                    next_lag = now + 5
                # Let results from the lanes in before the next fetch.
                await asyncio.sleep(0)
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        """Stop fetching, let in-flight work finish within the bound, commit, close."""
        c = self.consumer
        if self._hard_stop or c is None:
            log.warning("event=hard-stop detail=\"no drain, no commit\"")
            self.stopped.set()
            return
        bound = self.s.shutdown.drain_timeout_s
        await self._settle_claims(0)
        log.info("event=draining inflight=%d bound_s=%.1f", self.outstanding, bound)
        try:
            await self._set_paused(True)
        except Exception as e:  # noqa: BLE001
            log.warning("event=pause-on-shutdown-failed error=%r", e)
        deadline = time.monotonic() + bound
        while (self.outstanding > len(self._unclaimed) + len(self._parked) and time.monotonic() < deadline
               and not self._hard_stop):
            await asyncio.sleep(0.02)
        assert self.dispatcher is not None
        await self.dispatcher.close(max(0.0, deadline - time.monotonic()))
        await asyncio.sleep(0)
        if not self._hard_stop:
            await self._commit("shutdown")
            await self._flush_store()
        left = self.outstanding
        try:
            await self._k(c.close)
        except (KafkaException, RuntimeError) as e:
            log.warning("event=close-failed error=%s", e)
        self._kafka.shutdown(wait=False)
        if self._close_handler is not None:
            await self._close_handler()
        await self.router.close()
        if self.bp is not None:
            await self.bp.close()
        if self.store is not None:
            await self.store.close()
        log.info("event=stopped unfinished=%d", left)
        self.stopped.set()

    def install_signals(self) -> None:
        """SIGTERM/SIGINT: drain and stop; a second one: exit at once."""
        assert self.loop is not None

        def handler(signum: int) -> None:
            if self._stop.is_set():
                log.warning("event=second-signal signal=%s action=exit-now", signal.Signals(signum).name)
                os._exit(128 + signum)
            log.info("event=signal signal=%s action=drain", signal.Signals(signum).name)
            self.request_stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, handler, sig)

    # ------------------------------------------------------------------ health

    def health(self) -> tuple[bool, str]:
        stall = time.monotonic() - self.last_beat
        if stall > self.s.server.liveness_timeout_s:
            return False, f"loop stalled {stall:.0f}s"
        return True, "ok"

    def readiness(self) -> tuple[bool, str]:
        if self._stop.is_set():
            return False, "stopping"
        if not self.joined:
            return False, "not joined"
        if self.store_down_since is not None:
            return True, f"ok (idempotency store down {time.monotonic() - self.store_down_since:.0f}s)"
        if not self.parts:
            return True, "ok (idle: no partitions assigned)"
        return True, f"ok ({len(self.parts)} partitions)"


def _fmt(partitions: list[TopicPartition]) -> str:
    return ",".join(f"{p.topic}[{p.partition}]" for p in partitions) or "-"


def _fmt_offsets(offsets: dict[TP, int]) -> str:
    return ",".join(f"{t}[{p}]@{o}" for (t, p), o in sorted(offsets.items())) or "-"


def _retry_header(headers: list[tuple[str, bytes]]) -> tuple[float, int]:
    """(due time in ms, attempts so far) from a retry record's headers; zeros if absent or bad."""
    due, attempts = 0.0, 0
    for k, v in headers:
        try:
            if k == H_DUE:
                due = float(v)
            elif k == H_ATTEMPTS:
                attempts = int(v)
        except (TypeError, ValueError):
            pass
    return due, attempts


def ensure_routing_topics(s: RuntimeSettings) -> None:
    """Create missing retry, dead-letter and poison topics with their source's partition
    count. Best effort and bounded: a failure is logged, and routing retries its produce."""
    from confluent_kafka.admin import AdminClient, NewTopic
    r = s.routing
    conf = {k: v for k, v in kafka_config(s, None).items()
            if k.startswith(("bootstrap", "security", "sasl", "ssl"))}
    admin = AdminClient(conf)
    try:
        md = admin.list_topics(timeout=10)
        want = []
        for t in s.kafka.topics:
            src = md.topics.get(t)
            n = len(src.partitions) if src is not None and not src.error else 1
            for suffix in (r.retry_suffix, r.dlq_suffix, r.poison_suffix):
                if t + suffix not in md.topics:
                    want.append(NewTopic(t + suffix, n, -1))
        if not want:
            return
        for name, fut in admin.create_topics(want, operation_timeout=15).items():
            try:
                fut.result(timeout=20)
                log.info("event=topic-created topic=%s", name)
            except Exception as e:  # noqa: BLE001 - TOPIC_ALREADY_EXISTS from a racing replica, or ACLs
                log.warning("event=topic-create-failed topic=%s error=\"%s\"", name, e)
    except Exception as e:  # noqa: BLE001
        log.warning("event=topic-check-failed error=\"%s\"", e)
