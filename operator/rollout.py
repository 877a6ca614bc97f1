"""Pure decisions about the consumer pods and the StatefulSet's rolling update.

- `pod_failure(pod)`: what a kubelet reports that will not fix itself soon (CrashLoopBackOff,
  image pull errors, a config error) or a pod not ready for longer than the progress deadline.
- `decide(state) -> Step`: whether a rollout is in progress (the autoscaler holds still), the
  pod being rolled, and whether to hold the rollout: a pod of the new revision failed, or a
  restarted pod did not become ready within `rollout.progressDeadlineSeconds`. A hold sets the
  StatefulSet's `rollingUpdate.partition` to the lowest ordinal already rolled, so the pods
  below keep the previous revision; it lasts until the spec renders another pod template (a
  fix, or the previous spec back), and is kept in `status.rollout.held` so that a restarted
  operator keeps holding.

The StatefulSet controller itself only waits for an unhealthy pod before rolling the next one;
once a crash-looping pod is briefly ready it goes on. The hold makes the stop last.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Mapping, Sequence

REVISION_LABEL = "controller-revision-hash"  # set by the StatefulSet controller on its pods

# Container waiting reasons a kubelet reports for a container it cannot run.
FAILING_WAITING = ("CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "CreateContainerConfigError",
                   "CreateContainerError", "InvalidImageName", "RunContainerError")
POD_NOT_READY = "PodNotReady"
POD_FAILED = "PodFailed"
NOT_REJOINED = "MemberNotRejoined"
ROLLING_UPDATE = "RollingUpdate"
DEADLINE_EXCEEDED = "ProgressDeadlineExceeded"
ROLLOUT_HELD = "RolloutHeld"
ROLLOUT_STAGED = "RolloutStaged"


@dataclass(frozen=True)
class PodFailure:
    pod: str
    reason: str
    message: str
    revision: str | None = None


@dataclass(frozen=True)
class Step:
    """What the operator does about the rollout in this reconcile.
    - rolling: a new revision is rolling through the pods (the autoscaler holds);
    - progressing: the Progressing condition (status, reason, message), None when the
      StatefulSet's own progress (scaling, waiting for ready) says it;
    - hold: the hold to keep in status.rollout.held (None: no hold); `new_hold`: set just now;
    - failures: every failing pod (Degraded);
    - status: status.rollout."""
    rolling: bool = False
    progressing: tuple[bool, str, str] | None = None
    hold: dict[str, Any] | None = None
    new_hold: bool = False
    failures: tuple[PodFailure, ...] = ()
    pod: str | None = None
    status: dict[str, Any] = field(default_factory=dict)


def _epoch(ts: str | None) -> float | None:
    if not ts:
        return None
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def ordinal(sts_name: str, pod_name: str) -> int | None:
    """The pod's ordinal in the StatefulSet, None for a pod that only carries its labels."""
    prefix, _, n = pod_name.rpartition("-")
    return int(n) if prefix == sts_name and n.isdigit() else None


def revision(pod: Mapping[str, Any]) -> str | None:
    return ((pod.get("metadata") or {}).get("labels") or {}).get(REVISION_LABEL)


def is_ready(pod: Mapping[str, Any]) -> bool:
    st = pod.get("status") or {}
    return st.get("phase") == "Running" and any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in st.get("conditions") or [])


def pod_failure(pod: Mapping[str, Any], now: float, deadline_s: float) -> PodFailure | None:
    """Why a pod is failing, or None. Not ready alone is a failure only past the deadline
    (counted from its Ready condition's last transition, or its creation)."""
    meta, st = pod.get("metadata") or {}, pod.get("status") or {}
    name = meta.get("name", "?")
    if meta.get("deletionTimestamp"):
        return None  # going away on purpose
    rev = revision(pod)
    for cs in [*(st.get("initContainerStatuses") or []), *(st.get("containerStatuses") or [])]:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        last = (cs.get("lastState") or {}).get("terminated") or {}
        crashed = not cs.get("ready") and last.get("exitCode") not in (None, 0)
        if waiting.get("reason") == "CrashLoopBackOff" or (crashed and waiting.get("reason") not in FAILING_WAITING):
            # A crash loop cycles through waiting (back-off), running (not ready yet) and
            # terminated: one reason and one message for the whole cycle (the kubelet's back-off
            # message changes every time), so the condition neither flaps nor posts an Event per restart.
            exit_ = f"; last exit {last.get('reason') or 'Error'} (code {last.get('exitCode')})" if last else ""
            return PodFailure(name, "CrashLoopBackOff", f"pod {name} container {cs.get('name')}: "
                              f"CrashLoopBackOff{exit_}", rev)
        if waiting.get("reason") in FAILING_WAITING:
            detail = f": {waiting['message']}" if waiting.get("message") else ""
            return PodFailure(name, waiting["reason"], f"pod {name} container {cs.get('name')}: "
                              f"{waiting['reason']}{detail}", rev)
    if st.get("phase") == "Failed":
        return PodFailure(name, POD_FAILED, f"pod {name} failed: {st.get('reason') or ''} {st.get('message') or ''}"
                          .rstrip(), rev)
    if is_ready(pod):
        return None
    ready = next((c for c in st.get("conditions") or [] if c.get("type") == "Ready"), None)
    since_ts = (ready or {}).get("lastTransitionTime") or meta.get("creationTimestamp")
    since = _epoch(since_ts)
    if since is not None and now - since > deadline_s:  # the message stays the same from poll to poll
        return PodFailure(name, POD_NOT_READY, f"pod {name} not ready since {since_ts}, longer than "
                          f"rollout.progressDeadlineSeconds ({int(deadline_s)}s)", rev)
    return None


def in_progress(sts: Mapping[str, Any] | None) -> bool:
    """A new revision is rolling through the pods: the StatefulSet's current and update
    revisions differ, or fewer pods than it has run the update revision (not a mere change of
    replicas: new pods are created at the update revision)."""
    if not sts:
        return False
    s = sts.get("status") or {}
    if int(s.get("observedGeneration") or 0) < int((sts.get("metadata") or {}).get("generation") or 0):
        return False  # not observed yet: a scale or a rollout, the next look tells
    if not s.get("updateRevision"):
        return False
    return s.get("currentRevision") != s.get("updateRevision") \
        or int(s.get("updatedReplicas") or 0) < int(s.get("replicas") or 0)


def not_rejoined(pod: Mapping[str, Any], upd: str | None, now: float, rejoin_s: float | None) -> PodFailure | None:
    """A restarted pod of the revision being rolled out that is still not ready (readiness is
    "holds its assignment": it has not rejoined) after the session timeout: the broker has
    dropped its member by now and rebalanced the group, so rolling further would storm."""
    meta = pod.get("metadata") or {}
    if rejoin_s is None or upd is None or revision(pod) != upd or is_ready(pod) or meta.get("deletionTimestamp"):
        return None
    ready = next((c for c in (pod.get("status") or {}).get("conditions") or [] if c.get("type") == "Ready"), None)
    since = _epoch((ready or {}).get("lastTransitionTime") or meta.get("creationTimestamp"))
    if since is None or now - since <= rejoin_s:
        return None
    name = meta.get("name", "?")
    return PodFailure(name, NOT_REJOINED, f"pod {name} of revision {upd} has not rejoined the group (not ready) "
                      f"within the session timeout ({rejoin_s:g}s): the group rebalances without it", upd)


def decide(sts: Mapping[str, Any] | None, pods: Sequence[Mapping[str, Any]], *, template: str,
           held: Mapping[str, Any] | None, deadline_s: float, now: float, now_iso: str,
           rejoin_s: float | None = None) -> Step:
    """The rollout step from the live StatefulSet (after this reconcile's apply) and its pods.
    `template`: the hash of the pod template just rendered; `held`: status.rollout.held;
    `rejoin_s`: the members' session timeout (a restarted member must rejoin within it)."""
    failures = tuple(f for p in pods if (f := pod_failure(p, now, deadline_s)))
    if not sts:
        return Step(failures=failures)
    s = sts.get("status") or {}
    cur, upd = s.get("currentRevision"), s.get("updateRevision")
    hold = dict(held) if held and held.get("template") == template else None
    observed = int(s.get("observedGeneration") or 0) >= int((sts.get("metadata") or {}).get("generation") or 0)
    # A StatefulSet whose generation is not observed yet (the hold's own partition write, seen
    # a moment later) says nothing about the rollout: a hold stays until the controller has
    # looked, with the failures it was held for (else Degraded flaps between reasons).
    rolling = in_progress(sts) or (hold is not None and not observed)
    if rolling:
        failing = {f.pod for f in failures}
        failures += tuple(f for p in pods if (p.get("metadata") or {}).get("name") not in failing
                          and (f := not_rejoined(p, upd, now, rejoin_s)))
    partition = int((((sts.get("spec") or {}).get("updateStrategy") or {}).get("rollingUpdate") or {})
                    .get("partition") or 0)
    status = {"currentRevision": cur, "updateRevision": upd, "partition": partition}
    if not rolling:
        return Step(failures=failures, status=status)  # done (or nothing to roll): a hold has nothing left to hold
    replicas = int((sts.get("spec") or {}).get("replicas") or 0)
    name = (sts.get("metadata") or {}).get("name", "")
    by_ordinal = {o: p for p in pods if (o := ordinal(name, p["metadata"]["name"])) is not None}
    target = None  # the pod being rolled: highest ordinal first, down to the partition
    for i in range(replicas - 1, partition - 1, -1):
        p = by_ordinal.get(i)
        if p is None or revision(p) != upd or not is_ready(p) or (p.get("metadata") or {}).get("deletionTimestamp"):
            target = f"{name}-{i}"
            break
    status["pod"] = target
    updated = int(s.get("updatedReplicas") or 0)
    if hold is None:
        failed = [f for f in failures if f.revision == upd]
        if failed:
            rolled = [o for o, p in by_ordinal.items() if revision(p) == upd and o >= partition]
            at = max(partition, min(rolled, default=partition))
            late = [f for f in failed if f.reason == POD_NOT_READY]
            first = late[0] if late else failed[0]
            reason = DEADLINE_EXCEEDED if late else ROLLOUT_HELD
            hold = {"partition": at, "template": template, "revision": upd, "pod": first.pod, "reason": reason,
                    "message": f"{first.message}; rollout of {upd} held at partition {at}: pods below keep "
                               f"{cur}", "since": now_iso}
            status["held"] = hold
            return Step(rolling=True, progressing=(False, reason, hold["message"]), hold=hold, new_hold=True,
                        failures=failures, pod=target, status={**status, "partition": max(partition, at)})
    if hold is not None:
        status["held"] = hold
        msg = f"{hold['message']} (since {hold['since']}); change the spec to release: a fix, or the previous spec back"
        return Step(rolling=True, progressing=(False, hold["reason"], msg), hold=hold, failures=failures,
                    pod=target, status=status)
    if target is None:
        return Step(rolling=True, progressing=(False, ROLLOUT_STAGED, f"pods from ordinal {partition} run {upd}; "
                                               f"the {partition} below keep {cur} (spec.rollout.partition)"),
                    failures=failures, status=status)
    return Step(rolling=True, progressing=(True, ROLLING_UPDATE, f"rolling {target} to revision {upd}: "
                                           f"{updated}/{replicas} pods updated"),
                failures=failures, pod=target, status=status)


def degraded(failures: Sequence[PodFailure], hold: Mapping[str, Any] | None) -> tuple[str, str] | None:
    """(reason, message) for the Degraded condition from the pods and the hold, or None."""
    if hold is not None:
        now = next((f for f in failures if f.pod == hold.get("pod")), None)
        reason = now.reason if now else hold.get("reason") or ROLLOUT_HELD
        return reason, hold.get("message") or ""
    if not failures:
        return None
    first = failures[0]
    more = f"; {len(failures) - 1} more: " + ", ".join(f"{f.pod} {f.reason}" for f in failures[1:5]) \
        if len(failures) > 1 else ""
    return first.reason, first.message + more
