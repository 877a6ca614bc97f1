"""The autoscaler's measurement against the real broker: the group's assignment (partition ->
member) is read with the offsets, for both group protocols, so the per-replica rate can be
measured on the members that were busy (afc.operator.scaling.busy_member_rate)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from afc.operator.crd import AdaptiveConsumerSpec
from afc.operator.kafka import KafkaProbe, client_config, observe_sync
from afctest import Testbed, wait_for

pytestmark = [pytest.mark.kafka]

SAMPLE = Path(__file__).resolve().parents[2] / "manifests" / "samples" / "afc_v1alpha1_adaptiveconsumer.yaml"


@pytest.mark.parametrize("protocol", ["classic", "consumer"])
def test_the_observation_carries_the_groups_assignment(testbed: Testbed, make_topic, names, protocol: str) -> None:
    from confluent_kafka import Consumer
    topic = make_topic(partitions=4)
    spec_doc = yaml.safe_load(SAMPLE.read_text())["spec"]
    spec_doc["kafka"].update(bootstrapServers=testbed.bootstrap, topics=[topic], groupId=names.group)
    spec = AdaptiveConsumerSpec.model_validate(spec_doc)
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
        ccfg = client_config(spec, {}, 5)

        def observed() -> dict | None:
            for c in consumers:
                c.poll(0.1)
            snap = observe_sync(probe.clients.admin(ccfg), spec, 5, lambda: probe.clients.leaver(ccfg))
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
