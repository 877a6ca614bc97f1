"""The kopf handlers and the I/O they do: read Secrets, apply the rendered objects, probe
Kafka, write the status, post an Event for each decision.

One level-based `Reconciler.reconcile(body)` does everything; it is triggered by
- kopf's create/update/resume handlers (a failure raises TemporaryError: retry with backoff),
- a change to a child object (drift: someone edited the StatefulSet; or the StatefulSet's
  rollout moved, which changes the AdaptiveConsumer's status),
- the resync loop, every `spec.scaling.pollIntervalS` (lag, broker, missed events).
Reconciles of one AdaptiveConsumer never overlap; different ones run concurrently.
"""
from __future__ import annotations

import asyncio
import base64
import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import kopf

from afc.operator import render, status as st
from afc.operator.crd import API_VERSION, GROUP, KIND, PLURAL, VERSION, AdaptiveConsumerSpec
from afc.operator.kafka import KafkaProbe
from afc.operator.kube import Kube, KubeError, path_for
from afc.operator.settings import OperatorSettings
from afc.operator.status import Problem

logger = logging.getLogger("afc.operator")

PREFIX = "operator.afc.dev"  # kopf's bookkeeping annotations on the AdaptiveConsumer
OWNERSHIP_CONFLICT = "OwnershipConflict"
INTERNAL_ERROR = "InternalError"
CHILDREN = (("", "v1", "configmaps"), ("", "v1", "services"), ("apps", "v1", "statefulsets"),
            ("policy", "v1", "poddisruptionbudgets"))

Key = tuple[str, str]


class ProblemError(Exception):
    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.message)
        self.problem = problem


@dataclass
class Change:
    kind: str
    name: str
    action: str  # created | updated | unchanged
    paths: list[str] = field(default_factory=list)


@dataclass
class Converged:
    spec: AdaptiveConsumerSpec | None = None
    desired: int = 0
    changes: list[Change] = field(default_factory=list)
    sts: dict[str, Any] | None = None
    problem: Problem | None = None
    lag: dict[str, Any] | None = None


@dataclass
class Outcome:
    problem: Problem | None
    status: dict[str, Any]
    changes: list[Change]


def snapshot(body: Mapping[str, Any]) -> dict[str, Any]:
    """A plain, deep copy of a kopf body (kopf's bodies are live views)."""
    return copy.deepcopy(dict(body))


def controller_of(body: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for ref in (body.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") == KIND and ref.get("apiVersion", "").startswith(GROUP + "/"):
            return ref
    return None


def status_stale(cr_status: Mapping[str, Any] | None, sts: Mapping[str, Any], desired: int) -> bool:
    """Whether a StatefulSet's progress is news to the AdaptiveConsumer's status."""
    ro = st.rollout(sts, desired)
    cur = cr_status or {}
    progressing = st.condition(cur, st.PROGRESSING) or {}
    return ((cur.get("replicas"), cur.get("readyReplicas"), cur.get("updatedReplicas"))
            != (ro.replicas, ro.ready, ro.updated)
            or progressing.get("reason") != ro.reason)


def applied_change(before: Mapping[str, Any], after: Mapping[str, Any], paths: list[str]) -> bool:
    """Whether our apply changed the object. A new generation says the spec changed; a new
    resourceVersion alone may be a controller writing status meanwhile (a PodDisruptionBudget's
    counts), so without a generation it counts only with a difference we saw ourselves."""
    b, a = before.get("metadata") or {}, after.get("metadata") or {}
    if b.get("resourceVersion") == a.get("resourceVersion"):
        return False
    if "generation" in a and b.get("generation") != a.get("generation"):
        return True
    return bool(paths) or "generation" not in a


def post_event(body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
    """An Event on the AdaptiveConsumer (through kopf's queue), and the same as a log line."""
    meta = body.get("metadata") or {}
    logger.log(logging.WARNING if type_ == "Warning" else logging.INFO, message,
               extra={"event_reason": reason, "object": f"{meta.get('namespace')}/{meta.get('name')}"})
    try:
        kopf.event(body, type=type_, reason=reason, message=message[:1000])
    except LookupError:  # outside a running operator (no event queue): the log line is it
        pass


class Reconciler:
    def __init__(self, kube: Kube, kafka: KafkaProbe, cfg: OperatorSettings) -> None:
        self.kube, self.kafka, self.cfg = kube, kafka, cfg
        self._locks: dict[Key, asyncio.Lock] = {}
        self._last_run: dict[Key, float] = {}
        self._written: dict[Key, tuple[str, dict[str, Any]]] = {}  # uid, last status written
        self._resync_tasks: dict[Key, asyncio.Task[Any]] = {}

    # ------------------------------------------------------------------ the reconcile

    async def reconcile(self, body: Mapping[str, Any], *, trigger: str) -> Outcome:
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            self._last_run[key] = time.monotonic()
            try:
                return await self._reconcile(body, key, trigger)
            finally:
                self._last_run[key] = time.monotonic()

    async def _reconcile(self, body: Mapping[str, Any], key: Key, trigger: str) -> Outcome:
        owner = render.Owner.from_body(body)
        now = st.now_iso()
        previous = dict(body.get("status") or {})
        written = self._written.get(key)
        if written and written[0] == owner.uid:
            # What we wrote last is at least as new as a body from an index or a queued event.
            previous = {**previous, "conditions": written[1].get("conditions", previous.get("conditions"))}
        done = await self._converge(owner, body.get("spec") or {}, now)
        sts = done.sts if done.sts is not None else await self._live_statefulset(owner)
        new = st.build_status(previous=previous, generation=owner.generation, desired=done.desired,
                              selector=render.selector_string(owner.name), sts=sts, problem=done.problem,
                              lag=done.lag, now=now)
        await self._write_status(body, key, owner, new)
        self._post_decisions(body, trigger, done, previous, new)
        changed = [f"{c.action} {c.kind}/{c.name}" for c in done.changes if c.action != "unchanged"]
        quiet = trigger in ("resync", "rollout") and not done.problem and not changed
        logger.log(logging.DEBUG if quiet else logging.INFO, "reconciled", extra={
            "object": f"{owner.namespace}/{owner.name}", "trigger": trigger, "generation": owner.generation,
            "problem": done.problem.reason if done.problem else None, "changes": changed})
        return Outcome(done.problem, new, done.changes)

    async def _converge(self, owner: render.Owner, raw_spec: Mapping[str, Any], now: str) -> Converged:
        """Make the cluster match the spec: Secrets present, objects applied, broker answering.
        Stops at the first problem, which says what and where."""
        done = Converged()
        try:
            done.spec = spec = render.parse_spec(raw_spec)
            done.desired = render.desired_replicas(spec)
            secrets = await self._read_secrets(owner.namespace, spec)  # before any pod could need them
            for obj in render.desired_objects(owner, spec):
                change, live = await self._apply(owner, obj)
                done.changes.append(change)
                if obj["kind"] == "StatefulSet":
                    done.sts = live
            probe = await self.kafka.probe(spec, secrets, now)
            done.problem, done.lag = probe.problem, probe.lag
        except render.InvalidSpec as e:
            done.problem = Problem(st.INVALID_SPEC, str(e), retry=False)
        except ProblemError as e:
            done.problem = e.problem
        except KubeError as e:
            done.problem = Problem(st.FORBIDDEN if e.forbidden else st.API_ERROR, str(e))
        except Exception as e:  # noqa: BLE001 - a bug must show in the status, not stop the operator
            logger.exception("reconcile failed", extra={"object": f"{owner.namespace}/{owner.name}"})
            done.problem = Problem(INTERNAL_ERROR, f"{type(e).__name__}: {e}")
        return done

    async def _live_statefulset(self, owner: render.Owner) -> dict[str, Any] | None:
        """Ours, as it stands (when this reconcile did not get as far as applying it)."""
        try:
            sts = await self.kube.get(path_for("StatefulSet", owner.namespace, owner.name))
        except KubeError:
            return None
        ctl = controller_of(sts) if sts else None
        return sts if ctl and ctl.get("uid") == owner.uid else None

    async def _read_secrets(self, namespace: str, spec: AdaptiveConsumerSpec) -> dict[str, str]:
        """Check every referenced Secret key exists; return the values the Kafka probe needs."""
        values: dict[str, str] = {}
        for field_path, purpose, ref in render.secret_refs(spec):
            secret = await self.kube.get(path_for("Secret", namespace, ref.name))
            if secret is None:
                raise ProblemError(Problem(st.SECRET_NOT_FOUND,
                                           f"{field_path}: Secret {namespace}/{ref.name} not found"))
            data = secret.get("data") or {}
            if ref.key not in data:
                raise ProblemError(Problem(st.SECRET_KEY_NOT_FOUND,
                                           f"{field_path}: Secret {namespace}/{ref.name} has no key {ref.key!r}"))
            if purpose in ("sasl_password", "tls_ca"):  # the operator's own broker connection needs these
                values[purpose] = base64.b64decode(data[ref.key]).decode()
        return values

    async def _apply(self, owner: render.Owner, obj: dict[str, Any]) -> tuple[Change, dict[str, Any]]:
        meta = obj["metadata"]
        live = await self.kube.get(path_for(obj["kind"], meta["namespace"], meta["name"]))
        if live is not None:
            ctl = controller_of(live)
            if not ctl or ctl.get("uid") != owner.uid:
                raise ProblemError(Problem(OWNERSHIP_CONFLICT,
                                           f"{obj['kind']} {meta['namespace']}/{meta['name']} exists and is not "
                                           f"controlled by this AdaptiveConsumer; rename or delete it"))
        paths = render.object_drift(obj, live)
        after = await self.kube.apply(obj, self.cfg.field_manager)
        action = "created" if live is None else ("updated" if applied_change(live, after, paths) else "unchanged")
        return Change(obj["kind"], meta["name"], action, paths if action == "updated" else []), after

    async def _write_status(self, body: Mapping[str, Any], key: Key, owner: render.Owner,
                            new: dict[str, Any]) -> None:
        written = self._written.get(key)
        current = dict(body.get("status") or {})
        if new == current and (not written or written[0] != owner.uid or written[1] == new):
            return
        try:
            await self.kube.patch_status(KIND, owner.namespace, owner.name, new)
            self._written[key] = (owner.uid, copy.deepcopy(new))
        except KubeError as e:
            if e.not_found:  # deleted meanwhile
                return
            logger.error("status not written", extra={"object": f"{owner.namespace}/{owner.name}",
                                                      "error": str(e)})

    def _post_decisions(self, body: Mapping[str, Any], trigger: str, done: Converged, previous: Mapping[str, Any],
                        new: Mapping[str, Any]) -> None:
        """An Event for each decision this reconcile took, and for each change of condition."""
        spec, desired, changes, problem = done.spec, done.desired, done.changes, done.problem
        # Same generation as last time, and not a spec event: whatever we had to change, someone
        # else changed first.
        drift = trigger not in ("create", "update") and previous.get("observedGeneration") == new["observedGeneration"]
        created = [f"{c.kind}/{c.name}" for c in changes if c.action == "created"]
        if created and drift:
            post_event(body, "Warning", "DriftCorrected", "recreated what was deleted outside the operator: "
                       + ", ".join(created))
        elif created:
            post_event(body, "Normal", "Created", "created " + ", ".join(created))
        updated = [c for c in changes if c.action == "updated"]
        if updated:
            what = "; ".join(f"{c.kind}/{c.name}: {', '.join(c.paths[:8]) or 'fields no longer set removed'}"
                             for c in updated)
            if drift:
                post_event(body, "Warning", "DriftCorrected", f"reverted changes made outside the operator: {what}")
            else:
                post_event(body, "Normal", "Updated", f"applied generation {new['observedGeneration']}: {what}")
        if spec is not None and desired != spec.replicas and (
                previous.get("desiredReplicas") != desired or previous.get("observedGeneration") != new["observedGeneration"]):
            post_event(body, "Normal", "ReplicasClamped",
                       f"spec.replicas={spec.replicas} kept within [minReplicas={spec.min_replicas}, "
                       f"maxReplicas={spec.max_replicas}]: {desired}")
        before = st.condition(previous, st.DEGRADED) or {}
        after = st.condition(new, st.DEGRADED) or {}
        if problem and (before.get("status") != "True" or before.get("reason") != problem.reason
                        or before.get("message") != problem.message):
            retry = "; retrying with backoff" if problem.retry else "; waiting for a spec change"
            post_event(body, "Warning", problem.reason, problem.message + retry)
        elif not problem and before.get("status") == "True" and after.get("status") == "False":
            post_event(body, "Normal", "Recovered", f"no longer degraded (was {before.get('reason')})")
        ready_before = (st.condition(previous, st.READY) or {}).get("status")
        ready_after = st.condition(new, st.READY) or {}
        if ready_after.get("status") == "True" and ready_before != "True":
            post_event(body, "Normal", "Ready", ready_after.get("message", ""))

    # ------------------------------------------------------------------ triggers besides kopf's handlers

    async def on_child_event(self, event: Mapping[str, Any], body: Mapping[str, Any],
                             consumers: kopf.Index[Key, dict[str, Any]]) -> None:
        """A child changed: reconcile its AdaptiveConsumer if the child drifted from what we
        render, disappeared, or (StatefulSet) moved on in its rollout."""
        ref = controller_of(body)
        if ref is None:
            return
        meta = body["metadata"]
        key = (meta["namespace"], ref["name"])
        owner_body = next((b for b in consumers.get(key, []) if b["metadata"].get("uid") == ref.get("uid")), None)
        if owner_body is None or owner_body["metadata"].get("deletionTimestamp"):
            return  # the owner is gone or going: garbage collection handles the children
        reason = None
        if event.get("type") == "DELETED":
            reason = "deleted"
        else:
            try:
                spec = render.parse_spec(owner_body.get("spec") or {})
            except render.InvalidSpec:
                return
            owner = render.Owner.from_body(owner_body)
            desired = next((o for o in render.desired_objects(owner, spec)
                            if o["kind"] == body.get("kind") and o["metadata"]["name"] == meta["name"]), None)
            if desired is None:
                return
            paths = render.object_drift(desired, body)
            if paths:
                reason = "drift"
                logger.info("child drifted", extra={"object": f"{key[0]}/{key[1]}", "paths": paths[:20],
                                                    "child": f"{body.get('kind')}/{meta['name']}"})
            elif body.get("kind") == "StatefulSet" and status_stale(owner_body.get("status"), body,
                                                                    render.desired_replicas(spec)):
                reason = "rollout"
        if reason:
            logger.debug("child event", extra={"object": f"{key[0]}/{key[1]}", "reason": reason,
                                               "child": f"{body.get('kind')}/{meta['name']}"})
            await self.reconcile(owner_body, trigger=reason)

    async def resync_loop(self, consumers: kopf.Index[Key, dict[str, Any]]) -> None:
        """Reconcile each AdaptiveConsumer again `spec.scaling.pollIntervalS` after its last
        reconcile: fresh lag and broker state, and a safety net for missed events."""
        while True:
            await asyncio.sleep(self.cfg.resync_tick_s)
            try:
                self._resync_due(consumers, time.monotonic())
            except Exception:  # noqa: BLE001 - the loop outlives any one pass
                logger.exception("resync pass failed")

    def _resync_due(self, consumers: kopf.Index[Key, dict[str, Any]], now: float) -> None:
        seen: set[Key] = set()
        for key, store in list(consumers.items()):
            for body in list(store):
                seen.add(key)
                if body["metadata"].get("deletionTimestamp"):
                    continue
                interval = float(((body.get("spec") or {}).get("scaling") or {}).get("pollIntervalS") or 30)
                running = self._resync_tasks.get(key)
                if running and not running.done():
                    continue
                if now - self._last_run.get(key, now) >= interval:
                    self._resync_tasks[key] = asyncio.create_task(self._resync_one(body), name=f"resync {key}")
                self._last_run.setdefault(key, now)
        for gone in set(self._last_run) - seen:  # deleted resources: forget them
            self._last_run.pop(gone, None)
            self._written.pop(gone, None)
            self._locks.pop(gone, None)
            self._resync_tasks.pop(gone, None)

    async def _resync_one(self, body: Mapping[str, Any]) -> None:
        try:
            await self.reconcile(body, trigger="resync")
        except Exception:  # noqa: BLE001 - the loop outlives any one resource
            logger.exception("resync failed", extra={
                "object": f"{body['metadata'].get('namespace')}/{body['metadata'].get('name')}"})

    def close(self) -> None:
        for task in self._resync_tasks.values():
            task.cancel()


# ---------------------------------------------------------------------- kopf wiring

def configure_kopf(settings: kopf.OperatorSettings, cfg: OperatorSettings) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=PREFIX)
    settings.persistence.finalizer = f"{PREFIX}/finalizer"  # unused: no handler needs one
    settings.posting.reporting_component = "afc-operator"
    settings.posting.event_name_prefix = "afc-operator-"
    settings.posting.level = logging.INFO
    settings.scanning.disabled = True  # no cluster-wide list/watch of CRDs and namespaces needed
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    settings.networking.request_timeout = cfg.api_timeout_s
    settings.networking.connect_timeout = 10


def register(registry: kopf.OperatorRegistry, reconciler: Reconciler, cfg: OperatorSettings) -> None:
    """Every handler of the operator, on the given registry."""
    on_resource = dict(group=GROUP, version=VERSION, plural=PLURAL, registry=registry)

    @kopf.on.login(registry=registry, id="login")
    def login(**kwargs: Any) -> Any:
        return kopf.login_via_client(**kwargs)

    @kopf.index(**on_resource, id="consumers")
    def consumers(body: kopf.Body, namespace: str, name: str, **_: Any) -> dict[Key, dict[str, Any]]:
        return {(namespace, name): snapshot(body)}

    @kopf.on.startup(registry=registry, id="startup")
    async def startup(settings: kopf.OperatorSettings, consumers: kopf.Index[Key, dict[str, Any]],
                      memo: kopf.Memo, **_: Any) -> None:
        configure_kopf(settings, cfg)
        found = await reconciler.kube.discover(API_VERSION)
        if not found or not any(r.get("name") == PLURAL for r in found.get("resources", [])):
            raise kopf.TemporaryError(f"{PLURAL}.{GROUP}/{VERSION} is not served: "
                                      "install the CRD (kubectl apply -f crds/)", delay=5)
        memo["resync"] = asyncio.create_task(reconciler.resync_loop(consumers), name="afc resync")
        logger.info("operator started", extra={"namespaces": cfg.namespaces or "*",
                                               "field_manager": cfg.field_manager})

    @kopf.on.cleanup(registry=registry, id="cleanup")
    async def cleanup(memo: kopf.Memo, **_: Any) -> None:
        task = memo.get("resync")
        if task:
            task.cancel()
        reconciler.close()
        reconciler.kafka.close()
        reconciler.kube.close()

    async def changed(body: kopf.Body, retry: int, trigger: str) -> None:
        outcome = await reconciler.reconcile(snapshot(body), trigger=trigger)
        p = outcome.problem
        if p is None:
            return
        if not p.retry:
            raise kopf.PermanentError(f"{p.reason}: {p.message}")
        raise kopf.TemporaryError(f"{p.reason}: {p.message}",
                                  delay=st.backoff(retry, cfg.backoff_base_s, cfg.backoff_max_s))

    @kopf.on.create(**on_resource, id="reconcile-create")
    async def on_create(body: kopf.Body, retry: int, **_: Any) -> None:
        await changed(body, retry, "create")

    @kopf.on.update(**on_resource, field="spec", id="reconcile-update")
    async def on_update(body: kopf.Body, retry: int, **_: Any) -> None:
        await changed(body, retry, "update")

    @kopf.on.resume(**on_resource, id="reconcile-resume")
    async def on_resume(body: kopf.Body, retry: int, **_: Any) -> None:
        await changed(body, retry, "resume")

    for group, version, plural in CHILDREN:
        @kopf.on.event(group=group, version=version, plural=plural, registry=registry, id=f"child-{plural}",
                       labels={render.L_MANAGED_BY: render.MANAGED_BY})
        async def on_child(event: kopf.RawEvent, body: kopf.Body,
                           consumers: kopf.Index[Key, dict[str, Any]], **_: Any) -> None:
            await reconciler.on_child_event(event, snapshot(body), consumers)

    @kopf.on.probe(registry=registry, id="adaptiveconsumers")
    def served(consumers: kopf.Index[Key, dict[str, Any]], **_: Any) -> int:
        return len(consumers)

