"""The lag autoscaler's decision: a pure function of a window of observations.

Nothing here does I/O. The operator's poll daemon measures the group (`Observation`: per
partition committed offset, log-start and log-end, and the number of group members), keeps a
window of them, reads the backpressure level and the StatefulSet's rollout, and calls
`decide(window, policy, context)`. The `Decision` says how many replicas `spec.replicas`
should hold, why, and with which inputs (written to status and an Event).

Measurement (`measure`)
    - lag of a partition = log-end - max(committed, log-start): messages deleted by
      retention are not lag (KEDA #7936). No committed offset: the group starts where
      `autoOffsetReset` says (earliest: the whole log; latest: nothing).
    - rates from deltas over the last `rateWindowS`: produce rate (log-end), consume rate
      (committed), and the rate of one member while it is busy (`busy_member_rate`, from the
      group's assignment: a capacity, as Flink's autoscaler measures its true rate; without
      the assignment, consumed / members when the whole group was busy).
    - lag in seconds per partition as kafka-lag-exporter estimates it: the time at which the
      log-end offset passed the committed offset, interpolated in the window's (offset, time)
      table (extrapolated from the oldest slope when it lies before the window).
    - stalled partitions (Burrow's STALL/STOP): committed offset unchanged for at least
      `stallAfterS` while the partition had lag at every observation of that span. More
      replicas do not help them, so their lag does not count towards scaling up.

Recommendation
    - `Lag`: ceil(lag / lagThresholdPerReplica), KEDA's formula, with no tolerance band (the
      HPA's 10 % tolerance is what stalls KEDA at 22 of 24 and 63 of 64 partitions).
    - `DrainTime`: ceil((lag / targetDrainTimeS + produce rate) / rate per replica): enough
      replicas to keep up with producers and drain the backlog within the target. Without a
      measured rate yet (no busy window so far) it falls back to the `Lag` formula. The
      backlog term counts at most one replica's rate per partition (`drain_need`): a backlog
      on few partitions cannot use more replicas than those partitions.
    - members count partitions (`even_spread`): some member holds ceil(P/N) of them and must
      keep up; Lag mode never goes below what keeps up with the producers once a rate is known.
    - capped at the number of partitions (or partitions with lag, `limitToPartitionsWithLag`)
      and at [minReplicas, maxReplicas]; from zero replicas only lag above `activationLag`
      wakes the group.

Decision (in this order; the first hold wins)
    1. mode Off: the operator does not write spec.replicas.
    2. stale data (the last measurement failed): keep the replicas; never scale on stale data.
    3. rollout in progress: keep the replicas.
    4. up: at once (or the lowest recommendation within `scaleUpStabilizationS`), unless
       the group's backpressure level is at or above `backpressureBlocksAt` (the downstream
       is saturated: more consumers would only push harder), at most `maxScaleUpStep`.
       `Lag` mode holds increases of at most `lag_tolerance` (10 %), except when the
       recommendation reaches the partition cap or maxReplicas (no stall below the cap).
    5. down: counting each replica at 90 % of its rate (headroom to catch up after the
       rebalance), to the highest recommendation in force within `scaleDownStabilizationS`
       (`in_force`), once that much history exists, at most `maxScaleDownStep`, and only when at least
       `scale_down_band` (10 %) below the replicas or at minReplicas. In `DrainTime`, once
       the backlog is drained (`backlog_drained_since`), recommendations older than that
       no longer count: they were made for a backlog that is gone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Literal, Mapping, Sequence

TP = tuple[str, int]
Mode = Literal["Off", "Lag", "DrainTime"]

# Decision reasons (CamelCase: they are Event reasons and status values).
SCALING_OFF = "ScalingOff"
STALE_DATA = "StaleData"
NO_DATA = "NoData"
ROLLING_OUT = "RollingOut"
SCALE_UP = "ScaleUp"
SCALE_DOWN = "ScaleDown"
SCALE_TO_ZERO = "ScaleToZero"
WAKE_UP = "WakeUp"
STEADY = "Steady"
IDLE = "Idle"
BACKPRESSURE = "BackpressureEngaged"
STALLED = "StalledPartitions"
DOWN_STABILIZING = "ScaleDownStabilizing"
UP_STABILIZING = "ScaleUpStabilizing"
CLAMPED = "OutOfBounds"
REASONS = (SCALING_OFF, STALE_DATA, NO_DATA, ROLLING_OUT, SCALE_UP, SCALE_DOWN, SCALE_TO_ZERO, WAKE_UP, STEADY,
           IDLE, BACKPRESSURE, STALLED, DOWN_STABILIZING, UP_STABILIZING, CLAMPED)


@dataclass(frozen=True)
class Offsets:
    """One partition at one instant. committed is None when the group never committed."""
    committed: int | None
    start: int   # log-start offset (earlier messages were deleted by retention)
    end: int     # log-end offset (high watermark)


@dataclass(frozen=True)
class Observation:
    at: float                       # seconds (epoch)
    partitions: Mapping[TP, Offsets]
    members: int = 0                # consumers in the group at that instant
    # partition -> the member consuming it (the group's assignment), when known: the rate is
    # then measured on the members that were busy, not on the group (see `busy_member_rate`)
    owners: Mapping[TP, str] | None = None
    rebalancing: bool = False       # the group was between assignments (no stall is judged across one)


@dataclass(frozen=True)
class Policy:
    mode: Mode = "Lag"
    min_replicas: int = 1
    max_replicas: int = 10
    lag_threshold: int = 1_000
    target_drain_s: float = 300.0
    scale_up_stabilization_s: float = 0.0
    scale_down_stabilization_s: float = 300.0
    max_step_up: int = 10
    max_step_down: int = 10
    activation_lag: int = 0
    stall_after_s: float = 120.0
    rate_window_s: float = 60.0
    limit_to_partitions_with_lag: bool = False
    backpressure_blocks_at: float = 0.5
    auto_offset_reset: str = "earliest"
    # scale down only when the target is at least this share below the replicas (or reaches
    # minReplicas): small decreases are not worth a rebalance. Scale-up has no band (no stall at the cap).
    scale_down_band: float = 0.1
    # DrainTime: the backlog is drained when its term needs less than this share of one
    # replica; recommendations made while it was not are then no longer held by the window
    drained_replica_share: float = 0.25
    # Lag mode: scale up only when the recommendation exceeds the replicas by more than this
    # share, or reaches the partition cap / maxReplicas (no stall one step below the cap)
    lag_tolerance: float = 0.1
    # a member counts as busy (its rate is a capacity) while its backlog is at least this many
    # seconds of its own consumption: less is what is in flight or not yet committed
    busy_lag_s: float = 2.0


@dataclass(frozen=True)
class Context:
    """What the operator knows besides the Kafka window at decision time."""
    now: float
    current: int                                        # spec.replicas as it stands (kept within bounds)
    rolling: bool = False                               # the StatefulSet is rolling out a new revision
    backpressure: float | None = None                   # the group's level (share of saturated members)
    stale: str | None = None                            # why the newest measurement is missing (None: fresh)
    recommendations: Sequence[tuple[float, int]] = ()   # earlier (time, recommendation), oldest first
    known_rate: float | None = None                     # per-replica rate measured in an earlier busy window


@dataclass(frozen=True)
class Metrics:
    partitions: int = 0
    lag: int = 0                            # total lag, retention-deleted messages excluded
    effective_lag: int = 0                  # lag of the partitions that are not stalled
    max_partition_lag: int = 0
    lagging: int = 0                        # partitions with lag that are not stalled
    stalled: tuple[TP, ...] = ()
    produce_rate: float | None = None       # msg/s into the topics
    consume_rate: float | None = None       # msg/s committed by the group
    per_replica_rate: float | None = None   # msg/s one member consumed while busy (None: not busy)
    members: int = 0
    lag_seconds: float | None = None        # the oldest unconsumed message's age, estimated
    partition_lags: Mapping[TP, int] = field(default_factory=dict)        # not stalled ones only
    max_partition_consume: float | None = None   # msg/s: the fastest any one partition was consumed
    partition_produce: Mapping[TP, float] = field(default_factory=dict)   # msg/s into each partition
    waiting: tuple[TP, ...] = ()            # lag but not consumed in the rate window (not stalled yet)

    def summary(self) -> dict[str, object]:
        """For status and Events: plain, rounded values."""
        def r(x: float | None) -> float | None:
            return None if x is None else round(x, 1)
        return {"partitions": self.partitions, "lag": self.lag, "effectiveLag": self.effective_lag,
                "laggingPartitions": self.lagging, "stalledPartitions": [f"{t}/{p}" for t, p in self.stalled],
                "produceRate": r(self.produce_rate), "consumeRate": r(self.consume_rate),
                "perReplicaRate": r(self.per_replica_rate), "members": self.members,
                "lagSeconds": r(self.lag_seconds)}


@dataclass(frozen=True)
class Decision:
    replicas: int                  # what spec.replicas should be
    recommendation: int | None     # the formula's answer within bounds (None: none made), for the history
    reason: str
    message: str
    metrics: Metrics = field(default_factory=Metrics)
    rate: float | None = None      # the per-replica rate used (DrainTime), to remember as known_rate

    @property
    def scaled(self) -> bool:
        return self.reason in (SCALE_UP, SCALE_DOWN, SCALE_TO_ZERO, WAKE_UP, CLAMPED)


# ----------------------------------------------------------------------------- measurement

def partition_lag(o: Offsets, auto_offset_reset: str) -> int:
    """Messages the group has still to consume from one partition."""
    if o.committed is not None and o.committed >= 0:
        begin = max(o.committed, o.start)
    else:
        begin = o.start if auto_offset_reset == "earliest" else o.end
    return max(0, o.end - begin)


def consumed_position(o: Offsets, auto_offset_reset: str) -> int:
    """Where the group stands in the partition (its committed offset, or where it would start)."""
    return o.end - partition_lag(o, auto_offset_reset)


def _since(window: Sequence[Observation], t0: float) -> list[Observation]:
    return [o for o in window if o.at >= t0]


def stalled_partitions(window: Sequence[Observation], stall_after_s: float, auto_offset_reset: str) -> list[TP]:
    """Partitions whose position (committed offset, or where the group would start) stayed
    the same for at least `stall_after_s` while they had lag, one member held them and the
    group had members and was not rebalancing at every observation of that span (Burrow's
    STALL/STOP). A group with no member at all is not stalled but absent (scaled to zero, or
    pods not started): its lag must wake it. Nor is a group whose consumers are still joining
    (a rebalance in the span restarts the clock)."""
    if not window:
        return []
    last = window[-1]
    span = [o for o in window if o.at >= last.at - stall_after_s - 1e-9]
    # the span must reach back at least stall_after_s: find the newest observation that old
    older = [o for o in window if o.at <= last.at - stall_after_s + 1e-9]
    if not older:
        return []
    span = [older[-1], *[o for o in span if o.at > older[-1].at]]
    out = []
    if any(o.members <= 0 or o.rebalancing for o in span):
        return []       # absent, or rebalancing: members that consume nothing yet are not stuck
    for tp, now in last.partitions.items():
        pos = consumed_position(now, auto_offset_reset)
        if all(tp in o.partitions and consumed_position(o.partitions[tp], auto_offset_reset) == pos
               and partition_lag(o.partitions[tp], auto_offset_reset) > 0 for o in span) and held(span, tp):
            out.append(tp)
    return sorted(out)


def held(span: Sequence[Observation], tp: TP) -> bool:
    """One member owned the partition at every observation of the span (where the assignment
    is known). A partition moved to another member, or absent from a known assignment, stands
    still because nobody consumes it yet, not because its consumer is stuck."""
    owners = {o.owners.get(tp) for o in span if o.owners is not None}
    return len(owners) <= 1 and None not in owners


def _rate(a: Observation, b: Observation, pick) -> float | None:
    dt = b.at - a.at
    if dt <= 0:
        return None
    total = 0
    for tp, ob in b.partitions.items():
        oa = a.partitions.get(tp)
        if oa is None:  # a new partition: it started empty, count from its start
            oa = Offsets(ob.start, ob.start, ob.start)
        total += max(0, pick(ob) - pick(oa))
    return total / dt


def lag_seconds(window: Sequence[Observation], tp: TP, auto_offset_reset: str) -> float | None:
    """Age of the partition's oldest unconsumed message, from the (log-end, time) table of the
    window: the time the log-end offset passed the group's position, interpolated."""
    rows = [(o.at, o.partitions[tp].end) for o in window if tp in o.partitions]
    if not rows:
        return None
    now, last = window[-1].at, window[-1].partitions.get(tp)
    if last is None:
        return None
    pos = consumed_position(last, auto_offset_reset)
    if pos >= last.end:
        return 0.0
    # newest row at or below pos: the message at pos was produced after it
    for i in range(len(rows) - 1, -1, -1):
        t_i, e_i = rows[i]
        if e_i <= pos:
            if i + 1 < len(rows):
                t_j, e_j = rows[i + 1]
                t = t_i + (t_j - t_i) * (pos - e_i) / (e_j - e_i) if e_j > e_i else t_i
            else:
                t = t_i
            return max(0.0, now - t)
    # before the table: extrapolate with the oldest slope, or say at least the table's age
    (t0, e0) = rows[0]
    nxt = next(((t, e) for t, e in rows[1:] if e > e0), None)
    if nxt is None:
        return max(0.0, now - t0)
    slope = (nxt[1] - e0) / (nxt[0] - t0)
    return max(0.0, now - (t0 - (e0 - pos) / slope))


def measure(window: Sequence[Observation], policy: Policy) -> Metrics:
    if not window:
        return Metrics()
    reset = policy.auto_offset_reset
    last = window[-1]
    lags = {tp: partition_lag(o, reset) for tp, o in last.partitions.items()}
    stalled = tuple(stalled_partitions(window, policy.stall_after_s, reset))
    live = {tp: n for tp, n in lags.items() if tp not in stalled}
    recent = _since(window, last.at - policy.rate_window_s - 1e-9)
    fastest = None
    produced: dict[TP, float] = {}
    moved: dict[TP, int] = {}
    if len(recent) >= 2 and recent[-1].at > recent[0].at:
        dt = recent[-1].at - recent[0].at
        for tp, ob in last.partitions.items():
            oa = recent[0].partitions.get(tp) or Offsets(ob.start, ob.start, ob.start)
            moved[tp] = consumed_position(ob, reset) - consumed_position(oa, reset)
            c = max(0, moved[tp]) / dt
            fastest = c if fastest is None else max(fastest, c)
            produced[tp] = max(0, ob.end - oa.end) / dt
    # waiting on something else than replicas: lag all along the rate window, never moved, while
    # the group had members and consumed elsewhere (a stuck partition before it counts as stalled)
    waiting: tuple[TP, ...] = ()
    if moved and any(n > 0 for n in moved.values()) and all(o.members > 0 for o in recent):
        waiting = tuple(sorted(tp for tp, n in moved.items() if n <= 0 and tp in live and all(
            tp in o.partitions and partition_lag(o.partitions[tp], reset) > 0 for o in recent)))
    produce = consume = per_replica = None
    if len(recent) >= 2:
        first = recent[0]
        produce = _rate(first, last, lambda o: o.end)
        consume = _rate(first, last, lambda o: consumed_position(o, reset))
        if recent[-1].owners:
            per_replica = busy_member_rate(recent, set(stalled), reset, policy.busy_lag_s)
        else:
            members = _mean_members(recent)
            busy = all(sum(1 for tp, o in ob.partitions.items() if tp not in stalled and partition_lag(o, reset) > 0)
                       >= max(1, ob.members) for ob in recent)
            if busy and members > 0 and consume is not None and consume > 0:
                per_replica = consume / members
    seconds = [s for tp in live if lags[tp] > 0 and (s := lag_seconds(window, tp, reset)) is not None]
    return Metrics(partitions=len(lags), lag=sum(lags.values()), effective_lag=sum(live.values()),
                   max_partition_lag=max(lags.values(), default=0),
                   lagging=sum(1 for n in live.values() if n > 0), stalled=stalled,
                   produce_rate=produce, consume_rate=consume, per_replica_rate=per_replica,
                   members=last.members, lag_seconds=max(seconds) if seconds else (0.0 if live else None),
                   partition_lags=live, max_partition_consume=fastest,
                   partition_produce=produced, waiting=waiting)


def busy_member_rate(recent: Sequence[Observation], stalled: set[TP], reset: str,
                     busy_lag_s: float) -> float | None:
    """msg/s one member consumes while it is busy: the mean over the members whose backlog
    (on their partitions that moved) stayed at least `busy_lag_s` of their own consumption at
    every observation of the window, with the same assignment all along. A member with such a
    backlog consumes as fast as it can, so its rate is a capacity (Flink's autoscaler measures
    the true processing rate on busy time likewise). The group's consume rate over all members
    is not, when some members keep up and idle: 24 partitions over 7 members at 600 msg/s, the
    members with 4 partitions fall behind, the others keep up, and consumed / members says 86
    msg/s of a true 100. A partition that did not move is left out (a stuck one, not yet old
    enough to count as stalled: its member is not consuming it, so it says nothing of speed).
    None when no member was busy all along or the assignment changed in the window."""
    first, last = recent[0], recent[-1]
    owners = last.owners
    dt = last.at - first.at
    if not owners or dt <= 0 or any(o.owners != owners for o in recent):
        return None
    mine: dict[str, list[TP]] = {}
    for tp, member in owners.items():
        if tp not in stalled and tp in last.partitions:
            mine.setdefault(member, []).append(tp)
    rates = []
    for tps in mine.values():
        moved = {tp: consumed_position(last.partitions[tp], reset)
                 - consumed_position(first.partitions.get(tp, last.partitions[tp]), reset) for tp in tps}
        rate = sum(max(0, n) for n in moved.values()) / dt
        if rate > 0 and all(_busy_step(a, b, tps, rate * busy_lag_s, reset) for a, b in zip(recent, recent[1:])):
            rates.append(rate)
    return sum(rates) / len(rates) if rates else None


def _busy_step(a: Observation, b: Observation, tps: Sequence[TP], backlog: float, reset: str) -> bool:
    """Between a and b, the partitions that moved still had at least `backlog` messages at b."""
    moved = [tp for tp in tps if tp in a.partitions and tp in b.partitions
             and consumed_position(b.partitions[tp], reset) > consumed_position(a.partitions[tp], reset)]
    return bool(moved) and sum(partition_lag(b.partitions[tp], reset) for tp in moved) >= backlog


def _mean_members(obs: Sequence[Observation]) -> float:
    """Time-weighted mean of the member count over the observations."""
    if len(obs) < 2:
        return float(obs[0].members) if obs else 0.0
    total = weight = 0.0
    for a, b in zip(obs, obs[1:]):
        dt = b.at - a.at
        total += (a.members + b.members) / 2 * dt
        weight += dt
    return total / weight if weight > 0 else float(obs[-1].members)


# ----------------------------------------------------------------------------- recommendation

def lag_formula(lag: int, threshold: int) -> int:
    """KEDA's ceil(totalLag / lagThreshold), without the HPA's tolerance band."""
    return math.ceil(lag / threshold) if lag > 0 else 0


def drain_formula(lag: int, produce_rate: float, rate: float, target_s: float) -> int:
    """Replicas that keep up with the producers and drain `lag` within `target_s`."""
    need = lag / target_s + max(0.0, produce_rate)
    return math.ceil(need / rate - 1e-9) if need > 0 else 0


def drain_need(m: Metrics, rate: float, target_s: float) -> float:
    """msg/s the group can put to use: the produce rate plus, per partition, its backlog over
    the target, but at most what one consumer takes from one partition (a partition is consumed
    by one member at a time: a backlog concentrated on few partitions cannot use more replicas
    than those partitions, e.g. the one a released stall leaves behind). That limit is the
    larger of the per-replica rate and the fastest any single partition was consumed in the
    rate window (the per-replica rate is an average over members that may also own idle
    partitions, so alone it would underestimate what one partition can take). The backlog of a
    partition nobody consumed in the rate window while others were (`Metrics.waiting`: stuck,
    before `stallAfterS` names it stalled) waits on something more replicas do not fix."""
    one = max(rate, m.max_partition_consume or 0.0)
    lags = m.partition_lags or {("", -1): m.effective_lag}
    return (sum(min(one, lag / target_s) for tp, lag in lags.items() if tp not in m.waiting)
            + max(0.0, m.produce_rate or 0.0))


def partition_needs(m: Metrics, rate: float, target_s: float) -> list[float]:
    """msg/s each partition needs (stalled ones excluded): what is produced into it plus its
    backlog over the target (not for a partition `waiting` on something else), at most what one
    consumer can take from it."""
    one = max(rate, m.max_partition_consume or 0.0)
    tps = set(m.partition_lags) | {tp for tp in m.partition_produce if tp not in m.stalled}
    return [min(one, m.partition_produce.get(tp, 0.0)
                + (0 if tp in m.waiting else m.partition_lags.get(tp, 0)) / target_s) for tp in tps]


def even_spread(partitions: int, needs: Sequence[float], rate: float) -> int:
    """Fewest replicas for which the busiest member keeps up. A partition is consumed by one
    member, so N replicas give some member ceil(P/N) partitions, and the busiest member is
    taken to hold the neediest partition plus average ones. With 24 even partitions at 1,800
    msg/s and 100 msg/s per replica, ceil(1800/100) = 18 replicas leave six members with two
    partitions (150 msg/s each): they fall behind for ever; only 24 keep up. Conversely 13
    to 23 replicas are no better than 12 when each member can take two partitions. And a
    partition whose backlog takes a whole replica (released after a stall) drains only on a
    member of its own. Capped at the partitions by `cap`."""
    total = sum(needs)
    if partitions <= 0 or total <= 0 or rate <= 0:
        return 0
    top = max(needs)
    if top > rate * (1 + 1e-9):
        return partitions
    rest = (total - top) / (partitions - 1) if partitions > 1 else 0.0   # an average other partition
    if rest <= 0:
        return 1
    per_member = 1 + math.floor((rate - top) / rest + 1e-9)   # partitions one member can keep up with
    return math.ceil(partitions / per_member)


def cap(policy: Policy, m: Metrics) -> tuple[int, str]:
    """The most replicas that can do anything: one per partition (or per lagging one)."""
    if policy.limit_to_partitions_with_lag:
        return max(1, m.lagging), "partitions with lag"
    return max(1, m.partitions), "partitions"


def recommend(policy: Policy, m: Metrics, known_rate: float | None, current: int,
              utilization: float = 1.0) -> tuple[int, str, float | None]:
    """(replicas within bounds, how they were computed, the per-replica rate used). With
    `utilization` < 1 each replica is counted at that share of its measured rate (the
    headroom a scale-down must leave, see `decide`)."""
    measured = m.per_replica_rate or known_rate
    rate = measured * utilization if measured else None
    if policy.mode == "DrainTime" and rate:
        raw = drain_formula(m.effective_lag, m.produce_rate or 0.0, rate, policy.target_drain_s)
        how = (f"ceil(({m.effective_lag} lag / {policy.target_drain_s:g}s + {m.produce_rate or 0:.1f} msg/s produced)"
               f" / {rate:.1f} msg/s per replica) = {raw}")
        need = drain_need(m, rate, policy.target_drain_s)
        absorbable = math.ceil(need / rate - 1e-9) if need > 0 else 0
        if absorbable < raw:
            raw = absorbable
            how += (f", but the partitions can absorb only {need:.1f} msg/s (a partition's backlog takes at most"
                    f" one replica): {raw}")
        spread = even_spread(m.partitions, partition_needs(m, rate, policy.target_drain_s), rate)
        if spread > raw:
            raw = spread
            how += (f", rounded up to {raw} so that no member holds more partitions than it can consume"
                    f" ({need / max(1, m.partitions):.1f} msg/s each)")
    else:
        raw = lag_formula(m.effective_lag, policy.lag_threshold)
        how = f"ceil({m.effective_lag} lag / {policy.lag_threshold} per replica) = {raw}"
        if policy.mode == "DrainTime":
            how += " (no per-replica rate measured yet: lag formula)"
            rate = None
        elif rate and m.partition_produce:
            # KEDA's formula alone settles where lag = replicas x threshold and so flaps across a
            # boundary when fewer replicas cannot keep up; never fewer than keep up with producers
            keep_up = even_spread(m.partitions, [r for tp, r in m.partition_produce.items() if tp not in m.stalled],
                                  rate)
            if keep_up > raw:
                raw = keep_up
                how += (f", but {keep_up} are needed to keep up with {m.produce_rate or 0:.1f} msg/s produced"
                        f" at {rate:.1f} msg/s per replica")
    limit, what = cap(policy, m)
    if raw > limit:
        raw = limit
        how += f", capped at {limit} {what}"
    # from zero, only lag above the activation threshold wakes the group
    if current == 0 and m.effective_lag <= policy.activation_lag:
        if raw > 0:
            how += f", but lag {m.effective_lag} <= activationLag {policy.activation_lag}"
        raw = 0
    elif current == 0 and raw == 0 and m.effective_lag > policy.activation_lag:
        raw = 1
    bounded = min(policy.max_replicas, max(policy.min_replicas, raw))
    if bounded != raw:
        how += f", kept within [{policy.min_replicas}, {policy.max_replicas}]"
    if rate and utilization < 1:
        how += f" (each replica counted at {utilization:.0%} of {measured:.1f} msg/s: headroom)"
    return bounded, how, measured if rate else None


# ----------------------------------------------------------------------------- decision

def decide(window: Sequence[Observation], policy: Policy, ctx: Context) -> Decision:
    """The replicas spec.replicas should hold now, with the reason and the inputs."""
    current = ctx.current
    inside = min(policy.max_replicas, max(policy.min_replicas, current))
    if policy.mode == "Off":
        return Decision(current, None, SCALING_OFF, "scaling.mode is Off: spec.replicas is written by users or an HPA")
    if ctx.stale:
        return Decision(inside, None, STALE_DATA if inside == current else CLAMPED,
                        f"keeping {inside} replicas: the lag data is stale ({ctx.stale})")
    if not window:
        return Decision(inside, None, NO_DATA if inside == current else CLAMPED, "no measurement yet")
    m = measure(window, policy)
    rec, how, rate = recommend(policy, m, ctx.known_rate, current)

    def out(replicas: int, reason: str, message: str) -> Decision:
        return Decision(replicas, rec, reason, message, m, rate)

    if ctx.rolling:
        return out(inside, ROLLING_OUT if inside == current else CLAMPED,
                   f"keeping {inside} replicas while the StatefulSet rolls out (recommended: {how})")
    if rec > current and current > 0 and policy.mode == "Lag" and rec <= current * (1 + policy.lag_tolerance) \
            and rec < min(cap(policy, m)[0], policy.max_replicas):
        # Lag mode's tolerance, as the HPA's, but never below the cap: a recommendation that
        # reaches the partition cap (or maxReplicas) is followed, so 22 of 24 cannot stall
        return out(inside, STEADY if inside == current else CLAMPED,
                   f"{how}; within the {policy.lag_tolerance:.0%} tolerance of {current} replicas")
    if rec > current:
        target = rec
        if policy.scale_up_stabilization_s > 0:
            in_window = in_force(ctx.recommendations, ctx.now - policy.scale_up_stabilization_s)
            target = min([rec, *in_window])
            if target <= current:
                return out(inside, UP_STABILIZING if inside == current else CLAMPED,
                           f"{how}; waiting {policy.scale_up_stabilization_s:g}s (scaleUpStabilizationS) "
                           f"for the recommendation to hold")
        bp = ctx.backpressure
        if bp is not None and bp >= policy.backpressure_blocks_at:
            return out(inside, BACKPRESSURE if inside == current else CLAMPED,
                       f"not scaling up to {target}: backpressure level {bp:.2f} >= {policy.backpressure_blocks_at:g} "
                       f"(the downstream is saturated; more consumers would push it harder). {how}")
        step = min(target, current + policy.max_step_up)
        reason = WAKE_UP if current == 0 else SCALE_UP
        note = f" (step limited to +{policy.max_step_up})" if step < target else ""
        return out(step, reason, f"{current} -> {step}: {how}{note}")
    if rec < current:
        history = list(ctx.recommendations)
        if policy.scale_down_stabilization_s > 0 and (
                not history or history[0][0] > ctx.now - policy.scale_down_stabilization_s):
            if inside != current:
                return out(inside, CLAMPED, f"{current} -> {inside}: outside [minReplicas, maxReplicas]")
            return out(current, DOWN_STABILIZING,
                       f"{how}; scaling down only after {policy.scale_down_stabilization_s:g}s of recommendations "
                       f"(scaleDownStabilizationS)")
        # scale down only to what keeps up with headroom: a group left at exactly its capacity
        # cannot catch up with the lag of the rebalance it goes through, and comes back up
        down, down_how, _ = recommend(policy, m, ctx.known_rate, current, utilization=1 - policy.scale_down_band)
        if down > rec:
            rec_for_down, how = down, down_how
        else:
            rec_for_down = rec
        since = ctx.now - policy.scale_down_stabilization_s
        released = backlog_drained_since(window, policy, m, rate) if policy.mode == "DrainTime" else None
        if released is not None and released > since:
            since = released    # recommendations made for a backlog that is gone no longer hold replicas
        # recommendations made for a drained backlog are released, the one in force then included
        in_window = [r for t, r in history if t >= since] if since == released else in_force(history, since)
        target = max([rec_for_down, *in_window])
        if target < current and target > policy.min_replicas and target > current * (1 - policy.scale_down_band):
            return out(inside, DOWN_STABILIZING if inside == current else CLAMPED,
                       f"{how}; {current} -> {target} is less than the {policy.scale_down_band:.0%} scale-down band")
        if released is not None and since == released and target < current:
            how += f" (backlog drained since {ctx.now - released:g}s: earlier recommendations released)"
        if target >= current:
            return out(inside, DOWN_STABILIZING if inside == current else CLAMPED,
                       f"{how}; the highest recommendation of the last {policy.scale_down_stabilization_s:g}s "
                       f"is {target}")
        step = max(target, current - policy.max_step_down)
        note = f" (step limited to -{policy.max_step_down})" if step > target else ""
        reason = SCALE_TO_ZERO if step == 0 else SCALE_DOWN
        return out(step, reason, f"{current} -> {step}: {how}{note}")
    # rec == current
    if m.stalled and lag_formula(m.lag, policy.lag_threshold) > current:
        return out(current, STALLED, f"partitions {', '.join(f'{t}/{p}' for t, p in m.stalled)} are stalled "
                                     f"(committed offset frozen with lag): their lag does not scale up. {how}")
    return out(current, IDLE if current == 0 else STEADY, how)


def in_force(history: Sequence[tuple[float, int]], since: float) -> list[int]:
    """The recommendations in force at some time since `since`: those made since, and the last
    one made before, which held until the next (the HPA's window takes only the former: with
    its regular 15 s syncs nothing is lost, but a gap in the polls on a loaded machine would
    leave a window holding only the newest, low recommendation)."""
    before = [r for t, r in history if t <= since]
    return before[-1:] + [r for t, r in history if t > since]


def backlog_drained_since(window: Sequence[Observation], policy: Policy, m: Metrics,
                          rate: float | None) -> float | None:
    """DrainTime: the time since which the backlog has been drained (its term in the formula,
    lag / targetDrainTimeS / rate, below `drained_replica_share` of a replica at every
    observation since), stalled partitions excluded; None when it is not drained now or no
    rate is known. Recommendations older than that were made for a backlog that is gone."""
    if not rate or not window:
        return None
    limit = policy.drained_replica_share * rate * policy.target_drain_s
    reset, stalled = policy.auto_offset_reset, set(m.stalled)

    def lag(o: Observation) -> int:
        return sum(partition_lag(x, reset) for tp, x in o.partitions.items() if tp not in stalled)

    if lag(window[-1]) > limit:
        return None
    since = None
    for o in reversed(window):
        if lag(o) > limit:
            return since
        since = o.at
    return None   # drained over the whole window: nothing to release


def prune(window: list[Observation], now: float, keep_s: float, max_len: int = 240) -> list[Observation]:
    """The observations still needed: the last `keep_s` seconds plus one older (a span's anchor)."""
    older = [o for o in window if o.at < now - keep_s]
    kept = ([older[-1]] if older else []) + [o for o in window if o.at >= now - keep_s]
    return kept[-max_len:]


def keep_seconds(policy: Policy) -> float:
    """How much history decisions need (and lag-seconds estimates like)."""
    return max(policy.scale_down_stabilization_s, policy.scale_up_stabilization_s, policy.stall_after_s,
               policy.rate_window_s, 600.0)


def prune_recommendations(recs: Iterable[tuple[float, int]], now: float, policy: Policy) -> list[tuple[float, int]]:
    """Keep the recommendations of the stabilization windows, plus one older: its presence says
    the history covers a whole window (the scale-down rule waits for that)."""
    keep = max(policy.scale_down_stabilization_s, policy.scale_up_stabilization_s)
    recs = list(recs)
    older = [r for r in recs if r[0] < now - keep]
    return ([older[-1]] if older else []) + [r for r in recs if r[0] >= now - keep]


__all__ = ["Offsets", "Observation", "Policy", "Context", "Metrics", "Decision", "measure", "decide",
           "partition_lag", "lag_seconds", "stalled_partitions", "recommend", "prune"]
