import random

from afc.runtime.offsets import OffsetTracker

TP = ("t", 0)


def test_commit_point_stops_at_the_first_unfinished_message() -> None:
    t = OffsetTracker()
    for off in range(10, 15):
        t.add(TP, off)
    t.finish(TP, 11)
    t.finish(TP, 12)
    assert t.to_commit() == {}                    # 10 unfinished: nothing is safe
    t.finish(TP, 10)
    assert t.to_commit() == {TP: 13}              # 13 unfinished
    t.committed({TP: 13})
    assert t.to_commit() == {}                    # nothing moved since the ack
    t.finish(TP, 14)
    t.finish(TP, 13)
    assert t.to_commit() == {TP: 15}


def test_gaps_in_offsets_are_fine() -> None:
    t = OffsetTracker()
    for off in (5, 9, 20):                        # compaction or transaction markers
        t.add(TP, off)
    for off in (20, 5, 9):
        t.finish(TP, off)
    assert t.to_commit() == {TP: 21}


def test_refetched_offsets_are_not_tracked_twice() -> None:
    t = OffsetTracker()
    for off in range(3):
        t.add(TP, off)
    t.add(TP, 1)                                   # seen again after a pause
    for off in range(3):
        t.finish(TP, off)
    assert t.to_commit() == {TP: 3}
    assert t.outstanding() == 0
    t.add(TP, 2)                                   # below the commit point: ignored
    assert t.outstanding() == 0


def test_random_completion_order_never_commits_past_an_unfinished_offset() -> None:
    rnd = random.Random(7)
    t = OffsetTracker()
    offsets = list(range(1000))
    for o in offsets:
        t.add(TP, o)
    order = offsets[:]
    rnd.shuffle(order)
    finished: set[int] = set()
    for o in order:
        t.finish(TP, o)
        finished.add(o)
        c = t.to_commit().get(TP)
        if c is not None:
            assert all(x in finished for x in range(c))     # everything below is finished
            assert c == 1000 or c not in finished           # and it stops at the first gap
            t.committed({TP: c})
    assert t.parts[TP].committed == 1000


def test_dropped_partition_ignores_late_results() -> None:
    t = OffsetTracker()
    t.add(TP, 0)
    t.drop({TP})
    t.finish(TP, 0)
    assert t.to_commit() == {}
