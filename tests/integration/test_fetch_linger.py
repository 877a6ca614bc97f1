"""flow.fetchLingerMs on a real broker: the Kafka thread's fetch (Runtime._fetch_once) waits for
more records only when they arrive as a stream, never for a lone record or a full batch."""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from afc.runtime import consumer
from afc.runtime.consumer import Runtime
from afctest import produce_json

pytestmark = [pytest.mark.kafka]


def fetcher(testbed, names, topic: str, linger_s: float, after_first=None):
    """What _fetch reads of the runtime: its consumer (assigned, not subscribed: no group
    round to wait for) and the linger. `after_first` runs once the fetch's first poll returned."""
    from confluent_kafka import Consumer, TopicPartition
    c = Consumer({"bootstrap.servers": testbed.bootstrap, "group.id": names.group,
                  "enable.auto.commit": False, "fetch.queue.backoff.ms": 50})
    c.assign([TopicPartition(topic, 0, 0)])

    class Polled:
        """The real consumer; its poll() also starts `after_first` (to time the next records)."""
        def poll(self, timeout: float):
            m = c.poll(timeout)
            if after_first is not None:
                after_first()
            return m

        def consume(self, n: int, timeout: float):
            return c.consume(n, timeout)

    return SimpleNamespace(consumer=Polled(), _linger_s=linger_s), c


@pytest.mark.parametrize("linger_s, expect", [(5.0, 10), (0.0, 5)])
def test_a_fetch_that_finds_a_stream_waits_for_the_rest(testbed, make_topic, names, linger_s, expect) -> None:
    """5 records are there when the fetch starts and 5 more come 0.3 s after its first poll
    returned: with a linger the fetch hands on all 10 in one batch (the budget, so it stops
    waiting then); without one it hands on the 5 it found."""
    topic = make_topic("in", partitions=1)
    produce_json(testbed.bootstrap, topic, [{"n": i} for i in range(5)])
    sent: list[threading.Thread] = []

    def send_more() -> None:
        def run() -> None:
            time.sleep(0.3)
            produce_json(testbed.bootstrap, topic, [{"n": i} for i in range(5, 10)])
        sent.append(threading.Thread(target=run, daemon=True))
        sent[0].start()

    f, c = fetcher(testbed, names, topic, linger_s, after_first=send_more)
    try:
        t0 = time.monotonic()
        got = Runtime._fetch_once(f, 10, 15.0)
        took = time.monotonic() - t0
        sent[0].join(15)
    finally:
        c.close()
    assert [m.offset() for m in got] == list(range(expect))
    assert took < 4.5                                # the full budget ended the linger, not its 5 s


def test_a_lone_record_and_a_full_batch_are_not_held(testbed, make_topic, names) -> None:
    """A trickle (one record per fetch) is never held for company, nor is a batch that
    already has its whole budget: with a 5 s linger, each fetch still returns at once."""
    from confluent_kafka import TopicPartition
    topic = make_topic("in", partitions=1)
    produce_json(testbed.bootstrap, topic, [{"n": 0}])
    f, c = fetcher(testbed, names, topic, 5.0)
    try:
        t0 = time.monotonic()
        lone = Runtime._fetch_once(f, 100, 15.0)     # one record there: handed on at once
        took_lone = time.monotonic() - t0
        produce_json(testbed.bootstrap, topic, [{"n": i} for i in range(1, 6)])
        full_first = c.poll(15)                      # wait for the next fetch, then read it again
        assert full_first is not None and full_first.offset() == 1
        c.seek(TopicPartition(topic, 0, 1))
        time.sleep(1.0)                              # the refetch lands in the local queue
        t0 = time.monotonic()
        full = Runtime._fetch_once(f, 5, 15.0)       # the whole budget there: no wait
        took_full = time.monotonic() - t0
        t0 = time.monotonic()
        nothing = Runtime._fetch_once(f, 100, 0.2)   # and with nothing there, the poll's timeout
        took_nothing = time.monotonic() - t0
    finally:
        c.close()
    assert [m.offset() for m in lone] == [0] and took_lone < 4.5   # the first fetch's own wait, well under 5 s
    assert [m.offset() for m in full] == [1, 2, 3, 4, 5] and took_full < 2.5
    assert nothing == [] and took_nothing < 2.5


def ticket(f, posted: list, on_part=None):
    """What Runtime._fetch reads beside _fetch_once: the counters of Kafka calls sent and
    begun, the state, and where parts go (on the loop's side, `posted`)."""
    f._k_sent = f._k_started = 0
    f.state = "running"
    f._fetch_once = lambda budget, timeout: Runtime._fetch_once(f, budget, timeout)

    def post(event) -> None:
        posted.append(event)
        if on_part is not None:
            on_part(len(posted))
    f._post_threadsafe = post
    return f


def test_a_fetch_hands_records_over_in_parts_until_a_kafka_call_waits(testbed, make_topic, names, monkeypatch) -> None:
    """A fetch that brought less than its budget hands its records over and fetches again
    (at a modest rate the loop does not wake the Kafka thread for every batch); once another
    Kafka call waits behind it (a commit, a pause) it ends with what its next fetch brought.
    Nothing is lost or handed over twice."""
    monkeypatch.setattr(consumer, "FETCH_SPAN_S", 60.0)  # so only the waiting call can end it early
    topic = make_topic("in", partitions=1)
    produce_json(testbed.bootstrap, topic, [{"n": i} for i in range(3)])
    posted: list = []

    def on_part(n: int) -> None:            # on the Kafka thread, as each part is handed over
        if n == 1:
            produce_json(testbed.bootstrap, topic, [{"n": i} for i in range(3, 7)])
        elif n == 2:
            f._k_sent += 1                   # the loop sent another call: this fetch ends next
            produce_json(testbed.bootstrap, topic, [{"n": i} for i in range(7, 9)])

    f, c = fetcher(testbed, names, topic, 0.0)
    ticket(f, posted, on_part)
    try:
        t0 = time.monotonic()
        Runtime._fetch(f, 100, 10.0, 5)
        took = time.monotonic() - t0
    finally:
        c.close()
    *parts, end = posted
    assert [e[:2] for e in parts] == [("fetched-part", 5)] * len(parts) and len(parts) >= 2
    assert end[:2] == ("fetched", 5) and end[3] == 100      # the end, in the same channel, after the parts
    handed = [m.offset() for e in posted for m in e[2]]
    assert handed == list(range(9))
    assert end[2] and end[2][-1].offset() == 8       # ended by the waiting call, with the records it had
    assert took < 9                                  # not by a poll's 10 s timeout


def test_a_fetch_in_parts_ends_when_a_poll_finds_nothing_or_the_budget_is_reached(testbed, make_topic, names) -> None:
    """The other two ends: a poll that times out (the part already handed over stays handed
    over, the end brings nothing), and the budget (parts and end together, never more)."""
    topic = make_topic("in", partitions=1)
    produce_json(testbed.bootstrap, topic, [{"n": i} for i in range(3)])
    posted: list = []
    f, c = fetcher(testbed, names, topic, 0.0)
    ticket(f, posted)
    try:
        t0 = time.monotonic()
        Runtime._fetch(f, 100, 0.5, 1)
        took = time.monotonic() - t0
        idle = list(posted)
        produce_json(testbed.bootstrap, topic, [{"n": i} for i in range(3, 12)])
        capped: list = []
        while sum(map(len, capped)) < 9:          # budget 4: parts and end never pass it
            posted.clear()
            Runtime._fetch(f, 4, 10.0, 2)
            assert posted[-1][0] == "fetched" and sum(len(e[2]) for e in posted) <= 4
            capped += [e[2] for e in posted]
    finally:
        c.close()
    assert [e[0] for e in idle] == ["fetched-part", "fetched"] and took >= 0.4
    assert [m.offset() for m in idle[0][2]] == [0, 1, 2] and idle[1][2] == []
    assert [m.offset() for p in capped for m in p] == list(range(3, 12))
