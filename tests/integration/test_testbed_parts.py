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
