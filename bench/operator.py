"""The operator at scale (issue 14): 1,000 AdaptiveConsumers on the test bed, one operator.

    python -P bench/operator.py                          # `make bench-operator`: this checkout (~5 min)
    python -P bench/operator.py --baseline /work/main    # and another checkout's operator before it
    python -P bench/operator.py --resources 100 --out /tmp/op.json

Per operator (a checkout's `afc-operator`, run as a process against the bed's apiserver):

1. converge: `--resources` AdaptiveConsumers created in a fresh namespace (scaling.mode Off,
   replicas 0, so no pods; Kafka bootstrap = the bed's broker, one topic they all read, a
   group each), timed until every one has status.observedGeneration 1 and its StatefulSet.
2. steady: once the operator wrote nothing for `--quiet-s` (the StatefulSet controller has
   caught up; at most `--settle-max-s`), nothing changes for `--steady-s` (at least two polls
   of 30 s each): the operator's requests to the apiserver per minute by verb and resource
   (counted in the operator process by bench/opcount.py, for any checkout: the bed's apiserver
   is shared with other tests, so its own counters cannot tell whose requests they count),
   operator CPU (share of one core) and RSS, polls per resource, Kafka admin clients held.
3. change: `--changes` resources get a new spec.image at once; for each, the time until its
   StatefulSet carries it (median, max; those not there within `--change-timeout-s` counted).
4. teardown: the AdaptiveConsumers deleted while the operator runs (it releases kopf's
   finalizer), then the operator stopped and the namespace deleted.

With `--baseline DIR` the same runs first with DIR's operator (DIR's virtualenv and code),
and both go into the results; without it, a baseline already in the results file is kept
(marked with the commit it measured). Results: bench/results/operator.json, written here only.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # appended, not prepended: our operator/ must not shadow the stdlib's

from afc.operator.kube import Kube, KubeError, path_for  # noqa: E402
from afc.operator.testing import OperatorProcess  # noqa: E402
from bench.measure import doc_header, free_port, scrape  # noqa: E402

log = logging.getLogger("bench.operator")
RESULTS = ROOT / "bench" / "results" / "operator.json"
COUNTING = ROOT / "bench" / "opcount.py"
RW = {"GET": "read", "LIST": "read", "WATCH": "watch", "PATCH": "write", "POST": "write", "PUT": "write",
      "DELETE": "write"}


def counts(path: Path) -> Counter[str]:
    """The operator's requests so far ({"VERB resource": n}, bench/opcount.py)."""
    try:
        return Counter(json.loads(path.read_text()))
    except (OSError, ValueError):
        return Counter()


def per_minute(delta: Counter[str], seconds: float) -> dict[str, float]:
    return {k: round(n * 60 / seconds, 1) for k, n in sorted(delta.items()) if n}


def polls_done(metrics: dict[str, float]) -> float:
    return sum(v for k, v in metrics.items() if k.startswith("afc_operator_poll_duration_seconds_count"))


def consumer(name: str, bootstrap: str, topic: str) -> dict[str, Any]:
    return {"apiVersion": "afc.dev/v1alpha1", "kind": "AdaptiveConsumer", "metadata": {"name": name},
            "spec": {"image": "ghcr.io/afc-dev/afc-runtime:0.1.0", "handler": {"handler": "app.handlers:handle"},
                     "kafka": {"bootstrapServers": bootstrap, "topics": [topic], "groupId": f"{topic}-{name}"},
                     "replicas": 0, "minReplicas": 0, "maxReplicas": 4, "scaling": {"mode": "Off"}}}


def converged(kube: Kube, namespace: str, n: int) -> int:
    items = kube.request("GET", path_for("AdaptiveConsumer", namespace))["items"]
    return sum(1 for ac in items if (ac.get("status") or {}).get("observedGeneration") == 1
               and "replicas" in (ac.get("status") or {}))


def delete_all(kube: Kube, kubectl: list[str], namespace: str, timeout: float) -> int:
    """Delete the AdaptiveConsumers while the operator runs; strip what is left. Returns how many
    needed their finalizers stripped."""
    def delete(name: str) -> None:
        try:
            kube.request("DELETE", path_for("AdaptiveConsumer", namespace, name))
        except KubeError as e:
            if not e.not_found:
                log.warning("delete %s: %s", name, e)
    # one by one (a deletecollection of 1,000 outlasts the apiserver's 60 s request timeout)
    names = [ac["metadata"]["name"] for ac in kube.request("GET", path_for("AdaptiveConsumer", namespace))["items"]]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(delete, names))
    deadline = time.monotonic() + timeout
    left: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        left = kube.request("GET", path_for("AdaptiveConsumer", namespace))["items"]
        if not left:
            return 0
        time.sleep(3)
    stripped = len(left)

    def strip(name: str) -> None:
        try:
            kube.request("PATCH", path_for("AdaptiveConsumer", namespace, name),
                         body={"metadata": {"finalizers": None}}, content_type="application/merge-patch+json")
        except KubeError as e:
            log.warning("strip %s: %s", name, e)
    for _ in range(5):  # a loaded apiserver may time some out: again until none is left
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(strip, [ac["metadata"]["name"] for ac in left]))
        left = kube.request("GET", path_for("AdaptiveConsumer", namespace))["items"]
        if not left:
            break
    return stripped


def run_one(label: str, command: list[str] | None, cwd: Path | None, a: argparse.Namespace, kube: Kube,
            kubectl: list[str], logs: Path) -> dict[str, Any]:
    bootstrap = os.environ["AFC_KAFKA_BOOTSTRAP"]
    run_id = uuid.uuid4().hex[:6]
    namespace, topic = f"afc-bench-op-{run_id}", f"afc-bench-op-{run_id}"
    from confluent_kafka.admin import AdminClient, NewTopic
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for f in admin.create_topics([NewTopic(topic, 1, 1)]).values():
        f.result(30)
    kube.request("POST", "/api/v1/namespaces", body={"apiVersion": "v1", "kind": "Namespace",
                                                     "metadata": {"name": namespace, "labels": {"afc.dev/test": "true"}}})
    out: dict[str, Any] = {"label": label, "namespace": namespace, "resources": a.resources}
    port = free_port()
    count_file = logs / f"requests-{label}.json"
    op = OperatorProcess(["--namespace", namespace, "--metrics", f"127.0.0.1:{port}", *a.operator_args],
                         os.environ["KUBECONFIG"],
                         logs / f"operator-{label}.log", command=command, cwd=cwd,
                         env={"AFC_BENCH_COUNTS": str(count_file)})
    try:
        op.start(ready_timeout=120)
        proc = psutil.Process(op.proc.pid)  # type: ignore[union-attr]
        cpu0 = sum(proc.cpu_times()[:2])
        t0 = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda i: kube.request("POST", path_for("AdaptiveConsumer", namespace),
                                                 body=consumer(f"c{i:04d}", bootstrap, topic)), range(a.resources)))
        out["create_s"] = round(time.monotonic() - t0, 1)
        done = 0
        while done < a.resources:
            if time.monotonic() - t0 > a.converge_timeout_s:
                raise RuntimeError(f"{label}: {done}/{a.resources} converged after {a.converge_timeout_s}s")
            time.sleep(3)
            done = converged(kube, namespace, a.resources)
            log.info("%s: %d/%d converged", label, done, a.resources)
        out["converge_s"] = round(time.monotonic() - t0, 1)
        out["converge_cpu_s"] = round(sum(proc.cpu_times()[:2]) - cpu0, 1)
        # Converged is not yet at rest: the StatefulSet controller works through 1,000 new
        # StatefulSets for minutes, and each one it observes is news for a status. Wait until the
        # operator has written nothing for --quiet-s (at most --settle-max-s: an operator that
        # writes on every poll never gets there, which is what its window then shows).
        t1, last_writes, quiet_since = time.monotonic(), None, time.monotonic()
        while time.monotonic() - t1 < a.settle_max_s:
            now_writes = sum(n for k, n in counts(count_file).items() if RW.get(k.split()[0]) == "write")
            if now_writes != last_writes:
                last_writes, quiet_since = now_writes, time.monotonic()
            elif time.monotonic() - quiet_since >= a.quiet_s:
                break
            time.sleep(1)
        out["settle"] = {"s": round(time.monotonic() - t1, 1),
                         "quiet": time.monotonic() - quiet_since >= a.quiet_s,
                         "rule": f"no write for {a.quiet_s} s, at most {a.settle_max_s} s"}

        log.info("%s: steady window %ss", label, a.steady_s)
        c0, cpu1, s0 = counts(count_file), sum(proc.cpu_times()[:2]), time.monotonic()
        polls0 = polls_done(scrape(port))
        rss = []
        while time.monotonic() - s0 < a.steady_s:
            time.sleep(5)
            rss.append(proc.memory_info().rss)
        window = time.monotonic() - s0
        delta = counts(count_file) - c0
        cpu = sum(proc.cpu_times()[:2]) - cpu1
        rate = per_minute(delta, window)
        by_kind: Counter[str] = Counter()
        for k, v in rate.items():
            by_kind[RW.get(k.split()[0], "other")] += v
        metrics = scrape(port)
        out["converge_requests"] = dict(sorted(c0.items()))
        out["steady"] = {
            "window_s": round(window, 1),
            "operator_requests_per_min": rate,
            "operator_requests_per_min_total": round(sum(rate.values()), 1),
            "operator_requests_per_min_by_kind": {k: round(v, 1) for k, v in sorted(by_kind.items())},
            "operator_cpu_share_of_one_core": round(cpu / window, 3),
            "operator_rss_mib": round(max(rss) / 2**20, 1),
            "operator_threads": proc.num_threads(),
            "kafka_admin_clients": metrics.get("afc_operator_kafka_admin_clients"),
        }
        polls = polls_done(metrics) - polls0
        # the poll asks for one pass per resource every 30 s; an operator that cannot keep up does fewer
        out["steady"]["polls_in_window"] = int(polls)
        out["steady"]["mean_seconds_between_polls_of_a_resource"] = (
            round(a.resources * window / polls, 1) if polls else None)
        secs = sum(v for k, v in metrics.items() if k.startswith("afc_operator_poll_duration_seconds_sum"))
        n = sum(v for k, v in metrics.items() if k.startswith("afc_operator_poll_duration_seconds_count"))
        out["steady"]["mean_poll_duration_s"] = round(secs / n, 3) if n else None

        # all at once (an operator that queues its work behind every poll would make one-by-one
        # changes take minutes each); each timed from its own patch to its StatefulSet
        pending: dict[str, tuple[str, float]] = {}
        for i in range(a.changes):
            name = f"c{(i * 97) % a.resources:04d}"
            image = f"ghcr.io/afc-dev/afc-runtime:0.1.{i + 1}"
            kube.request("PATCH", path_for("AdaptiveConsumer", namespace, name), body={"spec": {"image": image}},
                         content_type="application/merge-patch+json")
            pending[name] = (image, time.monotonic())
        latencies: list[float] = []
        deadline = time.monotonic() + a.change_timeout_s
        while pending and time.monotonic() < deadline:
            for name, (image, t) in list(pending.items()):
                sts = kube.request("GET", path_for("StatefulSet", namespace, name))
                if sts["spec"]["template"]["spec"]["containers"][0]["image"] == image:
                    latencies.append(time.monotonic() - t)
                    del pending[name]
            time.sleep(0.2)
        late = len(pending)
        if late:
            log.warning("%s: %d changes not rolled within %ss", label, late, a.change_timeout_s)
        out["change_to_statefulset_s"] = {
            "n": a.changes, "not_within_timeout": late, "timeout_s": a.change_timeout_s,
            "median": round(statistics.median(latencies), 2) if latencies else None,
            "max": round(max(latencies), 2) if latencies else None}
        out["operator_peak_rss_mib"] = round(max(max(rss), proc.memory_info().rss) / 2**20, 1)
    finally:
        t = time.monotonic()
        stripped = delete_all(kube, kubectl, namespace, a.delete_timeout_s) if op.alive else None
        out["teardown"] = {"delete_s": round(time.monotonic() - t, 1), "finalizers_stripped": stripped}
        op.stop()
        if stripped is None:
            delete_all(kube, kubectl, namespace, 0)
        subprocess.run([*kubectl, "delete", "namespace", namespace, "--wait=false"], capture_output=True, timeout=60)
        admin.delete_topics([topic])
    return out


def git_commit(path: Path) -> str:
    return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def findings(doc: dict[str, Any]) -> list[str]:
    out = []
    for key in ("baseline", "this"):
        r = doc["runs"].get(key)
        if not r or "steady" not in r:
            continue
        s = r["steady"]
        out.append(f"{key} ({r['commit'][:8]}): {s['operator_requests_per_min_total']:,} apiserver requests/min at "
                   f"rest for {r['resources']} resources ({s['operator_requests_per_min_by_kind']}), CPU "
                   f"{s['operator_cpu_share_of_one_core']:.0%} of a core, RSS {s['operator_rss_mib']} MiB, "
                   f"{s['kafka_admin_clients']} Kafka admin client(s), a poll of each resource every "
                   f"{s['mean_seconds_between_polls_of_a_resource']} s (30 s asked); converged in {r['converge_s']} s; "
                   f"a spec change reached the StatefulSet in {r['change_to_statefulset_s']['median']} s (median), "
                   f"{r['change_to_statefulset_s']['not_within_timeout']} of {r['change_to_statefulset_s']['n']} not "
                   f"within {r['change_to_statefulset_s']['timeout_s']} s")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resources", type=int, default=1000)
    ap.add_argument("--baseline", type=Path, help="another checkout whose operator runs first (e.g. /work/main)")
    ap.add_argument("--steady-s", type=float, default=75, help="at least two polls (30 s each)")
    ap.add_argument("--quiet-s", type=float, default=15)
    ap.add_argument("--settle-max-s", type=float, default=150)
    ap.add_argument("--changes", type=int, default=10)
    ap.add_argument("--change-timeout-s", type=float, default=240)
    ap.add_argument("--converge-timeout-s", type=float, default=420)
    ap.add_argument("--delete-timeout-s", type=float, default=120)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--operator-args", nargs="*", default=[], help="more afc-operator flags (e.g. --verbose)")
    a = ap.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")
    kube = Kube(timeout_s=60)
    kubectl = [os.environ.get("AFC_KUBECTL", "kubectl"), f"--kubeconfig={os.environ['KUBECONFIG']}"]
    logs = Path(tempfile.mkdtemp(prefix="afc-bench-operator-"))
    previous = json.loads(a.out.read_text()) if a.out.exists() else {}
    doc: dict[str, Any] = {
        **doc_header("afc-bench-operator/1", "operator.py", argv),
        "logs_dir": str(logs),
        "method": {
            "requests": "counted in the operator process (bench/opcount.py: the kubernetes client's and kopf's HTTP "
                        "requests by verb and resource; the bed's apiserver is shared, so its own counters mix in "
                        "other tests); WATCH counts watches opened, not their events",
            "cpu": "the operator process's user+system CPU seconds over the steady window / its length",
            "rss": "the operator process's RSS, sampled every 5 s in the steady window (maximum)",
            "change": "PATCH spec.image of 10 resources at once, then GET their StatefulSets every 0.2 s until each "
                      "template has its image (time from its own PATCH)",
            "resources": "scaling.mode Off, replicas 0 (no pods), pollIntervalS 30 (default), one topic, a group each",
        },
        "runs": {},
    }
    if a.baseline:
        cmd = [str(a.baseline / ".venv" / "bin" / "python"), "-P", str(COUNTING)]
        doc["runs"]["baseline"] = {"checkout": str(a.baseline), "commit": git_commit(a.baseline),
                                   **run_one("baseline", cmd, a.baseline, a, kube, kubectl, logs)}
    elif (previous.get("runs") or {}).get("baseline"):
        doc["runs"]["baseline"] = {**previous["runs"]["baseline"], "kept_from": previous.get("date")}
    cmd = [sys.executable, "-P", str(COUNTING)]
    doc["runs"]["this"] = {"checkout": str(ROOT), "commit": git_commit(ROOT),
                           **run_one("this", cmd, ROOT, a, kube, kubectl, logs)}
    doc["findings"] = findings(doc)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    print("\n".join(doc["findings"]))
    print(f"wrote {a.out}")
    kube.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
