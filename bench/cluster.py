"""`make bench-cluster`: a consumer group's throughput with the idempotency store on the single
Redis and on the test bed's 3-master Redis Cluster.

One topic of N ~200-byte JSON messages (12 partitions, bench/workload.py) is read, once per
round, by a fresh group of three `afc-consumer run` processes (no-op handler, Redis idempotency
keyed by the message's unique id, defaults otherwise); the rounds alternate single, cluster,
single, cluster... Each round is measured over its steady window, from the moment the group's
committed offsets pass 10 % of N to the moment they pass 90 %, so start-up, the group's join
and the last commit do not count:

- msgs/s: committed messages in the window / its length;
- consumers' CPU per message: the three processes' CPU seconds in the window / messages;
- Redis CPU per message: the server processes' CPU seconds (the single Redis; on the cluster
  the three masters summed, and the replicas, which apply the replication stream, apart);
- Redis commands per message: INFO commandstats calls (Lua's inner calls included), summed
  over the masters, and per master (how evenly the buckets spread the work).

What a 2-core machine can show: the consumers, Kafka and every Redis process share 2 cores,
so the cluster cannot raise the group's total throughput here (one Redis is far from its limit
at these rates, and the 3 masters + 3 replicas only add processes on the same cores). What it
can show: the Redis CPU and commands each message costs on each kind, and that the cluster
spreads them evenly over its masters (which, on separate machines, is what raises the cap).

The results file is written by this script only: bench/results/cluster.json.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))             # appended: the repo's operator/ must not shadow `operator`

from bench import measure, workload  # noqa: E402
from bench.run import (AFC_CONSUMER, Child, Ctx, afc_env, begin, delete_redis_keys,  # noqa: E402
                       dump_json)

log = logging.getLogger("bench.cluster")
SAMPLE_S = 0.1
WINDOW = (0.1, 0.9)              # the steady window, as shares of N committed


def cluster_masters(url: str) -> list[tuple[str, int]]:
    """(bed part name, port) of every master, e.g. ('redis-cluster-1', 19081)."""
    from afc.runtime.redisconn import sync_client
    r = sync_client(url, socket_timeout=5)
    try:
        nodes = r.get_primaries()
        ports = sorted(int(n.port) for n in nodes)
        all_ports = sorted(int(n.port) for n in r.get_nodes())
    finally:
        r.close()
    base = min(all_ports) - 1                  # the bed's node i listens on PORT_BASE + 80 + i
    return [(f"redis-cluster-{p - base}", p) for p in ports]


def cluster_replicas(url: str) -> list[str]:
    from afc.runtime.redisconn import sync_client
    r = sync_client(url, socket_timeout=5)
    try:
        all_ports = sorted(int(n.port) for n in r.get_nodes())
        masters = {int(n.port) for n in r.get_primaries()}
    finally:
        r.close()
    base = min(all_ports) - 1
    return [f"redis-cluster-{p - base}" for p in all_ports if p not in masters]


class Servers:
    """CPU and commandstats of the Redis processes that serve a store (measure.ServerCpu each)."""

    def __init__(self, testbed_dir: str, target: str, single_url: str, cluster_url: str) -> None:
        self.target = target
        if target == "single":
            self.masters = {"redis": measure.ServerCpu(testbed_dir, single_url, parts=("redis",))}
            self.replicas = measure.ServerCpu(testbed_dir, None, parts=())
        else:
            self.masters = {name: measure.ServerCpu(testbed_dir, f"redis://127.0.0.1:{port}/0", parts=(name,))
                            for name, port in cluster_masters(cluster_url)}
            self.replicas = measure.ServerCpu(testbed_dir, None, parts=tuple(cluster_replicas(cluster_url)))
        self.kafka = measure.ServerCpu(testbed_dir, None, parts=("kafka",))

    def begin(self) -> None:
        for s in (*self.masters.values(), self.replicas, self.kafka):
            s.begin()

    def end(self) -> dict[str, Any]:
        per = {name: s.end() for name, s in self.masters.items()}
        reps = self.replicas.end()
        return {
            "redis_cpu_s": round(sum(v.get(f"{n}_cpu_s", 0) for n, v in per.items()), 3),
            "redis_replicas_cpu_s": round(sum(v for k, v in reps.items() if k.endswith("_cpu_s")), 3),
            "redis_calls": sum(v.get("redis_calls", 0) for v in per.values()),
            "kafka_cpu_s": self.kafka.end().get("kafka_cpu_s"),
            "per_master": {n: {"cpu_s": v.get(f"{n}_cpu_s"), "calls": v.get("redis_calls"),
                               "top_commands": v.get("redis_commands")} for n, v in per.items()},
        }


def one_round(ctx: Ctx, args: argparse.Namespace, topic: str, target: str, i: int) -> dict[str, Any]:
    url = args.redis_url if target == "single" else args.cluster_url
    group = f"{ctx.run}-{target}-{i}"
    ctx.groups.append(group)
    servers = Servers(os.environ.get("AFC_TESTBED_DIR", str(ROOT / ".testbed")), target, args.redis_url,
                      args.cluster_url)
    watch = measure.OffsetWatch(ctx.bootstrap, group, topic, args.partitions)
    lo, hi = int(WINDOW[0] * args.messages), int(WINDOW[1] * args.messages)
    kids: list[Child] = []
    for k in range(args.consumers):
        port = measure.free_port()
        env = afc_env(ctx, topic, group, port, {"AFC_IDEMPOTENCY__REDIS_URL": url, "AFC_INSTANCE_ID": f"{group}-{k}",
                                                "AFC_MEMBERSHIP__STATIC": "false"})  # members leave: the group deletes
        kids.append(Child(ctx, f"{target}-{i}-c{k}", [AFC_CONSUMER, "run", "--handler", "bench.handlers:noop"],
                          env, events=False))
    t0 = time.time()
    start: tuple[float, int, float] | None = None           # (time, committed, consumers' cpu s)
    end: tuple[float, int, float] | None = None
    res: dict[str, Any] = {"target": target, "round": i, "group": group, "status": "ok"}
    try:
        while end is None:
            tick = time.time()
            c = watch.committed()
            for ch in kids:
                ch.sampler.sample()
            cpu = sum(ch.sampler.cpu_s for ch in kids)
            if c is not None and start is None and c >= lo:
                start = (time.time(), c, cpu)
                servers.begin()
            elif c is not None and start is not None and c >= hi:
                end = (time.time(), c, cpu)
                res["servers"] = servers.end()
            if any(not ch.alive() for ch in kids):
                res["status"] = "failed: a consumer exited"
                break
            if time.time() - t0 > args.budget_s:
                res["status"] = "partial: budget exhausted"
                break
            time.sleep(max(0.0, SAMPLE_S - (time.time() - tick)))
    finally:
        res["exits"] = [ch.stop() for ch in kids]
        watch.close()
    if start is None or end is None:
        res["log_tail"] = kids[0].tail()
        return res
    msgs, secs = end[1] - start[1], end[0] - start[0]
    srv = res["servers"]
    res.update({
        "window_messages": msgs, "window_s": round(secs, 2),
        "msgs_per_s": round(msgs / secs),
        "consumers_cpu_s": round(end[2] - start[2], 2),
        "consumers_cpu_us_per_message": round(1e6 * (end[2] - start[2]) / msgs, 2),
        "redis_cpu_us_per_message": round(1e6 * srv["redis_cpu_s"] / msgs, 2),
        "redis_replicas_cpu_us_per_message": round(1e6 * srv["redis_replicas_cpu_s"] / msgs, 2),
        "kafka_cpu_us_per_message": round(1e6 * (srv["kafka_cpu_s"] or 0) / msgs, 2),
        "redis_commands_per_message": measure.per_message(srv["redis_calls"], msgs),
        "commands_share_per_master": {n: round(v["calls"] / max(1, srv["redis_calls"]), 3)
                                      for n, v in srv["per_master"].items()},
        "consumers_peak_rss_mib": [ch.sampler.summary()["peak_rss_mib"] for ch in kids],
    })
    log.info("event=round-done target=%s round=%d msgs_per_s=%s consumer_us=%s redis_us=%s cmds=%s", target, i,
             res["msgs_per_s"], res["consumers_cpu_us_per_message"], res["redis_cpu_us_per_message"],
             res["redis_commands_per_message"])
    return res


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per target: the median of its rounds' figures (rounds alternate, so drift hits both)."""
    import statistics
    keys = ("msgs_per_s", "consumers_cpu_us_per_message", "redis_cpu_us_per_message",
            "redis_replicas_cpu_us_per_message", "kafka_cpu_us_per_message", "redis_commands_per_message")
    out: dict[str, Any] = {}
    for target in ("single", "cluster"):
        ok = [r for r in rounds if r["target"] == target and r.get("msgs_per_s")]
        out[target] = {k: (round(statistics.median(r[k] for r in ok), 2) if ok else None) for k in keys}
        out[target]["rounds"] = len(ok)
        if target == "cluster" and ok:
            out[target]["commands_share_per_master"] = ok[-1]["commands_share_per_master"]
    return out


def cleanup_cluster_keys(url: str, prefix: str) -> int | str:
    """Delete this run's keys on every master (one UNLINK per key: a node refuses a multi-key
    command across slots, even slots it serves)."""
    import redis
    try:
        n = 0
        for _, port in cluster_masters(url):
            r = redis.Redis(host="127.0.0.1", port=port)
            pipe = r.pipeline(transaction=False)
            for k in r.scan_iter(match=f"{prefix}:*", count=10_000):
                pipe.unlink(k)
                if len(pipe) >= 5_000:
                    n += sum(pipe.execute())
            n += sum(pipe.execute())
            r.close()
        return n
    except redis.RedisError as e:
        return f"error: {e}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--messages", type=int, default=400_000)
    ap.add_argument("--partitions", type=int, default=12)
    ap.add_argument("--consumers", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="rounds per target (single, cluster alternating)")
    ap.add_argument("--budget-s", type=float, default=90, help="most seconds one round may take")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cluster.json")
    ap.add_argument("--bootstrap", default=os.environ.get("AFC_KAFKA_BOOTSTRAP", "127.0.0.1:19092"))
    ap.add_argument("--redis-url", default=os.environ.get("AFC_REDIS_URL", "redis://127.0.0.1:19079/0"))
    ap.add_argument("--cluster-url", default=os.environ.get("AFC_REDIS_CLUSTER_URL"))
    ap.add_argument("--keep", action="store_true")
    ns = ap.parse_args(argv)
    if not ns.cluster_url:
        ap.error("no --cluster-url and no AFC_REDIS_CLUSTER_URL (source .testbed/env)")
    return ns


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ctx, doc = begin(args, "afc-bench-cluster/1", "bench/cluster.py", argv, __doc__)
    t_start = time.time()
    topic = f"{ctx.run}-tput"
    try:
        workload.create_topic(ctx.bootstrap, topic, args.partitions)
        ctx.topics.append(topic)
        doc["workload"] = {"topic": topic, "messages": args.messages, "partitions": args.partitions,
                           "consumers": args.consumers, "handler": "bench.handlers:noop",
                           "idempotency_key": "the message's unique id (AFC_IDEMPOTENCY__KEY_FIELD=id)",
                           "produce": workload.produce_bulk(ctx.bootstrap, topic, args.messages, ctx.run)}
        doc["cluster_masters"] = [name for name, _ in cluster_masters(args.cluster_url)]
        rounds = []
        for i in range(args.rounds):
            for target in ("single", "cluster"):
                rounds.append(one_round(ctx, args, topic, target, i))
        doc["rounds"] = rounds
        doc["summary"] = summarize(rounds)
    finally:
        for ch in ctx.children:
            if ch.alive():
                ch.stop(15)
        if not args.keep:
            doc["cleanup"] = {"topics": workload.delete_topics(ctx.bootstrap, ctx.topics),
                              "groups": workload.delete_groups(ctx.bootstrap, ctx.groups),
                              "single_redis_keys_deleted": delete_redis_keys(args.redis_url, ctx.prefix),
                              "cluster_keys_deleted": cleanup_cluster_keys(args.cluster_url, ctx.prefix)}
    doc["duration_s"] = round(time.time() - t_start, 1)
    doc["logs_dir"] = str(ctx.tmp)
    dump_json(doc, args.out)
    s = doc.get("summary", {})
    for target in ("single", "cluster"):
        print(f"{target:<8} {s.get(target)}")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
