"""`make soak`: the chaos scenario of issue 9 item 2, N times (default 5), on the test bed.

    python -P bench/chaos.py --runs 5            # what `make soak` runs
    python -P bench/chaos.py --runs 1 -n 20000   # a quick look

Each run: a fresh 12-partition topic and group, 3 members (static ids) running
`afc_test_handlers:append_effect` (effect + done mark in one MULTI via `mark_done_in`), n
records produced at --rate while they consume, --kills SIGKILLs of random members at random
times (each restarted with the same instance id 1-2 s later), then the wait for lag 0 and the
count of duplicate and missing effects. The scenario is tests/afc_chaos.py, the same code the
integration test tests/integration/test_core_chaos.py runs once.

Writes bench/results/chaos.json itself (runs, duplicates and missing per run, kill times,
durations, machine, date); exits 1 if any run lost or duplicated an effect.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Appended, not prepended: the repo's top level has an `operator/` folder that would shadow
# the standard library's `operator` module.
sys.path.append(str(ROOT / "tests"))

from afc_chaos import ChaosConfig, run_chaos  # noqa: E402
from afctest import Testbed  # noqa: E402

OUT = ROOT / "bench" / "results" / "chaos.json"


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"nproc": os.cpu_count(), "cpu_model": cpu, "kernel": platform.release(),
            "python": platform.python_version(), "load_avg_at_start": list(os.getloadavg()),
            "note": "cores shared with the test bed (Kafka, Redis, kube-apiserver...) and other work"}


def one_run(tb: Testbed, i: int, cfg: ChaosConfig, logs: Path) -> dict:
    import redis
    from confluent_kafka.admin import AdminClient, NewTopic
    stem = f"soak-chaos-{uuid.uuid4().hex[:8]}-{i}"
    topic, group, prefix = f"{stem}.in", f"{stem}-group", f"{stem}:"
    admin = AdminClient({"bootstrap.servers": tb.bootstrap})
    admin.create_topics([NewTopic(topic, 12, 1)], operation_timeout=30)[topic].result(timeout=30)
    run_logs = logs / stem
    run_logs.mkdir(parents=True)
    try:
        res = run_chaos(tb, topic, group, prefix, run_logs, cfg)
    finally:
        for f in admin.delete_topics([topic, topic + ".retry", topic + ".dlq", topic + ".poison"],
                                     operation_timeout=30).values():
            try:
                f.result(timeout=30)
            except Exception:  # noqa: BLE001 - routing topics may not exist; names are unique anyway
                pass
        try:
            admin.delete_consumer_groups([group], request_timeout=30)[group].result(timeout=30)
        except Exception:  # noqa: BLE001
            pass
        r = redis.Redis.from_url(tb.redis_url)
        keys = list(r.scan_iter(match=f"{prefix}*", count=1000))
        for k in range(0, len(keys), 1000):
            r.delete(*keys[k:k + 1000])
        r.close()
    return {"run": i, "topic": topic, "logs": str(run_logs), **res.to_json()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("-n", type=int, default=100_000, help="records per run")
    ap.add_argument("--rate", type=float, default=4_000.0, help="records per second, produced while consuming")
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--seed", type=int, default=None, help="first run's seed (run i uses seed + i)")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    tb = Testbed.load()
    logs = Path(tempfile.mkdtemp(prefix="afc-soak-"))
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    doc = {"schema": "afc-bench-chaos/1", "date": started, "command": " ".join(["chaos.py", *sys.argv[1:]]),
           "machine": machine(), "logs_dir": str(logs),
           "scenario": {"n": a.n, "rate": a.rate, "members": a.members, "kills": a.kills, "partitions": 12,
                        "handler": "afc_test_handlers:append_effect (RPUSH + mark_done_in in one MULTI)",
                        "restart_after_s": [1.0, 2.0], "lease_ms": 2000, "session_timeout_ms": 10000},
           "runs": []}
    t0 = time.monotonic()
    for i in range(a.runs):
        cfg = ChaosConfig(n=a.n, rate=a.rate, members=a.members, kills=a.kills,
                          seed=None if a.seed is None else a.seed + i)
        try:
            run = one_run(tb, i, cfg, logs)
        except Exception as e:  # noqa: BLE001 - a broken run is recorded, the soak goes on
            run = {"run": i, "ok": False, "error": repr(e)}
        doc["runs"].append(run)
        print(f"run {i}: ok={run.get('ok')} duplicates={run.get('duplicates')} missing={run.get('missing')} "
              f"duration_s={run.get('duration_s')} kills={[(k['at_s'], k['member']) for k in run.get('kills', [])]}"
              + (f" error={run['error']}" if "error" in run else ""), flush=True)
        doc["totals"] = {"runs": len(doc["runs"]), "ok_runs": sum(1 for r in doc["runs"] if r.get("ok")),
                         "duplicates": sum(r.get("duplicates") or 0 for r in doc["runs"]),
                         "missing": sum(r.get("missing") or 0 for r in doc["runs"]),
                         "duration_s": round(time.monotonic() - t0, 1)}
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(doc, indent=1) + "\n")        # after every run: a partial soak still says something
    t = doc["totals"]
    print(f"soak: {t['ok_runs']}/{t['runs']} runs clean, duplicates={t['duplicates']} missing={t['missing']} "
          f"in {t['duration_s']} s -> {a.out}")
    return 0 if t["ok_runs"] == t["runs"] else 1


if __name__ == "__main__":
    sys.exit(main())
