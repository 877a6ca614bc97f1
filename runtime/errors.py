"""Error types a handler may raise to say how its failure should be treated.

Anything else is classified by `routing` from its class (and configuration).
"""
from __future__ import annotations


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
