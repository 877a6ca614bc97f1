"""`afc-consumer dlq inspect|replay`: look into a dead-letter (or poison) topic and put its
records back where they came from.

Replay re-injects each record to its original topic (header `afc-original-topic`, or
`--to`) with its key, value and own headers, including the `idempotency-key` the router
added: records that were in fact processed are skipped by the idempotency store, so
replaying twice changes nothing. afc's routing headers are dropped, so a replayed record
starts a fresh failure history. Reads from the beginning up to the end as it was at start;
it never joins a consumer group or commits offsets.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from .routing import AFC_HEADERS, H_ERR_CLASS, H_FAILED_AT, H_ORIG_TOPIC, H_ROUTING_ID

log = logging.getLogger("afc.runtime.dlq")


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]

    def header(self, name: str) -> str | None:
        found = None
        for k, v in self.headers:
            if k == name:
                found = v.decode("utf-8", "replace") if v is not None else ""
        return found

    def document(self, preview: int = 200) -> dict[str, Any]:
        value = self.value or b""
        return {"topic": self.topic, "partition": self.partition, "offset": self.offset,
                "key": None if self.key is None else self.key.decode("utf-8", "replace"),
                "valuePreview": value[:preview].decode("utf-8", "replace"), "valueBytes": len(value),
                "headers": {k: (v or b"").decode("utf-8", "replace")[:preview] for k, v in self.headers}}


def read_all(bootstrap: str, topic: str, timeout_s: float = 30.0) -> Iterator[Record]:
    """Every record from the beginning to the high watermarks seen at start."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"afc-dlq-reader-{time.time_ns()}",
                  "enable.auto.commit": False, "enable.partition.eof": True})
    try:
        md = c.list_topics(topic, timeout=10).topics.get(topic)
        if md is None or md.error is not None:
            raise SystemExit(f"dlq: topic {topic!r} not found")
        ends = {}
        for p in md.partitions:
            low, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > low:
                ends[p] = high
        if not ends:
            return
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        deadline = time.monotonic() + timeout_s
        while ends and time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is None:
                continue
            if m.error():
                continue                      # partition EOF and the like
            if m.partition() in ends and m.offset() < ends[m.partition()]:
                deadline = time.monotonic() + timeout_s
                yield Record(m.topic(), m.partition(), m.offset(), m.key(), m.value(), m.headers() or [])
                if m.offset() + 1 >= ends[m.partition()]:
                    del ends[m.partition()]
        if ends:
            raise SystemExit(f"dlq: stopped after {timeout_s:.0f}s without progress; unread partitions {sorted(ends)}")
    finally:
        c.close()


@dataclass
class Filter:
    """`name=value` on headers (afc's or the record's); `value*` matches a prefix."""
    rules: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def parse(cls, items: list[str] | None) -> "Filter":
        rules = []
        for item in items or []:
            if "=" not in item:
                raise SystemExit(f"dlq: --filter {item!r} is not name=value")
            name, value = item.split("=", 1)
            rules.append((name, value))
        return cls(rules)

    def __call__(self, r: Record) -> bool:
        for name, want in self.rules:
            have = r.header(name)
            if have is None:
                return False
            if want.endswith("*") and not have.startswith(want[:-1]):
                return False
            if not want.endswith("*") and have != want:
                return False
        return True


def inspect(bootstrap: str, topic: str, records: int, flt: Filter) -> dict[str, Any]:
    by_class: Counter[str] = Counter()
    routing_ids: set[str] = set()
    oldest = newest = None
    total = 0
    shown = []
    for r in read_all(bootstrap, topic):
        if not flt(r):
            continue
        total += 1
        by_class[r.header(H_ERR_CLASS) or "unknown"] += 1
        rid = r.header(H_ROUTING_ID)
        if rid:
            routing_ids.add(rid)
        at = int(r.header(H_FAILED_AT) or 0) or None
        if at is not None:
            oldest = at if oldest is None else min(oldest, at)
            newest = at if newest is None else max(newest, at)
        if len(shown) < records:
            shown.append(r.document())
    return {"topic": topic, "records": total, "distinctRoutings": len(routing_ids),
            "byErrorClass": dict(by_class.most_common()), "oldestFailedAt": _iso(oldest),
            "newestFailedAt": _iso(newest), "sample": shown}


def replay(bootstrap: str, topic: str, to: str | None, flt: Filter, dry_run: bool) -> dict[str, Any]:
    """Re-inject records; the same routing (by routing id) is replayed once per run."""
    producer = None if dry_run else Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True,
                                              "acks": "all", "linger.ms": 5,
                                              "message.max.bytes": 16 * 1024 * 1024})
    failures: list[str] = []
    seen: set[str] = set()
    replayed, skipped_dupes, unroutable = Counter(), 0, 0

    def delivered(err: Any, msg: Any) -> None:
        if err is not None:
            failures.append(str(err))

    for r in read_all(bootstrap, topic):
        if not flt(r):
            continue
        rid = r.header(H_ROUTING_ID)
        if rid and rid in seen:
            skipped_dupes += 1                 # the same failure routed twice (crash before commit)
            continue
        if rid:
            seen.add(rid)
        dest = to or r.header(H_ORIG_TOPIC)
        if not dest:
            unroutable += 1
            log.warning("event=replay-skipped reason=no-original-topic partition=%d offset=%d", r.partition, r.offset)
            continue
        replayed[dest] += 1
        if producer is not None:
            headers = [(k, v) for k, v in r.headers if k not in AFC_HEADERS]
            while True:
                try:
                    producer.produce(dest, key=r.key, value=r.value, headers=headers, on_delivery=delivered)
                    break
                except BufferError:
                    producer.poll(0.1)
            producer.poll(0)
    if producer is not None:
        left = producer.flush(60)
        if left:
            failures.append(f"{left} records not delivered within 60 s")
    out = {"from": topic, "dryRun": dry_run, "replayed": dict(replayed), "duplicateRoutingsSkipped": skipped_dupes,
           "withoutOriginalTopic": unroutable, "failures": failures[:20]}
    return out


def _iso(ms: int | None) -> str | None:
    return None if ms is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def main(ns: Any) -> int:
    flt = Filter.parse(ns.filter)
    if ns.dlq_cmd == "inspect":
        out = inspect(ns.bootstrap, ns.topic, ns.records, flt)
    else:
        out = replay(ns.bootstrap, ns.source, ns.to, flt, ns.dry_run)
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 1 if out.get("failures") else 0
