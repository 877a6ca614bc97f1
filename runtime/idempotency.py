"""The idempotency store: has this message already been handled, or is someone on it?

Each key is in one of two states: *claimed* (value = the claim's fencing token, with a lease
TTL) or *done* (value `d`, long TTL). Every claim carries its own token (`<owner>.<seq>`,
unique per process incarnation and claim), so ownership is exact:

- a claim answers CLAIMED (ours now, with this token; also when the key already holds this
  very token, i.e. an earlier answer of the same claim was lost), DONE (handled before:
  skip it), or BUSY (held under another token, ours or not: wait, never run);
- a done mark, a release and a renewal apply only while the key still holds the token
  (a done mark also when the key is gone: our lease ran out and nobody took it). A worker
  whose lease expired and was claimed by another therefore cannot overwrite the new claim;
- `done_in` puts the done mark into the user's own MULTI guarded by WATCH and a token
  check, so a stale owner's transaction fails as a whole (`ClaimLost`), effect included;
  `done_many_in` does the same for a batch handler's messages in one MULTI (all WATCHed,
  all checked: one lost claim refuses the whole transaction).

All operations of one loop tick go to the store in one call (`apply`): claims, done marks,
releases and renewals. `RedisStore` is shared by every replica of a group; `SqliteStore`
serves single-process local runs without Redis and says so in a warning.
"""
from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Protocol

from .errors import ClaimLost, StoreUnavailable

log = logging.getLogger("afc.runtime.idempotency")


class Claim(IntEnum):
    CLAIMED = 0
    DONE = 1
    BUSY = 2


DONE_VALUE = b"d"
EVICTING_POLICIES = ("allkeys-lru", "allkeys-lfu", "allkeys-random", "volatile-lru", "volatile-lfu",
                     "volatile-random", "volatile-ttl")

# Keys and tokens travel as NUL-separated arguments and the script adds the namespace:
# packing N separate arguments costs redis-py ~3 us each, more than the rest of the
# per-message work. (So the script touches keys it was not given in KEYS: fine on one
# Redis, not on a Cluster.) Claim tokens are `owner .. '.' .. (seq0 + i)`: one argument.
_APPLY_LUA = """
local ns, owner, seq0, lease, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local k
for x in string.gmatch(ARGV[6], "([^%z]+)") do
  if not k then k = x else
    local cur = redis.call('GET', ns .. k)
    if cur == x or not cur then redis.call('SET', ns .. k, 'd', 'EX', ttl) end
    k = nil
  end
end
for x in string.gmatch(ARGV[7], "([^%z]+)") do
  if not k then k = x else
    if redis.call('GET', ns .. k) == x then redis.call('DEL', ns .. k) end
    k = nil
  end
end
local lost = {}
for x in string.gmatch(ARGV[8], "([^%z]+)") do
  if not k then k = x else
    if redis.call('GET', ns .. k) == x then redis.call('PEXPIRE', ns .. k, lease); lost[#lost + 1] = '0'
    else lost[#lost + 1] = '1' end
    k = nil
  end
end
local out, i = {}, seq0
local prefix = owner .. '.'
for key in string.gmatch(ARGV[9], "([^%z]+)") do
  local token = prefix .. i
  i = i + 1
  local old = redis.call('SET', ns .. key, token, 'NX', 'PX', lease, 'GET')
  if not old or old == token then out[#out + 1] = '0'
  elseif old == 'd' then out[#out + 1] = '1'
  else out[#out + 1] = '2' end
end
return {table.concat(out), table.concat(lost)}
"""


@dataclass
class Batch:
    """One call's worth of store operations. Claims get tokens `owner.seq0+i` in order."""
    claims: list[str] = field(default_factory=list)
    seq0: int = 0
    done: list[tuple[str, str]] = field(default_factory=list)       # (key, token)
    release: list[tuple[str, str]] = field(default_factory=list)
    renew: list[tuple[str, str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.claims or self.done or self.release or self.renew)


@dataclass
class Answer:
    claims: list[Claim]
    renew_lost: list[bool]          # per renewal: the token no longer holds the key


class IdempotencyStore(Protocol):
    owner: str

    def full_key(self, key: str) -> str: ...
    def done_in(self, pipeline: Any, key: str, token: str) -> None: ...
    async def done_in_async(self, pipeline: Any, key: str, token: str) -> None: ...
    def done_many_in(self, pipeline: Any, marks: list[tuple[str, str]]) -> None: ...
    async def done_many_in_async(self, pipeline: Any, marks: list[tuple[str, str]]) -> None: ...
    async def apply(self, batch: Batch) -> Answer: ...
    async def check(self) -> dict[str, Any]: ...
    async def close(self) -> None: ...


_BY_CODE = {48 + c.value: c for c in Claim}


def _parse(codes: bytes | str) -> list[Claim]:
    if isinstance(codes, str):
        codes = codes.encode()
    by = _BY_CODE
    return [by[c] for c in codes]


def _pairs(items: list[tuple[str, str]]) -> str:
    return "\0".join(f"{k}\0{t}" for k, t in items)


class RedisStore:
    """Shared store; keys are `<prefix>:idem:<group>:<idempotency key>`."""

    def __init__(self, url: str, prefix: str, group: str, owner: str, lease_ms: int, done_ttl_s: int) -> None:
        import redis
        import redis.asyncio as aredis
        self.namespace = f"{prefix}:idem:{group}:"
        self.owner = owner
        self.lease_ms = lease_ms
        self.done_ttl_s = done_ttl_s
        # A bounded pool that waits for a free connection: many concurrent callers must
        # queue, not fail with "Too many connections".
        pool = aredis.BlockingConnectionPool.from_url(url, max_connections=16, timeout=10, socket_timeout=5,
                                                      socket_connect_timeout=3, health_check_interval=30)
        self._r = aredis.Redis(connection_pool=pool)
        self._apply = self._r.register_script(_APPLY_LUA)
        # OOM (maxmemory reached), READONLY (a replica after failover), LOADING, MASTERDOWN...
        # arrive as ResponseError: for us every one of them means "the store cannot take
        # this now", the same as a refused connection.
        self._errors = (redis.ConnectionError, redis.TimeoutError, redis.ResponseError, OSError)

    def full_key(self, key: str) -> str:
        return self.namespace + key

    async def apply(self, b: Batch) -> Answer:
        if not b:
            return Answer([], [])
        args = [self.namespace, self.owner, b.seq0, self.lease_ms, self.done_ttl_s, _pairs(b.done),
                _pairs(b.release), _pairs(b.renew), "\0".join(b.claims)]
        try:
            codes, lost = await self._apply(keys=[], args=args)
        except self._errors as e:
            raise StoreUnavailable(f"redis: {type(e).__name__}: {e}") from e
        return Answer(_parse(codes), [c == 49 for c in (lost.encode() if isinstance(lost, str) else lost)])

    def _guard(self, pipeline: Any) -> list[Any]:
        """Shared part of `done_in`: what the user queued so far, set aside for the WATCH."""
        if not getattr(pipeline, "transaction", False):
            raise TypeError("mark_done_in needs a transactional pipeline: redis.pipeline(transaction=True)")
        if getattr(pipeline, "explicit_transaction", False):
            raise TypeError("call mark_done_in before pipeline.multi()")
        stack = list(pipeline.command_stack)
        pipeline.command_stack.clear()
        return stack

    def done_in(self, pipeline: Any, key: str, token: str) -> None:
        """Add the done mark of `key` to the caller's MULTI, fenced: WATCH the key, check that
        it still holds our token, and only then queue the caller's commands plus the mark.
        If the claim was lost meanwhile, the whole transaction is refused (ClaimLost, or
        WatchError from `execute()` if it is taken between here and EXEC)."""
        self.done_many_in(pipeline, [(key, token)])

    async def done_in_async(self, pipeline: Any, key: str, token: str) -> None:
        """`done_in` for redis.asyncio pipelines."""
        await self.done_many_in_async(pipeline, [(key, token)])

    def done_many_in(self, pipeline: Any, marks: list[tuple[str, str]]) -> None:
        """`done_in` for several keys in one MULTI (a batch handler's): every key is WATCHed
        and checked; one key no longer ours refuses the whole transaction."""
        stack = self._guard(pipeline)
        full = [self.full_key(k) for k, _ in marks]
        pipeline.watch(*full)
        curs = pipeline.mget(full)                   # one round trip for the whole batch
        self._check(marks, curs, pipeline.reset)
        self._queue(pipeline, stack, full)

    async def done_many_in_async(self, pipeline: Any, marks: list[tuple[str, str]]) -> None:
        """`done_many_in` for redis.asyncio pipelines."""
        stack = self._guard(pipeline)
        full = [self.full_key(k) for k, _ in marks]
        await pipeline.watch(*full)
        curs = await pipeline.mget(full)
        try:
            self._check(marks, curs, lambda: None)
        except ClaimLost:
            await pipeline.reset()
            raise
        self._queue(pipeline, stack, full)

    @staticmethod
    def _check(marks: list[tuple[str, str]], curs: list[Any], reset: Any) -> None:
        for (key, token), cur in zip(marks, curs):
            if cur != token.encode():
                reset()
                raise ClaimLost(f"idempotency key {key!r} is no longer claimed by this worker")

    def _queue(self, pipeline: Any, stack: list[Any], full: list[str]) -> None:
        pipeline.multi()
        pipeline.command_stack.extend(stack)
        for f in full:
            pipeline.set(f, DONE_VALUE, ex=self.done_ttl_s)

    async def check(self) -> dict[str, Any]:
        """What the store says about its durability (`maxmemory-policy`); raises if down."""
        try:
            info = await self._r.info("memory")
        except self._errors as e:
            raise StoreUnavailable(f"redis: {type(e).__name__}: {e}") from e
        return {"maxmemory_policy": info.get("maxmemory_policy", "unknown")}

    async def close(self) -> None:
        await self._r.aclose()


class SqliteStore:
    """Embedded store for one process (local runs, tests of the handler): not shared."""

    def __init__(self, path: str, prefix: str, group: str, owner: str, lease_ms: int, done_ttl_s: int) -> None:
        log.warning("event=embedded-idempotency-store path=%s detail=\"not shared across replicas; "
                    "give idempotency.redisUrl to deduplicate across processes\"", path)
        self.namespace = f"{prefix}:idem:{group}:"
        self.owner = owner
        self.lease_s = lease_ms / 1000
        self.done_ttl_s = done_ttl_s
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("CREATE TABLE IF NOT EXISTS idem (k TEXT PRIMARY KEY, v TEXT NOT NULL, exp REAL NOT NULL)")

    def full_key(self, key: str) -> str:
        return self.namespace + key

    def _get(self, k: str, now: float) -> str | None:
        row = self._db.execute("SELECT v, exp FROM idem WHERE k = ?", (k,)).fetchone()
        return row[0] if row is not None and row[1] > now else None

    def _apply_locked(self, b: Batch) -> Answer:
        now, ns, db = time.time(), self.namespace, self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for k, t in b.done:
                if self._get(ns + k, now) in (t, None):
                    db.execute("INSERT OR REPLACE INTO idem VALUES (?, 'd', ?)", (ns + k, now + self.done_ttl_s))
            for k, t in b.release:
                db.execute("DELETE FROM idem WHERE k = ? AND v = ?", (ns + k, t))
            lost = []
            for k, t in b.renew:
                n = db.execute("UPDATE idem SET exp = ? WHERE k = ? AND v = ? AND exp > ?",
                               (now + self.lease_s, ns + k, t, now)).rowcount
                lost.append(n == 0)
            out = []
            for i, k in enumerate(b.claims):
                token, cur = f"{self.owner}.{b.seq0 + i}", self._get(ns + k, now)
                if cur is None or cur == token:
                    db.execute("INSERT OR REPLACE INTO idem VALUES (?, ?, ?)", (ns + k, token, now + self.lease_s))
                    out.append(Claim.CLAIMED)
                else:
                    out.append(Claim.DONE if cur == "d" else Claim.BUSY)
            db.execute("COMMIT")
            return Answer(out, lost)
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def apply(self, b: Batch) -> Answer:
        with self._lock:
            return self._apply_locked(b)

    def done_in(self, pipeline: Any, key: str, token: str) -> None:
        self.done_many_in(pipeline, [(key, token)])

    async def done_in_async(self, pipeline: Any, key: str, token: str) -> None:
        self.done_many_in(pipeline, [(key, token)])

    def done_many_in(self, pipeline: Any, marks: list[tuple[str, str]]) -> None:
        raise TypeError("the embedded store has no shared transaction; configure idempotency.redisUrl")

    async def done_many_in_async(self, pipeline: Any, marks: list[tuple[str, str]]) -> None:
        self.done_many_in(pipeline, marks)

    async def check(self) -> dict[str, Any]:
        return {"maxmemory_policy": "noeviction"}

    async def close(self) -> None:
        await asyncio.to_thread(self._db.close)
