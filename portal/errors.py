"""The one error type services raise, and the one DRF handler that renders it.

Body shape (DESIGN.md): {"error": {"type", "code", "message", "param"}}. Each app declares its
own subclasses in its errors.py; this module also maps DRF's and Django's own exceptions onto
the same codes so no response ever has another shape.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from django.core.exceptions import DisallowedHost, RequestDataTooBig, SuspiciousOperation
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404, JsonResponse
from rest_framework import exceptions as drf_exceptions
from rest_framework.response import Response

logger = logging.getLogger(__name__)

# OpenAI's `type` values, keyed by HTTP status, so SDKs map errors to their classes.
_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "server_error",
}


class SluiceError(Exception):
    """Base of every domain error. Subclasses set `code` and `http_status`."""

    code: str = "internal_error"
    http_status: int = 500
    default_message: str = "The server failed to process the request."
    # False: the same request cannot succeed later. OpenAI's SDKs retry 409, 429 and 5xx twice
    # with back-off unless the answer says `x-should-retry: false`.
    retryable: bool = True

    def __init__(
        self,
        message: str | None = None,
        *,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, object] | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.param = param
        self.headers = dict(headers or {})
        if not self.retryable:
            self.headers.setdefault("x-should-retry", "false")
        self.extra = dict(extra or {})
        super().__init__(self.message)

    @property
    def error_type(self) -> str:
        return _TYPE_BY_STATUS.get(self.http_status, "invalid_request_error")

    def body(self) -> dict:
        error = {
            "type": self.error_type,
            "code": self.code,
            "message": self.message,
            "param": self.param,
        }
        error.update(self.extra)
        return {"error": error}


class InvalidParameter(SluiceError):
    code = "invalid_parameter"
    http_status = 400
    default_message = "A parameter is invalid."


class InvalidApiKey(SluiceError):
    code = "invalid_api_key"
    http_status = 401
    # Deliberately the same text for every cause: no hint which part of a key was wrong.
    default_message = "Incorrect API key provided."

    def __init__(self, message: str | None = None, **kwargs) -> None:
        kwargs.setdefault("headers", {"WWW-Authenticate": 'Bearer realm="sluice"'})
        super().__init__(message, **kwargs)


class TenantSuspended(SluiceError):
    code = "tenant_suspended"
    http_status = 403
    default_message = "This tenant is suspended. Contact support to have it reviewed."


class PermissionDenied(SluiceError):
    code = "permission_denied"
    http_status = 403
    default_message = "Your role does not allow this action."


class NotFound(SluiceError):
    """Missing and "belongs to another tenant" are the same error on purpose."""

    code = "not_found"
    http_status = 404
    default_message = "Not found."


class MethodNotAllowed(SluiceError):
    code = "method_not_allowed"
    http_status = 405
    default_message = "Method not allowed."


class UnsupportedMediaType(SluiceError):
    code = "invalid_parameter"
    http_status = 415
    default_message = "Send the request body as application/json."


class RequestTooLarge(SluiceError):
    """A body over DATA_UPLOAD_MAX_MEMORY_SIZE."""

    code = "invalid_parameter"
    http_status = 413
    default_message = "The request body is larger than this server accepts."
    retryable = False


def _first_error(detail, path: str = "") -> tuple[str | None, str]:
    """Flatten a DRF ValidationError detail into (param path, first message)."""
    if isinstance(detail, Mapping):
        for key, value in detail.items():
            name = str(key) if key != "non_field_errors" else ""
            joined = f"{path}.{name}" if path and name else (name or path)
            return _first_error(value, joined)
    if isinstance(detail, list) and detail:
        first = detail[0]
        if isinstance(first, (Mapping, list)):
            return _first_error(first, f"{path}[0]" if path else path)
        return (path or None), str(first)
    return (path or None), str(detail)


def to_sluice_error(exc: Exception) -> SluiceError | None:
    """Translate framework exceptions into SluiceErrors; None for the unexpected."""
    if isinstance(exc, SluiceError):
        return exc
    if isinstance(exc, drf_exceptions.ValidationError):
        param, message = _first_error(exc.detail)
        if param:
            message = f"{param}: {message}"
        return InvalidParameter(message, param=param)
    # Django's own refusals of a request: a 500 from an API view, an HTML page from Django.
    if isinstance(exc, RequestDataTooBig):
        from django.conf import settings

        return RequestTooLarge(f"The request body is over {settings.DATA_UPLOAD_MAX_MEMORY_SIZE:,} "
                               "bytes, the most this server accepts.")
    if isinstance(exc, DisallowedHost):
        return InvalidParameter("This server does not answer to that Host header.", param="Host")
    if isinstance(exc, SuspiciousOperation):  # too many form fields or files
        return InvalidParameter(str(exc) or None)
    if isinstance(exc, drf_exceptions.ParseError):
        return InvalidParameter(f"Malformed request body: {exc.detail}")
    if isinstance(exc, drf_exceptions.UnsupportedMediaType):
        return UnsupportedMediaType()
    if isinstance(exc, (drf_exceptions.NotAuthenticated, drf_exceptions.AuthenticationFailed)):
        return InvalidApiKey(
            "You didn't provide an API key. Send it as 'Authorization: Bearer sk-...'."
            if isinstance(exc, drf_exceptions.NotAuthenticated)
            else None
        )
    if isinstance(exc, (drf_exceptions.NotFound, Http404)):
        return NotFound()
    if isinstance(exc, (drf_exceptions.PermissionDenied, DjangoPermissionDenied)):
        return PermissionDenied()
    if isinstance(exc, drf_exceptions.MethodNotAllowed):
        return MethodNotAllowed(str(exc.detail))
    if isinstance(exc, drf_exceptions.APIException):
        error = SluiceError(str(exc.detail))
        error.http_status = exc.status_code
        if exc.status_code < 500:  # the client's doing (406 not_acceptable), not internal_error
            error.code = exc.default_code
        return error
    return None


def error_response(error: SluiceError) -> Response:
    return Response(error.body(), status=error.http_status, headers=error.headers)


def api_exception_handler(exc: Exception, context) -> Response | None:
    error = to_sluice_error(exc)
    if error is None:
        logger.exception("unhandled error in %s", context.get("view").__class__.__name__)
        error = SluiceError()
    return error_response(error)


def json_error(error: SluiceError) -> JsonResponse:
    """For plain Django views (404/500 handlers, health checks) outside DRF."""
    response = JsonResponse(error.body(), status=error.http_status)
    for name, value in error.headers.items():
        response[name] = value
    return response
