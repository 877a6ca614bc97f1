"""The producer's pure parts: token bucket, AIMD, size check, headers; and the fail-open
path with an unreachable Redis (no broker needed: nothing is sent)."""
from __future__ import annotations

import asyncio
import socket

import pytest

from afc.runtime.config import ProducerSettings
from afc.runtime.producer import (AdaptiveProducer, AimdRate, AsyncAdaptiveProducer, MessageTooLarge,
                                  ProducerThrottled, TokenBucket, message_size)


def test_bucket_gives_the_burst_then_paces_at_the_rate() -> None:
    b = TokenBucket(100, 0.1, now=0.0)          # 10 tokens deep
    waits = [b.reserve(0.0, 1.0) for _ in range(12)]
    assert all(ok and w == 0 for ok, w in waits[:10])
    assert waits[10] == (True, pytest.approx(0.01)) and waits[11] == (True, pytest.approx(0.02))
    ok, w = b.reserve(1.0, 1.0)                 # refilled (capped at the depth)
    assert ok and w == 0 and b.tokens == pytest.approx(9.0 - 0.0, abs=1.0)


def test_bucket_refuses_past_max_wait_without_booking() -> None:
    b = TokenBucket(10, 0.1, now=0.0)           # depth 1
    assert b.reserve(0.0, 0.05) == (True, 0.0)
    ok, retry = b.reserve(0.0, 0.05)            # next token in 0.1 s > 0.05
    assert not ok and retry == pytest.approx(0.1)
    assert b.tokens == pytest.approx(0.0)       # nothing booked
    ok, w = b.reserve(0.0, 0.5)
    assert ok and w == pytest.approx(0.1)


def test_bucket_rate_change_keeps_tokens_within_the_new_depth() -> None:
    b = TokenBucket(1000, 0.1, now=0.0)
    b.set_rate(10, now=0.0)
    assert b.tokens == 1.0 and b.capacity == 1.0


def test_aimd_cuts_in_proportion_to_the_level_and_never_below_the_floor() -> None:
    a = AimdRate(max_rate=1000, floor_rate=10, decrease_factor=0.5, increase_per_s=0.25)
    assert a.adjust(1.0, 0.2) == 500
    assert a.adjust(0.5, 0.2) == 375            # 500 * (1 - 0.5 * 0.5)
    for _ in range(50):
        a.adjust(1.0, 0.2)
    assert a.rate == 10


def test_aimd_cuts_from_the_rate_actually_used() -> None:
    a = AimdRate(max_rate=10_000, floor_rate=10, decrease_factor=0.5, increase_per_s=0.25)
    assert a.adjust(1.0, 0.2, used_rate=800) == 400
    assert a.adjust(1.0, 0.2, used_rate=1) == 10    # used less than the floor: the floor


def test_aimd_recovers_gradually_to_max() -> None:
    a = AimdRate(max_rate=1000, floor_rate=10, decrease_factor=0.5, increase_per_s=0.25)
    a.rate = 10
    steps = 0
    while a.rate < 1000:
        a.adjust(0.0, 0.2)
        steps += 1
    assert steps == 20                          # 4 s at 0.25 of max per second: gradual, bounded


def test_aimd_unknown_signal_is_the_floor() -> None:
    a = AimdRate(max_rate=1000, floor_rate=25, decrease_factor=0.5, increase_per_s=0.25)
    assert a.adjust(None, 0.2) == 25
    assert a.adjust(0.0, 1.0) == 275            # and climbs back once the signal returns


def test_message_size_counts_key_value_and_headers() -> None:
    assert message_size(b"k", b"vv", [("h", b"123")]) == 1 + 2 + 1 + 3


def test_settings_bounds() -> None:
    with pytest.raises(ValueError, match="floorRate"):
        ProducerSettings(max_rate=10, floor_rate=20)
    s = ProducerSettings.model_validate({"maxMessageBytes": 10, "groups": ["g"]})
    assert s.max_message_bytes == 10 and s.groups == ["g"]


def dead_redis_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"        # nothing listens: connection refused


@pytest.fixture
def producer() -> AdaptiveProducer:
    # No broker needed: these tests never get past the checks (and close() flushes nothing).
    p = AdaptiveProducer(ProducerSettings(bootstrap_servers="127.0.0.1:1", groups=["g"], redis_url=dead_redis_url(),
                                          max_message_bytes=1000, max_rate=1000, floor_rate=5, max_wait_s=0.0,
                                          burst_s=0.1))
    yield p
    p.close(0)


def test_oversized_message_is_refused_before_sending(producer: AdaptiveProducer) -> None:
    with pytest.raises(MessageTooLarge, match="exceeds the maximum of 1000 bytes") as e:
        producer.produce("t", b"x" * 1000)
    assert e.value.size > 1000
    assert producer.metrics.too_large._value.get() == 1
    assert producer.metrics.sent._value.get() == 0


def test_unreachable_redis_fails_open_at_the_floor_with_a_metric(producer: AdaptiveProducer) -> None:
    assert producer.level is None and producer.allowed_rate == 5
    assert producer.metrics.signal_up._value.get() == 0
    assert producer.metrics.signal_errors._value.get() >= 1
    assert producer.metrics.throttle_ratio._value.get() == pytest.approx(0.995)


def test_past_max_wait_raises_throttled_with_retry_after(producer: AdaptiveProducer) -> None:
    producer.produce("t", b"a")                 # the one token of the floor's bucket
    with pytest.raises(ProducerThrottled) as e:
        producer.produce("t", b"b")
    assert 0 < e.value.retry_after_s <= 0.2 and e.value.reason == "backpressure"
    assert producer.metrics.throttled._value.get() == 1


def test_idempotency_header_is_added_uuid_or_callers(producer: AdaptiveProducer) -> None:
    _, _, hs, key = producer.prepare(b"v", None, {"x": "1"}, None)
    assert len(key) == 32 and hs == [("x", b"1"), ("idempotency-key", key.encode())]
    _, _, hs, key = producer.prepare("v", "k", None, "order-42")
    assert key == "order-42" and hs == [("idempotency-key", b"order-42")]


def test_callers_idempotency_header_is_kept_not_overwritten(producer: AdaptiveProducer) -> None:
    """Issue 9 item 9: a caller-supplied `idempotency-key` header was replaced by a uuid4, so a
    producer-side retry of the same logical message was never deduplicated."""
    for headers in ({"x": "1", "idempotency-key": "order-7"}, [("x", b"1"), ("idempotency-key", b"order-7")]):
        _, _, hs, key = producer.prepare(b"v", None, headers, None)
        assert key == "order-7"
        assert hs == [("x", b"1"), ("idempotency-key", b"order-7")]     # unchanged, in place, once
    # Sent twice (a retry after a lost acknowledgement): the same key both times.
    first = producer.prepare(b"v", None, {"idempotency-key": "order-8"}, None)
    again = producer.prepare(b"v", None, {"idempotency-key": "order-8"}, None)
    assert first[2] == again[2] and first[3] == again[3] == "order-8"


def test_binary_idempotency_header_is_kept_byte_for_byte(producer: AdaptiveProducer) -> None:
    _, _, hs, key = producer.prepare(b"v", None, [("idempotency-key", b"\xff\x01")], None)
    assert hs == [("idempotency-key", b"\xff\x01")]
    assert key.encode("utf-8", "surrogateescape") == b"\xff\x01"


def test_empty_idempotency_header_gets_a_uuid(producer: AdaptiveProducer) -> None:
    """An empty header is ignored by the consumers (they fall back to the position), so it counts as none."""
    _, _, hs, key = producer.prepare(b"v", None, [("idempotency-key", b""), ("y", b"2")], None)
    assert len(key) == 32 and hs == [("y", b"2"), ("idempotency-key", key.encode())]


def test_explicit_idempotency_key_argument_wins_over_a_header(producer: AdaptiveProducer) -> None:
    _, _, hs, key = producer.prepare(b"v", None, {"idempotency-key": "old", "x": "1"}, "new")
    assert key == "new" and hs == [("x", b"1"), ("idempotency-key", b"new")]


def test_async_producer_keeps_the_callers_header() -> None:
    p = AsyncAdaptiveProducer(ProducerSettings(bootstrap_servers="127.0.0.1:1"))
    try:
        _, _, hs, key = p.sync.prepare(b"v", None, {"idempotency-key": "a-1"}, None)
        assert key == "a-1" and hs == [("idempotency-key", b"a-1")]
    finally:
        p.sync.close(0)


def test_async_producer_checks_size_and_throttles() -> None:
    async def main() -> None:
        p = AsyncAdaptiveProducer(ProducerSettings(bootstrap_servers="127.0.0.1:1", max_message_bytes=100,
                                                   max_rate=1, floor_rate=1, max_wait_s=0.0))
        try:
            with pytest.raises(MessageTooLarge):
                await p.send("t", b"x" * 200)
            await p.send("t", b"a")
            with pytest.raises(ProducerThrottled):
                await p.send("t", b"b")
        finally:
            await p.close(0)
    asyncio.run(main())
