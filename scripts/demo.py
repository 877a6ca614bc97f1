"""`make demo`: the mission as a user lives it, on the local test bed.

1. The node agent (scripts/nodeagent.py) stands in for a kubelet; the CRD and the operator
   are installed with kubectl from `crds/` and `manifests/` (its Deployment, ServiceAccount
   and least-privilege Role), and the operator runs as a pod.
2. An AdaptiveConsumer with lag autoscaling (DrainTime) is applied; a burst of orders
   arrives; the operator scales the StatefulSet up by lag.
3. The spec changes while the backlog drains: the pods roll one by one, and the group's
   generation stays put (static membership: no rebalance).
4. The backlog drains, the operator scales down and removes the departed members from the
   group; deleting the AdaptiveConsumer stops every consumer process.
5. A summary of what was verified: every order applied exactly once, 0 rebalances during
   the rollout, scaled up and down, every process gone.

A live terminal view (rich) shows replicas, lag per partition, msgs/s, backpressure,
dead-letter and poison counts, the group generation and the operator's Events; when stdout
is not a terminal (or with --plain) it prints plain lines instead. Re-runnable: each run
uses its own namespace, topic and group, and removes them at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import brokerlog  # noqa: E402
from nodeagent import NodeAgentProcess  # noqa: E402

from afc.operator.render import selector_string  # noqa: E402

KUBECTL = os.environ.get("AFC_KUBECTL", "kubectl")


# ----------------------------------------------------------------------------- plumbing

def kubectl(*args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([KUBECTL, *args], input=input, text=True, capture_output=True, timeout=120)
    if check and p.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {p.stderr.strip()}")
    return p


def get_json(*args: str) -> dict[str, Any] | None:
    p = kubectl("get", *args, "-o", "json", check=False)
    return json.loads(p.stdout) if p.returncode == 0 and p.stdout.strip() else None


def wait(what: str, fn: Callable[[], Any], timeout: float, tick: Callable[[], None], every: float = 1.0) -> Any:
    """Poll fn (refreshing the view each time) until it is truthy; bounded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tick()
        v = fn()
        if v:
            return v
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f}s: {what}")


def operator_install(ns: str, placement: dict[str, Any]) -> str:
    """manifests/ as `kubectl kustomize` renders it, moved to the demo's namespace and placed
    on the node agent's Node (the only change to what a user applies)."""
    docs = [d for d in yaml.safe_load_all(kubectl("kustomize", str(ROOT / "manifests")).stdout) if d]
    for d in docs:
        if d["kind"] == "Namespace":
            d["metadata"]["name"] = ns
        elif d["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            d["metadata"]["namespace"] = ns
        for s in d.get("subjects") or []:
            s["namespace"] = ns
        if d["kind"] == "Deployment":
            d["spec"]["template"]["spec"].update(placement)
    return yaml.safe_dump_all(docs)


def consumer_spec(name: str, topic: str, group: str, bootstrap: str, applied_hash: str,
                  placement: dict[str, Any], revision: str = "1") -> dict[str, Any]:
    return {
        "apiVersion": "afc.dev/v1alpha1", "kind": "AdaptiveConsumer",
        "metadata": {"name": name},
        "spec": {
            "image": "ghcr.io/afc-dev/afc-runtime:0.1.0",
            "handler": {"handler": "orders:apply"},
            "kafka": {"bootstrapServers": bootstrap, "topics": [topic], "groupId": group},
            "minReplicas": 1, "maxReplicas": 4, "replicas": 1,
            "membership": {"sessionTimeoutMs": 15000},
            "flow": {"workers": 2},
            "idempotency": {"redisUrlSecretRef": {"name": "demo-redis", "key": "url"}},
            "backpressure": {"redisUrlSecretRef": {"name": "demo-redis", "key": "url"}},
            "shutdown": {"drainTimeoutS": 10},
            "scaling": {"mode": "DrainTime", "targetDrainTimeS": 30, "pollIntervalS": 5, "rateWindowS": 15,
                        "scaleDownStabilizationS": 20},
            "podTemplate": {
                "labels": {"demo.afc.dev/revision": revision},
                "env": [{"name": "PYTHONPATH", "value": str(ROOT / "scripts" / "demo_app")},
                        {"name": "DEMO_APPLIED_HASH", "value": applied_hash},
                        {"name": "DEMO_WORK_MS", "value": "3"}],
                "nodeSelector": placement.get("nodeSelector", {}),
                "tolerations": placement.get("tolerations", []),
            },
        },
    }


# ----------------------------------------------------------------------------- observing

@dataclass
class Snapshot:
    t: float
    desired: int | None = None
    replicas: int | None = None
    ready: int | None = None
    lag_total: int | None = None
    lag_seconds: float | None = None
    partition_lag: dict[int, int] = field(default_factory=dict)
    committed: int = 0
    rate: float | None = None
    backpressure: str | None = None
    dlq: int = 0
    poison: int = 0
    generation: int | None = None
    rebalances: int = 0
    applied: int = 0
    scaling: str = ""
    rolling: str = ""
    events: list[str] = field(default_factory=list)


class Observer:
    """Reads what a user would look at: the resource's status, the StatefulSet, the group's
    offsets, the broker's own log for rebalances, the operator's Events, the order store."""

    def __init__(self, ns: str, name: str, topic: str, group: str, bootstrap: str, redis_url: str,
                 applied_hash: str, broker_log: Path) -> None:
        from confluent_kafka import Consumer
        from kafka.admin import KafkaAdminClient
        import redis
        self.ns, self.name, self.topic, self.group, self.hash = ns, name, topic, group, applied_hash
        self.admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="afc-demo")
        self.wm = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{group}-observer"})
        self.redis = redis.Redis.from_url(redis_url)
        self.broker_log = brokerlog.Tail(broker_log)
        self.gen_pattern = brokerlog.pattern(brokerlog.CLASSIC_REBALANCE, group)
        self.join_pattern = brokerlog.pattern(brokerlog.STATIC_REJOIN, group)
        self.generations: list[tuple[float, int]] = []
        self.rejoins: list[tuple[float, str]] = []     # (time, group.instance.id): a static member (re)joined
        self.prev: Snapshot | None = None
        self.seen_events: set[str] = set()

    def close(self) -> None:
        self.admin.close()
        self.wm.close()

    def _high(self, topic: str, partitions: int) -> dict[int, int]:
        from confluent_kafka import TopicPartition
        out = {}
        for p in range(partitions):
            try:
                out[p] = self.wm.get_watermark_offsets(TopicPartition(topic, p), timeout=2, cached=False)[1]
            except Exception:  # noqa: BLE001 - a topic not created yet (dlq, poison) counts 0
                return {}
        return out

    def _generations(self) -> None:
        for line in self.broker_log.lines():
            m, j = self.gen_pattern.search(line), self.join_pattern.search(line)
            ts = brokerlog.line_time(line) if m or j else None
            if ts is None:
                continue
            if m:
                self.generations.append((ts, int(m.group(1))))
            else:
                self.rejoins.append((ts, j.group(1)))

    def rebalances_between(self, t0: float, t1: float) -> int:
        return sum(1 for ts, _ in self.generations if t0 <= ts <= t1)

    def generation_at(self, t: float) -> int | None:
        before = [g for ts, g in self.generations if ts <= t]
        return before[-1] if before else None

    def quiet_since(self) -> float:
        """Seconds since the group's last completed rebalance (from the broker's log)."""
        return time.time() - self.generations[-1][0] if self.generations else float("inf")

    def snapshot(self, partitions: int) -> Snapshot:
        s = Snapshot(time.time())
        ac = get_json("adaptiveconsumer", self.name, "-n", self.ns) or {}
        st = ac.get("status") or {}
        s.desired = (ac.get("spec") or {}).get("replicas")
        s.replicas, s.ready = st.get("replicas"), st.get("readyReplicas")
        s.lag_total, s.lag_seconds = (st.get("lag") or {}).get("total"), (st.get("lag") or {}).get("seconds")
        s.backpressure = (st.get("backpressure") or {}).get("level")
        sc = st.get("scaling") or {}
        s.scaling = f"{sc.get('reason') or '-'}: {sc.get('message') or ''}"[:160]
        for c in st.get("conditions") or []:
            if c.get("type") == "Progressing" and c.get("status") == "True":
                s.rolling = f"{c.get('reason')}: {c.get('message', '')}"[:120]
        high = self._high(self.topic, partitions)
        try:
            from kafka import TopicPartition as KTP
            offsets = self.admin.list_group_offsets(
                {self.group: [KTP(self.topic, p) for p in range(partitions)]})[self.group]
            committed = {tp.partition: o.offset for tp, o in offsets.items() if o.offset >= 0}
        except Exception:  # noqa: BLE001 - the group may not exist yet
            committed = {}
        s.partition_lag = {p: h - committed.get(p, 0) for p, h in high.items()}
        s.committed = sum(committed.values())
        if self.prev is not None and s.t > self.prev.t:
            s.rate = max(0.0, (s.committed - self.prev.committed) / (s.t - self.prev.t))
        s.dlq = sum(self._high(self.topic + ".dlq", partitions).values())
        s.poison = sum(self._high(self.topic + ".poison", partitions).values())
        self._generations()
        if self.generations:
            s.generation = self.generations[-1][1]
        s.rebalances = len(self.generations)
        s.applied = int(self.redis.hlen(self.hash))
        evs = (get_json("events", "-n", self.ns, "--field-selector", f"involvedObject.name={self.name}") or {}).get("items", [])
        for e in sorted(evs, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or ""):
            if (e.get("involvedObject") or {}).get("kind") not in ("AdaptiveConsumer", "StatefulSet"):
                continue            # the Service's EndpointSlice churn is the control plane's, not ours
            key = e["metadata"]["uid"] + str(e.get("count"))
            if key not in self.seen_events:
                self.seen_events.add(key)
                s.events.append(f"{e.get('type', '')[:1]} {e.get('reason')}: {e.get('message', '')}"[:150])
        self.prev = s
        return s


# ----------------------------------------------------------------------------- showing

class View:
    """rich.Live on a terminal; one plain line per change otherwise."""

    def __init__(self, plain: bool, total: int) -> None:
        self.plain, self.total = plain, total
        self.phase = "starting"
        self.events: list[str] = []
        self.checks: list[tuple[bool, str]] = []
        self.snap: Snapshot | None = None
        self._live: Any = None
        self._last_line = ""
        if not plain:
            from rich.console import Console
            from rich.live import Live
            self._live = Live(self._render(), console=Console(), refresh_per_second=2, transient=False)
            self._live.start()

    def say(self, text: str) -> None:
        self.phase = text
        if self.plain:
            print(f"demo: {text}", flush=True)
        self.update(self.snap)

    def check(self, ok: bool, text: str) -> None:
        self.checks.append((ok, text))
        if self.plain:
            print(f"{'PASS' if ok else 'FAIL'} {text}", flush=True)
        self.update(self.snap)

    def update(self, s: Snapshot | None) -> None:
        fresh = s is not None and s is not self.snap         # say()/check() redraw the same snapshot
        self.snap = s
        if s is not None and fresh:
            self.events = (self.events + s.events)[-8:]
            if self.plain:
                for e in s.events:
                    print(f"event: {e}", flush=True)
        if s is not None and self.plain:
            line = (f"replicas {s.ready}/{s.replicas} desired {s.desired} | lag {s.lag_total} "
                    f"({_f(s.lag_seconds, '{:.0f}')} s) | {_f(s.rate, '{:,.0f}')} msg/s | applied {s.applied:,}/"
                    f"{self.total:,} | backpressure {s.backpressure} | dlq {s.dlq} poison {s.poison} | "
                    f"generation {s.generation} | {s.scaling.split(':')[0]}")
            if line != self._last_line:
                print(line, flush=True)
                self._last_line = line
        if self._live is not None:
            self._live.update(self._render())

    def stop(self) -> None:
        if self._live is not None:
            self._live.update(self._render())
            self._live.stop()

    def _render(self) -> Any:
        from rich.console import Group
        from rich.panel import Panel
        from rich.table import Table
        s = self.snap
        head = Table.grid(padding=(0, 2))
        head.add_row("[bold]phase[/]", self.phase)
        if s is not None:
            head.add_row("replicas", f"ready {s.ready} / pods {s.replicas} / desired {s.desired}")
            head.add_row("lag", f"{s.lag_total} messages, oldest {_f(s.lag_seconds, '{:.0f}')} s (operator's view)")
            head.add_row("throughput", f"{_f(s.rate, '{:,.0f}')} msg/s committed")
            head.add_row("applied", f"{s.applied:,} of {self.total:,} orders")
            head.add_row("backpressure", str(s.backpressure))
            head.add_row("dead-letter / poison", f"{s.dlq} / {s.poison}")
            head.add_row("group generation", f"{s.generation} ({s.rebalances} rebalances since the demo began)")
            head.add_row("autoscaler", s.scaling)
            if s.rolling:
                head.add_row("progressing", s.rolling)
        parts = Table(title="lag per partition", show_header=True)
        if s is not None and s.partition_lag:
            for p in sorted(s.partition_lag):
                parts.add_column(str(p), justify="right")
            parts.add_row(*[f"{s.partition_lag[p]:,}" for p in sorted(s.partition_lag)])
        checks = "\n".join(f"[{'green' if ok else 'red'}]{'PASS' if ok else 'FAIL'}[/] {t}" for ok, t in self.checks)
        return Group(Panel(head, title="afc demo"), parts,
                     Panel("\n".join(self.events) or "-", title="operator events"),
                     Panel(checks or "-", title="verified"))


def _f(x: Any, spec: str) -> str:
    return "-" if x is None else spec.format(x)


# ----------------------------------------------------------------------------- the run

def produce(bootstrap: str, topic: str, run: str, n: int) -> None:
    from confluent_kafka import Producer
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "enable.idempotence": True})
    for i in range(n):
        oid = f"{run}-{i}"
        p.produce(topic, key=oid.encode(), value=json.dumps({"id": oid, "amount": 1 + i % 100}).encode(),
                  headers=[("idempotency-key", oid.encode())])
        if i % 10_000 == 0:
            p.poll(0)
    if p.flush(60):
        raise RuntimeError("orders not all delivered")


class Trickle:
    """Orders at a steady rate in a thread (during the rollout: consumption must go on)."""

    def __init__(self, bootstrap: str, topic: str, prefix: str, per_second: float) -> None:
        import threading
        self.bootstrap, self.topic, self.prefix, self.per_second = bootstrap, topic, prefix, per_second
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trickle", daemon=True)

    def start(self) -> "Trickle":
        self._thread.start()
        return self

    def _run(self) -> None:
        from confluent_kafka import Producer
        p = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 5, "enable.idempotence": True})
        while not self._stop.wait(1 / self.per_second):
            oid = f"{self.prefix}-{self.sent}"
            p.produce(self.topic, key=oid.encode(), value=json.dumps({"id": oid, "amount": 1}).encode(),
                      headers=[("idempotency-key", oid.encode())])
            self.sent += 1
            p.poll(0)
        if p.flush(30):
            raise RuntimeError("trickle orders not all delivered")

    def stop(self) -> int:
        """Stop and return how many orders were sent (all delivered)."""
        self._stop.set()
        self._thread.join(60)
        return self.sent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="afc end to end on the local test bed")
    ap.add_argument("--plain", action="store_true", help="plain lines even on a terminal")
    ap.add_argument("--orders", type=int, default=60_000)
    ap.add_argument("--partitions", type=int, default=8)
    a = ap.parse_args(argv)
    plain = a.plain or not sys.stdout.isatty()
    started = time.monotonic()
    bootstrap, redis_url = os.environ["AFC_KAFKA_BOOTSTRAP"], os.environ["AFC_REDIS_URL"]
    state = Path(os.environ.get("AFC_TESTBED_DIR", ROOT / ".testbed"))
    run = f"demo-{uuid.uuid4().hex[:6]}"
    ns, name, topic, group = run, "orders", f"{run}-orders", f"{run}-orders"
    applied_hash = f"afc-demo:{run}:applied"
    pods = selector_string(name)
    view = View(plain, a.orders)
    agent = NodeAgentProcess(f"{run}-node", state / "demo" / run, state / "demo" / f"{run}-agent.log",
                             os.environ.get("KUBECONFIG"), taint=True)
    obs: Observer | None = None
    ok = False
    try:
        view.say("starting the node agent (stands in for a kubelet)")
        agent.start()
        place = agent.placement()
        view.say("installing the CRD and the operator with kubectl (crds/, manifests/)")
        kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
        kubectl("apply", "-f", "-", input=operator_install(ns, place))
        from confluent_kafka.admin import AdminClient, NewTopic
        admin = AdminClient({"bootstrap.servers": bootstrap})
        admin.create_topics([NewTopic(topic, a.partitions, 1)])[topic].result(30)
        kubectl("create", "secret", "generic", "demo-redis", "-n", ns, f"--from-literal=url={redis_url}")
        obs = Observer(ns, name, topic, group, bootstrap, redis_url, applied_hash, state / "kafka" / "server.log")
        tick = lambda: view.update(obs.snapshot(a.partitions))  # noqa: E731
        wait("the operator's pod ready", lambda: _ready_pods(ns, "app.kubernetes.io/name=afc-operator") >= 1, 180, tick)
        view.say("applying an AdaptiveConsumer with lag autoscaling (DrainTime, 1..4 replicas)")
        spec = consumer_spec(name, topic, group, bootstrap, applied_hash, place)
        kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(spec))
        wait("1 consumer ready", lambda: _ready_pods(ns, pods) >= 1, 180, tick)
        view.say(f"a burst of {a.orders:,} orders arrives")
        produce(bootstrap, topic, run, a.orders)
        top = wait("the operator scaling up by lag", lambda: (s := obs.prev) and (s.desired or 0) > 1 and s.desired, 180, tick)
        view.check(True, f"scaled up by lag: 1 -> {top} replicas (DrainTime)")
        wait(f"{top} consumers ready", lambda: _ready_pods(ns, pods) >= top, 180, tick)
        victims = [p for p in agent.processes() if _is_consumer(p)]
        killed = ""
        if victims and obs.prev is not None and obs.prev.applied < a.orders:
            os.kill(victims[0], signal.SIGKILL)
            killed = " after a SIGKILL of one consumer process"
            view.say(f"SIGKILL to consumer process {victims[0]} mid-stream (its pod's container restarts, same identity)")
        wait("the group settled (no rebalance for 5 s)", lambda: obs.quiet_since() > 5, 120, tick)
        view.say("changing the spec while orders keep coming: a rollout, pod by pod")
        trickle = Trickle(bootstrap, topic, f"{run}-t", per_second=50).start()
        t0 = time.time()
        kubectl("patch", "adaptiveconsumer", name, "-n", ns, "--type=merge",
                "-p", json.dumps({"spec": {"podTemplate": {"labels": {"demo.afc.dev/revision": "2"}}}}))
        wait("every pod on the new revision and ready", lambda: _rolled(ns, name), 300, tick)
        # In the group, the rollout ends when the last restarted member rejoined (the broker's
        # log): polling here is slower, and the scale-down (whose LeaveGroup does rebalance,
        # by design) may follow within a second.
        wait("every restarted member rejoined", lambda: len({i for ts, i in obs.rejoins if ts >= t0}) >= top, 60, tick)
        t1 = max(ts for ts, _ in obs.rejoins if ts >= t0) + 0.5
        total = a.orders + trickle.stop()
        view.total = total
        during = obs.rebalances_between(t0, t1)
        view.check(during == 0, f"rollout of {top} pods in {t1 - t0:.0f} s with {during} rebalances (group "
                                f"generation {obs.generation_at(t0)} before, {obs.generation_at(t1)} after)")
        view.say("letting the backlog drain")
        wait("every order applied", lambda: (obs.prev and obs.prev.applied >= total), 600, tick)
        dups = sum(1 for v in obs.redis.hvals(applied_hash) if int(v) > 1)
        view.check(dups == 0 and obs.prev is not None and obs.prev.applied == total,
                   f"every order applied exactly once{killed}: {obs.prev.applied:,} of {total:,}, "
                   f"{dups} applied twice")
        view.say("backlog drained: waiting for the scale-down and the hand-off")
        # to minReplicas (1), in one step or more: the window holds the highest recommendation of
        # the last scaleDownStabilizationS, which may still be 2 while the last orders drain
        low = wait("the operator scaling down to minReplicas", lambda: (s := obs.prev) and s.desired == 1
                   and _ready_pods(ns, pods) == s.desired and s.desired, 240, tick)
        removed = wait("the departed members removed from the group",
                       lambda: any("MembersRemoved" in e for e in view.events) or _event(ns, name, "MembersRemoved"), 90, tick)
        view.check(bool(removed), f"scaled down {top} -> {low}; the departed static members removed from the group")
        view.say("deleting the AdaptiveConsumer")
        kubectl("delete", "adaptiveconsumer", name, "-n", ns, "--wait=true", "--timeout=120s")
        gone = wait("every consumer process stopped",
                    lambda: not [p for p in agent.processes() if _is_consumer(p)], 120, tick)
        view.check(bool(gone), "deleting the AdaptiveConsumer stopped every consumer process")
        ok = all(c for c, _ in view.checks)
    except Exception as e:  # noqa: BLE001 - the demo reports, then cleans up
        view.check(False, f"{type(e).__name__}: {e}")
    finally:
        view.say("cleaning up")
        if obs is not None:
            obs.close()
        kubectl("delete", "namespace", ns, "--wait=false", check=False)
        agent.stop()
        try:
            import redis
            redis.Redis.from_url(redis_url).delete(applied_hash)
            from confluent_kafka.admin import AdminClient
            AdminClient({"bootstrap.servers": bootstrap}).delete_topics(
                [topic, f"{topic}.retry", f"{topic}.dlq", f"{topic}.poison"])
        except Exception:  # noqa: BLE001 - best effort
            pass
        view.stop()
    print(f"demo: {'PASS' if ok else 'FAIL'} ({sum(c for c, _ in view.checks)}/{len(view.checks)} checks, "
          f"{time.monotonic() - started:.0f} s)")
    return 0 if ok else 1


def _ready_pods(ns: str, selector: str) -> int:
    pods = (get_json("pods", "-n", ns, "-l", selector) or {}).get("items", [])
    return sum(1 for p in pods if any(c.get("type") == "Ready" and c.get("status") == "True"
                                      for c in (p.get("status") or {}).get("conditions") or [])
               and not p["metadata"].get("deletionTimestamp"))


def _rolled(ns: str, name: str) -> bool:
    sts = get_json("statefulset", name, "-n", ns) or {}
    st, want = sts.get("status") or {}, (sts.get("spec") or {}).get("replicas")
    return bool(st.get("updateRevision") and st.get("currentRevision") == st.get("updateRevision")
                and st.get("updatedReplicas") == want and st.get("readyReplicas") == want)


def _event(ns: str, name: str, reason: str) -> bool:
    evs = (get_json("events", "-n", ns, "--field-selector", f"involvedObject.name={name},reason={reason}") or {})
    return bool(evs.get("items"))


def _is_consumer(pid: int) -> bool:
    try:
        return b"afc-consumer" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main())
