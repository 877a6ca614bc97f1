"""Backpressure inside the loop: a downstream slowing from 1 ms to 300 ms per message."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from afctest import ConsumerProcess, group_lag, produce_json, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.redis]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_slow_downstream_shrinks_inflight_pauses_and_recovers(testbed, make_topic, names, redis_client, tmp_path) -> None:
    n = 40_000
    topic = make_topic("in", partitions=12)
    produce_json(testbed.bootstrap, topic, [{"n": i, "pad": "x" * 150} for i in range(n)],
                 key_of=lambda i, d: str(i % 997).encode())
    latency_key = f"{names.redis_prefix}latency"
    redis_client.set(latency_key, 1)
    c = ConsumerProcess(testbed, [topic], names.group, "afc_test_handlers:append_with_latency",
                        tmp_path / "c.log", instance_id=f"{names.stem}-0", redis_prefix=names.redis_prefix, env={
                            "AFC_TEST_LIST": f"{names.redis_prefix}effects", "AFC_TEST_LATENCY_KEY": latency_key,
                            "AFC_FLOW__TARGET_LATENCY_MS": "50", "AFC_FLOW__MIN_INFLIGHT": "4",
                            "AFC_FLOW__MAX_INFLIGHT": "2000", "AFC_FLOW__WINDOW_MS": "200",
                            # A short poll interval: being paused must still count as polling.
                            "AFC_MEMBERSHIP__MAX_POLL_INTERVAL_MS": "10000",
                            "AFC_MEMBERSHIP__SESSION_TIMEOUT_MS": "6000"}).start()
    try:
        c.wait_ready()
        m = wait_for(lambda: (x := c.metrics()).get("afc_messages_handled_total", 0) > 3000 and x, 60,
                     what="a healthy start")
        fast_limit = m["afc_inflight_limit"]
        assert fast_limit >= 16, fast_limit                       # well above the floor of 4
        rss_fast = rss_mib(c.proc.pid)

        redis_client.set(latency_key, 300)                         # the downstream drowns
        m = wait_for(lambda: (x := c.metrics()).get("afc_inflight_limit", 1e9) <= 8
                     and x.get("afc_paused_partitions") == x.get("afc_assigned_partitions") == 24  # + .retry
                     and x.get("afc_inflight_messages", 1e9) <= 8 and x,
                     30, what="the in-flight limit at the floor, partitions paused, the lanes drained")
        # Stay slow for longer than max.poll.interval.ms: the member must not be kicked out.
        samples = []
        end = time.monotonic() + 14
        while time.monotonic() < end:
            x = c.metrics()
            samples.append((x["afc_inflight_messages"], x["afc_inflight_limit"], rss_mib(c.proc.pid),
                            x["afc_paused_partitions"]))
            time.sleep(0.5)
        slow_metrics = c.metrics()
        assert max(s[0] for s in samples) <= 8, samples         # nothing piles up in memory
        assert max(s[2] for s in samples) < rss_fast + 64, samples  # memory bounded: no buffering
        # Paused while above half the limit; between, it resumes to top up, and the refetch after
        # a pause (which purged librdkafka's queue) can take fetch.wait.max.ms: so pauses come and
        # go during the slow phase, and in flight never exceeds the floor's bound above.
        assert any(smp[3] == 24 for smp in samples), samples
        assert slow_metrics.get('afc_rebalances_total{kind="revoke"}', 0) == 0
        assert slow_metrics.get('afc_rebalances_total{kind="lost"}', 0) == 0
        assert slow_metrics["afc_assigned_partitions"] == 24          # 12 source + 12 retry partitions
        handled_slow = slow_metrics["afc_messages_handled_total"]

        redis_client.set(latency_key, 1)                           # the downstream recovers
        m = wait_for(lambda: (x := c.metrics()).get("afc_inflight_limit", 0) >= 16
                     and x.get("afc_paused_partitions") == 0 and x, 60, what="recovery")
        wait_for(lambda: group_lag(testbed.bootstrap, topic, names.group)[1] == 0, 180, 0.5,
                 what="the backlog drained")
        final = c.metrics()
        assert final["afc_messages_handled_total"] > handled_slow
        assert final.get('afc_rebalances_total{kind="revoke"}', 0) == 0
        assert final.get('afc_rebalances_total{kind="lost"}', 0) == 0
        assert 'afc_partition_lag{partition="0",topic="%s"}' % topic in final
        assert final["afc_handler_latency_seconds_count"] >= n
    finally:
        assert c.stop() == 0, c.log_tail()
    assert redis_client.llen(f"{names.redis_prefix}effects") == n
    log = (tmp_path / "c.log").read_text()
    assert "event=lost" not in log and "event=fetch-limit reason=overload-latency" in log
