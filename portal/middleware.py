"""x-request-id on every response, and in every log line written while serving it; static
files served from an async middleware chain."""

from __future__ import annotations

import re
import uuid

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.utils.decorators import sync_and_async_middleware
from whitenoise.middleware import WhiteNoiseMiddleware

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



class StaticFilesMiddleware(WhiteNoiseMiddleware):
    """WhiteNoise, able to run in an async middleware chain.

    WhiteNoise's middleware is sync-only, and one sync middleware makes Django run the whole
    chain around it in a worker thread and hop back to the event loop for the async views under
    it: two thread hops per API request (and a streaming response's first bytes wait on them).
    Finding a static file is a dict lookup; serving one still happens in a thread."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response=None, **kwargs):
        super().__init__(get_response, **kwargs)
        self._async = iscoroutinefunction(get_response)
        if self._async:
            markcoroutinefunction(self)

    def __call__(self, request):
        if self._async:
            return self._acall(request)
        return super().__call__(request)

    async def _acall(self, request):
        if self.autorefresh:
            static_file = await sync_to_async(self.find_file)(request.path_info)
        else:
            static_file = self.files.get(request.path_info)
        if static_file is not None:
            return await sync_to_async(self.serve)(static_file, request)
        return await self.get_response(request)
