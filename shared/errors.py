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


class RequestTimeout(StepRunError, TimeoutError):
    """The client did not send the request (its body) in time (STEPRUN_BODY_TIMEOUT). A TimeoutError too, so
    that gunicorn, draining a body the app never read, treats it as a timed-out read and closes the connection."""

    status, code = 408, "request_timeout"


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


class TooManyStreams(RateLimited):
    """The user or the tenant already holds as many open streams as it may (``retry_after``: try again then)."""

    code = "too_many_streams"


class Unavailable(StepRunError):
    status, code = 503, "unavailable"
