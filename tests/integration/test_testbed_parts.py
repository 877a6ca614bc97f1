"""Each part of the test bed is real and usable through the clients afc uses."""
from __future__ import annotations

import uuid

import pytest

from afctest import Testbed, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.redis, pytest.mark.k8s]


def test_produce_and_consume_through_the_broker(testbed: Testbed, make_topic, names) -> None:
    from confluent_kafka import Consumer, Producer
    topic = make_topic("roundtrip", partitions=1)
    payload = uuid.uuid4().bytes
    p = Producer({"bootstrap.servers": testbed.bootstrap, "enable.idempotence": True})
    p.produce(topic, key=b"k", value=payload, headers={"h": b"v"})
    assert p.flush(10) == 0
    c = Consumer({"bootstrap.servers": testbed.bootstrap, "group.id": names.group,
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    try:
        c.subscribe([topic])
        msg = wait_for(lambda: (m := c.poll(0.5)) is not None and m.error() is None and m, 30,
                       what="the produced record")
        assert (msg.key(), msg.value(), msg.headers()) == (b"k", payload, [("h", b"v")])
    finally:
        c.close()


def test_topic_with_twelve_partitions_in_metadata(kafka_admin, make_topic) -> None:
    topic = make_topic("wide", partitions=12)
    def partitions():
        found = kafka_admin.list_topics(topic, timeout=10).topics[topic].partitions
        return found if len(found) == 12 else None

    parts = wait_for(partitions, 30, what="metadata with 12 partitions")
    assert sorted(parts) == list(range(12))
    assert all(p.leader == 1 for p in parts.values())


def test_redis_round_trip(redis_client, names) -> None:
    key = f"{names.redis_prefix}k"
    assert redis_client.set(key, b"value", px=60_000)
    assert redis_client.get(key) == b"value"
    assert 0 < redis_client.pttl(key) <= 60_000


def test_kubectl_readyz(testbed: Testbed) -> None:
    r = testbed.run_kubectl("get", "--raw", "/readyz")
    assert r.stdout.strip() == "ok"
    v = testbed.run_kubectl("version", "-o", "json")
    assert '"gitVersion": "v1.33.' in v.stdout


def test_statefulset_becomes_pods(testbed: Testbed, k8s_api, namespace: str) -> None:
    """The controller-manager is running: a StatefulSet turns into Pods (Pending: no kubelet)."""
    from kubernetes import client
    apps, core = client.AppsV1Api(k8s_api), client.CoreV1Api(k8s_api)
    labels = {"app": "probe"}
    apps.create_namespaced_stateful_set(namespace, client.V1StatefulSet(
        metadata=client.V1ObjectMeta(name="probe"),
        spec=client.V1StatefulSetSpec(
            service_name="probe", replicas=2, pod_management_policy="Parallel",
            selector=client.V1LabelSelector(match_labels=labels),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels),
                spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="example.invalid/c:1")])))))
    pods = wait_for(lambda: sorted(p.metadata.name for p in core.list_namespaced_pod(namespace).items)
                    == ["probe-0", "probe-1"], 60, what="pods probe-0 and probe-1")
    assert pods
    pod = core.read_namespaced_pod("probe-0", namespace)
    assert pod.metadata.owner_references[0].kind == "StatefulSet"
    assert pod.status.phase == "Pending"


def test_redis_cluster_has_three_masters_each_with_a_replica(testbed: Testbed, redis_cluster, redis_cluster_bed,
                                                            names) -> None:
    """The bed's Redis Cluster is a real one: all 16384 slots on 3 masters, a replica each, keys
    spread over the masters, a multi-key command across slots refused (CROSSSLOT) and one within
    a hash tag served."""
    import redis
    from redis.crc import key_slot
    assert testbed.redis_cluster_url.startswith("redis+cluster://")
    assert redis_cluster_bed.problems() == []
    info = redis_cluster.cluster_info()
    assert info["cluster_state"] == "ok" and int(info["cluster_slots_assigned"]) == 16384
    nodes = redis_cluster_bed.nodes()
    masters = [n for n in nodes if "master" in n["flags"]]
    replicas = [n for n in nodes if "slave" in n["flags"]]
    assert len(masters) == 3 and len(replicas) == 3
    assert sorted(r["master"] for r in replicas) == sorted(m["id"] for m in masters)
    # Keys land on all three masters (their slots) and read back through the cluster client.
    keys = [f"{names.redis_prefix}k{i}" for i in range(30)]
    for k in keys:
        redis_cluster.set(k, k, px=60_000)
    served = {redis_cluster_bed.master_of_slot(key_slot(k.encode()))["port"] for k in keys}
    assert served == {m["port"] for m in masters}
    assert [redis_cluster.get(k) for k in keys] == [k.encode() for k in keys]
    a, b = f"{names.redis_prefix}a", f"{names.redis_prefix}b"
    assert key_slot(a.encode()) != key_slot(b.encode())
    plain = redis.Redis(port=redis_cluster_bed.master_of_slot(key_slot(a.encode()))["port"])
    try:
        with pytest.raises(redis.ResponseError, match="hash to the same slot"):     # CROSSSLOT
            plain.execute_command("MGET", a, b)
    finally:
        plain.close()
    tagged = [f"{names.redis_prefix}{{t}}:{i}" for i in range(3)]
    redis_cluster.mset({k: "v" for k in tagged})
    assert redis_cluster.mget(tagged) == [b"v"] * 3
