"""docs/reference.md is what the CRD models generate: the reference cannot drift from what
the apiserver enforces."""
from __future__ import annotations

from pathlib import Path

import pytest

from afc.operator import crd, reference

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def test_checked_in_reference_is_what_the_models_generate() -> None:
    assert (ROOT / "docs" / "reference.md").read_text() == reference.render(), \
        "docs/reference.md drifted: run `make crds`"


def test_every_field_and_rule_of_the_crd_is_in_the_reference() -> None:
    text = reference.render()
    root = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for part in ("spec", "status"):
        for path, _, _ in reference._fields(root["properties"][part], part):
            assert f"| `{path}` |" in text
    for _, rule, message in reference._rules(root, ""):
        assert reference._cell(message) in text and reference._cell(rule) in text
