"""Batch handlers (issue 13): cutting chunks into batches, a batch call's outcome as
per-message results, the dispatchers calling a batch handler, the HTTP sink's batch mode."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from afc.runtime import BatchFailure, Message, batch
from afc.runtime.config import HandlerSettings
from afc.runtime.dispatch import (Outcome, TaskDispatcher, ThreadDispatcher, _behind, batch_outcomes,
                                  next_batch)
from afc.runtime.errors import HandlerTimeout, PermanentError, TransientError
from afc.runtime.handlers import HttpBatchSink, HttpSink, build_handler, is_batch


def msg(offset: int, key: bytes | None = b"k") -> Message:
    m = Message("t", 0, offset, key, b"{}", None, int(time.time() * 1000), {"n": offset}, None, f"id-{offset}")
    m.claimed = True
    return m


# ------------------------------------------------------------------ pure parts


def test_next_batch_takes_up_to_max_in_order_and_holds_a_failed_keys_records() -> None:
    ms = [msg(0, b"a"), msg(1, b"b"), msg(2, b"a"), msg(3, None), msg(4, b"c")]
    b, held, nxt = next_batch(ms, 0, 5, 2, None)
    assert (b, held, nxt) == (ms[:2], [], 2)
    b, held, nxt = next_batch(ms, 2, 5, 2, {b"a"})
    assert b == [ms[3], ms[4]] and held == [ms[2]] and nxt == 5
    b, held, nxt = next_batch(ms, 0, 3, 10, None)        # stops at the cut
    assert b == ms[:3] and nxt == 3


def test_batch_outcomes_map_a_batch_failure_to_the_named_messages_only() -> None:
    ms = [msg(i, None) for i in range(4)]
    assert batch_outcomes(ms, None) == [(m, None) for m in ms]
    bad1, bad3 = ValueError("one"), TransientError("three")
    out = batch_outcomes(ms, BatchFailure({ms[1]: bad1, ms[3]: bad3}))
    assert out == [(ms[0], None), (ms[1], bad1), (ms[2], None), (ms[3], bad3)]
    boom = RuntimeError("whole batch")
    assert batch_outcomes(ms, boom) == [(m, boom) for m in ms]
    # a message not in this batch is ignored, not invented into the results
    out = batch_outcomes(ms[:2], BatchFailure({ms[3]: bad3}))
    assert out == [(ms[0], None), (ms[1], None)]


def test_batch_failure_refuses_a_value_that_is_not_an_exception() -> None:
    m = msg(0)
    with pytest.raises(TypeError):
        BatchFailure({m: "bad"})
    assert BatchFailure({m: ValueError("x")}).failures[m].args == ("x",)


def test_records_taken_behind_a_stuck_batch_wait_behind_their_keys_running_record() -> None:
    a, b = msg(0, b"a"), msg(1, b"b")
    later_a, later_b, other, nokey = msg(2, b"a"), msg(3, b"b"), msg(4, b"c"), msg(5, None)
    taken = _behind([a, b], [later_a, later_b, other, nokey])
    assert taken == [(a, [later_a, other, nokey]), (b, [later_b])]
    assert _behind([a], [later_a, other]) == [(a, [later_a, other])]


def test_batch_marks_functions_and_classes_and_the_http_sinks_mode_is_one() -> None:
    @batch
    def f(msgs: list[Message]) -> None: ...

    def g(m: Message) -> None: ...
    assert is_batch(f) and not is_batch(g)
    s = HandlerSettings(http_sink_url="http://127.0.0.1:1/x", http_batch=True)
    sink, _ = build_handler(s)
    assert isinstance(sink, HttpBatchSink) and is_batch(sink)
    sink, _ = build_handler(HandlerSettings(http_sink_url="http://127.0.0.1:1/x"))
    assert type(sink) is HttpSink and not is_batch(sink)


# ------------------------------------------------------------------ dispatchers


def run_threads(handler, msgs, max_batch, workers=1, timeout_s=0.0):
    got: list = []
    loop = asyncio.new_event_loop()
    try:
        d = ThreadDispatcher(handler, workers, loop, got.extend, timeout_s, 10.0, 4, max_batch)
        d.submit(msgs)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(got) < len(msgs):
            loop.run_until_complete(asyncio.sleep(0.01))
        loop.run_until_complete(d.close(1))
        return got, d
    finally:
        loop.close()


def test_a_sync_batch_handler_is_called_once_per_batch_with_per_message_results() -> None:
    calls: list[list[int]] = []

    @batch
    def handler(msgs: list[Message]) -> None:
        calls.append([m.offset for m in msgs])
        time.sleep(0.01)

    ms = [msg(i, str(i % 3).encode()) for i in range(10)]
    got, _ = run_threads(handler, ms, 4)
    assert calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert sorted(r[0].offset for r in got) == list(range(10)) and all(r[1] is Outcome.OK for r in got)
    # each message's handler time is its share of the call
    by = {r[0].offset: r for r in got}
    assert by[0][3] == pytest.approx(by[3][3]) and 0.001 < by[0][3] < 0.01


def test_a_batch_failure_fails_only_the_named_and_holds_their_keys_later_records() -> None:
    @batch
    def handler(msgs: list[Message]) -> None:
        bad = [m for m in msgs if m.offset in (1, 6)]
        if bad:
            raise BatchFailure({m: ValueError(f"bad {m.offset}") for m in bad})

    # key a: 0, 1 (fails), 5 (next batch: held); key b: 2, 6 (fails); keyless 3, 4
    ms = [msg(0, b"a"), msg(1, b"a"), msg(2, b"b"), msg(3, None), msg(4, None), msg(5, b"a"), msg(6, b"b")]
    got, _ = run_threads(handler, ms, 5)
    by = {r[0].offset: r for r in got}
    assert {o for o, r in by.items() if r[1] is Outcome.OK} == {0, 2, 3, 4}
    assert by[1][1] is Outcome.FAILED and str(by[1][2]) == "bad 1"
    assert by[5][1] is Outcome.HELD                     # behind the failed record of its key
    assert by[6][1] is Outcome.FAILED and str(by[6][2]) == "bad 6"


def test_any_other_exception_fails_the_whole_batch() -> None:
    @batch
    def handler(msgs: list[Message]) -> None:
        raise PermanentError("bulk write refused")

    got, _ = run_threads(handler, [msg(i, None) for i in range(5)], 10)
    assert len(got) == 5 and all(r[1] is Outcome.FAILED and str(r[2]) == "bulk write refused" for r in got)


def test_a_stuck_sync_batch_is_timed_out_as_a_whole() -> None:
    release, started = threading.Event(), threading.Event()

    @batch
    def handler(msgs: list[Message]) -> None:
        if msgs[0].offset == 0:
            started.set()
            release.wait(10)

    loop = asyncio.new_event_loop()
    try:
        d = ThreadDispatcher(handler, 1, loop, lambda r: None, 0.05, 10.0, 4, 3)
        ms = [msg(0, b"a"), msg(1, b"b"), msg(2, None), msg(3, b"a"), msg(4, b"c")]
        d.submit(ms)
        assert started.wait(5)
        time.sleep(0.1)
        s = d.watchdog()
        assert [r[0] for r in s.timed_out] == ms[:3]
        assert all(isinstance(r[2], HandlerTimeout) for r in s.timed_out)
        assert s.taken == [(ms[0], [ms[3], ms[4]])]        # key a's later record waits behind it
    finally:
        release.set()
        loop.run_until_complete(d.close(1))
        loop.close()


def test_batch_chunks_are_max_batch_long_up_to_the_workers() -> None:
    d = ThreadDispatcher(batch(lambda msgs: None), 4, asyncio.new_event_loop(), lambda r: None, 0, 10, 4, 100)
    assert [d.chunk_count(n) for n in (1, 100, 101, 250, 10_000)] == [1, 1, 2, 3, 4]


async def test_an_async_batch_handler_gets_batches_and_a_timeout_fails_every_message() -> None:
    calls: list[list[int]] = []

    @batch
    async def handler(msgs: list[Message]) -> None:
        calls.append([m.offset for m in msgs])
        if msgs[0].offset == 100:
            await asyncio.sleep(10)

    got: list = []
    d = TaskDispatcher(handler, 2, asyncio.get_running_loop(), got.extend, 0.05, 10.0, 4, 3)
    d.submit([msg(i, None) for i in range(5)])
    d.submit([msg(100, None), msg(101, None)])
    for _ in range(300):
        if len(got) == 7:
            break
        d.watchdog()                          # as the loop does every tick: it enforces the deadline
        await asyncio.sleep(0.01)
    by = {r[0].offset: r for r in got}
    assert sorted(o for o, r in by.items() if r[1] is Outcome.OK) == [0, 1, 2, 3, 4]
    assert all(isinstance(by[o][2], HandlerTimeout) for o in (100, 101))
    assert sorted(len(c) for c in calls) == [2, 2, 3]
    await d.close(1)


# ------------------------------------------------------------------ HTTP sink, batch mode


async def test_the_http_batch_sink_posts_one_json_array_per_batch_in_order() -> None:
    from aiohttp import web
    bodies: list = []
    status = {"code": 200}

    async def take(request: web.Request) -> web.Response:
        bodies.append(await request.json())
        return web.Response(status=status["code"], text="no")

    app = web.Application()
    app.router.add_post("/in", take)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    sink, close = build_handler(HandlerSettings(http_sink_url=f"http://127.0.0.1:{port}/in", http_batch=True))
    try:
        ms = [msg(7, b"k"), msg(8, None)]
        await sink(ms)
        assert len(bodies) == 1 and [d["offset"] for d in bodies[0]] == [7, 8]
        assert bodies[0][0] == {"topic": "t", "partition": 0, "offset": 7, "timestamp": ms[0].timestamp,
                                "key": "aw==", "headers": [], "idempotencyKey": "id-7", "payload": {"n": 7}}
        status["code"] = 503
        with pytest.raises(TransientError):
            await sink(ms)
        status["code"] = 400
        with pytest.raises(PermanentError):
            await sink(ms)
        assert json.dumps(bodies)            # plain JSON all the way
    finally:
        assert close is not None
        await close()
        await runner.cleanup()


def test_the_bench_batch_handlers_are_batch_handlers() -> None:
    """bench/handlers.py marks them without importing the runtime: the marker must agree."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from bench.handlers import batch_noop, batch_record_latency, noop
    assert is_batch(batch_noop) and is_batch(batch_record_latency) and not is_batch(noop)


def test_a_long_batch_call_is_stuck_only_past_four_times_its_records_mean() -> None:
    """A call over 3 records at 0.03 s each is not stuck at 0.2 s (one record would be),
    so it does not let an extra worker run beside the concurrency limit."""
    release, started = threading.Event(), threading.Event()

    @batch
    def handler(msgs: list[Message]) -> None:
        started.set()
        release.wait(10)

    loop = asyncio.new_event_loop()
    try:
        d = ThreadDispatcher(handler, 2, loop, lambda r: None, 0.0, 0.05, 4, 3)
        d.tune(0.03, 10)
        d.submit([msg(0, b"a"), msg(1, b"b"), msg(2, b"c")])
        assert started.wait(5)
        time.sleep(0.2)
        d.watchdog()
        assert d.stuck == 0
        d.tune(0.01, 10)            # now 0.2 s is over 4 x 3 x 0.01 s
        d.watchdog()
        assert d.stuck == 1
    finally:
        release.set()
        loop.run_until_complete(d.close(1))
        loop.close()


def test_records_submitted_while_the_workers_are_busy_join_one_batch() -> None:
    """Keys settle one at a time and release the records behind them a few at a time: those
    must still make one call, not one call each (before the merge: batches of 1 to 3)."""
    release, started = threading.Event(), threading.Event()
    calls: list[list[int]] = []

    @batch
    def handler(msgs: list[Message]) -> None:
        calls.append([m.offset for m in msgs])
        started.set()
        release.wait(10)

    loop = asyncio.new_event_loop()
    got: list = []
    try:
        d = ThreadDispatcher(handler, 1, loop, got.extend, 0.0, 10.0, 4, 3)
        d.submit([msg(0, b"a")])
        assert started.wait(5)
        for i, k in ((1, b"b"), (2, b"c"), (3, b"d"), (4, b"e")):
            d.submit([msg(i, k)])
        release.set()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(got) < 5:
            loop.run_until_complete(asyncio.sleep(0.01))
        assert calls == [[0], [1, 2, 3], [4]]
    finally:
        release.set()
        loop.run_until_complete(d.close(1))
        loop.close()
