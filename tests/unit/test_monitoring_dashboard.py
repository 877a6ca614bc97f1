"""The Grafana dashboard (manifests/monitoring/dashboards/afc.json) against the structure of
Grafana's dashboard JSON at the schemaVersion it targets (39: Grafana 10.4 / 11.x; Grafana itself
is not installable here), its queries against the metrics afc really exposes, and the kustomize
components building."""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from afc.operator.metrics import OperatorMetrics
from afc.runtime.metrics import ProducerMetrics, RuntimeMetrics
from prometheus_bed import MON, ROOT, alerts, gen

DASHBOARD = MON / "dashboards" / "afc.json"

# From Grafana's dashboard kind (kinds/dashboard/dashboard_kind.cue, schemaVersion 39)
PANEL_TYPES = {"timeseries", "stat", "gauge", "bargauge", "table", "heatmap", "text", "row", "state-timeline"}
VARIABLE_TYPES = {"query", "adhoc", "constant", "datasource", "interval", "textbox", "custom", "system"}
GRID_COLUMNS = 24


def validate(d: dict[str, Any]) -> list[str]:
    """What of Grafana's dashboard structure `d` breaks (an empty list: nothing)."""
    errs: list[str] = []

    def need(obj: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
        if key not in obj:
            errs.append(f"{where}: missing {key}")
        elif not isinstance(obj[key], typ) or (typ is int and isinstance(obj[key], bool)):
            errs.append(f"{where}.{key}: {type(obj[key]).__name__}, want {typ}")
        return obj.get(key)

    need(d, "title", str, "dashboard")
    uid = need(d, "uid", str, "dashboard")
    if isinstance(uid, str) and not (8 <= len(uid) <= 40 and re.fullmatch(r"[A-Za-z0-9_-]+", uid)):
        errs.append(f"dashboard.uid {uid!r}: 8-40 characters of [A-Za-z0-9_-]")
    if need(d, "schemaVersion", int, "dashboard") != gen.SCHEMA_VERSION:
        errs.append("dashboard.schemaVersion is not the targeted one")
    t = need(d, "time", dict, "dashboard") or {}
    need(t, "from", str, "time"), need(t, "to", str, "time")
    if d.get("graphTooltip") not in (0, 1, 2):
        errs.append("dashboard.graphTooltip: 0, 1 or 2")
    for a in (need(d, "annotations", dict, "dashboard") or {}).get("list", []):
        need(a, "name", str, "annotation"), need(a, "datasource", dict, "annotation")
    names = set()
    for v in (need(d, "templating", dict, "dashboard") or {}).get("list", []):
        need(v, "name", str, "variable")
        if v.get("type") not in VARIABLE_TYPES:
            errs.append(f"variable {v.get('name')}: type {v.get('type')!r}")
        names.add(v.get("name"))
    ids: set[int] = set()
    cells: dict[tuple[int, int], int] = {}
    flat = []
    for p in need(d, "panels", list, "dashboard") or []:
        flat.append(p)
        if p.get("type") == "row":
            need(p, "collapsed", bool, f"row {p.get('title')}")
            flat += need(p, "panels", list, f"row {p.get('title')}") or []
    for p in flat:
        where = f"panel {p.get('title')!r}"
        pid = need(p, "id", int, where)
        if pid in ids:
            errs.append(f"{where}: duplicate id {pid}")
        ids.add(pid)
        if p.get("type") not in PANEL_TYPES:
            errs.append(f"{where}: type {p.get('type')!r}")
        g = need(p, "gridPos", dict, where) or {}
        for k in ("h", "w", "x", "y"):
            need(g, k, int, f"{where}.gridPos")
        if g.get("x", 0) + g.get("w", 0) > GRID_COLUMNS or g.get("w", 0) < 1 or g.get("h", 0) < 1:
            errs.append(f"{where}: gridPos outside the 24 columns")
        for x in range(g.get("x", 0), g.get("x", 0) + g.get("w", 0)):
            for y in range(g.get("y", 0), g.get("y", 0) + g.get("h", 0)):
                if (x, y) in cells:
                    errs.append(f"{where}: overlaps panel {cells[(x, y)]}")
                    break
                cells[(x, y)] = pid
        if p.get("type") == "row":
            continue
        ds = need(p, "datasource", dict, where) or {}
        if ds.get("type") != "prometheus" or ds.get("uid") != "${datasource}":
            errs.append(f"{where}: datasource should be the $datasource variable")
        refs = [t.get("refId") for t in need(p, "targets", list, where) or []]
        if len(set(refs)) != len(refs) or None in refs:
            errs.append(f"{where}: refIds missing or not unique")
        for t in p.get("targets", []):
            need(t, "expr", str, f"{where} target")
            for var in re.findall(r"\$\{?(\w+)", t.get("expr", "")):
                if var not in names and not var.startswith("__"):
                    errs.append(f"{where}: unknown variable ${var}")
        need(p.get("fieldConfig", {}), "defaults", dict, f"{where}.fieldConfig")
    return errs


def test_dashboard_is_valid_for_the_targeted_schema_version() -> None:
    d = json.loads(DASHBOARD.read_text())
    assert d["schemaVersion"] == 39
    assert validate(d) == []


def test_validator_catches_broken_dashboards() -> None:
    d = json.loads(DASHBOARD.read_text())
    d["panels"][1]["gridPos"]["x"] = 20                    # runs past 24 columns and overlaps
    d["panels"][2]["id"] = d["panels"][3]["id"]
    d["panels"][3]["targets"][0]["expr"] += ' * on() $nope'
    del d["uid"]
    errs = validate(d)
    assert any("outside the 24 columns" in e for e in errs)
    assert any("duplicate id" in e for e in errs)
    assert any("unknown variable $nope" in e for e in errs)
    assert any("missing uid" in e for e in errs)


def test_rows_and_templating() -> None:
    d = json.loads(DASHBOARD.read_text())
    rows = [p["title"] for p in d["panels"] if p["type"] == "row"]
    assert rows == ["Consumer health", "Flow control", "Idempotency", "DLQ", "Operator"]
    assert [v["name"] for v in d["templating"]["list"]] == ["datasource", "namespace", "adaptiveconsumer"]
    titles = {p["title"] for p in d["panels"]}
    for want in ("Lag by topic (messages)", "Lag (seconds, operator estimate)", "Processing latency p99",
                 "Handler error rate", "In-flight limit and in flight", "Paused and assigned partitions",
                 "Backpressure level", "Producer throttle ratio", "Duplicates skipped", "Store errors and lost claims",
                 "Routed per hour by class", "Poison records (last hour)", "Desired vs actual replicas",
                 "Scaling decisions by reason"):
        assert want in titles
    for title, expr in gen.queries(d):
        if "afc_producer_" in expr:
            continue                                    # producers are not an AdaptiveConsumer's
        assert '$namespace' in expr and '$adaptiveconsumer' in expr, f"{title}: not filtered: {expr}"


def exposed_names() -> set[str]:
    """Every sample name afc's registries can expose (counters as _total, histograms' series)."""
    out = {"up"}
    for m in (RuntimeMetrics(), ProducerMetrics(), OperatorMetrics()):
        for fam in m.registry.collect():
            if fam.type == "counter":
                out.add(fam.name + "_total")
            elif fam.type == "histogram":
                out |= {fam.name + s for s in ("_bucket", "_sum", "_count")}
            else:
                out.add(fam.name)
    return out


def metric_names(expr: str) -> set[str]:
    expr = re.sub(r'"[^"]*"', '""', expr)
    return {n for n in re.findall(r"\b([a-z_][a-z0-9_]*)\s*(?:\{|\[|\)|,|$| )", expr)
            if n.startswith("afc_") or n == "up"}


def test_every_queried_metric_exists() -> None:
    names = exposed_names()
    assert metric_names('sum by (le) (rate(afc_nope_seconds_bucket{a="b"}[5m])) / afc_x') == {
        "afc_nope_seconds_bucket", "afc_x"}
    d = json.loads(DASHBOARD.read_text())
    for title, expr in gen.queries(d) + [(v["name"], v["definition"]) for v in d["templating"]["list"][1:]]:
        found = metric_names(expr)
        assert found, f"{title}: no metric found in {expr}"
        assert found <= names, f"{title}: {found - names} not exposed by afc"
    for a in alerts(gen.groups()):
        found = metric_names(a["expr"])
        assert found and found <= names, f"{a['alert']}: {found - names} not exposed by afc"


def kubectl() -> str:
    exe = os.environ.get("AFC_KUBECTL") or shutil.which("kubectl") or next(
        iter(sorted(glob.glob(os.path.expanduser("~/.cache/afc/k8s/*/bin/kubectl")))), None)
    assert exe, "kubectl missing: run scripts/install-deps.sh (it builds kubectl with the test bed)"
    return exe


def build(tmp_path: Path, **extra: Any) -> dict[tuple[str, str], dict[str, Any]]:
    overlay = tmp_path / "overlay"
    overlay.mkdir(exist_ok=True)
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": "monitoring",
        "resources": [os.path.relpath(ROOT / "manifests", overlay)],
        "components": [os.path.relpath(MON, overlay)], **extra}))
    r = subprocess.run([kubectl(), "kustomize", str(overlay), "--load-restrictor", "LoadRestrictionsNone"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(r.stdout)}


def test_kustomize_components_build(tmp_path: Path) -> None:
    objs = build(tmp_path)
    rule = objs[("PrometheusRule", "afc-alerts")]
    assert rule["spec"]["groups"] == yaml.safe_load((MON / "rules" / "afc-alerts.rules.yaml").read_text())["groups"]
    cm = objs[("ConfigMap", "afc-dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["afc.json"]) == json.loads(DASHBOARD.read_text())
    consumers, op = objs[("PodMonitor", "afc-consumers")], objs[("PodMonitor", "afc-operator")]
    assert consumers["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "afc-consumer"}
    assert {r["targetLabel"] for r in consumers["spec"]["podMetricsEndpoints"][0]["relabelings"]} == {
        "adaptiveconsumer", "namespace", "pod"}
    assert op["spec"]["podMetricsEndpoints"][0]["honorLabels"] is True
    assert objs[("Deployment", "afc-operator")]  # the install itself still builds alongside


def test_scrape_targets_match_what_the_operator_renders() -> None:
    """The PodMonitor's port and labels, the scrape configs' annotations: as render.py and the
    manager's Deployment put them on the pods."""
    from afc.operator import render
    sample = yaml.safe_load((ROOT / "manifests" / "samples" / "afc_v1alpha1_adaptiveconsumer.yaml").read_text())
    owner = render.Owner(namespace="shop", name="orders", uid="u-1")
    sts = next(o for o in render.desired_objects(owner, render.parse_spec(sample["spec"])) if o["kind"] == "StatefulSet")
    tmpl = sts["spec"]["template"]
    assert tmpl["metadata"]["labels"]["app.kubernetes.io/name"] == "afc-consumer"
    assert tmpl["metadata"]["labels"]["app.kubernetes.io/instance"] == "orders"
    ann = tmpl["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/path"] == "/metrics"
    ports = [p for c in tmpl["spec"]["containers"] for p in c.get("ports", [])]
    assert {"name": "http", "containerPort": int(ann["prometheus.io/port"]), "protocol": "TCP"} in ports
    dep = yaml.safe_load((ROOT / "manifests" / "manager" / "deployment.yaml").read_text())
    op_ports = {p["name"] for p in dep["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert "metrics" in op_ports and dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"


def test_the_documented_kustomize_patch_overrides_a_threshold(tmp_path: Path) -> None:
    doc = (ROOT / "docs" / "observability.md").read_text()
    patch = yaml.safe_load(re.search(r"```yaml\n(patches:\n.*?)```", doc, re.S).group(1))["patches"]
    rule = build(tmp_path, patches=patch)[("PrometheusRule", "afc-alerts")]
    lag = rule["spec"]["groups"][0]["rules"][0]
    assert lag["alert"] == "AfcConsumerLagHigh" and lag["expr"].endswith("> 200000")
    assert lag["expr"].replace("200000", "50000") == gen.groups()[0]["rules"][0]["expr"]
