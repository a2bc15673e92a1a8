"""Shared fixtures: a clean Redis database per test, and the cast of every view test.

The cast (STYLE.md): an owner and a read-only member (viewer) of one tenant, and an outsider
who owns another tenant and must get 404 for everything of the first.
"""

from __future__ import annotations

import contextlib
import http.server
import threading
from dataclasses import dataclass

import pytest
from rest_framework.test import APIClient

from portal.models import Membership, Role, Tenant
from portal.redis import redis_client
from tests.factories import MembershipFactory, TenantFactory, UserFactory, api_key_for, tier


def _held_by_other_processes(sessions) -> list[str]:
    """The sessions whose client socket is not this test process's, each described by the
    command that holds it. Connections that threads of this process left open end with it."""
    import os

    import psutil

    owner_of_port = {c.laddr.port: c.pid for c in psutil.net_connections(kind="tcp") if c.laddr}
    described = []
    for pid, application, port in sessions:
        owner = owner_of_port.get(port)
        if owner == os.getpid():
            continue
        try:
            command = " ".join(psutil.Process(owner).cmdline()[:6]) if owner else "exiting"
        except psutil.Error:
            command = "exiting"
        described.append(f"backend {pid} ({application or 'no name'}): {command}")
    return described


@pytest.fixture(scope="session", autouse=True)
def _test_database_left_unused_at_the_end(django_db_setup, django_db_blocker):
    """Workers and servers started by tests keep persistent PostgreSQL connections, and
    PostgreSQL ends a stopped process's backend a moment after the process exits. Before the
    test database is dropped (after every other session fixture has stopped its processes),
    wait for other processes' backends to go, then end whatever is left (this process's idle
    thread connections included), so the drop never finds the database in use."""
    yield
    import time
    import warnings

    from django.db import connection

    if connection.vendor != "postgresql":
        return
    others_sql = ("SELECT pid, application_name, client_port FROM pg_stat_activity "
                  "WHERE datname = current_database() AND pid <> pg_backend_pid()")
    with django_db_blocker.unblock():
        deadline = time.monotonic() + 10
        with connection.cursor() as cursor:
            while True:
                cursor.execute(others_sql)
                outliving = _held_by_other_processes(cursor.fetchall())
                if not outliving or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            if outliving:  # a process the tests started outlived them: say so
                warnings.warn(f"processes still on the test database at the end: {outliving}",
                              stacklevel=1)
            cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE datname = current_database() AND pid <> pg_backend_pid()")


@pytest.fixture(scope="session", autouse=True)
def _transactional_tests_end_by_deleting_rows():
    """After each transactional test (127 of them) Django's flush empties every table. On
    PostgreSQL it did so with one TRUNCATE of the ~50 tables, which gives each table and index
    new files: 0.3-0.6 s a test, against about 0.05 s to DELETE the few rows a test leaves, in
    one transaction with the foreign keys (Django makes them deferrable) checked at its commit.
    What the flush leaves is the same: empty tables (sequences are not reset either way), then
    post_migrate's content types and permissions. A flush asked to reset sequences or cascade
    still truncates."""
    from django.db.backends.postgresql.operations import DatabaseOperations

    truncate = DatabaseOperations.sql_flush

    def delete_rows(self, style, tables, *, reset_sequences=False, allow_cascade=False):
        if not tables or reset_sequences or allow_cascade:
            return truncate(self, style, tables, reset_sequences=reset_sequences,
                            allow_cascade=allow_cascade)
        return ["SET CONSTRAINTS ALL DEFERRED"] + [
            f"DELETE FROM {self.quote_name(table)}" for table in tables]  # noqa: S608 - table names

    DatabaseOperations.sql_flush = delete_rows
    yield
    DatabaseOperations.sql_flush = truncate


@pytest.fixture(autouse=True)
def clean_redis():
    """Empty the test Redis database, except kombu's queue bindings: this process declared
    them once and would not declare them again, so Celery messages would be dropped."""
    client = redis_client()
    doomed = [key for key in client.scan_iter(count=1000) if not key.startswith(b"_kombu.binding.")]
    for start in range(0, len(doomed), 500):
        client.delete(*doomed[start:start + 500])
    yield client


@dataclass
class Cast:
    tenant: Tenant
    owner: Membership
    admin: Membership
    member: Membership
    viewer: Membership
    outsider_tenant: Tenant
    outsider: Membership
    owner_key: str
    outsider_key: str


@pytest.fixture
def cast(db) -> Cast:
    tenant = TenantFactory(name="Acme", slug="acme", tier=tier("pro"))
    outsider_tenant = TenantFactory(name="Globex", slug="globex", tier=tier("pro"))
    owner = MembershipFactory(tenant=tenant, role=Role.OWNER, user=UserFactory(username="owner"))
    outsider = MembershipFactory(tenant=outsider_tenant, role=Role.OWNER,
                                 user=UserFactory(username="outsider"))
    return Cast(
        tenant=tenant,
        owner=owner,
        admin=MembershipFactory(tenant=tenant, role=Role.ADMIN, user=UserFactory(username="admin1")),
        member=MembershipFactory(tenant=tenant, role=Role.MEMBER, user=UserFactory(username="member")),
        viewer=MembershipFactory(tenant=tenant, role=Role.VIEWER, user=UserFactory(username="viewer")),
        outsider_tenant=outsider_tenant,
        outsider=outsider,
        owner_key=api_key_for(tenant, created_by=owner.user),
        outsider_key=api_key_for(outsider_tenant, created_by=outsider.user),
    )


@pytest.fixture
def api():
    """An API client; `api.bearer(key)` sets the Authorization header."""
    client = APIClient()

    def bearer(key: str | None) -> APIClient:
        if key is None:
            client.credentials()
        else:
            client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
        return client

    client.bearer = bearer
    return client


@pytest.fixture(autouse=True)
def safety_policy_cache_cleared():
    """Each test resolves policies from its own rows (the cache outlives rolled-back rows)."""
    from moderation.selectors import safety_policy_cache_clear

    safety_policy_cache_clear()
    yield
    safety_policy_cache_clear()


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    # PBKDF2's deliberate slowness is for production; tests create many users.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def sent_tasks(monkeypatch):
    """The Celery messages jobs would send (job id, attempt, queue), captured instead of sent.
    Workers are exercised for real in test_worker.py and the browser tests; here the
    scheduler's and the views' decisions are."""
    from inference import tasks

    sent: list[tuple[str, int, str]] = []
    monkeypatch.setattr(
        tasks.run_job, "apply_async",
        lambda args, queue: sent.append((args[0], args[1], queue)),
    )
    return sent


_TINY_CHAT_TEMPLATE = object()


@pytest.fixture
def code_checkpoints(settings, tmp_path):
    """`code_checkpoints(4096)` points both variants of the code model at copies of the tiny
    model's config and tokenizer (no weights: no engine loads them) whose config.json gives
    that context length; `code_checkpoints(4096, 2048)` gives the quantized variant its own.
    `chat_template=` replaces the tiny model's chat template (None: the copies have none)."""
    import json
    import shutil
    from pathlib import Path

    def make(full: int | None = None, quantized: int | None = None, *,
             chat_template: str | None | object = _TINY_CHAT_TEMPLATE) -> None:
        for setting, length in (("SLUICE_CODE_MODEL_PATH", full),
                                ("SLUICE_CODE_MODEL_INT8_PATH", quantized or full)):
            source = Path(getattr(settings, setting))
            folder = tmp_path / f"checkpoint-{len(list(tmp_path.iterdir()))}"
            folder.mkdir()
            for name in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(source / name, folder / name)
            if chat_template is _TINY_CHAT_TEMPLATE:
                shutil.copy(source / "chat_template.jinja", folder / "chat_template.jinja")
            elif chat_template is not None:
                (folder / "chat_template.jinja").write_text(chat_template)
            config = json.loads((source / "config.json").read_text())
            if length is not None:
                config["max_position_embeddings"] = length
            (folder / "config.json").write_text(json.dumps(config))
            setattr(settings, setting, str(folder))

    return make


def database_url_for_subprocesses() -> str:
    """The test database as a DATABASE_URL, for workers started as subprocesses."""
    from django.db import connection

    params = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{params['NAME']}"
    user = params.get("USER") or "postgres"
    return f"postgres://{user}@{params.get('HOST') or '127.0.0.1'}:{params.get('PORT') or 5432}/{params['NAME']}"


class _Subprocess:
    """A platform process (worker, web server) on the test database and Redis, logging to a
    file in the test's var dir, stopped with its whole process group."""

    def __init__(self, name: str, argv: list[str], extra_env: dict[str, str] | None = None):
        import os
        import subprocess
        from pathlib import Path

        env = {**os.environ, "DATABASE_URL": database_url_for_subprocesses(), "PYTHONUNBUFFERED": "1",
               "SLUICE_JOB_HEARTBEAT_TTL_S": "2", **(extra_env or {})}
        self.log_path = Path(env["SLUICE_VAR_DIR"]) / f"{name}-{os.getpid()}-{id(self)}.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            argv, cwd=Path(__file__).resolve().parents[1], env=env, stdout=self.log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )

    def kill(self) -> None:
        import os
        import signal

        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        """At its test's (or module's) end: SIGKILL to the whole group. What a test asserts of
        the process it has read by then; a graceful stop (Celery's warm shutdown, which also
        waits out a job still running, then the interpreter's teardown of a heap of half a
        million objects) took about 4 s a worker, a dozen times a run. The graceful stops have
        tests of their own (tests/ops/test_shutdown.py, tests/portal/test_make_run.py)."""
        self.kill()
        self.log.close()

    def output(self) -> str:
        return self.log_path.read_text()


def processes_stop(processes: list[_Subprocess]) -> None:
    for process in processes:
        process.stop()


class WorkerProcess(_Subprocess):
    """A real Celery worker subprocess on one queue, with the execution pool `make run` uses
    for it (prefork with one child for GPU pools, threads for text)."""

    def __init__(self, queue: str, extra_env: dict[str, str] | None = None):
        import sys

        from portal.launcher import worker_pool_args

        super().__init__(f"worker-{queue}", [
            sys.executable, "-m", "celery", "-A", "portal", "worker", "-Q", queue, "-n",
            f"test-{queue}-{id(self)}@%h", *worker_pool_args(queue), "--loglevel", "INFO",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ], {"SLUICE_DB_CONN_MAX_AGE": "60", **(extra_env or {})})  # as make run starts it


class LiveServer(_Subprocess):
    """The ASGI app (HTTP + websockets) under uvicorn, as `make run` serves it."""

    def __init__(self, extra_env: dict[str, str] | None = None):
        import sys

        from portal.embedded_redis import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__("web", [
            sys.executable, "-m", "uvicorn", "portal.asgi:application", "--host", "127.0.0.1",
            "--port", str(self.port), "--log-level", "warning", "--no-access-log",
        ], {"SLUICE_DB_POOL_MAX": "8", **(extra_env or {})})  # as make run serves it

    def wait_ready(self, timeout_s: float = 60) -> LiveServer:
        import time

        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited:\n{self.output()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            time.sleep(0.2)
        raise AssertionError(f"the server did not answer:\n{self.output()[-3000:]}")


@pytest.fixture
def start_worker():
    workers: list[WorkerProcess] = []

    def start(queue: str, **extra_env) -> WorkerProcess:
        worker = WorkerProcess(queue, extra_env)
        workers.append(worker)
        return worker

    yield start
    processes_stop(workers)


@pytest.fixture
def start_live_server():
    """Start with `server = start_live_server()`, then `server.wait_ready()` (start workers
    in between: both boot in parallel)."""
    servers: list[LiveServer] = []

    def start(**extra_env) -> LiveServer:
        server = LiveServer(extra_env)
        servers.append(server)
        return server

    yield start
    processes_stop(servers)


@pytest.fixture(scope="session")
def fresh_asgi_process(tmp_path_factory):
    """A fresh interpreter, its output for the tests that need one (tests/portal/test_heap.py,
    tests/ops/test_logs.py): each such process, loading the project and the safety classifier,
    is ~15 s of the 2-core machine's CPU. It imports what a worker imports (the Celery app, the
    job runner), then the ASGI entry point, which loads the classifier and freezes the heap
    with their extension types in it (triton's), and prints the freeze count. It logs as pods do
    (JSON), with transformers' own verbosity and progress-bar switches unset."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, SLUICE_LOG_FORMAT="json", DJANGO_SETTINGS_MODULE="portal.settings",
               SLUICE_VAR_DIR=str(tmp_path_factory.mktemp("fresh-asgi-var")))
    env.pop("TRANSFORMERS_VERBOSITY", None)
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    probe = ("import django; django.setup(); import portal.celery, inference.runner; "
             "import gc, portal.asgi; print(gc.get_freeze_count())")
    return subprocess.run([sys.executable, "-c", probe], cwd=Path(__file__).resolve().parents[1],
                          env=env, capture_output=True, text=True, timeout=300)


# The real text stack (vLLM servers, text worker, ASGI server), started once per session for
# every module that asks (the text API tests, the dashboard's text playground).
from tests.inference.text_stack import (  # noqa: E402, F401
    text_engines,
    text_engines_started,
    text_server,
    text_stack,
    text_worker,
)


def _needs_text_engines(item) -> bool:
    return "text_engines" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(session, config, items):
    """The modules whose tests need the text engines run last (each module's order kept, so
    its module-scoped fixtures start once): the engines load meanwhile (see below)."""
    late_modules = {item.nodeid.split("::")[0] for item in items if _needs_text_engines(item)}
    items.sort(key=lambda item: item.nodeid.split("::")[0] in late_modules)


def pytest_collection_finish(session):
    """Starting the vLLM servers takes over a minute of mostly one core; begun now, it overlaps
    the tests that do not need them instead of stalling the first one that does."""
    from tests.inference import text_stack as stack

    if not session.config.option.collectonly and any(map(_needs_text_engines, session.items)):
        stack.engines_start_early()


def pytest_sessionfinish(session, exitstatus):
    from tests.inference import text_stack as stack

    stack.engines_stop_early()


# An engine that hangs (tests of the read timeout and of the hard time limit).
class HungEngine(http.server.BaseHTTPRequestHandler):
    """A vLLM server that answers its health check, takes a completion and then says nothing
    (a stuck read, as behind a hung CUDA call), until `release` is set."""

    release = threading.Event()

    def do_GET(self):  # noqa: N802 - the stdlib's name
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self):  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        self.wfile.write(b"\n")
        self.wfile.flush()
        self.release.wait(300)

    def log_message(self, *args):
        pass


@pytest.fixture
def hung_engine():
    HungEngine.release.clear()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HungEngine)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    HungEngine.release.set()  # the streams end: the worker can stop
    server.shutdown()
    server.server_close()
