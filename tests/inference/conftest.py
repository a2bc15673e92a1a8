"""Fixtures for the webhook tests: a real HTTP receiver on 127.0.0.1 and fast retry settings."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


@dataclass
class Reply:
    status: int = 200
    body: bytes = b"ok"
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    """Answers POSTs with scripted replies (then 200 "ok") and records what it received.
    `hold()` keeps the requests that arrive waiting for their answer until `let_go()`; it counts
    the requests in its hands at once."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.replies: deque[Reply] = deque()
        self.in_flight = self.most_in_flight = 0
        self.changed = threading.Condition()
        self.released = threading.Event()
        self.released.set()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.requests.append(Received(self.path, dict(self.headers.items()), body))
                reply = receiver.replies.popleft() if receiver.replies else Reply()
                with receiver.changed:
                    receiver.in_flight += 1
                    receiver.most_in_flight = max(receiver.most_in_flight, receiver.in_flight)
                    receiver.changed.notify_all()
                receiver.released.wait(timeout=30)
                time.sleep(reply.delay_s)
                with receiver.changed:
                    receiver.in_flight -= 1
                try:
                    self.send_response(reply.status)
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(reply.body)))
                    self.end_headers()
                    self.wfile.write(reply.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting (timeout tests)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def script(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    def hold(self) -> None:
        self.released.clear()

    def let_go(self) -> None:
        self.released.set()

    def wait_in_flight(self, count: int, timeout_s: float = 10) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: self.in_flight >= count, timeout=timeout_s), (
                f"{self.in_flight} requests in flight, waited for {count}")

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.let_go()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook_settings(settings):
    """Short, deterministic retries; private addresses allowed so the local receiver counts."""
    settings.SLUICE_WEBHOOK_ALLOW_PRIVATE = True
    settings.SLUICE_WEBHOOK_ALLOWED_HOSTS = []
    settings.SLUICE_WEBHOOK_RETRY_SCHEDULE_S = [0.01, 0.02]
    settings.SLUICE_WEBHOOK_RETRY_JITTER = 0.0
    settings.SLUICE_WEBHOOK_TIMEOUT_S = 2.0
    settings.SLUICE_WEBHOOK_DISABLE_AFTER_FAILURES = 3
    return settings


@pytest.fixture
def receiver(webhook_settings):
    with Receiver() as running:
        yield running


@pytest.fixture
def second_receiver(webhook_settings):
    with Receiver() as running:
        yield running


@pytest.fixture(autouse=True)
def pools(settings):
    settings.SLUICE_POOL_CAPACITY_CU = {"text-batch": 1_000_000, "video-hbm": 1_000_000}
    settings.SLUICE_POOL_SLOTS = {"text-batch": 32, "video-hbm": 1}


@pytest.fixture
def redis_replies_lost(monkeypatch):
    """`lose(count)`: the next `count` replies of a Lua script are lost after Redis ran it (a
    timeout reading them; the caller gets redis.TimeoutError). Returns the replies lost."""
    import redis

    read_response = redis.connection.AbstractConnection.read_response
    lost: list = []
    to_lose = [0]

    def losing_the_reply(self, *args, **kwargs):
        response = read_response(self, *args, **kwargs)
        if len(lost) < to_lose[0] and isinstance(response, list):  # a script's, not a PING's
            lost.append(response)
            raise redis.TimeoutError("Timeout reading from socket")
        return response

    def lose(count: int = 1) -> list:
        to_lose[0] = len(lost) + count
        return lost

    monkeypatch.setattr(redis.connection.AbstractConnection, "read_response", losing_the_reply)
    return lose
