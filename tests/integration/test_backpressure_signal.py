"""The backpressure signal end to end: real consumers (`afc-consumer run`), the adaptive
producer, the test bed's Kafka and Redis (and a private Redis for the outage test).

Timing assertions are behaviour the issue asks for ("engages within 2 s", "back to full
rate within 10 s"); they are measured by polling every 20-50 ms, so each carries that much
measurement slack, stated where it is asserted.
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time

import orjson
import pytest

from afc.runtime.backpressure import SignalKeys, read_group_sync
from afc.runtime.config import ProducerSettings
from afc.runtime.producer import AdaptiveProducer, ProducerThrottled
from afctest import ConsumerProcess, free_port, group_lag, produce_json, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.redis]

MAX_RATE = 1000.0       # "full speed" of the test's producer, msg/s
FLOOR = 10.0            # below the slow consumer's capacity: min_inflight 4 / 0.3 s = ~13 msg/s
# Lag bound while the downstream is slow: before the signal engages (<= 2 s) the producer
# may send at full rate (2 x 1000), then AIMD halves it every 200 ms (~+400 more), then the
# floor (10/s) is below what the consumer still drains (~13/s), so lag stops growing.
# 2000 + 400 + slack for commit intervals and pacing granularity.
LAG_BOUND = 3000


def consumer_env(latency_key: str, list_key: str, **extra: str) -> dict[str, str]:
    return {"AFC_TEST_LIST": list_key, "AFC_TEST_LATENCY_KEY": latency_key,
            "AFC_FLOW__TARGET_LATENCY_MS": "50", "AFC_FLOW__MIN_INFLIGHT": "4", "AFC_FLOW__MAX_INFLIGHT": "2000",
            "AFC_FLOW__WINDOW_MS": "200", "AFC_MEMBERSHIP__SESSION_TIMEOUT_MS": "6000",
            "AFC_ROUTING__ENABLED": "false", **extra}


class Sender:
    """Sends as fast as the producer lets it, from a thread; keeps every send time."""

    def __init__(self, producer: AdaptiveProducer, topic: str) -> None:
        self.p, self.topic = producer, topic
        self.sent: list[float] = []
        self.throttled = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            try:
                self.p.produce(self.topic, orjson.dumps({"n": i}), key=str(i % 997).encode())
                self.sent.append(time.monotonic())
                i += 1
            except ProducerThrottled as e:
                self.throttled += 1
                self._stop.wait(e.retry_after_s)
            except BaseException as e:  # noqa: BLE001 - the test asserts nothing reaches the caller
                self.errors.append(e)
                self._stop.wait(0.1)

    def start(self) -> "Sender":
        self.t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.t.join(10)

    def rate(self, seconds: float, end: float | None = None) -> float:
        end = time.monotonic() if end is None else end
        return sum(1 for t in self.sent[-int(MAX_RATE * seconds * 2) - 10:] if end - seconds <= t < end) / seconds


def make_producer(testbed, names, redis_url: str | None = None, **kw) -> AdaptiveProducer:
    args = dict(bootstrap_servers=testbed.bootstrap, groups=[names.group], redis_url=redis_url or testbed.redis_url,
                key_prefix=names.redis_prefix.rstrip(":"), max_rate=MAX_RATE, floor_rate=FLOOR, max_wait_s=2.0,
                decrease_factor=0.5, increase_per_s=0.25, adjust_interval_ms=200, poll_interval_ms=250)
    args.update(kw)
    return AdaptiveProducer(ProducerSettings(**args))


def member_level(r, names, member: str) -> int | None:
    raw = r.get(SignalKeys(names.redis_prefix, names.group).member(member))
    return None if raw is None else json.loads(raw)["level"]


def test_slow_handler_engages_signal_throttles_producer_bounds_lag_and_recovers(
        testbed, make_topic, names, redis_client, tmp_path) -> None:
    topic = make_topic("in", partitions=6)
    latency_key = f"{names.redis_prefix}latency"
    redis_client.set(latency_key, 1)
    member = f"{names.stem}-0"
    c = ConsumerProcess(testbed, [topic], names.group, "afc_test_handlers:append_with_latency", tmp_path / "c.log",
                        instance_id=member, redis_prefix=names.redis_prefix,
                        env=consumer_env(latency_key, f"{names.redis_prefix}effects")).start()
    prod = make_producer(testbed, names)
    sender = Sender(prod, topic)
    figures: dict[str, float] = {}
    try:
        c.wait_ready()
        wait_for(lambda: member_level(redis_client, names, member) == 0, 30, what="the member's level published")
        sender.start()
        # The precondition, waited for rather than assumed at one instant (a loaded machine can
        # make the level engage for a moment at start).
        wait_for(lambda: prod.allowed_rate == MAX_RATE and prod.level == 0 and sender.rate(3) >= 0.8 * MAX_RATE,
                 30, 0.1, what="the producer at full rate before the slowdown")
        figures["rate_before"] = sender.rate(3)

        # The downstream slows from 1 ms to 300 ms per message.
        t0 = time.monotonic()
        redis_client.set(latency_key, 300)
        wait_for(lambda: member_level(redis_client, names, member) == 1, 10, 0.02, what="the signal engaged")
        figures["engage_signal_s"] = time.monotonic() - t0
        wait_for(lambda: (prod.level or 0) > 0, 10, 0.02, what="the producer heard it")
        figures["engage_producer_s"] = engage = time.monotonic() - t0
        # Within 2 s, plus one 20 ms polling step of slack.
        assert engage <= 2.02, figures

        lags = []
        end = time.monotonic() + 12
        while time.monotonic() < end:
            lags.append(group_lag(testbed.bootstrap, topic, names.group)[1])
            time.sleep(0.5)
        figures["rate_during"] = rate_during = sender.rate(6)
        figures["allowed_during"] = prod.allowed_rate
        figures["peak_lag"] = max(lags)
        m = c.metrics()
        assert m["afc_backpressure_level"] == 1 and m["afc_inflight_messages"] <= 8, (
            m["afc_backpressure_level"], m["afc_inflight_messages"])           # local flow control holds too
        assert prod.allowed_rate == FLOOR
        assert rate_during <= 2 * FLOOR, figures                   # ~100x below full rate
        assert max(lags) <= LAG_BOUND, (figures, lags)
        half = len(lags) // 2
        assert max(lags[half:]) <= max(lags[:half]) + 50, lags     # no longer growing

        # The downstream recovers.
        t1 = time.monotonic()
        redis_client.set(latency_key, 1)
        wait_for(lambda: member_level(redis_client, names, member) == 0, 10, 0.05, what="the signal cleared")
        figures["clear_signal_s"] = time.monotonic() - t1
        wait_for(lambda: prod.allowed_rate >= MAX_RATE, 12, 0.05, what="the producer back at full rate")
        figures["full_rate_s"] = full = time.monotonic() - t1
        assert full <= 10.05, figures                              # within 10 s (+ one 50 ms poll)
        time.sleep(1.5)
        figures["rate_after"] = sender.rate(1)
        assert figures["rate_after"] >= 0.8 * MAX_RATE, figures
        sender.stop()
        wait_for(lambda: group_lag(testbed.bootstrap, topic, names.group)[1] == 0, 120, 0.5, what="drained")
    finally:
        sender.stop()
        prod.close(30)
        rc = c.stop()
        print(f"\nbackpressure figures: {json.dumps({k: round(v, 2) for k, v in figures.items()})}")
    assert rc == 0, c.log_tail()
    assert not sender.errors, sender.errors[:3]
    assert redis_client.llen(f"{names.redis_prefix}effects") == len(sender.sent)   # nothing dropped
    assert member_level(redis_client, names, member) is None       # a clean stop leaves the group at once
    log = (tmp_path / "c.log").read_text()
    assert "event=backpressure-level level=1" in log and "event=backpressure-level level=0" in log


def test_killed_saturated_consumer_stops_counting_after_its_ttl(testbed, make_topic, names, redis_client,
                                                               tmp_path) -> None:
    ttl_s = 2.0
    topic = make_topic("in", partitions=2)
    latency_key = f"{names.redis_prefix}latency"
    redis_client.set(latency_key, 300)
    member = f"{names.stem}-0"
    keys = SignalKeys(names.redis_prefix, names.group)
    # A second, healthy member (written as a consumer writes it) so the fraction shows.
    redis_client.set(keys.member("healthy"), json.dumps({"level": 0}), px=120_000)
    redis_client.zadd(keys.index, {"healthy": 0})
    c = ConsumerProcess(testbed, [topic], names.group, "afc_test_handlers:append_with_latency", tmp_path / "c.log",
                        instance_id=member, redis_prefix=names.redis_prefix,
                        env=consumer_env(latency_key, f"{names.redis_prefix}effects",
                                         AFC_BACKPRESSURE__TTL_MS=str(int(ttl_s * 1000)))).start()
    prod = make_producer(testbed, names)
    try:
        c.wait_ready()
        produce_json(testbed.bootstrap, topic, [{"n": i} for i in range(300)])
        wait_for(lambda: member_level(redis_client, names, member) == 1, 30, what="the consumer saturated")
        assert read_group_sync(redis_client, keys).level == 0.5        # 1 of 2 live members
        wait_for(lambda: prod.level == 0.5, 5, 0.05, what="the producer sees half the group saturated")
        t_kill = time.monotonic()
        c.kill9()
        assert read_group_sync(redis_client, keys).level == 0.5        # still counts: TTL not passed
        wait_for(lambda: read_group_sync(redis_client, keys).members == 1, ttl_s + 2, 0.02,
                 what="the dead member's level expired")
        gone_after = time.monotonic() - t_kill
        sig = read_group_sync(redis_client, keys)
        assert sig.level == 0.0 and sig.saturated == 0
        # The key was last written at most one heartbeat (ttl/3) before the kill.
        assert ttl_s * 2 / 3 - 0.1 <= gone_after <= ttl_s + 0.1, gone_after
        wait_for(lambda: prod.level == 0.0, 2, 0.05, what="the producer no longer throttled by the dead member")
        assert redis_client.zscore(keys.index, member) is None         # unindexed by the reader
        print(f"\nkilled member stopped counting after {gone_after:.2f}s (ttl {ttl_s}s)")
    finally:
        prod.close(5)
        if c.proc.poll() is None:
            c.stop()


def start_private_redis(port: int) -> subprocess.Popen:
    p = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                          "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, 10, what="private redis")
    return p


def stop_redis(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.terminate()
        p.wait(10)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server (Debian) not installed")
def test_signal_redis_down_producers_fall_to_floor_and_pick_the_signal_up_again(
        testbed, make_topic, names, redis_client, tmp_path) -> None:
    port = free_port()
    bp = start_private_redis(port)
    bp_url = f"redis://127.0.0.1:{port}/0"
    topic = make_topic("in", partitions=3)
    latency_key = f"{names.redis_prefix}latency"
    redis_client.set(latency_key, 1)
    member = f"{names.stem}-0"
    floor = 50.0
    c = ConsumerProcess(testbed, [topic], names.group, "afc_test_handlers:append_with_latency", tmp_path / "c.log",
                        instance_id=member, redis_prefix=names.redis_prefix,
                        env=consumer_env(latency_key, f"{names.redis_prefix}effects",
                                         AFC_BACKPRESSURE__REDIS_URL=bp_url)).start()
    prod = make_producer(testbed, names, redis_url=bp_url, max_rate=500, floor_rate=floor)
    sender = Sender(prod, topic)
    log_path = tmp_path / "c.log"
    try:
        c.wait_ready()
        sender.start()
        wait_for(lambda: c.metrics().get("afc_backpressure_signal_up") == 1, 10, what="consumer publishing")
        # The precondition, waited for rather than assumed: on a loaded machine the consumer's
        # level can engage for a moment at start, and the producer then climbs back.
        wait_for(lambda: prod.allowed_rate == 500 and sender.rate(2) >= 400, 20, 0.1,
                 what="the producer at full rate before the outage")

        stop_redis(bp)                                             # the signal path dies mid-run
        wait_for(lambda: prod.metrics.signal_up._value.get() == 0, 5, 0.05, what="producer noticed")
        assert prod.allowed_rate == floor
        time.sleep(4)
        down_rate = sender.rate(3)
        assert 0.5 * floor <= down_rate <= 1.5 * floor, down_rate   # keeps sending, at the floor
        assert not sender.errors and sender.throttled == 0
        wait_for(lambda: "event=backpressure-signal-down" in log_path.read_text(), 10, what="consumer noticed")
        m = c.metrics()
        assert c.proc.poll() is None and c.http("/healthz")[0] == 200
        assert m["afc_backpressure_signal_up"] == 0 and m["afc_backpressure_publish_errors_total"] >= 1
        handled = m["afc_messages_handled_total"]
        wait_for(lambda: c.metrics()["afc_messages_handled_total"] > handled, 10, what="consumer still consuming")
        assert prod.signal_age() >= 3

        bp = start_private_redis(port)                             # back (empty: no state needed)
        t_back = time.monotonic()
        wait_for(lambda: prod.metrics.signal_up._value.get() == 1, 5, 0.05, what="producer reconnected")
        wait_for(lambda: c.metrics().get("afc_backpressure_signal_up") == 1, 10, what="consumer republished")
        wait_for(lambda: prod.allowed_rate >= 500, 10, 0.05, what="producer back to max rate")
        back_s = time.monotonic() - t_back
        # And the signal itself flows again through the restarted Redis.
        redis_client.set(latency_key, 300)
        t0 = time.monotonic()
        wait_for(lambda: (prod.level or 0) > 0, 5, 0.02, what="the signal engaged again")
        engage_again = time.monotonic() - t0
        redis_client.set(latency_key, 1)
        print(f"\nredis outage: floor send rate {down_rate:.1f}/s; max rate {back_s:.2f}s after Redis returned; "
              f"re-engaged in {engage_again:.2f}s")
    finally:
        sender.stop()
        prod.close(30)
        rc = c.stop()
        stop_redis(bp)
    assert rc == 0, c.log_tail()
    assert not sender.errors, sender.errors[:3]
    log = log_path.read_text()
    assert "event=backpressure-signal-back" in log and "Traceback" not in log
