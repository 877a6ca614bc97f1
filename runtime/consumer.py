"""The control loop: the one owner of all consumer state.

```
Kafka thread (librdkafka only)  --fetched batches, rebalance events, commit answers-->  inbox
workers (threads or tasks)      --results------------------------------------------->  inbox
idempotency session (one store call at a time)  --claims, written done marks-------->  inbox
route tasks                     --verdicts ----------------------------------------->  inbox
control loop: drain the inbox, then tick: pause/resume from each partition's reasons,
seeks, fetch, claim, dispatch, watchdog, commit, controller, lag.
```

Nothing but the loop mutates `Partition`s, the key gate, the parked set or the flow
controller. librdkafka's rebalance callbacks run on the Kafka thread and only post an
event (a revoke then waits for the loop's answer: the offsets to commit once the revoked
partitions' work is finished or the bound is reached; the callback commits them itself,
still on the Kafka thread). Every Kafka call goes through that one thread in order, and
each carries the assignment epoch it was computed under, so a commit or a pause computed
before a revoke is dropped rather than sent after it.

Offsets pass a message only once it is finished: handled and its done mark written,
skipped as done, or routed with the produce acknowledged (and its routing marker
written). Nothing at or above the first unfinished message is ever committed.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import math
import os
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import groupby
from typing import Any, Callable

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from .backpressure import LevelInputs, SignalPublisher, build_publisher
from .concurrency import ConcurrencyLimit, ConcurrencyWindow
from .config import RuntimeSettings
from .dispatch import KeyGate, Outcome, Result, TaskDispatcher, ThreadDispatcher
from .errors import ClaimLost, PoisonError, StoreUnavailable
from .eventloop import loop_name
from .fetch_control import FetchController, WindowStats, should_pause
from .handlers import build_handler, is_async
from .idempotency import EVICTING_POLICIES, Claim, IdempotencyStore, RedisStore, SqliteStore
from .message import DECODERS, UNREAD, Message, key_deriver, position_key
from .metrics import RuntimeMetrics
from .partition import FLOW, TP, Partition
from .routing import H_ATTEMPTS, H_DUE, Classification, InPlaceRetry, Router, TopicRouter, classify
from .session import Outcome as StoreOutcome
from .session import MARK_LINGER_S, Session

log = logging.getLogger("afc.runtime.consumer")
TOPIC_ID = "topic-id"          # pause reason: the topic's id is being looked up
EXIT_FATAL = 3
WATCHDOG_S = 0.01               # how often the loop checks for stuck and overdue handler calls
PAUSE_WALK_S = 0.01             # how often the partitions' pause reasons are walked when nothing asked for it
FETCH_SPAN_S = 1.0              # longest one fetch goes on handing records over in parts (Runtime._fetch)
MAX_FETCHES = 2                 # fetches on their way to the Kafka thread at once (see Runtime._maybe_fetch)
# Group membership as /readyz reports it: ready only while HOLDING. librdkafka calls the assign
# callback after every rebalance (eager, cooperative and KIP-848 alike, an empty list included),
# so every state below ends at the next assignment.
JOINING = "joining"            # started, no assignment yet
HOLDING = "holding"            # assigned (possibly nothing) and holding it
REVOKING = "revoking"          # a revoke is being handled: the group is rebalancing around us
LOST = "lost"                  # the group moved on without us (session timeout, fenced epoch)


def _part_of(m: Message) -> Partition:
    """A record's partition (the key that groups written done marks by partition run)."""
    return m._part


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
        "fetch.queue.backoff.ms": k.fetch_queue_backoff_ms,
        "max.poll.interval.ms": m.max_poll_interval_ms,
        "client.id": f"afc-{instance_id or 'dynamic'}",
        "security.protocol": k.security_protocol,
    }
    if m.group_protocol == "consumer":
        conf["group.protocol"] = "consumer"
        # Each member subscribes to the sources and their .retry topics: an assignor that
        # balances the total count may give a member only (idle) retry partitions. range
        # balances every topic on its own.
        conf["group.remote.assignor"] = m.remote_assignor
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


def admin_config(s: RuntimeSettings) -> dict[str, Any]:
    return {k: v for k, v in kafka_config(s, None).items() if k.startswith(("bootstrap", "security", "sasl", "ssl"))}


def build_store(s: RuntimeSettings, owner: str) -> IdempotencyStore | None:
    i = s.idempotency
    if not i.enabled:
        return None
    args = (i.key_prefix, s.kafka.group_id, owner, i.lease_ms, i.done_ttl_s)
    if i.redis_url:
        return RedisStore(i.redis_url.get_secret_value(), *args)
    return SqliteStore(i.sqlite_path, *args)


@dataclass
class Revoke:
    tps: list[TP]
    reply: "concurrent.futures.Future[dict[TP, tuple[int, int]]]"
    deadline: float


class Runtime:
    def __init__(self, settings: RuntimeSettings, handler: Callable[[Message], Any] | None = None,
                 router: Router | None = None) -> None:
        self.s = settings
        self.instance_id = settings.membership.resolved_instance_id()
        # The owner of claims: this process incarnation (tokens are `<owner>.<seq>`).
        self.owner = f"{self.instance_id or 'dyn'}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.metrics = RuntimeMetrics()
        self.ctl = FetchController(settings.flow)
        # Handler calls at once (the dispatcher applies it); its upper bound depends on the
        # handler's kind, known in start(): until then, the async bound.
        self.conc = ConcurrencyLimit(settings.flow, settings.flow.resolved_workers(True))
        self._busy_at_start = 0                       # handler calls in progress when this window began
        self.parts: dict[TP, Partition] = {}
        self.paused: set[TP] = set()                  # what the Kafka thread was last told to pause
        self.fresh: set[TP] = set()                   # assigned since the last tick: pause state unknown
        self.gate = KeyGate()
        self.parked: dict[int, Message] = {}          # their idempotency key is held elsewhere
        self.rechecking: set[int] = set()             # parked messages whose re-claim is in flight
        self._releasing: list[Message] | None = None  # released behind their keys, admitted together
        self._parked_logged = 0.0
        self.membership = JOINING                     # see JOINING..LOST; only _set_membership changes it
        # Monotonic per-process health counters (the loop alone writes them; the signal
        # publisher reads them into the member's Redis record for the operator's canary gates):
        # handler runs that returned, handler runs that failed, records routed to .dlq/.poison.
        self.counts = {"handled": 0, "failed": 0, "deadLettered": 0}
        self.lag: dict[TP, int] = {}                  # last measured lag of each assigned partition
        self.flow_state = "open"
        self.decode = DECODERS[settings.handler.decoder]
        self._key_of = key_deriver(self.decode, settings.idempotency.key_header, settings.idempotency.key_field)
        self._handler = handler
        self._close_handler: Callable[[], Any] | None = None
        self._router = router
        self.router: Router = InPlaceRetry()
        r = settings.routing
        self.retry_topics = {t + r.retry_suffix for t in settings.kafka.topics} if r.enabled else set()
        self.topic_ids: dict[str, str | None] = {}
        self.store: IdempotencyStore | None = None
        self.session: Session | None = None
        self.bp: SignalPublisher | None = None
        self.inbox: list[tuple[Any, ...]] = []
        self._waiter: asyncio.Future[None] | None = None   # the loop's sleep; any event ends it
        self.routes = 0                               # route tasks in flight
        self.revokes: list[Revoke] = []
        self.fetch_seq = 0
        self.fetching = 0                             # fetches sent to the Kafka thread, not yet applied
        self._reserved = 0                            # their budgets (messages they may bring)
        self._full = False                            # the last applied fetch brought its whole budget
        self._linger_s = settings.flow.fetch_linger_ms / 1000   # see _fetch
        self.commit_inflight = False
        self._commit_started = 0.0
        self.state = "new"                            # new, running, draining, committing, closing, closed
        self.fatal: str | None = None
        self.exit_code = 0
        self._hard_stop = False
        self._drain_deadline = 0.0
        self._saturated_since: float | None = None
        self._flow_on = False                         # FLOW is among every partition's reasons
        self._walk_at = 0.0                           # next time _pauses walks the partitions anyway
        self._rewalk = True                           # a reason changed: walk them at the next tick
        # completed, transient errors, latency sum, peak, queue wait, fastest successful call
        self._win: list[Any] = [0, 0, 0.0, 0, 0.0, math.inf]
        self._step_at: list[Any] = [0, 0, 0.0, 0.0]      # _win's sums at the last early slow-start step
        self._last_limit = self.ctl.limit
        self.last_beat = time.monotonic()
        self.consumer: Consumer | None = None
        self._kafka = ThreadPoolExecutor(1, thread_name_prefix="afc-kafka")
        self._k_sent = 0                              # Kafka calls sent by the loop (written by the loop)...
        self._k_started = 0                           # ...and begun (by the Kafka thread); see _fetch
        self._parts_taken: dict[int, int] = {}        # records each fetch still going on handed over
        self._k_epochs: dict[TP, int] = {}            # owned by the Kafka thread
        self._k_epoch = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.dispatcher: ThreadDispatcher | TaskDispatcher | None = None
        self.stopped = asyncio.Event()
        self.evicting = False

    # ================================================================ Kafka thread

    def _kop(self, fn: Callable[..., Any], *args: Any, then: str | None = None) -> "asyncio.Future[Any]":
        """Run `fn` on the Kafka thread, in order with every other Kafka call; its outcome
        comes back to the inbox as (then, future) if `then` is given."""
        assert self.loop is not None
        self._k_sent += 1
        fut = self.loop.run_in_executor(self._kafka, self._k_job, fn, *args)
        if then is not None:
            fut.add_done_callback(lambda f: self._post((then, f)))
        return fut

    def _k_job(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Kafka thread: count a call as begun, so a fetch still going on sees none waits."""
        self._k_started += 1
        return fn(*args)

    def _post(self, event: tuple[Any, ...]) -> None:
        """On the loop's thread: queue an event and wake the loop."""
        self.inbox.append(event)
        self._wakeup()

    def _wakeup(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _post_threadsafe(self, event: tuple[Any, ...]) -> None:
        assert self.loop is not None
        try:
            self.loop.call_soon_threadsafe(self._post, event)
        except RuntimeError:            # loop closed during a hard exit
            pass

    def _fetch(self, budget: int, timeout: float, seq: int) -> None:
        """Kafka thread: one fetch of up to `budget` records (see _fetch_once). One that
        brings fewer hands them to the loop as a part and fetches again for the rest, while
        no other Kafka call waits behind it and for at most FETCH_SPAN_S. At a modest rate
        each fetch brings a record or a few: the loop then does not wake this thread for
        every batch (a context switch each; afc at 500 msg/s took 31 % of a core with them,
        27 % without: docs/performance.md). A call sent meanwhile (a commit, a pause, a seek)
        waits at most one poll, as behind one fetch.

        Parts and the end go to the loop in one channel (call_soon_threadsafe, first in first
        out) with the rebalance callbacks, never through the executor's future: that comes
        back a loop turn later, so the next fetch's first part overtook a fetch's end, and
        the end's records looked like a re-fetch and were dropped. The future only reports
        a failure."""
        taken = 0
        end = time.monotonic() + FETCH_SPAN_S
        while True:
            out = self._fetch_once(budget - taken, timeout)
            if not out or taken + len(out) >= budget or self._k_sent != self._k_started \
                    or self.state != "running" or time.monotonic() >= end:
                self._post_threadsafe(("fetched", seq, out, budget))
                return
            taken += len(out)
            self._post_threadsafe(("fetched-part", seq, out))

    def _fetch_once(self, budget: int, timeout: float) -> list[Any]:
        """Kafka thread: wait for one message, then take what is already there. If more than
        one was there but fewer than the budget (records arriving as a stream), wait up to
        flow.fetchLingerMs for the rest: at a modest rate a fetch otherwise brings a handful,
        and each batch costs a store call and three thread hand-offs whatever its size. A lone
        record (a trickle) is handed on at once."""
        c = self.consumer
        assert c is not None
        first = c.poll(timeout)
        if first is None:
            return []
        if budget <= 1:
            return [first]
        out = [first, *c.consume(budget - 1, 0)]
        if self._linger_s and 1 < len(out) < budget:
            out += c.consume(budget - len(out), self._linger_s)
        return out

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        out = []
        for p in partitions:
            self._k_epoch += 1
            self._k_epochs[(p.topic, p.partition)] = self._k_epoch
            out.append(((p.topic, p.partition), self._k_epoch))
        self._post_threadsafe(("assign", out))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Kafka thread, inside poll: ask the loop to finish these partitions' work, then
        commit what it says and let them go. The loop never waits on this thread meanwhile."""
        tps = [(p.topic, p.partition) for p in partitions]
        reply: concurrent.futures.Future[dict[TP, tuple[int, int]]] = concurrent.futures.Future()
        self._post_threadsafe(("revoke", tps, reply))
        try:
            offsets = reply.result(self._revoke_bound() + 5)
        except Exception as e:  # noqa: BLE001 - a failed drain must not break the rebalance
            log.error("event=revoke-drain-failed error=%r", e)
            offsets = {}
        if offsets:
            self._commit_now(offsets, "revoke")
        for tp in tps:
            self._k_epochs.pop(tp, None)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        tps = [(p.topic, p.partition) for p in partitions]
        for tp in tps:
            self._k_epochs.pop(tp, None)
        self._post_threadsafe(("lost", tps))

    def _on_error(self, err: KafkaError) -> None:
        """librdkafka's error callback (Kafka thread). Fatal errors (a fenced static member,
        for one) end the process: a consumer that can no longer consume must not look alive."""
        if err.fatal() or err.code() == KafkaError._FATAL:
            reason = err.str()
            self._post_threadsafe(("fatal", f"kafka: {reason}"))
        else:
            log.warning("event=kafka-error error=\"%s\"", str(err).replace('"', "'"))

    def _on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        self._post_threadsafe(("committed", err, [(p.topic, p.partition, p.offset, p.error) for p in partitions]))

    def _current(self, offsets: dict[TP, tuple[int, int]]) -> list[TopicPartition]:
        """Kafka thread: the offsets whose partition is still held under the same epoch."""
        return [TopicPartition(t, p, o) for (t, p), (o, e) in offsets.items() if self._k_epochs.get((t, p)) == e]

    def _commit_now(self, offsets: dict[TP, tuple[int, int]], why: str) -> list[tuple[str, int, int]]:
        """Kafka thread: a synchronous commit of the offsets still ours."""
        c = self.consumer
        tps = self._current(offsets)
        if c is None or not tps:
            return []
        t0 = time.perf_counter()
        try:
            c.commit(offsets=tps, asynchronous=False)
        except KafkaException as e:
            err = e.args[0] if e.args else e
            if isinstance(err, KafkaError) and err.code() == KafkaError._NO_OFFSET:
                return []
            self.metrics.commit_errors.inc()
            log.warning("event=commit-failed why=%s error=%s", why, err)
            return []
        self.metrics.commit_latency.observe(time.perf_counter() - t0)
        log.info("event=committed why=%s offsets=%s", why, ",".join(f"{t}[{p}]@{o}" for t, p, o in
                                                                    ((x.topic, x.partition, x.offset) for x in tps)))
        return [(x.topic, x.partition, x.offset) for x in tps]

    def _commit_async(self, offsets: dict[TP, tuple[int, int]]) -> bool:
        c = self.consumer
        tps = self._current(offsets)
        if c is None or not tps:
            return False
        c.commit(offsets=tps, asynchronous=True)
        return True

    def _set_paused(self, pause: list[TP], resume: list[TP], seeks: list[tuple[TP, int]],
                    epochs: dict[TP, int]) -> None:
        """Kafka thread: pause, resume and seek the partitions still held under the epoch the
        loop computed this for. A pause computed before a revoke must not land on the same
        partition assigned again (eager rebalances hand the same partitions back): the loop,
        which no longer counts it paused, would never resume it."""
        c = self.consumer
        assert c is not None
        held = self._k_epochs

        def ours(tp: TP) -> bool:
            return held.get(tp) == epochs.get(tp)
        p = [TopicPartition(t, q) for t, q in pause if ours((t, q))]
        p += [TopicPartition(t, q) for (t, q), _ in seeks if ours((t, q)) and (t, q) not in pause]
        if p:
            c.pause(p)
        for (t, q), off in seeks:
            if ours((t, q)):
                c.seek(TopicPartition(t, q, off))
        r = [TopicPartition(t, q) for t, q in resume if ours((t, q))]
        if r:
            c.resume(r)

    def _watermarks(self, tps: list[TP]) -> list[tuple[TP, int]]:
        c = self.consumer
        assert c is not None
        out = []
        for t, p in tps:
            try:
                _, high = c.get_watermark_offsets(TopicPartition(t, p), cached=True)
            except KafkaException:
                continue
            out.append(((t, p), high))
        return out

    def _revoke_bound(self) -> float:
        return min(self.s.shutdown.drain_timeout_s, self.s.membership.max_poll_interval_ms / 2000)

    # ================================================================ inbox

    def _drain_inbox(self) -> None:
        events, self.inbox = self.inbox, []
        for ev in events:
            kind = ev[0]
            if kind == "results":
                self._on_results(ev[1])
            elif kind == "fetched":
                self._on_fetched(ev[1], ev[2], ev[3])
            elif kind == "fetch-failed":
                self._on_fetch_failed(ev[1], ev[2], ev[3])
            elif kind == "fetched-part":
                self._on_fetched_part(ev[1], ev[2])
            elif kind == "store":
                self._on_store(ev[1])
            elif kind == "verdict":
                self._on_verdict(ev[1], ev[2])
            elif kind == "assign":
                self._on_assigned(ev[1])
            elif kind == "revoke":
                self._on_revoking(ev[1], ev[2])
            elif kind == "lost":
                self._on_lost_parts(ev[1])
            elif kind == "committed":
                self._on_committed(ev[1], ev[2])
            elif kind == "commit-sent":
                self._on_commit_sent(ev[1])
            elif kind == "ids":
                self._on_topic_ids(ev[1])
            elif kind == "lag":
                self._on_lag(ev[1])
            elif kind == "pause-op":
                if ev[1].exception() is not None:
                    log.warning("event=pause-failed error=%r", ev[1].exception())
            elif kind == "fatal":
                self._fail(ev[1])
            elif kind == "blocked":
                self._on_blocked(ev[1], ev[2])
            elif kind == "routed-to":
                if ev[1] in ("dlq", "poison"):
                    self.counts["deadLettered"] += 1

    # ---------------------------------------------------------------- membership

    def _on_assigned(self, assigned: list[tuple[TP, int]]) -> None:
        ask = set()
        for tp, epoch in assigned:
            part = Partition(tp, epoch, retry=tp[0] in self.retry_topics, topic_id=self.topic_ids.get(tp[0]))
            if tp[0] not in self.topic_ids:
                part.reasons.add(TOPIC_ID)
                ask.add(tp[0])
            self.parts[tp] = part
        self.paused -= {tp for tp, _ in assigned}
        self.fresh |= {tp for tp, _ in assigned}
        self._rewalk = True
        if ask:
            assert self.loop is not None
            fut = self.loop.run_in_executor(None, self._describe_topics, sorted(ask))
            fut.add_done_callback(lambda f: self._post(("ids", f)))
        self._set_membership(HOLDING, f"assigned {len(assigned)} partitions")
        self.metrics.rebalances.labels("assign").inc()
        self.metrics.assigned.set(len(self.parts))
        log.info("event=assigned partitions=%s total=%d", _fmt(tp for tp, _ in assigned), len(self.parts))

    def _set_membership(self, to: str, why: str) -> None:
        """The one writer of `membership` (the loop, from rebalance events): /readyz reads it."""
        if to != self.membership:
            log.info("event=membership from=%s to=%s why=\"%s\"", self.membership, to, why)
            self.membership = to

    def _describe_topics(self, names: list[str], warn: bool = True) -> dict[str, str | None]:
        """Topic ids (a thread of its own: an admin call, not a consumer call)."""
        from confluent_kafka import TopicCollection
        from confluent_kafka.admin import AdminClient
        admin = AdminClient(admin_config(self.s))
        out: dict[str, str | None] = {}
        for name, fut in admin.describe_topics(TopicCollection(names), request_timeout=10).items():
            try:
                out[name] = str(fut.result(timeout=15).topic_id)
            except Exception as e:  # noqa: BLE001 - fall back to the name, and say so
                if warn:
                    log.warning("event=topic-id-unknown topic=%s error=\"%s\" detail=\"position keys use the name\"",
                                name, str(e).replace('"', "'"))
                out[name] = None
        return out

    def _on_topic_ids(self, fut: "asyncio.Future[dict[str, str | None]]") -> None:
        try:
            ids = fut.result()
        except Exception as e:  # noqa: BLE001
            log.warning("event=topic-id-lookup-failed error=\"%s\"", str(e).replace('"', "'"))
            ids = {p.tp[0]: None for p in self.parts.values() if TOPIC_ID in p.reasons}
        self.topic_ids.update(ids)
        for p in self.parts.values():
            if p.tp[0] in ids:
                p.topic_id = ids[p.tp[0]]
                p.reasons.discard(TOPIC_ID)
                self._rewalk = True

    def _forget(self, tps: set[TP]) -> list[Partition]:
        """Stop all not-started work of these partitions (they are leaving)."""
        parts = [self.parts[tp] for tp in tps if tp in self.parts]
        for p in parts:
            p.revoking = True
        assert self.dispatcher is not None

        def keep(m: Message) -> bool:
            return not m._part.revoking

        for m in self.dispatcher.take_back(keep):
            self._abandon(m, admitted=True)
        for m in self.gate.forget(keep):
            self._abandon(m, admitted=False)
        for i, m in list(self.parked.items()):
            if m._part.revoking:
                del self.parked[i]
                self._abandon(m, admitted=True)
        return parts

    def _on_revoking(self, tps: list[TP], reply: "concurrent.futures.Future[dict[TP, tuple[int, int]]]") -> None:
        """Take nothing new from these partitions; their accepted work may finish within
        the bound (less to re-deliver), then what is finished is committed."""
        for tp in tps:
            if tp in self.parts:
                self.parts[tp].revoking = True
        self._rewalk = True
        self._set_membership(REVOKING, f"revoke of {len(tps)} partitions")
        bound = 0.0 if self.state in ("closing", "closed") else self._revoke_bound()
        self.revokes.append(Revoke(tps, reply, time.monotonic() + bound))
        log.info("event=revoking partitions=%s bound_s=%.1f", _fmt(tps), bound)

    def _finish_revokes(self, now: float) -> None:
        """Answer each revoke once its partitions' work is done (or its bound passed)."""
        keep = []
        for r in self.revokes:
            parts = [self.parts[tp] for tp in r.tps if tp in self.parts]
            left = sum(p.inflight for p in parts)
            if left > 0 and now < r.deadline:
                keep.append(r)
                continue
            if left > 0:
                log.warning("event=revoke-drain-timeout still_running=%d", left)
                self._forget(set(r.tps))
            offsets = {p.tp: (o, p.epoch) for p in parts if (o := p.to_commit()) is not None}
            for p in parts:
                self._drop_part(p.tp)
            if not r.reply.done():
                r.reply.set_result(offsets)
            self.metrics.rebalances.labels("revoke").inc()
            self.metrics.assigned.set(len(self.parts))
            log.info("event=revoked partitions=%s commit=%s", _fmt(r.tps), _fmt_offsets(offsets))
        self.revokes = keep

    def _drop_part(self, tp: TP) -> None:
        """The partition is no longer ours: forget it, and its lag series (another member
        reports it now; a stale value here would count it twice)."""
        del self.parts[tp]
        self.paused.discard(tp)
        self.lag.pop(tp, None)
        try:
            self.metrics.lag.remove(tp[0], str(tp[1]))
        except KeyError:
            pass

    def _on_lost_parts(self, tps: list[TP]) -> None:
        """Lost (the group moved on without us): nothing can be committed; work not started is
        dropped, running handlers finish (their done marks still count, fenced by token)."""
        for p in self._forget(set(tps)):
            self._drop_part(p.tp)
        self._set_membership(LOST, f"lost {len(tps)} partitions")
        self.metrics.rebalances.labels("lost").inc()
        self.metrics.assigned.set(len(self.parts))
        log.warning("event=lost partitions=%s", _fmt(tps))

    # ---------------------------------------------------------------- fetched records

    def _end_fetch(self, seq: int, budget: int) -> int:
        """A fetch ended, done or failed: its reservation is released, less what its parts
        brought (released as they came); returns that."""
        taken = self._parts_taken.pop(seq, 0)
        self.fetching -= 1
        self._reserved -= budget - taken
        return taken

    def _on_fetched(self, seq: int, raw: list[Any], budget: int) -> None:
        taken = self._end_fetch(seq, budget)
        self._full = budget > 1 and taken + len(raw) >= budget
        self._take(raw, seq)

    def _on_fetch_failed(self, seq: int, fut: "asyncio.Future[None]", budget: int) -> None:
        """A fetch raised (its parts before that were taken): retried by the next tick."""
        self._end_fetch(seq, budget)
        self._full = False
        log.warning("event=fetch-failed error=%r", fut.exception())

    def _on_fetched_part(self, seq: int, raw: list[Any]) -> None:
        """Records of a fetch still going on (see _fetch): its reservation shrinks by what they are."""
        self._parts_taken[seq] = self._parts_taken.get(seq, 0) + len(raw)
        self._reserved -= len(raw)
        self._take(raw, seq)

    def _take(self, raw: list[Any], seq: int) -> None:
        if not raw or self.state != "running":
            return                                   # draining: not accepted, fetched again later
        msgs = self._wrap(raw, seq)
        if not msgs:
            return
        self.metrics.consumed.inc(len(msgs))
        if self.session is None:
            for m in msgs:
                m.claimed = True
            self._admit(msgs)
            return
        self.session.claim_all([m.idempotency_key for m in msgs], msgs)

    def _wrap(self, raw: list[Any], seq: int) -> list[Message]:
        out = []
        decode, parts, key_of = self.decode, self.parts, self._key_of
        max_bytes, store = self.s.routing.max_message_bytes, self.store
        topic: str | None = None
        pn = -1
        part: Partition | None = None
        waits_id = False
        for m in raw:
            err = m.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    if err.fatal() or err.code() == KafkaError._FATAL:
                        self._fail(f"kafka: {err.str()}")
                    else:
                        log.warning("event=fetch-error error=%s", err)
                continue
            t, p = m.topic(), m.partition()
            if p != pn or t != topic:                    # a fetch's records come by partition
                topic, pn = t, p
                part = parts.get((t, p))
                waits_id = part is not None and TOPIC_ID in part.reasons
            if part is None or part.revoking:
                continue
            tp = part.tp
            off = m.offset()
            if waits_id:
                # Its position keys need the topic's id, still being looked up: fetched again later.
                if part.admissible(off, seq):
                    part.rewind(off)
                    self._rewalk = True
                continue
            headers = m.headers()
            attempts = 0
            if part.retry and headers:
                due, attempts = _retry_header(headers)
                if due and due > time.time() * 1000 and part.admissible(off, seq):
                    self._defer(part, off, due)
                    continue
            if not part.accept(off, seq):
                continue
            value = m.value()
            # The payload is decoded when first read (by the handler, or below when keyField needs it).
            if value is not None and len(value) > max_bytes:
                msg = Message(tp[0], tp[1], off, m.key(), value, headers, m.timestamp()[1], None,
                              PoisonError(f"value of {len(value)} bytes exceeds maxMessageBytes {max_bytes}"),
                              "", None, part, store)
            else:
                msg = Message(tp[0], tp[1], off, m.key(), value, headers, m.timestamp()[1], UNREAD, None, "",
                              decode, part, store)
            if attempts:
                msg.attempts = attempts
            msg.idempotency_key = key_of(msg, part.topic_id)
            out.append(msg)
        return out

    def _defer(self, part: Partition, offset: int, due_ms: float) -> None:
        """A retry record not yet due: its partition pauses until then, rewound to it
        (Spring Kafka's retry topics pause likewise; nothing sleeps, nothing busy-polls)."""
        delay = max(0.0, due_ms / 1000 - time.time())
        part.defer(offset, time.monotonic() + delay)
        self._rewalk = True
        log.debug("event=retry-deferred topic=%s partition=%d offset=%d due_in_s=%.2f", part.tp[0], part.tp[1],
                  offset, delay)

    # ---------------------------------------------------------------- claims

    def _on_store(self, out: StoreOutcome) -> None:
        if out.error is not None:
            self.metrics.store_errors.inc()
            return
        self._collecting_released(lambda: self._apply_store(out))

    def _collecting_released(self, apply: Callable[[], list[Message] | None]) -> None:
        """Apply one answer (store or results) with the records it releases behind their keys
        collected (`_releasing`, see `_release_behind`), then admit them in one hand-off, ahead
        of the fresh records `apply` returns: they were fetched before any fresh record of
        their key."""
        self._releasing = released = []
        fresh: list[Message] | None = None
        try:
            fresh = apply()
        finally:
            self._releasing = None
            if released or fresh:
                self._admit_released(released, fresh)

    def _apply_store(self, out: StoreOutcome) -> list[Message]:
        """Apply one store answer; returns the freshly claimed records, for `_on_store` to admit."""
        fresh: list[Message] = []
        skipped = 0
        parts, parked, rechecking = self.parts, self.parked, self.rechecking
        last: Partition | None = None
        current = False
        for m, code in out.claims:
            part = m._part
            if part is not last:                         # a fetch's records come by partition
                last, current = part, parts.get(part.tp) is part
            if parked or rechecking:
                rechecked = id(m) in parked
                rechecking.discard(id(m))
            else:
                rechecked = False
            if not current:                              # its partition left us meanwhile
                if code is Claim.CLAIMED:
                    self.session.release(m.idempotency_key, m.token)     # type: ignore[union-attr]
                if rechecked:
                    del self.parked[id(m)]
                    self._release_behind(m)
                continue
            if code is Claim.DONE:
                skipped += 1
                if rechecked:
                    del self.parked[id(m)]
                    self._release_behind(m)
                self._finish(m)
            elif rechecked:
                if code is Claim.CLAIMED:
                    del self.parked[id(m)]
                    m.claimed = True
                    self._run([m])                       # the head of its key: the gate counts it already
            else:
                m.claimed = code is Claim.CLAIMED
                fresh.append(m)
        if skipped:
            self.metrics.skipped.inc(skipped)
        if out.written:
            self._finish_written(out.written)
        if out.lost:
            self.metrics.claims_lost.inc(len(out.lost))
            log.warning("event=claims-lost keys=%d detail=\"our heartbeat ran out while handlers ran; their done marks "
                        "no longer apply\"", len(out.lost))
        return fresh

    def _finish_written(self, written: list[Message]) -> None:
        """Records whose done mark (or routing marker) is written finish, a partition's run
        of them at once (`Partition.finish_many`)."""
        parts = self.parts
        for part, run in groupby(written, _part_of):
            if parts.get(part.tp) is not part:          # it left us meanwhile: nothing to finish
                continue
            recs = list(run)
            part.marking -= sum(1 for m in recs if m.token)  # done marks (else routed records' markers)
            part.finish_many([m.offset for m in recs])

    def _admit(self, msgs: list[Message]) -> None:
        run, park = self.gate.admit(msgs)
        for m in park:
            self.parked[id(m)] = m
        if run:
            self._run(run)

    def _run(self, msgs: list[Message]) -> None:
        assert self.dispatcher is not None
        if any(m._derr is not None for m in msgs):
            # Known to be undecodable (keyField decoded it) or oversized: never handed to the
            # handler, routed (as poison) at once.
            for m in msgs:
                if m._derr is not None:
                    self.metrics.errors.labels(type(m._derr).__name__).inc()
                    self._route(m, m._derr)
            msgs = [m for m in msgs if m._derr is None]
        n = self.in_work
        if n > self._win[3]:
            self._win[3] = n
        self.dispatcher.submit(msgs)

    def _recheck_parked(self) -> None:
        if self.session is None:
            return
        now = time.monotonic()
        if now - self._parked_logged > 10:
            self._parked_logged = now
            sample = next(iter(self.parked.values()))
            log.info("event=parked count=%d sample_key=%s sample=%s rechecking=%d", len(self.parked),
                     sample.idempotency_key, sample, len(self.rechecking))
        for i, m in self.parked.items():
            if i not in self.rechecking:
                self.rechecking.add(i)
                self.session.claim(m.idempotency_key, m)

    # ---------------------------------------------------------------- results

    def on_results(self, results: list[Result]) -> None:
        """Workers' results (called on the loop's thread): queued for the loop, woken at once.
        (Waking it at most every 2 ms, so that many threads' results shared a tick, saved 30 %
        of the CPU of a 30 ms handler on 64 threads, but let the adaptive limit of a 5 ms async
        handler overshoot in bench/concurrency.py's slowdown phase: not done.)"""
        self._post(("results", results))

    def _on_results(self, results: list[Result]) -> None:
        self._collecting_released(lambda: self._apply_results(results))

    def _apply_results(self, results: list[Result]) -> None:
        assert self.dispatcher is not None
        self.dispatcher.reported(len(results))
        win, m_ = self._win, self.metrics
        latencies: list[float] = []
        e2es: list[float] = []
        held: list[Message] = []
        again: list[Message] = []                     # fenced transactions to run again, together
        qwait = 0.0
        errors = 0
        rules = self.s.routing
        # A record that returned (the common case, inlined): the records behind its key are
        # released, and its offset passes once its done mark is written (the marks of the
        # whole batch go to the session in one call).
        ok, settle, released, session = Outcome.OK, self.gate.settle, self._releasing, self.session
        assert released is not None                   # (run by _collecting_released)
        marks: list[tuple[str, str, Message]] = []
        for msg, outcome, err, dt, e2e, wait in results:
            if outcome is ok and msg._derr is None:
                qwait += wait
                latencies.append(dt)
                e2es.append(e2e)
                if msg.key is not None and (nxt := settle(msg)):
                    released.extend(nxt)              # _release_behind, inlined
                if session is not None and msg.token:
                    msg._part.marking += 1
                    marks.append((msg.idempotency_key, msg.token, msg))
                else:
                    self._finish(msg)
                continue
            if outcome is Outcome.HELD:
                held.append(msg)
                continue
            qwait += wait
            latencies.append(dt)
            if outcome is Outcome.OK:
                # the handler read an undecodable payload and caught the DecodeError: still poison
                outcome, err = Outcome.FAILED, msg._derr
            assert err is not None
            if isinstance(err, ClaimLost) or (msg._fenced and type(err).__name__ == "WatchError"):
                if self._fenced(msg):
                    again.append(msg)
                continue
            if err is not msg._derr:
                self.counts["failed"] += 1
            if err is not msg._derr and classify(err, rules) is Classification.TRANSIENT:
                errors += 1
            m_.errors.labels(type(err).__name__).inc()
            if type(err).__name__ == "HandlerTimeout":
                m_.handler_timeouts.inc()
            self._route(msg, err)
        if marks:
            assert session is not None
            session.done_all(marks)
        self.counts["handled"] += len(e2es)
        if held:
            self.gate.hand_back(held)
        if again:
            self._run(again)                          # a batch handler's batch stays one batch
        win[0] += len(latencies)
        win[1] += errors
        win[2] += sum(latencies)
        win[4] += qwait
        if e2es:
            fastest = min(latencies)
            if fastest < win[5]:
                win[5] = fastest
            m_.handled.inc(len(e2es))
            m_.handler_latency.observe_many(latencies)
            m_.e2e_latency.observe_many(e2es)

    def _fenced(self, msg: Message) -> bool:
        """The handler's fenced transaction (mark_done_in) did not apply: nothing happened.
        If we still hold the claim (something else touched a WATCHed key), run it again
        (True); if another worker took the key, wait for it like any held key."""
        msg._fenced = False
        if self.session is not None and msg.token and self.session.held.get(msg.idempotency_key) == msg.token:
            self.metrics.fenced_retries.inc()
            return True
        self.metrics.claims_lost.inc()
        if self.session is not None and msg.token:
            self.session.release(msg.idempotency_key, msg.token)
        msg.claimed = False
        msg.token = ""
        self.parked[id(msg)] = msg
        return False

    def _release_behind(self, m: Message) -> None:
        """`m` no longer holds its key's place: let the records waiting behind it go. While
        a batch of results is applied (`_releasing`), they are collected and admitted once at
        its end: one hand-off to the workers, not one per released key (at full speed a
        handful of keys per fetched batch repeat, and each made a chunk, a wake-up of a worker
        and a result tick of its own)."""
        nxt = self.gate.settle(m)
        if not nxt:
            return
        if self._releasing is not None:
            self._releasing.extend(nxt)
            return
        self._admit_released(nxt)

    def _admit_released(self, nxt: list[Message], then: list[Message] | None = None) -> None:
        """Admit released records (those of partitions we lost meanwhile are abandoned), and
        `then` (records fetched after them) behind them, in one hand-off."""
        live: list[Message] = []
        parts = self.parts
        for x in nxt:
            if parts.get(x._part.tp) is x._part:
                live.append(x)
            else:
                self._abandon(x, admitted=False)
        if then:
            live.extend(then)
        if live:
            self._admit(live)

    def _finish(self, m: Message) -> None:
        part = m._part
        if self.parts.get(part.tp) is part:
            part.finish(m.offset)

    def _abandon(self, m: Message, admitted: bool) -> None:
        """`m` will not run here: it stays unfinished (fetched again by whoever owns it next)."""
        if m.claimed and self.session is not None and m.token:
            self.session.release(m.idempotency_key, m.token)
            m.token = ""
        part = m._part
        if self.parts.get(part.tp) is part:
            part.drop(m.offset)
        if admitted:
            self._release_behind(m)

    # ---------------------------------------------------------------- routing

    def _route(self, msg: Message, err: BaseException) -> None:
        """Hand a failure to the router; the message stays unfinished until it says so."""
        assert self.loop is not None
        self.routes += 1
        self.loop.create_task(self._route_task(msg, err))

    async def _route_task(self, msg: Message, err: BaseException) -> None:
        try:
            verdict = await self.router.route(msg, err, self)
        except Exception as e:  # noqa: BLE001 - a router bug must not lose the message
            log.exception("event=route-error error=%r", e)
            verdict = "abandoned"
        self._post(("verdict", msg, verdict))

    def _on_verdict(self, msg: Message, verdict: str) -> None:
        self.routes -= 1
        if verdict == "resubmit":
            if self.alive(msg):
                msg.attempts += 1
                self._run([msg])                          # still the head of its key
                return
            verdict = "abandoned"
        if verdict == "abandoned":
            self._abandon(msg, admitted=True)
            return
        # On another topic now, produce acknowledged. Its claim is released, not marked
        # done: the retry (or a replay) must be able to claim it.
        if msg.claimed and self.session is not None and msg.token:
            self.session.release(msg.idempotency_key, msg.token)
        msg.token = ""                                    # not ours any more (its routing marker may be)
        self._release_behind(msg)
        if verdict == "routed":
            self._finish(msg)
        # "marked": finishes when its routing marker is written (session -> written)

    # RouteContext
    @property
    def markers(self) -> Session | None:
        return self.session

    def alive(self, msg: Message) -> bool:
        part = msg._part
        return self.parts.get(part.tp) is part and self.state in ("running", "draining") and not self._hard_stop

    def health_record(self) -> dict[str, Any]:
        """What the member's Redis record says of its health (read by the signal publisher on
        this loop): the monotonic counters and the lag of the partitions it measured."""
        return {"counts": dict(self.counts),
                "lag": {"records": sum(self.lag.values()), "partitions": len(self.lag)}}

    def routed_to(self, kind: str) -> None:
        """The router sent a record to `.retry`, `.dlq` or `.poison` (counted by the loop)."""
        self._post(("routed-to", kind))

    def blocked(self, msg: Message, on: bool) -> None:
        self._post(("blocked", msg, on))

    def _on_blocked(self, msg: Message, on: bool) -> None:
        part = msg._part
        part.route_blocked += 1 if on else -1
        self._rewalk = True
        log.log(logging.WARNING if on else logging.INFO, "event=partition-%s topic=%s partition=%d reason=route-failing",
                "blocked" if on else "unblocked", part.tp[0], part.tp[1])

    def position(self, msg: Message) -> str:
        return position_key(msg.topic, msg.partition, msg.offset, msg._part.topic_id)

    # ---------------------------------------------------------------- commits

    def _commit(self, why: str) -> None:
        if self.commit_inflight or self.consumer is None:
            return
        offsets = {tp: (o, p.epoch) for tp, p in self.parts.items() if not p.revoking and (o := p.to_commit()) is not None}
        if not offsets:
            return
        self.commit_inflight = True
        self._commit_started = time.perf_counter()
        self._kop(self._commit_async, offsets, then="commit-sent")

    def _on_commit_sent(self, fut: "asyncio.Future[bool]") -> None:
        exc = fut.exception()
        if exc is not None:
            self.commit_inflight = False
            self.metrics.commit_errors.inc()
            log.warning("event=commit-failed why=interval error=%s", exc)
        elif not fut.result():
            self.commit_inflight = False

    def _on_committed(self, err: KafkaError | None, parts: list[tuple[str, int, int, Any]]) -> None:
        self.commit_inflight = False
        if err is not None and err.code() != KafkaError._NO_OFFSET:
            self.metrics.commit_errors.inc()
            log.warning("event=commit-failed why=interval error=%s", err)
            return
        self.metrics.commit_latency.observe(time.perf_counter() - self._commit_started)
        for t, p, o, perr in parts:
            part = self.parts.get((t, p))
            if part is not None and perr is None and o >= 0 and (part.committed is None or o > part.committed):
                part.committed = o

    # ---------------------------------------------------------------- periodic

    def _decide(self) -> None:
        completed, errors, lat, peak, qwait, fastest = self._win
        assert self.dispatcher is not None
        outstanding = self.in_work
        self._win = [0, 0, 0.0, outstanding, 0.0, math.inf]
        self._step_at = [0, 0, 0.0, 0.0]
        busy_at_start, self._busy_at_start = self._busy_at_start, self.dispatcher.busy
        d = self.ctl.decide(WindowStats(completed, errors, lat, max(peak, outstanding), qwait, self.conc.limit))
        c = self.conc.decide(ConcurrencyWindow(completed, fastest, busy_at_start, d.reason == "overload-errors"))
        self.dispatcher.set_limit(c.limit)
        self.dispatcher.tune(lat / completed if completed else 0.0, completed)
        m = self.metrics
        m.concurrency_limit.set(c.limit)
        m.concurrency_running.set(self._busy_at_start)
        m.noload_latency.set(c.baseline_ms / 1000)
        if c.reason.startswith("cut"):
            log.info("event=concurrency-limit reason=%s limit=%d ratio=%.2f noload_ms=%.2f fastest_ms=%.2f "
                     "mean_latency_ms=%.2f", c.reason, c.limit, c.ratio, c.baseline_ms, 1000 * fastest,
                     1000 * lat / completed if completed else 0.0)
        m.controller_decisions.labels(d.reason).inc()
        m.inflight_limit.set(d.inflight_limit)
        m.batch_size.set(d.batch_size)
        m.inflight.set(self.outstanding)
        m.paused.set(len(self.paused))
        m.parked.set(len(self.parked))
        m.abandoned_threads.set(self.dispatcher.abandoned_alive())
        if d.inflight_limit != self._last_limit and d.reason.startswith("overload"):
            log.info("event=fetch-limit reason=%s limit=%d batch=%d mean_latency_ms=%.1f error_rate=%.2f",
                     d.reason, d.inflight_limit, d.batch_size,
                     1000 * lat / completed if completed else 0.0, errors / completed if completed else 0.0)
        self._last_limit = d.inflight_limit
        if self.bp is not None:
            self.bp.observe(LevelInputs(completed, lat * 1000 / completed if completed else 0.0,
                                        errors / completed if completed else 0.0, self.ctl.overloaded,
                                        self.ctl.at_floor, len(self.paused), len(self.parts), outstanding))

    def _early_step(self) -> None:
        """The fetch limit's slow start, per round trip of the limit (FetchController.early):
        judged on what completed since the last step, within the current window."""
        win, at = self._win, self._step_at
        completed, errors, lat, qwait = win[0] - at[0], win[1] - at[1], win[2] - at[2], win[4] - at[3]
        self._step_at = [win[0], win[1], win[2], win[4]]
        d = self.ctl.early(WindowStats(completed, errors, lat, max(win[3], self.in_work), qwait, self.conc.limit))
        if d is not None:
            self.metrics.controller_decisions.labels(d.reason).inc()
            self.metrics.inflight_limit.set(d.inflight_limit)
            self.metrics.batch_size.set(d.batch_size)
            self._last_limit = d.inflight_limit

    def _on_lag(self, fut: "asyncio.Future[list[tuple[TP, int]]]") -> None:
        if fut.exception() is not None:
            return
        for tp, high in fut.result():
            part = self.parts.get(tp)
            if part is not None and part.committed is not None and high >= 0:
                self.lag[tp] = max(0, high - part.committed)
                self.metrics.lag.labels(tp[0], str(tp[1])).set(self.lag[tp])

    @property
    def outstanding(self) -> int:
        """Accepted and not finished: what a drain waits for."""
        return sum(p.inflight for p in self.parts.values())

    @property
    def in_work(self) -> int:
        """What the in-flight limit bounds: accepted and not yet handled. A handled record
        waiting for its done mark no longer loads the downstream (its offset still waits)."""
        return sum(p.inflight - p.marking for p in self.parts.values())

    def _pauses(self, now: float) -> None:
        """Recompute every partition's pause reasons and send the difference (and seeks).

        The flow decision is made every tick; the walk over the partitions only when it
        flips, when something asked for it (`_rewalk`: an assignment, a revoke, a deferral or
        rewind, a blocked route), or every PAUSE_WALK_S for the reasons that change with time
        and the offset window (a due retry, window-full). At a low rate, a tick per event made
        the walk the loop's largest own cost."""
        ctl = self.ctl
        store_down = self.session is not None and self.session.down
        outstanding = self.in_work
        budget = 0 if store_down else ctl.fetch_budget(outstanding)
        if budget > 0:
            self._saturated_since = None
        elif self._saturated_since is None:
            self._saturated_since = now
        flow = store_down or self.state != "running" or should_pause(
            paused=self._flow_on, outstanding=outstanding, limit=ctl.limit,
            overloaded=ctl.overloaded, store_down=store_down,
            saturated_for_s=0.0 if self._saturated_since is None else now - self._saturated_since)
        self._flow_state("stopping" if self.state != "running" else "store-down" if store_down
                         else "overloaded" if ctl.overloaded else "saturated" if flow else "open")
        if flow == self._flow_on and not self._rewalk and now < self._walk_at:
            return
        self._flow_on, self._rewalk, self._walk_at = flow, False, now + PAUSE_WALK_S
        window_max = self.s.offsets.max_window
        want: set[TP] = set()
        seeks: list[tuple[TP, int]] = []
        nxt = self.fetch_seq + 1
        for tp, p in self.parts.items():
            p.refresh(now, window_max)
            if flow:
                p.reasons.add(FLOW)
            else:
                p.reasons.discard(FLOW)
            if p.reasons or p.revoking:
                want.add(tp)
            s = p.take_seek(nxt)
            if s is not None:
                seeks.append((tp, s))
        # A partition assigned since the last tick: librdkafka may still hold a pause of its
        # previous assignment, so its state is sent explicitly either way.
        fresh, self.fresh = self.fresh & set(self.parts), set()
        pause = sorted((want - self.paused) | (want & fresh))
        resume = sorted((self.paused - want) | (fresh - want))
        if pause or resume or seeks:
            self.paused = want
            epochs = {tp: self.parts[tp].epoch for tp in (*pause, *resume, *(tp for tp, _ in seeks)) if tp in self.parts}
            self._kop(self._set_paused, pause, resume, seeks, epochs, then="pause-op")

    def _maybe_fetch(self) -> None:
        """Send a fetch to the Kafka thread if the in-flight limit has room. While the last
        fetch came back full (a backlog), a second one is sent behind the one on its way, so
        the Kafka thread fetches the next batch while the loop claims and dispatches this
        one; with one at a time, a fetch waited for the loop's turn and the loop for the
        fetch (at full speed the fetch was on its way 90 % of the time, the loop busy 75 %)."""
        if self.fetching >= MAX_FETCHES or self.consumer is None or self.state in ("closing", "closed"):
            return
        if self.fetching and not self._full:
            return
        store_down = self.session is not None and self.session.down
        d = self.dispatcher
        starved = d is None or (d.running < d.allowed and not (self.session is not None and self.session.tasks))
        budget = 0 if (store_down or self.state != "running") else self.ctl.fetch_budget(
            self.in_work + self._reserved, starved)
        if budget <= 0 and (self.fetching or (self.parts and len(self.paused) < len(self.parts))):
            return                      # momentary saturation: wait for results, do not fetch more
        self._send_fetch(budget, 0.05 if budget > 0 else 0.1)

    def _send_fetch(self, budget: int, timeout: float) -> None:
        self.fetching += 1
        self._reserved += budget
        self.fetch_seq += 1
        seq = self.fetch_seq
        fut = self._kop(self._fetch, budget, timeout, seq)
        fut.add_done_callback(lambda f: None if f.cancelled() or f.exception() is None
                              else self._post(("fetch-failed", seq, f, budget)))

    def _watchdog(self) -> None:
        assert self.dispatcher is not None
        stuck = self.dispatcher.watchdog()
        for stuck_msg, rest in stuck.taken:
            same = [m for m in rest if m.key is not None and m.key == stuck_msg.key]
            others = [m for m in rest if not (m.key is not None and m.key == stuck_msg.key)]
            if same:
                self.gate.hand_back(same)
            if others:
                self.dispatcher.submit(others)
        if stuck.timed_out:
            for m, _, err, ran, _, _ in stuck.timed_out:
                log.error("event=handler-timeout topic=%s partition=%d offset=%d ran_s=%.1f action=route-and-replace-worker",
                          m.topic, m.partition, m.offset, ran)
            self._on_results(stuck.timed_out)
        n = self.dispatcher.abandoned_alive()
        if n > self.s.handler.max_abandoned_threads:
            self._fail(f"{n} handler threads abandoned after timeouts (handler.maxAbandonedThreads="
                       f"{self.s.handler.max_abandoned_threads}): restart to reclaim them")

    def _flow_state(self, state: str) -> None:
        if state != self.flow_state:
            log.info("event=flow-state from=%s to=%s inflight=%d limit=%d", self.flow_state, state,
                     self.outstanding, self.ctl.limit)
            self.flow_state = state

    # ================================================================ lifecycle

    async def start(self) -> None:
        """Connect everything; after this the loop can run. Errors here are configuration errors."""
        self.loop = asyncio.get_running_loop()
        if self._handler is None:
            self._handler, self._close_handler = build_handler(self.s.handler)
        self.store = build_store(self.s, self.owner)
        if self.store is not None:
            self.session = Session(self.store, self.s.idempotency.lease_ms, lambda o: self._post(("store", o)),
                                   self._wakeup, claim_latency=self.metrics.claim_latency.observe)
            await self._check_store()
        self.bp = build_publisher(self.s, self.instance_id or self.owner, self.metrics, health=self.health_record)
        h = self.s.handler
        asynchronous = is_async(self._handler)
        kind = TaskDispatcher if asynchronous else ThreadDispatcher
        workers = self.s.flow.resolved_workers(asynchronous)
        self.conc = ConcurrencyLimit(self.s.flow, workers)
        self.dispatcher = kind(self._handler, workers, self.loop, self.on_results, h.timeout_s,
                               h.steal_after_ms / 1000, h.max_abandoned_threads, h.max_batch)
        self.dispatcher.set_limit(self.conc.limit)
        conf = kafka_config(self.s, self.instance_id)
        conf["error_cb"] = self._on_error
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
        # The topic ids, looked up now rather than on the first assignment: a partition assigned
        # before its topic's id is known is paused until it is, and that pause and resume cost a
        # restarted member ~1 s of consumption in a rolling update (bench/rollout.py). Ids not
        # found now (a topic created later) are still looked up on assignment.
        ids = self.loop.run_in_executor(None, self._describe_topics,
                                        sorted({*self.s.kafka.topics, *self.retry_topics}), False)
        self.consumer = await self.loop.run_in_executor(self._kafka, make)
        try:
            self.topic_ids.update({t: i for t, i in (await ids).items() if i is not None})
        except Exception as e:  # noqa: BLE001 - the lookup on assignment covers it
            log.warning("event=topic-id-prefetch-failed error=\"%s\"", str(e).replace('"', "'"))
        # Every record allocates a few objects that live for milliseconds; the default gen-0
        # threshold (700) then runs the collector hundreds of times a second. Collect less
        # often, and keep the long-lived start-up objects out of every collection.
        gc.freeze()
        gc.set_threshold(50_000, 20, 20)
        self.state = "running"
        log.info("event=started group=%s instance=%s topics=%s workers=%d concurrency=%s handler=%s store=%s "
                 "timeout_s=%g loop=%s", self.s.kafka.group_id, self.instance_id, ",".join(self.s.kafka.topics),
                 self.dispatcher.n, self.s.flow.concurrency,
                 self.s.handler.handler or self.s.handler.http_sink_url or getattr(self._handler, "__name__", "?"),
                 type(self.store).__name__ if self.store else "none", h.timeout_s,
                 loop_name(self.loop))

    async def _check_store(self) -> None:
        """Warn when the store may lose done marks on its own (an evicting maxmemory-policy)."""
        assert self.store is not None
        try:
            info = await self.store.check()
        except StoreUnavailable as e:
            log.warning("event=idempotency-store-check-failed error=\"%s\"", str(e).replace('"', "'"))
            return
        policy = str(info.get("maxmemory_policy", ""))
        self.evicting = policy in EVICTING_POLICIES
        self.metrics.store_evicting.set(1 if self.evicting else 0)
        if self.evicting:
            log.warning("event=idempotency-store-evicts maxmemory_policy=%s detail=\"Redis may evict done marks "
                        "under memory pressure, and an evicted mark lets a message run twice: use noeviction "
                        "(see README, Durability)\"", policy)

    @property
    def stopping(self) -> bool:
        return self.state not in ("new", "running")

    def request_stop(self, hard: bool = False) -> None:
        if hard:
            self._hard_stop = True
        if self.state in ("new", "running"):
            self.state = "draining"
            self._drain_deadline = time.monotonic() + self.s.shutdown.drain_timeout_s
        if self.loop is not None:
            self._wakeup()

    def _fail(self, reason: str) -> None:
        """Fatal: this process cannot go on consuming correctly (fenced, threads lost)."""
        if self.fatal is None:
            self.fatal = reason
            self.exit_code = EXIT_FATAL
            log.error("event=fatal reason=\"%s\" action=exit code=%d", reason.replace('"', "'"), EXIT_FATAL)
            self._hard_stop = True
            self.request_stop(hard=True)

    def _begin_drain(self) -> None:
        """Stop fetching; the work already accepted may finish within the drain bound."""
        assert self.dispatcher is not None
        log.info("event=draining inflight=%d running=%d routing=%d parked=%d bound_s=%.1f", self.outstanding,
                 self.dispatcher.running, self.routes, len(self.parked), self.s.shutdown.drain_timeout_s)

    def _drained(self, now: float) -> bool:
        """All accepted work finished (done marks written), or the bound is reached: then
        whatever has not started is given back, unfinished, for the next owner."""
        store_down = self.session is not None and self.session.down
        left = self.outstanding if not store_down else self.dispatcher.running + self.routes  # type: ignore[union-attr]
        if left > 0 and now < self._drain_deadline:
            return False
        if left > 0:
            log.warning("event=drain-timeout unfinished=%d", left)
        self._forget(set(self.parts))
        return True

    async def run(self) -> None:
        if self.consumer is None:
            await self.start()
        assert self.consumer is not None and self.dispatcher is not None
        interval = self.s.offsets.commit_interval_ms / 1000
        window = self.s.flow.window_ms / 1000
        lease_tick = self.s.idempotency.lease_ms / 4000
        now = time.monotonic()
        next_commit, next_decide, next_lag, next_parked = now + interval, now + window, now + 1, now + 0.2
        next_caught_up, caught_up = now, self.s.offsets.caught_up_commit_ms / 1000
        next_watch = now
        drain_started = False
        loop = asyncio.get_running_loop()
        close_fut: asyncio.Future[Any] | None = None
        commit_fut: asyncio.Future[Any] | None = None
        try:
            while True:
                now = time.monotonic()
                self.last_beat = now
                self._drain_inbox()
                if self._hard_stop:
                    break
                if self.state == "draining" and not drain_started:
                    drain_started = True
                    self._begin_drain()
                if now >= next_watch:
                    # Every WATCHDOG_S, not every tick: a tick per handler result (64 threads of
                    # a 30 ms handler) made this walk over every worker 14 % of the loop's time.
                    self._watchdog()
                    next_watch = now + WATCHDOG_S
                if self.parked and now >= next_parked:
                    self._recheck_parked()
                    next_parked = now + 0.2
                self._finish_revokes(now)
                self._pauses(now)
                self._maybe_fetch()
                if now >= next_decide:
                    self._decide()
                    next_decide = now + window
                elif self.ctl.slow_start and self._win[0] - self._step_at[0] >= self.ctl.limit:
                    self._early_step()
                if now >= next_commit and self.state == "running":
                    self._commit("interval")
                    next_commit = now + interval
                elif caught_up and now >= next_caught_up and self.state == "running" and self.parts \
                        and not self.outstanding:
                    # Caught up (nothing in flight): commit now, not at the interval, so the
                    # committed lag the autoscaler and dashboards read is not a second stale.
                    self._commit("caught-up")
                    next_caught_up = now + caught_up
                if now >= next_lag and self.parts:
                    self._kop(self._watermarks, list(self.parts), then="lag")
                    next_lag = now + 5
                if self.session is not None:
                    self.session.flush()
                if self.state == "draining" and self._drained(now):
                    self.state = "committing"
                    offsets = {tp: (o, p.epoch) for tp, p in self.parts.items() if (o := p.to_commit()) is not None}
                    commit_fut = self._kop(self._commit_now, offsets, "shutdown")
                if self.state == "committing" and commit_fut is not None and commit_fut.done():
                    self.state = "closing"
                    close_fut = self._kop(self.consumer.close)
                if self.state == "closing" and close_fut is not None and close_fut.done():
                    if close_fut.exception() is not None:
                        log.warning("event=close-failed error=%s", close_fut.exception())
                    self.state = "closed"
                    break
                if self.inbox:
                    continue
                # Sleep until an event or the next timer: a bare future and a timer handle,
                # not wait_for (a task and a timeout per tick cost more than the tick).
                self._waiter = w = loop.create_future()
                nap = min(0.05, lease_tick)
                if self.session is not None and self.session.pending:
                    nap = min(nap, MARK_LINGER_S)        # lingering done marks go out on time
                timer = loop.call_later(nap, _resolve, w)
                await w
                timer.cancel()
                self._waiter = None
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        """After the loop: close what is left (a hard stop skips the drain and the commit)."""
        if self._hard_stop:
            log.warning("event=hard-stop detail=\"no drain, no commit\"")
        left = self.outstanding
        for r in self.revokes:                      # never leave the Kafka thread waiting
            if not r.reply.done():
                r.reply.set_result({})
        assert self.dispatcher is not None
        if not self._hard_stop:
            await self.dispatcher.close(1.0)
        self._kafka.shutdown(wait=False)
        if self._close_handler is not None and not self._hard_stop:
            await self._close_handler()
        if not self._hard_stop:
            await self.router.close()
        if self.bp is not None:
            await self.bp.close()
        if self.session is not None:
            await self.session.close()
        if self.store is not None:
            await self.store.close()
        log.info("event=stopped unfinished=%d exit_code=%d", left, self.exit_code)
        self.stopped.set()

    def install_signals(self) -> None:
        """SIGTERM/SIGINT: drain and stop; a second one: exit at once."""
        assert self.loop is not None

        def handler(signum: int) -> None:
            if self.stopping:
                log.warning("event=second-signal signal=%s action=exit-now", signal.Signals(signum).name)
                os._exit(128 + signum)
            log.info("event=signal signal=%s action=drain", signal.Signals(signum).name)
            self.request_stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, handler, sig)

    # ================================================================ health

    def health(self) -> tuple[bool, str]:
        if self.fatal is not None:
            return False, f"fatal: {self.fatal}"
        stall = time.monotonic() - self.last_beat
        if stall > self.s.server.liveness_timeout_s:
            return False, f"loop stalled {stall:.0f}s"
        return True, "ok"

    def readiness(self) -> tuple[bool, str]:
        """Ready = a member of the group holding its assignment (and able to work on it): a
        rolling update waits for this before it restarts the next member."""
        if self.fatal is not None:
            return False, f"fatal: {self.fatal}"
        if self.stopping:
            return False, "stopping"
        if self.membership != HOLDING:
            return False, {JOINING: "joining the group: no assignment yet",
                           REVOKING: "rebalancing: a revoke is being handled",
                           LOST: "partitions lost: rejoining the group"}[self.membership]
        if self.session is not None and self.session.down_since is not None:
            return False, f"idempotency store down {time.monotonic() - self.session.down_since:.0f}s"
        if not self.parts:
            return True, "ok (idle: no partitions assigned)"
        return True, f"ok ({len(self.parts)} partitions)"


def _resolve(f: "asyncio.Future[None]") -> None:
    if not f.done():
        f.set_result(None)


def _fmt(tps: Any) -> str:
    return ",".join(f"{t}[{p}]" for t, p in tps) or "-"


def _fmt_offsets(offsets: dict[TP, tuple[int, int]]) -> str:
    return ",".join(f"{t}[{p}]@{o}" for (t, p), (o, _) in sorted(offsets.items())) or "-"


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
    admin = AdminClient(admin_config(s))
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
