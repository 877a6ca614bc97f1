"""The backpressure signal: each consumer says how saturated it is; producers listen.

Member level (pure, `SaturationTracker`)
    Once per controller window the loop hands in what it measured (`LevelInputs`). From it
    comes a *pressure*, a ratio where 1.0 means "at the limit":

        pressure = max(mean handler latency / flow.targetLatencyMs,
                       transient error rate / flow.maxErrorRate,
                       1.0 if the in-flight limit is at its floor and >= pausedShare of the
                           assigned partitions are paused, else 0)

    The member level is 0 (ok) or 1 (saturated), with hysteresis in size and in time:
    it engages at once when the fetch controller calls the window overloaded (the very
    verdict `fetch_control.should_pause` pauses partitions on, so the local pause always
    comes first or together, never after) or when pressure >= 1; it clears only after
    pressure has stayed <= `clearRatio` (0.7) *and* the loop has resumed its partitions
    (paused share below `pausedShare`) for `clearAfterMs` (1 s) with no overloaded window.
    The second condition matters: right after a cut the handler is fast again only because
    the loop holds back a backlog; clearing then would invite producers to refill it. A window with no completion while work is in flight says nothing and keeps the
    level (the handler may be stuck); a window with nothing in flight at all is idle and
    counts as pressure 0 (nothing waits, so there is no reason to hold producers back).

Group level (pure, `group_level`)
    The fraction of *live* members whose level is 1, in [0, 1]; no live member -> 0.
    Why the fraction and not the max: producers spread keys over every partition, so the
    share of saturated members is roughly the share of the topic's throughput that is
    stuck; producers cut their rate in proportion to it (`producer.AimdRate`). With the max,
    one hot member would throttle every producer at full strength while the rest of the
    group idles; with a mean of raw pressures a single drowning member would be averaged
    away. Live means the member's key has not expired: a dead consumer stops counting after
    one TTL, so it can never hold producers throttled.

Wire format (Redis)
    - `<prefix>:bp:<group>:<member>`: JSON {"level", "pressure", "member", "ts", "pod"
      (POD_NAME, when set), "counts": {"handled", "failed", "deadLettered"}, "lag": {"records",
      "partitions"}}, SET with PX ttl, re-SET on change and on a heartbeat every ttl/3. `member`
      is the group.instance.id (`<namespace>.<pod>` under the operator); `counts` are the
      process's monotonic health counters (handler runs that returned, that failed, records
      routed to .dlq/.poison) and `lag` the last measured lag of its partitions, both owned by
      the consumer's loop and only read here (`Runtime.health_record`); counters restart at 0 with
      the process. The operator's canary gates use them (afc.operator.canary).
    - `<prefix>:bpm:<group>`: a sorted set indexing the members (score: last publish, ms),
      so a reader never SCANs a keyspace full of idempotency keys. Readers MGET the members'
      keys and drop index entries whose key has expired.
    - channel `<prefix>:bp:<group>`: a message on every level change (and on a clean
      shutdown), so producers re-read at once instead of waiting for their periodic read.
    On a Redis Cluster (a `redis+cluster://` URL, see afc.runtime.redisconn) the group's
    part of each name is a hash tag, so the index, every member key and the channel map
    to one slot and one node (one pipeline, one MGET, no CROSSSLOT):
    `<prefix>:bp:{<group>}:<member>`, `<prefix>:bpm:{<group>}`, channel `<prefix>:bp:{<group>}`,
    and the channel is a sharded one (SPUBLISH / SSUBSCRIBE, Redis >= 7.0): a plain PUBLISH
    is refused in a cluster pipeline and would be broadcast to every node. Readers and
    writers derive the names from the URL's scheme, so they agree as long as they are given
    the same kind of URL.

Failure of the signal path never reaches the loop: a publish runs as a task, errors are
logged once (and once when it comes back) and counted; local flow control goes on.
"""
from __future__ import annotations

import asyncio
import json
import os
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

if TYPE_CHECKING:
    from .config import RuntimeSettings
    from .metrics import RuntimeMetrics

log = logging.getLogger("afc.runtime.backpressure")

OK, SATURATED = 0, 1


# ---------------------------------------------------------------------------- pure: member level

@dataclass(frozen=True)
class LevelInputs:
    """What one controller window measured (see `Runtime._decide`)."""
    completed: int              # handler calls finished in the window
    mean_latency_ms: float      # their mean latency
    error_rate: float           # transient failures / completed
    overloaded: bool            # the fetch controller's verdict (latency or errors over bound)
    at_floor: bool              # the in-flight limit is at flow.minInflight
    paused: int                 # partitions paused by flow control
    assigned: int               # partitions assigned
    outstanding: int            # messages fetched and not finished


@dataclass(frozen=True)
class LevelRule:
    target_latency_ms: float
    max_error_rate: float
    paused_share: float = 0.5
    clear_ratio: float = 0.7
    clear_after_s: float = 1.0


def pressure(inp: LevelInputs, rule: LevelRule) -> float | None:
    """1.0 = at the limit; None = this window says nothing (work in flight, none finished)."""
    floor_paused = (inp.at_floor and inp.assigned > 0 and inp.paused / inp.assigned >= rule.paused_share)
    if inp.completed == 0:
        if inp.outstanding == 0:
            return 0.0                          # idle: nothing waits
        return 1.0 if floor_paused else None
    p = inp.mean_latency_ms / rule.target_latency_ms
    if rule.max_error_rate > 0:
        p = max(p, inp.error_rate / rule.max_error_rate)
    elif inp.error_rate > 0:
        p = max(p, 1.0)
    if floor_paused:
        p = max(p, 1.0)
    return p


class SaturationTracker:
    """The member level with hysteresis. Pure: the caller passes the time."""

    def __init__(self, rule: LevelRule) -> None:
        self.rule = rule
        self.level = OK
        self.pressure = 0.0
        self.calm_since: float | None = None    # saturated, and calm since then

    def update(self, inp: LevelInputs, now: float) -> bool:
        """Feed one window; returns whether the level changed."""
        p = pressure(inp, self.rule)
        if p is not None:
            self.pressure = p
        overloaded = inp.overloaded and inp.completed > 0
        before = self.level
        if overloaded or (p is not None and p >= 1.0):
            self.level, self.calm_since = SATURATED, None
        elif self.level == SATURATED and p is not None:
            if p <= self.rule.clear_ratio and not self._paused(inp):
                if self.calm_since is None:
                    self.calm_since = now
                if now - self.calm_since >= self.rule.clear_after_s:
                    self.level, self.calm_since = OK, None
            else:
                self.calm_since = None          # between clear ratio and 1: hold, restart the clock
        return self.level != before

    def _paused(self, inp: LevelInputs) -> bool:
        """The loop still holds partitions paused: it has more than it can take right now."""
        return inp.assigned > 0 and inp.paused / inp.assigned >= self.rule.paused_share


# ---------------------------------------------------------------------------- pure: group rule

def group_level(levels: Iterable[float]) -> float:
    """Fraction of live members that are saturated (level >= 1); no member -> 0."""
    lv = list(levels)
    if not lv:
        return 0.0
    return sum(1 for x in lv if x >= SATURATED) / len(lv)


@dataclass(frozen=True)
class GroupSignal:
    level: float                # group_level of the live members
    members: int                # live members
    saturated: int              # of which saturated


def parse_members(members: list[str], values: list[bytes | str | None]) -> tuple[GroupSignal, list[str]]:
    """MGET answers -> the group signal and the members whose key is gone (to unindex)."""
    levels: list[float] = []
    gone: list[str] = []
    for m, v in zip(members, values):
        if v is None:
            gone.append(m)
            continue
        try:
            levels.append(float(json.loads(v)["level"]))
        except (ValueError, KeyError, TypeError):
            levels.append(0.0)                  # unreadable: alive, but not evidence of saturation
    sat = sum(1 for x in levels if x >= SATURATED)
    return GroupSignal(group_level(levels), len(levels), sat), gone


class SignalKeys:
    """Redis names of one group's signal; `cluster`: with the group as hash tag (one slot)."""

    def __init__(self, prefix: str, group: str, cluster: bool = False) -> None:
        p = prefix.rstrip(":")
        g = "{" + group + "}" if cluster else group
        self.cluster = cluster
        self.channel = f"{p}:bp:{g}"
        self.index = f"{p}:bpm:{g}"
        self._member = f"{p}:bp:{g}:"
        if cluster:
            from redis.crc import key_slot
            slots = {key_slot(k.encode()) for k in (self.channel, self.index, self._member)}
            if len(slots) != 1:
                raise ValueError(f"the key prefix {prefix!r} puts the signal of group {group!r} in several hash "
                                 "slots of a Redis Cluster (an unbalanced '{' in it?): use a prefix without braces")

    @classmethod
    def for_url(cls, url: str, prefix: str, group: str) -> "SignalKeys":
        """The names for the Redis this URL points at (a cluster: `redis+cluster://`)."""
        from .redisconn import is_cluster_url
        return cls(prefix, group, cluster=is_cluster_url(url))

    def member(self, member: str) -> str:
        return self._member + member

    def publish(self, pipe: Any, message: str) -> None:
        """Queue the change message on a pipeline: sharded on a cluster, plain otherwise."""
        if self.cluster:
            pipe.spublish(self.channel, message)
        else:
            pipe.publish(self.channel, message)


def _decode(m: bytes | str) -> str:
    return m.decode() if isinstance(m, bytes) else m


def read_group_sync(r: Any, keys: SignalKeys) -> GroupSignal:
    """One read with a sync redis client (the producer's watcher thread). Raises redis errors."""
    members = [_decode(m) for m in r.zrange(keys.index, 0, -1)]
    if not members:
        return GroupSignal(0.0, 0, 0)
    sig, gone = parse_members(members, r.mget([keys.member(m) for m in members]))
    if gone:
        r.zrem(keys.index, *gone)
    return sig


async def read_group_async(r: Any, keys: SignalKeys) -> GroupSignal:
    members = [_decode(m) for m in await r.zrange(keys.index, 0, -1)]
    if not members:
        return GroupSignal(0.0, 0, 0)
    sig, gone = parse_members(members, await r.mget([keys.member(m) for m in members]))
    if gone:
        await r.zrem(keys.index, *gone)
    return sig


async def read_records_async(r: Any, keys: SignalKeys) -> dict[str, dict[str, Any]]:
    """Every live member's record (member id -> the JSON it published), for the operator's
    canary gates. Unreadable records are left out; expired ones are not unindexed here."""
    members = [_decode(m) for m in await r.zrange(keys.index, 0, -1)]
    if not members:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for m, v in zip(members, await r.mget([keys.member(m) for m in members])):
        if v is None:
            continue
        try:
            rec = json.loads(v)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out[m] = rec
    return out


# ---------------------------------------------------------------------------- I/O: the publisher

class SignalPublisher:
    """The consumer's side: level from each window, published without blocking the loop.

    `observe()` is called from `Runtime._decide` (sync, on the loop). It updates the level
    and, when the level changed or a heartbeat is due, schedules one publish task (never two
    at once). A failed publish is retried on a later window, no more than once a second.
    """

    def __init__(self, url: str, prefix: str, group: str, member: str, rule: LevelRule, ttl_ms: int,
                 heartbeat_ms: int, metrics: "RuntimeMetrics | None" = None,
                 health: "Callable[[], Mapping[str, Any]] | None" = None, pod: str | None = None) -> None:
        from .redisconn import async_client, redis_errors
        self.keys = SignalKeys.for_url(url, prefix, group)
        self.group, self.member = group, member
        self.key = self.keys.member(member)
        self.tracker = SaturationTracker(rule)
        self.ttl_ms, self.heartbeat_s = ttl_ms, heartbeat_ms / 1000
        self.metrics = metrics
        self.health = health                        # the loop's counters and lag, read at each publish
        self.pod = pod                              # the pod it runs in (POD_NAME), for the operator
        # Two connections (a publish, a close); on a cluster, per node, and few retries: a publish
        # that fails is tried again at a later window anyway.
        self._r = async_client(url, max_connections=2, pool_timeout=1, socket_timeout=1, socket_connect_timeout=1,
                               retries=2)
        self._errors = redis_errors()
        self._task: asyncio.Task[None] | None = None
        self.published_level: int | None = None     # last level Redis has (None: nothing yet)
        self.next_beat = 0.0
        self.retry_at = 0.0
        self.down = False
        self.group_signal: GroupSignal | None = None
        self._next_group_read = 0.0

    @property
    def level(self) -> int:
        return self.tracker.level

    def observe(self, inp: LevelInputs, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        changed = self.tracker.update(inp, now)
        m = self.metrics
        if m is not None:
            m.bp_level.set(self.tracker.level)
            m.bp_pressure.set(round(self.tracker.pressure, 3))
        if changed:
            log.info("event=backpressure-level level=%d pressure=%.2f mean_latency_ms=%.1f error_rate=%.2f "
                     "paused=%d/%d at_floor=%s", self.tracker.level, self.tracker.pressure, inp.mean_latency_ms,
                     inp.error_rate, inp.paused, inp.assigned, inp.at_floor)
        due = self.tracker.level != self.published_level or now >= self.next_beat
        if not due or (self._task is not None and not self._task.done()) or now < self.retry_at:
            return
        self._task = asyncio.get_running_loop().create_task(self._publish(now))

    def payload(self) -> str:
        t = self.tracker
        record: dict[str, Any] = {"level": t.level, "pressure": round(t.pressure, 3), "member": self.member,
                                  "ts": int(time.time() * 1000)}
        if self.pod:
            record["pod"] = self.pod
        if self.health is not None:
            record.update(self.health())
        return json.dumps(record, separators=(",", ":"))

    async def _publish(self, now: float) -> None:
        level = self.tracker.level
        changed = level != self.published_level
        try:
            pipe = self._r.pipeline(transaction=False)
            pipe.set(self.key, self.payload(), px=self.ttl_ms)
            pipe.zadd(self.keys.index, {self.member: int(time.time() * 1000)})
            pipe.pexpire(self.keys.index, max(60_000, 10 * self.ttl_ms))
            if changed:
                self.keys.publish(pipe, json.dumps({"member": self.member, "level": level}))
            await pipe.execute()
            if now >= self._next_group_read:
                self.group_signal = await read_group_async(self._r, self.keys)
                self._next_group_read = now + self.heartbeat_s
                if self.metrics is not None:
                    self.metrics.bp_group_level.set(self.group_signal.level)
                    self.metrics.bp_group_members.set(self.group_signal.members)
        except self._errors as e:
            self.retry_at = time.monotonic() + 1.0
            if self.metrics is not None:
                self.metrics.bp_publish_errors.inc()
                self.metrics.bp_signal_up.set(0)
            if not self.down:
                self.down = True
                log.warning("event=backpressure-signal-down group=%s member=%s error=\"%s\" "
                            "detail=\"local flow control goes on; producers fall back to their floor rate\"",
                            self.group, self.member, e)
            return
        self.published_level = level
        self.next_beat = now + self.heartbeat_s
        if self.metrics is not None:
            self.metrics.bp_signal_up.set(1)
            self.metrics.bp_publishes.inc()
        if self.down:
            self.down = False
            log.info("event=backpressure-signal-back group=%s member=%s level=%d", self.group, self.member, level)

    async def close(self) -> None:
        """Leave the group's signal at once (a clean stop must not hold producers for a TTL)."""
        if self._task is not None and not self._task.done():
            try:
                await asyncio.wait_for(self._task, 2)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - best effort on the way out
                pass
        try:
            pipe = self._r.pipeline(transaction=False)
            pipe.delete(self.key)
            pipe.zrem(self.keys.index, self.member)
            self.keys.publish(pipe, json.dumps({"member": self.member, "level": None}))
            await asyncio.wait_for(pipe.execute(), 2)
        except (asyncio.TimeoutError, *self._errors) as e:
            log.info("event=backpressure-leave-failed member=%s error=\"%s\" detail=\"expires after ttl\"",
                     self.member, e)
        try:
            await self._r.aclose()
        except Exception:  # noqa: BLE001
            pass


def build_publisher(s: "RuntimeSettings", member: str, metrics: "RuntimeMetrics | None",
                    health: "Callable[[], Mapping[str, Any]] | None" = None) -> SignalPublisher | None:
    """The publisher the settings ask for, or None (disabled, or no Redis to publish to)."""
    b = s.backpressure
    if not b.enabled:
        return None
    url = b.redis_url or s.idempotency.redis_url
    if url is None:
        log.info("event=backpressure-signal-off reason=no-redis detail=\"local flow control only\"")
        return None
    rule = LevelRule(target_latency_ms=s.flow.target_latency_ms, max_error_rate=s.flow.max_error_rate,
                     paused_share=b.paused_share, clear_ratio=b.clear_ratio, clear_after_s=b.clear_after_ms / 1000)
    return SignalPublisher(url.get_secret_value(), b.key_prefix or s.idempotency.key_prefix, s.kafka.group_id,
                           member, rule, b.ttl_ms, b.resolved_heartbeat_ms, metrics, health,
                           pod=os.environ.get("POD_NAME") or None)
