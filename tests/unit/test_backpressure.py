"""The signal's pure parts: pressure, the member level's hysteresis, the group rule, parsing."""
from __future__ import annotations

import json

import pytest

from afc.runtime.backpressure import (LevelInputs, LevelRule, SaturationTracker, SignalKeys, group_level,
                                      parse_members, pressure)
from afc.runtime.config import BackpressureSettings, ConfigError, load_settings

RULE = LevelRule(target_latency_ms=50, max_error_rate=0.2, paused_share=0.5, clear_ratio=0.7, clear_after_s=1.0)


def win(latency_ms: float = 1.0, completed: int = 100, errors: float = 0.0, overloaded: bool = False,
        at_floor: bool = False, paused: int = 0, assigned: int = 12, outstanding: int = 10) -> LevelInputs:
    return LevelInputs(completed, latency_ms, errors, overloaded, at_floor, paused, assigned, outstanding)


def test_pressure_is_the_worst_ratio_of_latency_and_errors() -> None:
    assert pressure(win(25), RULE) == pytest.approx(0.5)
    assert pressure(win(25, errors=0.3), RULE) == pytest.approx(1.5)
    assert pressure(win(300), RULE) == pytest.approx(6.0)


def test_floor_with_paused_partitions_counts_as_saturated() -> None:
    assert pressure(win(1, at_floor=True, paused=6), RULE) == 1.0
    assert pressure(win(1, at_floor=True, paused=5), RULE) == pytest.approx(0.02)    # below the share
    assert pressure(win(1, at_floor=False, paused=12), RULE) == pytest.approx(0.02)  # paused but not at floor


def test_a_window_without_completions_says_nothing_unless_idle() -> None:
    assert pressure(win(completed=0, outstanding=4), RULE) is None        # stuck handler: keep the level
    assert pressure(win(completed=0, outstanding=0), RULE) == 0.0         # idle: nothing waits
    assert pressure(win(completed=0, outstanding=4, at_floor=True, paused=12), RULE) == 1.0


def test_zero_error_bound_means_any_error_saturates() -> None:
    rule = LevelRule(target_latency_ms=50, max_error_rate=0.0)
    assert pressure(win(1, errors=0.01), rule) == 1.0


def test_engages_at_once_on_the_controllers_overload_verdict() -> None:
    t = SaturationTracker(RULE)
    assert not t.update(win(10), 0.0) and t.level == 0
    # the controller's verdict (the one should_pause pauses on) engages even below the ratio
    assert t.update(win(10, overloaded=True), 0.25) and t.level == 1
    t2 = SaturationTracker(RULE)
    assert t2.update(win(300), 0.0) and t2.level == 1


def test_clears_only_after_calm_lasts_clear_after() -> None:
    t = SaturationTracker(RULE)
    t.update(win(300, overloaded=True), 0.0)
    assert not t.update(win(1), 0.25)           # calm starts
    assert not t.update(win(1), 1.0)
    assert t.update(win(1), 1.25) and t.level == 0


def test_does_not_clear_while_the_loop_holds_partitions_paused() -> None:
    """Fast again only because a backlog is held back: producers must not refill it yet."""
    t = SaturationTracker(RULE)
    t.update(win(300, overloaded=True), 0.0)
    for i in range(1, 12):
        t.update(win(1, paused=12), i * 0.25)
    assert t.level == 1
    t.update(win(1, paused=0), 3.0)
    assert t.update(win(1, paused=5), 4.0) and t.level == 0     # below the paused share counts as resumed


def test_pressure_between_clear_ratio_and_one_holds_and_restarts_the_clock() -> None:
    t = SaturationTracker(RULE)
    t.update(win(300, overloaded=True), 0.0)
    t.update(win(1), 0.25)
    t.update(win(45), 0.5)                      # 0.9 of target: not calm, clock restarts
    assert t.level == 1
    t.update(win(1), 1.0)
    assert not t.update(win(1), 1.75) and t.level == 1
    assert t.update(win(1), 2.0) and t.level == 0


def test_does_not_flap_around_the_target() -> None:
    """Latency oscillating around the target: one engage, no clear in between."""
    t = SaturationTracker(RULE)
    changes = sum(t.update(win(55 if i % 2 else 45, overloaded=bool(i % 2)), i * 0.25) for i in range(40))
    assert changes == 1 and t.level == 1


def test_windows_without_completions_keep_the_level_and_the_stale_verdict_is_ignored() -> None:
    t = SaturationTracker(RULE)
    t.update(win(300, overloaded=True), 0.0)
    for i in range(1, 20):                     # handler stuck: no completions, work in flight
        t.update(win(completed=0, outstanding=4, overloaded=True), i * 0.25)
    assert t.level == 1
    for i in range(20, 30):                    # then idle: nothing in flight (overloaded is stale)
        t.update(win(completed=0, outstanding=0, overloaded=True), i * 0.25)
    assert t.level == 0


def test_group_level_is_the_fraction_of_saturated_live_members() -> None:
    assert group_level([]) == 0.0
    assert group_level([0, 0, 0, 1]) == 0.25
    assert group_level([1, 1]) == 1.0
    assert group_level([0.0]) == 0.0


def test_parse_members_drops_expired_and_tolerates_garbage() -> None:
    vals = [json.dumps({"level": 1}).encode(), None, b"not json", json.dumps({"level": 0})]
    sig, gone = parse_members(["a", "b", "c", "d"], vals)
    assert gone == ["b"]
    assert sig.members == 3 and sig.saturated == 1 and sig.level == pytest.approx(1 / 3)


def test_keys_are_namespaced_by_prefix_and_group() -> None:
    k = SignalKeys("afc:", "orders")
    assert k.member("pod-0") == "afc:bp:orders:pod-0"
    assert k.channel == "afc:bp:orders" and k.index == "afc:bpm:orders"


def test_settings_section_defaults_env_and_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    b = BackpressureSettings()
    assert b.enabled and b.ttl_ms == 3000 and b.resolved_heartbeat_ms == 1000
    monkeypatch.setenv("AFC_BACKPRESSURE__TTL_MS", "1500")
    monkeypatch.setenv("AFC_BACKPRESSURE__REDIS_URL", "redis://x:1/0")
    s = load_settings()
    assert s.backpressure.ttl_ms == 1500 and s.backpressure.resolved_heartbeat_ms == 500
    assert "redisUrl" not in s.to_file_json()["backpressure"]     # a secret, never in the file
    with pytest.raises(ConfigError, match="heartbeatMs"):
        load_settings(backpressure={"ttlMs": 1000, "heartbeatMs": 1000})
    assert load_settings(backpressure={"clearRatio": 0.5}).backpressure.clear_ratio == 0.5
