"""The operator's own metrics on `/metrics` (Prometheus text format, prometheus_client).

Per AdaptiveConsumer (labels namespace, name): desired and actual replicas, lag in messages
and in seconds, decisions by reason, poll errors by kind, poll duration, group members
removed on scale-down. Process-wide: Kafka admin clients held (one per cluster).
A deleted AdaptiveConsumer's series are removed.
"""
from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LABELS = ("namespace", "name")


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.desired = Gauge("afc_operator_desired_replicas", "Replicas the operator wants (spec.replicas within "
                             "bounds, after the autoscaler's decision).", LABELS, registry=r)
        self.replicas = Gauge("afc_operator_replicas", "Pods of the StatefulSet.", LABELS, registry=r)
        self.ready = Gauge("afc_operator_ready_replicas", "Ready pods of the StatefulSet.", LABELS, registry=r)
        self.lag = Gauge("afc_operator_lag_messages", "Lag of the group (retention-deleted messages excluded).",
                         LABELS, registry=r)
        self.lag_seconds = Gauge("afc_operator_lag_seconds", "Age of the oldest unconsumed message, estimated.",
                                 LABELS, registry=r)
        self.backpressure = Gauge("afc_operator_backpressure_level", "Share of saturated members (the group's "
                                  "backpressure level).", LABELS, registry=r)
        self.decisions = Counter("afc_operator_scaling_decisions", "Autoscaler decisions by reason.",
                                 (*LABELS, "reason"), registry=r)
        self.poll_errors = Counter("afc_operator_poll_errors", "Polls that could not measure something, by kind "
                                   "(kafka, lag, backpressure, api, internal).", (*LABELS, "kind"), registry=r)
        self.poll_duration = Histogram("afc_operator_poll_duration_seconds", "Duration of one poll (measure, "
                                       "decide, apply, status).", LABELS, registry=r,
                                       buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.members_removed = Counter("afc_operator_members_removed", "Departed static members removed from the "
                                       "group after a scale-down.", LABELS, registry=r)
        self.api_requests = Counter("afc_operator_api_requests", "Requests of the reconciles to the Kubernetes "
                                    "API by verb and resource (kopf's watches, bookkeeping and Events not "
                                    "included).", ("verb", "resource"), registry=r)
        self.kafka_clients = Gauge("afc_operator_kafka_admin_clients", "Kafka admin clients held (one per "
                                   "cluster).", registry=r)

    def api_request(self, verb: str, resource: str) -> None:
        self.api_requests.labels(verb, resource).inc()

    def forget(self, namespace: str, name: str) -> None:
        """Drop every series of a deleted AdaptiveConsumer."""
        for metric in (self.desired, self.replicas, self.ready, self.lag, self.lag_seconds, self.backpressure,
                       self.decisions, self.poll_errors, self.poll_duration, self.members_removed):
            for labels in list(_label_sets(metric)):
                if labels[:2] == (namespace, name):
                    try:
                        metric.remove(*labels)
                    except KeyError:
                        pass

    def serve(self, endpoint: str) -> Any:
        """Serve /metrics on `host:port` (a thread of prometheus_client's)."""
        host, _, port = endpoint.rpartition(":")
        return start_http_server(int(port), addr=host or "0.0.0.0", registry=self.registry)


def _label_sets(metric: Any) -> list[tuple[str, ...]]:
    with metric._lock:  # prometheus_client keeps children by label values; no public listing
        return list(metric._metrics.keys())
