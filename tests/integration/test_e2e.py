"""The mission end to end, as `make demo` runs it (scripts/demo.py, plain output): kubectl
applies the CRD, the operator's manifests and an AdaptiveConsumer; pods run through the real
StatefulSet controller, scheduler and the node agent; a backlog triggers scale-up and
drains; a spec change rolls the pods one by one with zero rebalances; a SIGKILL of one
consumer process loses nothing and duplicates nothing; the scale-down removes the departed
members; deleting the AdaptiveConsumer stops every process."""
from __future__ import annotations

import os
import re
import subprocess

import pytest

from afctest import ROOT

pytestmark = [pytest.mark.kafka, pytest.mark.redis, pytest.mark.k8s]


def _mountns() -> bool:
    import sys
    sys.path.insert(0, str(ROOT / "scripts"))
    import nodeagent
    return nodeagent.mountns_available()


@pytest.mark.skipif(not _mountns(), reason="the node agent cannot make private mount namespaces here (needs root "
                    "with CAP_SYS_ADMIN): the operator's pod could not read its ServiceAccount token at its fixed path")
def test_make_demo_end_to_end(testbed, crd_installed) -> None:
    env = {**os.environ, "AFC_KAFKA_BOOTSTRAP": testbed.bootstrap, "AFC_REDIS_URL": testbed.redis_url,
           "AFC_TESTBED_DIR": testbed.state_dir, "KUBECONFIG": testbed.kubeconfig, "AFC_KUBECTL": testbed.kubectl}
    r = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-P", str(ROOT / "scripts" / "demo.py"),
                        "--orders", "20000"], env=env, capture_output=True, text=True, timeout=900)
    out = r.stdout
    assert r.returncode == 0, out[-6000:] + r.stderr[-3000:]
    # stdout is a pipe: plain lines, one PASS line per promise
    assert re.search(r"^PASS scaled up by lag: 1 -> [234] replicas", out, re.M), out
    assert re.search(r"^PASS rollout of [234] pods in \d+ s with 0 rebalances", out, re.M), out
    # the 20,000 of the burst and those sent during the rollout, each applied once
    m = re.search(r"^PASS every order applied exactly once after a SIGKILL of one consumer process: "
                  r"([\d,]+) of ([\d,]+), 0 applied twice", out, re.M)
    assert m and m.group(1) == m.group(2) and int(m.group(2).replace(",", "")) >= 20_000, out
    assert re.search(r"^PASS scaled down [234] -> 1; the departed static members removed from the group", out, re.M), out
    assert "PASS deleting the AdaptiveConsumer stopped every consumer process" in out
    assert re.search(r"^demo: PASS \(5/5 checks", out, re.M), out
    assert "FAIL" not in out
