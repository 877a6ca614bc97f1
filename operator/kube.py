"""A small async facade over the Kubernetes REST API: get, server-side apply, merge-patch.

Objects stay plain dicts (what the render functions produce and what the API returns).
Requests go through the official client's configuration (kubeconfig or in-cluster service
account, with token refresh) and run in a bounded thread pool.
"""
from __future__ import annotations

import asyncio
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping

from afc.operator.crd import GROUP, PLURAL, VERSION

# kind -> (API prefix, plural)
RESOURCES: dict[str, tuple[str, str]] = {
    "ConfigMap": ("/api/v1", "configmaps"),
    "Secret": ("/api/v1", "secrets"),
    "Service": ("/api/v1", "services"),
    "StatefulSet": ("/apis/apps/v1", "statefulsets"),
    "ControllerRevision": ("/apis/apps/v1", "controllerrevisions"),
    "PodDisruptionBudget": ("/apis/policy/v1", "poddisruptionbudgets"),
    "Pod": ("/api/v1", "pods"),
    "AdaptiveConsumer": (f"/apis/{GROUP}/{VERSION}", PLURAL),
}


class KubeError(Exception):
    """A failed API call, with what was tried: the message names verb, resource and reason."""

    def __init__(self, status: int, verb: str, path: str, reason: str, message: str) -> None:
        super().__init__(f"{verb} {path}: {status} {reason}: {message}")
        self.status, self.verb, self.path, self.reason, self.message = status, verb, path, reason, message

    @property
    def forbidden(self) -> bool:
        return self.status == 403

    @property
    def not_found(self) -> bool:
        return self.status == 404


def path_for(kind: str, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
    """The API path of an object. A name or namespace that would step out of its path segment
    (a "/", "." or "..") is refused: the spec's names reach here (Secret references), and the
    operator reads Secrets only in the AdaptiveConsumer's own namespace (docs/security.md)."""
    for part in (namespace, name):
        if part is not None and (not part or "/" in part or part in (".", "..") or "?" in part or "%" in part):
            raise ValueError(f"not an object name: {part!r}")
    prefix, plural = RESOURCES[kind]
    path = f"{prefix}/namespaces/{namespace}/{plural}"
    if name:
        path += f"/{name}"
    if subresource:
        path += f"/{subresource}"
    return path


def resource_of(path: str) -> str:
    """`statefulsets`, `adaptiveconsumers/status`, ... of an API path (for counting requests)."""
    parts = [p for p in path.split("/") if p]
    if "namespaces" in parts and len(parts) > parts.index("namespaces") + 2:
        parts = parts[parts.index("namespaces") + 2:]
        return parts[0] + (f"/{parts[2]}" if len(parts) > 2 else "")
    return parts[-1] if parts else ""


def load_client_configuration() -> Any:
    """In a pod: the service account; elsewhere: $KUBECONFIG or ~/.kube/config."""
    from kubernetes import client, config
    cfg = client.Configuration()
    if os.environ.get("KUBERNETES_SERVICE_HOST") and os.path.exists(config.incluster_config.SERVICE_TOKEN_FILENAME):
        config.load_incluster_config(client_configuration=cfg)
    else:
        config.load_kube_config(client_configuration=cfg)
    return cfg


class Kube:
    """`on_request(verb, resource)` is told of every request (the operator counts them in its
    metrics: what the reconciles cost the apiserver, without kopf's watches and Events)."""

    def __init__(self, configuration: Any | None = None, workers: int = 8, timeout_s: float = 30.0,
                 on_request: Callable[[str, str], None] | None = None) -> None:
        from kubernetes import client
        self._api = client.ApiClient(configuration or load_client_configuration())
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="afc-kube")
        self.timeout_s = timeout_s
        self.on_request = on_request

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._api.close()

    def request(self, method: str, path: str, body: Any = None, content_type: str | None = None,
                query: list[tuple[str, str]] | None = None) -> dict[str, Any]:
        """One blocking API call; the async methods run it in the pool."""
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        m, url, hdrs, payload, post = self._api.param_serialize(
            method=method, resource_path=path, query_params=query or [], header_params=headers, body=body,
            auth_settings=["BearerToken"])
        if self.on_request is not None:
            self.on_request(method, resource_of(path))
        resp = self._api.call_api(m, url, hdrs, payload, post, _request_timeout=self.timeout_s)
        raw = resp.read()
        data = json.loads(raw) if raw else {}
        if resp.status >= 400:
            raise KubeError(resp.status, method, path, data.get("reason") or resp.reason or "",
                            data.get("message") or raw.decode(errors="replace")[:500])
        return data

    def can(self, verb: str, group: str, plural: str, namespace: str | None) -> bool:
        """Whether this operator may `verb` `plural` (in `namespace`, or cluster-wide), by a
        SelfSubjectAccessReview: every authenticated user may ask."""
        attrs = {"verb": verb, "group": group, "resource": plural}
        if namespace:
            attrs["namespace"] = namespace
        review = self.request("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                              {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                               "spec": {"resourceAttributes": attrs}})
        return bool((review.get("status") or {}).get("allowed"))

    async def _run(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: self.request(*args, **kwargs))

    async def get(self, path: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return await self._run("GET", path)
        except KubeError as e:
            if e.not_found:
                return None
            raise

    async def apply(self, obj: Mapping[str, Any], field_manager: str) -> dict[str, Any]:
        """Server-side apply, forcing ownership of the fields we set (drift is taken back)."""
        meta = obj["metadata"]
        path = path_for(obj["kind"], meta["namespace"], meta["name"])
        return await self._run("PATCH", path, body=dict(obj), content_type="application/apply-patch+yaml",
                               query=[("fieldManager", field_manager), ("force", "true")])

    async def list_objects(self, kind: str, namespace: str, selector: Mapping[str, str]) -> list[dict[str, Any]]:
        """The objects of a kind in a namespace matching every label of `selector`."""
        sel = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
        return (await self._run("GET", path_for(kind, namespace), query=[("labelSelector", sel)])).get("items") or []

    async def delete(self, kind: str, namespace: str, name: str, uid: str) -> bool:
        """Delete that very object (a uid precondition: not a namesake created meanwhile).
        False when it is gone already."""
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": {"uid": uid}}
        try:
            await self._run("DELETE", path_for(kind, namespace, name), body=body)
            return True
        except KubeError as e:
            if e.not_found or e.status == 409:
                return False
            raise

    async def patch_status(self, kind: str, namespace: str, name: str, patch: Mapping[str, Any],
                           field_manager: str | None = None) -> dict[str, Any]:
        """A JSON merge patch of the status (null removes a key), under `field_manager` (the
        status's managedFields then say which operator wrote it)."""
        return await self._run("PATCH", path_for(kind, namespace, name, "status"), body={"status": dict(patch)},
                               content_type="application/merge-patch+json",
                               query=[("fieldManager", field_manager)] if field_manager else None)

    async def scale(self, kind: str, namespace: str, name: str, replicas: int, field_manager: str) -> dict[str, Any]:
        """Write spec.replicas (a merge patch of the object, which answers with the object: no
        read of it needed, so no `get` right)."""
        return await self._run("PATCH", path_for(kind, namespace, name), body={"spec": {"replicas": int(replicas)}},
                               content_type="application/merge-patch+json", query=[("fieldManager", field_manager)])

    async def ensure_peering(self, name: str, namespace: str | None) -> bool:
        """Create kopf's peering object (a KopfPeering in `namespace`, or a ClusterKopfPeering
        when None) unless it exists: with a peering name kopf does no work until the object is
        there, so the operator makes it rather than leaving one more step to the installer.
        True when it exists now."""
        kind = "KopfPeering" if namespace else "ClusterKopfPeering"
        path = (f"/apis/kopf.dev/v1/namespaces/{namespace}/kopfpeerings" if namespace
                else "/apis/kopf.dev/v1/clusterkopfpeerings")
        try:
            await self._run("POST", path, body={"apiVersion": "kopf.dev/v1", "kind": kind, "metadata": {"name": name}})
        except KubeError as e:
            if e.status == 409:
                return True
            raise
        return True

    async def discover(self, group_version: str) -> dict[str, Any] | None:
        prefix = "/api/" if group_version == "v1" else "/apis/"
        return await self.get(prefix + group_version)
