"""`make demo` stays true: the end-to-end job passes on the test bed."""
import os
import subprocess

import pytest

from afctest import ROOT

pytestmark = [pytest.mark.kafka, pytest.mark.redis]


def test_demo_passes(testbed) -> None:
    env = {**os.environ, "AFC_KAFKA_BOOTSTRAP": testbed.bootstrap, "AFC_REDIS_URL": testbed.redis_url,
           "AFC_TESTBED_DIR": testbed.state_dir}
    r = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-P", "-m", "afc.runtime.demo"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "applied twice: 0" in r.stdout and "PASS" in r.stdout
