"""Issue 9 items 8 and 9: idempotency keys that collide (binary header values, a topic
recreated under the same name) lose messages; keys the producer overwrote never dedupe."""
from __future__ import annotations

import time

import pytest

from afctest import ConsumerProcess, group_lag, produce_json, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.redis]


def consumer(testbed, names, tmp_path, topic, dynamic: bool = False) -> ConsumerProcess:
    return ConsumerProcess(testbed, [topic], names.group, "afc_test_handlers:count_by_id", tmp_path / "c.log",
                           instance_id=None if dynamic else f"{names.stem}-0", redis_prefix=names.redis_prefix,
                           env={"AFC_TEST_HASH": f"{names.redis_prefix}runs"})


def runs(redis_client, names) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in redis_client.hgetall(f"{names.redis_prefix}runs").items()}


def consume_all(testbed, names, tmp_path, topic, n: int, dynamic: bool = False) -> None:
    c = consumer(testbed, names, tmp_path, topic, dynamic).start()
    try:
        wait_for(lambda: group_lag(testbed.bootstrap, topic, names.group) == (n, 0) or c.proc.poll() is not None,
                 60, 0.3, what=f"{n} records committed")
    finally:
        assert c.stop() == 0, c.log_tail()


def test_distinct_binary_idempotency_keys_never_collide(testbed, make_topic, names, redis_client, tmp_path) -> None:
    """Item 8 (key collisions lose messages): header keys were decoded with errors="replace",
    so b"\\xff\\x01" and b"\\xfe\\x01" (and the UTF-8 of U+FFFD followed by \\x01) became one key
    and all but the first were skipped as done. Each distinct value must be handled."""
    keys = [b"\xff\x01", b"\xfe\x01", "\ufffd\x01".encode(), b"\xff\x02", b"\xfe\x02", b"\x80", b"\x81"]
    topic = make_topic("in", partitions=1)
    produce_json(testbed.bootstrap, topic, [{"n": i} for i in range(len(keys))],
                 headers_of=lambda i, d: [("idempotency-key", keys[i])])
    consume_all(testbed, names, tmp_path, topic, len(keys))
    got = runs(redis_client, names)
    missing = [keys[i] for i in range(len(keys)) if str(i) not in got]
    assert not missing, f"records with these distinct keys were skipped as duplicates: {missing}"
    assert set(got.values()) == {1}


def test_topic_recreated_with_the_same_name_is_not_skipped_as_done(testbed, make_topic, kafka_admin, names,
                                                                  redis_client, tmp_path) -> None:
    """Item 8 (position keys omit topic identity): records without an idempotency-key header
    are keyed by topic/partition/offset; a topic deleted and recreated with the same name
    within doneTtlS restarts at offset 0, and its new records were skipped as already done.
    The group's offsets are deleted in between, so only the runtime's keys can skip them."""
    from confluent_kafka.admin import NewTopic
    topic = make_topic("in", partitions=1)
    produce_json(testbed.bootstrap, topic, [{"n": i} for i in range(20)])
    consume_all(testbed, names, tmp_path, topic, 20, dynamic=True)       # dynamic: it leaves the group on close
    assert len(runs(redis_client, names)) == 20

    kafka_admin.delete_topics([topic], operation_timeout=30)[topic].result(timeout=30)
    kafka_admin.delete_consumer_groups([names.group], request_timeout=30)[names.group].result(timeout=30)
    deadline = time.monotonic() + 60
    while True:                         # the name is free once the broker has finished the deletion
        try:
            kafka_admin.create_topics([NewTopic(topic, 1, 1)], operation_timeout=30)[topic].result(timeout=30)
            break
        except Exception:  # noqa: BLE001 - TOPIC_ALREADY_EXISTS while the deletion completes
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    wait_for(lambda: group_lag(testbed.bootstrap, topic, names.group) == (0, 0), 30, 0.5, what="an empty new topic")
    produce_json(testbed.bootstrap, topic, [{"n": 100 + i} for i in range(20)])
    consume_all(testbed, names, tmp_path, topic, 20, dynamic=True)
    got = runs(redis_client, names)
    skipped = [100 + i for i in range(20) if str(100 + i) not in got]
    assert not skipped, f"{len(skipped)} of 20 records of the recreated topic were skipped as done: {skipped}"


def test_producer_retry_with_the_callers_key_is_handled_once(testbed, make_topic, names, redis_client,
                                                            tmp_path) -> None:
    """Item 9 (the producer overwrote the caller's idempotency-key header with a uuid4): the
    same logical message sent twice by AdaptiveProducer with the caller's own header (a retry
    after a lost acknowledgement) must be handled once."""
    from afc.runtime.config import ProducerSettings
    from afc.runtime.producer import AdaptiveProducer
    topic = make_topic("in", partitions=1)
    with AdaptiveProducer(ProducerSettings(bootstrap_servers=testbed.bootstrap)) as p:
        keys = [p.produce(topic, b'{"n": 7}', headers={"idempotency-key": "order-7"}) for _ in range(2)]
        p.produce(topic, b'{"n": 8}')                                    # no header: a fresh uuid4
        assert p.flush(30) == 0
    assert keys == ["order-7", "order-7"]
    consume_all(testbed, names, tmp_path, topic, 3)
    assert runs(redis_client, names) == {"7": 1, "8": 1}
