"""The autoscaler's measurement against the real broker: the group's assignment (partition ->
member) is read with the offsets, for both group protocols, so the per-replica rate can be
measured on the members that were busy (afc.operator.scaling.busy_member_rate)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from afc.operator.crd import AdaptiveConsumerSpec
from afc.operator.kafka import KafkaProbe, client_config, observe_sync
from afctest import Testbed, wait_for

pytestmark = [pytest.mark.kafka]

SAMPLE = Path(__file__).resolve().parents[2] / "manifests" / "samples" / "afc_v1alpha1_adaptiveconsumer.yaml"


def sample_spec(testbed: Testbed, topic: str, names) -> AdaptiveConsumerSpec:
    """The sample AdaptiveConsumer's spec, on the bed's broker, this topic and this test's group."""
    doc = yaml.safe_load(SAMPLE.read_text())["spec"]
    doc["kafka"].update(bootstrapServers=testbed.bootstrap, topics=[topic], groupId=names.group)
    return AdaptiveConsumerSpec.model_validate(doc)


def observe(probe: KafkaProbe, spec: AdaptiveConsumerSpec):
    """One measurement of the group, as the operator's poll takes it."""
    ccfg = client_config(spec, {}, 5)
    return observe_sync(probe.clients.admin(ccfg), spec, 5, lambda: probe.clients.leaver(ccfg))


@pytest.mark.parametrize("protocol", ["classic", "consumer"])
def test_the_observation_carries_the_groups_assignment(testbed: Testbed, make_topic, names, protocol: str) -> None:
    from confluent_kafka import Consumer
    topic = make_topic(partitions=4)
    spec = sample_spec(testbed, topic, names)
    conf = {"bootstrap.servers": testbed.bootstrap, "group.id": names.group, "enable.auto.commit": False}
    if protocol == "consumer":
        conf["group.protocol"] = "consumer"
    else:
        conf["partition.assignment.strategy"] = "range"
    consumers = [Consumer({**conf, "group.instance.id": f"{names.stem}.m{i}"}) for i in range(2)]
    probe = KafkaProbe(timeout_s=5)
    try:
        for c in consumers:
            c.subscribe([topic])

        def assigned() -> bool:
            for c in consumers:
                c.poll(0.2)
            return sum(len(c.assignment()) for c in consumers) == 4 and all(c.assignment() for c in consumers)
        wait_for(assigned, 60, 0.1, f"both {protocol} members hold partitions")

        def observed() -> dict | None:
            for c in consumers:
                c.poll(0.1)
            snap = observe(probe, spec)
            o = snap.observation
            return o.owners if o is not None and o.owners and len(o.owners) == 4 else None
        owners = wait_for(observed, 60, 0.5, "the observation names an owner for every partition")
        # the broker's view is what each consumer holds, named by group.instance.id
        expected = {(tp.topic, tp.partition): f"{names.stem}.m{i}" for i, c in enumerate(consumers)
                    for tp in c.assignment()}
        assert owners == expected
        assert set(owners.values()) == {f"{names.stem}.m0", f"{names.stem}.m1"}
    finally:
        for c in consumers:
            c.close()
        probe.close()


def test_the_per_replica_rate_is_measured_on_a_real_group(testbed: Testbed, make_topic, names) -> None:
    """Two static members each consuming about 100 msg/s from a backlog, committing as they
    go: the observations of the real group give a per-replica rate near 100 (the members are
    busy at every poll: a backlog of far more than 5 s of their work)."""
    import threading
    import time

    from confluent_kafka import Consumer, Producer

    from afc.operator import scaling as sc
    topic = make_topic(partitions=4)
    p = Producer({"bootstrap.servers": testbed.bootstrap, "linger.ms": 20})
    for i in range(8_000):
        p.produce(topic, value=b"x", partition=i % 4)
    assert p.flush(30) == 0
    spec = sample_spec(testbed, topic, names)
    stop = threading.Event()

    def member(i: int) -> None:
        c = Consumer({"bootstrap.servers": testbed.bootstrap, "group.id": names.group, "enable.auto.commit": False,
                      "group.instance.id": f"{names.stem}.m{i}", "auto.offset.reset": "earliest",
                      "partition.assignment.strategy": "range"})
        c.subscribe([topic])
        try:
            while not stop.is_set():
                msgs = c.consume(10, 0.2)
                if msgs:
                    c.commit(asynchronous=False)
                    time.sleep(0.1)          # about 100 msg/s per member
        finally:
            c.close()
    threads = [threading.Thread(target=member, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    probe = KafkaProbe(timeout_s=5)
    try:
        policy = sc.Policy(mode="DrainTime", rate_window_s=8, stall_after_s=1e9)

        def snap() -> sc.Observation | None:
            o = observe(probe, spec).observation
            return o if o is not None and o.owners and len(set(o.owners.values())) == 2 else None
        window = [wait_for(snap, 60, 0.5, "both members assigned")]
        end = time.monotonic() + 10
        while time.monotonic() < end:
            time.sleep(2)
            o = snap()
            if o is not None:
                window.append(o)
        m = sc.measure(window, policy)
        assert m.per_replica_rate is not None, [o.owners for o in window]
        assert 50 <= m.per_replica_rate <= 150, m.summary()
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        probe.close()


def test_a_rebalancing_group_is_not_stalled(testbed: Testbed, make_topic, names) -> None:
    """The CI failure of 2026-11-28: consumers starting one after another kept a classic group
    rebalancing for seconds, the positions stood still, and with a short stallAfterS the backlog
    was judged stalled. m0 holds all four partitions with a backlog and commits nothing: two
    observations a second apart show a stall (the control). Then m0 stops polling and m1 joins:
    the group waits for m0 in PreparingRebalance, the observation says so (the broker still
    reports m0's assignment), and no stall is judged across it."""
    from confluent_kafka import Consumer, Producer
    from afc.operator import scaling as sc
    topic = make_topic(partitions=4)
    p = Producer({"bootstrap.servers": testbed.bootstrap})
    for i in range(40):
        p.produce(topic, b"x", partition=i % 4)
    assert p.flush(30) == 0
    spec = sample_spec(testbed, topic, names)
    conf = {"bootstrap.servers": testbed.bootstrap, "group.id": names.group, "enable.auto.commit": False,
            "partition.assignment.strategy": "range", "max.poll.interval.ms": 60_000, "session.timeout.ms": 30_000}
    m0 = Consumer({**conf, "group.instance.id": f"{names.stem}.m0"})
    m1: Consumer | None = None
    probe = KafkaProbe(timeout_s=5)
    try:
        m0.subscribe([topic])
        wait_for(lambda: m0.poll(0.2) is None and len(m0.assignment()) == 4, 60, 0.1, "m0 holds the four partitions")
        first = wait_for(lambda: (s := observe(probe, spec)).observation is not None and s.observation.owners
                         and len(s.observation.owners) == 4 and s, 30, 0.5, "the assignment observed")
        assert first.group_state == "Stable" and not first.observation.rebalancing
        time.sleep(1.0)
        second = observe(probe, spec)
        assert second.group_state == "Stable" and second.observation is not None
        window = [first.observation, second.observation]
        assert len(sc.stalled_partitions(window, 0.5, "earliest")) == 4, "the control: held, frozen, lagging"
        m1 = Consumer({**conf, "group.instance.id": f"{names.stem}.m1"})
        m1.subscribe([topic])
        m1.poll(0.5)
        snap = wait_for(lambda: (s := observe(probe, spec)).observation is not None and s.observation.rebalancing
                        and s, 30, 0.3, "the group in a rebalance, waiting for m0 to rejoin")
        assert snap.group_state == "PreparingRebalance" and snap.observation.members >= 1
        assert sc.stalled_partitions([*window, snap.observation], 0.5, "earliest") == []
    finally:
        for c in (m0, m1):
            if c is not None:
                c.close()
        probe.close()
