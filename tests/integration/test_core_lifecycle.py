"""Issue 9 items 15 and 16: a fenced member exits with the reason; SIGTERM with work in flight
exits within the drain bound (once, not twice) and commits exactly what was handled."""
from __future__ import annotations

import subprocess
import time

import pytest

from afctest import ConsumerProcess, committed_offsets, produce_json, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.redis]


def test_member_fenced_by_its_own_instance_id_exits_3_with_the_reason(testbed, make_topic, names, redis_client,
                                                                      tmp_path) -> None:
    """Item 15 (fatal Kafka errors only logged: a zombie with a healthy /healthz): a second
    process joins with the same AFC_INSTANCE_ID, so the broker fences the first
    (FENCED_INSTANCE_ID, fatal in librdkafka). The fenced one must exit with code 3 and a log
    line with event=fatal and the reason, within ~30 s."""
    topic = make_topic("in", partitions=2)

    def member(name: str) -> ConsumerProcess:
        return ConsumerProcess(testbed, [topic], names.group, "afc_test_handlers:count_by_id",
                               tmp_path / f"{name}.log", instance_id=f"{names.stem}-same",
                               redis_prefix=names.redis_prefix, env={"AFC_TEST_HASH": f"{names.redis_prefix}runs"})
    first, second = member("first"), member("second")
    health: set[int] = set()
    try:
        first.start().wait_ready()
        second.start()
        end = time.monotonic() + 45
        while time.monotonic() < end and first.proc.poll() is None:
            health.add(first.http("/healthz")[0])
            time.sleep(0.25)
        code = first.proc.poll()
    finally:
        for c in (first, second):
            if c.proc is not None and c.proc.poll() is None:
                c.kill9()
            c._log.close()
    log = (tmp_path / "first.log").read_text()
    fatal = [ln for ln in log.splitlines() if "event=fatal" in ln]
    assert code == 3, (f"the fenced member's exit code is {code} (None: still running 45 s after it was fenced; "
                       f"/healthz answered {sorted(health)}):\n{first.log_tail(8)}")
    assert fatal and "fenc" in fatal[0].lower(), f"no event=fatal line naming the fencing: {fatal}"


def test_sigterm_with_stuck_work_exits_within_the_drain_bound_and_commits_what_was_handled(
        testbed, make_topic, names, redis_client, tmp_path) -> None:
    """Item 16 (shutdown drains twice: close() fires revoke, which waits the full bound again):
    4 partitions, one record in each sleeping 60 s among 20 ms ones, drain bound 10 s. SIGTERM
    must end the process within 10 + 5 s with exit code 0, every partition committed up to
    exactly the first record not handled (nothing committed unhandled, nothing handled left
    uncommitted), and no record run twice."""
    parts, per_part, stuck_at, bound = 4, 60, 30, 10
    topic = make_topic("in", partitions=parts)
    docs = [{"n": i, **({"sleep_ms": 60_000} if i // parts == stuck_at else {})} for i in range(parts * per_part)]
    produce_json(testbed.bootstrap, topic, docs, partition_of=lambda i, d: i % parts)
    runs = f"{names.redis_prefix}runs"
    c = ConsumerProcess(testbed, [topic], names.group, "afc_test_handlers:sleep_and_record", tmp_path / "c.log",
                        instance_id=f"{names.stem}-0", redis_prefix=names.redis_prefix,
                        env={"AFC_TEST_HASH": runs, "AFC_TEST_SLEEP_MS": "20",
                             "AFC_SHUTDOWN__DRAIN_TIMEOUT_S": str(bound)}).start()
    try:
        c.wait_ready()
        wait_for(lambda: redis_client.hlen(runs) >= 100, 60, 0.2, what="100 records handled")
        time.sleep(2)                                     # the 60 s calls are running
        t0 = time.monotonic()
        c.proc.terminate()
        try:
            code = c.proc.wait(60)
        except subprocess.TimeoutExpired:
            code = None
        took = time.monotonic() - t0
    finally:
        if c.proc.poll() is None:
            c.kill9()
        c._log.close()
    assert code == 0, f"exit code {code} after {took:.1f}s:\n{c.log_tail(10)}"
    assert took < bound + 5, f"SIGTERM took {took:.1f}s to exit with a drain bound of {bound}s:\n{c.log_tail(10)}"
    ran = {k.decode(): int(v) for k, v in redis_client.hgetall(runs).items()}
    assert set(ran.values()) == {1}, "a record ran twice"
    committed = committed_offsets(testbed.bootstrap, topic, names.group)
    for p in range(parts):
        first_unhandled = next(o for o in range(per_part + 1) if f"{p}:{o}" not in ran)
        assert committed[p] == first_unhandled, (f"partition {p}: committed {committed[p]}, but offsets below "
                                                 f"{first_unhandled} were handled and that one was not")
