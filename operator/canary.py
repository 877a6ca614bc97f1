"""Pure decisions of a staged rollout (`spec.rollout.canary`).

A canary runs in phases, kept in `status.rollout.canary` (so an operator restart resumes it):

    Canary      the StatefulSet's partition lets only the top `canary_size` ordinals roll; once
                every canary pod runs the new revision and is ready (`readyAt`), the operator
                samples the members' health records and `judge`s them each reconcile;
    Promoting   the gates passed: the partition returns to spec.rollout.partition, every pod rolls;
    Promoted    every pod runs the new revision;
    RollingBack a gate failed (or a canary pod failed, or no verdict by maxHoldSeconds): the
                StatefulSet gets the stable revision's pod template back, so the canary pods
                return to it; the stable members already run it and are not restarted;
    RolledBack  every pod runs the stable revision again. Degraded (CanaryFailed) until the spec
                renders another pod template (a fix, or the previous spec back).

Health comes from the members' Redis records (afc.runtime.backpressure): monotonic counters
per process (handled, failed handler runs, dead-lettered/poison records) and the member's
group.instance.id, which names its pod. `totals` turns a window of samples into per-group
differences (a counter that goes down is a restarted process: its new value counts from 0).

`judge` (the gates):
- a gate that fails with at least `minRuns` canary runs rolls back at once (no need to sit out
  the hold with a broken revision);
- error rate = failed / (handled + failed) over the window; > maxErrorRate fails;
- maxErrorRateRatio (optional): the canary's error rate > ratio x max(stable rate, 1%) fails;
- DLQ rate = dead-lettered / runs; > maxDlqRate fails;
- maxLagRatio (optional): the canary members' mean lag per partition (over the samples, from
  the lag each member last measured for its partitions) > ratio x max(the stable members',
  100 records) fails (the floor keeps a few records of jitter from failing a canary);
- all gates pass, at least minRuns runs and holdSeconds since readyAt: promote;
- fewer than minRuns runs: hold; at maxHoldSeconds: roll back (fail safe: no evidence, no
  promotion).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

CANARY, PROMOTING, PROMOTED, ROLLING_BACK, ROLLED_BACK = "Canary", "Promoting", "Promoted", "RollingBack", "RolledBack"
ACTIVE = (CANARY, PROMOTING, ROLLING_BACK)

HOLD, PROMOTE, ROLLBACK = "hold", "promote", "rollback"

# Progressing / Degraded reasons and Event reasons
CANARY_ROLLING = "CanaryRolling"       # the canary pods are being rolled
CANARY_HOLD = "CanaryHold"             # the canary pods run; the gates collect data
CANARY_STARTED = "CanaryStarted"
CANARY_PROMOTED = "CanaryPromoted"
CANARY_FAILED = "CanaryFailed"
ROLLED_BACK_REASON = "RolledBack"

STABLE_RATE_FLOOR = 0.01
LAG_FLOOR = 100   # records per partition: the stable lag counted at least this much


@dataclass(frozen=True)
class Gates:
    hold_s: float = 60
    max_hold_s: float = 600
    min_runs: int = 20
    max_error_rate: float = 0.05
    max_error_rate_ratio: float | None = None
    max_dlq_rate: float = 0.01
    max_lag_ratio: float | None = None

    @classmethod
    def of(cls, spec: Any) -> "Gates":
        """From a CanarySpec."""
        return cls(hold_s=spec.hold_seconds, max_hold_s=spec.max_hold_seconds, min_runs=spec.min_runs,
                   max_error_rate=spec.max_error_rate, max_error_rate_ratio=spec.max_error_rate_ratio,
                   max_dlq_rate=spec.max_dlq_rate, max_lag_ratio=spec.max_lag_ratio)


@dataclass(frozen=True)
class Counts:
    """A member's monotonic counters, and (a gauge, not summed over time) the lag it last
    measured over `partitions` partitions."""
    handled: int = 0
    failed: int = 0
    dead_lettered: int = 0
    lag: int = 0
    partitions: int = 0

    @property
    def runs(self) -> int:
        return self.handled + self.failed

    @classmethod
    def of(cls, record: Mapping[str, Any]) -> "Counts | None":
        """From a member's Redis record; None when it carries no counters (an older runtime)."""
        c = record.get("counts")
        if not isinstance(c, Mapping):
            return None
        lag = record.get("lag") if isinstance(record.get("lag"), Mapping) else {}
        try:
            return cls(int(c.get("handled") or 0), int(c.get("failed") or 0), int(c.get("deadLettered") or 0),
                       int(lag.get("records") or 0), int(lag.get("partitions") or 0))
        except (TypeError, ValueError):
            return None

    def __add__(self, o: "Counts") -> "Counts":
        return Counts(self.handled + o.handled, self.failed + o.failed, self.dead_lettered + o.dead_lettered)


def increment(before: Counts, after: Counts) -> Counts:
    """What a member's counters moved by between two samples; a counter that went down is a
    restarted process, whose counters start at 0."""
    if after.handled < before.handled or after.failed < before.failed or after.dead_lettered < before.dead_lettered:
        return after
    return Counts(after.handled - before.handled, after.failed - before.failed,
                  after.dead_lettered - before.dead_lettered)


Sample = tuple[float, Mapping[str, Counts]]   # (time, pod name -> counters)


def mean_lag(samples: Sequence[Sample], pods: Iterable[str]) -> float | None:
    """The pods' lag per partition, averaged over the samples (None: they measured no partition)."""
    pods = list(pods)
    per: list[float] = []
    for _, counts in samples:
        cs = [counts[p] for p in pods if p in counts]
        parts = sum(c.partitions for c in cs)
        if parts:
            per.append(sum(c.lag for c in cs) / parts)
    return round(sum(per) / len(per), 1) if per else None


def totals(samples: Sequence[Sample], pods: Iterable[str]) -> Counts:
    """The summed counter increments of `pods` over the window: each pod from its first
    appearance in a sample to its last."""
    out = Counts()
    for pod in pods:
        last: Counts | None = None
        for _, counts in samples:
            c = counts.get(pod)
            if c is None:
                continue
            if last is not None:
                out = out + increment(last, c)
            last = c
    return out


def canary_size(spec: Any, replicas: int) -> int:
    """Pods of the new revision first: `replicas`, or `percent` of the pods rounded up; at
    least 1, at most all."""
    if spec.percent is not None:
        n = math.ceil(replicas * spec.percent / 100)
    else:
        n = spec.replicas or 1
    return max(1, min(n, replicas))


def canary_partition(spec: Any, replicas: int) -> int:
    """The StatefulSet partition that lets only the canary pods (the highest ordinals) roll."""
    return max(0, replicas - canary_size(spec, replicas))


@dataclass(frozen=True)
class Verdict:
    action: str           # hold | promote | rollback
    reason: str
    message: str
    gates: dict[str, Any]


def _rate(n: int, d: int) -> float | None:
    return round(n / d, 4) if d else None


def judge(samples: Sequence[Sample], canary: Sequence[str], stable: Sequence[str], g: Gates,
          elapsed_s: float) -> Verdict:
    """The canary's verdict from the samples since its pods were ready (see the module doc)."""
    c, s = totals(samples, canary), totals(samples, stable)
    err, dlq = _rate(c.failed, c.runs), _rate(c.dead_lettered, c.runs)
    stable_err = _rate(s.failed, s.runs)
    lag, stable_lag = mean_lag(samples, canary), mean_lag(samples, stable)
    values: dict[str, Any] = {"runs": c.runs, "errorRate": err, "dlqRate": dlq, "stableRuns": s.runs,
                              "stableErrorRate": stable_err, "lagPerPartition": lag,
                              "stableLagPerPartition": stable_lag}
    where = f"canary {', '.join(canary)}: {c.runs} handler runs in {elapsed_s:.0f}s"
    if c.runs >= g.min_runs:
        assert err is not None and dlq is not None
        if err > g.max_error_rate:
            return Verdict(ROLLBACK, "ErrorRate", f"{where}, error rate {err:.3f} > maxErrorRate "
                           f"{g.max_error_rate:g} ({c.failed} failed)", values)
        if g.max_error_rate_ratio is not None:
            base = max(stable_err or 0.0, STABLE_RATE_FLOOR)
            if err > g.max_error_rate_ratio * base:
                return Verdict(ROLLBACK, "ErrorRateRatio", f"{where}, error rate {err:.3f} > maxErrorRateRatio "
                               f"{g.max_error_rate_ratio:g} x stable {stable_err if stable_err is not None else 0:.3f}"
                               f" (counted at least {STABLE_RATE_FLOOR:g})", values)
        if dlq > g.max_dlq_rate:
            return Verdict(ROLLBACK, "DlqRate", f"{where}, dead-letter rate {dlq:.3f} > maxDlqRate "
                           f"{g.max_dlq_rate:g} ({c.dead_lettered} records)", values)
        if g.max_lag_ratio is not None and lag is not None and \
                lag > g.max_lag_ratio * max(stable_lag or 0.0, LAG_FLOOR):
            return Verdict(ROLLBACK, "LagRatio", f"{where}, lag {lag:g} per partition > maxLagRatio "
                           f"{g.max_lag_ratio:g} x stable {stable_lag or 0:g} (counted at least {LAG_FLOOR})", values)
        if elapsed_s >= g.hold_s:
            return Verdict(PROMOTE, "GatesPassed", f"{where}: error rate {err:.3f}, dead-letter rate {dlq:.3f} "
                           f"within the gates", values)
        return Verdict(HOLD, CANARY_HOLD, f"{where}; healthy so far, holding {g.hold_s - elapsed_s:.0f}s more",
                       values)
    if elapsed_s >= g.max_hold_s:
        return Verdict(ROLLBACK, "InsufficientData", f"{where}, fewer than minRuns {g.min_runs} by "
                       f"maxHoldSeconds {g.max_hold_s:g}: not enough evidence to promote", values)
    return Verdict(HOLD, CANARY_HOLD, f"{where}; waiting for minRuns {g.min_runs} (rolled back if not "
                   f"reached by {g.max_hold_s - elapsed_s:.0f}s from now)", values)


def pods_by_member(namespace: str, records: Mapping[str, Mapping[str, Any]]) -> dict[str, Counts]:
    """pod name -> counters, from the records of the members (keyed by member id: the
    group.instance.id `<namespace>.<pod>`, or a record's own `pod`)."""
    out: dict[str, Counts] = {}
    for member, rec in records.items():
        c = Counts.of(rec)
        if c is None:
            continue
        pod = rec.get("pod") if isinstance(rec.get("pod"), str) else None
        if pod is None and member.startswith(namespace + "."):
            pod = member[len(namespace) + 1:]
        if pod:
            out[pod] = c
    return out


# ---------------------------------------------------------------------------- the phases

def current(canary_spec: Any, prev_rollout: Mapping[str, Any] | None, template: str, now_iso: str
            ) -> dict[str, Any] | None:
    """The canary that applies to this reconcile's pod template (`template`, as the spec renders
    it): the one in status for it, or a new one when a canary is configured and the spec renders
    another pod template than the one last applied (status.rollout.template). None: no canary
    (not configured, the first apply, or the spec changed nothing in the pods)."""
    prev = prev_rollout or {}
    cs = prev.get("canary")
    if cs and cs.get("template") == template:
        if canary_spec is None and cs.get("phase") == CANARY:  # the canary was removed from the spec: go on
            return {**cs, "phase": PROMOTING, "decidedAt": now_iso, "reason": "CanaryRemoved",
                    "message": "spec.rollout.canary removed during the canary: every pod rolls"}
        return dict(cs)
    if canary_spec is None:
        return None
    last = prev.get("template")
    if last is None or last == template:
        return None
    return {"phase": CANARY, "template": template, "startedAt": now_iso}


def rolls_back(cs: Mapping[str, Any] | None) -> bool:
    """The StatefulSet gets the stable revision's pod template (status.rollout.canary.stableRevision)."""
    return bool(cs) and cs.get("phase") in (ROLLING_BACK, ROLLED_BACK)  # type: ignore[union-attr]


def partition_for(cs: Mapping[str, Any] | None, canary_spec: Any, replicas: int) -> int | None:
    """The partition a canary asks for (None: none): in phase Canary only the canary pods roll."""
    if cs and cs.get("phase") == CANARY and canary_spec is not None:
        return canary_partition(canary_spec, replicas)
    return None


def _ready(pod: Mapping[str, Any] | None, rev: str) -> bool:
    from afc.operator import rollout as ro
    return pod is not None and ro.revision(pod) == rev and ro.is_ready(pod) \
        and not (pod.get("metadata") or {}).get("deletionTimestamp")


@dataclass(frozen=True)
class Observed:
    canary: dict[str, Any]
    canary_pods: tuple[str, ...] = ()
    stable_pods: tuple[str, ...] = ()
    judging: bool = False       # the hold runs: sample the members and judge
    changed_phase: bool = False


def observe(cs: Mapping[str, Any], sts: Mapping[str, Any] | None, pods: Sequence[Mapping[str, Any]], *,
            canary_spec: Any, failures: Sequence[Any], now_iso: str) -> Observed:
    """Move the canary along what the StatefulSet and its pods show (everything but the gates'
    verdict): which revision is under test, when its pods are ready, a canary pod that fails
    (rolled back at once), the end of a promotion or a rollback."""
    from afc.operator import rollout as ro
    cs = dict(cs)
    phase = cs["phase"]
    if not sts:
        return Observed(cs)
    s, meta = sts.get("status") or {}, sts.get("metadata") or {}
    if int(s.get("observedGeneration") or 0) < int(meta.get("generation") or 0):
        return Observed(cs)        # the revisions are not known yet
    cur, upd = s.get("currentRevision"), s.get("updateRevision")
    name = meta.get("name", "")
    replicas = int((sts.get("spec") or {}).get("replicas") or 0)
    by_name = {p["metadata"]["name"]: p for p in pods}
    if phase == CANARY:
        if not cs.get("revision"):
            cs["revision"], cs["stableRevision"] = upd, cur
        if cs["revision"] != upd:  # the StatefulSet moved on without us (someone else): start over on it
            cs.update({"revision": upd, "stableRevision": cur, "readyAt": None})
        if upd == cs.get("stableRevision"):
            cs.update({"phase": PROMOTED, "decidedAt": now_iso,
                       "message": "nothing to test: the spec renders the revision the pods already run"})
            return Observed(cs, changed_phase=True)
        first = canary_partition(canary_spec, replicas) if canary_spec is not None else 0
        canary_pods = tuple(f"{name}-{i}" for i in range(first, replicas))
        stable_pods = tuple(f"{name}-{i}" for i in range(0, first))
        cs["pods"] = list(canary_pods)
        failed = [f for f in failures if f.pod in canary_pods and f.revision == upd]
        if failed:
            cs.update({"phase": ROLLING_BACK, "decidedAt": now_iso, "reason": failed[0].reason,
                       "message": f"canary pod failed: {failed[0].message}; rolling back to {cs.get('stableRevision')}"})
            return Observed(cs, canary_pods, stable_pods, changed_phase=True)
        if all(_ready(by_name.get(p), upd) for p in canary_pods):
            if not cs.get("readyAt"):
                cs["readyAt"] = now_iso
            return Observed(cs, canary_pods, stable_pods, judging=True)
        cs["readyAt"] = None
        return Observed(cs, canary_pods, stable_pods)
    if phase == PROMOTING and not ro.in_progress(sts) and upd == cs.get("revision"):
        cs["phase"] = PROMOTED
        return Observed(cs, changed_phase=True)
    if phase == ROLLING_BACK and not ro.in_progress(sts) and upd == cs.get("stableRevision") == cur \
            and all(_ready(by_name.get(f"{name}-{i}"), cur) for i in range(replicas)):
        cs["phase"] = ROLLED_BACK
        return Observed(cs, changed_phase=True)
    return Observed(cs)


def decided(cs: Mapping[str, Any], verdict: Verdict, now_iso: str) -> dict[str, Any]:
    """The canary after the gates' verdict."""
    out = {**cs, "gates": {k: v for k, v in verdict.gates.items() if v is not None}, "message": verdict.message}
    if verdict.action == PROMOTE:
        out.update({"phase": PROMOTING, "decidedAt": now_iso, "reason": verdict.reason})
    elif verdict.action == ROLLBACK:
        out.update({"phase": ROLLING_BACK, "decidedAt": now_iso, "reason": verdict.reason,
                    "message": f"{verdict.message}; rolling back to {cs.get('stableRevision')}"})
    return out


def conditions(cs: Mapping[str, Any] | None) -> tuple[tuple[bool, str, str] | None, tuple[str, str] | None]:
    """(Progressing, Degraded) as the canary says them; None where it says nothing."""
    if not cs:
        return None, None
    phase, msg = cs.get("phase"), cs.get("message") or ""
    pods = ", ".join(cs.get("pods") or [])
    if phase == CANARY:
        if cs.get("readyAt"):
            return (True, CANARY_HOLD, f"canary {pods} on {cs.get('revision')} since {cs['readyAt']}: {msg}"), None
        return (True, CANARY_ROLLING, f"rolling canary {pods} to revision {cs.get('revision')}; the other pods "
                                      f"keep {cs.get('stableRevision')}"), None
    if phase == ROLLING_BACK:
        return (True, "RollingBack", msg), (CANARY_FAILED, msg)
    if phase == ROLLED_BACK:
        return (False, ROLLED_BACK_REASON, f"{msg}; done. Change the spec to go on: a fix, or the previous spec "
                                           f"back"), (CANARY_FAILED, msg)
    return None, None
