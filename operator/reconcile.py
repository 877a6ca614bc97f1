"""The kopf handlers and the I/O they do: read Secrets, apply the rendered objects, measure
the group in Kafka, read its backpressure signal, decide replicas, write the status, post an
Event for each decision, and hand departed static members' partitions over on scale-down.

One level-based `Reconciler.reconcile(body, trigger)` does everything; it is triggered by
- kopf's create/update/resume handlers (a failure raises TemporaryError: retry with backoff),
- a change to a child object (drift: someone edited the StatefulSet; or the StatefulSet's
  rollout moved, which changes the AdaptiveConsumer's status),
- the poll: a `@kopf.daemon` per AdaptiveConsumer, every `spec.scaling.pollIntervalS`
  (trigger "poll"): lag, backpressure, the autoscaler's decision, anything missed. Running in
  kopf's own per-resource task, its Events post like any handler's.
A pod deletion (watched) hands a departed member's partitions over at once.
Reconciles of one AdaptiveConsumer never overlap; different ones run concurrently.

Reads come from kopf's watch streams (`Cache`: indexes of the children and pods), writes only
when something changed (`Reconciler._apply`): a poll of a converged AdaptiveConsumer sends the
apiserver nothing. The poll used to read and apply all four children and list the pods every
time (about 10 requests per resource every 30 s: with 1,000 resources more than the operator
could send; bench/operator.py measures both, docs/operator.md "Scale").
"""
from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import kopf

from afc.operator import canary as ca, render, rollout as ro, scaling as sc, status as st
from afc.operator.crd import API_VERSION, GROUP, KIND, PLURAL, VERSION, AdaptiveConsumerSpec
from afc.operator.kafka import KafkaProbe, Snapshot, lag_summary
from afc.operator.kube import RESOURCES, Kube, KubeError, path_for
from afc.operator.metrics import OperatorMetrics
from afc.operator.settings import OperatorSettings
from afc.operator.status import Problem

logger = logging.getLogger("afc.operator")

PREFIX = "operator.afc.dev"  # kopf's bookkeeping annotations on the AdaptiveConsumer
APPLIED = f"{PREFIX}/applied"  # on each child: the digest of what the operator applied last
OWNERSHIP_CONFLICT = "OwnershipConflict"
INTERNAL_ERROR = "InternalError"
CHILDREN = (("", "v1", "configmaps"), ("", "v1", "services"), ("apps", "v1", "statefulsets"),
            ("policy", "v1", "poddisruptionbudgets"))
HOLDS = (sc.BACKPRESSURE, sc.STALLED, sc.STALE_DATA, sc.ROLLING_OUT)  # an Event when one starts
# The children and the pods are watched with this label selector, sent to the apiserver: the
# operator receives only its own objects, not every ConfigMap, Service, StatefulSet, PDB and pod
# of the namespaces it serves (kopf's `labels=` on a handler only filters after receiving).
OWN_OBJECTS = f"{render.L_MANAGED_BY}={render.MANAGED_BY}"

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
    body: Mapping[str, Any] | None = None       # the AdaptiveConsumer (refetched after the operator scaled it)
    spec: AdaptiveConsumerSpec | None = None
    secrets: dict[str, str] = field(default_factory=dict)
    desired: int = 0
    changes: list[Change] = field(default_factory=list)
    sts: dict[str, Any] | None = None
    problem: Problem | None = None
    lag: dict[str, Any] | None = None
    decision: sc.Decision | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    step: ro.Step | None = None
    canary_degraded: tuple[str, str] | None = None


@dataclass
class Outcome:
    problem: Problem | None
    status: dict[str, Any]
    changes: list[Change]
    decision: sc.Decision | None = None


@dataclass
class Tracked:
    """What the operator remembers of one AdaptiveConsumer between polls (in memory: after a
    restart the scale-down window starts again, so a restart never scales down early)."""
    uid: str
    body: dict[str, Any] = field(default_factory=dict)
    window: list[sc.Observation] = field(default_factory=list)
    recommendations: list[tuple[float, int]] = field(default_factory=list)
    known_rate: float | None = None
    snapshot: Snapshot | None = None
    decision: sc.Decision | None = None
    decided_at: str | None = None
    last_scale_time: str | None = None
    departing: dict[str, float] = field(default_factory=dict)   # pod name -> since (monotonic)
    spec: AdaptiveConsumerSpec | None = None
    secrets: dict[str, str] = field(default_factory=dict)
    latest: dict[str, Any] | None = None   # metadata and spec of the newest generation seen
    failing: dict[str, str] = field(default_factory=dict)  # pod -> failure reason, as last reported
    rolled: bool = False  # a rollout ran since the last RolloutComplete (its pods may still get ready after it)
    collected: tuple[Any, ...] | None = None  # what the last complete config collection looked at
    canary_key: tuple[Any, ...] | None = None  # the canary (template, readyAt) the samples belong to
    canary_samples: list[ca.Sample] = field(default_factory=list)  # members' counters during its hold
    refused: tuple[int, Problem] | None = None  # (generation, InvalidSpec): the apiserver refused what it renders

    def newest(self, body: Mapping[str, Any]) -> Mapping[str, Any]:
        """`body`, or the newer spec this operator has seen (a handler may run with the body of
        an older event, e.g. the create event after the poll already scaled: applying its
        replicas would undo the scale)."""
        gen = int(body["metadata"].get("generation") or 0)
        if self.latest is not None and int(self.latest["metadata"].get("generation") or 0) > gen:
            return {**body, "metadata": self.latest["metadata"], "spec": self.latest["spec"]}
        self.latest = {"metadata": copy.deepcopy(dict(body["metadata"])), "spec": copy.deepcopy(body.get("spec"))}
        return body


def snapshot(body: Mapping[str, Any]) -> dict[str, Any]:
    """A plain, deep copy of a kopf body (kopf's bodies are live views)."""
    return copy.deepcopy(dict(body))


def slim(body: Mapping[str, Any]) -> dict[str, Any]:
    """A snapshot for the cache, without managedFields (half of a StatefulSet's bytes, never
    read: with thousands of children held in memory that is most of the operator's RSS)."""
    meta = {k: v for k, v in (body.get("metadata") or {}).items() if k != "managedFields"}
    return copy.deepcopy({**{k: v for k, v in body.items() if k != "metadata"}, "metadata": meta})


def digest(obj: Mapping[str, Any]) -> str:
    """What an applied object is, in a few bytes: the same render gives the same digest."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:32]


def stamped(obj: Mapping[str, Any]) -> dict[str, Any]:
    """`obj` with its digest in the APPLIED annotation: the object itself remembers what this
    operator applied last, across restarts and a fail-over to another replica."""
    out = copy.deepcopy(dict(obj))
    meta = out.setdefault("metadata", {})
    meta["annotations"] = {**(meta.get("annotations") or {}), APPLIED: digest(obj)}
    return out


MISS = object()  # not in the cache: ask the apiserver


class Cache:
    """The read side of the watch streams kopf keeps open anyway: an index per child kind
    (by namespace and name) and the consumer pods (by namespace and AdaptiveConsumer).
    kopf fills its indexes before it runs any handler, updates them before it runs the event
    handlers of the same event, and drops deleted objects. They may lag our own writes by a
    watch event: callers read the apiserver when the cached object is missing or differs from
    what they want (an object absent from an index may also just have been created)."""

    INDEXES = {"ConfigMap": "cache-configmaps", "Service": "cache-services", "StatefulSet": "cache-statefulsets",
               "PodDisruptionBudget": "cache-poddisruptionbudgets"}
    PODS = "cache-pods"

    def __init__(self) -> None:
        self.indexes: Mapping[str, Any] = {}

    def attach(self, indexes: Mapping[str, Any]) -> None:
        """kopf's index objects (live views, the same for the operator's lifetime)."""
        self.indexes = {k: v for k, v in indexes.items() if k in (*self.INDEXES.values(), self.PODS)}

    def get(self, kind: str, namespace: str, name: str) -> Any:
        """The cached object, or MISS."""
        index = self.indexes.get(self.INDEXES.get(kind, ""))
        store = index.get((namespace, name)) if index is not None else None
        return next(iter(store), MISS) if store is not None else MISS

    def pods(self, namespace: str, name: str) -> list[dict[str, Any]] | None:
        """The pods of an AdaptiveConsumer, or None without an index (then list them)."""
        index = self.indexes.get(self.PODS)
        if index is None:
            return None
        return list(index.get((namespace, name), []))


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


def rendered(owner: render.Owner, spec: AdaptiveConsumerSpec, status: Mapping[str, Any] | None,
             canary: Mapping[str, Any] | None = None, stable_template: Mapping[str, Any] | None = None
             ) -> tuple[list[dict[str, Any]], str, dict[str, Any] | None]:
    """The objects to apply, the hash of their pod template (as the spec renders it), and the
    rollout hold that applies to it (status.rollout.held, kept while the spec renders the same
    template). A canary (afc.operator.canary) in phase Canary raises the partition so only its
    pods roll; one rolling back puts the stable revision's pod template (`stable_template`,
    from its ControllerRevision) in the StatefulSet, or, when that is not known, keeps the
    canary's partition (nothing further rolls)."""
    objs = render.desired_objects(owner, spec)
    template = render.template_hash(next(o for o in objs if o["kind"] == "StatefulSet"))
    held = ((status or {}).get("rollout") or {}).get("held")
    at = int(held["partition"]) if held and held.get("template") == template else None
    replicas = render.desired_replicas(spec)
    if ca.rolls_back(canary):
        if stable_template is None:
            at = ca.canary_partition(spec.rollout.canary, replicas) if spec.rollout.canary else at
        else:
            objs = render.desired_objects(owner, spec)
            for o in objs:
                if o["kind"] == "StatefulSet":
                    o["spec"]["template"] = copy.deepcopy(dict(stable_template))
            return objs, template, None
    wanted = ca.partition_for(canary, spec.rollout.canary, replicas)
    if wanted is not None:
        at = max(at or 0, wanted)
    if at is not None:
        objs = render.desired_objects(owner, spec, held=at)
    return objs, template, held if held and held.get("template") == template else None


def policy_for(spec: AdaptiveConsumerSpec) -> sc.Policy:
    s = spec.scaling
    return sc.Policy(mode=s.mode, min_replicas=spec.min_replicas, max_replicas=spec.max_replicas,
                     lag_threshold=s.lag_threshold_per_replica, target_drain_s=s.target_drain_time_s,
                     scale_up_stabilization_s=s.scale_up_stabilization_s,
                     scale_down_stabilization_s=s.scale_down_stabilization_s,
                     max_step_up=s.max_scale_up_step, max_step_down=s.max_scale_down_step,
                     activation_lag=s.activation_lag, stall_after_s=s.stall_after_s, rate_window_s=s.rate_window_s,
                     limit_to_partitions_with_lag=s.limit_to_partitions_with_lag,
                     backpressure_blocks_at=s.backpressure_blocks_at,
                     auto_offset_reset=spec.kafka.auto_offset_reset)


def departed_pods(name: str, before: int, after: int) -> list[str]:
    """The pods a StatefulSet going from `before` to `after` replicas removes."""
    return [f"{name}-{i}" for i in range(after, before)]


def union(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """b over a, nested objects merged: every key either has."""
    out = dict(a)
    for k, v in b.items():
        out[k] = union(a[k], v) if isinstance(v, Mapping) and isinstance(a.get(k), Mapping) else v
    return out


def clean(value: Any) -> Any:
    """Without None values (a null in a merge patch deletes, so none may be written as a value)."""
    if isinstance(value, Mapping):
        return {k: clean(v) for k, v in value.items() if v is not None}
    return value


def refused(owner: render.Owner, e: KubeError) -> Problem:
    """A child the apiserver refused (422) as InvalidSpec: it was rendered from this spec, so
    only a spec change can fix it; not retried until then (a new generation)."""
    kind = next((k for k, (_, plural) in RESOURCES.items() if f"/{plural}/" in f"{e.path}/"), "object")
    return Problem(st.INVALID_SPEC, f"the apiserver refused the {kind} rendered from generation {owner.generation} "
                                    f"of the spec (check spec.podTemplate): {e.message}", retry=False)


def post_event(body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
    """An Event on the AdaptiveConsumer (through kopf's queue), and the same as a log line."""
    meta = body.get("metadata") or {}
    logger.log(logging.WARNING if type_ == "Warning" else logging.INFO, message,
               extra={"event_reason": reason, "object": f"{meta.get('namespace')}/{meta.get('name')}"})
    try:
        kopf.event(body, type=type_, reason=reason, message=message[:1000])
    except LookupError:  # outside a running operator (no event queue): the log line is it
        pass


def scaling_conditions(mode: str, d: sc.Decision) -> dict[str, tuple[bool, str, str]]:
    """ScalingActive, ScalingLimited and Stalled from one decision."""
    conds: dict[str, tuple[bool, str, str]] = {}
    if mode == "Off":
        conds[st.SCALING_ACTIVE] = (False, sc.SCALING_OFF, "spec.replicas is written by users, kubectl scale or "
                                                           "an HPA; the operator keeps it within bounds")
        conds[st.SCALING_LIMITED] = (False, sc.SCALING_OFF, "")
    elif d.reason in (sc.STALE_DATA, sc.NO_DATA):
        conds[st.SCALING_ACTIVE] = (False, d.reason, d.message)
    else:
        conds[st.SCALING_ACTIVE] = (True, "ValidMetrics", f"{mode}: lag {d.metrics.lag}, "
                                                          f"{d.metrics.members} members")
    if mode != "Off" and d.recommendation is not None:
        limited = d.reason in (sc.BACKPRESSURE, sc.ROLLING_OUT, sc.STALLED, sc.DOWN_STABILIZING, sc.UP_STABILIZING)
        capped = any(w in d.message for w in ("capped at", "kept within", "step limited"))
        if limited:
            conds[st.SCALING_LIMITED] = (True, d.reason, d.message)
        elif capped:
            conds[st.SCALING_LIMITED] = (True, "Capped", d.message)
        else:
            conds[st.SCALING_LIMITED] = (False, d.reason, d.message)
    if d.recommendation is not None:
        stalled = d.metrics.stalled
        conds[st.STALLED] = ((True, "PartitionsStalled", "committed offset frozen with lag (more replicas would not "
                              "help): " + ", ".join(f"{t}/{p}" for t, p in stalled)) if stalled
                             else (False, "NoStall", ""))
    return conds


class Reconciler:
    def __init__(self, kube: Kube, kafka: KafkaProbe, cfg: OperatorSettings,
                 metrics: OperatorMetrics | None = None) -> None:
        self.kube, self.kafka, self.cfg = kube, kafka, cfg
        self.metrics = metrics or OperatorMetrics()
        self._locks: dict[Key, asyncio.Lock] = {}
        self._handoff_locks: dict[Key, asyncio.Lock] = {}
        self._written: dict[Key, tuple[str, dict[str, Any]]] = {}  # uid, last status written
        self._tracked: dict[Key, Tracked] = {}
        self._redis: dict[str, Any] = {}
        self.cache = Cache()

    def tracked(self, key: Key, uid: str) -> Tracked:
        tr = self._tracked.get(key)
        if tr is None or tr.uid != uid:
            tr = self._tracked[key] = Tracked(uid)
        return tr

    def forget(self, key: Key) -> None:
        """An AdaptiveConsumer was deleted: drop its memory and its metrics."""
        for store in (self._tracked, self._written, self._locks, self._handoff_locks):
            store.pop(key, None)
        self.metrics.forget(*key)

    # ------------------------------------------------------------------ the reconcile

    async def reconcile(self, body: Mapping[str, Any], *, trigger: str) -> Outcome:
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        lock = self._locks.setdefault(key, asyncio.Lock())
        started = time.monotonic()
        async with lock:
            try:
                return await self._reconcile(body, key, trigger)
            finally:
                if trigger == "poll":
                    self.metrics.poll_duration.labels(*key).observe(time.monotonic() - started)
                    self.kafka.clients.sweep()
                self.metrics.kafka_clients.set(len(self.kafka.clients))

    async def _reconcile(self, body: Mapping[str, Any], key: Key, trigger: str) -> Outcome:
        tr = self.tracked(key, body["metadata"]["uid"])
        body = tr.newest(body)
        owner = render.Owner.from_body(body)
        now = st.now_iso()
        previous = self._previous(key, body)
        done = await self._converge(owner, body, tr, now, poll=trigger == "poll", previous=previous)
        body = done.body or body
        owner = render.Owner.from_body(body)
        tr.body = {k: body[k] for k in ("apiVersion", "kind", "metadata") if k in body}
        sts = done.sts if done.sts is not None else await self._live_statefulset(owner)
        new = st.build_status(previous=previous, generation=owner.generation, desired=done.desired,
                              selector=render.selector_string(owner.name), sts=sts, problem=done.problem,
                              lag=done.lag, now=now, extra=done.extra)
        await self._write_status(body, key, owner, previous, new)
        self._post_decisions(body, trigger, done, previous, new)
        self._post_rollout(body, tr, done, previous, new)
        self._observe_metrics(key, done, new)
        changed = [f"{c.action} {c.kind}/{c.name}" for c in done.changes if c.action != "unchanged"]
        quiet = trigger in ("poll", "rollout", "pod") and not done.problem and not changed and not (
            done.decision and done.decision.scaled)
        logger.log(logging.DEBUG if quiet else logging.INFO, "reconciled", extra={
            "object": f"{owner.namespace}/{owner.name}", "trigger": trigger, "generation": owner.generation,
            "problem": done.problem.reason if done.problem else None, "changes": changed,
            "decision": done.decision.reason if done.decision else None})
        if tr.departing:
            await self.hand_off(key)
        return Outcome(done.problem, new, done.changes, done.decision)

    def _previous(self, key: Key, body: Mapping[str, Any]) -> dict[str, Any]:
        """The status the server may hold: the body's, with what we wrote last over it (at least
        as new as a body from an index or a queued event, which may not show our last write yet)."""
        previous = dict(body.get("status") or {})
        written = self._written.get(key)
        if written and written[0] == body["metadata"].get("uid"):
            previous = union(previous, written[1])
            if "rollout" in written[1]:
                # The canary is one record: a stale body's keys of an earlier canary must not mix in.
                rollout = dict(previous.get("rollout") or {})
                rollout.pop("canary", None)
                if (written[1]["rollout"] or {}).get("canary") is not None:
                    rollout["canary"] = copy.deepcopy(written[1]["rollout"]["canary"])
                previous["rollout"] = rollout
        return previous

    async def _converge(self, owner: render.Owner, body: Mapping[str, Any], tr: Tracked, now: str,
                        poll: bool, previous: Mapping[str, Any]) -> Converged:
        """Make the cluster match the spec: Secrets present, (on a poll) replicas decided,
        objects applied, the group measured. Stops at the first problem, which says what and where."""
        done = Converged(body=body)
        try:
            done.spec = spec = render.parse_spec(body.get("spec") or {})
            if tr.refused is not None and tr.refused[0] == owner.generation:
                # The apiserver refused an object this generation renders: it would again. Wait for
                # a spec change (a new generation) instead of re-applying on every poll.
                raise ProblemError(tr.refused[1])
            done.secrets = secrets = await self._read_secrets(owner.namespace, spec)  # before any pod needs them
            tr.spec, tr.secrets = spec, secrets
            snap = await self.kafka.observe(spec, secrets)
            self._record(tr, spec, snap)
            if poll:
                live = await self._live_statefulset(owner)
                await self._decide(done, tr, live, now)
                spec, owner = done.spec, render.Owner.from_body(done.body)
            done.desired = render.desired_replicas(spec)
            objs, template, held, canary = await self._render(owner, spec, previous, now)
            for obj in objs:
                change, before, live = await self._apply(owner, obj)
                done.changes.append(change)
                if obj["kind"] == "StatefulSet":
                    done.sts = live
                    self._track_departures(tr, owner.name, before, live)
            pods = await self._pods(owner)
            await self._rollout(owner, spec, tr, done, pods, template, held, canary, now)
            config = next(o["metadata"]["name"] for o in objs if o["kind"] == "ConfigMap")
            await self._collect_configs(owner, tr, done.sts, pods, config)
            done.problem = snap.problem
            degraded = ro.degraded(done.step.failures, done.step.hold) if done.step else None
            degraded = done.canary_degraded or degraded
            if done.problem is None and degraded:
                done.problem = Problem(*degraded, observed=True)
            if snap.observation is not None:
                seconds = tr.decision.metrics.lag_seconds if poll and tr.decision else None
                done.lag = lag_summary(snap.observation, spec.kafka.auto_offset_reset, now, seconds)
            elif snap.lag_error:
                done.lag = {"error": snap.lag_error, "measuredAt": now}
        except render.InvalidSpec as e:
            done.problem = Problem(st.INVALID_SPEC, str(e), retry=False)
        except ProblemError as e:
            done.problem = e.problem
        except KubeError as e:
            if e.status == 422:  # Invalid: what the CRD let through and the child's own validation did not
                done.problem = refused(owner, e)
                tr.refused = (owner.generation, done.problem)
                logger.warning("refused by the apiserver", extra={"object": f"{owner.namespace}/{owner.name}",
                                                                  "generation": owner.generation, "error": str(e)})
            else:
                done.problem = Problem(st.FORBIDDEN if e.forbidden else st.API_ERROR, str(e))
        except Exception as e:  # noqa: BLE001 - a bug must show in the status, not stop the operator
            logger.exception("reconcile failed", extra={"object": f"{owner.namespace}/{owner.name}"})
            done.problem = Problem(INTERNAL_ERROR, f"{type(e).__name__}: {e}")
        return done

    async def _render(self, owner: render.Owner, spec: AdaptiveConsumerSpec, status: Mapping[str, Any] | None,
                      now: str) -> tuple[list[dict[str, Any]], str, dict[str, Any] | None, dict[str, Any] | None]:
        """`rendered`, with the canary that applies (afc.operator.canary.current) and, when it
        rolls back, the stable revision's pod template read from its ControllerRevision."""
        objs, template, held = rendered(owner, spec, status)
        canary = ca.current(spec.rollout.canary, (status or {}).get("rollout"), template, now)
        if canary is None:
            return objs, template, held, None
        stable = await self._stable_template(owner, canary) if ca.rolls_back(canary) else None
        objs, template, held = rendered(owner, spec, status, canary, stable)
        return objs, template, held, canary

    async def _stable_template(self, owner: render.Owner, canary: Mapping[str, Any]) -> dict[str, Any] | None:
        """The pod template of the canary's stable revision (as its ControllerRevision stores it)."""
        name = canary.get("stableRevision")
        if not name:
            return None
        try:
            cr = await self.kube.get(path_for("ControllerRevision", owner.namespace, name))
        except KubeError:
            return None
        template = copy.deepcopy((((cr or {}).get("data") or {}).get("spec") or {}).get("template"))
        if not template:
            return None
        template.pop("$patch", None)
        (template.get("metadata") or {}).pop("creationTimestamp", None)
        return template

    async def _rollout(self, owner: render.Owner, spec: AdaptiveConsumerSpec, tr: Tracked, done: Converged,
                       pods: list[dict[str, Any]], template: str, held: Mapping[str, Any] | None,
                       canary: Mapping[str, Any] | None, now: str) -> None:
        """The rollout's step (afc.operator.rollout.decide) and the canary's
        (afc.operator.canary): status.rollout and Progressing, and a change of course applied at
        once: a new hold, a promotion, a rollback (the StatefulSet's partition or template)."""
        step = ro.decide(done.sts, pods, template=template, held=held,
                         deadline_s=spec.rollout.progress_deadline_seconds, now=time.time(), now_iso=now,
                         rejoin_s=spec.membership.session_timeout_ms / 1000 if spec.membership.static else None)
        canary = await self._canary(owner, spec, tr, done, pods, step, canary, now) if canary else None
        if canary is not None and canary["phase"] in (ca.CANARY, ca.ROLLING_BACK, ca.ROLLED_BACK):
            # A failing canary pod rolls the canary back; no hold (nor its partition) beside it.
            step = replace(step, hold=None, new_hold=False,
                           status={k: v for k, v in step.status.items() if k != "held"})
        if step.new_hold and step.hold is not None:
            sts = next(o for o in render.desired_objects(owner, spec, held=int(step.hold["partition"]))
                       if o["kind"] == "StatefulSet")
            done.sts = await self._write(owner, sts)
            logger.warning("rollout held", extra={"object": f"{owner.namespace}/{owner.name}",
                                                  "partition": step.hold["partition"], "pod": step.hold["pod"],
                                                  "reason": step.hold["reason"]})
        done.step = step
        tr.failing = {f.pod: f.reason for f in step.failures}
        if done.sts is not None:
            done.extra["rollout"] = clean({**step.status, "template": template, "canary": canary})
        progressing, done.canary_degraded = ca.conditions(canary)
        progressing = progressing or step.progressing
        if progressing is not None:
            done.extra.setdefault("conditions", {})[st.PROGRESSING] = progressing

    async def _canary(self, owner: render.Owner, spec: AdaptiveConsumerSpec, tr: Tracked, done: Converged,
                      pods: list[dict[str, Any]], step: ro.Step, canary: Mapping[str, Any], now: str
                      ) -> dict[str, Any]:
        """The canary's turn: follow the StatefulSet and the pods, and while it holds, sample
        the members' health records and judge them; a promotion or a rollback is applied now."""
        obs = ca.observe(canary, done.sts, pods, canary_spec=spec.rollout.canary, failures=step.failures, now_iso=now)
        cs = obs.canary
        if obs.judging and spec.rollout.canary is not None:
            samples = await self._canary_samples(owner, spec, tr, done.secrets, (cs["template"], cs["readyAt"]))
            elapsed = time.time() - (ro._epoch(cs["readyAt"]) or time.time())
            verdict = ca.judge(samples, obs.canary_pods, obs.stable_pods, ca.Gates.of(spec.rollout.canary), elapsed)
            cs = ca.decided(cs, verdict, now)
        obj = f"{owner.namespace}/{owner.name}"
        if cs["phase"] != canary.get("phase") or cs.get("gates") != canary.get("gates"):
            logger.info("canary", extra={"object": obj, "phase": cs["phase"], "revision": cs.get("revision"),
                                         "stable_revision": cs.get("stableRevision"), "pods": cs.get("pods"),
                                         "gates": cs.get("gates"), "reason": cs.get("reason")})
        if cs["phase"] != canary.get("phase") and cs["phase"] in (ca.PROMOTING, ca.ROLLING_BACK):
            stable = await self._stable_template(owner, cs) if ca.rolls_back(cs) else None
            if ca.rolls_back(cs) and stable is None:
                cs["message"] = (cs.get("message") or "") + (f"; the stable revision {cs.get('stableRevision')} is "
                                                             "not readable: holding the canary pods instead")
            objs, _, _ = rendered(owner, spec, {}, cs, stable)
            sts = next(o for o in objs if o["kind"] == "StatefulSet")
            done.sts = await self._write(owner, sts)
        return cs

    async def _canary_samples(self, owner: render.Owner, spec: AdaptiveConsumerSpec, tr: Tracked,
                              secrets: Mapping[str, str], key: tuple[Any, ...]) -> list[ca.Sample]:
        """The members' counters (by pod) since the canary's pods were ready, one sample per
        reconcile, kept in memory (an operator restart starts the window again; maxHoldSeconds
        still counts from status.rollout.canary.readyAt)."""
        from afc.runtime.backpressure import SignalKeys, read_records_async
        if tr.canary_key != key:
            tr.canary_key, tr.canary_samples = key, []
        url = secrets.get("signal_redis_url") or secrets.get("redis_url")
        if not url:
            return tr.canary_samples
        prefix = spec.backpressure.key_prefix or spec.idempotency.key_prefix
        try:
            keys = SignalKeys.for_url(url, prefix, spec.kafka.group_id)
            records = await asyncio.wait_for(read_records_async(self._redis_client(url), keys), 5)
        except Exception as e:  # noqa: BLE001 - no sample this time; no data long enough fails safe
            logger.warning("canary health unreadable", extra={"object": f"{owner.namespace}/{owner.name}",
                                                               "error": f"{type(e).__name__}: {e}"})
            return tr.canary_samples
        t = time.time()
        if not tr.canary_samples or t - tr.canary_samples[-1][0] >= 0.5:
            tr.canary_samples.append((t, ca.pods_by_member(owner.namespace, records)))
        return tr.canary_samples

    def _redis_client(self, url: str) -> Any:
        r = self._redis.get(url)
        if r is None:
            from afc.runtime.redisconn import async_client     # one Redis or a Cluster, by the URL's scheme
            r = self._redis[url] = async_client(url, socket_timeout=2, socket_connect_timeout=2, retries=2)
        return r

    async def _collect_configs(self, owner: render.Owner, tr: Tracked, sts: Mapping[str, Any] | None,
                               pods: list[dict[str, Any]], config: str) -> None:
        """Delete this AdaptiveConsumer's ConfigMaps that nothing uses any more: not the current
        render (`config`: also while a rolled-back canary keeps another template in the
        StatefulSet), not a pod, not the StatefulSet's current or update revision (from which it
        may still create pods: a pod below the partition is recreated at the current revision).
        Skipped while none of these changed since the last complete pass (no reads per poll)."""
        if sts is None:
            return
        s = sts.get("status") or {}
        if int(s.get("observedGeneration") or 0) < int((sts.get("metadata") or {}).get("generation") or 0):
            return  # the revisions are not known yet
        looked_at = (s.get("currentRevision"), s.get("updateRevision"), render.config_volume(sts["spec"]["template"]),
                     frozenset(render.config_volume(p) for p in pods), config)
        if looked_at == tr.collected:
            return
        in_use = {render.config_volume(sts["spec"]["template"]), config}
        for rev in {s.get("currentRevision"), s.get("updateRevision")} - {None, ""}:
            cr = await self.kube.get(path_for("ControllerRevision", owner.namespace, rev))
            if cr is None:
                return  # not readable now: keep everything until the next look
            in_use.add(render.config_volume(((cr.get("data") or {}).get("spec") or {}).get("template") or {}))
        in_use |= {render.config_volume(p) for p in pods}
        configs = await self.kube.list_objects("ConfigMap", owner.namespace, render.selector_labels(owner.name))
        for cm in render.unused_configs(owner, configs, {n for n in in_use if n}):
            meta = cm["metadata"]
            if await self.kube.delete("ConfigMap", owner.namespace, meta["name"], meta["uid"]):
                logger.info("config deleted", extra={"object": f"{owner.namespace}/{owner.name}",
                                                     "configmap": meta["name"], "why": "no pod or revision uses it"})
        tr.collected = looked_at

    def _record(self, tr: Tracked, spec: AdaptiveConsumerSpec, snap: Snapshot) -> None:
        tr.snapshot = snap
        key = (tr.body.get("metadata") or {}).get("namespace"), (tr.body.get("metadata") or {}).get("name")
        if snap.observation is None:
            if key[0]:
                self.metrics.poll_errors.labels(*key, "kafka" if snap.problem else "lag").inc()
            return
        obs = snap.observation
        if tr.window and obs.at <= tr.window[-1].at:
            return
        tr.window.append(obs)
        tr.window = sc.prune(tr.window, obs.at, sc.keep_seconds(policy_for(spec)))

    async def _decide(self, done: Converged, tr: Tracked, live_sts: Mapping[str, Any] | None, now: str) -> None:
        """The autoscaler's turn: decide, write spec.replicas through the scale subresource if
        the decision changes it, and prepare the scaling part of the status."""
        spec = done.spec
        assert spec is not None and done.body is not None
        policy = policy_for(spec)
        snap = tr.snapshot
        stale = None
        if snap is None or snap.observation is None:
            stale = (snap.problem.message if snap and snap.problem else snap.lag_error if snap else "not measured")
        bp_share, bp_status = await self._backpressure(spec, done.secrets)
        done.extra["backpressure"] = clean(bp_status)
        rolling = ro.in_progress(live_sts)
        t = time.time()
        ctx = sc.Context(now=t, current=spec.replicas, rolling=rolling, backpressure=bp_share, stale=stale,
                         recommendations=tuple(tr.recommendations), known_rate=tr.known_rate)
        d = sc.decide(tr.window if stale is None else [], policy, ctx)
        if d.recommendation is not None:
            tr.recommendations = sc.prune_recommendations([*tr.recommendations, (t, d.recommendation)], t, policy)
        if d.metrics.per_replica_rate:
            tr.known_rate = d.metrics.per_replica_rate
        prev = tr.decision
        if prev is None:
            # First decision since this operator started: the status says when the same decision
            # was taken (by this operator before a restart, or by the replica it took over from).
            # Keeping those times spares a status write per resource on every restart and fail-over.
            was = (done.body.get("status") or {}).get("scaling") or {}
            tr.last_scale_time = tr.last_scale_time or was.get("lastScaleTime")
            if (was.get("reason"), was.get("desiredReplicas")) == (d.reason, d.replicas):
                tr.decided_at = was.get("decidedAt") or now
            else:
                tr.decided_at = now
        elif (prev.reason, prev.replicas) != (d.reason, d.replicas):
            tr.decided_at = now
        tr.decision = done.decision = d
        key = (done.body["metadata"]["namespace"], done.body["metadata"]["name"])
        self.metrics.decisions.labels(*key, d.reason).inc()
        if spec.scaling.mode != "Off" and d.replicas != spec.replicas:
            fresh = await self.kube.scale(KIND, key[0], key[1], d.replicas, self.cfg.field_manager)
            tr.last_scale_time = now
            tr.newest(fresh)
            done.body = fresh
            done.spec = render.parse_spec(fresh.get("spec") or {})
        inputs = {**d.metrics.summary(), "backpressure": bp_share, "rolling": rolling}
        if not inputs["stalledPartitions"]:
            inputs.pop("stalledPartitions")
        done.extra["scaling"] = clean({
            "mode": spec.scaling.mode,
            "replicasOwner": "external" if spec.scaling.mode == "Off" else "afc-operator",
            "desiredReplicas": d.replicas, "recommendation": d.recommendation, "reason": d.reason,
            "message": d.message[:4096], "decidedAt": tr.decided_at, "lastScaleTime": tr.last_scale_time,
            "inputs": inputs})
        done.extra["conditions"] = scaling_conditions(spec.scaling.mode, d)

    async def _backpressure(self, spec: AdaptiveConsumerSpec, secrets: Mapping[str, str]
                            ) -> tuple[float | None, dict[str, Any]]:
        """The group's backpressure level, as the consumers publish it (afc.runtime.backpressure)."""
        from afc.runtime.backpressure import SignalKeys, read_group_async
        url = secrets.get("signal_redis_url") or secrets.get("redis_url")
        if not spec.backpressure.enabled or not url:
            why = "disabled" if not spec.backpressure.enabled else "no Redis (idempotency.redisUrlSecretRef) to read"
            return None, {"level": "Unknown", "error": f"no backpressure signal: {why}"}
        prefix = spec.backpressure.key_prefix or spec.idempotency.key_prefix
        try:
            r = self._redis_client(url)
            sig = await asyncio.wait_for(read_group_async(r, SignalKeys.for_url(url, prefix, spec.kafka.group_id)), 5)
        except Exception as e:  # noqa: BLE001 - an unreadable signal is Unknown, never a reason to stop
            return None, {"level": "Unknown", "error": f"backpressure signal unreadable: {type(e).__name__}: {e}"}
        engaged = sig.members > 0 and sig.level >= spec.scaling.backpressure_blocks_at
        return sig.level, {"level": "Engaged" if engaged else "Clear", "share": round(sig.level, 3),
                           "members": sig.members}

    def _track_departures(self, tr: Tracked, name: str, before: Mapping[str, Any] | None,
                          after: Mapping[str, Any]) -> None:
        """Which pods a change of the StatefulSet's replicas removes (their members are
        removed from the group once the pods are gone), and which come back."""
        new = int((after.get("spec") or {}).get("replicas") or 0)
        for pod in [p for p in tr.departing if int(p.rsplit("-", 1)[1]) < new]:
            tr.departing.pop(pod)  # scaled up again before it left: it stays a member
        if before is None:
            return
        old = int((before.get("spec") or {}).get("replicas") or 0)
        if tr.spec is not None and not tr.spec.scaling.leave_group_on_scale_down:
            return
        for pod in departed_pods(name, old, new):
            tr.departing.setdefault(pod, time.monotonic())

    async def hand_off(self, key: Key) -> None:
        """Remove departed static members whose pods are gone (they drained and committed on
        SIGTERM and sent no LeaveGroup): LeaveGroup v3+ by group.instance.id, so the group
        rebalances now instead of after session.timeout.ms."""
        tr = self._tracked.get(key)
        if tr is None or not tr.departing or tr.spec is None:
            return
        lock = self._handoff_locks.setdefault(key, asyncio.Lock())
        async with lock:
            gone = []
            for pod_name in list(tr.departing):
                try:
                    pod = await self.kube.get(path_for("Pod", key[0], pod_name))
                except KubeError as e:
                    logger.warning("pod not readable; hand-off waits", extra={"object": f"{key[0]}/{key[1]}",
                                                                              "pod": pod_name, "error": str(e)})
                    return
                if pod is None:
                    gone.append(pod_name)
            if not gone:
                return
            ids = [render.instance_id(key[0], p) for p in gone]  # what the pods joined as (render.instance_id_env)
            if await self._remove_members(key, tr, ids, "departed static members"):
                for pod_name in gone:
                    tr.departing.pop(pod_name, None)

    async def _remove_members(self, key: Key, tr: Tracked, ids: list[str], what: str) -> bool:
        """LeaveGroup by group.instance.id for members whose pods stopped; an Event either way.
        False when the request failed (the session timeout remains the fallback)."""
        assert tr.spec is not None
        try:
            result = await self.kafka.remove_members(tr.spec, tr.secrets, ids)
        except Exception as e:  # noqa: BLE001 - retried on the next poll; the session timeout is the fallback
            self.metrics.poll_errors.labels(*key, "leave-group").inc()
            if tr.body:
                post_event(tr.body, "Warning", "MemberRemovalFailed",
                           f"could not remove {', '.join(ids)} from group {tr.spec.kafka.group_id}: "
                           f"{type(e).__name__}: {e}; their partitions move after the session timeout")
            return False
        removed = [i for i, err in result.items() if err == "NoError"]
        self.metrics.members_removed.labels(*key).inc(len(removed))
        if tr.body:
            post_event(tr.body, "Normal", "MembersRemoved",
                       f"removed {what} from group {tr.spec.kafka.group_id} after their pods stopped: "
                       + ", ".join(f"{i} ({err})" for i, err in sorted(result.items())))
        return True

    async def _live_statefulset(self, owner: render.Owner) -> dict[str, Any] | None:
        """Ours, as it stands (as the watch stream last showed it)."""
        try:
            sts = await self._read("StatefulSet", owner.namespace, owner.name)
        except KubeError:
            return None
        ctl = controller_of(sts) if sts else None
        return sts if ctl and ctl.get("uid") == owner.uid else None

    async def _read_secrets(self, namespace: str, spec: AdaptiveConsumerSpec) -> dict[str, str]:
        """Check every referenced Secret key exists; return the values the operator itself uses
        (the broker connection; the Redis of the backpressure signal). Kept in memory only."""
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
            values[purpose] = base64.b64decode(data[ref.key]).decode()
        return values

    async def _read(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """From the cache; from the apiserver when the cache does not have it."""
        cached = self.cache.get(kind, namespace, name)
        if cached is not MISS:
            return cached
        return await self.kube.get(path_for(kind, namespace, name))

    async def _pods(self, owner: render.Owner) -> list[dict[str, Any]]:
        pods = self.cache.pods(owner.namespace, owner.name)
        if pods is None:
            pods = await self.kube.list_objects("Pod", owner.namespace, render.selector_labels(owner.name))
        return pods

    async def _write(self, owner: render.Owner, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply, the object stamped with what was applied (see `_apply`)."""
        return await self.kube.apply(stamped(obj), self.cfg.field_manager)

    async def _apply(self, owner: render.Owner, obj: dict[str, Any]
                     ) -> tuple[Change, dict[str, Any] | None, dict[str, Any]]:
        """Apply `obj` unless nothing would change: the live object carries the digest of this
        very object in its APPLIED annotation (so no field applied then is missing from `obj`:
        nothing to remove) and has every value of it (nothing to add or take back). The live
        object comes from the watch cache; the apiserver is read only when the cache lacks it
        or shows a difference (the cache may be a write behind). Children written by an
        operator without the stamp are applied once (no Event for that: nothing differed)."""
        meta = obj["metadata"]
        live = self.cache.get(obj["kind"], meta["namespace"], meta["name"])
        if live is MISS or render.object_drift(obj, live):
            live = await self.kube.get(path_for(obj["kind"], meta["namespace"], meta["name"]))
        if live is not None:
            ctl = controller_of(live)
            if not ctl or ctl.get("uid") != owner.uid:
                raise ProblemError(Problem(OWNERSHIP_CONFLICT,
                                           f"{obj['kind']} {meta['namespace']}/{meta['name']} exists and is not "
                                           f"controlled by this AdaptiveConsumer; rename or delete it"))
        paths = render.object_drift(obj, live)
        stamp = (((live or {}).get("metadata") or {}).get("annotations") or {}).get(APPLIED)
        if live is not None and not paths and stamp == digest(obj):
            return Change(obj["kind"], meta["name"], "unchanged"), live, live
        logger.debug("applying", extra={"object": f"{owner.namespace}/{owner.name}", "child": f"{obj['kind']}/{meta['name']}",
                                        "why": "missing" if live is None else "drift" if paths else
                                        f"applied {stamp}, rendered {digest(obj)}"})
        after = await self._write(owner, obj)
        action = ("created" if live is None else "unchanged" if stamp is None and not paths
                  else "updated" if applied_change(live, after, paths) else "unchanged")
        return Change(obj["kind"], meta["name"], action, paths if action == "updated" else []), live, after

    async def _write_status(self, body: Mapping[str, Any], key: Key, owner: render.Owner,
                            previous: Mapping[str, Any], new: dict[str, Any]) -> None:
        """A merge patch from what the server may hold (the body's status and what we wrote
        last) to `new`: removed keys become null; nothing is written when nothing changed."""
        written = self._written.get(key)
        if written and written[0] == owner.uid and written[1] == new:
            return
        patch = st.merge_patch(previous, new)
        if not patch:
            return
        try:
            await self.kube.patch_status(KIND, owner.namespace, owner.name, patch, self.cfg.field_manager)
            self._written[key] = (owner.uid, copy.deepcopy(new))
        except KubeError as e:
            if e.not_found:  # deleted meanwhile
                return
            logger.error("status not written", extra={"object": f"{owner.namespace}/{owner.name}",
                                                      "error": str(e)})

    def _observe_metrics(self, key: Key, done: Converged, new: Mapping[str, Any]) -> None:
        m = self.metrics
        m.desired.labels(*key).set(done.desired)
        m.replicas.labels(*key).set(new.get("replicas") or 0)
        m.ready.labels(*key).set(new.get("readyReplicas") or 0)
        lag = new.get("lag") or {}
        if "total" in lag:
            m.lag.labels(*key).set(lag["total"])
        if done.decision is not None and done.decision.metrics.lag_seconds is not None:
            m.lag_seconds.labels(*key).set(done.decision.metrics.lag_seconds)
        bp = (new.get("backpressure") or {}).get("share")
        if bp is not None:
            m.backpressure.labels(*key).set(bp)
        if done.problem and done.problem.reason in (st.FORBIDDEN, st.API_ERROR):
            m.poll_errors.labels(*key, "api").inc()
        elif done.problem and done.problem.reason == INTERNAL_ERROR:
            m.poll_errors.labels(*key, "internal").inc()
        if (new.get("backpressure") or {}).get("error") and done.extra.get("backpressure"):
            if "unreadable" in new["backpressure"]["error"]:
                m.poll_errors.labels(*key, "backpressure").inc()

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
        self._post_scaling(body, done, previous)
        before = st.condition(previous, st.DEGRADED) or {}
        after = st.condition(new, st.DEGRADED) or {}
        if problem and (before.get("status") != "True" or before.get("reason") != problem.reason
                        or before.get("message") != problem.message):
            retry = ("" if problem.observed else "; retrying with backoff" if problem.retry
                     else "; waiting for a spec change")
            post_event(body, "Warning", problem.reason, problem.message + retry)
        elif not problem and before.get("status") == "True" and after.get("status") == "False":
            post_event(body, "Normal", "Recovered", f"no longer degraded (was {before.get('reason')})")
        ready_before = (st.condition(previous, st.READY) or {}).get("status")
        ready_after = st.condition(new, st.READY) or {}
        if ready_after.get("status") == "True" and ready_before != "True":
            post_event(body, "Normal", "Ready", ready_after.get("message", ""))

    def _post_rollout(self, body: Mapping[str, Any], tr: Tracked, done: Converged, previous: Mapping[str, Any],
                      new: Mapping[str, Any]) -> None:
        """The rollout's Events: it started (RollingUpdate, with the pod being rolled), it was
        held (RolloutHeld, a Warning), it completed (RolloutComplete: every pod on one revision
        and ready, also after a rollback)."""
        before = (st.condition(previous, st.PROGRESSING) or {}).get("reason")
        after = st.condition(new, st.PROGRESSING) or {}
        tr.rolled = tr.rolled or bool(done.step and done.step.rolling)
        was = (previous.get("rollout") or {}).get("canary") or {}
        cs = (new.get("rollout") or {}).get("canary") or {}
        if cs and (cs.get("template"), cs.get("phase")) != (was.get("template"), was.get("phase")):
            if cs["phase"] == ca.CANARY and was.get("template") != cs.get("template"):
                post_event(body, "Normal", ca.CANARY_STARTED, f"canary for pod template {cs['template']}: "
                           f"{', '.join(cs.get('pods') or []) or 'the highest ordinals'} first, the other pods keep "
                           "their revision until the gates pass")
            elif cs["phase"] == ca.PROMOTING:
                post_event(body, "Normal", ca.CANARY_PROMOTED, f"revision {cs.get('revision')}: {cs.get('message', '')}")
            elif cs["phase"] == ca.ROLLED_BACK:
                post_event(body, "Normal", ca.ROLLED_BACK_REASON, f"canary {', '.join(cs.get('pods') or [])} back on "
                           f"revision {cs.get('stableRevision')}; the stable members were not restarted")
            # RollingBack: the Degraded Warning (CanaryFailed) says it, with the gate
        if done.step is not None and done.step.new_hold and done.step.hold is not None:
            post_event(body, "Warning", ro.ROLLOUT_HELD, done.step.hold["message"])
        elif after.get("reason") == ro.ROLLING_UPDATE and before != ro.ROLLING_UPDATE:
            post_event(body, "Normal", ro.ROLLING_UPDATE, after.get("message", ""))
        elif after.get("reason") == "RolloutComplete" and tr.rolled:
            tr.rolled = False
            revision = (new.get("rollout") or {}).get("currentRevision")
            post_event(body, "Normal", "RolloutComplete", f"revision {revision}: {after.get('message', '')}")

    def _post_scaling(self, body: Mapping[str, Any], done: Converged, previous: Mapping[str, Any]) -> None:
        """The autoscaler's Events: each change of replicas with its inputs, and the start of
        each hold (backpressure, stall, stale data, rollout)."""
        d = done.decision
        if d is None or done.spec is None or done.spec.scaling.mode == "Off":
            return
        inputs = ", ".join(f"{k}={v}" for k, v in d.metrics.summary().items() if v not in (None, [], ()))
        was = (previous.get("scaling") or {}).get("reason")
        if d.scaled:
            post_event(body, "Normal", d.reason, f"{d.message} [{inputs}]")
        elif d.reason in HOLDS and d.reason != was:
            post_event(body, "Warning" if d.reason == sc.STALE_DATA else "Normal", d.reason, f"{d.message} [{inputs}]")

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
        try:
            spec = render.parse_spec(owner_body.get("spec") or {})
        except render.InvalidSpec:
            return
        owner = render.Owner.from_body(owner_body)
        # The status as we last wrote it: the index may not show it yet (a hold's partition,
        # written just before its status, would look like drift).
        previous = self._previous(key, owner_body)
        objs, _, _, _ = await self._render(owner, spec, previous, st.now_iso())
        desired = next((o for o in objs if o["kind"] == body.get("kind") and o["metadata"]["name"] == meta["name"]),
                       None)
        if desired is None:
            return  # not ours to render (a config of an older revision, collected by the reconcile)
        if event.get("type") == "DELETED":
            reason = "deleted"
        else:
            paths = render.object_drift(desired, body)
            if paths:
                reason = "drift"
                logger.info("child drifted", extra={"object": f"{key[0]}/{key[1]}", "paths": paths[:20],
                                                    "child": f"{body.get('kind')}/{meta['name']}"})
            elif body.get("kind") == "StatefulSet" and status_stale(previous, body,
                                                                    render.desired_replicas(spec)):
                reason = "rollout"
        if reason:
            logger.debug("child event", extra={"object": f"{key[0]}/{key[1]}", "reason": reason,
                                               "child": f"{body.get('kind')}/{meta['name']}"})
            await self.reconcile(owner_body, trigger=reason)

    async def on_pod_changed(self, namespace: str, pod: Mapping[str, Any],
                             consumers: kopf.Index[Key, dict[str, Any]]) -> None:
        """A consumer pod's state changed: if it starts or stops failing (as the kubelet reports
        it), reconcile its AdaptiveConsumer now rather than at the next poll."""
        meta = pod.get("metadata") or {}
        name = (meta.get("labels") or {}).get(render.L_INSTANCE)
        tr = self._tracked.get((namespace, name)) if name else None
        if tr is None or tr.spec is None:
            return
        failure = ro.pod_failure(pod, time.time(), tr.spec.rollout.progress_deadline_seconds)
        if (failure.reason if failure else None) == tr.failing.get(meta.get("name", "")):
            return
        owner_body = next((b for b in consumers.get((namespace, name), []) if b["metadata"].get("uid") == tr.uid), None)
        if owner_body is not None and not owner_body["metadata"].get("deletionTimestamp"):
            await self.reconcile(owner_body, trigger="pod")

    async def on_pod_deleted(self, namespace: str, pod: Mapping[str, Any]) -> None:
        """A consumer pod is gone: if a scale-down removed it, hand its partitions over now. If it
        had joined under another group.instance.id than its successor will (a pod of an older
        render: the bare pod name before ids were `<namespace>.<pod>`), remove that id, which no
        pod will use again; otherwise the restarted pod keeps its id and nothing is removed."""
        name = ((pod.get("metadata") or {}).get("labels") or {}).get(render.L_INSTANCE)
        pod_name = (pod.get("metadata") or {}).get("name")
        key = (namespace, name or "")
        tr = self._tracked.get(key) if name else None
        if tr is None or tr.spec is None or not pod_name:
            return
        if pod_name in tr.departing:
            await self.hand_off(key)
            return
        old = render.pod_instance_id(pod)
        if tr.spec.membership.static and old and old != render.instance_id(namespace, pod_name):
            await self._remove_members(key, tr, [old], f"the member {pod_name} ran as before its restart")

    async def poll_forever(self, body: Mapping[str, Any], stopped: Any) -> None:
        """The per-resource poll (run by kopf's daemon): reconcile with a fresh measurement and
        a scaling decision every `spec.scaling.pollIntervalS`."""
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        try:
            while not stopped:
                current = snapshot(body)  # the daemon's body is a live view: take it as it is now
                if current["metadata"].get("deletionTimestamp"):
                    break
                interval = float(((current.get("spec") or {}).get("scaling") or {}).get("pollIntervalS") or 30)
                try:
                    await self.reconcile(current, trigger="poll")
                except Exception:  # noqa: BLE001 - the poll outlives any one pass
                    self.metrics.poll_errors.labels(*key, "internal").inc()
                    logger.exception("poll failed", extra={"object": f"{key[0]}/{key[1]}"})
                await stopped.wait(interval)
        finally:
            if stopped.reason is not None and stopped.reason & kopf.DaemonStoppingReason.RESOURCE_DELETED:
                self.forget(key)

    async def close(self) -> None:
        for r in self._redis.values():
            try:
                await r.aclose()
            except Exception:  # noqa: BLE001
                pass
        self._redis.clear()


# ---------------------------------------------------------------------- kopf wiring

def configure_kopf(settings: kopf.OperatorSettings, cfg: OperatorSettings) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=PREFIX)
    settings.persistence.finalizer = f"{PREFIX}/finalizer"  # unused: no handler needs one
    settings.posting.reporting_component = "afc-operator"
    settings.posting.event_name_prefix = "afc-operator-"
    settings.posting.level = logging.INFO
    # kopf would also post each of its log lines about an object ("Handler ... succeeded",
    # "... failed temporarily") as a "Logging" Event: one per handler run, on top of the
    # operator's own Events (kopf.event, which stays on). The log lines remain in the log.
    settings.posting.loggers = False
    # Peering (cli: --peering): a replica lets one with a higher priority work and takes over
    # once that one's keep-alive is `lifetime` seconds old (docs/operator.md, "HA").
    settings.peering.lifetime = cfg.peering_lifetime_s
    settings.scanning.disabled = True  # no cluster-wide list/watch of CRDs and namespaces needed
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    settings.networking.request_timeout = cfg.api_timeout_s
    settings.networking.connect_timeout = 10


def select_own_objects(settings: kopf.OperatorSettings) -> None:
    """Server-side label selectors on the watches (and their initial lists) of the children and
    pods: kopf 1.45 turns a handler's `labels=` into a client-side filter only; its
    `settings.watching.label_selectors` become the `labelSelector` of the request."""
    for group, version, plural in (*CHILDREN, ("", "v1", "pods")):
        settings.watching.label_selectors[group, version, plural] = OWN_OBJECTS


def register_pod_index(registry: kopf.OperatorRegistry) -> None:
    """The consumer pods by (namespace, AdaptiveConsumer)."""
    @kopf.index("", "v1", "pods", registry=registry, id=Cache.PODS, labels={render.L_MANAGED_BY: render.MANAGED_BY})
    def cache_pods(body: kopf.Body, namespace: str, labels: kopf.Labels, **_: Any) -> dict[Key, dict[str, Any]] | None:
        instance = labels.get(render.L_INSTANCE)
        return {(namespace, instance): slim(body)} if instance else None


def watchable(kube: Kube, cfg: OperatorSettings) -> set[str]:
    """The plurals among the children and pods that the operator may list and watch where it
    serves. kopf runs no handler until every index is filled, so an index over a kind the
    Role does not grant (a cut-down Role) would stall every AdaptiveConsumer; without its index
    a kind is read by GET, whose 403 makes that resource Degraded/Forbidden and nothing else.
    When the review itself fails, every kind is taken as watchable (as before it existed)."""
    kinds = [*CHILDREN, ("", "v1", "pods")]
    where = [None] if cfg.all_namespaces or not cfg.namespaces else list(cfg.namespaces)
    out = set()
    for group, _, plural in kinds:
        try:
            ok = all(kube.can(verb, group, plural, ns) for verb in ("list", "watch") for ns in where)
        except Exception as e:  # noqa: BLE001 - no answer: keep the cache, as before the review existed
            logger.warning("access review failed", extra={"resource": plural, "error": str(e)})
            ok = True
        if ok:
            out.add(plural)
        else:
            logger.warning("no list/watch right: read by GET, without a cache",
                           extra={"resource": plural, "namespaces": where})
    return out


def register(registry: kopf.OperatorRegistry, reconciler: Reconciler, cfg: OperatorSettings,
             cached: set[str] | None = None) -> None:
    """Every handler of the operator, on the given registry. `cached`: the plurals to keep an
    index of (`watchable`); None: all of them."""
    on_resource = dict(group=GROUP, version=VERSION, plural=PLURAL, registry=registry)
    cached = {p for _, _, p in (*CHILDREN, ("", "v1", "pods"))} if cached is None else cached

    @kopf.on.login(registry=registry, id="login")
    def login(**kwargs: Any) -> Any:
        return kopf.login_via_client(**kwargs)

    @kopf.index(**on_resource, id="consumers")
    def consumers(body: kopf.Body, namespace: str, name: str, **_: Any) -> dict[Key, dict[str, Any]]:
        return {(namespace, name): slim(body)}

    for group, version, plural in [c for c in CHILDREN if c[2] in cached]:  # Cache.INDEXES names them by plural
        @kopf.index(group=group, version=version, plural=plural, registry=registry, id=f"cache-{plural}",
                    labels={render.L_MANAGED_BY: render.MANAGED_BY})
        def cache_child(body: kopf.Body, namespace: str, name: str, **_: Any) -> dict[Key, dict[str, Any]]:
            return {(namespace, name): slim(body)}

    if "pods" in cached:
        register_pod_index(registry)

    @kopf.on.startup(registry=registry, id="startup")
    async def startup(settings: kopf.OperatorSettings, **kwargs: Any) -> None:
        configure_kopf(settings, cfg)
        reconciler.cache.attach(kwargs)
        if cfg.peering:
            for ns in ([None] if cfg.all_namespaces else cfg.namespaces):
                try:
                    await reconciler.kube.ensure_peering(cfg.peering, ns)
                except KubeError as e:  # e.g. no create right: an installer made it, or kopf waits for it
                    logger.warning("peering object not created", extra={"peering": cfg.peering, "namespace": ns,
                                                                         "error": str(e)})
        found = await reconciler.kube.discover(API_VERSION)
        if not found or not any(r.get("name") == PLURAL for r in found.get("resources", [])):
            raise kopf.TemporaryError(f"{PLURAL}.{GROUP}/{VERSION} is not served: "
                                      "install the CRD (kubectl apply -f crds/)", delay=5)
        logger.info("operator started", extra={"namespaces": cfg.namespaces or "*",
                                               "field_manager": cfg.field_manager})

    @kopf.on.cleanup(registry=registry, id="cleanup")
    async def cleanup(**_: Any) -> None:
        await reconciler.close()
        reconciler.kafka.close()
        reconciler.kube.close()

    async def changed(body: kopf.Body, retry: int, trigger: str) -> None:
        outcome = await reconciler.reconcile(snapshot(body), trigger=trigger)
        p = outcome.problem
        if p is None or p.observed:  # a failing pod is followed by pod events and the poll, not retried here
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

    @kopf.daemon(**on_resource, id="poll", cancellation_timeout=10)
    async def poll(body: kopf.Body, stopped: kopf.DaemonStopped, **_: Any) -> None:
        await reconciler.poll_forever(body, stopped)

    @kopf.on.startup(registry=registry, id="select-own-objects")  # before any watch starts
    async def watch_own_objects(settings: kopf.OperatorSettings, **_: Any) -> None:
        select_own_objects(settings)

    for group, version, plural in CHILDREN:
        @kopf.on.event(group=group, version=version, plural=plural, registry=registry, id=f"child-{plural}",
                       labels={render.L_MANAGED_BY: render.MANAGED_BY})
        async def on_child(event: kopf.RawEvent, body: kopf.Body,
                           consumers: kopf.Index[Key, dict[str, Any]], **_: Any) -> None:
            await reconciler.on_child_event(event, snapshot(body), consumers)

    @kopf.on.event("", "v1", "pods", registry=registry, id="pods", labels={render.L_MANAGED_BY: render.MANAGED_BY})
    async def on_pod(event: kopf.RawEvent, body: kopf.Body, namespace: str,
                     consumers: kopf.Index[Key, dict[str, Any]], **_: Any) -> None:
        if event.get("type") == "DELETED":
            await reconciler.on_pod_deleted(namespace, snapshot(body))
        elif event.get("type") in ("ADDED", "MODIFIED"):
            await reconciler.on_pod_changed(namespace, snapshot(body), consumers)

    @kopf.on.probe(registry=registry, id="adaptiveconsumers")
    def served(consumers: kopf.Index[Key, dict[str, Any]], **_: Any) -> int:
        return len(consumers)
