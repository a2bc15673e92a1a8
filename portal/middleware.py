"""x-request-id on every response, and in every log line written while serving it."""

from __future__ import annotations

import re
import uuid

from asgiref.sync import iscoroutinefunction
from django.utils.decorators import sync_and_async_middleware

from portal.logs import log_context

REQUEST_ID_HEADER = "x-request-id"
# A caller's id is echoed only if it is short and harmless to put in logs and headers.
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _request_id_for(request) -> str:
    incoming = request.headers.get(REQUEST_ID_HEADER, "")
    if _SAFE_REQUEST_ID.match(incoming):
        return incoming
    return f"req_{uuid.uuid4().hex}"


@sync_and_async_middleware
def RequestIdMiddleware(get_response):  # noqa: N802 - Django middleware naming
    if iscoroutinefunction(get_response):

        async def middleware(request):
            request.request_id = _request_id_for(request)
            # tenant_id=None: authentication binds it inside, and it ends with the request.
            with log_context(request_id=request.request_id, tenant_id=None):
                response = await get_response(request)
            response[REQUEST_ID_HEADER] = request.request_id
            return response

    else:

        def middleware(request):
            request.request_id = _request_id_for(request)
            with log_context(request_id=request.request_id, tenant_id=None):
                response = get_response(request)
            response[REQUEST_ID_HEADER] = request.request_id
            return response

    return middleware

