"""Images and install manifests, checked statically (no build, no cluster)."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from afc.operator import render

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def dockerfile(name: str) -> str:
    return (ROOT / "docker" / f"{name}.Dockerfile").read_text()


def instruction(text: str, name: str) -> list[str]:
    return [line.split(None, 1)[1] for line in text.splitlines() if line.startswith(name + " ")]


@pytest.mark.parametrize("image,script,cmd", [("operator", "afc-operator", None), ("runtime", "afc-consumer", '["run"]')])
def test_image_entrypoint_is_the_console_script(image: str, script: str, cmd: str | None) -> None:
    text = dockerfile(image)
    assert PYPROJECT["project"]["scripts"][script]  # the script the tests run
    assert instruction(text, "ENTRYPOINT") == [f'["{script}"]']
    assert instruction(text, "CMD") == ([cmd] if cmd else [])
    assert instruction(text, "USER") == [f"{render.RUN_AS}:{render.RUN_AS}"]  # what the pods' securityContext runs as
    assert all(":" in base and "latest" not in base for base in instruction(text, "ARG") if base.startswith("PYTHON_IMAGE"))
    assert "--constraint docker/constraints.txt" in text
    assert (ROOT / "docker" / f"{image}.Dockerfile.dockerignore").exists()


def test_constraints_pin_every_declared_dependency() -> None:
    pins = {}
    for line in (ROOT / "docker" / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and re.match(r"^[0-9][0-9A-Za-z.+-]*$", version), line
            pins[name] = version
    declared = PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["operator"]
    for dep in declared:
        name = re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", dep).group(0)).lower()
        assert name in pins, f"{name} is not pinned in docker/constraints.txt (python docker/pin.py)"


def load(path: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((ROOT / "manifests" / path).read_text()) if d]


def test_role_and_cluster_role_grant_the_same_rules() -> None:
    (role,) = load("rbac/namespaced/role.yaml")
    (cluster_role,) = load("rbac/cluster-wide/cluster_role.yaml")
    assert role["kind"] == "Role" and cluster_role["kind"] == "ClusterRole"
    assert role["rules"] == cluster_role["rules"]
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
        assert not {"deletecollection", "update", "escalate", "bind", "impersonate"} & set(rule["verbs"])
        # delete only for the per-revision ConfigMaps the operator collects; the rest goes by owner references
        assert "delete" not in rule["verbs"] or rule["resources"] == ["configmaps"], rule
    secrets = [r for r in role["rules"] if "secrets" in r["resources"]]
    assert secrets == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]


def test_operator_deployment() -> None:
    (dep,) = load("manager/deployment.yaml")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    # two replicas, one working (kopf's peering: docs/operator.md, "HA"); a rolling update
    # starts the new replica before it stops an old one
    assert dep["spec"]["replicas"] == 2 and dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    env = {e["name"]: e for e in c["env"]}
    assert env["AFC_OPERATOR_PEERING"]["value"] == "afc-operator"
    assert env["POD_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"  # kopf's peer identity
    (peering, _binding) = load("rbac/namespaced/peering.yaml")
    assert peering["rules"][0]["resources"] == ["kopfpeerings"]
    assert pod["serviceAccountName"] == "afc-operator"
    assert c["image"] == "afc-operator" and "command" not in c  # the image's entrypoint
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    env = {e["name"]: e for e in c["env"]}
    port = int(env["AFC_OPERATOR_LIVENESS_ENDPOINT"]["value"].rsplit(":", 1)[1].split("/")[0])
    assert {"name": "health", "containerPort": port, "protocol": "TCP"} in c["ports"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"] and sc["capabilities"]["drop"] == ["ALL"]
    assert c["resources"]["limits"]["memory"]


@pytest.mark.parametrize("sample", sorted(p.name for p in (ROOT / "manifests" / "samples").glob("afc_*.yaml")))
def test_samples_are_valid_specs(sample: str) -> None:
    (doc,) = load(f"samples/{sample}")
    assert doc["apiVersion"] == "afc.dev/v1alpha1" and doc["kind"] == "AdaptiveConsumer"
    render.desired_objects(render.Owner(doc["metadata"]["name"], "ns", "uid"), render.parse_spec(doc["spec"]))
