import json

import pytest

from afc.runtime.config import ConfigError, load_settings
from afc.runtime.errors import DecodeError
from afc.runtime.message import Message, decode_json, decode_text, idempotency_key
from afc.runtime.routing import backoff_s


def msg(headers=None, payload=None, offset=7) -> Message:
    return Message("orders", 3, offset, b"k", b"{}", headers, 0, payload)


def test_idempotency_key_prefers_header_then_field_then_position() -> None:
    assert idempotency_key(msg([("idempotency-key", b"abc")], {"id": 1}), "idempotency-key", "id") == "abc"
    assert idempotency_key(msg(None, {"order": {"id": 42}}), "idempotency-key", "order.id") == "42"
    assert idempotency_key(msg(None, {"order": {}}), "idempotency-key", "order.id") == "orders/3/7"
    assert idempotency_key(msg([("idempotency-key", b"")], None), "idempotency-key", None) == "orders/3/7"


def test_idempotency_keys_are_exact_for_any_bytes() -> None:
    """Issue 9 item 8: binary header values decoded with errors="replace" collided."""
    def key(v: bytes) -> str:
        return idempotency_key(msg([("idempotency-key", v)]), "idempotency-key", None)
    values = [b"\xff\x01", b"\xfe\x01", b"a\x00b", b"a\x00c", b"~abc", b"abc", "é".encode(), b"\xe9"]
    keys = [key(v) for v in values]
    assert len(set(keys)) == len(values), keys               # no two byte strings share a key
    assert all("\x00" not in k for k in keys)                 # NUL is the store's separator
    assert key(b"order-1") == "order-1" and key("é".encode()) == "é"   # readable when it can be


def test_payload_field_keys_are_the_same_exact_keys_as_header_bytes() -> None:
    """The payload field's fast path (a plain ASCII string is its own key) must give what the
    header path gives for the same bytes, and escape what it would escape."""
    def by_field(v: object) -> str:
        return idempotency_key(msg(None, {"id": v}), "idempotency-key", "id")

    def by_header(v: bytes) -> str:
        return idempotency_key(msg([("idempotency-key", v)]), "idempotency-key", None)
    for v in ["order-1", "~abc", "a\x00b", "é", "\ud800x"]:
        raw = v.encode("utf-8", "surrogatepass")
        assert by_field(v) == by_header(raw) or (v == "\ud800x" and by_field(v).startswith("~")), v
    assert by_field(42) == "42"


def test_position_keys_name_the_topic_by_id() -> None:
    """Issue 9 item 8: a re-created topic (same name, new id) must not find its old done marks."""
    m = msg(None, None)
    assert idempotency_key(m, "idempotency-key", None, "id-1") == "@id-1/3/7"
    assert idempotency_key(m, "idempotency-key", None, "id-2") != idempotency_key(m, "idempotency-key", None, "id-1")


def test_decoders_raise_decode_error() -> None:
    assert decode_json(b'{"a": 1}') == {"a": 1}
    assert decode_json(None) is None
    for bad in (b"{not json", b"", b"\xff\xfe"):
        with pytest.raises(DecodeError):
            decode_json(bad)
    with pytest.raises(DecodeError):
        decode_text(b"\xff")


def test_the_payload_is_decoded_at_its_first_read_only() -> None:
    """Issue 13: lazy decode. A handler that never reads `payload` costs no decoding; a read
    decodes once; an undecodable payload raises DecodeError at the read and `decode_error`
    says why without raising."""
    calls: list[bytes | None] = []

    def counting(v: bytes | None) -> object:
        calls.append(v)
        return decode_json(v)
    good = Message("t", 0, 1, None, b'{"a": 1}', None, 0, decoder=counting)
    assert calls == [] and good.value == b'{"a": 1}'
    assert good.payload == {"a": 1} and good.payload == {"a": 1} and good.decode_error is None
    assert calls == [b'{"a": 1}']                             # decoded once
    bad = Message("t", 0, 2, None, b"{not json", None, 0, decoder=counting)
    assert bad.decode_error is not None and isinstance(bad.decode_error, DecodeError)
    with pytest.raises(DecodeError) as e:
        bad.payload
    assert e.value is bad.decode_error                        # the same error: the runtime routes it as poison
    assert len(calls) == 2                                    # not decoded again
    # the payload field key needs the payload: decoded then, and only for that
    keyed = Message("t", 0, 3, None, b'{"id": "o-1"}', None, 0, decoder=counting)
    assert idempotency_key(keyed, "idempotency-key", "id") == "o-1" and len(calls) == 3
    headed = Message("t", 0, 4, None, b'{"id": "o-2"}', [("idempotency-key", b"h")], 0, decoder=counting)
    assert idempotency_key(headed, "idempotency-key", "id") == "h" and len(calls) == 3


def test_settings_from_env_and_file(tmp_path, monkeypatch) -> None:
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"kafka": {"topics": ["a"], "groupId": "g1"}, "flow": {"maxInflight": 50}}))
    monkeypatch.setenv("AFC_CONFIG_FILE", str(f))
    monkeypatch.setenv("AFC_KAFKA__GROUP_ID", "from-env")
    monkeypatch.setenv("AFC_IDEMPOTENCY__REDIS_URL", "redis://:secret@r:6379/0")
    s = load_settings()
    assert s.kafka.topics == ["a"] and s.kafka.group_id == "from-env" and s.flow.max_inflight == 50
    assert s.flow.start_inflight == 50
    doc = json.dumps(s.to_file_json())
    assert "secret" not in doc and "redisUrl" not in doc and "maxInflight" in doc


@pytest.mark.parametrize("bad, field", [
    ({"flow": {"minInflight": 10, "maxInflight": 5}}, "flow.minInflight (AFC_FLOW__MIN_INFLIGHT)"),
    ({"backpressure": {"ttlMs": 3000, "heartbeatMs": 3000}}, "backpressure.heartbeatMs"),
    ({"membership": {"sessionTimeoutMs": 1000}}, "membership.sessionTimeoutMs"),
    ({"handler": {"handler": "not a path"}}, "handler.handler"),
    ({"kafka": {"topics": ["bad topic!"]}}, "kafka.topics"),
    ({"membership": {"sessionTimeoutMs": -1}}, "membership.sessionTimeoutMs"),
    ({"idempotency": {"leaseMs": 0}}, "idempotency.leaseMs"),
    ({"kafka": {"nope": 1}}, "kafka.nope"),
])
def test_invalid_settings_name_the_field(bad, field) -> None:
    with pytest.raises(ConfigError) as e:
        load_settings(**bad)
    assert field in str(e.value)


def test_extra_from_the_environment_is_checked_like_the_file(monkeypatch) -> None:
    """AFC_KAFKA__EXTRA is how the standalone runtime is tuned; what afc owns is refused there
    too, naming the variable and the property, and tuning passes."""
    monkeypatch.setenv("AFC_KAFKA__EXTRA", json.dumps({"enable.auto.commit": "true", "fetch.wait.max.ms": "50"}))
    with pytest.raises(ConfigError) as e:
        load_settings()
    assert "kafka.extra (AFC_KAFKA__EXTRA): enable.auto.commit: not allowed" in str(e.value)
    monkeypatch.setenv("AFC_KAFKA__EXTRA", json.dumps({"fetch.wait.max.ms": "50",
                                                       "partition.assignment.strategy": "range"}))
    assert load_settings().kafka.extra["partition.assignment.strategy"] == "range"
    monkeypatch.setenv("AFC_MEMBERSHIP__GROUP_PROTOCOL", "consumer")
    with pytest.raises(ConfigError, match="needs membership.groupProtocol classic"):
        load_settings()


def test_not_runnable_without_topics_or_handler() -> None:
    with pytest.raises(ConfigError, match="kafka.topics"):
        load_settings().require_runnable()


def test_backoff_is_exponential_capped_and_jittered() -> None:
    import random
    r = random.Random(1)
    assert [backoff_s(a, 0.1, 1.0, jitter=0) for a in (1, 2, 3, 4, 5, 6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    vals = {round(backoff_s(3, 0.1, 10, jitter=0.2, rnd=r), 4) for _ in range(50)}
    assert len(vals) > 10 and all(0.32 <= v <= 0.48 for v in vals)


def test_the_key_deriver_gives_exactly_idempotency_keys_answer() -> None:
    """The inlined common case (JSON, a top-level string field, no header) and its
    fallbacks must never differ from `idempotency_key`, and must keep the decoded payload."""
    from afc.runtime.message import DECODERS, UNREAD, key_deriver
    values = [b'{"id": "o-1"}', b'{"id": 42}', b'{"id": ""}', b'{"id": null}', b'{"id": "~x"}',
              b'{"id": "a\\u0000b"}', b'{"id": "\xc3\xa9t\xc3\xa9"}', b'{"id": "\\ud800"}', b'{"other": 1}',
              b'[1, 2]', b'"id"', b"not json", b"", None, b'{"order": {"id": "n-1"}}', b'{"id": {"x": 1}}']
    headers = [None, [("idempotency-key", b"h-1")], [("traceparent", b"00-1")], [("idempotency-key", b"")]]
    for decoder in ("json", "text", "raw"):
        for field in ("id", "order.id", None):
            derive = key_deriver(DECODERS[decoder], "idempotency-key", field)
            for v in values:
                for h in headers:
                    for topic_id in (None, "tid"):
                        a = Message("orders", 3, 7, b"k", v, h, 0, UNREAD, None, "", DECODERS[decoder])
                        b = Message("orders", 3, 7, b"k", v, h, 0, UNREAD, None, "", DECODERS[decoder])
                        want = idempotency_key(a, "idempotency-key", field, topic_id)
                        assert derive(b, topic_id) == want, (decoder, field, v, h)
                        assert (b.decode_error is None) == (a.decode_error is None)
                        if a.decode_error is None:
                            assert b.payload == a.payload


def test_the_event_loop_setting_picks_the_loop_and_falls_back_without_uvloop(monkeypatch, caplog) -> None:
    """handler.eventLoop: uvloop by default, asyncio's own when asked, and asyncio's own with a
    warning where uvloop cannot be imported (never a crash at start)."""
    import asyncio
    import sys

    from afc.runtime.eventloop import loop_factory, loop_name
    assert load_settings().handler.event_loop == "uvloop"
    with pytest.raises(ConfigError):
        load_settings(handler={"eventLoop": "trio"})
    make = loop_factory("uvloop")
    with asyncio.Runner(loop_factory=make) as r:
        assert type(r.get_loop()).__module__.split(".")[0] == "uvloop" == loop_name(r.get_loop())
    assert loop_factory("asyncio") is None
    with asyncio.Runner(loop_factory=loop_factory("asyncio")) as r:
        assert type(r.get_loop()).__module__.split(".")[0] == "asyncio" == loop_name(r.get_loop())
    monkeypatch.setitem(sys.modules, "uvloop", None)          # import uvloop -> ImportError
    with caplog.at_level("WARNING", logger="afc.runtime.eventloop"):
        assert loop_factory("uvloop") is None
    assert "event=event-loop-fallback" in caplog.text
