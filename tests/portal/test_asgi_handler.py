"""portal.asgi_handler: a request's thread-sensitive steps share one thread, kept across requests."""

from __future__ import annotations

import threading

import pytest
from asgiref.testing import ApplicationCommunicator
from django.core import signals
from django.core.handlers.asgi import ASGIHandler

from portal.asgi_handler import ThreadReusingASGIHandler

# No database: a 404 touches none, and the handler's work is threads, not queries.


def _scope(path: str) -> dict:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
            "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
            "root_path": "", "headers": [(b"host", b"testserver")],
            "client": ("127.0.0.1", 50000), "server": ("testserver", 80)}


async def _get(application, path: str) -> int:
    # Generous timeouts: the process's first request imports the URLconf (seconds on a busy CI).
    communicator = ApplicationCommunicator(application, _scope(path))
    await communicator.send_input({"type": "http.request", "body": b"", "more_body": False})
    start = await communicator.receive_output(timeout=60)
    await communicator.receive_output(timeout=60)  # the body
    await communicator.wait(timeout=60)
    return start["status"]


@pytest.fixture
def request_threads():
    """(signal, thread) for each request_started / request_finished, in order (the Thread objects
    are kept, so two of them are the same thread only if they are the same object)."""
    seen: list[tuple[str, threading.Thread]] = []

    def started(**kwargs):
        seen.append(("started", threading.current_thread()))

    def finished(**kwargs):
        seen.append(("finished", threading.current_thread()))

    signals.request_started.connect(started, weak=False)
    signals.request_finished.connect(finished, weak=False)
    yield seen
    signals.request_started.disconnect(started)
    signals.request_finished.disconnect(finished)


async def _threads_of_three_requests(application, seen) -> list[threading.Thread]:
    for _ in range(3):
        assert await _get(application, "/no-such-page/") == 404
    assert [signal for signal, _ in seen] == ["started", "finished"] * 3
    return [thread for _, thread in seen]


async def test_sequential_requests_run_their_steps_on_one_kept_thread(request_threads):
    threads = await _threads_of_three_requests(ThreadReusingASGIHandler(), request_threads)
    assert threads[0].name.startswith("request-") and threads[0] is not threading.current_thread()
    assert all(thread is threads[0] for thread in threads)  # one thread, kept for the next request


async def test_djangos_own_handler_starts_a_thread_for_every_request(request_threads):
    # What the handler saves: Django's gives each request a new thread (new names).
    threads = await _threads_of_three_requests(ASGIHandler(), request_threads)
    assert threads[0] is threads[1] and threads[2] is threads[3] and threads[4] is threads[5]
    assert len({id(threads[0]), id(threads[2]), id(threads[4])}) == 3


async def test_concurrent_requests_get_a_thread_each():
    import asyncio

    application = ThreadReusingASGIHandler()
    threads: list[threading.Thread] = []
    both_inside = threading.Barrier(2, timeout=10)

    def started(**kwargs):
        threads.append(threading.current_thread())
        both_inside.wait()  # each request's thread waits for the other's: two threads or none

    signals.request_started.connect(started, weak=False)
    try:
        statuses = await asyncio.gather(_get(application, "/a/"), _get(application, "/b/"))
    finally:
        signals.request_started.disconnect(started)
    assert statuses == [404, 404] and threads[0] is not threads[1]
    # Both threads are kept: a third request, alone, takes one of them.
    assert await _get(application, "/c/") == 404 and len(application._idle) == 2


def test_a_websocket_scope_is_refused_as_django_refuses_it():
    import asyncio

    with pytest.raises(ValueError, match="Django can only handle ASGI/HTTP connections"):
        asyncio.run(ThreadReusingASGIHandler()({"type": "websocket"}, None, None))
