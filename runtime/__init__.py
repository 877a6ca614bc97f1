"""afc.runtime: the adaptive consumer process (fetch, dedup, handle, commit, route).

What a handler module imports: `Message`, the error types, and for batch handlers the
`batch` marker, `BatchFailure` and `mark_batch_done_in` (docs/batch-handlers.md)."""
from .errors import BatchFailure, ClaimLost, PermanentError, PoisonError, TransientError
from .handlers import batch
from .message import Message, mark_batch_done_in, mark_batch_done_in_async

__all__ = ["BatchFailure", "ClaimLost", "Message", "PermanentError", "PoisonError", "TransientError", "batch",
           "mark_batch_done_in", "mark_batch_done_in_async"]
