"""Issue 9 items 4 and 10: the idempotency store (Redis) failing in the ways Redis fails, on a
private redis-server per test: stopped, out of memory, read-only, evicting."""
from __future__ import annotations

import shutil
import time

import pytest

from afctest import ConsumerProcess, PrivateRedis, group_lag, produce_json, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.redis,
              pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server (Debian) not installed")]


def consumer(testbed, names, tmp_path, topic, store: PrivateRedis, env) -> ConsumerProcess:
    """The store is the private Redis; the handler's own counts go to the test bed's Redis."""
    return ConsumerProcess(testbed, [topic], names.group, "afc_test_handlers:sleep_and_record", tmp_path / "c.log",
                           instance_id=f"{names.stem}-0", redis_prefix=names.redis_prefix,
                           env={"AFC_TEST_HASH": f"{names.redis_prefix}runs",
                                "AFC_IDEMPOTENCY__REDIS_URL": store.url, **env})


def runs(redis_client, names) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in redis_client.hgetall(f"{names.redis_prefix}runs").items()}


def sample(c: ConsumerProcess, seconds: float) -> tuple[set[int], list[float]]:
    """/readyz codes and afc_idempotency_store_errors_total values over a few seconds; the
    process must stay up throughout."""
    codes, errors = set(), []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert c.proc.poll() is None, f"consumer exited {c.proc.returncode}:\n{c.log_tail()}"
        codes.add(c.http("/readyz")[0])
        errors.append(c.metrics().get("afc_idempotency_store_errors_total", 0.0))
        time.sleep(0.25)
    return codes, errors


def assert_all_once(testbed, topic, names, redis_client, c, n: int, within: float, what: str) -> None:
    def state() -> tuple[bool, tuple[int, int], int, int]:
        lag, ran = group_lag(testbed.bootstrap, topic, names.group), len(runs(redis_client, names))
        return (lag == (n, 0) and ran == n) or c.proc.poll() is not None, lag, ran, c.http("/readyz")[0]
    last = state()
    end = time.monotonic() + within
    while not last[0] and time.monotonic() < end:
        time.sleep(0.5)
        last = state()
    assert last[0], (f"not {what} within {within:.0f}s: (committed, lag)={last[1]}, handled {last[2]}/{n}, "
                     f"/readyz {last[3]}")
    assert c.proc.poll() is None, f"consumer exited {c.proc.returncode}:\n{c.log_tail()}"
    counts = runs(redis_client, names)
    assert len(counts) == n and set(counts.values()) == {1}, (len(counts), sorted(set(counts.values())))


@pytest.mark.parametrize("first_seen_by, lease_ms, sleep_ms", [("lease-renewal", 1500, 6000),
                                                               ("done-marks", 30000, 1500)])
def test_store_outage_first_seen_outside_a_claim_clears_and_resumes(testbed, make_topic, names, redis_client,
                                                                   tmp_path, first_seen_by, lease_ms, sleep_ms) -> None:
    """Item 4 (store-down flag never clears): Redis stops while the handler is slow, so the
    outage is first seen by a lease renewal or a done-mark flush, not by a claim. Today the flag
    is only cleared by a successful claim, which never comes (fetching stops while it is set):
    every partition stays paused forever while /readyz says 200. Contract: /readyz 503 while
    down; when Redis is back, consumption resumes by itself; nothing lost or run twice."""
    store = PrivateRedis(tmp_path / "redis").start()
    topic = make_topic("in", partitions=2)
    produce_json(testbed.bootstrap, topic, [{"n": i} for i in range(8)], key_of=lambda i, d: b"k%d" % i)
    c = consumer(testbed, names, tmp_path, topic, store, {"AFC_TEST_SLEEP_MS": str(sleep_ms),
                                                         "AFC_IDEMPOTENCY__LEASE_MS": str(lease_ms)}).start()
    try:
        c.wait_ready()
        wait_for(lambda: c.metrics().get("afc_inflight_messages", 0) >= 8, 30, 0.1, what="all 8 fetched")
        time.sleep(0.5)                                   # claimed; the handlers sleep
        store.stop()
        codes, _ = sample(c, 6)                           # renewal / done marks fail meanwhile
        store.start()                                     # same port, same data
        produce_json(testbed.bootstrap, topic, [{"n": i} for i in range(8, 16)], key_of=lambda i, d: b"k%d" % i)
        assert_all_once(testbed, topic, names, redis_client, c, 16, 30,
                        f"resumed after an outage first seen by {first_seen_by}")
    finally:
        c.stop()
        store.stop()
    assert 503 in codes, f"/readyz while the store was down: {codes}"


def store_fault(testbed, make_topic, names, redis_client, tmp_path, store: PrivateRedis, inject, clear,
                what: str) -> tuple[set[int], list[float], str]:
    """600 records handled, then `inject()` the fault and produce 600 more, watch for 6 s, then
    `clear()`: every record must end up handled exactly once, the process up throughout.
    Returns the /readyz codes and store-error counts seen during the fault, and the log."""
    topic = make_topic("in", partitions=6)
    produce_json(testbed.bootstrap, topic, [{"n": i} for i in range(600)], key_of=lambda i, d: str(i).encode())
    c = consumer(testbed, names, tmp_path, topic, store, {"AFC_TEST_SLEEP_MS": "1"}).start()
    try:
        c.wait_ready()
        wait_for(lambda: len(runs(redis_client, names)) >= 600, 60, 0.2, what="the first 600 handled")
        inject()
        produce_json(testbed.bootstrap, topic, [{"n": i} for i in range(600, 1200)],
                     key_of=lambda i, d: str(i).encode())
        codes, errors = sample(c, 6)
        clear()
        assert_all_once(testbed, topic, names, redis_client, c, 1200, 45, f"resumed after {what}")
    finally:
        c.stop()
    assert errors[-1] > errors[0], f"afc_idempotency_store_errors_total did not grow during {what}: {errors[:3]}..."
    assert 503 in codes, f"/readyz during {what}: {codes}"
    return codes, errors, (tmp_path / "c.log").read_text()


def test_store_out_of_memory_pauses_then_resumes(testbed, make_topic, names, redis_client, tmp_path) -> None:
    """Item 10 (OOM arrives as ResponseError: the claim path spins, _flush_store kills run()):
    the store answers `OOM command not allowed` (maxmemory 1mb, noeviction) while records
    arrive. Contract: no crash, no spin; paused (afc_idempotency_store_errors_total grows,
    /readyz 503), logged; resumes when memory is freed; every record handled exactly once."""
    store = PrivateRedis(tmp_path / "redis").start()
    r = store.client()

    def inject() -> None:
        r.set("filler", b"x" * 3_000_000)
        r.config_set("maxmemory-policy", "noeviction")
        r.config_set("maxmemory", "1mb")

    def clear() -> None:
        r.config_set("maxmemory", "0")
        r.delete("filler")
    try:
        _, _, log = store_fault(testbed, make_topic, names, redis_client, tmp_path, store, inject, clear, "OOM")
    finally:
        r.close()
        store.stop()
    assert "OOM" in log or "maxmemory" in log, "the OOM answer is not in the log"


def test_store_read_only_after_failover_pauses_then_resumes(testbed, make_topic, names, redis_client,
                                                           tmp_path) -> None:
    """Item 10 (READONLY, as after a failover, arrives as ResponseError): the store turns into a
    replica (REPLICAOF another private Redis) while records arrive. Contract: no crash, no
    spin; paused (metric grows, /readyz 503), logged; resumes after REPLICAOF NO ONE; every
    record handled exactly once."""
    store = PrivateRedis(tmp_path / "redis").start()
    primary = PrivateRedis(tmp_path / "primary").start()
    r = store.client()

    def inject() -> None:
        r.replicaof("127.0.0.1", primary.port)
        wait_for(lambda: r.info("replication").get("master_link_status") == "up", 15, 0.1, what="replica synced")
    try:
        _, _, log = store_fault(testbed, make_topic, names, redis_client, tmp_path, store, inject,
                                lambda: r.replicaof("NO", "ONE"), "READONLY")
    finally:
        r.close()
        store.stop()
        primary.stop()
    assert "readonly" in log.lower() or "read only" in log.lower(), "the READONLY answer is not in the log"


def test_evicting_store_policy_warns_at_start(testbed, make_topic, names, tmp_path) -> None:
    """Item 10 (an evicting maxmemory-policy silently loses done marks): with allkeys-lru the
    runtime warns at start (event=idempotency-store-evicts) and sets the gauge
    afc_idempotency_store_evicting to 1."""
    store = PrivateRedis(tmp_path / "redis", "--maxmemory", "100mb", "--maxmemory-policy", "allkeys-lru").start()
    topic = make_topic("in", partitions=1)
    c = consumer(testbed, names, tmp_path, topic, store, {}).start()
    try:
        c.wait_ready()
        wait_for(lambda: "event=idempotency-store-evicts" in (tmp_path / "c.log").read_text(), 15, 0.2,
                 what="the eviction warning in the log")
        assert c.metrics().get("afc_idempotency_store_evicting") == 1
    finally:
        c.stop()
        store.stop()
