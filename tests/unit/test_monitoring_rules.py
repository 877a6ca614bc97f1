"""The alert rules (manifests/monitoring): generated from one source, valid for promtool, every
alert unit-tested (fires / stays quiet) and documented in docs/runbook.md."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from prometheus_bed import MON, ROOT, alerts, gen, promtool

RULES = MON / "rules" / "afc-alerts.rules.yaml"
PROM_RULE = MON / "prometheus-rule" / "prometheusrule.yaml"
PROMTOOL_TESTS = Path(__file__).resolve().parent / "monitoring" / "alerts.test.yaml"
RUNBOOK = ROOT / "docs" / "runbook.md"


def test_checked_in_files_equal_a_fresh_generation() -> None:
    for rel, text in gen.render().items():
        assert (MON / rel).read_text() == text, f"{rel} drifted: run python3 -P manifests/monitoring/generate.py"


def test_rules_file_and_prometheusrule_carry_the_same_groups() -> None:
    rules = yaml.safe_load(RULES.read_text())
    pr = yaml.safe_load(PROM_RULE.read_text())
    assert pr["apiVersion"] == "monitoring.coreos.com/v1" and pr["kind"] == "PrometheusRule"
    assert pr["spec"]["groups"] == rules["groups"]


def test_promtool_accepts_both_forms(tmp_path: Path) -> None:
    spec_only = tmp_path / "from-prometheusrule.yaml"
    spec_only.write_text(yaml.safe_dump({"groups": yaml.safe_load(PROM_RULE.read_text())["spec"]["groups"]}))
    for f in (RULES, spec_only):
        r = subprocess.run([promtool(), "check", "rules", str(f)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"SUCCESS: {len(alerts(gen.groups()))} rules found" in r.stdout


def test_promtool_unit_tests_pass() -> None:
    r = subprocess.run([promtool(), "test", "rules", str(PROMTOOL_TESTS)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_promtool_unit_tests_can_fail(tmp_path: Path) -> None:
    """The same tests against rules whose thresholds moved must fail (they do test something)."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": gen.groups({"lag_messages": 60000, "poison_records": 100})}))
    doc = yaml.safe_load(PROMTOOL_TESTS.read_text())
    doc["rule_files"] = [str(rules)]
    tests = tmp_path / "alerts.test.yaml"
    tests.write_text(yaml.safe_dump(doc))
    r = subprocess.run([promtool(), "test", "rules", str(tests)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "alertname: AfcConsumerLagHigh" in r.stdout + r.stderr and "alertname: AfcPoisonRecords" in r.stdout + r.stderr


def _located_by(series: str) -> set[str]:
    return set(re.findall(r'(?:adaptiveconsumer|name|pod)="([^"]+)"', series))


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    """Fires: a case expects it. Quiet: a case expects nothing at some time, or the test feeds
    series of another AdaptiveConsumer/pod that no expected alert names."""
    doc = yaml.safe_load(PROMTOOL_TESTS.read_text())
    fires: set[str] = set()
    quiet: set[str] = set()
    for group in doc["tests"]:
        located = set().union(*(_located_by(s["series"]) for s in group["input_series"]))
        for case in group["alert_rule_test"]:
            name = case["alertname"]
            exp = case.get("exp_alerts") or []
            if exp:
                fires.add(name)
                named = {v for a in exp for k, v in a["exp_labels"].items() if k in ("adaptiveconsumer", "name", "pod")}
                if located - named:
                    quiet.add(name)
            else:
                quiet.add(name)
    every = {a["alert"] for a in alerts(gen.groups())}
    assert every - fires == set(), "alerts never seen firing"
    assert every - quiet == set(), "alerts never seen staying quiet"


def test_every_alert_is_documented_and_locates_the_problem() -> None:
    book = RUNBOOK.read_text()
    headings = {h.strip() for h in re.findall(r"^## (.+)$", book, re.M)}
    for a in alerts(gen.groups()):
        name, ann = a["alert"], a["annotations"]
        assert set(ann) == {"summary", "description", "runbook_url"}, name
        assert a["labels"]["severity"] in ("critical", "warning"), name
        assert ann["runbook_url"].endswith(f"docs/runbook.md#{name.lower()}"), name
        assert name in headings, f"docs/runbook.md has no section '## {name}'"
        section = book.split(f"## {name}\n", 1)[1].split("\n## ", 1)[0]
        for part in ("Meaning", "Impact", "Diagnosis", "Mitigation"):
            assert f"**{part}**" in section, f"runbook section {name} lacks {part}"
        assert "{{ $labels.namespace }}" in ann["description"], name
        assert re.search(r"\{\{ \$labels\.(adaptiveconsumer|name) \}\}", ann["description"]), name
    # and no runbook section for an alert that does not exist
    documented = {h for h in headings if h.startswith("Afc")}
    assert documented == {a["alert"] for a in alerts(gen.groups())}


def test_the_article_thresholds_are_the_defaults() -> None:
    by = {a["alert"]: a for a in alerts(gen.groups())}
    lag, err, poison = by["AfcConsumerLagHigh"], by["AfcConsumerErrorRateHigh"], by["AfcPoisonRecords"]
    assert lag["expr"].endswith("> 50000") and lag["for"] == "2m" and lag["labels"]["severity"] == "critical"
    assert err["expr"].endswith("> 0.01") and err["labels"]["severity"] == "critical"
    assert "[1h]" in poison["expr"] and poison["expr"].endswith("> 10") and poison["labels"]["severity"] == "warning"


def test_thresholds_are_overridable(tmp_path: Path) -> None:
    r = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-P", str(MON / "generate.py"), "--out",
                        str(tmp_path), "--set", "lag_messages=100000", "--set", "lag_for=5m",
                        "--set", "poison_window=15m", "--set", "error_ratio=0.05"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    by = {a["alert"]: a for a in alerts(yaml.safe_load((tmp_path / "rules" / "afc-alerts.rules.yaml").read_text())
                                        ["groups"])}
    assert by["AfcConsumerLagHigh"]["expr"].endswith("> 100000") and by["AfcConsumerLagHigh"]["for"] == "5m"
    assert "[15m]" in by["AfcPoisonRecords"]["expr"] and by["AfcConsumerErrorRateHigh"]["expr"].endswith("> 0.05")
    assert "100000" in by["AfcConsumerLagHigh"]["annotations"]["summary"]
    pr = yaml.safe_load((tmp_path / "prometheus-rule" / "prometheusrule.yaml").read_text())
    assert {a["alert"]: a for a in alerts(pr["spec"]["groups"])} == by
    check = subprocess.run([promtool(), "check", "rules", str(tmp_path / "rules" / "afc-alerts.rules.yaml")],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    bad = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-P", str(MON / "generate.py"), "--out",
                          str(tmp_path), "--set", "lag_mesages=1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown parameter" in bad.stderr


def test_a_zero_for_leaves_the_for_out() -> None:
    by = {a["alert"]: a for a in alerts(gen.groups({"lag_for": "0s"}))}
    assert "for" not in by["AfcConsumerLagHigh"]
    with pytest.raises(ValueError, match="unknown parameter"):
        gen.groups({"nope": 1})
