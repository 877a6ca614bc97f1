"""`make bench-stages`: where a record's time goes inside afc at a modest rate, step by step,
and how late the machine itself runs a ready thread meanwhile.

`make bench`'s latency phase measures afc from the outside (handler start against the
record's CreateTime and the producer's ack). This probe runs the runtime in-process, with the
Redis idempotency store and a no-op handler, on a fresh 12-partition topic fed by a paced
producer (bench/workload.py, linger.ms 1), and stamps every record at four points:

- `fetched`: the Kafka thread's fetch (`Runtime._fetch`) returned it;
- `loop`: the event loop took the fetch's result (`Runtime._on_fetched`);
- `submitted`: claimed, it was handed to the handler's workers (`Dispatcher.submit`);
- `handler`: the handler started.

The claim step (`loop` to `submitted`) is split by the idempotency key of each record at the
store call: `sent` (the call carrying its claim started) and `answered` (that call returned), so
its time divides into waiting for a call, the call itself, and the answer's way back to the
workers (handed over in call order, applied by the loop, admitted past the key gate). The
collector's pauses in the window are counted per generation (`gc.callbacks`).

For each configuration (rate x `flow.fetchLingerMs` x `handler.eventLoop`, interleaved within
each round) it reports the percentiles of each step,
the store calls' own latency, records per fetch and per store call, the process's CPU per
record, and a scheduler-stall probe beside it (a separate process that sleeps 1 ms at a time
and records how late it woke: a ready thread waiting for a core). The stamps cost CPU of their
own (a dict entry per record per step), so the CPU figures here are above `make bench-lowrate`'s;
compare configurations within one run.

The results file is written by this script only: bench/results/stages.json.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import subprocess
import sys
import time
from array import array
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))             # appended: the repo's operator/ must not shadow `operator`

from bench import measure, workload  # noqa: E402

STEPS = (("fetched->loop", "fetched", "loop"), ("loop->submitted", "loop", "submitted"),
         ("submitted->handler", "submitted", "handler"), ("fetched->handler", "fetched", "handler"))
# The claim step (loop->submitted) in three: waiting for a store call, the call, the way back.
CLAIM_STEPS = (("loop->sent", "loop", "sent"), ("sent->answered", "sent", "answered"),
               ("answered->submitted", "answered", "submitted"))
STAMPS = ("fetched", "loop", "sent", "answered", "submitted")


def child(a: argparse.Namespace) -> dict[str, Any]:
    """In-process run of one configuration; returns its figures."""
    os.environ.update({"AFC_KAFKA__BOOTSTRAP_SERVERS": a.bootstrap, "AFC_KAFKA__TOPICS": json.dumps([a.topic]),
                       "AFC_KAFKA__GROUP_ID": f"{a.topic}-g", "AFC_IDEMPOTENCY__REDIS_URL": a.redis_url,
                       "AFC_IDEMPOTENCY__KEY_PREFIX": a.prefix, "AFC_IDEMPOTENCY__KEY_FIELD": "id",
                       "AFC_FLOW__FETCH_LINGER_MS": str(a.linger_ms), "AFC_SERVER__PORT": "0",
                       "AFC_HANDLER__EVENT_LOOP": a.event_loop,
                       "AFC_INSTANCE_ID": f"{a.topic}-0", "AFC_LOG_LEVEL": "WARNING"})
    from afc.runtime import consumer as rc, dispatch, idempotency
    from afc.runtime.eventloop import loop_factory, loop_name
    from afc.runtime.config import load_settings

    on = [False]
    stamps: dict[str, dict[Any, float]] = {name: {} for name in STAMPS}   # sent/answered: by idempotency key
    pauses: list[tuple[int, float]] = []
    gc_start = [0.0]
    # Flat doubles, not a tuple per record: a tuple per record would itself feed the collector
    # (50,000 new container objects per 10 s at 5,000 msg/s: a gen-0 collection of its own).
    flat = array("d")
    width = len(STAMPS) + 1
    store_ms: list[float] = []
    counts = {"fetches": 0, "fetched": 0, "store_calls": 0}

    fetch0, fetched0, submit0, apply0 = (rc.Runtime._fetch, rc.Runtime._on_fetched, dispatch.Dispatcher.submit,
                                         idempotency.RedisStore.apply)

    def fetch(self: Any, budget: int, timeout: float) -> list[Any]:
        out = fetch0(self, budget, timeout)
        t, s = time.perf_counter(), stamps["fetched"]
        for m in out:
            s[(m.partition(), m.offset())] = t
        if on[0] and out:
            counts["fetches"] += 1
            counts["fetched"] += len(out)
        return out

    def on_fetched(self: Any, seq: int, fut: Any, budget: int) -> None:
        t, s = time.perf_counter(), stamps["loop"]
        if not fut.cancelled() and fut.exception() is None:
            for m in fut.result():
                s[(m.partition(), m.offset())] = t
        fetched0(self, seq, fut, budget)

    def submit(self: Any, msgs: list[Any]) -> None:
        t, s = time.perf_counter(), stamps["submitted"]
        for m in msgs:
            s[(m.partition, m.offset)] = t
        submit0(self, msgs)

    async def apply(self: Any, batch: Any) -> Any:
        t0 = time.perf_counter()
        sent, answered = stamps["sent"], stamps["answered"]
        for k in batch.claims:
            sent[k] = t0
        try:
            return await apply0(self, batch)
        finally:
            t1 = time.perf_counter()
            for k in batch.claims:
                answered[k] = t1
            if on[0] and batch.claims:
                counts["store_calls"] += 1
                store_ms.append(t1 - t0)

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            gc_start[0] = time.perf_counter()
        elif on[0]:
            pauses.append((info["generation"], time.perf_counter() - gc_start[0]))

    gc.callbacks.append(on_gc)

    rc.Runtime._fetch, rc.Runtime._on_fetched = fetch, on_fetched          # type: ignore[method-assign]
    dispatch.Dispatcher.submit, idempotency.RedisStore.apply = submit, apply  # type: ignore[method-assign]

    def handler(m: Any) -> None:
        t = time.perf_counter()
        k, ik = (m.partition, m.offset), m.idempotency_key
        got = [stamps[s].pop(ik if s in ("sent", "answered") else k, None) for s in STAMPS]
        if on[0] and None not in got:
            flat.extend(got)
            flat.append(t)

    settings = load_settings()

    async def main() -> dict[str, Any]:
        rt = rc.Runtime(settings, handler=handler)
        await rt.start()
        task = asyncio.create_task(rt.run())
        try:
            await asyncio.sleep(4)                      # assignment
            prod = subprocess.Popen([sys.executable, "-m", "bench.workload", "paced", "--bootstrap", a.bootstrap,
                                     "--topic", a.topic, "--rate", str(a.rate),
                                     "--seconds", str(a.warmup_s + a.seconds + 2), "--run", a.prefix],
                                    cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                await asyncio.sleep(a.warmup_s)
                stalls = measure.StallProbe(a.seconds)
                try:
                    on[0] = True
                    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                    await asyncio.sleep(a.seconds)
                    on[0] = False
                    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                    stall = stalls.result()
                finally:
                    stalls.stop()
            finally:
                prod.wait(a.seconds + 60)
        finally:
            rt.request_stop()
            await asyncio.wait_for(task, 30)
        dt = t1 - t0
        cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
        rows = [flat[i:i + width] for i in range(0, len(flat), width)]
        n = len(rows)
        idx = {name: i for i, name in enumerate((*STAMPS, "handler"))}
        return {"rate": a.rate, "fetch_linger_ms": a.linger_ms, "event_loop": loop_name(asyncio.get_running_loop()),
                "window_s": round(dt, 2),
                "handled_per_s": round(n / dt, 1),
                "cpu_pct": round(100 * cpu / dt, 1), "cpu_us_per_record": round(cpu / n * 1e6, 1) if n else None,
                "voluntary_switches_per_s": round((r1.ru_nvcsw - r0.ru_nvcsw) / dt),
                "records_per_fetch": round(counts["fetched"] / counts["fetches"], 2) if counts["fetches"] else None,
                "records_per_store_call": round(n / counts["store_calls"], 2) if counts["store_calls"] else None,
                "steps": {name: measure.percentiles([r[idx[b]] - r[idx[e_]] for r in rows])
                          for name, e_, b in (*STEPS, *CLAIM_STEPS)},
                "gc_pauses": {f"gen{g}": {"count": len(d), "max_ms": round(1000 * max(d), 2),
                                          "total_ms": round(1000 * sum(d), 1)}
                              for g in (0, 1, 2) if (d := [x for gen, x in pauses if gen == g])},
                "store_call": measure.percentiles(store_ms),
                "scheduler_stalls": stall}

    with asyncio.Runner(loop_factory=loop_factory(settings.handler.event_loop)) as runner:   # as afc-consumer runs
        return runner.run(main())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="500,5000", help="comma-separated msg/s")
    ap.add_argument("--lingers", default="0,1", help="comma-separated flow.fetchLingerMs values")
    ap.add_argument("--loops", default="uvloop,asyncio", help="comma-separated handler.eventLoop values")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each configuration, interleaved")
    ap.add_argument("--seconds", type=float, default=10, help="measured window per run")
    ap.add_argument("--warmup-s", type=float, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "stages.json")
    ap.add_argument("--bootstrap", default=os.environ.get("AFC_KAFKA_BOOTSTRAP", "127.0.0.1:19092"))
    ap.add_argument("--redis-url", default=os.environ.get("AFC_REDIS_URL", "redis://127.0.0.1:19079/0"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rate", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--linger-ms", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--event-loop", default="uvloop", help=argparse.SUPPRESS)
    ap.add_argument("--topic", help=argparse.SUPPRESS)
    ap.add_argument("--prefix", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.child:
        print(json.dumps(child(a)))
        return 0
    from bench.run import begin, delete_redis_keys, dump_json
    ctx, doc = begin(a, "afc-bench-stages/1", "bench/stages.py", argv, __doc__)
    doc["runs"] = []
    t_start = time.time()
    try:
        for rnd in range(a.rounds):
            for rate in (float(r) for r in a.rates.split(",") if r):
                for linger, loop in ((float(x), lp) for x in a.lingers.split(",") if x
                                     for lp in a.loops.split(",") if lp):
                    topic = f"{ctx.run}-r{rate:g}-l{linger:g}-{loop}-{rnd}".replace(".", "_")
                    workload.create_topic(a.bootstrap, topic, 12)
                    ctx.topics.append(topic)
                    ctx.groups.append(f"{topic}-g")                 # the child's group (see child)
                    argv_c = [sys.executable, "-P", str(Path(__file__)), "--child", "--rate", str(rate),
                              "--linger-ms", str(linger), "--event-loop", loop, "--seconds", str(a.seconds),
                              "--warmup-s", str(a.warmup_s),
                              "--topic", topic, "--prefix", ctx.prefix, "--bootstrap", a.bootstrap,
                              "--redis-url", a.redis_url]
                    p = subprocess.run(argv_c, cwd=ROOT, capture_output=True, text=True,
                                       timeout=a.warmup_s + a.seconds + 120)
                    try:
                        res = json.loads(p.stdout.strip().splitlines()[-1])
                    except (ValueError, IndexError):
                        res = {"rate": rate, "fetch_linger_ms": linger, "event_loop": loop, "error": p.stderr[-800:]}
                    res["round"] = rnd
                    doc["runs"].append(res)
                    s = res.get("steps", {}).get("fetched->handler", {})
                    print(f"rate={rate:g} linger={linger:g} loop={loop} round={rnd} cpu_us={res.get('cpu_us_per_record')} "
                          f"per_call={res.get('records_per_store_call')} fetch->handler p50={s.get('p50_ms')} "
                          f"p99={s.get('p99_ms')} stall_max={res.get('scheduler_stalls', {}).get('max_ms')}",
                          file=sys.stderr, flush=True)
    finally:
        doc["cleanup"] = {"topics": workload.delete_topics(ctx.bootstrap, ctx.topics),
                          "groups": workload.delete_groups(ctx.bootstrap, ctx.groups),
                          "redis_keys_deleted": delete_redis_keys(a.redis_url, ctx.prefix)}
        doc["duration_s"] = round(time.time() - t_start, 1)
    dump_json(doc, a.out)
    print(f"wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
