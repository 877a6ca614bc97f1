"""Issue 11 (found by the rollout harness): under an eager assignor a rebalance revokes every
partition and hands some of them straight back. A pause the loop computed for a partition
while its revoke waited for in-flight work used to reach librdkafka after the same partition
was assigned again; the loop no longer counted it paused, so it never resumed it, and the
partition was never consumed again (lag stuck, found in `make bench-rollout`, eager N=4)."""
from __future__ import annotations

import json

import pytest

from afctest import ConsumerProcess, group_lag, produce_json, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.redis]


def test_a_partition_paused_when_revoked_and_handed_back_is_consumed_again(testbed, make_topic, names,
                                                                          redis_client, tmp_path) -> None:
    """A (static id ...-a, so `range` hands it partition 0 again) has partition 0 paused when
    B joins: its first record runs 6 s and the 150 behind it fill the window (maxWindow 100).
    librdkafka keeps that pause through the eager revoke and the new assignment, while the
    loop starts the new assignment unpaused. Partition 0 must be consumed again: every record,
    once."""
    topic = make_topic("in", partitions=2)
    runs = f"{names.redis_prefix}runs"
    env = {"AFC_TEST_HASH": runs, "AFC_ROUTING__ENABLED": "false", "AFC_OFFSETS__MAX_WINDOW": "100",
           "AFC_KAFKA__EXTRA": json.dumps({"partition.assignment.strategy": "range"})}

    def member(name: str) -> ConsumerProcess:
        return ConsumerProcess(testbed, [topic], names.group, "afc_test_handlers:sleep_and_record",
                               tmp_path / f"{name}.log", instance_id=f"{names.stem}-{name}", env=env,
                               redis_prefix=names.redis_prefix)
    a, b = member("a"), member("b")
    try:
        a.start().wait_ready()
        produce_json(testbed.bootstrap, topic, [{"n": 0, "sleep_ms": 6000}] + [{"n": i} for i in range(1, 151)],
                     partition_of=lambda i, d: 0)
        wait_for(lambda: a.metrics().get("afc_paused_partitions", 0) >= 1, 20, what="partition 0 paused (window full)")
        b.start().wait_ready(60)
        wait_for(lambda: a.http("/readyz")[0] == 200 and "event=revoked" in a.log_path.read_text(), 30,
                 what="A's revoke answered and A assigned again")
        produce_json(testbed.bootstrap, topic, [{"n": i} for i in range(151, 191)], partition_of=lambda i, d: i % 2)
        lag = wait_for(lambda: (x := group_lag(testbed.bootstrap, topic, names.group))[1] == 0 and x, 30,
                       interval=0.5, what="every record committed (lag 0)")
        handled = redis_client.hgetall(runs)
    finally:
        for c in (a, b):
            c.stop(30)
    assert lag == (191, 0)
    assert len(handled) == 191 and all(int(v) == 1 for v in handled.values()), handled
