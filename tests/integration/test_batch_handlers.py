"""Batch handlers (issue 13) on the real broker and Redis: exactly-once effects written in
one MULTI per batch (across a kill -9), a BatchFailure routing only the named messages, a
whole-batch exception routing all, and mark_batch_done_in's fencing."""
from __future__ import annotations

import asyncio
import base64
import os
import signal
import time
from contextlib import contextmanager

import pytest

from afc.runtime.routing import H_ATTEMPTS, H_ERR_CLASS, H_ERR_MESSAGE, H_ORIG_OFFSET, H_ORIG_TOPIC
from afctest import ConsumerProcess, group_lag, produce_json, read_topic, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.redis]
HANDLER = "afc_batch_handlers:apply_batch"
GUARDED = "afc_batch_handlers:guarded_batch"


def read_all(bootstrap: str, topic: str, want: int, timeout: float = 30) -> list:
    """`want` records of `topic`, then all it holds (read again from the start, for 2 s)."""
    read_topic(bootstrap, topic, until=lambda ms: len(ms) >= want, timeout=timeout)
    return read_topic(bootstrap, topic, until=lambda ms: False, timeout=2)


def consumer(testbed, names, tmp_path, topic, extra=None, name="c", handler=HANDLER,
             instance="0") -> ConsumerProcess:
    env = {"AFC_TEST_LIST": f"{names.redis_prefix}effects", "AFC_TEST_HASH": f"{names.redis_prefix}h",
           "AFC_IDEMPOTENCY__LEASE_MS": "2000", "AFC_MEMBERSHIP__SESSION_TIMEOUT_MS": "10000",
           "AFC_ROUTING__BACKOFF_INITIAL_MS": "200", "AFC_ROUTING__BACKOFF_MAX_MS": "500",
           "AFC_HANDLER__MAX_BATCH": "200", **(extra or {})}
    return ConsumerProcess(testbed, [topic], names.group, handler, tmp_path / f"{name}.log",
                           instance_id=f"{names.stem}-{instance}", env=env, redis_prefix=names.redis_prefix).start()


@contextmanager
def frozen(proc):
    """The process stopped (SIGSTOP) for the block: it can neither run nor renew anything."""
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(proc.pid, signal.SIGCONT)


def effects(redis_client, names) -> list[int]:
    return [int(x.split(b":")[2]) for x in redis_client.lrange(f"{names.redis_prefix}effects", 0, -1)]


def test_a_batch_handler_applies_every_record_exactly_once_across_a_kill9(
        testbed, make_topic, names, redis_client, tmp_path) -> None:
    n = 20_000
    topic = make_topic("in", partitions=6)
    produce_json(testbed.bootstrap, topic, [{"n": i} for i in range(n)], key_of=lambda i, d: str(i % 500).encode())
    c = consumer(testbed, names, tmp_path, topic)
    wait_for(lambda: redis_client.llen(f"{names.redis_prefix}effects") >= n // 3 or c._died(), 120, 0.02,
             what="a third of the effects before the kill")
    assert not c._died(), c.log_tail()
    c.kill9()
    c = consumer(testbed, names, tmp_path, topic, name="c2")
    try:
        wait_for(lambda: group_lag(testbed.bootstrap, topic, names.group)[1] == 0, 180, 0.5,
                 what="the group to catch up")
        m = c.metrics()
    finally:
        assert c.stop() == 0, c.log_tail()
    seen = effects(redis_client, names)
    assert len(seen) - len(set(seen)) == 0, f"{len(seen) - len(set(seen))} effects applied twice"
    assert set(seen) == set(range(n)), f"{n - len(set(seen))} effects missing"
    sizes = [int(x) for x in redis_client.lrange(f"{names.redis_prefix}h:sizes", 0, -1)]
    assert max(sizes) > 1 and max(sizes) <= 200, f"batch sizes {min(sizes)}..{max(sizes)}"
    # metrics are per message: the second consumer counted each record it handled once
    handled = m.get("afc_messages_handled_total", 0)
    assert 0 < handled <= n, m


def test_a_batch_failure_routes_only_the_named_messages_and_the_rest_are_done(
        testbed, make_topic, names, redis_client, tmp_path) -> None:
    topic = make_topic("in", partitions=1)
    docs = [{"n": i} for i in range(60)]
    docs[10] = {"n": 10, "fail": "permanent"}
    docs[20] = {"n": 20, "fail": "transient", "times": 1}
    produce_json(testbed.bootstrap, topic, docs, key_of=lambda i, d: str(i % 7).encode())
    # a long lease: no renewal touches a WATCHed key mid-transaction (that would run a batch
    # again, rightly, and count runs this test says must not happen)
    c = consumer(testbed, names, tmp_path, topic, {"AFC_IDEMPOTENCY__LEASE_MS": "60000"})
    try:
        dlq = read_all(testbed.bootstrap, topic + ".dlq", 1)
        retry = read_all(testbed.bootstrap, topic + ".retry", 1)
        wait_for(lambda: 20 in effects(redis_client, names), 30, 0.2, what="the retried record's effect")
        wait_for(lambda: group_lag(testbed.bootstrap, topic, names.group)[1] == 0, 30, 0.3, what="source drained")
        wait_for(lambda: group_lag(testbed.bootstrap, topic + ".retry", names.group)[1] == 0, 30, 0.3,
                 what="retry topic drained")
    finally:
        assert c.stop() == 0, c.log_tail()
    assert [int(dict(m.headers())[H_ORIG_OFFSET]) for m in dlq] == [10]
    h = dict(dlq[0].headers())
    assert h[H_ORIG_TOPIC].decode() == topic and h[H_ERR_CLASS].decode().endswith("ValueError")
    assert h[H_ERR_MESSAGE].decode() == "invalid record 10"
    assert [int(dict(m.headers())[H_ORIG_OFFSET]) for m in retry] == [20]
    assert int(dict(retry[0].headers())[H_ATTEMPTS]) == 1
    seen = effects(redis_client, names)
    assert sorted(seen) == [i for i in range(60) if i != 10], seen        # 20 after its retry, once
    runs = {k.decode(): int(v) for k, v in redis_client.hgetall(f"{names.redis_prefix}h:runs").items()}
    again = {k: v for k, v in runs.items() if v != 1}
    # only the transient record ran twice (its retry); nothing done was run again
    assert len(runs) == 60 and list(again.values()) == [2], again
    sizes = [int(x) for x in redis_client.lrange(f"{names.redis_prefix}h:sizes", 0, -1)]
    assert max(sizes) > 2, sizes      # the failures were named inside a real batch


def test_an_exception_from_a_batch_handler_routes_every_message_of_the_batch(
        testbed, make_topic, names, redis_client, tmp_path) -> None:
    topic = make_topic("in", partitions=1)
    produce_json(testbed.bootstrap, topic, [{"n": i, "boom": True} for i in range(25)])
    c = consumer(testbed, names, tmp_path, topic, {"AFC_ROUTING__MAX_ATTEMPTS": "1"})
    try:
        dlq = read_all(testbed.bootstrap, topic + ".dlq", 25, timeout=60)
        wait_for(lambda: group_lag(testbed.bootstrap, topic, names.group)[1] == 0, 30, 0.3, what="source drained")
    finally:
        assert c.stop() == 0, c.log_tail()
    assert sorted(int(dict(m.headers())[H_ORIG_OFFSET]) for m in dlq) == list(range(25))
    assert all(dict(m.headers())[H_ERR_MESSAGE] == b"bulk write refused" for m in dlq)
    assert effects(redis_client, names) == []
    sizes = [int(x) for x in redis_client.lrange(f"{names.redis_prefix}h:sizes", 0, -1)]
    assert max(sizes) > 1, sizes


def test_mark_batch_done_in_is_one_fenced_transaction(testbed, names, redis_client) -> None:
    """All done marks and the effect in one MULTI; a claim lost on any one key refuses all."""
    import redis
    from redis.exceptions import WatchError

    from afc.runtime import ClaimLost, mark_batch_done_in
    from afc.runtime.idempotency import Batch, Claim, RedisStore
    from afc.runtime.message import Message

    store = RedisStore(testbed.redis_url, names.redis_prefix.rstrip(":"), names.group, "me:1", 30_000, 600)
    keys = [f"k{i}" for i in range(5)]
    loop = asyncio.new_event_loop()
    try:
        ans = loop.run_until_complete(store.apply(Batch(claims=keys, seq0=1)))
        assert ans.claims == [Claim.CLAIMED] * 5
    finally:
        loop.run_until_complete(store.close())
        loop.close()

    def msgs(ks: list[str]) -> list[Message]:
        out = []
        for k in ks:
            m = Message("t", 0, 0, None, b"{}", None, 0, {}, None, k)
            m._store, m.token = store, f"me:1.{keys.index(k) + 1}"
            out.append(m)
        return out

    r = redis.Redis.from_url(testbed.redis_url)
    effect = f"{names.redis_prefix}effect"
    ns = store.namespace

    # a stale owner: another worker took k3 -> nothing applied, no key marked done
    r.set(ns + "k3", "other:9.1")
    pipe = r.pipeline(transaction=True)
    pipe.incr(effect)
    with pytest.raises(ClaimLost):
        mark_batch_done_in(pipe, msgs(keys))
    assert r.get(effect) is None and all(r.get(ns + k) != b"d" for k in keys)

    # the claim is taken between the check and EXEC -> WatchError, nothing applied
    pipe = r.pipeline(transaction=True)
    pipe.incr(effect)
    batch = msgs(keys[:3])
    mark_batch_done_in(pipe, batch)
    redis_client.set(ns + "k1", "other:9.2")
    with pytest.raises(WatchError):
        pipe.execute()
    assert r.get(effect) is None and all(r.get(ns + k) != b"d" for k in keys)
    assert all(m._fenced for m in batch)      # the runtime reads WatchError as a lost claim

    # held: the effect and every done mark in one transaction
    pipe = r.pipeline(transaction=True)
    pipe.incr(effect)
    mark_batch_done_in(pipe, msgs(["k0", "k2", "k4"]))
    pipe.execute()
    assert r.get(effect) == b"1" and [r.get(ns + k) for k in ("k0", "k2", "k4")] == [b"d"] * 3
    assert r.ttl(ns + "k0") > 500

    # the same with redis.asyncio: k1 is someone else's now
    async def with_asyncio() -> None:
        import redis.asyncio as aredis

        from afc.runtime import mark_batch_done_in_async
        ar = aredis.Redis.from_url(testbed.redis_url)
        try:
            pipe = ar.pipeline(transaction=True)
            pipe.incr(effect)
            with pytest.raises(ClaimLost):
                await mark_batch_done_in_async(pipe, msgs(["k1"]))
            await pipe.reset()
            assert await ar.get(effect) == b"1"
            with pytest.raises(TypeError):                 # the sync call refuses an asyncio pipeline
                mark_batch_done_in(ar.pipeline(transaction=True), msgs(["k0"]))
            st = RedisStore(testbed.redis_url, names.redis_prefix.rstrip(":"), names.group, "me:1", 30_000, 600)
            assert (await st.apply(Batch(claims=["k5", "k6"], seq0=10))).claims == [Claim.CLAIMED] * 2
            fresh = []
            for i, k in enumerate(["k5", "k6"]):
                m = Message("t", 0, 0, None, b"{}", None, 0, {}, None, k)
                m._store, m.token = st, f"me:1.{10 + i}"
                fresh.append(m)
            pipe = ar.pipeline(transaction=True)
            pipe.incr(effect)
            await mark_batch_done_in_async(pipe, fresh)
            await pipe.execute()
            assert await ar.get(effect) == b"2" and [await ar.get(ns + k) for k in ("k5", "k6")] == [b"d"] * 2
            await st.close()
        finally:
            await ar.aclose()
    asyncio.run(with_asyncio())
    r.close()


def json_endpoint(respond):
    """A local HTTP endpoint on a thread: each POST's JSON body goes to `respond`, whose
    return value is the status answered."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Endpoint(BaseHTTPRequestHandler):
        log_message = staticmethod(lambda *a: None)

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            status = respond(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(status)
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_the_http_sinks_batch_mode_posts_json_arrays_and_a_refused_batch_is_retried_whole(
        testbed, make_topic, names, tmp_path) -> None:
    accepted: list[list[dict]] = []
    refused: list[list[int]] = []

    def respond(body: list[dict]) -> int:
        ns = [d["payload"]["n"] for d in body]
        if 3 in ns and not refused:
            refused.append(ns)
            return 503
        accepted.append(body)
        return 204

    server = json_endpoint(respond)
    topic = make_topic("in", partitions=3)
    produce_json(testbed.bootstrap, topic, [{"n": i} for i in range(300)], key_of=lambda i, d: str(i % 11).encode())
    c = ConsumerProcess(testbed, [topic], names.group, None, tmp_path / "c.log", instance_id=f"{names.stem}-0",
                        redis_prefix=names.redis_prefix,
                        env={"AFC_HANDLER__HTTP_SINK_URL": f"http://127.0.0.1:{server.server_port}/events",
                             "AFC_HANDLER__HTTP_BATCH": "true", "AFC_HANDLER__MAX_BATCH": "100",
                             "AFC_ROUTING__BACKOFF_INITIAL_MS": "200"}).start()
    try:
        wait_for(lambda: sum(len(b) for b in accepted) >= 300, 60, 0.3, what="all posted, the 503'd batch retried")
        wait_for(lambda: group_lag(testbed.bootstrap, topic, names.group)[1] == 0, 30, 0.3, what="source drained")
    finally:
        assert c.stop() == 0, c.log_tail()
        server.shutdown()
    posted = [d["payload"]["n"] for b in accepted for d in b]
    assert sorted(posted) == list(range(300)), "each record accepted exactly once"
    assert all(isinstance(b, list) and 1 <= len(b) <= 100 for b in accepted)
    assert max(len(b) for b in accepted) > 1 and len(refused) == 1 and len(refused[0]) > 1, refused
    doc = next(d for b in accepted for d in b if d["topic"] == topic)       # not one retried (on .retry)
    assert base64.b64decode(doc["key"]) == str(doc["payload"]["n"] % 11).encode() and set(doc) == {
        "topic", "partition", "offset", "timestamp", "key", "headers", "idempotencyKey", "payload"}


def test_a_stale_owners_batch_transaction_applies_nothing_and_its_own_messages_run_again(
        testbed, make_topic, names, redis_client, tmp_path) -> None:
    """Consumer A is inside a batch call for 5 records when it is frozen (SIGSTOP) past its
    1.5 s lease; consumer B (same group, another topic) then claims the idempotency key of one
    of them, `dup-3`, and applies it. When A thaws, `mark_batch_done_in` must refuse A's whole
    MULTI (ClaimLost): none of A's effects applied then. A's other four are claimed again and
    applied once; `dup-3` only by B."""
    t_a, t_b = make_topic("a", partitions=1), make_topic("b", partitions=1)
    lst = f"{names.redis_prefix}effects"
    env = {"AFC_IDEMPOTENCY__LEASE_MS": "1500", "AFC_ROUTING__BACKOFF_INITIAL_MS": "60000",
           "AFC_ROUTING__BACKOFF_MAX_MS": "60000"}
    a = consumer(testbed, names, tmp_path, t_a, {**env, "AFC_TEST_WHO": "A"}, "A", GUARDED, "A")
    b = consumer(testbed, names, tmp_path, t_b, {**env, "AFC_TEST_WHO": "B"}, "B", GUARDED, "B")
    key = lambda i, d: [("idempotency-key", b"dup-3" if d["n"] == 3 else f"{names.stem}-a-{d['n']}".encode())]  # noqa: E731
    try:
        a.wait_ready()
        b.wait_ready()
        produce_json(testbed.bootstrap, t_a, [{"n": n, "sleep_ms": 2000} for n in range(1, 6)], headers_of=key)
        wait_for(lambda: redis_client.lrange(f"{lst}:started", 0, -1) == [b"A:1,2,3,4,5"], 30, 0.05,
                 what="A in the batch call for all five")
        with frozen(a.proc):
            time.sleep(3)                                 # A's leases (1.5 s) run out; A cannot renew
            produce_json(testbed.bootstrap, t_b, [{"n": 3}], headers_of=key)
            wait_for(lambda: b"B:ok" in redis_client.lrange(f"{lst}:outcome", 0, -1), 30, 0.1,
                     what="B to claim the expired key and apply its effect")
        wait_for(lambda: len(redis_client.lrange(lst, 0, -1)) >= 5, 30, 0.1, what="A's four applied after all")
        wait_for(lambda: group_lag(testbed.bootstrap, t_a, names.group)[1] == 0, 30, 0.3, what="A's topic drained")
        time.sleep(1)                                     # and nothing more after that
    finally:
        codes = [c.stop() for c in (a, b)]
    assert codes == [0, 0], a.log_tail() + b.log_tail()
    effects_ = sorted(redis_client.lrange(lst, 0, -1))
    outcomes = redis_client.lrange(f"{lst}:outcome", 0, -1)
    started = redis_client.lrange(f"{lst}:started", 0, -1)
    assert effects_ == [b"A:1", b"A:2", b"A:4", b"A:5", b"B:3"], (effects_, outcomes, started)
    assert outcomes[:2] == [b"B:ok", b"A:afc.runtime.errors.ClaimLost"], (outcomes, started)
    # A may run a batch with dup-3 again while it still believes it holds the claims (a fenced
    # retry); every such call is refused as a whole, and its records' effects come only later
    with3 = [x for x in started if x.startswith(b"A:") and b"3" in x[2:].split(b",")]
    assert outcomes.count(b"A:afc.runtime.errors.ClaimLost") >= len(with3) >= 1, (outcomes, started)
