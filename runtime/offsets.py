"""Which offset is safe to commit per partition.

Messages finish out of order (different keys run concurrently). A partition's commit
point is the offset after the longest prefix of fetched messages that are all finished:
handled, skipped as duplicates, or routed with the produce acknowledged. Nothing at or
above the first unfinished message is ever committed.

Pure bookkeeping, O(1) amortised per message: a deque of fetched offsets in fetch order
and a set of finished ones.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

TopicPartition = tuple[str, int]


@dataclass
class PartitionOffsets:
    pending: deque[int] = field(default_factory=deque)   # fetched, in order, not yet below the commit point
    finished: set[int] = field(default_factory=set)
    next_offset: int | None = None                       # commit point: everything below is finished
    committed: int | None = None                         # what the broker last acknowledged

    def add(self, offset: int) -> None:
        if self.pending and offset <= self.pending[-1]:
            return                                        # a re-fetch after pause/seek: already tracked
        if self.next_offset is not None and offset < self.next_offset:
            return                                        # below the commit point: already finished
        self.pending.append(offset)

    def finish(self, offset: int) -> None:
        self.finished.add(offset)

    def advance(self) -> int | None:
        pending, finished = self.pending, self.finished
        while pending and pending[0] in finished:
            off = pending.popleft()
            finished.discard(off)
            self.next_offset = off + 1
        return self.next_offset

    @property
    def outstanding(self) -> int:
        return len(self.pending) - len(self.finished)


class OffsetTracker:
    def __init__(self) -> None:
        self.parts: dict[TopicPartition, PartitionOffsets] = {}

    def add(self, tp: TopicPartition, offset: int) -> None:
        p = self.parts.get(tp)
        if p is None:
            p = self.parts[tp] = PartitionOffsets()
        p.add(offset)

    def finish(self, tp: TopicPartition, offset: int) -> None:
        p = self.parts.get(tp)
        if p is not None:                                # a revoked partition's late result is ignored
            p.finish(offset)

    def to_commit(self) -> dict[TopicPartition, int]:
        """Commit points that moved since the last acknowledged commit."""
        out = {}
        for tp, p in self.parts.items():
            nxt = p.advance()
            if nxt is not None and nxt != p.committed:
                out[tp] = nxt
        return out

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, off in offsets.items():
            p = self.parts.get(tp)
            if p is not None:
                p.committed = off

    def outstanding(self, tps: set[TopicPartition] | None = None) -> int:
        return sum(p.outstanding for tp, p in self.parts.items() if tps is None or tp in tps)

    def drop(self, tps: set[TopicPartition]) -> None:
        for tp in tps:
            self.parts.pop(tp, None)
