"""Django's ASGI handler, with each request's thread-sensitive thread taken from a pool.

Django serves every HTTP request in a `ThreadSensitiveContext` of its own, and asgiref starts a
new thread for the first thread-sensitive step of each one (`request_started`'s receivers, before
the view) and stops it when the request ends (after `response.close()`, which runs there too):
about 0.55 ms of CPU per request on this project's 2-core machine (1.33 -> 0.78 ms for those two
steps, measured in-process), part of it before the view runs. asgiref lets a context be given an
executor it does not own; here each request still has one thread to itself for all its
thread-sensitive steps (one call at a time, as Django's sync code expects), and the thread is
kept for a later request, as a WSGI server keeps its worker threads. A request's database
connection in that thread is still closed (or kept, by CONN_MAX_AGE) by `request_finished`.
"""

from __future__ import annotations

import itertools
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import django
from asgiref.sync import ThreadSensitiveContext
from django.core.handlers.asgi import ASGIHandler

# Idle request threads kept for reuse; more than this many at once are started and stopped as
# Django's own are (a burst's extra threads do not stay).
IDLE_REQUEST_THREADS = 32


class ThreadReusingASGIHandler(ASGIHandler):
    def __init__(self) -> None:
        super().__init__()
        self._idle: deque[ThreadPoolExecutor] = deque()  # touched only on the event loop
        self._numbers = itertools.count()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            # Django's own refusal, with its message.
            return await super().__call__(scope, receive, send)
        executor = (self._idle.pop() if self._idle else ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"request-{next(self._numbers)}"))
        try:
            async with ThreadSensitiveContext(executor=executor):
                await self.handle(scope, receive, send)
        finally:
            # A step still running for a request that was cancelled only delays the next
            # request given this thread: the executor runs one call at a time, in order.
            if len(self._idle) < IDLE_REQUEST_THREADS:
                self._idle.append(executor)
            else:
                executor.shutdown(wait=False)


def asgi_application_get() -> ThreadReusingASGIHandler:
    """`django.core.asgi.get_asgi_application`, with the handler above."""
    django.setup(set_prefix=False)
    return ThreadReusingASGIHandler()
