"""Run `afc-consumer` under cProfile, every thread included.

    AFC_BENCH_PROF_DIR=/tmp/x python bench/profile_afc.py run --handler bench.handlers:noop

`python -m cProfile` only sees the main thread (the asyncio loop), but afc spends its time in
three places: the loop, the Kafka thread (poll/consume/commit) and the handler lanes. So each
thread gets its own profiler (Thread.run is wrapped before the runtime starts any thread), and
at exit every profile is written as `<n>.prof` with `threads.json` naming them and giving each
thread's CPU seconds. The profiler's timer is the default wall clock: blocking calls (queue
gets, poll, epoll) show their waiting time, which the orchestrator labels as such.
"""
from __future__ import annotations

import atexit
import cProfile
import json
import os
import sys
import threading
import time
from pathlib import Path

OUT = Path(os.environ.get("AFC_BENCH_PROF_DIR", "."))
_profiles: list[tuple[dict, cProfile.Profile]] = []
_lock = threading.Lock()
_orig_run = threading.Thread.run


def _profiled_run(self: threading.Thread) -> None:
    prof = cProfile.Profile()
    entry = {"name": self.name, "tid": threading.get_native_id(), "cpu_s": None}
    with _lock:
        _profiles.append((entry, prof))
    prof.enable()
    try:
        _orig_run(self)
    finally:
        prof.disable()
        entry["cpu_s"] = round(time.thread_time(), 3)


def _dump(main_prof: cProfile.Profile, main_entry: dict) -> None:
    main_prof.disable()
    main_entry["cpu_s"] = round(time.thread_time(), 3)
    OUT.mkdir(parents=True, exist_ok=True)
    index = []
    with _lock:
        items = [(main_entry, main_prof), *_profiles]
    for i, (entry, prof) in enumerate(items):
        try:
            prof.dump_stats(str(OUT / f"{i}.prof"))
        except Exception as e:  # noqa: BLE001 - a thread still running at exit; keep the others
            entry["error"] = repr(e)
            continue
        index.append({**entry, "file": f"{i}.prof"})
    (OUT / "threads.json").write_text(json.dumps(index, indent=1))


def main() -> int:
    threading.Thread.run = _profiled_run  # type: ignore[method-assign]
    from afc.runtime.cli import main as afc_main
    prof = cProfile.Profile()
    entry = {"name": "MainThread (asyncio loop)", "tid": threading.get_native_id(), "cpu_s": None}
    atexit.register(_dump, prof, entry)
    prof.enable()
    return afc_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
