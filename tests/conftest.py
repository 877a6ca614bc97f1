"""Session fixtures over the running test bed, and per-test names so tests never collide."""
from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from afctest import ROOT, Testbed

CRD_PATH = ROOT / "crds" / "afc.dev_adaptiveconsumers.yaml"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "unit" in Path(str(item.fspath)).parts:
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="session")
def testbed() -> Testbed:
    return Testbed.load()


@dataclass(frozen=True)
class Names:
    """Everything a test may create carries its own unique stem."""
    stem: str

    def topic(self, suffix: str = "in") -> str:
        return f"{self.stem}.{suffix}"

    @property
    def group(self) -> str:
        return f"{self.stem}-group"

    @property
    def redis_prefix(self) -> str:
        return f"{self.stem}:"

    @property
    def namespace(self) -> str:
        return self.stem[:63].rstrip("-")


@pytest.fixture
def names(request: pytest.FixtureRequest) -> Names:
    base = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40]
    return Names(f"t-{base}-{uuid.uuid4().hex[:6]}")


@pytest.fixture(scope="session")
def kafka_admin(testbed: Testbed):
    from confluent_kafka.admin import AdminClient
    return AdminClient({"bootstrap.servers": testbed.bootstrap})


@pytest.fixture
def make_topic(kafka_admin, names: Names) -> Iterator:
    """Create topics for this test (waiting until the broker has them), delete them after."""
    from confluent_kafka.admin import NewTopic
    created: list[str] = []

    def make(suffix: str = "in", partitions: int = 1, config: dict[str, str] | None = None) -> str:
        name = names.topic(suffix)
        futures = kafka_admin.create_topics([NewTopic(name, partitions, 1, config=config or {})],
                                            operation_timeout=30)
        futures[name].result(timeout=30)
        created.append(name)
        return name

    yield make
    if created:
        for f in kafka_admin.delete_topics(created, operation_timeout=30).values():
            try:
                f.result(timeout=30)
            except Exception:  # noqa: BLE001 - teardown is best effort, the name is unique anyway
                pass


@pytest.fixture
def redis_client(testbed: Testbed, names: Names) -> Iterator:
    import redis
    client = redis.Redis.from_url(testbed.redis_url)
    yield client
    keys = list(client.scan_iter(match=f"{names.redis_prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(scope="session")
def redis_cluster_bed(testbed: Testbed):
    """The bed's Redis Cluster: health and `failover(key)` (tests/redis_cluster_bed.py)."""
    from redis_cluster_bed import RedisClusterBed
    return RedisClusterBed(testbed.redis_cluster_url, testbed.state_dir)


@pytest.fixture
def redis_cluster(redis_cluster_bed, names: Names) -> Iterator:
    """A client of the bed's Redis Cluster (afc.runtime.redisconn), the cluster healthy at the
    start; this test's keys (names.redis_prefix*) deleted from every master afterwards."""
    from afc.runtime.redisconn import sync_client
    redis_cluster_bed.wait_healthy()
    client = sync_client(redis_cluster_bed.url, socket_timeout=5, socket_connect_timeout=2)
    yield client
    try:
        for key in list(client.scan_iter(match=f"{names.redis_prefix}*", count=1000)):
            client.delete(key)
    finally:
        client.close()


@pytest.fixture(scope="session")
def k8s_api(testbed: Testbed):
    from kubernetes import client, config
    cfg = client.Configuration()
    config.load_kube_config(config_file=testbed.kubeconfig, client_configuration=cfg)
    return client.ApiClient(cfg)


@pytest.fixture
def namespace(k8s_api, names: Names) -> Iterator[str]:
    from kubernetes import client
    core = client.CoreV1Api(k8s_api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(
        name=names.namespace, labels={"afc.dev/test": "true"})))
    yield names.namespace
    core.delete_namespace(names.namespace, propagation_policy="Background")


@pytest.fixture(scope="session")
def crd_installed(testbed: Testbed) -> None:
    """The AdaptiveConsumer CRD, cluster-scoped and shared: applied idempotently, never deleted."""
    testbed.run_kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_PATH))
    testbed.wait_established("adaptiveconsumers.afc.dev")


@pytest.fixture(scope="session")
def api(k8s_api):
    """The operator's own async Kubernetes layer, on the test bed's admin identity."""
    from afc.operator.kube import Kube
    kube = Kube(k8s_api.configuration)
    yield kube
    kube.close()


@pytest.fixture
def core(k8s_api):
    from kubernetes import client
    return client.CoreV1Api(k8s_api)
