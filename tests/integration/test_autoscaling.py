"""The lag autoscaler end to end on the test bed: the operator (`afc-operator` subprocess)
measures a real group on the real broker, writes spec.replicas, and real `afc-consumer`
processes play the pods.

There is no kubelet: `Kubelet` (tests/fake_kubelet.py) does its part for the AdaptiveConsumer's
pods: an `afc-consumer` process per pod, stopped (drained) when the pod goes.
"""
from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from afc.operator.kube import Kube, KubeError, path_for
from afc.operator.testing import OperatorProcess, delete_consumers
from afctest import Load, Testbed, free_port, wait_for
from fake_kubelet import Kubelet

pytestmark = [pytest.mark.k8s, pytest.mark.kafka, pytest.mark.redis]

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "manifests" / "samples" / "afc_v1alpha1_adaptiveconsumer.yaml"
FAST = {"AFC_OPERATOR_BACKOFF_MAX_S": "4", "AFC_OPERATOR_KAFKA_TIMEOUT_S": "2"}


def admin(testbed: Testbed) -> list[str]:
    return [testbed.kubectl, f"--kubeconfig={testbed.kubeconfig}"]


@pytest.fixture
def operator(testbed: Testbed, crd_installed: None, namespace: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    port = free_port()
    with OperatorProcess(["--namespace", namespace, "--metrics", f"127.0.0.1:{port}"], testbed.kubeconfig,
                         tmp_path / "operator.log", env=FAST) as op:
        op.metrics_port = port  # type: ignore[attr-defined]
        yield op
        delete_consumers(admin(testbed), namespace)


def consumer(testbed: Testbed, names: Any, topic: str, **spec: Any) -> dict[str, Any]:
    obj = yaml.safe_load(SAMPLE.read_text())
    obj["spec"]["kafka"].update(bootstrapServers=testbed.bootstrap, topics=[topic], groupId=names.group)
    obj["spec"].update(spec)
    return obj


def apply(testbed: Testbed, namespace: str, obj: dict[str, Any]) -> None:
    testbed.run_kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj))


def get(api: Kube, namespace: str, name: str = "orders") -> dict[str, Any]:
    return api.request("GET", path_for("AdaptiveConsumer", namespace, name))


def condition(ac: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in (ac.get("status") or {}).get("conditions") or [] if c["type"] == type_), {})


def events(testbed: Testbed, namespace: str, name: str = "orders") -> list[dict[str, Any]]:
    out = testbed.run_kubectl("get", "events", "-n", namespace, "-o", "json", "--field-selector",
                              f"involvedObject.kind=AdaptiveConsumer,involvedObject.name={name}").stdout
    return sorted(json.loads(out)["items"], key=lambda e: e["metadata"]["creationTimestamp"])


def produce(bootstrap: str, topic: str, per_partition: dict[int, int], key: bytes | None = None) -> None:
    """`key` is suffixed with the partition (as a key partitioner would keep a key on one
    partition): the runtime keeps a key's records in order, so one key on every partition
    would tie them all to the slowest."""
    from confluent_kafka import Producer
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    for part, n in per_partition.items():
        k = None if key is None else key + b"-p%d" % part
        for i in range(n):
            while True:
                try:
                    p.produce(topic, value=json.dumps({"n": i}).encode(), key=k, partition=part)
                    break
                except BufferError:
                    p.poll(0.05)
    assert p.flush(60) == 0


def scaling(spec: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    base = {"mode": "Lag", "pollIntervalS": 1, "scaleDownStabilizationS": 5, "stallAfterS": 4, "rateWindowS": 5}
    return {**base, **(spec or {}), **kw}


def redis_secret(testbed: Testbed, namespace: str) -> dict[str, Any]:
    testbed.run_kubectl("create", "secret", "generic", "redis", "-n", namespace, f"--from-literal=url={testbed.redis_url}")
    return {"redisUrlSecretRef": {"name": "redis", "key": "url"}}


def metrics(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The operator's /metrics as {(name, labels): value}."""
    import re
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, labels = head.partition("{")
        out[(name, frozenset(re.findall(r'(\w+)="([^"]*)"', labels)))] = float(value)
    return out


# ---------------------------------------------------------------------------------------------

def test_backlog_scales_up_within_two_polls_and_down_after_the_window(
        testbed: Testbed, api: Kube, core, operator: OperatorProcess, namespace: str, names, make_topic,
        redis_client, tmp_path: Path) -> None:
    topic = make_topic("orders", partitions=12)
    produce(testbed.bootstrap, topic, {p: 400 for p in range(12)})   # 4,800 behind
    idem = {**redis_secret(testbed, namespace), "keyPrefix": names.redis_prefix.rstrip(":")}
    # stallAfterS 30, not the file's 4: this test is about the window, and four consumers starting on
    # a loaded machine may commit nothing for seconds after their assignment (a stall of its own)
    obj = consumer(testbed, names, topic, replicas=1, minReplicas=1, maxReplicas=12, idempotency=idem,
                   scaling=scaling(lagThresholdPerReplica=1200, stallAfterS=30))
    t0 = time.monotonic()
    apply(testbed, namespace, obj)
    # the poll daemon starts with the resource and polls every second: two polls, plus the
    # operator's first reconcile (create handler, apply of four objects) as slack
    ac = operator.wait_until(lambda: (a := get(api, namespace))["spec"]["replicas"] == 4 and a, 2 * 1 + 3,
                             "spec.replicas raised to ceil(4,800 / 1,200) = 4 within two poll intervals")
    print(f"scaled up {time.monotonic() - t0:.2f}s after the AdaptiveConsumer was applied")
    ac = operator.wait_until(lambda: (a := get(api, namespace)).get("status", {}).get("scaling", {}).get("lastScaleTime")
                             and a, 5, "status")
    assert ac["status"]["scaling"]["replicasOwner"] == "afc-operator"
    scaled_up_at = ac["status"]["scaling"]["lastScaleTime"]
    operator.wait_until(lambda: api.request("GET", path_for("StatefulSet", namespace, "orders"))["spec"]["replicas"] == 4,
                        10, "the StatefulSet at 4")
    up = operator.wait_until(lambda: [e for e in events(testbed, namespace) if e["reason"] == "ScaleUp"], 10,
                             "a ScaleUp Event from the poll daemon")
    assert "1 -> 4" in up[0]["message"] and "lag=4800" in up[0]["message"]
    assert up[0]["source"]["component"] == "afc-operator"

    env = {"AFC_TEST_HASH": f"{names.redis_prefix}seen", "AFC_MEMBERSHIP__SESSION_TIMEOUT_MS": "10000"}
    with Kubelet(testbed, core, namespace, topic, names.group, "autoscale_handlers:record", tmp_path,
                 names.redis_prefix, env) as kubelet:
        # the consumers drain the backlog; once the recommendation (ceil(lag / 1,200)) stayed at 1
        # for scaleDownStabilizationS, back to minReplicas. Timed on the operator's own clock
        # (when the lag was measured, when it scaled): a loaded machine delays the polls and
        # the status writes, so when this test happens to read them says nothing.
        last_high: list[datetime] = []
        trail: list[tuple[Any, ...]] = []   # what the operator said, for the failure message

        def scaled_down() -> dict[str, Any] | None:
            a = get(api, namespace)
            lag = a["status"].get("lag") or {}
            if lag.get("total", 0) > 1200 and lag.get("measuredAt"):
                last_high.append(datetime.fromisoformat(lag["measuredAt"]))
            sc_ = a["status"].get("scaling") or {}
            seen = (lag.get("measuredAt"), lag.get("total"), a["spec"]["replicas"], sc_.get("recommendation"),
                    sc_.get("reason"), (sc_.get("inputs") or {}).get("members"),
                    (sc_.get("inputs") or {}).get("stalledPartitions"), (sc_.get("message") or "")[:160])
            if not trail or trail[-1] != seen:
                trail.append(seen)
            # the status (with the scale-down's time) follows the scale subresource's write
            down = a["spec"]["replicas"] == 1 and (a["status"].get("scaling") or {}).get("lastScaleTime") != scaled_up_at
            return a if down else None
        ac = operator.wait_until(scaled_down, 90, "the backlog drained by four afc-consumer processes, then 1 replica",
                                 interval=0.1)
        scaled_at = datetime.fromisoformat(ac["status"]["scaling"]["lastScaleTime"])
        assert last_high, "the status showed the backlog while it was drained"
        assert (scaled_at - max(last_high)).total_seconds() >= 4, \
            "scaled down before the stabilization window; (measuredAt, lag, replicas, recommendation, reason, " \
            "members, stalled, message) as read:\n" + "\n".join(map(str, trail))
        operator.wait_until(lambda: [e for e in events(testbed, namespace) if e["reason"] == "ScaleDown"], 10,
                            "a ScaleDown Event")
        operator.wait_until(lambda: set(kubelet.exited) == {"orders-1", "orders-2", "orders-3"}, 60,
                            "the three departed pods' consumers drained and stopped")

        def removed() -> str:
            return " ".join(e["message"] for e in events(testbed, namespace) if e["reason"] == "MembersRemoved")
        operator.wait_until(lambda: all(f"orders-{i} (NoError)" in removed() for i in (1, 2, 3)), 20,
                            "the departed members removed from the group")
        assert "UnknownMember" not in removed(), "a member was removed before it had joined and left"
        assert kubelet.error is None, kubelet.error
    assert condition(ac, "Ready")["status"] == "True"
    m = metrics(operator.metrics_port)  # type: ignore[attr-defined]
    mine = {"namespace": namespace, "name": "orders"}
    assert m[("afc_operator_desired_replicas", frozenset(mine.items()))] == 1
    assert m[("afc_operator_scaling_decisions_total", frozenset({**mine, "reason": "ScaleUp"}.items()))] == 1
    assert m[("afc_operator_scaling_decisions_total", frozenset({**mine, "reason": "ScaleDown"}.items()))] >= 1
    assert m[("afc_operator_poll_duration_seconds_count", frozenset(mine.items()))] >= 3
    assert m[("afc_operator_members_removed_total", frozenset(mine.items()))] == 3
    assert m[("afc_operator_kafka_admin_clients", frozenset())] == 1
    # the lag gauge moves at the operator's next poll, which may come after the removal above
    operator.wait_until(lambda: metrics(operator.metrics_port)[("afc_operator_lag_messages",  # type: ignore[attr-defined]
                                                                frozenset(mine.items()))] == 0,
                        30, "the lag gauge at 0 after the next poll")


def test_a_stuck_partition_does_not_scale_up(testbed: Testbed, api: Kube, core, operator: OperatorProcess,
                                            namespace: str, names, make_topic, redis_client, tmp_path: Path) -> None:
    topic = make_topic("orders", partitions=4)
    obj = consumer(testbed, names, topic, replicas=1, minReplicas=1, maxReplicas=4,
                   idempotency={**redis_secret(testbed, namespace), "keyPrefix": names.redis_prefix.rstrip(":")},
                   scaling=scaling(lagThresholdPerReplica=500))
    env = {"AFC_TEST_HASH": f"{names.redis_prefix}seen", "AFC_TEST_POISON_PARTITION": "0",
           "AFC_ROUTING__ENABLED": "false", "AFC_MEMBERSHIP__SESSION_TIMEOUT_MS": "10000"}
    with Kubelet(testbed, core, namespace, topic, names.group, "autoscale_handlers:poison_on_partition", tmp_path,
                 names.redis_prefix, env) as kubelet:
        apply(testbed, namespace, obj)
        wait_for(lambda: "orders-0" in kubelet.procs, 30, what="orders-0 running")
        kubelet.procs["orders-0"].wait_ready(60)
        produce(testbed.bootstrap, topic, {0: 5, 1: 20, 2: 20, 3: 20}, key=b"k")
        ac = operator.wait_until(lambda: (a := get(api, namespace)) and condition(a, "Stalled").get("status") == "True"
                                 and a, 30, "partition 0 judged stalled")
        assert f"{topic}/0" in condition(ac, "Stalled")["message"]
        assert f"{topic}/1" not in condition(ac, "Stalled")["message"]
        # now a backlog lands on the stuck partition: 3,000 >> 500 per replica, yet no scale-up
        produce(testbed.bootstrap, topic, {0: 3000}, key=b"k")
        operator.wait_until(lambda: (get(api, namespace)["status"].get("lag") or {}).get("total", 0) >= 3000, 10,
                            "the backlog measured")
        time.sleep(5)  # five polls
        ac = get(api, namespace)
        assert ac["spec"]["replicas"] == 1
        assert ac["status"]["scaling"]["reason"] == "StalledPartitions", ac["status"]["scaling"]
        assert ac["status"]["scaling"]["inputs"]["stalledPartitions"] == [f"{topic}/0"]
        assert condition(ac, "ScalingLimited")["reason"] == "StalledPartitions"
        assert any(e["reason"] == "StalledPartitions" for e in events(testbed, namespace))
        assert kubelet.error is None, kubelet.error


def test_engaged_backpressure_blocks_scale_up(testbed: Testbed, api: Kube, core, operator: OperatorProcess,
                                             namespace: str, names, make_topic, redis_client, tmp_path: Path) -> None:
    topic = make_topic("orders", partitions=4)
    latency = f"{names.redis_prefix}latency"
    redis_client.set(latency, 400)  # the downstream answers in 400 ms; the target is 50 ms
    obj = consumer(testbed, names, topic, replicas=1, minReplicas=1, maxReplicas=4,
                   idempotency={**redis_secret(testbed, namespace), "keyPrefix": names.redis_prefix.rstrip(":")},
                   scaling=scaling(lagThresholdPerReplica=500, stallAfterS=60))
    env = {"AFC_TEST_HASH": f"{names.redis_prefix}seen", "AFC_TEST_LATENCY_KEY": latency,
           "AFC_FLOW__TARGET_LATENCY_MS": "50", "AFC_FLOW__WINDOW_MS": "200", "AFC_FLOW__MAX_INFLIGHT": "8",
           "AFC_MEMBERSHIP__SESSION_TIMEOUT_MS": "10000"}
    with Kubelet(testbed, core, namespace, topic, names.group, "autoscale_handlers:record", tmp_path,
                 names.redis_prefix, env) as kubelet:
        apply(testbed, namespace, obj)
        wait_for(lambda: "orders-0" in kubelet.procs, 30, what="orders-0 running")
        kubelet.procs["orders-0"].wait_ready(60)
        # a little lag (no reason to scale) on a slow downstream: the consumer saturates
        produce(testbed.bootstrap, topic, {p: 100 for p in range(4)})
        operator.wait_until(lambda: (get(api, namespace)["status"].get("backpressure") or {}).get("level") == "Engaged",
                            30, "the group's backpressure signal engaged")
        assert get(api, namespace)["spec"]["replicas"] == 1
        produce(testbed.bootstrap, topic, {p: 1000 for p in range(4)})  # now a backlog worth 4 replicas
        ac = operator.wait_until(lambda: (a := get(api, namespace))["status"].get("scaling", {}).get("reason")
                                 == "BackpressureEngaged" and a, 30, "scale-up held by backpressure")
        assert ac["status"]["backpressure"]["level"] == "Engaged" and ac["status"]["backpressure"]["members"] == 1
        assert "backpressure level 1.00" in ac["status"]["scaling"]["message"]
        time.sleep(3)
        assert get(api, namespace)["spec"]["replicas"] == 1
        row = testbed.run_kubectl("get", "ac", "orders", "-n", namespace, "--no-headers").stdout.split()
        assert "Engaged" in row, row  # the Backpressure printer column
        assert any(e["reason"] == "BackpressureEngaged" for e in events(testbed, namespace))

        # The downstream recovers to 20 ms, within the 50 ms target: the signal clears (pressure 0.4
        # for clearAfterMs) while the backlog is still there (at most 8 in flight x 20 ms: 4,400
        # records take 11 s or more), and the lag scales up. (Recovering to 0 ms let one consumer
        # drain the backlog within about the second the signal takes to clear: then nothing was
        # left to scale for, rightly, and the test raced the drain.)
        redis_client.set(latency, 20)
        operator.wait_until(lambda: get(api, namespace)["spec"]["replicas"] > 1, 30, "scale-up once clear")
        assert kubelet.error is None, kubelet.error


def test_scale_to_zero_and_wake_up(testbed: Testbed, api: Kube, operator: OperatorProcess, namespace: str, names,
                                   make_topic) -> None:
    topic = make_topic("orders", partitions=2)
    obj = consumer(testbed, names, topic, replicas=1, minReplicas=0, maxReplicas=2,
                   scaling=scaling(lagThresholdPerReplica=100, activationLag=30, scaleDownStabilizationS=3))
    apply(testbed, namespace, obj)
    ac = operator.wait_until(lambda: (a := get(api, namespace))["spec"]["replicas"] == 0 and a, 20, "scaled to zero")
    operator.wait_until(lambda: condition(get(api, namespace), "Ready").get("reason") == "ScaledToZero", 10,
                        "Ready: ScaledToZero")
    produce(testbed.bootstrap, topic, {0: 10, 1: 10})  # 20 <= activationLag 30: stays asleep
    time.sleep(3)
    ac = get(api, namespace)
    assert ac["spec"]["replicas"] == 0 and ac["status"]["scaling"]["reason"] == "Idle"
    produce(testbed.bootstrap, topic, {0: 30})          # 50 > 30: wakes
    operator.wait_until(lambda: get(api, namespace)["spec"]["replicas"] == 1, 5, "woken up by new lag")
    operator.wait_until(lambda: {"ScaleToZero", "WakeUp"} <= {e["reason"] for e in events(testbed, namespace)}, 10,
                        "ScaleToZero and WakeUp Events")


def test_stale_data_holds_and_is_reported_by_the_poll(testbed: Testbed, api: Kube, operator: OperatorProcess,
                                                     namespace: str, names, make_topic) -> None:
    """An unreachable broker: the poll keeps the replicas, marks the data stale (condition
    and a Warning Event posted from the poll daemon) and never scales on it."""
    obj = consumer(testbed, names, "orders", replicas=2, scaling=scaling())
    obj["spec"]["kafka"]["bootstrapServers"] = "127.0.0.1:1"
    apply(testbed, namespace, obj)
    ac = operator.wait_until(lambda: (a := get(api, namespace)) and condition(a, "ScalingActive").get("reason")
                             == "StaleData" and a, 40, "ScalingActive False: StaleData")
    assert condition(ac, "ScalingActive")["status"] == "False" and ac["spec"]["replicas"] == 2
    stale = operator.wait_until(lambda: [e for e in events(testbed, namespace) if e["reason"] == "StaleData"], 10,
                                "a StaleData Warning")
    assert stale[0]["type"] == "Warning" and "127.0.0.1:1" in stale[0]["message"]
    time.sleep(3)
    assert get(api, namespace)["spec"]["replicas"] == 2


def assignment(testbed: Testbed, group: str) -> dict[str, set[int]]:
    """group.instance.id -> partitions of the topic it holds, as the broker describes the group."""
    from confluent_kafka.admin import AdminClient
    from confluent_kafka import KafkaException
    a = AdminClient({"bootstrap.servers": testbed.bootstrap})
    try:
        (desc,) = [f.result(10) for f in a.describe_consumer_groups([group], request_timeout=10).values()]
    except KafkaException as e:
        if e.args[0].retriable():  # NOT_COORDINATOR, COORDINATOR_LOAD_IN_PROGRESS: the group is moving
            return {}
        raise
    return {m.group_instance_id: {tp.partition for tp in m.assignment.topic_partitions if not tp.topic.endswith(".retry")}
            for m in desc.members if m.group_instance_id}


@pytest.mark.parametrize("protocol,hand_off", [("classic", True), ("classic", False), ("consumer", True)])
def test_scale_down_hands_the_departed_members_partitions_over(
        protocol: str, hand_off: bool, testbed: Testbed, api: Kube, core, operator: OperatorProcess, namespace: str,
        names, make_topic, redis_client, tmp_path: Path) -> None:
    """4 -> 2 static members. A static member sends no LeaveGroup when it stops, so without the
    hand-off its partitions wait for the session timeout (classic: 12 s here; KIP-848: the
    broker's 45 s). With it, the operator removes the departed group.instance.ids once their
    pods are gone (LeaveGroup v3+, which Kafka 4.1 also applies to consumer-protocol groups),
    and their partitions are consumed again within 5 s (classic), or at the remaining
    members' next heartbeat (KIP-848, 5 s by default)."""
    session_s = 12
    topic = make_topic("orders", partitions=8)
    obj = consumer(testbed, names, topic, replicas=4, minReplicas=1, maxReplicas=4,
                   membership={"sessionTimeoutMs": session_s * 1000, "groupProtocol": protocol},
                   scaling={"mode": "Off", "pollIntervalS": 1, "leaveGroupOnScaleDown": hand_off})
    seen = f"{names.redis_prefix}seen"
    env = {"AFC_TEST_HASH": seen, "AFC_MEMBERSHIP__SESSION_TIMEOUT_MS": str(session_s * 1000),
           "AFC_MEMBERSHIP__GROUP_PROTOCOL": protocol, "AFC_SHUTDOWN__DRAIN_TIMEOUT_S": "5",
           # the source topic alone: both assignors balance the count of partitions over all the
           # subscribed topics, so with .retry subscribed the stopping members may hold only idle
           # retry partitions, and there would be nothing to time
           "AFC_ROUTING__ENABLED": "false"}
    with Kubelet(testbed, core, namespace, topic, names.group, "autoscale_handlers:record", tmp_path,
                 names.redis_prefix, env) as kubelet, Load(testbed.bootstrap, topic, 8):
        apply(testbed, namespace, obj)
        leaving = [f"{namespace}.orders-2", f"{namespace}.orders-3"]  # group.instance.id = <namespace>.<pod>
        last: dict[str, set[int]] = {}

        def four_holding() -> dict[str, set[int]] | None:
            nonlocal last
            last = a = assignment(testbed, names.group)
            ok = (len(a) == 4 and set(leaving) <= set(a) and sum(len(v) for v in a.values()) == 8
                  and (a[leaving[0]] | a[leaving[1]]))
            return a if ok else None
        try:
            held = wait_for(four_holding, 90, what="4 members holding 8 partitions, some on orders-2 and -3")
        except AssertionError as e:
            raise AssertionError(f"{e}\nthe group's assignment: {last}\n{kubelet.report()}") from None
        moving = held[leaving[0]] | held[leaving[1]]
        time.sleep(2)
        testbed.run_kubectl("scale", "ac/orders", "-n", namespace, "--replicas=2")
        wait_for(lambda: {"orders-2", "orders-3"} <= set(kubelet.exited), 60, what="orders-2 and -3 drained and stopped")
        left = max(kubelet.exited["orders-2"], kubelet.exited["orders-3"])

        def resumed() -> float | None:
            """Seconds from the departed members' exit until the last of their partitions was
            consumed again (None while one is still waiting)."""
            firsts = []
            for p in moving:
                times = [float(t) for t in redis_client.lrange(f"{seen}:p{p}", -400, -1)]
                after = [t for t in times if t > left]
                if not after:
                    return None
                firsts.append(min(after))
            return max(firsts) - left
        gap = wait_for(resumed, session_s + 60, interval=0.2, what="the departed members' partitions consumed again")
        print(f"protocol={protocol} hand_off={hand_off}: partitions {sorted(moving)} consumed again "
              f"{gap:.2f}s after their members stopped (session timeout {session_s}s)")
        reasons = {e["reason"] for e in events(testbed, namespace)}
        if hand_off and protocol == "classic":
            assert gap < 5, f"{gap:.2f}s"
            assert "MembersRemoved" in reasons
        elif hand_off:
            # KIP-848: the remaining members learn their new assignment at their next heartbeat,
            # every group.consumer.heartbeat.interval.ms (the broker's, 5 s by default): the
            # floor here. Without the hand-off: the broker's session timeout (45 s by default).
            assert gap < 5 + 2, f"{gap:.2f}s"
            assert "MembersRemoved" in reasons
        else:
            assert gap >= session_s - 3, f"{gap:.2f}s: faster than the session timeout without a hand-off?"
            assert "MembersRemoved" not in reasons
        assert kubelet.error is None, kubelet.error


def test_an_upgrade_removes_the_members_old_ids(testbed: Testbed, api: Kube, core, operator: OperatorProcess,
                                                namespace: str, names, make_topic, tmp_path: Path) -> None:
    """Pods rendered before group.instance.id was `<namespace>.<pod>` joined under the bare pod
    name. When the operator rolls them onto its render, it removes each old id from the group as
    that pod goes (LeaveGroup by instance id), so the group holds only the new ids well before the
    session timeout, instead of ghosts sitting on partitions until it."""
    session_s = 40
    topic = make_topic("orders", partitions=4)
    obj = consumer(testbed, names, topic, replicas=0, minReplicas=0, maxReplicas=2,
                   membership={"sessionTimeoutMs": session_s * 1000}, scaling={"mode": "Off", "pollIntervalS": 1})
    env = {"AFC_TEST_HASH": f"{names.redis_prefix}seen", "AFC_MEMBERSHIP__SESSION_TIMEOUT_MS": str(session_s * 1000),
           "AFC_SHUTDOWN__DRAIN_TIMEOUT_S": "5", "AFC_ROUTING__ENABLED": "false"}
    apply(testbed, namespace, obj)
    sts = wait_for(lambda: (s := api.request("GET", path_for("StatefulSet", namespace)).get("items")) and s[0], 30,
                   what="the StatefulSet")
    operator.stop()
    # what an older operator rendered: no AFC_INSTANCE_ID (the runtime falls back to POD_NAME)
    (index,) = [i for i, e in enumerate(sts["spec"]["template"]["spec"]["containers"][0]["env"])
                if e["name"] == "AFC_INSTANCE_ID"]
    testbed.run_kubectl("patch", "statefulset/orders", "-n", namespace, "--type=json", "-p", json.dumps([
        {"op": "remove", "path": f"/spec/template/spec/containers/0/env/{index}"},
        {"op": "replace", "path": "/spec/replicas", "value": 2}]))
    testbed.run_kubectl("patch", "ac/orders", "-n", namespace, "--type=merge", "-p", '{"spec":{"replicas":2}}')
    legacy, new = {"orders-0", "orders-1"}, {f"{namespace}.orders-0", f"{namespace}.orders-1"}
    with Kubelet(testbed, core, namespace, topic, names.group, "autoscale_handlers:record", tmp_path,
                 names.redis_prefix, env) as kubelet:
        wait_for(lambda: set(assignment(testbed, names.group)) == legacy, 60, what="the members under the old ids")
        operator.start()
        started = time.monotonic()
        wait_for(lambda: set(assignment(testbed, names.group)) == new, session_s - 10, interval=0.5,
                 what="only the new ids in the group")
        print(f"upgrade: only the new ids after {time.monotonic() - started:.1f}s (session timeout {session_s}s)")
        removed = [e["message"] for e in events(testbed, namespace) if e["reason"] == "MembersRemoved"]
        assert any("orders-0 (NoError)" in m for m in removed) and any("orders-1 (NoError)" in m for m in removed), removed
        assert kubelet.error is None, kubelet.error
