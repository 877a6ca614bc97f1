"""The idempotency store: has this message already been handled, or is someone on it?

One Redis write per message. A claim writes the key once, with the claim's fencing token
(`<owner>.<seq>`, unique per process incarnation and claim) and the long done TTL, and that
write stays: the key becomes "done" without being written again. What a token means is
read from two per-owner records, each written once per call, not per message:

- the owner's **heartbeat** (`~a:<owner>`, TTL = the lease), set by every call: while it
  lives, the owner's unfinished claims are BUSY to everyone else; once it expires (the
  process died or froze past its lease), they can be taken over;
- the owner's **done bits** (`~d:<owner>:<chunk>`, one bit per claim sequence number, set
  with one BITFIELD per call for all of that call's done marks).

So a claim answers CLAIMED (ours now; also when the key already holds this very token, i.e.
an earlier answer of the same claim was lost), DONE (the key is `d`, or its token's done bit
is set: handled before, skip it), or BUSY (its token's owner is alive and has not finished:
wait, never run). A token whose owner is gone and whose bit is unset is taken over
(CLAIMED): the work never finished.

Fencing: a done mark sets the bit of *our* token, which only matters while the key still
holds it: a worker whose heartbeat expired and whose key was taken over cannot mark the new
owner's claim done, nor release it (a release deletes the key only while it holds our token).
When a call finds our own heartbeat gone, every claim we hold is reported lost (some may have
been taken). `done_in` puts a `d` into the user's own MULTI guarded by WATCH and a token
check, so a stale owner's transaction fails as a whole (`ClaimLost`), effect included;
`done_many_in` does the same for a batch handler's messages in one MULTI. Heartbeats do not
touch the keys, so no renewal can refuse a WATCHed transaction.

All operations of one loop tick go to the store in one call (`apply`): heartbeat, done marks,
releases and claims. `RedisStore` is shared by every replica of a group; `SqliteStore`
serves single-process local runs without Redis and says so in a warning.
"""
from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
import zlib
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Protocol

from .errors import ClaimLost, StoreUnavailable
from .redisconn import async_client, is_cluster_url, redis_errors

log = logging.getLogger("afc.runtime.idempotency")


class Claim(IntEnum):
    CLAIMED = 0
    DONE = 1
    BUSY = 2


DONE_VALUE = b"d"
EVICTING_POLICIES = ("allkeys-lru", "allkeys-lfu", "allkeys-random", "volatile-lru", "volatile-lfu",
                     "volatile-random", "volatile-ttl")

# Done marks are the bits of our claims' sequence numbers; the script sorts them and sets each
# run of consecutive ones (a fetched batch's claims are numbered in a row and mostly finish
# together) with one SETRANGE of whole bytes and single bits only at its ends: turning every
# mark into a BITFIELD operation cost Redis 1.1-1.6 us per message, runs 0.4 (probe on the test
# bed's Redis, 800 marks per call; docs/performance.md).
# Keys and tokens travel as NUL-separated arguments and the script adds the namespace:
# packing N separate arguments costs redis-py ~3 us each, more than the rest of the
# per-message work. (So the script touches keys it was not given in KEYS: fine on one
# Redis, not on a Cluster.) Claim tokens are `owner .. '.' .. (seq0 + i)`: one argument;
# done marks are the sequence numbers of our own tokens.
DONE_CHUNK = 65536              # claims per done-bit key (8 KiB of bits)
BITFIELD_MARKS = 1000           # done marks per BITFIELD command (Lua's unpack() has a limit)
_APPLY_LUA = """
local ns, owner, seq0, lease, ttl, first = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5], ARGV[6]
local CH, PER = %d, %d
local alive = ns .. '~a:' .. owner
local lost = '0'
if first == '1' then redis.call('SET', alive, '1', 'PX', lease)
elseif not redis.call('SET', alive, '1', 'PX', lease, 'XX') then
  lost = '1'
  redis.call('SET', alive, '1', 'PX', lease)
end
local chunks = {}
local function bits(c, lo, hi)
  local a = chunks[c]
  if not a then a = {}; chunks[c] = a end
  local m = #a
  for b = lo, hi do
    a[m + 1] = 'SET'; a[m + 2] = 'u1'; a[m + 3] = b; a[m + 4] = 1
    m = m + 4
  end
end
local marks, nd = {}, 0      -- (not `seqs`: the Cluster's script has a `seqs` of its own)
for s in string.gmatch(ARGV[7], "([^%%z]+)") do nd = nd + 1; marks[nd] = tonumber(s) end
if nd > 1 then table.sort(marks) end
local mi = 1
while mi <= nd do
  local lo = marks[mi]
  local hi = lo
  mi = mi + 1
  while mi <= nd and marks[mi] <= hi + 1 do
    if marks[mi] > hi then hi = marks[mi] end
    mi = mi + 1
  end
  while lo <= hi do
    local c = math.floor(lo / CH)
    local l, h = lo - c * CH, math.min(hi, c * CH + CH - 1) - c * CH
    lo = c * CH + h + 1
    local b0, b1 = math.ceil(l / 8), math.floor((h + 1) / 8) - 1
    if b1 > b0 then
      bits(c, l, b0 * 8 - 1)
      redis.call('SETRANGE', ns .. '~d:' .. owner .. ':' .. c, b0, string.rep('\\255', b1 - b0 + 1))
      bits(c, b1 * 8 + 8, h)
    else
      bits(c, l, h)
    end
  end
end
for c, a in pairs(chunks) do
  local key = ns .. '~d:' .. owner .. ':' .. c
  for j = 1, #a, 4 * PER do
    redis.call('BITFIELD', key, unpack(a, j, math.min(#a, j + 4 * PER - 1)))
  end
  redis.call('EXPIRE', key, ttl)
end
local k
for x in string.gmatch(ARGV[8], "([^%%z]+)") do
  if not k then k = x else
    if redis.call('GET', ns .. k) == x then redis.call('DEL', ns .. k) end
    k = nil
  end
end
local out, i = {}, seq0
local prefix = owner .. '.'
for key in string.gmatch(ARGV[9], "([^%%z]+)") do
  local token = prefix .. i
  i = i + 1
  local full = ns .. key
  local old = redis.call('SET', full, token, 'NX', 'EX', ttl, 'GET')
  if not old or old == token then out[#out + 1] = '0'
  elseif old == 'd' then out[#out + 1] = '1'
  else
    local o, sq = string.match(old, '^(.*)%%.(%%d+)$')
    if not o then out[#out + 1] = '2'
    else
      local n = tonumber(sq)
      local c = math.floor(n / CH)
      if redis.call('GETBIT', ns .. '~d:' .. o .. ':' .. c, n - c * CH) == 1 then out[#out + 1] = '1'
      elseif redis.call('EXISTS', ns .. '~a:' .. o) == 1 then out[#out + 1] = '2'
      else
        redis.call('SET', full, token, 'EX', ttl)
        out[#out + 1] = '0'
      end
    end
  end
end
return {table.concat(out), lost}
""" % (DONE_CHUNK, BITFIELD_MARKS)

# ---------------------------------------------------------------------------- Redis Cluster
# A Lua script may only touch keys of one slot on a Cluster, so the keys are spread over
# BUCKETS hash-tagged namespaces `<prefix>:idem:<group>:{<tag>}:`, each with its own copy of
# the owner's heartbeat and done bits, and one script call per bucket touches one slot only.
# The bucket is a stable hash of the idempotency key (not the partition: the same key from
# another partition or the retry topic must find the same claim). The tags are pinned short
# strings whose CRC16 slot lies near the middle of each 1/BUCKETS of 0..16383, so buckets spread
# over the masters as evenly as the slots do: 12 buckets split exactly over 2, 3, 4 or 6 masters
# of an evenly sliced cluster (tests/unit/test_idempotency_buckets.py). More buckets spread
# finer but cost a command per bucket per call; changing BUCKETS or a tag moves every key
# (claims and done marks would no longer be found), so they are constants, not settings.
BUCKET_TAGS = ("t3", "f1", "n", "e1", "w3", "o", "mz", "jb", "l", "8p", "nz", "i")
BUCKETS = len(BUCKET_TAGS)
CLUSTER_MAX_CONNECTIONS = 64    # per node; a cluster pool raises at once when exhausted (redisconn)
CLUSTER_RETRIES = 3             # redis-py's retries of one command (topology, check, script load)


def bucket_of(key: str) -> int:
    """The bucket of an idempotency key: stable across processes and versions (CRC32)."""
    return zlib.crc32(key.encode()) % BUCKETS


def _derive_cluster_lua(single: str) -> str:
    """The same script for one bucket, told each claim's sequence number (a bucket's claims are
    not consecutive ones of the batch): ARGV[3] is NUL-separated sequence numbers, not seq0.
    KEYS[1] is the bucket's heartbeat key: it routes the call to the bucket's slot, which every
    key the script touches shares (the other owners' heartbeat and done-bit keys it reads on the
    slow path cannot be known in advance; Redis 7 runs a script without a shebang in its
    compatibility mode, which lets it touch undeclared keys of the declared slot and refuses
    any other slot)."""
    edits = (("local ns, owner, seq0, lease, ttl, first = ARGV[1], ARGV[2], tonumber(ARGV[3]),",
              "local ns, owner, seqs, lease, ttl, first = ARGV[1], ARGV[2], string.gmatch(ARGV[3], \"([^%z]+)\"),"),
             ("local out, i = {}, seq0\n", "local out = {}\n"),
             ("  local token = prefix .. i\n  i = i + 1\n", "  local token = prefix .. seqs()\n"))
    for old, new in edits:
        assert single.count(old) == 1, old
        single = single.replace(old, new)
    return single


_CLUSTER_LUA = _derive_cluster_lua(_APPLY_LUA)


@dataclass
class Batch:
    """One call's worth of store operations. Claims get tokens `owner.seq0+i` in order.
    Every call is also the owner's heartbeat; `beat` asks for a call with nothing else."""
    claims: list[str] = field(default_factory=list)
    seq0: int = 0
    done: list[tuple[str, str]] = field(default_factory=list)       # (key, token)
    release: list[tuple[str, str]] = field(default_factory=list)
    beat: bool = False

    def __bool__(self) -> bool:
        return bool(self.claims or self.done or self.release or self.beat)


@dataclass
class Answer:
    claims: list[Claim]
    lost: bool = False              # our heartbeat had expired: claims held before may be taken


class IdempotencyStore(Protocol):
    owner: str

    def full_key(self, key: str) -> str: ...
    def hash_tag(self, key: str) -> str: ...
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


def _pack(args: list[Any]) -> bytes:
    """One RESP command (an array of bulk strings) from str, int and bytes arguments."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def _pairs(items: list[tuple[str, str]]) -> str:
    return "\0".join(f"{k}\0{t}" for k, t in items)


class RedisStore:
    """Shared store; keys are `<prefix>:idem:<group>:<idempotency key>` on one Redis, and
    `<prefix>:idem:<group>:{<bucket tag>}:<idempotency key>` on a Redis Cluster (a
    `redis+cluster://` URL; see BUCKET_TAGS and docs/redis-cluster.md)."""

    def __init__(self, url: str, prefix: str, group: str, owner: str, lease_ms: int, done_ttl_s: int) -> None:
        import redis
        import redis.asyncio as aredis
        self.namespace = f"{prefix}:idem:{group}:"
        self.owner = owner
        self.lease_ms = lease_ms
        self.done_ttl_s = done_ttl_s
        self.cluster = is_cluster_url(url)
        if self.cluster:
            self._init_cluster(url)
            return
        # A bounded pool that waits for a free connection: many concurrent callers must
        # queue, not fail with "Too many connections".
        pool = aredis.BlockingConnectionPool.from_url(url, max_connections=16, timeout=10, socket_timeout=5,
                                                      socket_connect_timeout=3, health_check_interval=30)
        self._r = aredis.Redis(connection_pool=pool)
        self._apply = self._r.register_script(_APPLY_LUA)
        self._conns: list[Any] = []     # connections kept for `apply` between calls (see _evalsha)
        self._beating = False           # a call has set our heartbeat (the next ones expect it)
        # OOM (maxmemory reached), READONLY (a replica after failover), LOADING, MASTERDOWN...
        # arrive as ResponseError: for us every one of them means "the store cannot take
        # this now", the same as a refused connection.
        self._errors = (redis.ConnectionError, redis.TimeoutError, redis.ResponseError, OSError)

    def _init_cluster(self, url: str) -> None:
        import redis
        if "{" in self.namespace:
            raise ValueError(f"on a Redis Cluster the key prefix and the group may not contain '{{' (the "
                             f"store's hash tags must be the first in every key): {self.namespace!r}")
        # The cluster client knows the slot layout and follows failovers; `apply` sends its
        # commands straight to the nodes' connections (see _cluster_calls). Pools are per node
        # and raise MaxConnectionsError instead of waiting (redisconn): one apply takes at most
        # one connection per master, the session keeps at most MAX_CLAIM_CALLS + 1 calls in
        # flight, so 64 per node leaves room for the users' mark_done_in WATCHes. Retries are
        # bounded: the session retries a failed call itself (same tokens) and counts the store
        # down meanwhile; redis-py's default (10, back-off up to 10 s) would hide a failover
        # inside one call for many seconds.
        self._r = async_client(url, max_connections=CLUSTER_MAX_CONNECTIONS, socket_timeout=5,
                               socket_connect_timeout=3, retries=CLUSTER_RETRIES)
        from redis.crc import key_slot
        self._ns = [f"{self.namespace}{{{t}}}:" for t in BUCKET_TAGS]      # one namespace per bucket
        self._alive = [ns + "~a:" + self.owner for ns in self._ns]         # our heartbeat, per bucket
        self._slots = [key_slot(t.encode()) for t in BUCKET_TAGS]
        self._beat_at = [float("-inf")] * BUCKETS     # when each bucket's heartbeat was last set
        import hashlib
        self._sha = hashlib.sha1(_CLUSTER_LUA.encode()).hexdigest()
        self._beating = False
        self._errors = (*redis_errors(), redis.ResponseError)

    def full_key(self, key: str) -> str:
        if self.cluster:
            return self._ns[bucket_of(key)] + key
        return self.namespace + key

    def hash_tag(self, key: str) -> str:
        """The hash tag of `key`'s claim on a Redis Cluster, braces included (`{t3}`), "" on one
        Redis: put it in your own keys that `mark_done_in` commits together with the done
        mark, e.g. `f"orders:{store.hash_tag(k)}:{order_id}"`, so one MULTI stays in one slot."""
        return "{" + BUCKET_TAGS[bucket_of(key)] + "}" if self.cluster else ""

    async def apply(self, b: Batch) -> Answer:
        if not b:
            return Answer([])
        if self.cluster:
            return await self._apply_cluster(b)
        plen = len(self.owner) + 1
        args = [self.namespace, self.owner, b.seq0, self.lease_ms, self.done_ttl_s, "0" if self._beating else "1",
                "\0".join([t[plen:] for _, t in b.done]), _pairs(b.release), "\0".join(b.claims)]
        try:
            codes, lost = await self._evalsha(args)
        except self._errors as e:
            raise StoreUnavailable(f"redis: {type(e).__name__}: {e}") from e
        # (a call whose outcome is unknown may have set the heartbeat or not: the next one
        # says "first" again, which can only miss a loss the session then learns of later)
        lost_now = self._beating and lost in (b"1", "1")
        self._beating = True
        return Answer(_parse(codes), lost_now)

    async def _evalsha(self, args: list[Any]) -> Any:
        """The apply script on a connection kept between calls, the command packed here.

        At a low rate a store call carries a handful of keys, and redis-py's layers around
        the wire (taking a connection from the blocking pool and giving it back, an encoder
        call per argument, the retry wrapper) cost more than the call's own work: measured at
        5 claims per call, about 60 % more CPU than this path. The session keeps at most
        MAX_CLAIM_CALLS + 1 calls in flight, so few connections are kept; an error that can
        leave a reply unread (a lost connection, a timeout, a cancellation) drops the
        connection instead of keeping it, and an error reply (OOM, READONLY, ...) leaves it
        in step."""
        import redis
        conns = self._conns
        kept = bool(conns)
        conn = conns.pop() if kept else await self._r.connection_pool.get_connection()
        try:
            try:
                await conn.send_packed_command(_pack(["EVALSHA", self._apply.sha, 0, *args]))
                out = await conn.read_response()
            except redis.exceptions.NoScriptError:       # a restarted or flushed Redis: load it again
                self._apply.sha = await self._r.script_load(_APPLY_LUA)
                await conn.send_packed_command(_pack(["EVALSHA", self._apply.sha, 0, *args]))
                out = await conn.read_response()
        except redis.ResponseError:
            conns.append(conn)
            raise
        except BaseException as e:
            await self._drop(conn)
            if kept and isinstance(e, (redis.ConnectionError, OSError)) and not isinstance(e, redis.TimeoutError):
                # A kept connection found closed (Redis restarted, an idle timeout): the others
                # likely are too. Drop them and try once on a new one, as redis-py's own retry
                # would; resending after an unknown outcome is safe (same tokens, see Session).
                for c in conns[:]:
                    conns.remove(c)
                    await self._drop(c)
                return await self._evalsha(args)
            raise
        conns.append(conn)
        return out

    async def _drop(self, conn: Any) -> None:
        await conn.disconnect()
        await self._r.connection_pool.release(conn)

    async def _apply_cluster(self, b: Batch) -> Answer:
        """`apply` on a Cluster: the batch split by bucket, one script call per bucket with work
        (it sets the bucket's heartbeat too), and `SET alive 1 PX lease GET` in each other bucket
        whose heartbeat is a third of the lease old, so the heartbeat lives in every bucket
        where a claim may be held (the session calls at least every third of the lease while
        it holds claims: a bucket is beaten at least every two thirds). One pipeline per master,
        the masters at once; the answers merged back in the batch's order. `lost`: a bucket's
        heartbeat had expired, as on one Redis (every claim held is reported lost).

        A failure of any part fails the call (StoreUnavailable); the session resends it whole
        with the same tokens: the buckets that did apply answer CLAIMED again for the same
        tokens, and done bits, releases and heartbeats are idempotent. The same holds for the
        one resend here after a redirection or a lost connection, and for redis-py's retries
        of a command after an unknown outcome; at worst a resend hides one heartbeat loss,
        which fencing covers (a stale owner's done mark or mark_done_in applies to nothing the
        new owner holds)."""
        n = BUCKETS
        plen = len(self.owner) + 1
        ckeys: list[list[str]] = [[] for _ in range(n)]
        cseqs: list[list[str]] = [[] for _ in range(n)]
        cpos: list[list[int]] = [[] for _ in range(n)]
        seq0 = b.seq0
        for i, k in enumerate(b.claims):
            j = zlib.crc32(k.encode()) % n
            ckeys[j].append(k)
            cseqs[j].append(str(seq0 + i))
            cpos[j].append(i)
        done: list[list[str]] = [[] for _ in range(n)]
        for k, t in b.done:
            done[zlib.crc32(k.encode()) % n].append(t[plen:])
        rel: list[list[tuple[str, str]]] = [[] for _ in range(n)]
        for k, t in b.release:
            rel[zlib.crc32(k.encode()) % n].append((k, t))
        first = "0" if self._beating else "1"
        now = time.monotonic()
        due = now - self.lease_ms / 3000
        cmds: dict[int, tuple[Any, ...]] = {}
        for j in range(n):
            if ckeys[j] or done[j] or rel[j]:
                cmds[j] = ("EVALSHA", self._sha, 1, self._alive[j], self._ns[j], self.owner, "\0".join(cseqs[j]),
                           self.lease_ms, self.done_ttl_s, first, "\0".join(done[j]), _pairs(rel[j]),
                           "\0".join(ckeys[j]))
            elif self._beat_at[j] <= due or not self._beating:
                cmds[j] = ("SET", self._alive[j], "1", "PX", self.lease_ms, "GET")
        try:
            res = await self._cluster_calls(cmds)
        except self._errors as e:
            raise StoreUnavailable(f"redis cluster: {type(e).__name__}: {e}") from e
        out = bytearray(len(b.claims))
        lost = False
        for j, r in res.items():
            self._beat_at[j] = now
            if cmds[j][0] == "EVALSHA":
                codes, lost_j = r
                if isinstance(codes, str):
                    codes = codes.encode()
                for pos, c in zip(cpos[j], codes):
                    out[pos] = c
                lost = lost or lost_j in (b"1", "1")
            else:
                lost = lost or r is None                 # SET ... GET: the heartbeat was missing
        lost_now = self._beating and lost
        self._beating = True
        return Answer(_parse(bytes(out)), lost_now)

    async def _cluster_calls(self, cmds: dict[int, tuple[Any, ...]]) -> dict[int, Any]:
        """Send each bucket's command to the master of its slot, one pipeline per master, all at
        once, on the cluster client's own node connections (redis-py's cluster pipeline works
        out every command's slot and command policy again, which took most of a call's client
        CPU in a profile). A NOSCRIPT (a new, restarted or promoted master) loads the script on
        that node; a MOVED points the slot at the node it names (as redis-py does); any other
        failure (a lost connection, a slot without a master while a failover is under way)
        reloads the slot layout and drops the node's idle connections. The failed commands are
        then sent again, at most twice (a reload can lead to a master that lacks the script, as
        after a fail-back); then the error is raised."""
        from redis.asyncio.cluster import PipelineCommand
        from redis.exceptions import MovedError, NoScriptError
        r = self._r
        if r._initialize:
            await r.initialize()
        results: dict[int, Any] = {}
        todo = dict(cmds)
        for attempt in range(3):                 # a reload can lead to a master without the script
            noscript: list[Any] = []
            try:
                by_node: dict[str, tuple[Any, list[tuple[int, Any]]]] = {}
                for j, args in todo.items():
                    node = r.nodes_manager.get_node_from_slot(self._slots[j])
                    by_node.setdefault(node.name, (node, []))[1].append((j, PipelineCommand(j, *args)))
            except self._errors as e:                       # SlotNotCoveredError: no master known for it
                results.update({j: e for j in todo})
            else:
                sent = await asyncio.gather(*(node.execute_pipeline([c for _, c in pcs])
                                              for node, pcs in by_node.values()), return_exceptions=True)
                for (node, pcs), out in zip(by_node.values(), sent):
                    for j, c in pcs:
                        results[j] = out if isinstance(out, BaseException) else c.result
                    if any(isinstance(results[j], NoScriptError) for j, _ in pcs):
                        noscript.append(node)
                    if isinstance(out, BaseException):       # its idle connections may be dead too
                        node.update_active_connections_for_reconnect()
                        await node.disconnect_free_connections()
            todo = {j: cmds[j] for j, v in results.items() if isinstance(v, BaseException)}
            if not todo:
                return results
            if attempt == 2:
                break
            moved = [results[j] for j in todo if isinstance(results[j], MovedError)]
            for e in moved:                                  # the node that serves the slot now, as it says
                await r.nodes_manager.move_slot(e)
            if any(not isinstance(results[j], (NoScriptError, MovedError)) for j in todo):
                await r.nodes_manager.initialize()           # the layout after a failover or a reshard
            for node in noscript:                            # load it where it was missing
                await node.execute_command("SCRIPT", "LOAD", _CLUSTER_LUA)
        raise next(iter(results[j] for j in todo))

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
        if self.cluster:
            strategy, stack, full = self._cluster_guard(pipeline, marks)
            try:
                pipeline.watch(*full)
            except Exception as e:
                raise self._cross_slot(e, marks) from e
            curs = pipeline.execute_command("MGET", *full)      # (MGET is immediate once WATCHing)
            self._check(marks, curs, pipeline.reset)
            self._cluster_queue(pipeline, strategy, stack, full)
            return
        stack = self._guard(pipeline)
        full = [self.full_key(k) for k, _ in marks]
        pipeline.watch(*full)
        curs = pipeline.mget(full)                   # one round trip for the whole batch
        self._check(marks, curs, pipeline.reset)
        self._queue(pipeline, stack, full)

    async def done_many_in_async(self, pipeline: Any, marks: list[tuple[str, str]]) -> None:
        """`done_many_in` for redis.asyncio pipelines (one Redis only, see below)."""
        if self.cluster:
            # redis-py 8.1's asyncio cluster transaction sends WATCH and every command before
            # MULTI through asyncio.run() in a thread of its own: it blocks this event loop for
            # the round trip and leaves the connection bound to a closed loop, so the next
            # command or the client's close fails with "Event loop is closed" (seen on the bed).
            raise TypeError("mark_done_in_async on a Redis Cluster: redis-py's asyncio cluster transactions are "
                            "not usable (WATCH runs in a throw-away event loop); use a sync cluster pipeline "
                            "with msg.mark_done_in, from a sync handler or asyncio.to_thread")
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

    def _cluster_guard(self, pipeline: Any, marks: list[tuple[str, str]]) -> tuple[Any, list[Any], list[str]]:
        """`_guard` for a cluster pipeline (redis-py's TransactionStrategy: WATCH, MULTI and EXEC
        on the connection to the master of one slot). Every key of the MULTI must be in ONE hash
        slot: the done marks of messages whose claims are in different buckets cannot share it."""
        strategy = getattr(pipeline, "_execution_strategy", None)
        if strategy is None or type(strategy).__name__ != "TransactionStrategy":
            raise TypeError("mark_done_in on a Redis Cluster needs a transactional cluster pipeline: "
                            "pipeline(transaction=True) of a RedisCluster client (afc.runtime.redisconn)")
        if strategy._explicit_transaction:
            raise TypeError("call mark_done_in before pipeline.multi()")
        tags = sorted({self.hash_tag(k) for k, _ in marks})
        if len(tags) > 1:
            raise ValueError(
                f"on a Redis Cluster every key of one MULTI must be in one hash slot, and these "
                f"{len(marks)} messages' claims carry {len(tags)} hash tags ({', '.join(tags)}): mark "
                f"them in one transaction per tag (group the batch by msg.hash_tag), or use "
                f"mark_done_in per message")
        stack = list(strategy._command_queue)
        strategy._command_queue.clear()
        return strategy, stack, [self.full_key(k) for k, _ in marks]

    def _cross_slot(self, e: Exception, marks: list[tuple[str, str]]) -> Exception:
        from redis.exceptions import CrossSlotTransactionError
        if isinstance(e, CrossSlotTransactionError):
            return ValueError(f"on a Redis Cluster the keys of your MULTI must share the claim's hash tag "
                              f"{self.hash_tag(marks[0][0])} (use msg.hash_tag in their names): {e}")
        return e

    def _cluster_queue(self, pipeline: Any, strategy: Any, stack: list[Any], full: list[str]) -> None:
        pipeline.multi()
        strategy._command_queue.extend(stack)
        for f in full:
            pipeline.set(f, DONE_VALUE, ex=self.done_ttl_s)

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
        """What the store says about its durability (`maxmemory-policy`); raises if down. On a
        Cluster every master is asked and the most dangerous policy is the answer (one evicting
        master loses that master's done marks)."""
        if self.cluster:
            from redis.asyncio.cluster import RedisCluster
            try:
                infos = await self._r.info("memory", target_nodes=RedisCluster.PRIMARIES)
            except self._errors as e:
                raise StoreUnavailable(f"redis cluster: {type(e).__name__}: {e}") from e
            policies = {node: i.get("maxmemory_policy", "unknown") for node, i in sorted(infos.items())}
            worst = next((p for p in EVICTING_POLICIES if p in policies.values()),
                         next((p for p in policies.values() if p != "noeviction"), "noeviction"))
            return {"maxmemory_policy": worst, "maxmemory_policies": policies}
        try:
            info = await self._r.info("memory")
        except self._errors as e:
            raise StoreUnavailable(f"redis: {type(e).__name__}: {e}") from e
        return {"maxmemory_policy": info.get("maxmemory_policy", "unknown")}

    async def close(self) -> None:
        if not self.cluster:
            conns, self._conns = self._conns, []
            for c in conns:
                await self._r.connection_pool.release(c)
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
        self._db.execute("CREATE TABLE IF NOT EXISTS alive (owner TEXT PRIMARY KEY, exp REAL NOT NULL)")
        self._beating = False

    def full_key(self, key: str) -> str:
        return self.namespace + key

    def hash_tag(self, key: str) -> str:
        return ""

    def _get(self, k: str, now: float) -> str | None:
        row = self._db.execute("SELECT v, exp FROM idem WHERE k = ?", (k,)).fetchone()
        return row[0] if row is not None and row[1] > now else None

    def _apply_locked(self, b: Batch) -> Answer:
        """The Redis script's rules, with a `d` written for each done mark (writes are cheap here)."""
        now, ns, db = time.time(), self.namespace, self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT exp FROM alive WHERE owner = ?", (self.owner,)).fetchone()
            lost = self._beating and (row is None or row[0] <= now)
            db.execute("INSERT OR REPLACE INTO alive VALUES (?, ?)", (self.owner, now + self.lease_s))
            for k, t in b.done:
                if self._get(ns + k, now) in (t, None):
                    db.execute("INSERT OR REPLACE INTO idem VALUES (?, 'd', ?)", (ns + k, now + self.done_ttl_s))
            for k, t in b.release:
                db.execute("DELETE FROM idem WHERE k = ? AND v = ?", (ns + k, t))
            out = []
            for i, k in enumerate(b.claims):
                token, cur = f"{self.owner}.{b.seq0 + i}", self._get(ns + k, now)
                if cur is None or cur == token or (cur != "d" and not self._alive(cur.rpartition(".")[0], now)):
                    db.execute("INSERT OR REPLACE INTO idem VALUES (?, ?, ?)", (ns + k, token, now + self.done_ttl_s))
                    out.append(Claim.CLAIMED)
                else:
                    out.append(Claim.DONE if cur == "d" else Claim.BUSY)
            db.execute("COMMIT")
            self._beating = True
            return Answer(out, lost)
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _alive(self, owner: str, now: float) -> bool:
        row = self._db.execute("SELECT exp FROM alive WHERE owner = ?", (owner,)).fetchone()
        return row is not None and row[0] > now

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
