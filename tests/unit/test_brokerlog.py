"""scripts/brokerlog.py: the coordinator's lines that the demo and the rollout benchmark count."""
from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import brokerlog  # noqa: E402

LINES = [
    "[2026-11-27 04:00:34,479] INFO [GroupCoordinator 1]: Stabilized group g-1 generation 3 (__consumer_offsets-7) with 2 members",
    "[2026-11-27 04:00:35,100] INFO [GroupCoordinator 1]: Stabilized group g-10 generation 9 (__consumer_offsets-1)",
    "\tat org.apache.kafka.Something (Stabilized group g-1 generation 99)",   # a continuation line: no time
    "[2026-11-27 04:00:36,000] INFO [GroupCoordinator 1]: Static member with groupInstanceId=ns.orders-0 and unknown "
    "member id joins group g-1 in Stable state.",
    "[2026-11-27 04:00:37,250] INFO [GroupCoordinator id=1 topic=__consumer_offsets partition=7] [GroupId g-1] "
    "Bumped group epoch to 12.",
]


def test_rebalances_of_one_group_only_with_their_time() -> None:
    got = brokerlog.rebalances(LINES, "g-1", kip848=False)
    assert [(g, round(t - datetime(2026, 11, 27, 4, 0, 34, 479000).timestamp(), 3)) for t, g, _ in got] == [(3, 0.0)]
    assert [g for _, g, _ in brokerlog.rebalances(LINES, "g-1", kip848=True)] == [12]
    assert [g for _, g, _ in brokerlog.rebalances(LINES, "g-10", kip848=False)] == [9]


def test_static_rejoins_name_the_instance() -> None:
    pat = brokerlog.pattern(brokerlog.STATIC_REJOIN, "g-1")
    assert [m.group(1) for ln in LINES if (m := pat.search(ln))] == ["ns.orders-0"]
    assert not any(brokerlog.pattern(brokerlog.STATIC_REJOIN, "g").search(ln) for ln in LINES)


def test_the_tail_returns_whole_lines_once(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text(LINES[0] + "\n")
    tail = brokerlog.Tail(log)                  # starts at the end: what was there is not read
    assert tail.lines() == []
    with open(log, "a") as f:
        f.write(LINES[1] + "\n" + LINES[3][:20])  # a line still being written stays for later
    assert tail.lines() == [LINES[1]]
    with open(log, "a") as f:
        f.write(LINES[3][20:] + "\n")
    assert tail.lines() == [LINES[3]] and tail.lines() == []
