"""x-ratelimit-{limit,remaining,reset}-cu on every API response made for an API key."""

from __future__ import annotations

from asgiref.sync import iscoroutinefunction
from django.utils.decorators import sync_and_async_middleware

from portal.authentication import ApiPrincipal
from portal.db import database_step
from portal.redis import redis_client
from quotas.limits import rate_limit_headers


def _add_headers(request, response) -> None:
    principal = getattr(request, "user", None)
    if not isinstance(principal, ApiPrincipal):
        return  # no key, so no bucket to report (401s, dashboard pages)
    for name, value in rate_limit_headers(api_key=principal.api_key, client=redis_client()).items():
        response[name] = value


@sync_and_async_middleware
def RateLimitHeadersMiddleware(get_response):  # noqa: N802 - Django middleware naming
    if iscoroutinefunction(get_response):

        async def middleware(request):
            response = await get_response(request)
            await database_step(_add_headers)(request, response)
            return response

    else:

        def middleware(request):
            response = get_response(request)
            _add_headers(request, response)
            return response

    return middleware
