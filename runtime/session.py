"""The idempotency session: the one owner of this process's claims, done marks, releases
and heartbeats, batched into as few store calls as the loop's ticks allow.

The control loop asks (`claim`, `done`, `release`; the router asks for its markers with
`claim_key`/`done_key`/`release_key`); `flush` sends what is pending and hands the
answers back to the loop through `post`, so no answer mutates loop state from anywhere but
the loop.

- Up to MAX_CLAIM_CALLS calls with claims are in flight at once, so a batch fetched while
  the previous one's claims are on their way goes out at once instead of queueing behind
  them; their answers are handed to the loop in the order the calls were made (fetch
  order), whatever order they come back in. Beside them, at most one call with only done
  marks, releases and heartbeats.
- Claims carry fencing tokens `<owner>.<seq>`. A call that fails with an unknown outcome is
  retried with the same tokens first (alone, before any new claim call), so a claim that did
  land is answered CLAIMED instead of waiting out its own lease; answers of later calls wait
  for it, so the order holds across failures too.
- Every call is also this owner's heartbeat, which keeps all its claims alive at once (no
  per-key renewal). While claims are held, a call goes out at least every third of the
  lease. A call that finds the heartbeat expired reports every claim held before it as lost
  (some may have been taken over: the worker keeps running, but its done mark cannot apply
  to a new owner's claim, and `mark_done_in` refuses).
- A message counts as finished for offsets only once its done mark is written: the loop
  commits past it after the store acknowledged, never before.
- Health: any failed call marks the store down (calls are then retried with back-off); any
  successful call marks it up. Whoever notices first, claim, done mark, heartbeat or release,
  it is the same flag, so it always clears.
"""
from __future__ import annotations

import asyncio
from collections import deque
from itertools import count
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import StoreUnavailable
from .idempotency import Batch, Claim, IdempotencyStore

log = logging.getLogger("afc.runtime.session")

MARK_BATCH = 256         # done marks that go in a call of their own at once...
MARK_LINGER_S = 0.005    # ...or once the oldest has waited this long; else they ride the next claim call
MAX_CLAIM_CALLS = 4      # claim calls in flight at once (answers still applied in call order)
Target = Any          # a Message (runtime claim) or an asyncio.Future (a router's marker)


@dataclass(eq=False)
class ClaimCall:
    """One call carrying claims, kept in call order until its answer is handed over."""
    seq0: int
    keys: list[str]
    targets: list["Target"]               # beside keys: the answer is zipped with them in C
    futures: bool = False                 # some targets are a router's futures (not messages)
    state: str = "flying"                 # flying | answered | failed
    outcome: "Outcome | None" = None


@dataclass
class Outcome:
    """What one store call settled, handed to the loop."""
    claims: list[tuple[Target, Claim]] = field(default_factory=list)
    written: list[Any] = field(default_factory=list)      # messages whose done mark is in the store
    lost: list[str] = field(default_factory=list)         # keys whose claim went to someone else
    error: StoreUnavailable | None = None


class Session:
    def __init__(self, store: IdempotencyStore, lease_ms: int, post: Callable[[Outcome], None],
                 wake: Callable[[], None] = lambda: None, clock: Callable[[], float] = time.monotonic,
                 claim_latency: Callable[[float], None] = lambda s: None) -> None:
        self.store, self.lease_s, self.post, self.wake, self.clock = store, lease_ms / 1000, post, wake, clock
        self.claim_latency = claim_latency          # observes each claim call's round trip (seconds)
        self.owner = store.owner
        self.seq = 0
        self.held: dict[str, str] = {}               # key -> token of the claims we hold
        self._keys: list[str] = []                   # claims asked since the last call...
        self._targets: list[Target] = []             # ...and whom each answer goes to
        self._futures = False                        # a router's future is among the targets
        self._calls: deque[ClaimCall] = deque()     # claim calls not yet handed over, in call order
        self._done: list[tuple[str, str, Any]] = []                       # (key, token, message or future)
        self._release: list[tuple[str, str]] = []
        self.down_since: float | None = None
        self.retry_at = 0.0
        self._backoff = 0.2
        self.tasks: set[asyncio.Task[None]] = set()          # calls carrying claims, in flight
        self.mark_task: asyncio.Task[None] | None = None     # a call with done marks/releases/heartbeat only
        self._beat_at = 0.0                 # start of the last call that reached the store
        self._marks_since = 0.0             # when the oldest pending done mark was queued
        self.calls = 0

    # ---------------------------------------------------------------- asks (loop only)

    def claim(self, key: str, target: Target) -> None:
        """(The loop flushes at the end of the tick that asked; only callers outside a tick,
        the router's marker calls, need to wake it.)"""
        self._keys.append(key)
        self._targets.append(target)

    def claim_all(self, keys: list[str], targets: list[Target]) -> None:
        """`claim` for a fetched batch: keys[i] for targets[i]."""
        self._keys += keys
        self._targets += targets

    def done(self, key: str, token: str, target: Any) -> None:
        """Queue the done mark; `target` comes back in `Outcome.written` once it is stored."""
        self.done_all([(key, token, target)])

    def done_all(self, marks: list[tuple[str, str, Any]]) -> None:
        """`done` for many (key, token, target), in order: one call per batch of results."""
        held = self.held
        for key, token, _ in marks:
            if held.get(key) == token:
                del held[key]
        if not self._done:
            self._marks_since = self.clock()
        self._done.extend(marks)

    def release(self, key: str, token: str) -> None:
        self._unhold(key, token)
        self._release.append((key, token))

    def _unhold(self, key: str, token: str) -> None:
        if self.held.get(key) == token:
            del self.held[key]

    # The router's single-key calls (routing markers) ride in the same batches.
    async def claim_key(self, key: str) -> tuple[Claim, str]:
        fut: asyncio.Future[tuple[Claim, str]] = asyncio.get_running_loop().create_future()
        self.claim(key, fut)
        self._futures = True
        self.wake()
        return await fut

    async def done_key(self, key: str, token: str) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.done(key, token, fut)
        self.wake()
        await fut

    def release_key(self, key: str, token: str) -> None:
        self.release(key, token)
        self.wake()

    @property
    def down(self) -> bool:
        return self.down_since is not None

    @property
    def pending(self) -> bool:
        return bool(self._keys or self._failed_calls() or self._done or self._release)

    @property
    def busy(self) -> bool:
        return bool(self.tasks) or (self.mark_task is not None and not self.mark_task.done())

    def _failed_calls(self) -> list[ClaimCall]:
        return [c for c in self._calls if c.state == "failed"]

    def token_of(self, seq: int) -> str:
        return f"{self.owner}.{seq}"

    # ---------------------------------------------------------------- the call

    def flush(self) -> bool:
        """Start store calls with what is pending; True if one started.

        Claims go out at once while fewer than MAX_CLAIM_CALLS claim calls are in flight
        (answers are handed over in call order, see `_hand_over`). A call whose outcome is
        unknown is resent alone, with its tokens, before any new claim. Done marks alone wait
        up to MARK_LINGER_S for company (a claim call, or MARK_BATCH of them): at a low rate,
        one store call per fetched batch instead of two."""
        now = self.clock()
        if self.down_since is not None and now < self.retry_at:
            return False
        marks_free = self.mark_task is None or self.mark_task.done()
        failed = self._failed_calls()
        call: ClaimCall | None = None
        if failed:
            if not self.tasks:                # one resend at a time, alone
                call = failed[0]
                call.state = "flying"
        elif self._keys and len(self.tasks) < MAX_CLAIM_CALLS:
            call = ClaimCall(self.seq, self._keys, self._targets, self._futures)
            self._keys, self._targets, self._futures = [], [], False
            self.seq += len(call.keys)
            self._calls.append(call)
        if call is None and not (marks_free and (self._beat_due(now) or self._release or (self._done and (
                len(self._done) >= MARK_BATCH or now - self._marks_since >= MARK_LINGER_S)))):
            return False
        done, self._done = self._done, []
        release, self._release = self._release, []
        seq0, keys = (call.seq0, call.keys) if call is not None else (self.seq, [])
        batch = Batch(keys, seq0, [(k, t) for k, t, _ in done], release, beat=True)
        self._beat_at = max(self._beat_at, now)   # (a failed call puts it back: see _failed)
        task = asyncio.get_running_loop().create_task(self._call(batch, call, done, release))
        if call is not None:
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        else:
            self.mark_task = task
        return True

    def _beat_due(self, now: float) -> bool:
        """Claims are held and no call went out for a third of the lease."""
        return bool(self.held) and now - self._beat_at >= self.lease_s / 3

    async def _call(self, batch: Batch, call: ClaimCall | None, done: list[tuple[str, str, Any]],
                    release: list[tuple[str, str]]) -> None:
        self.calls += 1
        t0 = time.perf_counter()
        try:
            answer = await self.store.apply(batch)
        except StoreUnavailable as e:
            self._failed(e, call, done, release)
            return
        except Exception as e:  # noqa: BLE001 - an unexpected store error is treated as the store being down
            log.exception("event=store-call-failed error=%r", e)
            self._failed(StoreUnavailable(repr(e)), call, done, release)
            return
        if call is not None:
            self.claim_latency(time.perf_counter() - t0)
        now = self.clock()
        if self.down_since is not None:
            log.warning("event=idempotency-store-back down_s=%.1f", now - self.down_since)
            self.down_since = None
        self._backoff = 0.2
        out = Outcome()
        if answer.lost:                       # our heartbeat had expired: whatever we held may be taken
            out.lost = list(self.held)
            self.held.clear()
        if call is not None:
            self._answer(call, answer.claims, out)
        for _, _, target in done:
            if isinstance(target, asyncio.Future):
                if not target.done():
                    target.set_result(None)
            elif target is not None:
                out.written.append(target)
        if call is None:
            self.post(out)
            return
        call.state, call.outcome = "answered", out
        self._hand_over()

    def _answer(self, call: ClaimCall, codes: list[Claim], out: Outcome) -> None:
        """Claims answered: tokens for those we now hold, the answers for the loop (a
        router's futures are resolved here). Per message: only a claimed one costs a step."""
        held, prefix, claimed = self.held, self.owner + ".", Claim.CLAIMED
        if not call.futures:
            for i, key, target, code in zip(count(call.seq0), call.keys, call.targets, codes):
                if code is claimed:
                    target.token = held[key] = prefix + str(i)     # token_of, inlined
            out.claims = list(zip(call.targets, codes))
            return
        claims = out.claims
        for i, key, target, code in zip(count(call.seq0), call.keys, call.targets, codes):
            token = prefix + str(i)
            if code is claimed:
                held[key] = token
            if isinstance(target, asyncio.Future):
                if not target.done():
                    target.set_result((code, token))
                continue
            if code is claimed:
                target.token = token
            claims.append((target, code))

    def _hand_over(self) -> None:
        """Post the answered calls at the head of the line: a call's claims never reach the
        loop before those of a call made earlier, which may still be flying or be resent."""
        while self._calls and self._calls[0].state == "answered":
            c = self._calls.popleft()
            assert c.outcome is not None
            self.post(c.outcome)

    def _failed(self, e: StoreUnavailable, call: ClaimCall | None, done: list[tuple[str, str, Any]],
                release: list[tuple[str, str]]) -> None:
        now = self.clock()
        self._beat_at = 0.0                   # no heartbeat landed for sure: due again at once
        if self.down_since is None:
            self.down_since = now
            log.error("event=idempotency-store-down action=pause-and-retry error=\"%s\"", str(e).replace('"', "'"))
        self.retry_at = now + self._backoff
        self._backoff = min(5.0, self._backoff * 2)
        if call is not None:
            call.state = "failed"             # same tokens: a claim that landed is answered CLAIMED
        self._done = done + self._done
        self._release = release + self._release
        self.post(Outcome(error=e))

    async def close(self) -> None:
        for t in [*self.tasks, self.mark_task]:
            if t is not None and not t.done():
                try:
                    await asyncio.wait_for(asyncio.shield(t), 5)
                except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - closing anyway
                    pass
