from portal.errors import SluiceError


def _retry_after_headers(retry_after_s: int | None) -> dict[str, str]:
    return {"Retry-After": str(retry_after_s)} if retry_after_s is not None else {}


class InsufficientQuota(SluiceError):
    code = "insufficient_quota"
    http_status = 429
    default_message = "You exceeded your CU budget for this period."


class RateLimitExceeded(SluiceError):
    code = "rate_limit_exceeded"
    http_status = 429
    default_message = "Rate limit reached for CU per minute."

    def __init__(self, message: str | None = None, *, retry_after_s: int | None = None, **kwargs):
        kwargs.setdefault("headers", _retry_after_headers(retry_after_s))
        super().__init__(message, **kwargs)


class SystemOverloaded(SluiceError):
    code = "system_overloaded"
    http_status = 503
    default_message = "The GPU pool is saturated. Retry later."

    def __init__(self, message: str | None = None, *, retry_after_s: int | None = None, **kwargs):
        kwargs.setdefault("headers", _retry_after_headers(retry_after_s))
        super().__init__(message, **kwargs)
