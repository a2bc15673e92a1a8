"""x-request-id on every response, and in every log line written while serving it; static
files and Django's stock middlewares in an async chain without thread hops."""

from __future__ import annotations

import functools
import re
import uuid

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.conf import settings as django_settings
from django.contrib.auth import middleware as django_auth
from django.contrib.messages import middleware as django_messages
from django.contrib.sessions import middleware as django_sessions
from django.middleware import clickjacking as django_clickjacking
from django.middleware import common as django_common
from django.middleware import csrf as django_csrf
from django.middleware import security as django_security
from django.urls import reverse
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


class _InlineInAsync:
    """Django's stock middlewares, run inline in an async chain where they do no I/O.

    In an async chain Django runs every MiddlewareMixin's process_request and process_response
    through sync_to_async: two thread hops each, about a dozen for one API request through the
    stock middlewares below, for steps that only read headers and set them. These run inline
    on the event loop, and hop to a thread only for the step that may touch the database (a
    session that was read or changed, messages to store, CSRF secrets kept in the session)."""

    def request_io_free(self, request) -> bool:
        return True

    def response_io_free(self, request, response) -> bool:
        return True

    async def __acall__(self, request):
        response = None
        if hasattr(self, "process_request"):
            if self.request_io_free(request):
                response = self.process_request(request)
            else:
                response = await sync_to_async(self.process_request, thread_sensitive=True)(request)
        response = response or await self.get_response(request)
        if hasattr(self, "process_response"):
            if self.response_io_free(request, response):
                response = self.process_response(request, response)
            else:
                response = await sync_to_async(self.process_response, thread_sensitive=True)(
                    request, response)
        return response


class SecurityMiddleware(_InlineInAsync, django_security.SecurityMiddleware):
    pass


class SessionMiddleware(_InlineInAsync, django_sessions.SessionMiddleware):
    # Creating the (lazy) store reads nothing; saving one that was read or changed writes.
    def response_io_free(self, request, response) -> bool:
        session = getattr(request, "session", None)
        return session is None or not (session.accessed or session.modified
                                       or django_settings.SESSION_SAVE_EVERY_REQUEST)


# Probed and scraped at a pod's IP (the kubelet's httpGet, Prometheus): `Host: <pod IP>:8000`,
# which no ALLOWED_HOSTS lists. These views build nothing from the Host header.
_HOST_FREE_URL_NAMES = ("healthz", "readyz", "metrics")


@functools.cache
def _host_free_paths() -> frozenset[str]:
    return frozenset(reverse(name) for name in _HOST_FREE_URL_NAMES)


class CommonMiddleware(_InlineInAsync, django_common.CommonMiddleware):
    def process_request(self, request):
        # Django's host check (request.get_host) answered every probe and scrape of a web pod
        # 400: the pods never became ready, and liveness restarted them.
        if request.path in _host_free_paths():
            return None
        return super().process_request(request)


class CsrfViewMiddleware(_InlineInAsync, django_csrf.CsrfViewMiddleware):
    def request_io_free(self, request) -> bool:
        return not django_settings.CSRF_USE_SESSIONS

    def response_io_free(self, request, response) -> bool:
        return not django_settings.CSRF_USE_SESSIONS


class AuthenticationMiddleware(_InlineInAsync, django_auth.AuthenticationMiddleware):
    pass  # request.user is lazy: nothing is read until a view asks


class MessageMiddleware(_InlineInAsync, django_messages.MessageMiddleware):
    # Storing messages writes the session (and may read it first); none used, none stored.
    def response_io_free(self, request, response) -> bool:
        storage = getattr(request, "_messages", None)
        return storage is None or not (storage.used or storage.added_new)


class XFrameOptionsMiddleware(_InlineInAsync, django_clickjacking.XFrameOptionsMiddleware):
    pass


class SameOriginWebsocketSession:
    """Websockets: the session cookie counts only on a handshake from one of our own origins.

    A page on another site can open a websocket to us, and the browser sends our cookies with
    it: Django's CSRF check does not cover handshakes, so without this a member's visit to such
    a page would let it follow the tenant's jobs. Browsers always send Origin on a handshake;
    it must match ALLOWED_HOSTS or CSRF_TRUSTED_ORIGINS (channels' OriginValidator does the
    matching), or the handshake goes on as anonymous. API-key clients are not browsers (a page
    cannot set Authorization on a websocket), send no Origin and keep working."""

    def __init__(self, application) -> None:
        self.application = application

    async def __call__(self, scope, receive, send):
        from urllib.parse import urlparse

        from channels.security.websocket import OriginValidator
        from django.contrib.auth.models import AnonymousUser

        origin = dict(scope.get("headers", [])).get(b"origin")
        if origin is not None:
            ours = OriginValidator(self.application, [*django_settings.ALLOWED_HOSTS,
                                                      *django_settings.CSRF_TRUSTED_ORIGINS])
            if not ours.validate_origin(urlparse(origin.decode("latin1"))):
                scope = dict(scope, user=AnonymousUser())
        return await self.application(scope, receive, send)
