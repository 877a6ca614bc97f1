"""Pure functions for the AdaptiveConsumer's status: conditions, rollout, retry backoff.

Conditions (the Kubernetes convention: type, status, reason, message, lastTransitionTime,
observedGeneration):
- Ready: the group is consuming: nothing is wrong and at least one replica is ready (or it
  is scaled to zero on purpose). A scale or a rollout does not make it flap; as a
  Deployment's Progressing does, Progressing carries those.
- Progressing: the StatefulSet has not caught up with the spec yet (rollout or scaling).
- Degraded: something stops the operator or the consumers; the reason says what.
- ScalingActive: the autoscaler decides on fresh data (False: mode Off, or stale/no data).
- ScalingLimited: the last decision was held or limited (backpressure, rollout, stalls,
  stabilization, bounds); the reason says which.
- Stalled: partitions whose committed offset is frozen while they have lag (named).

The status is written as a JSON merge patch computed by `merge_patch(current, new)`: keys the
new status no longer has are removed (null), and an unchanged status is not written at all.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping

READY, PROGRESSING, DEGRADED = "Ready", "Progressing", "Degraded"
SCALING_ACTIVE, SCALING_LIMITED, STALLED = "ScalingActive", "ScalingLimited", "Stalled"


@dataclass(frozen=True)
class Problem:
    """Why the AdaptiveConsumer is Degraded. `retry`: whether trying again may help without
    a change of the spec (a missing Secret may appear; an invalid spec will not fix itself).
    `observed`: seen on the consumers (a failing pod, a held rollout) after a reconcile that
    did its job: reported, and followed by pod events and the poll, not retried by the handler."""
    reason: str
    message: str
    retry: bool = True
    observed: bool = False


# Reasons (CamelCase, as Kubernetes condition reasons are).
INVALID_SPEC = "InvalidSpec"
SECRET_NOT_FOUND = "SecretNotFound"
SECRET_KEY_NOT_FOUND = "SecretKeyNotFound"
BROKER_UNREACHABLE = "BrokerUnreachable"
TOPIC_NOT_FOUND = "TopicNotFound"
FORBIDDEN = "Forbidden"
API_ERROR = "ApiError"


@dataclass(frozen=True)
class Rollout:
    progressing: bool
    reason: str
    message: str
    replicas: int = 0
    ready: int = 0
    updated: int = 0


def now_iso(now: datetime | None = None) -> str:
    return (now or datetime.now(timezone.utc)).strftime("%Y-%m-%dT%H:%M:%SZ")


def rollout(sts: Mapping[str, Any] | None, desired: int) -> Rollout:
    """Where the StatefulSet stands against `desired` replicas of the current template."""
    if sts is None:
        return Rollout(False, "NotCreated", "the StatefulSet does not exist")
    st = sts.get("status") or {}
    replicas, ready = int(st.get("replicas") or 0), int(st.get("readyReplicas") or 0)
    updated = int(st.get("updatedReplicas") or 0)
    counts = dict(replicas=replicas, ready=ready, updated=updated)
    generation = int((sts.get("metadata") or {}).get("generation") or 0)
    if int(st.get("observedGeneration") or 0) < generation:
        return Rollout(True, "RollingUpdate", f"StatefulSet generation {generation} not yet observed", **counts)
    stale_revision = bool(st.get("updateRevision")) and st.get("currentRevision") != st.get("updateRevision")
    if desired > 0 and (stale_revision or updated < min(replicas, desired)):
        return Rollout(True, "RollingUpdate", f"{updated}/{desired} replicas updated", **counts)
    if replicas > desired:
        return Rollout(True, "ScalingDown", f"{replicas} replicas, {desired} desired", **counts)
    if replicas < desired:
        return Rollout(True, "ScalingUp", f"{replicas} replicas, {desired} desired", **counts)
    if ready < desired:
        return Rollout(True, "WaitingForReady", f"{ready}/{desired} replicas ready", **counts)
    return Rollout(False, "RolloutComplete", f"{ready}/{desired} replicas ready", **counts)


def set_condition(conditions: list[Mapping[str, Any]], type_: str, status: bool, reason: str, message: str,
                  generation: int, now: str) -> list[dict[str, Any]]:
    """Replace one condition; lastTransitionTime moves only when the status flips."""
    value = "True" if status else "False"
    out, found = [], False
    for c in conditions:
        if c.get("type") != type_:
            out.append(dict(c))
            continue
        found = True
        since = c.get("lastTransitionTime") if c.get("status") == value and c.get("lastTransitionTime") else now
        out.append({"type": type_, "status": value, "reason": reason, "message": message,
                    "lastTransitionTime": since, "observedGeneration": generation})
    if not found:
        out.append({"type": type_, "status": value, "reason": reason, "message": message,
                    "lastTransitionTime": now, "observedGeneration": generation})
    return out


ORDER = {READY: 0, PROGRESSING: 1, DEGRADED: 2, SCALING_ACTIVE: 3, SCALING_LIMITED: 4, STALLED: 5}


def ordered(conds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(conds, key=lambda c: (ORDER.get(c["type"], 9), c["type"]))


def ready_condition(problem: Problem | None, ro: Rollout, desired: int) -> tuple[bool, str, str]:
    """Ready = consuming. Not every desired replica: a scale-up would make it flap."""
    if problem:
        return False, problem.reason, problem.message
    if ro.reason == "NotCreated":
        return False, ro.reason, ro.message
    if desired == 0:
        return True, "ScaledToZero", "no replica wanted: nothing to consume"
    if ro.ready >= 1:
        return True, "Available", f"{ro.ready}/{desired} replicas ready"
    return False, "NoReadyReplica", f"0/{desired} replicas ready"


def conditions_for(previous: list[Mapping[str, Any]], *, problem: Problem | None, ro: Rollout,
                   generation: int, now: str, desired: int = 1) -> list[dict[str, Any]]:
    conds = [dict(c) for c in previous]
    if problem:
        conds = set_condition(conds, DEGRADED, True, problem.reason, problem.message, generation, now)
    else:
        conds = set_condition(conds, DEGRADED, False, "AsExpected", "", generation, now)
    conds = set_condition(conds, PROGRESSING, ro.progressing, ro.reason, ro.message, generation, now)
    conds = set_condition(conds, READY, *ready_condition(problem, ro, desired), generation, now)
    return ordered(conds)


def build_status(*, previous: Mapping[str, Any] | None, generation: int, desired: int, selector: str,
                 sts: Mapping[str, Any] | None, problem: Problem | None, lag: Mapping[str, Any] | None,
                 now: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The whole status the operator writes, from what it observed in one reconcile. `extra`
    (from the poll): `backpressure` and `scaling` sections, and `conditions` as
    {type: (status, reason, message)}; without it the previous ones are kept."""
    extra = extra or {}
    previous = previous or {}
    ro = rollout(sts, desired)
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "replicas": ro.replicas,
        "readyReplicas": ro.ready,
        "updatedReplicas": ro.updated,
        "desiredReplicas": desired,
        "selector": selector,
        "conditions": conditions_for(previous.get("conditions") or [], problem=problem, ro=ro,
                                     generation=generation, now=now, desired=desired),
    }
    if lag is not None:
        old = previous.get("lag") or {}
        same = {k: v for k, v in old.items() if k != "measuredAt"} == {k: v for k, v in lag.items()
                                                                       if k != "measuredAt"}
        # A lag that did not change keeps its timestamp: no status write every poll for nothing.
        status["lag"] = dict(old) if same and old else dict(lag)
    elif previous.get("lag"):
        status["lag"] = dict(previous["lag"])
    for key in ("backpressure", "scaling", "rollout"):  # when not observed this time, the previous ones are kept
        value = extra.get(key, previous.get(key))
        if value is not None:
            status[key] = value
    conds = status["conditions"]
    for type_, value in (extra.get("conditions") or {}).items():
        conds = set_condition(conds, type_, *value, generation, now)
    status["conditions"] = ordered(conds)
    return status


def merge_patch(current: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) turning `current` into `new`: changed keys, removed ones
    as null, nested objects recursed into, lists replaced whole. Empty when they are equal."""
    current = current or {}
    patch: dict[str, Any] = {}
    for k in current:
        if k not in new:
            patch[k] = None
    for k, v in new.items():
        old = current.get(k)
        if isinstance(v, Mapping) and isinstance(old, Mapping):
            sub = merge_patch(old, v)
            if sub:
                patch[k] = sub
        elif k not in current or old != v:
            patch[k] = v
    return patch


def condition(status: Mapping[str, Any] | None, type_: str) -> Mapping[str, Any] | None:
    for c in (status or {}).get("conditions") or []:
        if c.get("type") == type_:
            return c
    return None


def backoff(retry: int, base: float = 1.0, cap: float = 120.0) -> float:
    """Delay before retry number `retry` (0-based): base * 2**retry, capped."""
    return float(min(cap, base * (2 ** min(retry, 30))))
