"""Every member gets its share of the source topic, not just a count of partitions.

Each member subscribes to its topics and their .retry topics. An assignor that balances the
total count (cooperative-sticky, KIP-848's `uniform`) can leave a member only retry
partitions, which are idle: with 4 members joining one after another (a StatefulSet does),
that was seen with both, and a scale-up then adds a member that consumes nothing. afc runs
KIP-848 groups with the broker's `range` assignor, which balances each topic on its own."""
from __future__ import annotations

from pathlib import Path

import pytest

from afctest import ConsumerProcess, Testbed, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.redis]


def source_partitions(testbed: Testbed, group: str, topic: str) -> dict[str, list[int]]:
    from confluent_kafka.admin import AdminClient
    a = AdminClient({"bootstrap.servers": testbed.bootstrap})
    (desc,) = [f.result(10) for f in a.describe_consumer_groups([group], request_timeout=10).values()]
    return {m.group_instance_id: sorted(tp.partition for tp in m.assignment.topic_partitions if tp.topic == topic)
            for m in desc.members}


def test_kip848_members_joining_one_by_one_each_hold_their_share_of_the_source(
        testbed: Testbed, make_topic, names, tmp_path: Path) -> None:
    topic = make_topic("orders", partitions=8)
    env = {"AFC_MEMBERSHIP__GROUP_PROTOCOL": "consumer", "AFC_SHUTDOWN__DRAIN_TIMEOUT_S": "5"}
    members = []
    try:
        for i in range(4):
            c = ConsumerProcess(testbed, [topic], names.group, "afc.runtime.handlers:noop", tmp_path / f"m{i}.log",
                                instance_id=f"{names.stem}-{i}", env=env, redis_prefix=names.redis_prefix).start()
            members.append(c)
            c.wait_ready(90)
        want = {f"{names.stem}-{i}" for i in range(4)}
        got = wait_for(lambda: (a := source_partitions(testbed, names.group, topic)) and set(a) == want
                       and sum(map(len, a.values())) == 8 and all(len(v) == 2 for v in a.values()) and a,
                       60, what="4 members with 2 source partitions each")
        assert sorted(p for v in got.values() for p in v) == list(range(8))
    finally:
        for c in members:
            c.stop()
