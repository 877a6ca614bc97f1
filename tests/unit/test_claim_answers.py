"""How the loop reads the store's answers for a batch (no servers: the decision alone)."""
from afc.runtime.config import load_settings
from afc.runtime.consumer import PartitionState, Runtime
from afc.runtime.idempotency import Claim
from afc.runtime.message import Message

TP = ("orders", 0)


def runtime_with(*offsets: int) -> tuple[Runtime, list[Message]]:
    rt = Runtime(load_settings(kafka={"topics": ["orders"]}, handler={"handler": "afc.runtime.handlers:noop"}))
    part = rt.parts[TP] = PartitionState(TP)
    msgs = []
    for off in offsets:
        m = Message(TP[0], TP[1], off, None, b"{}", None, 0, {}, None, "order-247")
        m._part = part
        part.inflight += 1
        rt.tracker.add(TP, off)
        msgs.append(m)
    rt.outstanding = len(msgs)
    return rt, msgs


def test_mine_for_a_key_held_here_waits_parked() -> None:
    rt, [m] = runtime_with(5)
    rt._claimed_at["order-247"] = 0.0                 # another copy holds it and has not finished
    rt._apply_claims([m], ["order-247"], [Claim.MINE])
    assert rt._parked == [m] and rt.outstanding == 1


def test_mine_for_a_key_whose_done_mark_just_landed_is_skipped_not_run() -> None:
    """The race the two-consumer test caught: the claim was answered MINE in Redis just
    before this process wrote the key's done mark and stopped holding it."""
    rt, [m] = runtime_with(5)
    rt._claimed_at["order-247"] = 0.0
    rt._written_done(["order-247"])                   # the first copy's done mark is written
    rt._apply_claims([m], ["order-247"], [Claim.MINE])
    assert rt._parked == [] and rt.outstanding == 0 and m._part.inflight == 0
    assert rt.tracker.to_commit() == {TP: 6}          # finished as a duplicate: the offset may pass
    assert rt.metrics.skipped._value.get() == 1
