"""Issue 9 items 6 and 7: one stuck handler call must not freeze the rest, and a per-message
deadline (handler.timeoutS) routes it away, with a bound on abandoned threads."""
from __future__ import annotations

import time

import pytest

from afctest import ConsumerProcess, group_lag, produce_json, produce_one, read_topic, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.redis]

PARTS = 6


def consumer(testbed, names, tmp_path, topic, env) -> ConsumerProcess:
    return ConsumerProcess(testbed, [topic], names.group, "afc_test_handlers:fast_unless_told", tmp_path / "c.log",
                           instance_id=f"{names.stem}-0", redis_prefix=names.redis_prefix,
                           env={"AFC_TEST_HASH": f"{names.redis_prefix}seen", "AFC_SHUTDOWN__DRAIN_TIMEOUT_S": "1",
                                **env})


def seen(redis_client, names) -> dict[str, tuple[float, float, float | None]]:
    """n -> (record timestamp s, handler start s, handler end s or None)."""
    out = {}
    for k, v in redis_client.hgetall(f"{names.redis_prefix}seen").items():
        ts, start, end = v.decode().split()
        out[k.decode()] = (int(ts) / 1000, float(start), None if end == "-" else float(end))
    return out


def kill(c: ConsumerProcess) -> None:
    if c.proc is not None and c.proc.poll() is None:
        c.kill9()
    c._log.close()


def warm_up(testbed, topic, redis_client, names, c: ConsumerProcess, n: int = 3000) -> None:
    """Fast records on partitions 1.. first: the runtime sees a microsecond handler (today it
    then picks its inline dispatch mode, where the freeze of item 6 happens)."""
    produce_json(testbed.bootstrap, topic, [{"n": i} for i in range(n)],
                 partition_of=lambda i, d: 1 + i % (PARTS - 1))
    wait_for(lambda: len(seen(redis_client, names)) >= n, 60, 0.2, what="the warm-up handled")
    time.sleep(1)                                          # a few controller windows


def test_a_60s_handler_call_does_not_delay_other_partitions(testbed, make_topic, names, redis_client,
                                                            tmp_path) -> None:
    """Item 6 (one slow call freezes everything): a sync handler call on partition 0 sleeps
    60 s; a steady trickle on the other partitions must each be handled within 1 s of being
    produced while that call still runs. Today, in inline dispatch mode (chosen for fast
    handlers), the call ran on the event loop and froze fetching, commits and the rest."""
    topic = make_topic("in", partitions=PARTS)
    c = consumer(testbed, names, tmp_path, topic, {}).start()
    from confluent_kafka import Producer
    p = Producer({"bootstrap.servers": testbed.bootstrap, "linger.ms": 0})
    try:
        c.wait_ready()
        warm_up(testbed, topic, redis_client, names, c)
        produce_one(p, topic, {"n": "slow", "sleep_s": 60}, partition=0)
        p.flush(10)
        wait_for(lambda: "slow" in seen(redis_client, names), 20, 0.1, what="the 60 s call to start")
        trickle = []
        t_end = time.monotonic() + 8
        j = 0
        while time.monotonic() < t_end:                    # 10 records/s over partitions 1..5
            n = f"t{j}"
            produce_one(p, topic, {"n": n}, partition=1 + j % (PARTS - 1))
            trickle.append(n)
            j += 1
            time.sleep(0.1)
        p.flush(10)
        time.sleep(2)
        got = seen(redis_client, names)
        assert c.proc.poll() is None, c.log_tail()
    finally:
        kill(c)
    assert got["slow"][2] is None, "the slow call should still be running"
    late = {n: (round(got[n][1] - got[n][0], 2) if n in got else "never") for n in trickle
            if n not in got or got[n][1] - got[n][0] > 1.0}
    assert not late, (f"{len(late)} of {len(trickle)} records on other partitions waited more than 1 s "
                      f"(seconds from produce to handler start) while a 60 s call ran: {dict(list(late.items())[:8])}")


def test_handler_timeout_routes_the_stuck_message_to_retry(testbed, make_topic, names, redis_client,
                                                          tmp_path) -> None:
    """Item 7 (no handler timeout): with AFC_HANDLER__TIMEOUT_S=2, a sync call stuck for 60 s
    is failed as TRANSIENT with afc.runtime.errors.HandlerTimeout and routed to `<topic>.retry`
    (header afc-exception-class), its thread abandoned; the partition moves on past it and
    afc_handler_timeouts_total counts it."""
    topic = make_topic("in", partitions=PARTS)
    c = consumer(testbed, names, tmp_path, topic, {"AFC_HANDLER__TIMEOUT_S": "2",
                                                   "AFC_ROUTING__BACKOFF_INITIAL_MS": "60000"}).start()
    from confluent_kafka import Producer
    p = Producer({"bootstrap.servers": testbed.bootstrap, "linger.ms": 0})
    try:
        c.wait_ready()
        produce_one(p, topic, {"n": "slow", "sleep_s": 60}, partition=0)
        for i in range(20):
            produce_one(p, topic, {"n": f"after{i}"}, partition=0)   # behind it, same partition
        p.flush(10)

        def timed_out() -> list:
            return [m for m in read_topic(testbed.bootstrap, topic + ".retry", timeout=3)
                    if dict(m.headers() or []).get("afc-exception-class") == b"afc.runtime.errors.HandlerTimeout"]
        routed = wait_for(timed_out, 40, 0.5, what="the stuck message on .retry with HandlerTimeout")
        wait_for(lambda: group_lag(testbed.bootstrap, topic, names.group) == (21, 0), 30, 0.5,
                 what="partition 0 committed past the stuck message")
        assert c.proc.poll() is None, c.log_tail()
        assert c.metrics().get("afc_handler_timeouts_total", 0) >= 1
    finally:
        kill(c)
    import orjson
    assert orjson.loads(routed[0].value())["n"] == "slow"
    got = seen(redis_client, names)
    assert all(f"after{i}" in got for i in range(20))


def test_too_many_abandoned_threads_exit_3_with_a_fatal_log(testbed, make_topic, names, tmp_path) -> None:
    """Item 7 (bounded abandoned threads): with AFC_HANDLER__TIMEOUT_S=1 and
    AFC_HANDLER__MAX_ABANDONED_THREADS=1, three stuck sync calls leave more abandoned threads
    than allowed: the process exits with code 3 and logs event=fatal (for a restart)."""
    topic = make_topic("in", partitions=PARTS)
    c = consumer(testbed, names, tmp_path, topic, {"AFC_HANDLER__TIMEOUT_S": "1",
                                                   "AFC_HANDLER__MAX_ABANDONED_THREADS": "1",
                                                   "AFC_ROUTING__BACKOFF_INITIAL_MS": "60000"}).start()
    try:
        c.wait_ready()
        produce_json(testbed.bootstrap, topic, [{"n": f"slow{i}", "sleep_s": 60} for i in range(3)],
                     partition_of=lambda i, d: i)
        try:
            code = c.proc.wait(45)
        except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired
            code = None
        assert code == 3, f"exit code {code} (None: still running after 45 s):\n{c.log_tail()}"
        assert "event=fatal" in (tmp_path / "c.log").read_text(), c.log_tail()
    finally:
        kill(c)
