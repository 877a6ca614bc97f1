"""The adaptive handler-concurrency limit in a running consumer (issue 13): an async handler on a
downstream of capacity 32 (5 ms flat up to 32 calls, queueing beyond), with a backlog.
(The figures against fixed settings come from bench/concurrency.py, not from here.)

The old fixed default ran 16 calls: half the downstream idle. The limit must grow past that,
settle near the capacity rather than at the upper bound (workers, 256), and the calls the
downstream saw at once must never exceed what afc allowed (plus calls counted out as stuck,
none here). Every record is handled once: the group ends with no lag.
"""
from __future__ import annotations

import statistics
import time

import pytest

from afctest import ConsumerProcess, group_lag, produce_json, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.redis]
CAPACITY = 32


def test_the_limit_finds_the_downstreams_capacity_and_bounds_real_concurrency(
        testbed, make_topic, names, redis_client, tmp_path) -> None:
    n = 60_000
    topic = make_topic("in", partitions=6)
    produce_json(testbed.bootstrap, topic, [{"n": i} for i in range(n)])
    peak_key = f"{names.redis_prefix}peak"
    c = ConsumerProcess(testbed, [topic], names.group, "afc_test_handlers:capacity_downstream",
                        tmp_path / "c.log", instance_id=f"{names.stem}-0", redis_prefix=names.redis_prefix,
                        env={"AFC_TEST_CAPACITY": str(CAPACITY), "AFC_TEST_HASH": peak_key}).start()
    try:
        c.wait_ready()
        limits = []                                             # from the start: slow start's steps included
        end = time.monotonic() + 10
        while time.monotonic() < end and (m := c.metrics()).get("afc_messages_handled_total", 0) < n * 0.8:
            if m.get("afc_messages_handled_total", 0) > 0:
                limits.append(m["afc_handler_concurrency_limit"])
            time.sleep(0.1)
        wait_for(lambda: group_lag(testbed.bootstrap, topic, names.group)[1] == 0, 120, 0.5,
                 what="the backlog drained")
        final = c.metrics()
    finally:
        assert c.stop() == 0, c.log_tail()
    assert len(limits) >= 20, limits
    settled = limits[len(limits) // 2:]
    assert min(settled) > 16, limits                           # past the old fixed default
    # Below the upper bound (256) and near the capacity. Loose: on a loaded machine the fetch
    # path may not keep the limit's worth of calls going, and a limit not reached is held.
    assert max(settled) < 256 and statistics.median(settled) <= 4 * CAPACITY, limits
    peak = int(redis_client.hget(peak_key, "peak") or 0)
    assert CAPACITY <= peak <= max(limits), (peak, limits)     # the downstream never saw more than allowed
    assert final["afc_messages_handled_total"] == n
