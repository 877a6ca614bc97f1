"""The benchmark's data: topics, the bulk pre-produced topic and the paced producer.

Every value is a ~200-byte JSON object with a unique `id` (the dedup key for every variant
that deduplicates) and the key is one of `KEY_SPACE` user ids, so records spread over all
partitions and over afc's key-ordered lanes the way real keyed traffic does.

Run as a module for the paced producer, so pacing runs in its own process and interpreter
(no GIL shared with the orchestrator's sampling):

    python -m bench.workload paced --bootstrap B --topic T --rate 5000 --seconds 20
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from array import array
from typing import Any

from confluent_kafka import KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

log = logging.getLogger("bench.workload")
KEY_SPACE = 100_000
VALUE_BYTES = 200
_EVENTS = ("page_view", "add_to_cart", "checkout", "search", "login")


def make_value(run: str, i: int, rnd: random.Random) -> bytes:
    """A JSON object padded to VALUE_BYTES; `id` is unique across runs and messages."""
    doc = {"id": f"{run}-{i:09d}", "user": f"u{rnd.randrange(KEY_SPACE):06d}",
           "event": _EVENTS[i % len(_EVENTS)], "amount": round(rnd.random() * 1000, 2),
           "ts": round(time.time(), 6), "pad": ""}
    raw = json.dumps(doc, separators=(",", ":"))
    doc["pad"] = "x" * max(0, VALUE_BYTES - len(raw))
    return json.dumps(doc, separators=(",", ":")).encode()


def make_key(rnd: random.Random) -> bytes:
    return b"user-%06d" % rnd.randrange(KEY_SPACE)


# ---------------------------------------------------------------------------- topics

def admin(bootstrap: str) -> AdminClient:
    return AdminClient({"bootstrap.servers": bootstrap})


def create_topic(bootstrap: str, topic: str, partitions: int, timeout: float = 30) -> None:
    """Create and wait until every partition has a leader (a produce right after would fail)."""
    a = admin(bootstrap)
    fut = a.create_topics([NewTopic(topic, partitions, 1)], operation_timeout=timeout)[topic]
    fut.result(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        md = a.list_topics(topic, timeout=5).topics.get(topic)
        if md is not None and md.error is None and len(md.partitions) == partitions and \
                all(p.leader >= 0 for p in md.partitions.values()):
            return
        time.sleep(0.1)
    raise TimeoutError(f"topic {topic} has no leaders after {timeout}s")


def delete_topics(bootstrap: str, topics: list[str], timeout: float = 30) -> dict[str, str]:
    """Best effort; returns topic -> 'deleted' or the error, for the results file."""
    if not topics:
        return {}
    out, a = {}, admin(bootstrap)           # keep the client alive until the futures resolve
    for t, fut in a.delete_topics(topics, operation_timeout=timeout).items():
        try:
            fut.result(timeout)
            out[t] = "deleted"
        except Exception as e:  # noqa: BLE001 - cleanup reports, never raises
            out[t] = f"error: {e}"
    return out


def delete_groups(bootstrap: str, groups: list[str], timeout: float = 30) -> dict[str, str]:
    """Best effort: a static member that did not leave keeps its group non-empty for a while."""
    if not groups:
        return {}
    out, a = {}, admin(bootstrap)
    for g, fut in a.delete_consumer_groups(groups, request_timeout=timeout).items():
        try:
            fut.result(timeout)
            out[g] = "deleted"
        except Exception as e:  # noqa: BLE001
            out[g] = f"error: {e}"
    return out


def high_watermarks(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    from confluent_kafka import Consumer
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "afc-bench-watermarks",
                  "enable.auto.commit": False})
    try:
        return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(partitions)}
    finally:
        c.close()


# ---------------------------------------------------------------------------- producing

def _producer(bootstrap: str, linger_ms: float, **extra: Any) -> Producer:
    conf = {"bootstrap.servers": bootstrap, "linger.ms": linger_ms, "acks": "all",
            "compression.type": "none", "enable.idempotence": False, **extra}
    return Producer(conf)


def produce_bulk(bootstrap: str, topic: str, n: int, run: str, seed: int = 1) -> dict[str, Any]:
    """Pre-produce the throughput topic as fast as the client allows; returns what was sent."""
    rnd = random.Random(seed)
    p = _producer(bootstrap, 20, **{"batch.size": 1_000_000, "queue.buffering.max.messages": 500_000,
                                    "queue.buffering.max.kbytes": 1_048_576})
    errors: list[str] = []

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None and len(errors) < 10:
            errors.append(str(err))

    t0 = time.monotonic()
    value_bytes = 0
    for i in range(n):
        v = make_value(run, i, rnd)
        value_bytes += len(v)
        while True:
            try:
                p.produce(topic, v, make_key(rnd), on_delivery=on_delivery)
                break
            except BufferError:
                p.poll(0.05)
        if not i & 1023:
            p.poll(0)
    left = p.flush(120)
    dt = time.monotonic() - t0
    if left or errors:
        raise RuntimeError(f"bulk produce failed: {left} undelivered, errors={errors}")
    return {"messages": n, "seconds": round(dt, 2), "msgs_per_s": round(n / dt),
            "value_bytes_avg": round(value_bytes / n, 1)}


def produce_paced(bootstrap: str, topic: str, rate: float, seconds: float, run: str,
                  linger_ms: float = 1.0, acks_file: str | None = None) -> dict[str, Any]:
    """Send `rate` msg/s for `seconds`, evenly: message i is due at start + i/rate.

    Sleeps at most 1 ms between checks, so messages leave in bursts of ~rate/1000; the
    record timestamp (CreateTime) is set by librdkafka at produce() time, in whole ms.
    With `acks_file`, (partition, offset, wall time of the acknowledgement) of every message
    is written there as doubles, so latencies can be split into broker and consumer shares.
    """
    rnd = random.Random(7)
    p = _producer(bootstrap, linger_ms)
    stats = {"delivered": 0, "errors": 0}
    acks: list[float] = []
    ack_rows = array("d")

    def on_delivery(err: Any, msg: Any) -> None:
        stats["errors" if err is not None else "delivered"] += 1
        if err is None:
            now = time.time()
            acks.append(now - msg.timestamp()[1] / 1000.0)
            ack_rows.extend((msg.partition(), msg.offset(), now))

    total = int(rate * seconds)
    wall0, t0 = time.time(), time.perf_counter()
    i, max_behind = 0, 0
    while i < total:
        now = time.perf_counter() - t0
        due = min(total, int(now * rate) + 1)
        max_behind = max(max_behind, due - i)
        while i < due:
            p.produce(topic, make_value(run, i, rnd), make_key(rnd), on_delivery=on_delivery)
            i += 1
        p.poll(0)
        wait = i / rate - (time.perf_counter() - t0)
        if wait > 0:
            time.sleep(min(wait, 0.001))
    sent_s = time.perf_counter() - t0
    left = p.flush(30)
    if acks_file:
        with open(acks_file, "wb") as f:
            ack_rows.tofile(f)
    acks.sort()
    ack = {f"p{q}_ms": round(1000 * acks[min(len(acks) - 1, int(q / 100 * len(acks)))], 3)
           for q in (50, 99)} if acks else {}
    return {"delivery_latency": ack, "sent": total, "delivered": stats["delivered"], "errors": stats["errors"], "undelivered": left,
            "start_wall": wall0, "send_seconds": round(sent_s, 3), "achieved_rate": round(total / sent_s, 1),
            "max_burst_behind_schedule": max_behind, "linger_ms": linger_ms}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.workload")
    sub = ap.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("paced", help="produce at a steady rate; prints a JSON summary on stdout")
    pp.add_argument("--bootstrap", required=True)
    pp.add_argument("--topic", required=True)
    pp.add_argument("--rate", type=float, default=5000)
    pp.add_argument("--seconds", type=float, default=20)
    pp.add_argument("--run", default="paced")
    pp.add_argument("--linger-ms", type=float, default=1.0)
    pp.add_argument("--acks-file", help="write (partition, offset, ack time) per message here")
    ns = ap.parse_args(argv)
    try:
        out = produce_paced(ns.bootstrap, ns.topic, ns.rate, ns.seconds, ns.run, ns.linger_ms, ns.acks_file)
    except KafkaException as e:
        print(json.dumps({"error": str(e)}))
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
