"""afc's alert rules and Grafana dashboard, from one source.

    python3 manifests/monitoring/generate.py                       # rewrite the checked-in files
    python3 manifests/monitoring/generate.py --set lag_messages=100000 --set lag_for=5m --out DIR

Writes, below --out (default: this folder):
- rules/afc-alerts.rules.yaml            a Prometheus rules file (`rule_files:`)
- prometheus-rule/prometheusrule.yaml    the same groups as a PrometheusRule (Prometheus Operator)
- dashboards/afc.json                    the Grafana dashboard (schemaVersion 39)

Both rule files come from `groups()` below, so they cannot drift (tests/unit/test_monitoring_rules.py
also checks that the checked-in files equal a fresh run). Thresholds, windows and `for:` durations
are the parameters in `DEFAULTS`; `--set name=value` overrides one (docs/observability.md lists them).
Needs only Python 3.11 and PyYAML.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
SCHEMA_VERSION = 39   # Grafana 10.4 / 11.x dashboard JSON

# Every threshold, window and `for:` of the alerts. Durations are Prometheus durations.
DEFAULTS: dict[str, Any] = {
    "lag_messages": 50000, "lag_for": "2m",                       # page (AFC-IR)
    "error_ratio": 0.01, "error_window": "5m", "error_for": "2m",  # page (AFC-IR)
    "poison_records": 10, "poison_window": "1h", "poison_for": "0m",  # notify (AFC-IR)
    "drain_target_seconds": 300, "drain_for": "5m",
    "member_down_for": "2m", "replicas_unavailable_for": "5m", "partitions_lost_window": "10m",
    "backpressure_for": "10m",
    "dlq_records": 100, "dlq_window": "1h",
    "rebalances": 6, "rebalance_window": "1h",
    "handler_timeouts": 0, "handler_timeout_window": "10m",
    "store_error_window": "2m", "store_for": "1m", "store_evicting_for": "5m",
    "operator_errors": 3, "operator_error_window": "10m",
    "runbook_base": "https://github.com/afc-dev/afc/blob/main/docs/runbook.md",
}

PAGE, NOTIFY = "critical", "warning"   # severity label: critical pages, warning notifies
WHERE = "{{ $labels.namespace }}/{{ $labels.adaptiveconsumer }}"          # consumer metrics (scrape labels)
WHERE_OP = "{{ $labels.namespace }}/{{ $labels.name }}"                   # operator metrics (its own labels)
BY = "namespace, adaptiveconsumer"


def anchor(alert: str) -> str:
    """GitHub's anchor for a `## <alert>` heading of docs/runbook.md."""
    return alert.lower()


def _alert(p: dict[str, Any], name: str, expr: str, for_: str, severity: str, summary: str,
           description: str) -> dict[str, Any]:
    rule: dict[str, Any] = {"alert": name, "expr": expr}
    if for_ not in ("0", "0s", "0m"):
        rule["for"] = for_
    rule["labels"] = {"severity": severity, "component": "afc"}
    rule["annotations"] = {"summary": summary, "description": description,
                           "runbook_url": f"{p['runbook_base']}#{anchor(name)}"}
    return rule


def groups(overrides: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    p = {**DEFAULTS, **(overrides or {})}
    unknown = set(overrides or {}) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown parameter(s): {', '.join(sorted(unknown))}")
    errors, runs = (f"sum by ({BY}) (rate(afc_handler_errors_total[{p['error_window']}]))",
                    f"sum by ({BY}) (rate(afc_messages_handled_total[{p['error_window']}]))")
    consumer = [
        _alert(p, "AfcConsumerLagHigh",
               f"sum by ({BY}, topic) (max by ({BY}, topic, partition) (afc_partition_lag)) > {p['lag_messages']}",
               p["lag_for"], PAGE, f"Consumer lag above {p['lag_messages']} messages",
               f"AdaptiveConsumer {WHERE} is {{{{ $value | humanize }}}} messages behind on topic "
               f"{{{{ $labels.topic }}}} (threshold {p['lag_messages']}, for {p['lag_for']})."),
        _alert(p, "AfcConsumerErrorRateHigh",
               f"{errors} / ({runs} + {errors}) > {p['error_ratio']}",
               p["error_for"], PAGE, f"Handler error rate above {float(p['error_ratio']):.2%}",
               f"{{{{ $value | humanizePercentage }}}} of handler runs of AdaptiveConsumer {WHERE} failed over the "
               f"last {p['error_window']} (threshold {float(p['error_ratio']):.2%}). Errors by class: "
               f"afc_handler_errors_total."),
        _alert(p, "AfcPoisonRecords",
               f"sum by ({BY}) (increase(afc_poison_records_total[{p['poison_window']}])) > {p['poison_records']}",
               p["poison_for"], NOTIFY, f"More than {p['poison_records']} poison records in {p['poison_window']}",
               f"AdaptiveConsumer {WHERE} routed {{{{ $value | humanize }}}} records to <topic>.poison in the "
               f"last {p['poison_window']} (threshold {p['poison_records']})."),
        _alert(p, "AfcConsumerMemberDown", "up{adaptiveconsumer!=\"\"} == 0",
               p["member_down_for"], PAGE, "A consumer member is down or fenced",
               f"Pod {{{{ $labels.pod }}}} of AdaptiveConsumer {WHERE} ({{{{ $labels.instance }}}}) has not "
               f"answered a scrape for {p['member_down_for']}: crashed, exited 3 after being fenced by "
               f"another member with the same group.instance.id, or unreachable."),
        _alert(p, "AfcConsumerPartitionsLost",
               f"sum by ({BY}, pod) (increase(afc_rebalances_total{{kind=\"lost\"}}[{p['partitions_lost_window']}]))"
               f" > 0", "0m", NOTIFY, "A consumer member lost its partitions",
               f"Pod {{{{ $labels.pod }}}} of AdaptiveConsumer {WHERE} lost its assignment "
               f"{{{{ $value | humanize }}}} times in {p['partitions_lost_window']} (session timeout, fencing "
               f"or a stalled poll loop)."),
        _alert(p, "AfcBackpressureEngaged", f"max by ({BY}) (afc_backpressure_level) > 0",
               p["backpressure_for"], NOTIFY, f"Backpressure engaged for more than {p['backpressure_for']}",
               f"At least one member of AdaptiveConsumer {WHERE} has reported itself saturated for "
               f"{p['backpressure_for']}: the downstream is slower than the input, producers are told to slow "
               f"down and the autoscaler will not scale up."),
        _alert(p, "AfcDeadLetterGrowth",
               f"sum by ({BY}, classification) (increase(afc_routed_records_total{{route=\"dlq\"}}"
               f"[{p['dlq_window']}])) > {p['dlq_records']}",
               "0m", NOTIFY, f"More than {p['dlq_records']} dead letters in {p['dlq_window']}",
               f"AdaptiveConsumer {WHERE} dead-lettered {{{{ $value | humanize }}}} records classified "
               f"{{{{ $labels.classification }}}} in the last {p['dlq_window']} (threshold {p['dlq_records']})."),
        _alert(p, "AfcRebalancesFrequent",
               f"max by ({BY}) (increase(afc_rebalances_total{{kind=\"assign\"}}[{p['rebalance_window']}])) "
               f"> {p['rebalances']}",
               "0m", NOTIFY, f"More than {p['rebalances']} rebalances in {p['rebalance_window']}",
               f"A member of AdaptiveConsumer {WHERE} was assigned partitions {{{{ $value | humanize }}}} times in "
               f"the last {p['rebalance_window']} (threshold {p['rebalances']})."),
        _alert(p, "AfcHandlerTimeouts",
               f"sum by ({BY}) (increase(afc_handler_timeouts_total[{p['handler_timeout_window']}])) "
               f"> {p['handler_timeouts']}",
               "0m", NOTIFY, "Handler runs past handler.timeoutS",
               f"{{{{ $value | humanize }}}} handler runs of AdaptiveConsumer {WHERE} ran past handler.timeoutS in "
               f"the last {p['handler_timeout_window']}; their records were failed as HandlerTimeout and routed."),
        _alert(p, "AfcIdempotencyStoreUnavailable",
               f"sum by ({BY}) (rate(afc_idempotency_store_errors_total[{p['store_error_window']}])) > 0",
               p["store_for"], PAGE, "Idempotency store (Redis) unavailable",
               f"Calls of AdaptiveConsumer {WHERE} to its idempotency store keep failing "
               f"({{{{ printf \"%.2f\" $value }}}} per second): its partitions are paused and /readyz answers 503 until Redis "
               f"answers again."),
        _alert(p, "AfcIdempotencyStoreEvicting", f"max by ({BY}) (afc_idempotency_store_evicting) == 1",
               p["store_evicting_for"], NOTIFY, "Idempotency store may evict done marks",
               f"The Redis of AdaptiveConsumer {WHERE} runs a maxmemory-policy that may evict done marks: an "
               f"evicted mark lets a duplicate through. Set maxmemory-policy noeviction."),
    ]
    operator = [
        _alert(p, "AfcLagSecondsAboveDrainTarget", f"afc_operator_lag_seconds > {p['drain_target_seconds']}",
               p["drain_for"], NOTIFY, f"Lag older than the {p['drain_target_seconds']} s drain target",
               f"The oldest unconsumed message of AdaptiveConsumer {WHERE_OP} is about {{{{ $value | humanize }}}} s "
               f"old (target {p['drain_target_seconds']} s, for {p['drain_for']})."),
        _alert(p, "AfcConsumerReplicasUnavailable",
               "afc_operator_ready_replicas < afc_operator_desired_replicas",
               p["replicas_unavailable_for"], NOTIFY, "Fewer ready consumers than desired",
               f"AdaptiveConsumer {WHERE_OP} has {{{{ $value }}}} ready replicas, fewer than the operator wants, "
               f"for {p['replicas_unavailable_for']}."),
        _alert(p, "AfcOperatorReconcileErrors",
               f"sum by (namespace, name, kind) (increase(afc_operator_poll_errors_total"
               f"[{p['operator_error_window']}])) > {p['operator_errors']}",
               "0m", NOTIFY, "The operator keeps failing to measure or reconcile",
               f"The operator failed {{{{ $value | humanize }}}} polls of AdaptiveConsumer {WHERE_OP} in "
               f"{p['operator_error_window']} (kind {{{{ $labels.kind }}}}: kafka, lag, backpressure, api or "
               f"internal)."),
    ]
    return [{"name": "afc-consumer", "rules": consumer}, {"name": "afc-operator", "rules": operator}]


def prometheus_rule(gs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": {"name": "afc-alerts", "labels": {"app.kubernetes.io/part-of": "afc",
                                                          "app.kubernetes.io/component": "monitoring"}},
            "spec": {"groups": gs}}


# ---------------------------------------------------------------------------------- dashboard

C = '{namespace=~"$namespace", adaptiveconsumer=~"$adaptiveconsumer"}'   # consumer series
O = '{namespace=~"$namespace", name=~"$adaptiveconsumer"}'               # operator series
RI = "$__rate_interval"


def _p(title: str, targets: list[tuple[str, str]], unit: str = "short", desc: str = "",
       kind: str = "timeseries") -> dict[str, Any]:
    return {"type": kind, "title": title, "description": desc,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "none"}},
            "targets": [{"refId": chr(65 + i), "expr": e, "legendFormat": lf,
                         "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                        for i, (e, lf) in enumerate(targets)]}


def rows() -> list[tuple[str, list[dict[str, Any]]]]:
    errors = f"sum by (adaptiveconsumer) (rate(afc_handler_errors_total{C}[{RI}]))"
    runs = f"sum by (adaptiveconsumer) (rate(afc_messages_handled_total{C}[{RI}]))"
    return [
        ("Consumer health", [
            _p("Lag by topic (messages)", [
                (f"sum by (adaptiveconsumer, topic) (max by (adaptiveconsumer, topic, partition) "
                 f"(afc_partition_lag{C}))", "{{adaptiveconsumer}} {{topic}}")],
               desc="High watermark minus committed offset, per partition as the members see it, summed per topic."),
            _p("Lag (seconds, operator estimate)", [(f"afc_operator_lag_seconds{O}", "{{name}}")], "s",
               "Age of the oldest unconsumed message, as the operator estimates it."),
            _p("Processing latency p99", [
                (f"histogram_quantile(0.99, sum by (adaptiveconsumer, le) "
                 f"(rate(afc_handler_latency_seconds_bucket{C}[{RI}])))", "handler {{adaptiveconsumer}}"),
                (f"histogram_quantile(0.99, sum by (adaptiveconsumer, le) "
                 f"(rate(afc_end_to_end_latency_seconds_bucket{C}[{RI}])))", "record to handler {{adaptiveconsumer}}")],
               "s"),
            _p("Handler error rate", [(f"{errors} / ({runs} + {errors})", "{{adaptiveconsumer}}")], "percentunit",
               "Failed handler runs / all handler runs (the error-rate alert's ratio)."),
            _p("Throughput", [
                (f"sum by (adaptiveconsumer) (rate(afc_messages_consumed_total{C}[{RI}]))", "consumed"),
                (f"sum by (adaptiveconsumer) (rate(afc_messages_handled_total{C}[{RI}]))", "handled")], "ops"),
            _p("Errors by class", [(f"sum by (error_class) (rate(afc_handler_errors_total{C}[{RI}]))",
                                    "{{error_class}}")], "ops"),
        ]),
        ("Flow control", [
            _p("In-flight limit and in flight", [
                (f"sum by (pod) (afc_inflight_limit{C})", "limit {{pod}}"),
                (f"sum by (pod) (afc_inflight_messages{C})", "in flight {{pod}}")]),
            _p("Paused and assigned partitions", [
                (f"sum by (adaptiveconsumer) (afc_paused_partitions{C})", "paused"),
                (f"sum by (adaptiveconsumer) (afc_assigned_partitions{C})", "assigned")]),
            _p("Backpressure level", [
                (f"max by (adaptiveconsumer) (afc_backpressure_group_level{C})", "group (share saturated)"),
                (f"max by (adaptiveconsumer) (afc_backpressure_pressure{C})", "highest member pressure")],
               "percentunit"),
            _p("Producer throttle ratio", [("max by (namespace, pod, instance) (afc_producer_throttle_ratio)",
                                            "{{namespace}} {{pod}} {{instance}}")], "percentunit",
               "1 - allowed rate / max rate of every AdaptiveProducer scraped (producers are not filtered by "
               "AdaptiveConsumer)."),
            _p("Fetch controller decisions", [
                (f"sum by (reason) (rate(afc_fetch_controller_decisions_total{C}[{RI}]))", "{{reason}}")], "ops"),
        ]),
        ("Idempotency", [
            _p("Duplicates skipped", [
                (f"sum by (adaptiveconsumer) (rate(afc_messages_skipped_duplicate_total{C}[{RI}]))",
                 "{{adaptiveconsumer}}")], "ops"),
            _p("Store errors and lost claims", [
                (f"sum by (adaptiveconsumer) (rate(afc_idempotency_store_errors_total{C}[{RI}]))", "store errors"),
                (f"sum by (adaptiveconsumer) (rate(afc_idempotency_claims_lost_total{C}[{RI}]))", "claims lost")],
               "ops"),
            _p("Parked messages (key held elsewhere)", [(f"sum by (pod) (afc_parked_messages{C})", "{{pod}}")]),
            _p("Claim latency p99 (one store call per fetched batch)", [
                (f"histogram_quantile(0.99, sum by (adaptiveconsumer, le) "
                 f"(rate(afc_idempotency_claim_latency_seconds_bucket{C}[{RI}])))", "{{adaptiveconsumer}}")], "s"),
            _p("Commit latency p99", [
                (f"histogram_quantile(0.99, sum by (adaptiveconsumer, le) "
                 f"(rate(afc_commit_latency_seconds_bucket{C}[{RI}])))", "{{adaptiveconsumer}}")], "s"),
        ]),
        ("DLQ", [
            _p("Routed per hour by class", [
                (f"sum by (route, classification) (increase(afc_routed_records_total{C}[1h]))",
                 "{{route}} {{classification}}")]),
            _p("Poison records (last hour)", [
                (f"sum by (adaptiveconsumer) (increase(afc_poison_records_total{C}[1h]))", "{{adaptiveconsumer}}")]),
            _p("Routing produce errors", [
                (f"sum by (adaptiveconsumer) (rate(afc_route_errors_total{C}[{RI}])) or on() vector(0)",
                 "{{adaptiveconsumer}}")], "ops",
               "Failed produces to retry/DLQ/poison topics (retried); 0 while none failed."),
        ]),
        ("Operator", [
            _p("Desired vs actual replicas", [
                (f"afc_operator_desired_replicas{O}", "desired {{name}}"),
                (f"afc_operator_replicas{O}", "actual {{name}}"),
                (f"afc_operator_ready_replicas{O}", "ready {{name}}")]),
            _p("Scaling decisions by reason", [
                (f"sum by (reason) (increase(afc_operator_scaling_decisions_total{O}[1h]))", "{{reason}}")]),
            _p("Group lag (operator)", [(f"afc_operator_lag_messages{O}", "{{name}}")]),
            _p("Poll errors and duration", [
                (f"sum by (kind) (increase(afc_operator_poll_errors_total{O}[1h])) or on() vector(0)", "errors {{kind}}"),
                (f"histogram_quantile(0.99, sum by (le) (rate(afc_operator_poll_duration_seconds_bucket{O}[{RI}])))",
                 "poll p99")]),
        ]),
    ]


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    y, pid = 0, 1
    for title, row_panels in rows():
        panels.append({"type": "row", "title": title, "collapsed": False, "id": pid, "panels": [],
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        pid, y = pid + 1, y + 1
        for i, panel in enumerate(row_panels):
            panel["id"] = pid
            panel["gridPos"] = {"h": 8, "w": 8, "x": 8 * (i % 3), "y": y + 8 * (i // 3)}
            panels.append(panel)
            pid += 1
        y += 8 * ((len(row_panels) + 2) // 3)

    def var(name: str, label: str, query: str) -> dict[str, Any]:
        return {"name": name, "label": label, "type": "query",
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "query": {"query": query, "refId": f"{name}-var"}, "definition": query,
                "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*", "sort": 1,
                "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "options": [], "hide": 0}
    return {
        "title": "afc: AdaptiveConsumers", "uid": "afc-adaptiveconsumers", "schemaVersion": SCHEMA_VERSION,
        "version": 1, "editable": True, "graphTooltip": 1, "tags": ["afc", "kafka"], "timezone": "browser",
        "time": {"from": "now-3h", "to": "now"}, "refresh": "30s", "fiscalYearStartMonth": 0, "liveNow": False,
        "description": "afc consumer health, flow control, idempotency, DLQ and operator (generated by "
                       "manifests/monitoring/generate.py; edit that, not this file).",
        "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                  "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                  "name": "Annotations & Alerts", "type": "dashboard"}]},
        "links": [],
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "options": [], "refresh": 1, "regex": ""},
            var("namespace", "Namespace", "label_values(afc_messages_consumed_total, namespace)"),
            var("adaptiveconsumer", "AdaptiveConsumer",
                'label_values(afc_messages_consumed_total{namespace=~"$namespace"}, adaptiveconsumer)'),
        ]},
        "panels": panels,
    }


def queries(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of the dashboard, rows' nested panels included."""
    out = []
    for panel in dash["panels"]:
        for p in [panel, *panel.get("panels", [])]:
            out += [(p["title"], t["expr"]) for t in p.get("targets", [])]
    return out


# ---------------------------------------------------------------------------------- files

def render(overrides: dict[str, Any] | None = None) -> dict[str, str]:
    """{relative path: content} of every generated file."""
    gs = groups(overrides)
    head = "# Generated by manifests/monitoring/generate.py; edit that, not this file.\n"
    dump = lambda obj: head + yaml.safe_dump(obj, sort_keys=False, width=120, allow_unicode=True)  # noqa: E731
    return {"rules/afc-alerts.rules.yaml": dump({"groups": gs}),
            "prometheus-rule/prometheusrule.yaml": dump(prometheus_rule(gs)),
            "dashboards/afc.json": json.dumps(dashboard(), indent=2) + "\n"}


def _value(v: str) -> Any:
    if re.fullmatch(r"-?\d+", v):
        return int(v)
    if re.fullmatch(r"-?\d*\.\d+", v):
        return float(v)
    return v


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a parameter")
    ap.add_argument("--out", type=Path, default=HERE, help="folder to write into (default: %(default)s)")
    ap.add_argument("--list", action="store_true", help="print the parameters and their defaults")
    a = ap.parse_args(argv)
    if a.list:
        for k, v in DEFAULTS.items():
            print(f"{k}={v}")
        return 0
    overrides = {}
    for s in a.set:
        k, sep, v = s.partition("=")
        if not sep:
            ap.error(f"--set {s}: want NAME=VALUE")
        overrides[k] = _value(v)
    try:
        files = render(overrides)
    except ValueError as e:
        ap.error(str(e))
    for rel, text in files.items():
        path = a.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
