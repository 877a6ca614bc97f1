"""Issue 11: /readyz follows the member's place in the group on the real broker: 503 while a
revoke is handled (a second member joins: eager and cooperative-sticky) and after the
assignment is lost (a session timeout), 200 again once the next assignment arrives. The
unit test (tests/unit/test_readiness.py) walks the same transitions deterministically."""
from __future__ import annotations

import json
import re
import os
import signal
import time
from pathlib import Path

import pytest

from afctest import ConsumerProcess, produce_json, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.redis]


def dynamic_member(testbed, topic: str, names, log: Path, handler: str, env: dict[str, str]) -> ConsumerProcess:
    return ConsumerProcess(testbed, [topic], names.group, handler, log, env=env, redis_prefix=names.redis_prefix)


def watch_ready(c: ConsumerProcess, until, timeout: float) -> list[tuple[float, int]]:
    """(time, /readyz code) every ~50 ms until `until(code)` or the timeout; 0 = no answer.
    `until` judges the code just recorded: asking /readyz again inside it could see a 200 that
    ends the watch but never reaches the list (a rehearsal failed on exactly that)."""
    seen: list[tuple[float, int]] = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        code = c.http("/readyz")[0]
        seen.append((time.monotonic(), code))
        if until(code):
            break
        time.sleep(0.05)
    return seen


def transitions(log: str) -> list[str]:
    return [ln.split("to=")[1].split()[0] for ln in log.splitlines() if "event=membership" in ln]


@pytest.mark.parametrize("assignor", ["range", "cooperative-sticky"])
def test_readyz_is_503_while_a_revoke_is_handled_and_200_after_the_next_assignment(
        testbed, make_topic, names, redis_client, tmp_path, assignor) -> None:
    """A holds both partitions, each busy with a 12 s record; B joins, so A must revoke (all
    of them under eager `range`, one under cooperative-sticky) and its revoke waits for the
    busy record. Meanwhile A's /readyz must answer 503 (it said "ready" forever before), and
    200 again once the rebalance hands it its new assignment."""
    topic = make_topic("in", partitions=2)
    env = {"AFC_TEST_HASH": f"{names.redis_prefix}runs", "AFC_KAFKA__EXTRA": json.dumps(
        {"partition.assignment.strategy": assignor})}

    a, b = (dynamic_member(testbed, topic, names, tmp_path / f"{n}.log", "afc_test_handlers:sleep_and_record", env)
            for n in "ab")
    try:
        a.start().wait_ready()
        produce_json(testbed.bootstrap, topic, [{"n": i, "sleep_ms": 12000} for i in range(2)],
                     partition_of=lambda i, d: i)
        wait_for(lambda: a.metrics().get("afc_inflight_messages", 0) >= 2, 20, what="both records in A's handler")
        wait_for(lambda: len(lag_series(a)) >= 2, 10, what="A reporting the lag of both partitions")
        b.start()
        joined = time.monotonic()
        seen = watch_ready(a, lambda code: code == 200 and b.http("/readyz")[0] == 200, 45)
        b_ready = b.http("/readyz")[0]
        a_lag_series, a_log_then = lag_series(a), a.log_path.read_text()
    finally:
        for c in (a, b):
            c.stop(30)
    codes = [code for _, code in seen]
    first_503 = next((i for i, code in enumerate(codes) if code == 503), None)
    log = a.log_path.read_text()
    assert first_503 is not None, f"A never answered 503 during its revoke; codes {sorted(set(codes))}:\n{a.log_tail(15)}"
    assert 200 in codes[first_503:] and b_ready == 200, f"A (or B) not ready again after the rebalance: {codes[-5:]}, B {b_ready}"
    not_ready_s = sum(t2 - t1 for (t1, c1), (t2, _) in zip(seen, seen[1:]) if c1 == 503)
    assert not_ready_s >= 1.0, f"503 for only {not_ready_s:.1f} s of a revoke that waits seconds for its handler"
    steps = transitions(log)
    assert steps[:3] == ["holding", "revoking", "holding"], f"A's membership transitions: {steps}"
    assert "event=revoked" in log and time.monotonic() - joined < 60
    # the revoked partition's lag series went with it (else two members report it)
    held = held_from_log(a_log_then)
    assert len(held) < 4 and set(a_lag_series) <= held, f"A holds {sorted(held)} but reports the lag of {a_lag_series}"


def lag_series(c) -> list[str]:
    """'topic[partition]' of every afc_partition_lag series the member exports."""
    out = []
    for k in c.metrics():
        m = re.match(r'afc_partition_lag\{(.*)\}$', k)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            out.append(f"{labels['topic']}[{labels['partition']}]")
    return out


def held_from_log(log: str) -> set[str]:
    """The partitions a member holds, replayed from its assigned/revoked/lost log lines."""
    held: set[str] = set()
    for kind, parts in re.findall(r"event=(assigned|revoked|lost) partitions=(\S*)", log):
        tps = {p for p in parts.split(",") if p}
        held = held | tps if kind == "assigned" else held - tps
    return held


def test_readyz_is_503_after_the_assignment_is_lost_until_the_member_is_assigned_again(
        testbed, make_topic, names, redis_client, tmp_path) -> None:
    """A is frozen (SIGSTOP) past its 6 s session timeout, so the broker gives its partitions
    to B; resumed, A finds its assignment lost and rejoins. Its /readyz must answer 503 between
    the loss and the new assignment, then 200."""
    topic = make_topic("in", partitions=4)
    env = {"AFC_TEST_HASH": f"{names.redis_prefix}runs", "AFC_MEMBERSHIP__SESSION_TIMEOUT_MS": "6000",
           "AFC_ROUTING__ENABLED": "false"}            # no retry topic: 4 partitions in the group

    a, b = (dynamic_member(testbed, topic, names, tmp_path / f"{n}.log", "afc_test_handlers:count_by_id", env)
            for n in "ab")
    try:
        a.start().wait_ready()
        b.start().wait_ready()
        wait_for(lambda: a.metrics().get("afc_assigned_partitions", 0) == 2, 30, what="A holding 2 of 4 partitions")
        os.kill(a.proc.pid, signal.SIGSTOP)
        try:
            wait_for(lambda: b.metrics().get("afc_assigned_partitions", 0) == 4, 40,
                     what="B holding all 4 partitions after A's session expired")
        finally:
            os.kill(a.proc.pid, signal.SIGCONT)
        def back(code: int) -> bool:
            text = a.log_path.read_text()
            return code == 200 and "to=lost" in text and "to=holding" in text.split("to=lost", 1)[1]
        seen = watch_ready(a, back, 45)
    finally:
        for c in (a, b):
            if c.proc.poll() is None:
                os.kill(c.proc.pid, signal.SIGCONT)
            c.stop(30)
    codes = [code for _, code in seen]
    log = a.log_path.read_text()
    steps = transitions(log)
    assert "lost" in steps and steps[steps.index("lost") + 1:][:1] == ["holding"], f"A's transitions: {steps}"
    assert 503 in codes, f"A's /readyz never answered 503 after it lost its partitions: {sorted(set(codes))}"
    assert codes[-1] == 200, f"A not ready again after rejoining: {codes[-5:]}\n{a.log_tail(15)}"
