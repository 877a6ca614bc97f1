"""Pure functions for the AdaptiveConsumer's status: conditions, rollout, retry backoff.

Conditions (the Kubernetes convention: type, status, reason, message, lastTransitionTime,
observedGeneration):
- Ready: the consumers run as specified: nothing is wrong and every desired replica is ready.
- Progressing: the StatefulSet has not caught up with the spec yet (rollout or scaling).
- Degraded: something stops the operator or the consumers; the reason says what.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping

READY, PROGRESSING, DEGRADED = "Ready", "Progressing", "Degraded"


@dataclass(frozen=True)
class Problem:
    """Why the AdaptiveConsumer is Degraded. `retry`: whether trying again may help without
    a change of the spec (a missing Secret may appear; an invalid spec will not fix itself)."""
    reason: str
    message: str
    retry: bool = True


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
        return Rollout(True, "RollingOut", f"StatefulSet generation {generation} not yet observed", **counts)
    stale_revision = bool(st.get("updateRevision")) and st.get("currentRevision") != st.get("updateRevision")
    if desired > 0 and (stale_revision or updated < desired):
        return Rollout(True, "RollingOut", f"{updated}/{desired} replicas updated", **counts)
    if replicas > desired:
        return Rollout(True, "ScalingDown", f"{replicas} replicas, {desired} desired", **counts)
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


def conditions_for(previous: list[Mapping[str, Any]], *, problem: Problem | None, ro: Rollout,
                   generation: int, now: str) -> list[dict[str, Any]]:
    conds = [dict(c) for c in previous]
    if problem:
        conds = set_condition(conds, DEGRADED, True, problem.reason, problem.message, generation, now)
    else:
        conds = set_condition(conds, DEGRADED, False, "AsExpected", "", generation, now)
    conds = set_condition(conds, PROGRESSING, ro.progressing, ro.reason, ro.message, generation, now)
    if problem:
        ready = (False, problem.reason, problem.message)
    elif ro.progressing or ro.reason == "NotCreated":
        ready = (False, ro.reason, ro.message)
    else:
        ready = (True, "Available", ro.message)
    conds = set_condition(conds, READY, *ready, generation, now)
    order = {READY: 0, PROGRESSING: 1, DEGRADED: 2}
    return sorted(conds, key=lambda c: (order.get(c["type"], 9), c["type"]))


def build_status(*, previous: Mapping[str, Any] | None, generation: int, desired: int, selector: str,
                 sts: Mapping[str, Any] | None, problem: Problem | None, lag: Mapping[str, Any] | None,
                 now: str) -> dict[str, Any]:
    """The whole status the operator writes, from what it observed in one reconcile."""
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
                                     generation=generation, now=now),
    }
    if lag is not None:
        old = previous.get("lag") or {}
        same = {k: v for k, v in old.items() if k != "measuredAt"} == {k: v for k, v in lag.items()
                                                                       if k != "measuredAt"}
        # A lag that did not change keeps its timestamp: no status write every poll for nothing.
        status["lag"] = dict(old) if same and old else dict(lag)
    elif previous.get("lag"):
        status["lag"] = dict(previous["lag"])
    for key in previous:  # fields other writers own (later: scaling, backpressure) are kept
        if key not in status:
            status[key] = previous[key]
    return status


def condition(status: Mapping[str, Any] | None, type_: str) -> Mapping[str, Any] | None:
    for c in (status or {}).get("conditions") or []:
        if c.get("type") == type_:
            return c
    return None


def backoff(retry: int, base: float = 1.0, cap: float = 120.0) -> float:
    """Delay before retry number `retry` (0-based): base * 2**retry, capped."""
    return float(min(cap, base * (2 ** min(retry, 30))))
