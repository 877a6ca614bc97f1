"""The autoscaler's decision over synthetic observation windows: every rule, KEDA's stall
cases, retention-deleted lag, stalls, backpressure, rollouts, scale to zero."""
from __future__ import annotations

from typing import Mapping

import pytest

from afc.operator import scaling as sc
from afc.operator.scaling import Context, Observation, Offsets, Policy

T = "orders"


def obs(at: float, parts: Mapping[int, tuple[int | None, int, int]], members: int = 1) -> Observation:
    """parts: partition -> (committed, log-start, log-end)."""
    return Observation(at, {(T, p): Offsets(*v) for p, v in parts.items()}, members)


def uniform(at: float, n: int, lag_each: int, committed: int = 0, members: int = 1) -> Observation:
    return obs(at, {p: (committed, 0, committed + lag_each) for p in range(n)}, members)


def decide(window: list[Observation], current: int, **kw) -> sc.Decision:
    ctx_keys = {"rolling", "backpressure", "stale", "recommendations", "known_rate"}
    ctx = {k: kw.pop(k) for k in list(kw) if k in ctx_keys}
    policy = Policy(**{"stall_after_s": 1e9, **kw})
    return sc.decide(window, policy, Context(now=window[-1].at if window else 0.0, current=current, **ctx))


# ----------------------------------------------------------------------------- lag arithmetic

@pytest.mark.parametrize("committed,start,end,reset,lag", [
    (40, 0, 100, "earliest", 60),
    (None, 10, 100, "earliest", 90),   # never committed: from the start of the log
    (None, 10, 100, "latest", 0),      # never committed: from its end
    (5, 50, 100, "earliest", 50),      # retention deleted 5..49: not lag (KEDA #7936 counts 95)
    (100, 0, 100, "earliest", 0),
])
def test_partition_lag(committed, start, end, reset, lag) -> None:
    assert sc.partition_lag(Offsets(committed, start, end), reset) == lag


def test_retention_deleted_messages_do_not_scale_up() -> None:
    # committed 0 on 4 partitions, retention moved the log start to 9,000 of 10,000
    w = [obs(0, {p: (0, 9_000, 10_000) for p in range(4)})]
    d = decide(w, current=1, lag_threshold=1_000)
    assert d.metrics.lag == 4_000 and d.replicas == 4    # KEDA would see 40,000 and go to the cap


def test_lag_seconds_interpolates_the_offset_time_table() -> None:
    # log-end grows 100/s; the group stands at 250, produced at t=2.5
    w = [obs(t, {0: (250 if t == 5 else 0, 0, 100 * t)}) for t in range(6)]
    assert sc.lag_seconds(w, (T, 0), "earliest") == pytest.approx(2.5)
    # before the table: extrapolated with the oldest slope
    w2 = [obs(t, {0: (50, 0, 1000 + 100 * t)}) for t in range(3)]
    assert sc.lag_seconds(w2, (T, 0), "earliest") == pytest.approx(2 + 9.5)
    # caught up: zero
    assert sc.lag_seconds([obs(0, {0: (10, 0, 10)})], (T, 0), "earliest") == 0


# ----------------------------------------------------------------------------- Lag mode

def test_lag_mode_is_kedas_formula() -> None:
    d = decide([uniform(0, 12, 450)], current=1, lag_threshold=1_000)
    assert d.recommendation == 6 and d.replicas == 6 and d.reason == sc.SCALE_UP  # ceil(5400/1000)


@pytest.mark.parametrize("current,partitions", [(22, 24), (63, 64)])
def test_no_tolerance_stall_below_the_partition_cap(current: int, partitions: int) -> None:
    """KEDA caps the metric at partitions x threshold; the HPA's 10 % tolerance then refuses
    24/22 (9 %) and 64/63 (1.6 %): stuck one step below the cap (#4791, #2908). Not here."""
    w = [uniform(0, partitions, 50_000)]
    d = decide(w, current=current, lag_threshold=100, max_replicas=100, max_step_up=100)
    assert d.replicas == partitions and d.reason == sc.SCALE_UP


def test_capped_at_partitions_and_at_partitions_with_lag() -> None:
    w = [obs(0, {0: (0, 0, 90_000), 1: (0, 0, 10), 2: (0, 0, 0), 3: (0, 0, 0)})]
    assert decide(w, current=1, lag_threshold=100).replicas == 4
    assert decide(w, current=1, lag_threshold=100, limit_to_partitions_with_lag=True).replicas == 2


def test_bounds_and_step_limits() -> None:
    w = [uniform(0, 50, 10_000)]
    assert decide(w, current=1, lag_threshold=100, max_replicas=8, max_step_up=100).replicas == 8
    d = decide(w, current=2, lag_threshold=100, max_replicas=40, max_step_up=4)
    assert d.replicas == 6 and "step limited" in d.message
    # below minReplicas: raised at once, whatever the lag says
    assert decide([uniform(0, 4, 0)], current=1, min_replicas=3).replicas == 3


def test_scale_up_is_immediate_scale_down_waits_for_the_window() -> None:
    p = dict(lag_threshold=100, scale_down_stabilization_s=60)
    assert decide([uniform(0, 10, 100)], current=2, **p).replicas == 10
    # little lag now; the window holds higher recommendations
    recs = [(0.0, 10), (20.0, 8), (40.0, 3)]
    d = decide([uniform(50, 10, 10)], current=10, recommendations=recs, **p)
    assert (d.replicas, d.reason) == (10, sc.DOWN_STABILIZING)
    # an older entry proves a whole window was seen; the highest in force within it wins
    d = decide([uniform(100, 10, 10)], current=10, recommendations=[(30.0, 10), (40.0, 4), (70.0, 3)], **p)
    assert (d.replicas, d.reason) == (4, sc.SCALE_DOWN)
    # no history covering the window (operator restarted): wait
    d = decide([uniform(100, 10, 10)], current=10, recommendations=[(70.0, 1)], **p)
    assert d.replicas == 10 and d.reason == sc.DOWN_STABILIZING
    # step limit down
    d = decide([uniform(100, 10, 0)], current=10, recommendations=[(30.0, 1)], max_step_down=3, **p)
    assert d.replicas == 7


def test_a_gap_in_the_polls_does_not_empty_the_window() -> None:
    """CI, 2026-11-28: on a loaded machine the polls stopped for seconds while four consumers
    started; the one recommendation made in the last 5 s was low, and the operator scaled down
    1 s after a status that still showed the backlog. A recommendation holds until the next
    one: the one in force when the window began counts."""
    p = dict(lag_threshold=1_200, scale_down_stabilization_s=5)
    recs = [(float(t), 4) for t in range(30, 39)] + [(45.0, 1)]
    d = decide([uniform(46, 12, 0)], current=4, recommendations=recs, **p)
    assert (d.replicas, d.reason) == (4, sc.DOWN_STABILIZING), d.message
    # once the low recommendation has held for the whole window, down
    d = decide([uniform(50.5, 12, 0)], current=4, recommendations=[*recs, (46.0, 1)], **p)
    assert (d.replicas, d.reason) == (1, sc.SCALE_DOWN), d.message
    # scale-up stabilization alike: the lower recommendation in force at the window's start holds
    up = dict(lag_threshold=100, scale_up_stabilization_s=30)
    d = decide([uniform(100, 10, 100)], current=2, recommendations=[(60.0, 2), (95.0, 10)], **up)
    assert (d.replicas, d.reason) == (2, sc.UP_STABILIZING), d.message


def test_scale_up_stabilization_takes_the_lowest_recent_recommendation() -> None:
    p = dict(lag_threshold=100, scale_up_stabilization_s=30)
    d = decide([uniform(100, 10, 100)], current=2, recommendations=[(80.0, 2)], **p)
    assert d.replicas == 2 and d.reason == sc.UP_STABILIZING
    d = decide([uniform(100, 10, 100)], current=2, recommendations=[(80.0, 5), (90.0, 7)], **p)
    assert d.replicas == 5


# ----------------------------------------------------------------------------- stalls, backpressure, rollouts, staleness

def stuck_window(members: int = 1) -> list[Observation]:
    """Partition 0 frozen at 100 with a growing backlog; partitions 1-3 keep up."""
    return [obs(t, {0: (100, 0, 100 + 500 * t), 1: (10 * t, 0, 10 * t), 2: (10 * t, 0, 10 * t),
                    3: (10 * t, 0, 10 * t)}, members) for t in range(0, 40, 10)]


def test_a_stalled_partition_does_not_drive_scale_up() -> None:
    w = stuck_window()
    d = decide(w, current=1, lag_threshold=1_000, stall_after_s=20)
    assert d.metrics.stalled == ((T, 0),) and d.metrics.lag == 15_000 and d.metrics.effective_lag == 0
    assert d.replicas == 1 and d.reason == sc.STALLED and "orders/0" in d.message
    # before the stall is proven (window shorter than stallAfterS) its lag counts
    assert decide(w[:2], current=1, lag_threshold=1_000, stall_after_s=20).replicas == 4


def test_a_rebalancing_group_or_a_moved_partition_is_not_stalled() -> None:
    """CI, 2026-11-28 (stallAfterS 4): four consumers starting on a loaded machine kept the group
    rebalancing for seconds; nobody consumed, the positions stood still, and the backlog was
    judged stalled and scaled down. Burrow's stall is a consumer that holds the partition and
    does not move: no rebalance in the span, and one owner at every poll of it."""
    def w(owner_at, rebalancing_at=()) -> list[Observation]:
        return [Observation(o.at, o.partitions, o.members, {tp: who for tp in o.partitions if (who := owner_at(o.at))},
                            o.at in rebalancing_at) for o in stuck_window()]
    d = decide(w(lambda t: "m0"), current=1, lag_threshold=1_000, stall_after_s=20)
    assert d.metrics.stalled == ((T, 0),)    # held by m0 all along: stalled
    # rebalancing at t=20 (the broker may still report the old owner): not stalled
    d = decide(w(lambda t: "m0", rebalancing_at=(20,)), current=1, lag_threshold=1_000, stall_after_s=20)
    assert d.metrics.stalled == () and d.replicas == 4, d.message
    # absent from the assignment at t=20, or moved to another member: not stalled either
    d = decide(w(lambda t: None if t == 20 else "m0"), current=1, lag_threshold=1_000, stall_after_s=20)
    assert d.metrics.stalled == () and d.replicas == 4, d.message
    d = decide(w(lambda t: "m1" if t >= 20 else "m0"), current=1, lag_threshold=1_000, stall_after_s=20)
    assert d.metrics.stalled == () and d.replicas == 4, d.message
    # the span since the rebalance long enough: stalled again
    d = decide(w(lambda t: "m0", rebalancing_at=(0,)), current=1, lag_threshold=1_000, stall_after_s=20)
    assert d.metrics.stalled == ((T, 0),)


def test_a_group_without_members_is_absent_not_stalled() -> None:
    w = stuck_window(members=0)
    d = decide(w, current=1, lag_threshold=1_000, stall_after_s=20)
    assert d.metrics.stalled == () and d.replicas == 4


def test_backpressure_blocks_scale_up_but_not_scale_down() -> None:
    w = [uniform(0, 10, 1_000)]
    d = decide(w, current=2, lag_threshold=100, backpressure=1.0)
    assert (d.replicas, d.reason) == (2, sc.BACKPRESSURE) and "backpressure level 1.00" in d.message
    assert decide(w, current=2, lag_threshold=100, backpressure=0.25).replicas == 10
    d = decide([uniform(500, 10, 0)], current=5, lag_threshold=100, backpressure=1.0,
               recommendations=[(0.0, 1)], scale_down_stabilization_s=60)
    assert d.replicas == 1


def test_no_scaling_while_rolling_out_or_on_stale_data() -> None:
    w = [uniform(0, 10, 1_000)]
    d = decide(w, current=2, lag_threshold=100, rolling=True)
    assert (d.replicas, d.reason) == (2, sc.ROLLING_OUT)
    d = decide(w, current=2, lag_threshold=100, stale="kafka: no answer")
    assert (d.replicas, d.reason) == (2, sc.STALE_DATA) and d.recommendation is None
    assert decide(w, current=2, mode="Off").reason == sc.SCALING_OFF


# ----------------------------------------------------------------------------- scale to zero

def test_scale_to_zero_and_wake_up_above_the_activation_threshold() -> None:
    p = dict(min_replicas=0, lag_threshold=100, scale_down_stabilization_s=30, activation_lag=50)
    d = decide([uniform(100, 4, 0)], current=2, recommendations=[(60.0, 0), (80.0, 0)], **p)
    assert (d.replicas, d.reason) == (0, sc.SCALE_TO_ZERO)
    assert decide([uniform(200, 4, 10)], current=0, **p).reason == sc.IDLE           # 40 <= 50
    d = decide([uniform(200, 4, 20)], current=0, **p)                                 # 80 > 50
    assert (d.replicas, d.reason) == (1, sc.WAKE_UP)
    d = decide([uniform(200, 4, 2_000)], current=0, **p)
    assert (d.replicas, d.reason) == (4, sc.WAKE_UP)
    # above zero the activation threshold plays no part: a little lag keeps one replica
    assert decide([uniform(200, 4, 5)], current=1, recommendations=[(0.0, 1)], **p).replicas == 1


# ----------------------------------------------------------------------------- DrainTime mode

def draining(members: int, rate_each: float, produce: float, lag0: int, n: int = 8,
             span: int = 60, step: int = 10) -> list[Observation]:
    """n partitions, producers at `produce` msg/s, each member consuming `rate_each` msg/s."""
    out = []
    for t in range(0, span + 1, step):
        end = int(lag0 + produce * t) // n
        com = int(members * rate_each * t) // n
        out.append(obs(t, {p: (com, 0, end) for p in range(n)}, members))
    return out


def test_drain_time_mode_from_measured_rates() -> None:
    w = draining(members=2, rate_each=100, produce=150, lag0=60_000)
    d = decide(w, current=2, mode="DrainTime", target_drain_s=300, max_replicas=20)
    m = d.metrics
    assert m.per_replica_rate == pytest.approx(100, rel=0.02) and m.produce_rate == pytest.approx(150, rel=0.02)
    # lag 51,000 at t=60: (51,000/300 + 150) / 100 = 3.2 -> 4
    assert d.recommendation == 4 and d.replicas == 4 and d.rate == pytest.approx(100, rel=0.02)


def test_drain_time_without_a_busy_window_uses_the_known_rate_or_the_lag_formula() -> None:
    idle = [uniform(t, 8, 0, committed=10 * t) for t in range(0, 70, 10)]  # caught up, 80 msg/s
    d = decide(idle, current=4, mode="DrainTime", recommendations=[(-400.0, 4), (-300.0, 2)], known_rate=40.0)
    # ceil(80 msg/s / 40) = 2 exactly at capacity: a scale-down leaves 10 % headroom (36 msg/s each)
    assert d.metrics.per_replica_rate is None and d.recommendation == 2 and d.replicas == 3
    assert "headroom" in d.message
    d = decide([uniform(0, 8, 500)], current=1, mode="DrainTime", lag_threshold=1_000)
    assert d.replicas == 4 and "lag formula" in d.message


def test_new_partitions_are_picked_up() -> None:
    w = [uniform(0, 2, 100), uniform(10, 4, 1_000)]
    d = decide(w, current=1, lag_threshold=1_000)
    assert d.metrics.partitions == 4 and d.replicas == 4


def test_windows_are_pruned_but_keep_an_anchor() -> None:
    w = [uniform(t, 1, 0) for t in range(0, 100, 10)]
    kept = sc.prune(w, now=90, keep_s=30)
    assert [o.at for o in kept] == [50, 60, 70, 80, 90]
    recs = sc.prune_recommendations([(t, 1) for t in range(0, 100, 10)], 90, Policy(scale_down_stabilization_s=30))
    assert [t for t, _ in recs] == [50, 60, 70, 80, 90]


# ----------------------------------------------------------------------------- bands, absorbable backlog, drained backlog

def test_lag_mode_tolerance_holds_small_increases_but_never_below_the_cap() -> None:
    p = dict(lag_threshold=100, max_replicas=100, max_step_up=100)
    # 10 -> 11 is within 10 %: held (fewer, larger steps); 10 -> 12 is not
    d = decide([uniform(0, 40, 27)], current=10, **p)                 # ceil(1080 / 100) = 11
    assert (d.recommendation, d.replicas, d.reason) == (11, 10, sc.STEADY) and "tolerance" in d.message
    d = decide([uniform(0, 40, 30)], current=10, **p)                 # 12
    assert (d.replicas, d.reason) == (12, sc.SCALE_UP)
    # 22 of 24 with lag for 23: held; once the recommendation reaches the partition cap it is followed
    assert decide([uniform(0, 24, 95)], current=22, **p).replicas == 22   # ceil(2280 / 100) = 23
    assert decide([uniform(0, 24, 100)], current=22, **p).replicas == 24  # 24 = the cap: no stall
    # ... and so is maxReplicas
    assert decide([uniform(0, 24, 100)], current=20, **{**p, "max_replicas": 21}).replicas == 21
    # DrainTime has no up tolerance: its answer already carries the target
    w = draining(members=10, rate_each=100, produce=1_000, lag0=12_000, n=40)
    assert decide(w, current=10, mode="DrainTime", target_drain_s=300, max_replicas=100).replicas > 10


def test_scale_down_band_skips_small_decreases_except_to_min_replicas() -> None:
    p = dict(lag_threshold=100, scale_down_stabilization_s=60, max_replicas=24)
    d = decide([uniform(100, 20, 55)], current=12, recommendations=[(30.0, 11)], **p)   # 11 of 12: 8 %
    assert (d.replicas, d.reason) == (12, sc.DOWN_STABILIZING) and "band" in d.message
    d = decide([uniform(100, 20, 50)], current=12, recommendations=[(30.0, 10)], **p)   # 10 of 12: 17 %
    assert (d.replicas, d.reason) == (10, sc.SCALE_DOWN)
    # reaching minReplicas is always allowed, however small the step
    d = decide([uniform(100, 20, 55)], current=12, recommendations=[(30.0, 11)], min_replicas=11, **p)
    assert d.replicas == 11


def test_drain_time_backlog_on_few_partitions_uses_at_most_one_replica_each() -> None:
    p = dict(mode="DrainTime", target_drain_s=120, max_replicas=24, known_rate=100.0)
    # 60,000 on one partition: ceil(60,000 / 120 / 100) = 5 by the formula, but only one
    # consumer can read that partition: one replica's worth
    one = [obs(0, {0: (0, 0, 60_000), **{q: (0, 0, 0) for q in range(1, 8)}})]
    d = decide(one, current=1, **p)
    assert d.recommendation == 1 and d.replicas == 1 and "can absorb" in d.message
    # the same backlog over 8 partitions: ceil(500 / 100) = 5 by the formula, but 5 members over
    # 8 partitions give three of them two partitions (125 msg/s each, past the target): 8
    spread = [obs(0, {q: (0, 0, 7_500) for q in range(8)})]
    d = decide(spread, current=1, **p)
    assert d.recommendation == 8 and "no member holds more partitions" in d.message
    # half of it: 62.5 msg/s in all, 31.3 per partition: 3 partitions per member keep up -> 3
    assert decide([obs(0, {q: (0, 0, 3_750) for q in range(8)})], current=1, **p).replicas == 3
    # two backlogged partitions take a replica each, the others 50 msg/s: ceil(600 / 100) = 6 by
    # the formula (not ceil((60,000/120 + 400) / 100) = 10), but the member of a backlogged
    # partition can hold nothing else: one member per partition, 8
    two = [obs(t, {0: (50 * t, 0, 30_000 + 50 * t), 1: (50 * t, 0, 30_000 + 50 * t),
                   **{q: (50 * t, 0, 50 * t) for q in range(2, 8)}}, members=3) for t in (0, 60)]
    d = decide(two, current=1, **p)
    assert d.metrics.produce_rate == pytest.approx(400)
    assert "= 9" in d.message and "absorb only 600.0" in d.message and d.replicas == 8


def test_a_stuck_partition_does_not_scale_up_before_it_counts_as_stalled() -> None:
    """Partition 0 stopped (a poison record) a minute ago: its lag grows while the others are
    consumed (25 msg/s each, 4 members of 100 msg/s). Before stallAfterS names it stalled,
    its backlog does not call for replicas: more would not consume it."""
    def window(p0_rate: int) -> list[Observation]:
        return [assigned(t, {0: (1_000 + p0_rate * t, 1_500 + 25 * t), **{q: (25 * t, 25 * t + 10) for q in range(1, 8)}},
                         4) for t in range(0, 61, 15)]
    p = dict(mode="DrainTime", target_drain_s=30, known_rate=100.0, rate_window_s=60)
    d = decide(window(0), current=4, **p)
    assert d.metrics.waiting == ((T, 0),) and not d.metrics.stalled
    assert d.recommendation <= 4 and d.reason != "ScaleUp", d.message
    # the same backlog on a partition that is consumed (slowly) does count: it takes a member
    d = decide(window(1), current=4, **p)
    assert not d.metrics.waiting and d.reason == "ScaleUp", d.message

def test_drain_time_releases_the_window_once_the_backlog_is_drained() -> None:
    """After a burst, recommendations made for the backlog no longer hold replicas once it is
    gone (its term below a quarter replica at every poll since); Lag mode keeps the window."""
    p = dict(mode="DrainTime", target_drain_s=120, max_replicas=24, scale_down_stabilization_s=300,
             known_rate=100.0)
    w = [uniform(t, 4, 10_000 if t < 300 else 0, committed=10 * t) for t in range(0, 401, 20)]
    recs = [(float(t), 20 if t < 300 else 1) for t in range(0, 400, 20)]
    d = decide(w, current=20, recommendations=recs, **p)
    assert d.replicas < 20 and d.reason == sc.SCALE_DOWN and "backlog drained" in d.message
    # the backlog not drained yet (lag above a quarter replica's target share at the last poll): held
    w2 = [*w[:-1], uniform(400, 4, 2_000, committed=4_000)]
    assert decide(w2, current=20, recommendations=recs, **p).replicas == 20
    # Lag mode: the highest recommendation of the window still holds
    d = decide(w, current=20, recommendations=recs, **{**p, "mode": "Lag", "lag_threshold": 100})
    assert (d.replicas, d.reason) == (20, sc.DOWN_STABILIZING)
    # and the release never skips the wait for a whole window of history (operator restarted)
    assert decide(w, current=20, recommendations=recs[-3:], **p).replicas == 20


# ----------------------------------------------------------------------------- capacity and partitions

def assigned(at: float, offsets: Mapping[int, tuple[int, int]], members: int) -> Observation:
    """offsets: partition -> (committed, log-end); partitions assigned round-robin to m0..m{members-1}."""
    o = {(T, p): Offsets(c, 0, e) for p, (c, e) in offsets.items()}
    return Observation(at, o, members, {(T, p): f"m{p % members}" for p in offsets})


def test_rate_is_measured_on_busy_members_not_the_whole_group() -> None:
    """24 partitions, 7 members of 100 msg/s, 600 msg/s produced (25 per partition): the three
    members with 4 partitions fall behind, the four with 3 keep up. consumed / members says
    86 msg/s; the busy members say 100."""
    def at(t: int) -> Observation:
        parts = {}
        for p in range(24):
            heavy = sum(1 for q in range(24) if q % 7 == p % 7) == 4
            produced = 2_000 + 25 * t
            parts[p] = (produced - 2_000 if heavy else produced) - (0 if heavy else 0), produced
            if heavy:   # 100 msg/s over 4 partitions: 25 each, the backlog of 2,000 stays
                parts[p] = (25 * t, produced)
        return assigned(t, parts, 7)
    w = [at(t) for t in range(0, 61, 15)]
    m = sc.measure(w, Policy(mode="DrainTime", stall_after_s=1e9))
    assert m.per_replica_rate == pytest.approx(100)
    group = sc.measure([Observation(o.at, o.partitions, o.members) for o in w], Policy(stall_after_s=1e9))
    assert group.per_replica_rate == pytest.approx(600 / 7)     # the old estimate, without the assignment


def test_a_stuck_partition_says_nothing_of_its_members_speed() -> None:
    """m0 holds a stuck partition 0 (not yet stalled) and partition 2, which it keeps up with:
    not busy, although it has a backlog at every observation."""
    def w(p0_rate: int) -> list[Observation]:
        return [assigned(t, {0: (p0_rate * t, 5_000 + 10 * t), 1: (10 * t, 10 * t), 2: (10 * t, 10 * t)}, 2)
                for t in range(0, 61, 15)]
    assert sc.measure(w(0), Policy(mode="DrainTime", stall_after_s=1e9)).per_replica_rate is None
    # once m0 consumes its backlog (50 msg/s, plus 10 from partition 2), it is busy and its rate counts
    w = w(50)
    assert sc.measure(w, Policy(mode="DrainTime", stall_after_s=1e9)).per_replica_rate == pytest.approx(60)


def test_a_changed_assignment_gives_no_rate() -> None:
    w = [assigned(t, {p: (0, 10_000 + 10 * t) for p in range(4)}, 2 if t < 30 else 4) for t in range(0, 61, 15)]
    assert sc.measure(w, Policy(mode="DrainTime", stall_after_s=1e9)).per_replica_rate is None


@pytest.mark.parametrize("needs,rate,replicas", [
    ([75.0] * 24, 100, 24),          # 1,800 msg/s: two partitions are 150 for one member: one each
    ([1100 / 24] * 24, 100, 12),     # 45.8 each: two per member keep up; 13..23 are no better than 12
    ([25.0] * 24, 100, 6),           # four per member
    ([100.0] + [0.0] * 7, 100, 1),   # one busy partition, the others empty: one member holds them all
    ([100.0] + [25.0] * 23, 100, 24),  # a partition that takes a whole replica gets one of its own
    ([150.0] * 4, 100, 4),           # more than a replica per partition: capped at the partitions
])
def test_even_spread_counts_partitions_per_member(needs: list[float], rate: float, replicas: int) -> None:
    assert sc.even_spread(len(needs), needs, rate) == replicas


def test_lag_mode_never_recommends_fewer_replicas_than_keep_up_with_producers() -> None:
    """KEDA's formula alone: 1,200 lag / 12,000 = 1 replica for 600 msg/s at 100 each; with a
    known rate Lag mode keeps the 6 that keep up (the formula's equilibrium would flap)."""
    w = [uniform(t, 24, 50, committed=25 * t, members=6) for t in range(0, 61, 15)]
    d = decide(w, current=6, mode="Lag", lag_threshold=12_000, known_rate=100.0,
               recommendations=[(-400.0, 6)], scale_down_stabilization_s=300)
    assert d.recommendation == 6 and "keep up" in d.message and d.replicas == 6
    # without a rate (one observation, nothing known), KEDA's formula decides
    d = decide(w[-1:], current=6, mode="Lag", lag_threshold=12_000, recommendations=[(-400.0, 6)])
    assert d.recommendation == 1
