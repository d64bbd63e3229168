"""Domain errors. The API maps each to its HTTP status; nothing else knows HTTP."""
from __future__ import annotations


class StepRunError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, field: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.retry_after = retry_after


class BadInput(StepRunError):
    status, code = 400, "invalid_request"


class Unauthorized(StepRunError):
    status, code = 401, "unauthorized"


class Forbidden(StepRunError):
    status, code = 403, "forbidden"


class NotFound(StepRunError):
    status, code = 404, "not_found"


class Conflict(StepRunError):
    status, code = 409, "conflict"


class Gone(StepRunError):
    status, code = 410, "cursor_expired"


class TooLarge(StepRunError):
    status, code = 413, "too_large"


class QuotaExceeded(TooLarge):
    """A storage quota of the user or the tenant is full: the write would pass it (deleting frees room)."""

    code = "quota_exceeded"


class RateLimited(StepRunError):
    status, code = 429, "rate_limited"


class BudgetExhausted(RateLimited):
    """A token budget of the user or the tenant is spent until its period resets (``retry_after``)."""

    code = "budget_exceeded"


class Unavailable(StepRunError):
    status, code = 503, "unavailable"
