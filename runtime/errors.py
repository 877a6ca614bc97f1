"""Error types a handler may raise to say how its failure should be treated.

Anything else is classified by `routing` from its class (and configuration).
"""
from __future__ import annotations

from typing import Any


class AfcError(Exception):
    """Base of afc's own errors."""


class TransientError(AfcError):
    """Worth retrying later: a timeout, a busy downstream."""


class PermanentError(AfcError):
    """Retrying cannot help (validation failed): dead-letter it."""


class PoisonError(AfcError):
    """The record itself is unprocessable: route it to the poison topic."""


class DecodeError(PoisonError):
    """The payload could not be decoded with the configured decoder."""


class StoreUnavailable(AfcError):
    """The idempotency store cannot be reached; the loop pauses rather than risk duplicates."""


class HandlerTimeout(TransientError):
    """The handler ran past `handler.timeoutS`: its message is failed and routed as TRANSIENT."""


class ClaimLost(AfcError):
    """This worker no longer holds the message's idempotency claim (its lease ran out and
    another worker took it): the effect must not be applied; the runtime re-checks the key."""


class BatchFailure(AfcError):
    """Raised by a batch handler (`@afc.runtime.batch`) to name the messages of its batch
    that failed, each with its own error: `raise BatchFailure({msg: exc, ...})`. Each named
    message is routed exactly as if a single handler had raised its error (retry, dead-letter,
    poison); every other message of the batch is done. Any other exception from a batch
    handler fails the whole batch (each message routed with that error)."""

    def __init__(self, failures: "dict[Any, BaseException]", message: str = "") -> None:
        failures = dict(failures)
        for m, e in failures.items():
            if not isinstance(e, BaseException):
                raise TypeError(f"BatchFailure: the error for {m!r} is {e!r}, not an exception")
        self.failures = failures
        super().__init__(message or f"{len(failures)} message(s) of the batch failed")
