"""`FastHistogram` (the per-message latency histograms) against prometheus_client's own
Histogram: the same observations must export the same buckets, sum and count."""
from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Histogram

from afc.runtime.metrics import LATENCY_BUCKETS, FastHistogram


def _exported(collector) -> dict[str, float]:
    return {f"{s.name}{s.labels.get('le', '')}": s.value for fam in collector.collect() for s in fam.samples
            if not s.name.endswith("_created")}


def test_observe_many_exports_what_prometheus_client_would() -> None:
    rnd = random.Random(5)
    ref = Histogram("afc_x_seconds", "x", buckets=LATENCY_BUCKETS, registry=CollectorRegistry())
    fast, one = FastHistogram("afc_x_seconds", "x"), FastHistogram("afc_x_seconds", "x")
    batches = [[], [0.0], list(LATENCY_BUCKETS), [b * 1.0000001 for b in LATENCY_BUCKETS], [99.0, 31.0, 30.0]]
    batches += [[rnd.lognormvariate(-6, 2) for _ in range(rnd.randint(1, 900))] for _ in range(40)]
    batches += [[0.0001] * 50]                                 # all in the first bucket (the early stop)
    for batch in batches:
        fast.observe_many(batch)
        for v in batch:
            ref.observe(v)
            one.observe(v)
    got, want = _exported(fast), _exported(ref)
    assert got.keys() == want.keys()
    for k in want:
        assert abs(got[k] - want[k]) <= 1e-9 * max(1.0, abs(want[k])), k
    assert fast.counts == one.counts and fast.count == one.count == sum(len(b) for b in batches)
    assert fast.counts[0] > 0 and fast.counts[-1] > 0           # the first and the +Inf bucket are exercised
