"""The operator (`afc-operator`, a subprocess) against the real apiserver and Kafka of the test bed:
an AdaptiveConsumer becomes a StatefulSet, a headless Service, a PodDisruptionBudget and a
ConfigMap; spec changes roll through, manual edits are reverted, deletion collects
everything, failures become a Degraded condition, and a restart mid-reconcile converges.

There is no kubelet: `mark_pods_ready` reports pods Running and Ready as a kubelet would.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from afc.operator.kube import Kube
from afc.operator.testing import OperatorProcess, delete_consumers
from afctest import Testbed, wait_for
from operator_bed import (CHILD_KINDS, SELECTOR, FAST, admin, children, condition, config_of, consumer,
                          event_messages, event_reasons, get, kubectl_apply, ready)

pytestmark = [pytest.mark.k8s, pytest.mark.kafka]

@pytest.fixture
def operator(testbed: Testbed, crd_installed: None, namespace: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    with OperatorProcess(["--namespace", namespace], testbed.kubeconfig, tmp_path / "operator.log", env=FAST) as op:
        yield op
        delete_consumers(admin(testbed), namespace)  # while the operator runs: it releases its finalizer



# ---------------------------------------------------------------------------------------------

def test_sample_becomes_statefulset_service_pdb_and_config_then_ready(
        testbed: Testbed, api: Kube, core, operator: OperatorProcess, namespace: str, names, make_topic) -> None:
    topic = make_topic("orders", partitions=3)
    kubectl_apply(testbed, namespace, consumer(testbed, names, topic))
    kids = operator.wait_until(lambda: (c := children(api, namespace)) and all(c.values()) and c, 30,
                               "the four child objects")
    ac = get(api, "AdaptiveConsumer", namespace, "orders")
    for kind in CHILD_KINDS:
        assert len(kids[kind]) == 1, kind
        (ref,) = kids[kind][0]["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == (
            "AdaptiveConsumer", "orders", ac["metadata"]["uid"], True)
        managers = {(m["manager"], m["operation"]) for m in kids[kind][0]["metadata"]["managedFields"]}
        assert ("afc-operator", "Apply") in managers, kind

    sts = kids["StatefulSet"][0]
    pod = sts["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert sts["spec"]["replicas"] == 2 and sts["spec"]["serviceName"] == "orders"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["AFC_CONFIG_FILE"]["value"] == "/etc/afc/config/config.json"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {"name": "http", "containerPort": 8080, "protocol": "TCP"} in c["ports"]
    assert pod["terminationGracePeriodSeconds"] > ac["spec"]["shutdown"]["drainTimeoutS"]
    assert c["securityContext"]["readOnlyRootFilesystem"] and c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert not c["securityContext"]["allowPrivilegeEscalation"] and pod["securityContext"]["runAsNonRoot"]
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    svc = kids["Service"][0]["spec"]
    assert svc["clusterIP"] == "None" and svc["selector"]["app.kubernetes.io/instance"] == "orders"
    assert kids["PodDisruptionBudget"][0]["spec"]["maxUnavailable"] == 1
    config = json.loads(kids["ConfigMap"][0]["data"]["config.json"])
    assert config["kafka"]["topics"] == [topic] and config["membership"]["static"] is True

    # the StatefulSet controller made the pods; their names are the group.instance.ids
    pods = wait_for(lambda: sorted(p.metadata.name for p in core.list_namespaced_pod(namespace).items), 30,
                    what="pods")
    assert pods == ["orders-0", "orders-1"]
    ac = ready(api, core, operator, namespace)
    st = ac["status"]
    assert st["observedGeneration"] == ac["metadata"]["generation"] == 1
    assert all(c["observedGeneration"] == 1 for c in st["conditions"])
    assert condition(ac, "Degraded")["status"] == "False" and condition(ac, "Progressing")["status"] == "False"
    assert (st["replicas"], st["readyReplicas"], st["desiredReplicas"]) == (2, 2, 2)
    assert st["selector"] == SELECTOR.format(name="orders")
    assert st["lag"]["partitions"] == 3 and st["lag"]["total"] == 0
    row = testbed.run_kubectl("get", "ac", "orders", "-n", namespace, "--no-headers").stdout.split()
    assert row[:5] == ["orders", "True", "2", "2", "0"]
    reasons = operator.wait_until(lambda: (r := event_reasons(testbed, namespace)) and "Ready" in r and r, 15,
                                  "Created and Ready events")
    assert reasons.count("Created") == 1


def test_lag_is_measured_from_the_group(testbed: Testbed, api: Kube, core, operator: OperatorProcess,
                                        namespace: str, names, make_topic) -> None:
    from confluent_kafka import Consumer, Producer, TopicPartition
    topic = make_topic("lagged", partitions=2)
    p = Producer({"bootstrap.servers": testbed.bootstrap})
    for i in range(30):
        p.produce(topic, value=b"x", partition=i % 2)
    assert p.flush(10) == 0
    obj = consumer(testbed, names, topic, scaling={"pollIntervalS": 1})
    group = obj["spec"]["kafka"]["groupId"]
    c = Consumer({"bootstrap.servers": testbed.bootstrap, "group.id": group, "enable.auto.commit": False})
    c.commit(offsets=[TopicPartition(topic, 0, 10)], asynchronous=False)  # 5 left on p0, 15 on p1
    c.close()
    kubectl_apply(testbed, namespace, obj)
    lag = operator.wait_until(lambda: ((get(api, "AdaptiveConsumer", namespace, "orders") or {}).get("status") or {})
                              .get("lag"), 30, "a lag summary")
    assert (lag["total"], lag["partitions"], lag["maxPartitionLag"]) == (20, 2, 15)
    row = testbed.run_kubectl("get", "ac", "orders", "-n", namespace, "--no-headers").stdout.split()
    assert "20" in row


def test_spec_change_rolls_through_to_the_statefulset(testbed: Testbed, api: Kube, core, operator: OperatorProcess,
                                                       namespace: str, names, make_topic) -> None:
    topic = make_topic("orders")
    obj = consumer(testbed, names, topic)
    kubectl_apply(testbed, namespace, obj)
    ready(api, core, operator, namespace)
    before = get(api, "StatefulSet", namespace, "orders")
    cm_before = config_of(api, namespace, before)

    changed = copy.deepcopy(obj)
    changed["spec"].update(image="example.invalid/afc-runtime:0.2.0", replicas=3, flow={"maxInflight": 64},
                           podTemplate={"nodeSelector": {"disk": "ssd"}})
    kubectl_apply(testbed, namespace, changed)

    def rolled() -> dict[str, Any] | None:
        s = get(api, "StatefulSet", namespace, "orders")
        return s if s["spec"]["replicas"] == 3 else None
    sts = operator.wait_until(rolled, 30, "the StatefulSet at 3 replicas")
    pod = sts["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "example.invalid/afc-runtime:0.2.0"
    assert pod["nodeSelector"] == {"disk": "ssd"}
    key = "afc.dev/config-hash"
    assert sts["spec"]["template"]["metadata"]["annotations"][key] != \
        before["spec"]["template"]["metadata"]["annotations"][key]
    cm = config_of(api, namespace, sts)
    assert json.loads(cm["data"]["config.json"])["flow"]["maxInflight"] == 64
    assert cm["metadata"]["name"] != cm_before["metadata"]["name"] and cm["immutable"] is True

    ac = ready(api, core, operator, namespace, timeout=90)
    assert ac["status"]["observedGeneration"] == ac["metadata"]["generation"] == 2
    assert condition(ac, "Ready")["observedGeneration"] == 2
    assert ac["status"]["readyReplicas"] == 3
    assert any("applied generation 2" in m for m in event_messages(testbed, namespace, "Updated"))

    # removing an override removes it from the pods too (server-side apply drops what we stop setting)
    kubectl_apply(testbed, namespace, {**changed, "spec": {**changed["spec"], "podTemplate": {}}})
    operator.wait_until(lambda: "nodeSelector" not in get(api, "StatefulSet", namespace, "orders")["spec"]["template"]["spec"],
                        30, "nodeSelector removed")


def test_manual_edits_are_reverted(testbed: Testbed, api: Kube, core, operator: OperatorProcess,
                                   namespace: str, names, make_topic) -> None:
    kubectl_apply(testbed, namespace, consumer(testbed, names, make_topic("orders")))
    ready(api, core, operator, namespace)
    k = testbed.run_kubectl

    k("scale", "statefulset/orders", "-n", namespace, "--replicas=5")
    k("set", "image", "statefulset/orders", "-n", namespace, "consumer=example.invalid/evil:1")
    def restored() -> bool:
        s = get(api, "StatefulSet", namespace, "orders")
        return s["spec"]["replicas"] == 2 and s["spec"]["template"]["spec"]["containers"][0]["image"] \
            == "ghcr.io/afc-dev/afc-runtime:0.1.0"
    operator.wait_until(restored, 30, "the StatefulSet edit reverted")

    cm = config_of(api, namespace)
    cm_name, cm_uid = cm["metadata"]["name"], cm["metadata"]["uid"]
    r = k("patch", f"configmap/{cm_name}", "-n", namespace, "--type=merge", "-p", '{"data":{"config.json":"{}"}}',
          check=False)
    assert r.returncode != 0 and "immutable" in r.stderr.lower(), r.stderr  # nobody changes a revision's config
    k("delete", f"configmap/{cm_name}", "-n", namespace)
    operator.wait_until(lambda: (c := get(api, "ConfigMap", namespace, cm_name)) and c["metadata"]["uid"] != cm_uid
                        and c["data"] == cm["data"], 30, "the deleted ConfigMap recreated")

    uid = get(api, "Service", namespace, "orders")["metadata"]["uid"]
    k("delete", "service/orders", "-n", namespace)
    operator.wait_until(lambda: (s := get(api, "Service", namespace, "orders")) and s["metadata"]["uid"] != uid, 30,
                        "the deleted Service recreated")
    k("patch", "pdb/orders", "-n", namespace, "--type=merge", "-p", '{"spec":{"maxUnavailable":0}}')
    operator.wait_until(lambda: get(api, "PodDisruptionBudget", namespace, "orders")["spec"]["maxUnavailable"] == 1,
                        30, "the PodDisruptionBudget edit reverted")

    drift = operator.wait_until(lambda: event_messages(testbed, namespace, "DriftCorrected"), 15, "DriftCorrected events")
    assert any(".spec.replicas" in m for m in drift) or any("image" in m for m in drift)
    assert all(len(v) == 1 for v in children(api, namespace).values())


def test_reconciling_again_changes_nothing(testbed: Testbed, api: Kube, core, crd_installed: None,
                                           namespace: str, names, make_topic, tmp_path: Path) -> None:
    # --verbose: a poll that changes nothing logs at debug level; the test counts them
    with OperatorProcess(["--namespace", namespace, "--verbose"], testbed.kubeconfig, tmp_path / "operator.log",
                         env=FAST) as op:
        kubectl_apply(testbed, namespace, consumer(testbed, names, make_topic("orders"), scaling={"pollIntervalS": 1}))
        ready(api, core, op, namespace)
        time.sleep(2)  # let the Ready write and its events settle
        name_of = {"ConfigMap": config_of(api, namespace)["metadata"]["name"]}
        versions = {kind: get(api, kind, namespace, name_of.get(kind, "orders"))["metadata"]["resourceVersion"]
                    for kind in CHILD_KINDS}
        cr_version = get(api, "AdaptiveConsumer", namespace, "orders")["metadata"]["resourceVersion"]
        events_before = event_reasons(testbed, namespace)
        polls = lambda: sum(1 for r in op.records() if r.get("trigger") == "poll")  # noqa: E731
        before = polls()

        op.wait_until(lambda: polls() >= before + 4, 30, "four more polls")
        after = {kind: get(api, kind, namespace, name_of.get(kind, "orders"))["metadata"]["resourceVersion"]
                 for kind in CHILD_KINDS}
        assert after == versions, "a poll rewrote a child object"
        assert get(api, "AdaptiveConsumer", namespace, "orders")["metadata"]["resourceVersion"] == cr_version
        assert event_reasons(testbed, namespace) == events_before
        assert all(len(v) == 1 for v in children(api, namespace).values())
        delete_consumers(admin(testbed), namespace)


def test_deleting_the_consumer_collects_everything(testbed: Testbed, api: Kube, core, operator: OperatorProcess,
                                                   namespace: str, names, make_topic) -> None:
    kubectl_apply(testbed, namespace, consumer(testbed, names, make_topic("orders")))
    operator.wait_until(lambda: all(children(api, namespace).values()), 30, "the child objects")
    wait_for(lambda: len(core.list_namespaced_pod(namespace).items) == 2, 30, what="two pods")
    testbed.run_kubectl("delete", "ac/orders", "-n", namespace, "--wait=true", "--timeout=30s")
    operator.wait_until(lambda: not any(children(api, namespace).values()), 60,
                        "the garbage collector to delete the children")
    wait_for(lambda: not core.list_namespaced_pod(namespace).items, 60, what="the pods gone")
    assert operator.alive


def test_scale_subresource_kubectl_and_hpa(testbed: Testbed, api: Kube, core, operator: OperatorProcess,
                                           namespace: str, names, make_topic) -> None:
    kubectl_apply(testbed, namespace, consumer(testbed, names, make_topic("orders")))
    ready(api, core, operator, namespace)
    k = testbed.run_kubectl
    k("scale", "ac/orders", "-n", namespace, "--replicas=3")
    operator.wait_until(lambda: get(api, "StatefulSet", namespace, "orders")["spec"]["replicas"] == 3, 30,
                        "kubectl scale ac to reach the StatefulSet")
    scale = json.loads(k("get", "--raw", f"/apis/afc.dev/v1alpha1/namespaces/{namespace}/adaptiveconsumers/orders/scale").stdout)
    assert scale["spec"]["replicas"] == 3 and scale["status"]["selector"] == SELECTOR.format(name="orders")

    k("scale", "ac/orders", "-n", namespace, "--replicas=50")  # maxReplicas is 6
    operator.wait_until(lambda: get(api, "StatefulSet", namespace, "orders")["spec"]["replicas"] == 6, 30,
                        "replicas kept at maxReplicas")
    # the status is written after the StatefulSet is applied, in the same reconcile
    operator.wait_until(lambda: get(api, "AdaptiveConsumer", namespace, "orders")["status"]["desiredReplicas"] == 6,
                        10, "status.desiredReplicas at maxReplicas")
    operator.wait_until(lambda: event_messages(testbed, namespace, "ReplicasClamped"), 15, "ReplicasClamped event")

    # An HPA drives the scale subresource: below its minReplicas it scales up without metrics.
    k("scale", "ac/orders", "-n", namespace, "--replicas=2")
    hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
           "metadata": {"name": "orders", "namespace": namespace},
           "spec": {"scaleTargetRef": {"apiVersion": "afc.dev/v1alpha1", "kind": "AdaptiveConsumer", "name": "orders"},
                    "minReplicas": 4, "maxReplicas": 5,
                    "metrics": [{"type": "Resource", "resource": {"name": "cpu",
                                                                  "target": {"type": "Utilization", "averageUtilization": 80}}}]}}
    k("apply", "-f", "-", input=json.dumps(hpa))
    operator.wait_until(lambda: get(api, "AdaptiveConsumer", namespace, "orders")["spec"]["replicas"] == 4, 90,
                        "the HPA to scale the AdaptiveConsumer to its minReplicas")
    operator.wait_until(lambda: get(api, "StatefulSet", namespace, "orders")["spec"]["replicas"] == 4, 30,
                        "the StatefulSet to follow the HPA")


def test_missing_secret_degrades_then_recovers_and_is_never_copied(
        testbed: Testbed, api: Kube, core, operator: OperatorProcess, namespace: str, names, make_topic) -> None:
    secret_value = "redis://:s3cr3t-pw@redis.example:6379/0"
    obj = consumer(testbed, names, make_topic("orders"), idempotency={"redisUrlSecretRef": {"name": "redis", "key": "url"}})
    kubectl_apply(testbed, namespace, obj)
    ac = operator.wait_until(lambda: (a := get(api, "AdaptiveConsumer", namespace, "orders"))
                             and condition(a, "Degraded").get("status") == "True" and a, 30, "Degraded")
    degraded = condition(ac, "Degraded")
    assert degraded["reason"] == "SecretNotFound"
    assert "spec.idempotency.redisUrlSecretRef" in degraded["message"] and "redis" in degraded["message"]
    assert condition(ac, "Ready")["status"] == "False"
    assert get(api, "StatefulSet", namespace, "orders") is None, "pods that cannot start were rolled out"
    operator.wait_until(lambda: "SecretNotFound" in event_reasons(testbed, namespace), 15, "a Warning event")

    testbed.run_kubectl("create", "secret", "generic", "redis", "-n", namespace, f"--from-literal=url={secret_value}")
    operator.wait_until(lambda: get(api, "StatefulSet", namespace, "orders"), 30, "the StatefulSet after the Secret")
    ac = ready(api, core, operator, namespace)
    assert condition(ac, "Degraded")["status"] == "False"
    assert "Recovered" in event_reasons(testbed, namespace)
    env = {e["name"]: e for e in get(api, "StatefulSet", namespace, "orders")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["AFC_IDEMPOTENCY__REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "redis", "key": "url"}
    everything = json.dumps([config_of(api, namespace), ac,
                             get(api, "StatefulSet", namespace, "orders")])
    assert "s3cr3t-pw" not in everything


def test_unreachable_broker_degrades_without_holding_up_others(
        testbed: Testbed, api: Kube, core, operator: OperatorProcess, namespace: str, names, make_topic) -> None:
    good_topic = make_topic("orders")
    bad = consumer(testbed, names, good_topic, name="stranded")
    bad["spec"]["kafka"]["bootstrapServers"] = "127.0.0.1:1"
    kubectl_apply(testbed, namespace, bad)
    operator.wait_until(lambda: condition(get(api, "AdaptiveConsumer", namespace, "stranded"), "Degraded")
                        .get("reason") == "BrokerUnreachable", 30, "BrokerUnreachable")
    started = time.monotonic()
    kubectl_apply(testbed, namespace, consumer(testbed, names, good_topic, name="orders"))
    ready(api, core, operator, namespace, "orders", timeout=30)
    assert time.monotonic() - started < 20, "a healthy consumer waited behind an unreachable broker"

    stranded = get(api, "AdaptiveConsumer", namespace, "stranded")
    assert condition(stranded, "Ready")["status"] == "False"
    assert "127.0.0.1:1" in condition(stranded, "Degraded")["message"]
    # its objects are applied anyway (the pods may reach a broker the operator cannot)
    assert get(api, "StatefulSet", namespace, "stranded") is not None

    # retried with growing delays, not in a hot loop, and the operator stays up
    def attempts() -> list[float]:
        return [time.mktime(time.strptime(r["timestamp"][:19], "%Y-%m-%dT%H:%M:%S"))
                for r in operator.records() if r.get("message") == "reconciled"
                and r.get("object", "").endswith("/stranded") and r.get("problem") == "BrokerUnreachable"]
    tries = operator.wait_until(lambda: (a := attempts()) and len(a) >= 4 and a, 60, "four attempts")
    assert tries[-1] - tries[0] >= 5, f"retries too fast: {tries}"
    # kopf keeps the handler's retry count and next attempt on the resource
    def progress() -> dict[str, Any]:
        notes = get(api, "AdaptiveConsumer", namespace, "stranded")["metadata"].get("annotations") or {}
        return json.loads(notes.get("operator.afc.dev/reconcile-create", "{}"))
    state = operator.wait_until(lambda: (p := progress()).get("retries", 0) >= 3 and p, 30, "three kopf retries")
    assert "BrokerUnreachable" in state["message"] and state["delayed"]
    assert operator.alive


def test_existing_object_is_not_taken_over(testbed: Testbed, api: Kube, core, operator: OperatorProcess,
                                           namespace: str, names, make_topic) -> None:
    testbed.run_kubectl("create", "service", "clusterip", "orders", "-n", namespace, "--tcp=9999")
    kubectl_apply(testbed, namespace, consumer(testbed, names, make_topic("orders")))
    ac = operator.wait_until(lambda: (a := get(api, "AdaptiveConsumer", namespace, "orders"))
                             and condition(a, "Degraded").get("status") == "True" and a, 30, "Degraded")
    assert condition(ac, "Degraded")["reason"] == "OwnershipConflict"
    assert "Service" in condition(ac, "Degraded")["message"]
    svc = get(api, "Service", namespace, "orders")
    assert svc["spec"]["ports"][0]["port"] == 9999 and not svc["metadata"].get("ownerReferences")


def test_restart_mid_reconcile_converges_without_duplicates(
        testbed: Testbed, api: Kube, core, crd_installed: None, namespace: str, names, make_topic, tmp_path: Path) -> None:
    from kubernetes import watch
    topic = make_topic("orders")
    log = tmp_path / "operator.log"
    first = OperatorProcess(["--namespace", namespace], testbed.kubeconfig, log, env=FAST).start()
    try:
        w = watch.Watch()
        stream = w.stream(core.list_namespaced_config_map, namespace, timeout_seconds=30,
                          label_selector="app.kubernetes.io/managed-by=afc-operator")
        kubectl_apply(testbed, namespace, consumer(testbed, names, topic))
        for event in stream:
            if event["type"] == "ADDED":
                first.freeze()  # the first object is there: stop the operator where it stands
                break
        w.stop()
        midway = get(api, "AdaptiveConsumer", namespace, "orders")
        present = {k: len(v) for k, v in children(api, namespace).items()}
        first.kill()
    finally:
        first.stop()
    # stopped between its first write and its status write
    assert present["ConfigMap"] == 1, present
    assert "observedGeneration" not in (midway.get("status") or {}), "the reconcile had already finished"

    with OperatorProcess(["--namespace", namespace], testbed.kubeconfig, log, env=FAST) as second:
        ac = ready(api, core, second, namespace)
        assert ac["status"]["observedGeneration"] == 1
        kids = children(api, namespace)
        assert {k: len(v) for k, v in kids.items()} == dict.fromkeys(CHILD_KINDS, 1)
        for items in kids.values():
            assert len(items[0]["metadata"]["ownerReferences"]) == 1
        pods = sorted(p.metadata.name for p in core.list_namespaced_pod(namespace).items)
        assert pods == ["orders-0", "orders-1"]
        assert event_reasons(testbed, namespace).count("Ready") == 1
        delete_consumers(admin(testbed), namespace)
