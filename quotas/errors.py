from portal.errors import SluiceError


class _RetryAfterError(SluiceError):
    """A rejection that may tell the client when to come back (`Retry-After`, seconds)."""

    def __init__(self, message: str | None = None, *, retry_after_s: int | None = None, **kwargs):
        if retry_after_s is not None:
            kwargs.setdefault("headers", {"Retry-After": str(retry_after_s)})
        super().__init__(message, **kwargs)


class InsufficientQuota(SluiceError):
    code = "insufficient_quota"
    http_status = 429
    default_message = "You exceeded your CU budget for this period."
    retryable = False  # until the period rolls over or the budget is raised


class RateLimitExceeded(_RetryAfterError):
    code = "rate_limit_exceeded"
    http_status = 429
    default_message = "Rate limit reached for CU per minute."


class SystemOverloaded(_RetryAfterError):
    code = "system_overloaded"
    http_status = 503
    default_message = "The GPU pool is saturated. Retry later."
