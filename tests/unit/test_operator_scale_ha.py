"""The pure parts of issue 14's scale and HA work: the applied-object stamp, the watch cache's
lookups, the start-time peering priority, the request classification of the benchmark."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from afc.operator import render
from afc.operator.cli import load_settings, parse_args, start_priority
from afc.operator.kube import resource_of
from afc.operator.reconcile import APPLIED, MISS, Cache, digest, slim, stamped

ROOT = Path(__file__).resolve().parents[2]
sys.path.append(str(ROOT / "bench"))
import opcount  # noqa: E402

pytestmark = pytest.mark.unit


def objects() -> list[dict]:
    spec = render.parse_spec({"image": "x:1", "handler": {"handler": "a:b"},
                              "kafka": {"bootstrapServers": "k:9092", "topics": ["t"], "groupId": "g"}})
    return render.desired_objects(render.Owner("orders", "ns", "uid-1"), spec)


def test_the_stamp_is_the_digest_of_the_object_without_it_and_changes_with_it() -> None:
    for obj in objects():
        s = stamped(obj)
        assert s["metadata"]["annotations"][APPLIED] == digest(obj)
        assert APPLIED not in (obj["metadata"].get("annotations") or {})  # the render is left as it was
        assert render.object_drift(obj, s) == []  # a stamped live object shows no drift from the render
        changed = {**obj, "metadata": {**obj["metadata"], "labels": {**obj["metadata"]["labels"], "x": "y"}}}
        assert digest(changed) != digest(obj)
    assert digest({"a": 1, "b": [1, 2]}) == digest({"b": [1, 2], "a": 1})


def test_cache_reads_kopf_indexes_and_says_when_it_does_not_know() -> None:
    sts = {"metadata": {"name": "orders", "namespace": "ns", "managedFields": [{"manager": "m"}]}}
    cache = Cache()
    assert cache.get("StatefulSet", "ns", "orders") is MISS and cache.pods("ns", "orders") is None
    # kopf's indexes: key -> a store of the values of every object under that key
    cache.attach({"cache-statefulsets": {("ns", "orders"): [slim(sts)]}, "cache-pods": {("ns", "orders"): [{"p": 1}]},
                  "consumers": {}})
    got = cache.get("StatefulSet", "ns", "orders")
    assert got["metadata"]["name"] == "orders" and "managedFields" not in got["metadata"]
    assert "managedFields" in sts["metadata"]  # slim copies
    assert cache.get("StatefulSet", "ns", "other") is MISS  # absent from the index: ask the apiserver
    assert cache.get("Secret", "ns", "orders") is MISS       # never cached
    assert cache.pods("ns", "orders") == [{"p": 1}] and cache.pods("ns", "other") == []


def test_the_elder_replica_has_the_higher_priority() -> None:
    first, later = start_priority(1_800_000_000_000_000_000), start_priority(1_800_000_000_000_001_000)
    assert first > later > 0 and first - later == 1  # a microsecond apart, still ordered
    assert start_priority() < 2**53  # exact in JSON everywhere


def test_peering_settings() -> None:
    cfg = load_settings(parse_args(["-n", "a", "--peering", "afc-operator"]))
    assert cfg.peering == "afc-operator" and cfg.priority is None and cfg.peering_lifetime_s == 15
    assert load_settings(parse_args(["-n", "a"])).peering is None  # standalone unless asked


@pytest.mark.parametrize("path,resource", [
    ("/apis/apps/v1/namespaces/ns/statefulsets/orders", "statefulsets"),
    ("/apis/afc.dev/v1alpha1/namespaces/ns/adaptiveconsumers/orders/status", "adaptiveconsumers/status"),
    ("/api/v1/namespaces/ns/pods", "pods"),
    ("/apis/afc.dev/v1alpha1", "v1alpha1"),
])
def test_resource_of(path: str, resource: str) -> None:
    assert resource_of(path) == resource


@pytest.mark.parametrize("method,url,key", [
    ("GET", "https://h:1/apis/apps/v1/namespaces/ns/statefulsets?watch=true&labelSelector=a", "WATCH statefulsets"),
    ("GET", "https://h:1/api/v1/namespaces/ns/pods?labelSelector=a", "LIST pods"),
    ("GET", "https://h:1/api/v1/namespaces/ns/pods/p-0", "GET pods"),
    ("PATCH", "https://h:1/apis/afc.dev/v1alpha1/namespaces/ns/adaptiveconsumers/o/status", "PATCH adaptiveconsumers/status"),
    ("POST", "https://h:1/api/v1/namespaces/ns/events", "POST events"),
    ("GET", "https://h:1/apis/afc.dev/v1alpha1/adaptiveconsumers?watch=true", "WATCH adaptiveconsumers"),
])
def test_benchmark_classifies_requests(method: str, url: str, key: str) -> None:
    assert opcount.classify(method, url) == key
