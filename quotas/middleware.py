"""x-ratelimit-{limit,remaining,reset}-cu on every API response made for an API key.

A request that was admitted carries its tenant's bucket as the admission left it
(`request.rate_headroom`): its headers need no second read of Redis.
"""

from __future__ import annotations

from asgiref.sync import iscoroutinefunction
from django.utils.decorators import sync_and_async_middleware

from portal.authentication import ApiPrincipal
from portal.db import database_step
from portal.redis import redis_client
from quotas.limits import RateHeadroom, rate_headroom, rate_limit_headers


def _set_headers(response, headroom: RateHeadroom) -> None:
    for name, value in rate_limit_headers(headroom=headroom).items():
        response[name] = value


def _add_headers(request, response) -> None:
    principal = getattr(request, "user", None)
    if not isinstance(principal, ApiPrincipal):
        return  # no key, so no bucket to report (401s, dashboard pages)
    _set_headers(response, rate_headroom(tenant=principal.api_key.tenant, client=redis_client()))


@sync_and_async_middleware
def RateLimitHeadersMiddleware(get_response):  # noqa: N802 - Django middleware naming
    if iscoroutinefunction(get_response):

        async def middleware(request):
            response = await get_response(request)
            admitted = getattr(request, "rate_headroom", None)
            if admitted is not None:
                _set_headers(response, admitted)
            else:
                await database_step(_add_headers)(request, response)
            return response

    else:

        def middleware(request):
            response = get_response(request)
            admitted = getattr(request, "rate_headroom", None)
            if admitted is not None:
                _set_headers(response, admitted)
            else:
                _add_headers(request, response)
            return response

    return middleware
