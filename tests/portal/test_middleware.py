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
