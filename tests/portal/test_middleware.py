"""The middleware chain under ASGI: every middleware async-capable, static files still served."""

from __future__ import annotations

import logging

import pytest
from django.core.handlers.asgi import ASGIHandler
from django.test import AsyncClient


def test_no_middleware_makes_the_asgi_chain_hop_to_a_thread(caplog, settings):
    """Django adapts a sync-only middleware by running the chain around it in a thread (and it
    says so at DEBUG, in debug mode): that would put two thread hops on every API request."""
    settings.DEBUG = True
    with caplog.at_level(logging.DEBUG, logger="django.request"):
        ASGIHandler().load_middleware(is_async=True)
    adapted = [r.getMessage() for r in caplog.records if "adapted" in r.getMessage()]
    assert adapted == []


@pytest.mark.django_db
async def test_static_files_are_served_from_the_async_chain():
    client = AsyncClient()
    script = await client.get("/static/vendor/htmx/htmx.min.js")
    assert script.status_code == 200 and script["Content-Type"].startswith("text/javascript")
    assert b"htmx" in b"".join(script.streaming_content)
    assert (await client.get("/static/vendor/missing.js")).status_code == 404
    assert (await client.get("/healthz")).status_code == 200


@pytest.mark.django_db
async def test_djangos_middlewares_run_on_the_event_loop_for_an_api_request(monkeypatch):
    """An API request (no session read, no messages) runs Django's stock middlewares inline:
    each hop to a thread would cost two context switches per middleware and phase."""
    import threading

    from portal import middleware

    seen = []
    for cls in (middleware.SecurityMiddleware, middleware.SessionMiddleware,
                middleware.CommonMiddleware, middleware.XFrameOptionsMiddleware):
        def recording(self, request, response, _original=cls.process_response, _name=cls.__name__):
            seen.append((_name, threading.current_thread()))
            return _original(self, request, response)
        monkeypatch.setattr(cls, "process_response", recording)
    response = await AsyncClient().post("/v1/completions", data={}, content_type="application/json")
    assert response.status_code == 401 and response["X-Frame-Options"] == "DENY"
    assert {name for name, _ in seen} == {"SecurityMiddleware", "SessionMiddleware",
                                          "CommonMiddleware", "XFrameOptionsMiddleware"}
    assert {thread for _, thread in seen} == {threading.current_thread()}


@pytest.mark.django_db(transaction=True)
async def test_a_login_through_the_async_chain_saves_its_session_and_csrf_still_guards(cast):
    """The session middleware hops to a thread when a view read or changed the session: a
    login through the form still persists, the next request is signed in, and a form post
    without its CSRF token is still refused."""
    from asgiref.sync import sync_to_async
    from django.contrib.sessions.models import Session

    client = AsyncClient(enforce_csrf_checks=True)
    form = await client.get("/accounts/login/")
    token = form.cookies["csrftoken"].value
    refused = await client.post("/accounts/login/", {
        "username": cast.owner.user.username, "password": "correct horse battery staple"})
    assert refused.status_code == 403
    response = await client.post("/accounts/login/", {
        "username": cast.owner.user.username, "password": "correct horse battery staple",
        "csrfmiddlewaretoken": token})
    assert response.status_code == 302
    assert await sync_to_async(Session.objects.count)() == 1
    page = await client.get("/t/acme/")
    assert page.status_code == 200 and cast.owner.user.username.encode() in page.content
