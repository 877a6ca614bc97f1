"""Prometheus metrics of one runtime (its own registry, so tests can run several).

Per-message histograms use `FastHistogram`: plain bucket counting on the loop thread,
exported by a collector, because prometheus_client's locked `observe()` per message costs
more than a no-op handler does.
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right
from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class FastHistogram(Collector):
    def __init__(self, name: str, doc: str, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.name, self.doc, self.bounds = name, doc, bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.counts[bisect_left(self.bounds, v)] += 1
        self.sum += v
        self.count += 1

    def observe_many(self, values: list[float]) -> None:
        """A batch of observations: sorted once (in C), then each bound's cumulative count is
        one binary search, so the Python steps are per bucket, not per value (a bisect and a
        count per value cost ~3 % of the loop's time at full speed)."""
        n = len(values)
        if not n:
            return
        s = sorted(values)
        counts, below = self.counts, 0
        for i, b in enumerate(self.bounds):
            at_or_below = bisect_right(s, b)
            counts[i] += at_or_below - below
            below = at_or_below
            if below == n:
                break
        counts[-1] += n - below
        self.sum += sum(s)
        self.count += n

    def quantile(self, q: float) -> float:
        """Upper bound of the bucket holding quantile q (for logs and status, not for SLOs)."""
        if not self.count:
            return 0.0
        target, acc = q * self.count, 0
        for i, c in enumerate(self.counts):
            acc += c
            if acc >= target:
                return self.bounds[i] if i < len(self.bounds) else float("inf")
        return float("inf")

    def collect(self) -> Iterator[HistogramMetricFamily]:
        acc, buckets = 0, []
        for bound, c in zip((*self.bounds, float("inf")), self.counts):
            acc += c
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), acc))
        fam = HistogramMetricFamily(self.name, self.doc)
        fam.add_metric([], buckets, self.sum)
        yield fam


class RuntimeMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.consumed = Counter("afc_messages_consumed", "Messages fetched from Kafka.", registry=r)
        self.handled = Counter("afc_messages_handled", "Messages whose handler returned.", registry=r)
        self.skipped = Counter("afc_messages_skipped_duplicate",
                               "Messages skipped because their idempotency key was done.", registry=r)
        self.errors = Counter("afc_handler_errors", "Handler failures by exception class.",
                              ["error_class"], registry=r)
        self.handler_latency = FastHistogram("afc_handler_latency_seconds", "Time spent in the handler.")
        self.e2e_latency = FastHistogram("afc_end_to_end_latency_seconds",
                                         "Record timestamp to handler start.")
        r.register(self.handler_latency)
        r.register(self.e2e_latency)
        self.batch_size = Gauge("afc_fetch_batch_size", "Most messages the next fetch may take.", registry=r)
        self.inflight_limit = Gauge("afc_inflight_limit", "Adaptive bound on unfinished messages.", registry=r)
        self.inflight = Gauge("afc_inflight_messages", "Messages fetched but not finished.", registry=r)
        self.concurrency_limit = Gauge("afc_handler_concurrency_limit", "Handler calls allowed at once (adaptive, "
                                       "within flow.workers).", registry=r)
        self.concurrency_running = Gauge("afc_handler_concurrency", "Workers running a handler call, sampled "
                                         "once per flow window.", registry=r)
        self.noload_latency = Gauge("afc_handler_noload_latency_seconds", "The concurrency controller's no-load "
                                    "handler latency (lowest recent window mean).", registry=r)
        self.paused = Gauge("afc_paused_partitions", "Partitions paused by flow control.", registry=r)
        self.assigned = Gauge("afc_assigned_partitions", "Partitions assigned to this member.", registry=r)
        self.lag = Gauge("afc_partition_lag", "High watermark minus committed offset, as this consumer sees it.",
                         ["topic", "partition"], registry=r)
        self.commit_latency = Histogram("afc_commit_latency_seconds", "Offset commit round trip.",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.commit_errors = Counter("afc_commit_errors", "Failed offset commits.", registry=r)
        self.claim_latency = Histogram("afc_idempotency_claim_latency_seconds", "Round trip of one idempotency "
                                       "store call carrying claims (one per fetched batch).",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.rebalances = Counter("afc_rebalances", "Partition assignment changes.", ["kind"], registry=r)
        self.store_errors = Counter("afc_idempotency_store_errors", "Idempotency store calls that failed.",
                                    registry=r)
        self.routed = Counter("afc_routed_records", "Failed records routed, by route and classification.",
                              ["route", "classification"], registry=r)
        self.route_attempts = Histogram("afc_route_attempts", "Failed handler runs of a record when routed.",
                                        buckets=(1, 2, 3, 4, 5, 7, 10, 15, 20, 50), registry=r)
        self.poison = Counter("afc_poison_records", "Records routed to the poison topic.", registry=r)
        self.route_errors = Counter("afc_route_errors", "Failed produces while routing (retried).", ["route"],
                                    registry=r)
        self.route_skipped = Counter("afc_route_skipped",
                                     "Records already routed by an earlier run (crash before commit).", registry=r)
        self.handler_timeouts = Counter("afc_handler_timeouts", "Handler runs failed for running past "
                                        "handler.timeoutS.", registry=r)
        self.abandoned_threads = Gauge("afc_abandoned_handler_threads", "Handler threads abandoned after a "
                                       "timeout and still running.", registry=r)
        self.parked = Gauge("afc_parked_messages", "Messages waiting for an idempotency key held elsewhere.",
                            registry=r)
        self.claims_lost = Counter("afc_idempotency_claims_lost", "Claims taken over by another worker after "
                                   "their lease ran out.", registry=r)
        self.fenced_retries = Counter("afc_fenced_retries", "Handler runs repeated because their fenced "
                                      "transaction was refused while the claim was still held.", registry=r)
        self.store_evicting = Gauge("afc_idempotency_store_evicting", "1 if the store's maxmemory-policy may "
                                    "evict done marks.", registry=r)
        self.controller_decisions = Counter("afc_fetch_controller_decisions", "Fetch controller decisions.",
                                            ["reason"], registry=r)
        # The backpressure signal (backpressure.py): this member's level and what it sees of the group.
        self.bp_level = Gauge("afc_backpressure_level", "This member's saturation level (0 ok, 1 saturated).",
                              registry=r)
        self.bp_pressure = Gauge("afc_backpressure_pressure",
                                 "Raw pressure behind the level (1.0 = at the limit).", registry=r)
        self.bp_group_level = Gauge("afc_backpressure_group_level",
                                    "Fraction of the group's live members that are saturated.", registry=r)
        self.bp_group_members = Gauge("afc_backpressure_group_members", "Live members publishing a level.",
                                      registry=r)
        self.bp_signal_up = Gauge("afc_backpressure_signal_up", "1 if the last publish to Redis worked.",
                                  registry=r)
        self.bp_publishes = Counter("afc_backpressure_publishes", "Levels written to Redis.", registry=r)
        self.bp_publish_errors = Counter("afc_backpressure_publish_errors", "Failed publishes of the level.",
                                         registry=r)


class ProducerMetrics:
    """The adaptive producer's metrics, in its own registry (expose it with
    `prometheus_client.start_http_server(port, registry=producer.metrics.registry)`)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.sent = Counter("afc_producer_sent", "Messages handed to librdkafka.", registry=r)
        self.delivered = Counter("afc_producer_delivered", "Messages acknowledged by the broker.", registry=r)
        self.delivery_errors = Counter("afc_producer_delivery_errors", "Messages the broker did not take.",
                                       registry=r)
        self.waited = Counter("afc_producer_throttled_sends", "Sends that waited for the rate limit.", registry=r)
        self.wait_seconds = Counter("afc_producer_throttle_wait_seconds", "Time sends spent waiting.", registry=r)
        self.throttled = Counter("afc_producer_throttled_errors", "Sends refused with ProducerThrottled.",
                                 registry=r)
        self.too_large = Counter("afc_producer_rejected_too_large", "Sends refused with MessageTooLarge.",
                                 registry=r)
        self.allowed_rate = Gauge("afc_producer_allowed_rate", "Current allowed send rate, messages/s.",
                                  registry=r)
        self.throttle_ratio = Gauge("afc_producer_throttle_ratio",
                                    "1 - allowed rate / max rate: how far the signal has cut the rate.", registry=r)
        self.group_level = Gauge("afc_producer_group_level", "Last read level of each watched group.",
                                 ["group"], registry=r)
        self.signal_age = Gauge("afc_producer_signal_age_seconds", "Seconds since the signal was last read.",
                                registry=r)
        self.signal_up = Gauge("afc_producer_signal_up", "1 if Redis answered the last read.", registry=r)
        self.signal_errors = Counter("afc_producer_signal_errors", "Failed reads of the signal.", registry=r)
