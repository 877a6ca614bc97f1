"""The idempotency store: has this message already been handled, or is someone on it?

Each key is in one of two states: *claimed* (value = owner, with a lease TTL) or *done*
(value `d`, long TTL). Claiming a batch is one round trip (a Lua script), and the done
marks of the previous batch ride along in the same call. Results per key:

- CLAIMED: ours now, run the handler;
- DONE: handled before, skip it and let the offset move on;
- BUSY: claimed by a live worker elsewhere: wait for it, never skip and never run;
- MINE: claimed by this very process. Either another copy of the same key is in flight
  here (the runtime then waits for it, as for BUSY), or an earlier claim call succeeded
  but its answer was lost (the runtime then takes it as CLAIMED). Only the runtime knows
  which, from the keys it holds until their done marks are written.

A worker that dies leaves its claims to expire after `lease_ms`; replay then claims them.
Claims of long-running messages are renewed; claims of abandoned ones (partition revoked,
shutdown) are released so the next owner does not wait out the lease.

`RedisStore` is shared by every replica of a group. `SqliteStore` serves single-process
local runs without Redis and says so in a warning: it is not shared across replicas.
"""
from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from enum import IntEnum
from typing import Any, Protocol

from .errors import StoreUnavailable

log = logging.getLogger("afc.runtime.idempotency")


class Claim(IntEnum):
    CLAIMED = 0
    DONE = 1
    BUSY = 2
    MINE = 3


DONE_VALUE = b"d"

# Keys travel as one NUL-separated argument and the script adds the namespace: packing N
# separate arguments costs redis-py ~3 us each, more than the rest of the per-message work.
# (So the script touches keys it was not given in KEYS: fine on one Redis, not on a Cluster.)
_CLAIM_LUA = """
local ns, owner, lease, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
for k in string.gmatch(ARGV[5], "([^%z]+)") do redis.call('SET', ns .. k, 'd', 'EX', ttl) end
local out = {}
for k in string.gmatch(ARGV[6], "([^%z]+)") do
  local old = redis.call('SET', ns .. k, owner, 'NX', 'PX', lease, 'GET')
  if not old then out[#out + 1] = '0'
  elseif old == 'd' then out[#out + 1] = '1'
  elseif old == owner then redis.call('PEXPIRE', ns .. k, lease); out[#out + 1] = '3'
  else out[#out + 1] = '2' end
end
return table.concat(out)
"""

_IF_OWNER_LUA = """
local ns, owner, op, lease = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local n = 0
for k in string.gmatch(ARGV[5], "([^%z]+)") do
  if redis.call('GET', ns .. k) == owner then
    if op == 'release' then redis.call('DEL', ns .. k) else redis.call('PEXPIRE', ns .. k, lease) end
    n = n + 1
  end
end
return n
"""


class IdempotencyStore(Protocol):
    owner: str

    def full_key(self, key: str) -> str: ...
    def done_in(self, pipeline: Any, key: str) -> None: ...
    async def claim(self, keys: list[str], done: list[str]) -> list[Claim]: ...
    async def mark_done(self, keys: list[str]) -> None: ...
    async def release(self, keys: list[str]) -> int: ...
    async def renew(self, keys: list[str]) -> int: ...
    async def close(self) -> None: ...


_BY_CODE = {48 + c.value: c for c in Claim}


def _parse(codes: bytes | str) -> list[Claim]:
    if isinstance(codes, str):
        codes = codes.encode()
    by = _BY_CODE
    return [by[c] for c in codes]


class RedisStore:
    """Shared store; keys are `<prefix>:idem:<group>:<idempotency key>`. The API takes the
    idempotency keys themselves; `full_key` is the Redis key (for `done_in`)."""

    def __init__(self, url: str, prefix: str, group: str, owner: str, lease_ms: int, done_ttl_s: int) -> None:
        import redis
        import redis.asyncio as aredis
        self.namespace = f"{prefix}:idem:{group}:"
        self.owner = owner
        self.lease_ms = lease_ms
        self.done_ttl_s = done_ttl_s
        # A bounded pool that waits for a free connection: many concurrent callers (routing a
        # burst of failures) must queue, not fail with "Too many connections".
        pool = aredis.BlockingConnectionPool.from_url(url, max_connections=16, timeout=10, socket_timeout=5,
                                                      socket_connect_timeout=3, health_check_interval=30)
        self._r = aredis.Redis(connection_pool=pool)
        self._claim = self._r.register_script(_CLAIM_LUA)
        self._if_owner = self._r.register_script(_IF_OWNER_LUA)
        self._errors = (redis.ConnectionError, redis.TimeoutError, OSError)

    def full_key(self, key: str) -> str:
        return self.namespace + key

    def _claim_args(self, keys: list[str], done: list[str]) -> list[Any]:
        return [self.namespace, self.owner, self.lease_ms, self.done_ttl_s, "\0".join(done), "\0".join(keys)]

    async def claim(self, keys: list[str], done: list[str]) -> list[Claim]:
        if not keys and not done:
            return []
        try:
            codes = await self._claim(keys=[], args=self._claim_args(keys, done))
        except self._errors as e:
            raise StoreUnavailable(f"redis: {e}") from e
        return _parse(codes)

    async def mark_done(self, keys: list[str]) -> None:
        await self.claim([], keys)

    async def _owned(self, keys: list[str], op: str) -> int:
        if not keys:
            return 0
        try:
            return int(await self._if_owner(keys=[], args=[self.namespace, self.owner, op, self.lease_ms,
                                                           "\0".join(keys)]))
        except self._errors as e:
            raise StoreUnavailable(f"redis: {e}") from e

    async def release(self, keys: list[str]) -> int:
        return await self._owned(keys, "release")

    async def renew(self, keys: list[str]) -> int:
        return await self._owned(keys, "renew")

    def done_in(self, pipeline: Any, key: str) -> None:
        """Add the done mark of `key` to the caller's Redis MULTI, so the effect and the mark
        commit together: exactly-once effects for handlers whose effect lives in this Redis."""
        pipeline.set(self.full_key(key), DONE_VALUE, ex=self.done_ttl_s)

    async def ping(self) -> None:
        try:
            await self._r.ping()
        except self._errors as e:
            raise StoreUnavailable(f"redis: {e}") from e

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

    def _claim_locked(self, keys: list[str], done: list[str]) -> list[Claim]:
        now = time.time()
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("INSERT OR REPLACE INTO idem VALUES (?, 'd', ?)",
                           [(k, now + self.done_ttl_s) for k in done])
            out = []
            for k in keys:
                row = db.execute("SELECT v, exp FROM idem WHERE k = ?", (k,)).fetchone()
                if row is not None and row[0] == "d" and row[1] > now:
                    out.append(Claim.DONE)
                elif row is None or row[1] <= now or row[0] == self.owner:
                    db.execute("INSERT OR REPLACE INTO idem VALUES (?, ?, ?)", (k, self.owner, now + self.lease_s))
                    out.append(Claim.CLAIMED if row is None or row[1] <= now else Claim.MINE)
                else:
                    out.append(Claim.BUSY)
            db.execute("COMMIT")
            return out
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def claim(self, keys: list[str], done: list[str]) -> list[Claim]:
        with self._lock:
            return self._claim_locked([self.namespace + k for k in keys], [self.namespace + k for k in done])

    async def mark_done(self, keys: list[str]) -> None:
        await self.claim([], keys)

    def _owned(self, keys: list[str], release: bool) -> int:
        with self._lock:
            n = 0
            for k in (self.namespace + k for k in keys):
                if release:
                    n += self._db.execute("DELETE FROM idem WHERE k = ? AND v = ?", (k, self.owner)).rowcount
                else:
                    n += self._db.execute("UPDATE idem SET exp = ? WHERE k = ? AND v = ?",
                                          (time.time() + self.lease_s, k, self.owner)).rowcount
            return n

    async def release(self, keys: list[str]) -> int:
        return self._owned(keys, True)

    async def renew(self, keys: list[str]) -> int:
        return self._owned(keys, False)

    def done_in(self, pipeline: Any, key: str) -> None:
        raise TypeError("the embedded store has no shared transaction; configure idempotency.redisUrl")

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        await asyncio.to_thread(self._db.close)


class Coalescer:
    """Joins single-key claims and done marks made in the same loop tick into one store
    call, so a burst of concurrent callers (the router, one task per failed record) costs
    one round trip instead of one connection each."""

    def __init__(self, store: IdempotencyStore) -> None:
        self.store = store
        self._claims: list[tuple[str, asyncio.Future[Claim]]] = []
        self._done: list[tuple[str, asyncio.Future[None]]] = []
        self._scheduled = False

    async def claim(self, key: str) -> Claim:
        fut: asyncio.Future[Claim] = asyncio.get_running_loop().create_future()
        self._claims.append((key, fut))
        self._schedule()
        return await fut

    async def mark_done(self, key: str) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._done.append((key, fut))
        self._schedule()
        await fut

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self._flush()))

    async def _flush(self) -> None:
        claims, self._claims = self._claims, []
        done, self._done = self._done, []
        self._scheduled = False
        try:
            codes = await self.store.claim([k for k, _ in claims], [k for k, _ in done])
        except Exception as e:  # noqa: BLE001 - every waiter sees the store's failure
            for _, f in (*claims, *done):
                if not f.done():
                    f.set_exception(e)
            return
        for (_, f), c in zip(claims, codes):
            if not f.done():
                f.set_result(c)
        for _, f in done:
            if not f.done():
                f.set_result(None)
