"""Exactly-once effects across kill -9: 100k messages, 12 partitions, three hard kills."""
from __future__ import annotations

import random

import pytest

from afctest import ConsumerProcess, group_lag, produce_json, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.redis]
N = 100_000


def test_every_effect_exactly_once_across_three_kill9(testbed, make_topic, names, redis_client, tmp_path) -> None:
    topic = make_topic("in", partitions=12)
    produce_json(testbed.bootstrap, topic, [{"n": i, "pad": "x" * 150} for i in range(N)],
                 key_of=lambda i, d: str(i % 1000).encode())
    effects = f"{names.redis_prefix}effects"
    env = {"AFC_TEST_LIST": effects, "AFC_IDEMPOTENCY__LEASE_MS": "2000",
           "AFC_MEMBERSHIP__SESSION_TIMEOUT_MS": "10000"}

    def consumer() -> ConsumerProcess:
        return ConsumerProcess(testbed, [topic], names.group, "afc_test_handlers:append_effect",
                               tmp_path / "consumer.log", instance_id=f"{names.stem}-0", env=env,
                               redis_prefix=names.redis_prefix).start()

    rnd = random.Random()
    kills = sorted(rnd.sample(range(5_000, N - 10_000), 3))
    for at in kills:
        c = consumer()
        wait_for(lambda: redis_client.llen(effects) >= at or c._died(), 120, 0.02,
                 what=f"{at} effects before the kill")
        assert not c._died(), c.log_tail()
        c.kill9()

    c = consumer()
    try:
        wait_for(lambda: group_lag(testbed.bootstrap, topic, names.group)[1] == 0, 180, 0.5,
                 what="the group to catch up")
    finally:
        assert c.stop() == 0, c.log_tail()

    seen = [int(x.split(b":")[2]) for x in redis_client.lrange(effects, 0, -1)]
    dupes = len(seen) - len(set(seen))
    assert dupes == 0, f"{dupes} effects applied twice (kills at {kills})"
    assert set(seen) == set(range(N)), f"{N - len(set(seen))} effects missing (kills at {kills})"
    assert group_lag(testbed.bootstrap, topic, names.group) == (N, 0)
