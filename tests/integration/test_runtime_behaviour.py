"""The runtime's contract at its edges: signals, a dying Redis, async handlers, the HTTP
sink, the embedded store, failures held in place, and configuration errors."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from afctest import ROOT, ConsumerProcess, free_port, group_lag, produce_json, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.redis]


def consumer(testbed, names, tmp_path, topic, handler, env, name="c", instance=0) -> ConsumerProcess:
    return ConsumerProcess(testbed, [topic], names.group, handler, tmp_path / f"{name}.log",
                           instance_id=f"{names.stem}-{instance}", env=env, redis_prefix=names.redis_prefix)


def total_runs(redis_client, key: str) -> int:
    return sum(int(v) for v in redis_client.hgetall(key).values())


def test_sigterm_finishes_inflight_work_commits_and_exits(testbed, make_topic, names, redis_client, tmp_path) -> None:
    topic = make_topic("in", partitions=4)
    produce_json(testbed.bootstrap, topic, [{"n": i} for i in range(400)], key_of=lambda i, d: str(i).encode())
    runs = f"{names.redis_prefix}runs"
    c = consumer(testbed, names, tmp_path, topic, "afc_test_handlers:slow_count",
                 {"AFC_TEST_HASH": runs, "AFC_TEST_SLEEP_MS": "200", "AFC_SHUTDOWN__DRAIN_TIMEOUT_S": "15",
                  "AFC_FLOW__TARGET_LATENCY_MS": "1000"}).start()
    c.wait_ready()
    wait_for(lambda: total_runs(redis_client, runs) >= 20, 60, what="some work done")
    inflight = c.metrics().get("afc_inflight_messages", 0)
    t0 = time.monotonic()
    assert c.stop(timeout=30) == 0, c.log_tail()
    took = time.monotonic() - t0
    committed, _ = group_lag(testbed.bootstrap, topic, names.group)
    ran = redis_client.hgetall(runs)
    # Everything committed ran, and everything that ran was committed: nothing lost, no replay owed.
    assert committed == len(ran), (committed, len(ran), inflight)
    assert set(int(v) for v in ran.values()) == {1}
    assert took < 15 + 5
    log = (tmp_path / "c.log").read_text()
    assert "event=draining" in log and "event=stopped unfinished=0" in log


def test_a_consumer_that_caught_up_commits_without_waiting_for_the_interval(testbed, make_topic, names, redis_client,
                                                                           tmp_path) -> None:
    """The committed lag an autoscaler or a dashboard reads is current once the consumer has
    caught up, whatever offsets.commitIntervalMs is (here a minute): offsets.caughtUpCommitMs
    (0.1 s by default). test_routing's kill -9 test shows that 0 turns it off."""
    topic = make_topic("in", partitions=2)
    produce_json(testbed.bootstrap, topic, [{"n": i} for i in range(50)])
    runs = f"{names.redis_prefix}runs"
    c = consumer(testbed, names, tmp_path, topic, "afc_test_handlers:slow_count",
                 {"AFC_TEST_HASH": runs, "AFC_OFFSETS__COMMIT_INTERVAL_MS": "60000"}).start()
    try:
        c.wait_ready()
        t0 = time.monotonic()
        wait_for(lambda: group_lag(testbed.bootstrap, topic, names.group) == (50, 0), 30, 0.2,
                 what="every record committed, well before the 60 s commit interval")
        assert time.monotonic() - t0 < 30 and total_runs(redis_client, runs) == 50
    finally:
        rc = c.stop(timeout=30)
    assert rc == 0, c.log_tail()


def test_second_signal_exits_at_once(testbed, make_topic, names, redis_client, tmp_path) -> None:
    topic = make_topic("in", partitions=1)
    produce_json(testbed.bootstrap, topic, [{"n": i} for i in range(20)])
    runs = f"{names.redis_prefix}runs"
    c = consumer(testbed, names, tmp_path, topic, "afc_test_handlers:slow_count",
                 {"AFC_TEST_HASH": runs, "AFC_TEST_SLEEP_MS": "10000", "AFC_SHUTDOWN__DRAIN_TIMEOUT_S": "60"}).start()
    c.wait_ready()
    wait_for(lambda: c.metrics().get("afc_inflight_messages", 0) > 0, 30, what="a message in the handler")
    c.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "event=draining" in (tmp_path / "c.log").read_text(), 10, what="the drain to start")
    assert c.proc.poll() is None                                 # draining: waiting on the 10 s handler
    t0 = time.monotonic()
    c.proc.send_signal(signal.SIGTERM)
    assert c.proc.wait(5) == 128 + signal.SIGTERM
    assert time.monotonic() - t0 < 3
    assert group_lag(testbed.bootstrap, topic, names.group)[0] == 0   # nothing unfinished was committed
    c._log.close()


def start_private_redis(port: int, data: Path) -> subprocess.Popen:
    data.mkdir(parents=True, exist_ok=True)
    p = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data),
                          "--save", "", "--appendonly", "yes", "--appendfsync", "always"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, 10, what="private redis")
    return p


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server (Debian) not installed")
def test_idempotency_store_down_pauses_then_resumes_without_duplicates(testbed, make_topic, names,
                                                                         redis_client, tmp_path) -> None:
    """A second, private Redis holds the dedup keys; it dies mid-run and comes back."""
    port = free_port()
    store = start_private_redis(port, tmp_path / "redis")
    topic = make_topic("in", partitions=6)
    n = 3000
    produce_json(testbed.bootstrap, topic, [{"n": i} for i in range(n)], key_of=lambda i, d: str(i).encode())
    runs = f"{names.redis_prefix}runs"
    c = consumer(testbed, names, tmp_path, topic, "afc_test_handlers:slow_count",
                 {"AFC_TEST_HASH": runs, "AFC_TEST_SLEEP_MS": "2",
                  "AFC_IDEMPOTENCY__REDIS_URL": f"redis://127.0.0.1:{port}/0"}).start()
    try:
        c.wait_ready()
        wait_for(lambda: total_runs(redis_client, runs) >= 300, 60, what="some work done")
        store.terminate()
        store.wait(10)
        wait_for(lambda: "event=idempotency-store-down" in (tmp_path / "c.log").read_text(), 30,
                 what="the store outage noticed")
        time.sleep(2)
        frozen = total_runs(redis_client, runs)
        time.sleep(2)
        assert total_runs(redis_client, runs) == frozen            # nothing handled without dedup
        assert c.http("/healthz")[0] == 200 and c.proc.poll() is None
        m = c.metrics()
        assert m["afc_paused_partitions"] == m["afc_assigned_partitions"] == 12   # 6 source + 6 retry
        store = start_private_redis(port, tmp_path / "redis")      # same data (append-only file)
        wait_for(lambda: group_lag(testbed.bootstrap, topic, names.group)[1] == 0, 120, 0.5,
                 what="catch up after the store is back")
    finally:
        c.stop()
        store.terminate()
        store.wait(10)
    ran = redis_client.hgetall(runs)
    assert len(ran) == n and set(int(v) for v in ran.values()) == {1}
    assert "event=idempotency-store-back" in (tmp_path / "c.log").read_text()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_async_handler_keeps_key_order_and_runs_keys_concurrently(testbed, make_topic, names, redis_client,
                                                                   tmp_path, loop) -> None:
    """On either event loop (handler.eventLoop; uvloop by default, the case without the
    setting), the handler runs on the loop asked for."""
    topic = make_topic("in", partitions=3)
    keys, per_key = 40, 50
    docs = [{"k": i % keys, "seq": i // keys} for i in range(keys * per_key)]
    produce_json(testbed.bootstrap, topic, docs, key_of=lambda i, d: f"key{d['k']}".encode())
    lists = f"{names.redis_prefix}seq"
    env = {"AFC_TEST_LIST": lists, "AFC_TEST_MAX_CONC": f"{names.redis_prefix}conc",
           "AFC_TEST_LOOP_KEY": f"{names.redis_prefix}loop"}
    if loop != "uvloop":
        env["AFC_HANDLER__EVENT_LOOP"] = loop
    c = consumer(testbed, names, tmp_path, topic, "afc_test_handlers:async_ordered", env).start()
    try:
        wait_for(lambda: group_lag(testbed.bootstrap, topic, names.group)[1] == 0, 120, 0.5, what="all handled")
    finally:
        assert c.stop() == 0, c.log_tail()
    for k in range(keys):
        seen = [int(x) for x in redis_client.lrange(f"{lists}:key{k}", 0, -1)]
        assert seen == list(range(per_key)), (k, seen[:10])
    assert int(redis_client.get(f"{names.redis_prefix}conc")) > 1
    assert redis_client.get(f"{names.redis_prefix}loop") == loop.encode()
    assert f"loop={loop}" in (tmp_path / "c.log").read_text()


def test_http_sink_posts_each_message_and_retries_a_503_later(testbed, make_topic, names, tmp_path) -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    got: list[dict] = []
    refused: list[int] = []

    class Sink(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if body["payload"]["n"] == 3 and not refused:
                refused.append(1)
                self.send_response(503)
                self.end_headers()
                return
            got.append(body)
            self.send_response(204)
            self.end_headers()

        def log_message(self, *a) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    topic = make_topic("in", partitions=1)
    produce_json(testbed.bootstrap, topic, [{"n": i} for i in range(10)],
                 headers_of=lambda i, d: [("trace", b"t%d" % i)])
    c = consumer(testbed, names, tmp_path, topic, None,
                 {"AFC_HANDLER__HTTP_SINK_URL": f"http://127.0.0.1:{server.server_port}/events",
                  "AFC_ROUTING__BACKOFF_INITIAL_MS": "200"}).start()
    try:
        wait_for(lambda: len(got) == 10, 60, 0.3, what="all posted, the 503 through the retry topic")
    finally:
        assert c.stop() == 0, c.log_tail()
        server.shutdown()
    assert sorted(b["payload"]["n"] for b in got) == list(range(10))      # the 503 was retried, once
    assert refused == [1]
    first = next(b for b in got if b["payload"]["n"] == 0)
    assert first["topic"] == topic and first["headers"] == [["trace", "dDA="]] and first["offset"] == 0


def test_embedded_store_without_redis_warns_and_dedups_in_process(testbed, make_topic, names, redis_client,
                                                                  tmp_path) -> None:
    topic = make_topic("in", partitions=2)
    produce_json(testbed.bootstrap, topic, [{"n": i % 50} for i in range(100)],
                 headers_of=lambda i, d: [("idempotency-key", b"k%d" % d["n"])])
    runs = f"{names.redis_prefix}runs"
    c = consumer(testbed, names, tmp_path, topic, "afc_test_handlers:slow_count",
                 {"AFC_TEST_HASH": runs, "AFC_IDEMPOTENCY__REDIS_URL": ""}).start()
    try:
        wait_for(lambda: group_lag(testbed.bootstrap, topic, names.group)[1] == 0, 60, 0.3, what="all handled")
    finally:
        assert c.stop() == 0, c.log_tail()
    ran = redis_client.hgetall(runs)
    assert len(ran) == 50 and set(int(v) for v in ran.values()) == {1}
    assert "event=embedded-idempotency-store" in (tmp_path / "c.log").read_text()


def test_failing_handler_without_routing_holds_the_partition(testbed, make_topic, names, redis_client,
                                                                         tmp_path) -> None:
    topic = make_topic("in", partitions=1)
    produce_json(testbed.bootstrap, topic, [{"n": i} for i in range(5)])
    runs, flag = f"{names.redis_prefix}runs", f"{names.redis_prefix}fail"
    redis_client.set(flag, 1)
    c = consumer(testbed, names, tmp_path, topic, "afc_test_handlers:fails_until",
                 {"AFC_TEST_HASH": runs, "AFC_TEST_FAIL_KEY": flag, "AFC_ROUTING__ENABLED": "false"}).start()
    try:
        wait_for(lambda: total_runs(redis_client, runs + ":failures") >= 10, 60, what="retries")
        assert group_lag(testbed.bootstrap, topic, names.group)[0] == 0      # never committed past a failure
        redis_client.delete(flag)
        wait_for(lambda: group_lag(testbed.bootstrap, topic, names.group) == (5, 0), 60, 0.3, what="recovery")
    finally:
        assert c.stop() == 0, c.log_tail()
    assert set(int(v) for v in redis_client.hgetall(runs).values()) == {1}
    assert "error_class=ConnectionError" in (tmp_path / "c.log").read_text()


@pytest.mark.parametrize("args, env, says", [
    (["--handler", "not a path"], {}, "handler.handler"),
    (["--handler", "nosuch_module_xyz:f"], {}, "cannot import nosuch_module_xyz"),
    (["--handler", "afc.runtime.handlers:noop"], {"AFC_KAFKA__TOPICS": "[]"}, "kafka.topics"),
    (["--handler", "afc.runtime.handlers:noop"], {"AFC_FLOW__MIN_INFLIGHT": "-3"}, "flow.minInflight"),
    (["--handler", "afc.runtime.handlers:noop"], {"AFC_CONFIG_FILE": "/nonexistent.json"}, "no such file"),
])
def test_configuration_errors_exit_2_with_the_field(testbed, args, env, says) -> None:
    r = subprocess.run([str(ROOT / ".venv" / "bin" / "afc-consumer"), "run", *args], capture_output=True,
                       text=True, timeout=60, env={**os.environ, "AFC_KAFKA__TOPICS": '["t"]',
                                                   "AFC_KAFKA__BOOTSTRAP_SERVERS": testbed.bootstrap, **env})
    assert r.returncode == 2, r.stderr
    assert "event=config-error" in r.stderr and says in r.stderr, r.stderr
