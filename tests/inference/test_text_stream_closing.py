"""A completion stream's generator closes when Django stops consuming it (the client left), not
when the garbage collector gets to it: its `finally` is what cancels the job (text_apis)."""

from __future__ import annotations

import gc
from contextlib import aclosing

import pytest
from django.http import StreamingHttpResponse

from inference.text_apis import SourceClosingStream


async def _events(closed: list[bool]):
    try:
        while True:
            yield "data: {}\n\n"
    finally:
        closed.append(True)


@pytest.mark.parametrize(("response_class", "closed_at_once"),
                         [(StreamingHttpResponse, False), (SourceClosingStream, True)])
async def test_the_stream_closes_its_generator_when_django_stops_reading(response_class, closed_at_once):
    """Django's plain response leaves the generator to the collector (which is why
    SourceClosingStream exists); ours closes it before Django's `aclosing` returns."""
    closed: list[bool] = []
    response = response_class(_events(closed), content_type="text/event-stream")
    gc.disable()  # the collector must not rescue the plain response during the test
    try:
        # What django.core.handlers.asgi.ASGIHandler.send_response does with a streaming body;
        # the break is the client leaving (Django's send raises, the loop ends).
        async with aclosing(aiter(response)) as content:
            async for _chunk in content:
                break
        assert bool(closed) is closed_at_once
    finally:
        gc.enable()
    assert response.streaming
