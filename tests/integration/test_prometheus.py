"""afc's alert rules and dashboard against a real Prometheus (Debian's 2.42) scraping a real
`afc-consumer`, the operator (`afc-operator` process) and an AdaptiveProducer on the test bed.

One run: an AdaptiveConsumer `orders` in a fresh namespace (the operator measures its group and
decides), one `afc-consumer` playing its pod `orders-0`, a producer honouring the group's
signal. A normal run (good records and one that fails for good) must give data to every query
of the dashboard and leave the poison alert quiet; then a flood of undecodable records must make
AfcPoisonRecords fire in /api/v1/alerts with the labels that locate it. The rules are the
generated ones with the poison window shortened through the generator's parameters (the
mechanism users override thresholds with), and Prometheus scrapes and evaluates every second.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from afc.operator.testing import OperatorProcess, delete_consumers, mark_pods_ready
from afctest import ROOT, ConsumerProcess, PrivateRedis, Testbed, free_port, wait_for
from prometheus_bed import PrometheusBed, alerts, gen

pytestmark = [pytest.mark.k8s, pytest.mark.kafka, pytest.mark.redis]

SAMPLE = ROOT / "manifests" / "samples" / "afc_v1alpha1_adaptiveconsumer.yaml"
# the integration run's overrides: a poison window Prometheus can fill within the test
FAST = {"poison_window": "30s", "poison_records": 10, "poison_for": "0s", "store_error_window": "10s",
        "store_for": "2s", "member_down_for": "2s"}


def substitute(expr: str, namespace: str) -> str:
    """What Grafana would send with namespace = the test's and every AdaptiveConsumer."""
    return (expr.replace("$namespace", namespace).replace("$adaptiveconsumer", ".*")
            .replace("$__rate_interval", "15s"))


@pytest.fixture
def operator(testbed: Testbed, crd_installed: None, namespace: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    port = free_port()
    with OperatorProcess(["--namespace", namespace, "--metrics", f"127.0.0.1:{port}"], testbed.kubeconfig,
                         tmp_path / "operator.log",
                         env={"AFC_OPERATOR_BACKOFF_MAX_S": "4", "AFC_OPERATOR_KAFKA_TIMEOUT_S": "2"}) as op:
        op.metrics_port = port  # type: ignore[attr-defined]
        yield op
        delete_consumers([testbed.kubectl, f"--kubeconfig={testbed.kubeconfig}"], namespace)


class Feed:
    """An AdaptiveProducer sending good records at a steady rate (its metrics served for
    Prometheus) until stopped; `bad(n)` adds undecodable ones."""

    def __init__(self, testbed: Testbed, topic: str, group: str, prefix: str, rate: float = 100) -> None:
        from prometheus_client import start_http_server

        from afc.runtime.config import ProducerSettings
        from afc.runtime.producer import AdaptiveProducer
        self.topic, self.rate = topic, rate
        self.p = AdaptiveProducer(ProducerSettings(bootstrap_servers=testbed.bootstrap, groups=[group],
                                                   redis_url=testbed.redis_url, key_prefix=prefix))
        self.port = free_port()
        self.server, self.server_thread = start_http_server(self.port, addr="127.0.0.1", registry=self.p.metrics.registry)
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="feed", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.p.produce(self.topic, json.dumps({"n": self.sent}).encode(), key=f"k{self.sent % 8}".encode())
            self.sent += 1
            self._stop.wait(1 / self.rate)

    def one(self, value: bytes) -> None:
        self.p.produce(self.topic, value, key=b"odd")

    def __enter__(self) -> "Feed":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.p.close(10)
        self.server.shutdown()
        self.server_thread.join(10)


def firing(prom: PrometheusBed, name: str) -> list[dict[str, Any]]:
    return [a for a in prom.alerts("firing") if a["labels"]["alertname"] == name]


def test_dashboard_queries_have_data_and_the_alerts_fire(
        testbed: Testbed, operator: OperatorProcess, core, namespace: str, names, make_topic, redis_client,
        tmp_path: Path) -> None:
    topic = make_topic("orders", partitions=3)
    prefix = names.redis_prefix.rstrip(":")
    obj = yaml.safe_load(SAMPLE.read_text())
    obj["spec"]["kafka"].update(bootstrapServers=testbed.bootstrap, topics=[topic], groupId=names.group)
    obj["spec"].update(replicas=1, minReplicas=1, maxReplicas=3,
                       scaling={"mode": "Lag", "pollIntervalS": 1, "lagThresholdPerReplica": 100000})
    testbed.run_kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj))

    rules = tmp_path / "rules" / "afc-alerts.rules.yaml"
    assert gen.main(["--out", str(tmp_path), *[f"--set={k}={v}" for k, v in FAST.items()]]) == 0
    poison_rule = next(a for a in alerts(yaml.safe_load(rules.read_text())["groups"]) if a["alert"] == "AfcPoisonRecords")
    assert "[30s]" in poison_rule["expr"] and "for" not in poison_rule

    store = PrivateRedis(tmp_path / "redis").start()    # the consumer's idempotency store, to be stopped
    c = ConsumerProcess(testbed, [topic], names.group, "afc_test_handlers:scripted", tmp_path / "orders-0.log",
                        instance_id="orders-0", redis_prefix=names.redis_prefix,
                        env={"AFC_TEST_HASH": f"{names.redis_prefix}runs", "AFC_ROUTING__BACKOFF_INITIAL_MS": "200",
                             "AFC_ROUTING__BACKOFF_MAX_MS": "400", "AFC_IDEMPOTENCY__REDIS_URL": store.url}).start()
    try:
        c.wait_ready()
        with Feed(testbed, topic, names.group, prefix) as feed, PrometheusBed(
                tmp_path / "prometheus",
                {"afc-consumers": [(f"127.0.0.1:{c.port}", {"namespace": namespace, "adaptiveconsumer": "orders",
                                                            "pod": "orders-0"})],
                 "afc-operator": [(f"127.0.0.1:{operator.metrics_port}", {})],  # type: ignore[attr-defined]
                 "afc-producers": [(f"127.0.0.1:{feed.port}", {"namespace": namespace, "pod": "producer-0"})]},
                rule_files=[rules], honor_labels=("afc-operator",)) as prom:
            prom.wait_targets_up(60)
            # the normal run: good records, and one that fails for good (dead-lettered)
            feed.one(json.dumps({"fail": "always"}).encode())

            queries = [(t, substitute(e, namespace)) for t, e in gen.queries(gen.dashboard())]
            empty: list[tuple[str, str]] = []

            def all_have_data() -> bool:
                # no kubelet: report the StatefulSet's pod ready once the controller made it
                mark_pods_ready(core, namespace, "app.kubernetes.io/instance=orders")
                empty[:] = [(t, q) for t, q in queries if not prom.query(q)]
                return not empty
            wait_for(all_have_data, 90, 2, "every dashboard query to return data")
            print(f"{len(queries)} dashboard queries returned data")
            for var in gen.dashboard()["templating"]["list"][1:]:
                label = var["definition"].rsplit(",", 1)[1].strip(" )")
                series = var["definition"][len("label_values("):].rsplit(",", 1)[0].replace("$namespace", namespace)
                values = prom.api("label/" + label + "/values", **{"match[]": series})
                assert values == [namespace if label == "namespace" else "orders"], (var["name"], values)

            # every rule loaded and evaluated without error against the real series, none firing in a normal run
            loaded = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
            assert sorted(r["name"] for r in loaded) == sorted(a["alert"] for a in alerts(gen.groups()))
            assert [(r["name"], r.get("lastError")) for r in loaded if r["health"] != "ok"] == []
            assert prom.alerts("firing") == []

            # quiet while poison stays under the threshold (the evaluation runs every second)
            for _ in range(3):
                feed.one(b"{not json")
            time.sleep(5)
            assert not [a for a in prom.alerts() if a["labels"]["alertname"] == "AfcPoisonRecords"], prom.alerts()

            # the flood
            t0 = time.monotonic()
            for _ in range(40):
                feed.one(b"\xff not json either")
            (a,) = wait_for(lambda: firing(prom, "AfcPoisonRecords"), 60, 1, "AfcPoisonRecords firing in /api/v1/alerts")
            print(f"AfcPoisonRecords firing {time.monotonic() - t0:.1f}s after the flood")
            assert a["labels"] == {"alertname": "AfcPoisonRecords", "severity": "warning", "component": "afc",
                                   "namespace": namespace, "adaptiveconsumer": "orders"}
            assert float(a["value"]) > 10
            assert f"AdaptiveConsumer {namespace}/orders routed" in a["annotations"]["description"]
            assert a["annotations"]["runbook_url"].endswith("docs/runbook.md#afcpoisonrecords")
            # the alert may fire while the flood is still being routed: every record is counted in the end
            def poison_counted() -> float:
                poison = prom.query(f'afc_poison_records_total{{namespace="{namespace}"}}')
                return float(poison[0]["value"][1]) if poison else 0.0
            wait_for(lambda: poison_counted() >= 43, 30, 1, "all 43 poison records counted in Prometheus")

            # the idempotency store goes away: paged within the (shortened) window, and back
            assert not firing(prom, "AfcIdempotencyStoreUnavailable")
            t0 = time.monotonic()
            store.stop()
            (a,) = wait_for(lambda: firing(prom, "AfcIdempotencyStoreUnavailable"), 60, 1,
                            "AfcIdempotencyStoreUnavailable firing")
            print(f"AfcIdempotencyStoreUnavailable firing {time.monotonic() - t0:.1f}s after Redis stopped")
            assert a["labels"]["severity"] == "critical" and a["labels"]["adaptiveconsumer"] == "orders"
            store.start()
            wait_for(lambda: c.http("/readyz")[0] == 200, 60, 0.5, "the consumer ready again once Redis is back")
            wait_for(lambda: not firing(prom, "AfcIdempotencyStoreUnavailable"), 60, 1, "the store alert resolved")

            # the member goes away
            assert not firing(prom, "AfcConsumerMemberDown")
            assert c.stop() == 0, c.log_tail()
            t0 = time.monotonic()
            (a,) = wait_for(lambda: firing(prom, "AfcConsumerMemberDown"), 30, 1, "AfcConsumerMemberDown firing")
            print(f"AfcConsumerMemberDown firing {time.monotonic() - t0:.1f}s after the member stopped")
            assert {k: a["labels"][k] for k in ("namespace", "adaptiveconsumer", "pod", "severity")} == {
                "namespace": namespace, "adaptiveconsumer": "orders", "pod": "orders-0", "severity": "critical"}
    finally:
        code = c.stop()
        store.stop()
        assert code == 0, c.log_tail()
