"""The contract between the operator and the runtime, end to end: the pod the operator renders,
played by a real `afc-consumer run` process. Its environment is the StatefulSet's container env
resolved as a kubelet would (downward API, Secret references, `$(VAR)` references), its config
file is the ConfigMap's. It must pass the probes the pod declares, join the group with
`<namespace>.<pod name>` as group.instance.id, handle messages, and drain within the grace period."""
from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from afc.operator.kube import Kube, path_for
from afc.operator.testing import OperatorProcess, delete_consumers, resolve_env
from afctest import Testbed, free_port, produce_json, wait_for

pytestmark = [pytest.mark.k8s, pytest.mark.kafka, pytest.mark.redis]

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "manifests" / "samples" / "afc_v1alpha1_adaptiveconsumer.yaml"


@pytest.fixture
def api(k8s_api) -> Iterator[Kube]:
    kube = Kube(k8s_api.configuration)
    yield kube
    kube.close()


def read_secret(api: Kube, namespace: str) -> Any:
    def read(name: str, key: str) -> str:
        secret = api.request("GET", path_for("Secret", namespace, name))
        return base64.b64decode(secret["data"][key]).decode()
    return read


def http(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def instance_ids(testbed: Testbed, group: str) -> list[str]:
    from confluent_kafka.admin import AdminClient
    admin = AdminClient({"bootstrap.servers": testbed.bootstrap})
    (desc,) = [f.result(10) for f in admin.describe_consumer_groups([group], request_timeout=10).values()]
    return sorted(m.group_instance_id or "" for m in desc.members)


def test_rendered_pod_runs_the_runtime(testbed: Testbed, api: Kube, crd_installed: None, namespace: str, names,
                                       make_topic, redis_client, tmp_path: Path) -> None:
    topic = make_topic("orders", partitions=2)
    port = free_port()
    testbed.run_kubectl("create", "secret", "generic", "redis", "-n", namespace, f"--from-literal=url={testbed.redis_url}")
    obj = yaml.safe_load(SAMPLE.read_text())
    obj["spec"].update(
        replicas=1,
        handler={"handler": "afc_test_handlers:count_runs"},
        kafka={"bootstrapServers": testbed.bootstrap, "topics": [topic], "groupId": names.group},
        idempotency={"redisUrlSecretRef": {"name": "redis", "key": "url"}, "keyPrefix": names.redis_prefix.rstrip(":")},
        server={"port": port},
        shutdown={"drainTimeoutS": 5},
        membership={"sessionTimeoutMs": 10000},
    )
    with OperatorProcess(["--namespace", namespace], testbed.kubeconfig, tmp_path / "operator.log") as op:
        testbed.run_kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj))
        sts = op.wait_until(lambda: api.request("GET", path_for("StatefulSet", namespace))["items"], 30,
                            "the StatefulSet")[0]
        (volume,) = [v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == "config"]
        cm = api.request("GET", path_for("ConfigMap", namespace, volume["configMap"]["name"]))
        delete_consumers([testbed.kubectl, f"--kubeconfig={testbed.kubeconfig}"], namespace)  # finalizer

    # "mount" the ConfigMap and resolve the env of pod orders-0
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "config"]
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    for key, text in cm["data"].items():
        (config_dir / key).write_text(text)
    env = resolve_env(container, "orders-0", namespace, read_secret(api, namespace))
    assert env["AFC_CONFIG_FILE"].startswith(mount["mountPath"] + "/")
    env["AFC_CONFIG_FILE"] = str(config_dir / Path(env["AFC_CONFIG_FILE"]).name)
    assert env["AFC_IDEMPOTENCY__REDIS_URL"] == testbed.redis_url  # from the Secret, not the ConfigMap
    assert testbed.redis_url not in cm["data"]["config.json"]

    runs = f"{names.redis_prefix}runs"
    proc_env = {k: v for k, v in os.environ.items() if not k.startswith("AFC_")}
    proc_env.update(env)
    proc_env.update({"PYTHONPATH": str(ROOT / "tests"), "AFC_TEST_REDIS_URL": testbed.redis_url, "AFC_TEST_HASH": runs})
    exe = shutil.which("afc-consumer", path=str(Path(sys.executable).parent)) or "afc-consumer"
    log = open(tmp_path / "consumer.log", "ab")
    proc = subprocess.Popen([exe, "run"], env=proc_env, stdout=log, stderr=subprocess.STDOUT,  # the image's CMD
                            stdin=subprocess.DEVNULL)
    try:
        def tail() -> str:
            return "\n".join((tmp_path / "consumer.log").read_text(errors="replace").splitlines()[-30:])
        probes = {p: container[p]["httpGet"]["path"] for p in ("readinessProbe", "livenessProbe")}
        assert container["ports"][0]["containerPort"] == port
        try:
            wait_for(lambda: proc.poll() is not None or http(port, probes["readinessProbe"]) == 200, 60,
                     what="the readiness probe")
            assert proc.poll() is None, f"afc-consumer exited {proc.returncode}:\n{tail()}"
            assert http(port, probes["livenessProbe"]) == 200
            assert http(port, "/metrics") == 200
            # static membership: <namespace>.<pod name> is the group.instance.id
            iid = f"{namespace}.orders-0"
            assert env["AFC_INSTANCE_ID"] == iid
            wait_for(lambda: instance_ids(testbed, names.group) == [iid], 60, what=f"member {iid}")
            produce_json(testbed.bootstrap, topic, [{"n": i} for i in range(20)])
            wait_for(lambda: redis_client.hlen(runs) == 20, 60, what="20 messages handled")
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- afc-consumer log ---\n{tail()}") from None
        grace = sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(grace) == 0
        assert time.monotonic() - started < grace
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
