"""Helpers for the idempotency store's tests, on one Redis and on the Cluster: a worker's view
of its claims, and the write commands Redis counted."""
from __future__ import annotations

from typing import Any

from afc.runtime.idempotency import Batch, Claim, RedisStore


class Claimer:
    """One worker's view: claims numbered like the session numbers them (owner.seq)."""

    def __init__(self, s: RedisStore) -> None:
        self.s, self.seq, self.tokens = s, 0, {}

    async def claim(self, *keys: str) -> list[Claim]:
        a = await self.s.apply(Batch(claims=list(keys), seq0=self.seq))
        for i, (k, c) in enumerate(zip(keys, a.claims)):
            if c is Claim.CLAIMED:
                self.tokens[k] = f"{self.s.owner}.{self.seq + i}"
        self.seq += len(keys)
        return a.claims

    async def done(self, *keys: str) -> None:
        await self.s.apply(Batch(done=[(k, self.tokens[k]) for k in keys]))

    async def release(self, *keys: str) -> None:
        await self.s.apply(Batch(release=[(k, self.tokens[k]) for k in keys]))

    async def beat(self) -> bool:
        """A heartbeat-only call; True: our heartbeat had expired (our claims may be taken)."""
        return (await self.s.apply(Batch(beat=True))).lost


WRITES = ("set", "setnx", "setex", "psetex", "del", "unlink", "expire", "pexpire", "bitfield", "setbit",
          "setrange", "hset", "getset", "incr")


def writes_in(stats: dict[str, Any]) -> int:
    """Write commands in one server's INFO commandstats (scripts' inner calls included)."""
    return sum(int(v["calls"]) for k, v in stats.items() if k.removeprefix("cmdstat_") in WRITES)
