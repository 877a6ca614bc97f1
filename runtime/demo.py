"""`make demo`: the main job end to end on the local test bed.

20,000 orders on 6 partitions, with the usual dirt: 200 duplicates (the same
`idempotency-key` produced twice), malformed JSON, an empty value and an order the handler
always rejects. One `afc-consumer` handles them into Redis, is killed with SIGKILL halfway,
and a new one takes over. Then the demo checks what a team would check: every good order
applied exactly once, the bad records on the poison and dead-letter topics with their
history, and the consumer group caught up.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

ORDERS = 20_000
DUPLICATES = 200


def handle_order(msg) -> None:  # the handler the demo's consumer runs
    """Apply an order: count it in Redis, atomically with its idempotency done mark."""
    import redis
    r = _redis(redis)
    order = msg.payload
    if order.get("amount", 0) < 0:
        raise ValueError(f"order {order['id']}: negative amount")
    pipe = r.pipeline(transaction=True)
    pipe.hincrby(os.environ["AFC_DEMO_HASH"], order["id"], 1)
    msg.mark_done_in(pipe)
    pipe.execute()


_client = None
_client_lock = threading.Lock()


def _redis(redis):
    """One client per consumer process, made under a lock: the handler starts on many lanes
    at once, and a racing second client would be collected with its sockets in use."""
    global _client
    with _client_lock:
        if _client is None:
            _client = redis.Redis.from_url(os.environ["AFC_DEMO_REDIS_URL"])
        return _client


def say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def main() -> int:
    import redis
    from confluent_kafka import Consumer, Producer, TopicPartition
    from confluent_kafka.admin import AdminClient, NewTopic

    bootstrap, redis_url = os.environ["AFC_KAFKA_BOOTSTRAP"], os.environ["AFC_REDIS_URL"]
    run = f"demo-{uuid.uuid4().hex[:6]}"
    topic, group, counts = f"{run}.orders", f"{run}-group", f"{run}:applied"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, 6, 1)])[topic].result(30)
    say(f"topic {topic}: producing {ORDERS} orders, {DUPLICATES} duplicates and 3 bad records")
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True})
    for i in range(ORDERS):
        order = {"id": f"o{i}", "customer": f"c{i % 700}", "amount": -1 if i == 4242 else 10 + i % 90}
        hdrs = [("idempotency-key", order["id"].encode())]
        p.produce(topic, key=order["customer"].encode(), value=json.dumps(order).encode(), headers=hdrs)
        if i % 100 == 0 and i // 100 < DUPLICATES:   # a producer retry gone wrong: sent twice
            p.produce(topic, key=order["customer"].encode(), value=json.dumps(order).encode(), headers=hdrs)
        if i in (1000, 9000):
            p.produce(topic, key=b"c1", value=b"{truncated json" if i == 1000 else b"")
        p.poll(0)
    p.flush(60)

    log_dir = Path(os.environ.get("AFC_TESTBED_DIR", ".")) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "AFC_KAFKA__BOOTSTRAP_SERVERS": bootstrap, "AFC_KAFKA__TOPICS": json.dumps([topic]),
           "AFC_KAFKA__GROUP_ID": group, "AFC_IDEMPOTENCY__REDIS_URL": redis_url,
           "AFC_IDEMPOTENCY__KEY_PREFIX": run, "AFC_IDEMPOTENCY__LEASE_MS": "3000", "AFC_INSTANCE_ID": f"{run}-0",
           "AFC_SERVER__PORT": "0", "AFC_DEMO_REDIS_URL": redis_url, "AFC_DEMO_HASH": counts}
    exe = str(Path(sys.executable).parent / "afc-consumer")
    r = redis.Redis.from_url(redis_url)

    def start(n: int) -> subprocess.Popen:
        out = open(log_dir / f"{run}-consumer-{n}.log", "wb")
        return subprocess.Popen([exe, "run", "--handler", "afc.runtime.demo:handle_order"], env=env,
                                stdout=out, stderr=subprocess.STDOUT)

    c = start(1)
    deadline = time.monotonic() + 120
    while r.hlen(counts) < ORDERS // 2 and time.monotonic() < deadline and c.poll() is None:
        time.sleep(0.05)
    say(f"consumer 1 applied {r.hlen(counts)} orders; killing it with SIGKILL (no drain, no commit)")
    c.kill()
    c.wait()
    c = start(2)

    def lag() -> int:
        cons = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
        try:
            tps = [TopicPartition(topic, i) for i in range(6)]
            return sum(cons.get_watermark_offsets(tp, timeout=10)[1] - max(tp.offset, 0)
                       for tp in cons.committed(tps, timeout=10))
        finally:
            cons.close()

    while time.monotonic() < deadline and (lag() > 0 or r.hlen(counts) < ORDERS - 1):
        time.sleep(0.5)
    c.terminate()
    code = c.wait(60)
    applied = {k.decode(): int(v) for k, v in r.hgetall(counts).items()}
    dlq = _count(bootstrap, topic + ".dlq")
    poison = _count(bootstrap, topic + ".poison")
    twice = sum(1 for v in applied.values() if v > 1)
    ok = (len(applied) == ORDERS - 1 and twice == 0 and "o4242" not in applied and dlq == 1 and poison == 2
          and lag() == 0 and code == 0)
    say(f"orders applied: {len(applied)} of {ORDERS - 1} good ones; applied twice: {twice} "
        f"(of which {DUPLICATES} were produced twice, and {ORDERS // 2} or so replayed after the SIGKILL)")
    say(f"dead-letter topic {topic}.dlq: {dlq} record (the negative amount); poison topic: {poison} records "
        f"(malformed and empty); consumer group lag: {lag()}")
    say(f"inspect it yourself: .venv/bin/afc-consumer dlq inspect {topic}.dlq --bootstrap {bootstrap}")
    say(f"logs: {log_dir}/{run}-consumer-*.log")
    say("PASS: every good order applied exactly once across a SIGKILL" if ok else "FAIL: see the figures above")
    for key in r.scan_iter(match=f"{run}:*", count=5000):     # the topics stay, for `dlq inspect`
        r.unlink(key)
    return 0 if ok else 1


def _count(bootstrap: str, topic: str) -> int:
    from confluent_kafka import Consumer, TopicPartition
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "demo-count"})
    try:
        md = c.list_topics(topic, timeout=10).topics.get(topic)
        if md is None or md.error:
            return 0
        return sum(c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in md.partitions)
    finally:
        c.close()


if __name__ == "__main__":
    sys.exit(main())
