"""What a converged AdaptiveConsumer costs the apiserver (issue 14): nothing. Its polls read the
children and pods from kopf's watch streams (afc.operator.reconcile.Cache) and write only what
changed; a restarted operator (or the other replica after a fail-over) finds each child stamped
with the digest of what was applied and writes nothing either.

Counted by the operator itself: `afc_operator_api_requests_total{verb,resource}` counts every
request of its reconciles (kopf's watches, bookkeeping and Events are not in it).
"""
from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

import pytest

from afc.operator.kube import Kube
from afc.operator.reconcile import APPLIED
from afc.operator.testing import OperatorProcess, delete_consumers
from afctest import Testbed, free_port
from operator_bed import FAST, admin, children, consumer, get, kubectl_apply, ready

pytestmark = [pytest.mark.k8s, pytest.mark.kafka]

LINE = re.compile(r'^afc_operator_api_requests_total\{resource="([^"]*)",verb="([^"]*)"\} (\S+)$')
POLLS = re.compile(r'^afc_operator_poll_duration_seconds_count\{[^}]*\} (\S+)$')


def scrape(port: int) -> tuple[dict[tuple[str, str], float], float]:
    """(requests by (verb, resource), polls so far) from the operator's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    requests, polls = {}, 0.0
    for line in text.splitlines():
        if m := LINE.match(line):
            requests[(m[2], m[1])] = float(m[3])
        elif m := POLLS.match(line):
            polls += float(m[1])
    return requests, polls


def writes(requests: dict[tuple[str, str], float]) -> dict[tuple[str, str], float]:
    """The requests that change something. A SelfSubjectAccessReview is a POST that stores
    nothing: the start's question of which kinds may be watched (reconcile.watchable)."""
    return {k: v for k, v in requests.items()
            if k[0] in ("PATCH", "POST", "PUT", "DELETE") and k[1] != "selfsubjectaccessreviews"}


def test_polls_of_a_converged_consumer_send_no_request_and_a_restart_writes_nothing(
        testbed: Testbed, api: Kube, core, crd_installed: None, namespace: str, names, make_topic,
        tmp_path: Path) -> None:
    port = free_port()
    args = ["--namespace", namespace, "--metrics", f"127.0.0.1:{port}"]
    obj = consumer(testbed, names, make_topic("orders", partitions=2), scaling={"mode": "Off", "pollIntervalS": 1})
    with OperatorProcess(args, testbed.kubeconfig, tmp_path / "operator-1.log", env=FAST) as op:
        kubectl_apply(testbed, namespace, obj)
        ready(api, core, op, namespace)
        time.sleep(2)  # the Ready write and the watch events that follow it
        before, polls = scrape(port)
        assert writes(before), "converging wrote the children and the status"
        op.wait_until(lambda: scrape(port)[1] >= polls + 5, 20, "five more polls")
        after, _ = scrape(port)
        assert after == before, "a poll of a converged consumer sent requests"
        for kind, objs in children(api, namespace).items():
            assert all(APPLIED in (o["metadata"].get("annotations") or {}) for o in objs), kind
        versions = {kind: [o["metadata"]["resourceVersion"] for o in objs]
                    for kind, objs in children(api, namespace).items()}
        cr_version = get(api, "AdaptiveConsumer", namespace, "orders")["metadata"]["resourceVersion"]

    port = free_port()
    args = ["--namespace", namespace, "--metrics", f"127.0.0.1:{port}"]
    with OperatorProcess(args, testbed.kubeconfig, tmp_path / "operator-2.log", env=FAST) as op:
        op.wait_until(lambda: [r for r in op.records() if r.get("message") == "reconciled"
                               and r.get("trigger") == "resume"], 20, "the resume reconcile")
        polls = scrape(port)[1]
        op.wait_until(lambda: scrape(port)[1] >= polls + 3, 20, "three polls after the restart")
        requests, _ = scrape(port)
        assert writes(requests) == {}, "the restarted operator rewrote what had not changed"
        assert {kind: [o["metadata"]["resourceVersion"] for o in objs]
                for kind, objs in children(api, namespace).items()} == versions
        assert get(api, "AdaptiveConsumer", namespace, "orders")["metadata"]["resourceVersion"] == cr_version

        # a change still goes through, and only what it changes is written
        testbed.run_kubectl("patch", "ac/orders", "-n", namespace, "--type=merge", "-p", '{"spec":{"replicas":3}}')
        op.wait_until(lambda: get(api, "StatefulSet", namespace, "orders")["spec"]["replicas"] == 3, 20, "scaled to 3")
        time.sleep(2)
        changed = writes(scrape(port)[0])
        assert changed.get(("PATCH", "statefulsets")) == 1 and ("PATCH", "services") not in changed, changed
        delete_consumers(admin(testbed), namespace)
