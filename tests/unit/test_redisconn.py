"""The Redis connection factory's pure parts: the cluster URL scheme, the signal's key names on a
cluster (one hash slot), the client kinds built (construction only: nothing connects here)."""
from __future__ import annotations

import pytest

from afc.runtime.backpressure import SignalKeys
from afc.runtime.redisconn import (ClusterTarget, async_client, is_cluster_url, parse_cluster_url, redacted,
                                   redis_errors, sync_client)


def crc16_slot(key: str) -> int:
    """Redis Cluster's key slot, written out here (CRC16/XMODEM of the hash tag or the key, mod
    16384) so the test does not lean on the code it checks."""
    k = key.encode()
    s = k.find(b"{")
    if s >= 0:
        e = k.find(b"}", s + 1)
        if e > s + 1:
            k = k[s + 1:e]
    crc = 0
    for byte in k:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc % 16384


def test_crc16_matches_the_redis_cluster_spec_example() -> None:
    assert crc16_slot("123456789") == 0x31C3 % 16384     # the spec's CRC16 check value
    assert crc16_slot("foo{bar}") == crc16_slot("bar") == crc16_slot("{bar}zap")


@pytest.mark.parametrize("url, cluster", [
    ("redis+cluster://127.0.0.1:7000/0", True), ("REDISS+CLUSTER://h:1", True),
    ("redis://127.0.0.1:6379/0", False), ("rediss://h:1/2", False), ("unix:///tmp/r.sock", False),
])
def test_cluster_is_said_by_the_scheme(url: str, cluster: bool) -> None:
    assert is_cluster_url(url) is cluster


def test_cluster_url_lists_seeds_credentials_and_tls() -> None:
    t = parse_cluster_url("rediss+cluster://app:p%40ss@10.0.0.1:7000,10.0.0.2,[::1]:7002/0")
    assert t == ClusterTarget(nodes=(("10.0.0.1", 7000), ("10.0.0.2", 6379), ("::1", 7002)),
                              username="app", password="p@ss", ssl=True)
    assert "p@ss" not in repr(t)
    only_pw = parse_cluster_url("redis+cluster://:secret@h:1")       # as redis-py reads redis://:pw@h
    assert (only_pw.username, only_pw.password, only_pw.ssl) == (None, "secret", False)
    only_user = parse_cluster_url("redis+cluster://app@h:1")
    assert (only_user.username, only_user.password) == ("app", None)
    assert parse_cluster_url("redis+cluster://h:1,h:2/").nodes == (("h", 1), ("h", 2))


@pytest.mark.parametrize("url, error", [
    ("redis+cluster://h:1/3", "only database 0"),
    ("redis+cluster://h:1/0?socket_timeout=1", "no query parameters"),
    ("redis+cluster:///0", "no seed node"),
    ("redis+cluster://h:x/0", "not a number"),
    ("redis+cluster://h:70000/0", "out of range"),
    ("redis://h:1/0", "not a Redis Cluster URL"),
])
def test_bad_cluster_urls_say_what_is_wrong(url: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_cluster_url(url)


def test_redacted_hides_the_password_only() -> None:
    assert redacted("redis+cluster://u:pw@h:1,h:2/0") == "redis+cluster://u:***@h:1,h:2/0"
    assert redacted("redis://pw@h:1/0") == "redis://***@h:1/0"
    assert redacted("redis://:pw@h:1/0") == "redis://***@h:1/0"
    assert redacted("redis://h:1/0") == "redis://h:1/0"


def test_client_kinds_by_scheme() -> None:
    import redis
    import redis.asyncio as aredis
    from redis.asyncio.cluster import RedisCluster as AsyncCluster
    a = async_client("redis+cluster://127.0.0.1:1,127.0.0.1:2/0", max_connections=3, socket_timeout=1, retries=2)
    assert isinstance(a, AsyncCluster)
    assert [(n.host, n.port) for n in a.startup_nodes] == [("127.0.0.1", 1), ("127.0.0.1", 2)]
    assert a.retry.get_retries() == 2
    single = async_client("redis://127.0.0.1:1/0", max_connections=2, pool_timeout=1)
    assert isinstance(single, aredis.Redis)
    assert isinstance(single.connection_pool, aredis.BlockingConnectionPool)
    assert single.connection_pool.max_connections == 2 and single.connection_pool.timeout == 1
    s = sync_client("redis://127.0.0.1:1/3", socket_timeout=1)
    assert isinstance(s, redis.Redis) and s.connection_pool.connection_kwargs["db"] == 3
    with pytest.raises(ValueError, match="only database 0"):
        async_client("redis+cluster://127.0.0.1:1/2")


def test_redis_errors_cover_the_cluster_client_exception() -> None:
    from redis.exceptions import ConnectionError, RedisClusterException, SlotNotCoveredError
    errs = redis_errors()
    for e in (ConnectionError("x"), RedisClusterException("x"), SlotNotCoveredError("x"), OSError("x")):
        assert isinstance(e, errs)


def test_single_redis_signal_names_are_unchanged() -> None:
    k = SignalKeys.for_url("redis://h:1/0", "afc:", "orders")
    assert not k.cluster
    assert (k.channel, k.index, k.member("pod-0")) == ("afc:bp:orders", "afc:bpm:orders", "afc:bp:orders:pod-0")


@pytest.mark.parametrize("group", ["orders", "a}b", "a{b", "{x}", "g:1"])
def test_cluster_signal_names_share_one_hash_slot(group: str) -> None:
    k = SignalKeys.for_url("redis+cluster://h:1", "afc", group)
    assert k.cluster
    assert k.index == "afc:bpm:{" + group + "}" and k.channel == "afc:bp:{" + group + "}"
    names = [k.channel, k.index, k.member("pod-0"), k.member("other:member")]
    assert len({crc16_slot(n) for n in names}) == 1, names


def test_cluster_signal_names_of_two_groups_differ() -> None:
    a, b = SignalKeys("afc", "orders", cluster=True), SignalKeys("afc", "payments", cluster=True)
    assert a.index != b.index and a.member("m") != b.member("m")


def test_a_prefix_that_splits_the_slot_is_refused() -> None:
    with pytest.raises(ValueError, match="several hash slots"):
        SignalKeys("afc{x", "orders", cluster=True)
    SignalKeys("afc{x", "orders", cluster=False)       # a single Redis does not care
