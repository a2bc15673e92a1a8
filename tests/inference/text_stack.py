"""Session-wide real text stack for the text tests: vLLM servers for both variants of the
tiny code model, a threaded text-batch Celery worker and the ASGI server, all subprocesses."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass

import httpx
import psutil
import pytest
from django.conf import settings

from portal.embedded_redis import free_port

# The tests' engines run one sequence each, so tier priorities decide who goes first.
ENGINE_MAX_NUM_SEQS = 1


@dataclass
class Engines:
    urls: dict[str, str]  # served model name -> base URL
    processes: list[subprocess.Popen]

    def wait_ready(self, timeout_s: float = 400) -> None:
        """Until every engine answers its health check. An engine that exits while loading (a
        bad argument, an import error) fails at once with its log's tail, not after the timeout."""
        deadline = time.monotonic() + timeout_s
        for (name, url), process in zip(self.urls.items(), self.processes, strict=True):
            log = settings.VAR_DIR / f"vllm-{name}.log"
            while True:
                try:
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if process.poll() is not None:
                    tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
                    raise RuntimeError(f"vLLM {name} exited with {process.returncode} while "
                                       f"loading; the end of {log}:\n{tail}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"vLLM {name} did not start; see {log}")
                time.sleep(1)

    def pin_to_first_core(self) -> None:
        """Once loaded, every thread of the engines and of their children runs on the first
        core. vLLM's CPU engine busy-polls: on two cores, two engines starved the web server,
        the worker and Redis for seconds at a time (a cancel then landed after the stream it
        was meant to stop). They load unpinned, beside the tests that need no engine. The same
        as `make run` does (portal.launcher)."""
        from portal.launcher import process_tree_pin

        if (os.cpu_count() or 1) < 2:
            return
        alive = []
        for process in self.processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                alive.append(psutil.Process(process.pid))
        process_tree_pin(alive, {0})

    def stop(self) -> None:
        for process in self.processes:  # all signalled first: they shut down together
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def engines_spawn(max_num_seqs: int = ENGINE_MAX_NUM_SEQS) -> Engines:
    """Start a vLLM server per variant of the tiny code model; they take a minute to load."""
    from inference.engines.vllm import vllm_server_argv, vllm_server_env
    from inference.registry import text_variants

    urls, processes = {}, []
    for spec, variant in text_variants():
        port = free_port()
        urls[variant.served_name] = f"http://127.0.0.1:{port}"
        log = open(settings.VAR_DIR / f"vllm-{variant.served_name}.log", "w")  # noqa: SIM115
        # Requests logged (prompts too, so never in production): tests read the engine's aborts.
        argv = vllm_server_argv(spec=spec, variant=variant, port=port) + [
            "--max-num-seqs", str(max_num_seqs), "--enable-log-requests"]
        processes.append(subprocess.Popen(argv, env=vllm_server_env(), stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
    return Engines(urls=urls, processes=processes)


# Started when collection ends (tests/conftest.py) if any collected test needs them, so they
# load while the tests that do not run; `text_engines_started` takes them over.
early_engines: Engines | None = None


def engines_start_early() -> None:
    global early_engines
    early_engines = engines_spawn()


def engines_stop_early() -> None:
    """At the session's end: engines started early that no fixture took over (the run stopped
    before the tests that needed them)."""
    global early_engines
    if early_engines is not None:
        early_engines.stop()
        early_engines = None


@pytest.fixture(scope="session")
def text_engines_started():
    """The vLLM servers (taken over from the collection's end, or started now), maybe still
    loading: their URLs are set for this process and the subprocesses started after, so what
    needs only the URLs (the text stack's web server) does not wait a minute for the engines."""
    global early_engines
    engines, early_engines = early_engines or engines_spawn(), None
    try:
        os.environ["SLUICE_VLLM_URLS"] = ",".join(f"{name}={url}" for name, url in engines.urls.items())
        settings.SLUICE_VLLM_URLS = engines.urls
        yield engines
    finally:
        engines.stop()


@pytest.fixture(scope="session")
def text_engines(text_engines_started):
    """vLLM servers with one running sequence each, so tier priorities decide who goes first."""
    text_engines_started.wait_ready()
    text_engines_started.pin_to_first_core()
    return text_engines_started.urls


@pytest.fixture(scope="session")
def text_worker(text_engines_started, django_db_setup, django_db_blocker):
    """A text-batch worker, started (not waited for)."""
    from tests.conftest import WorkerProcess

    with django_db_blocker.unblock():
        # Rules edited by a test must reach the worker at once (no rule cache).
        worker = WorkerProcess("text-batch", {"SLUICE_SAFETY_RULES_TTL_S": "0"})
    yield worker
    worker.stop()


@pytest.fixture(scope="session")
def text_server(text_engines_started, django_db_setup, django_db_blocker):
    """(server URL) The text stack's web server: it needs the engines' URLs, not the engines,
    so the browser tests that run no text use it while the engines load."""
    from tests.conftest import LiveServer

    with django_db_blocker.unblock():
        server = LiveServer({"SLUICE_SAFETY_RULES_TTL_S": "0"}).wait_ready()
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def text_stack(text_engines, text_worker, text_server):
    """(server URL) with a text-batch worker behind it and the engines loaded. The worker starts
    before the server (when neither is up yet, they boot side by side)."""
    return text_server
