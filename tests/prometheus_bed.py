"""Monitoring test helpers: afc's monitoring generator (manifests/monitoring/generate.py) loaded
as a module, promtool, and `PrometheusBed`: a real `prometheus` (Debian's package) on a free
loopback port with a generated configuration and a temporary data folder, stopped on exit."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from afctest import ROOT, free_port, wait_for

MON = ROOT / "manifests" / "monitoring"


def _load_generator() -> Any:
    spec = importlib.util.spec_from_file_location("afc_monitoring_generate", MON / "generate.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gen = _load_generator()


def alerts(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for g in groups for r in g["rules"] if "alert" in r]


def binary(name: str) -> str:
    exe = shutil.which(name)
    assert exe, f"{name} missing: run scripts/install-deps.sh (Debian package prometheus)"
    return exe


def promtool() -> str:
    return binary("promtool")
