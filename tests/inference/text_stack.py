"""Session-wide real text stack for the text tests: vLLM servers for both variants of the
tiny code model, a threaded text-batch Celery worker and the ASGI server, all subprocesses."""

from __future__ import annotations

import os
import subprocess
import time

import httpx
import pytest
from django.conf import settings

from portal.embedded_redis import free_port


def _start_engines(max_num_seqs: int) -> tuple[dict[str, str], list[subprocess.Popen]]:
    from inference.engines.vllm import vllm_server_argv, vllm_server_env
    from inference.registry import text_variants

    urls, processes = {}, []
    log_dir = settings.VAR_DIR
    for _spec, variant in text_variants():
        port = free_port()
        urls[variant.served_name] = f"http://127.0.0.1:{port}"
        log = open(log_dir / f"vllm-{variant.served_name}.log", "w")  # noqa: SIM115
        # Requests logged (prompts too, so never in production): tests read the engine's aborts.
        argv = vllm_server_argv(variant=variant, port=port) + [
            "--max-num-seqs", str(max_num_seqs), "--enable-log-requests"]
        processes.append(subprocess.Popen(argv, env=vllm_server_env(), stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + 400
    for name, url in urls.items():
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM {name} did not start; see var/vllm-{name}.log")
            time.sleep(1)
    return urls, processes


@pytest.fixture(scope="session")
def text_engines():
    """vLLM servers with one running sequence each, so tier priorities decide who goes first."""
    import signal

    urls, processes = _start_engines(max_num_seqs=1)
    value = ",".join(f"{name}={url}" for name, url in urls.items())
    os.environ["SLUICE_VLLM_URLS"] = value
    settings.SLUICE_VLLM_URLS = urls
    yield urls
    for process in processes:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def text_stack(text_engines, django_db_setup, django_db_blocker):
    """(server URL) with a text-batch worker behind it."""
    from tests.conftest import LiveServer, WorkerProcess

    with django_db_blocker.unblock():
        # Rules edited by a test must reach the worker at once (no rule cache).
        worker = WorkerProcess("text-batch", {"SLUICE_SAFETY_RULES_TTL_S": "0"})
        server = LiveServer({"SLUICE_SAFETY_RULES_TTL_S": "0"}).wait_ready()
    yield server.url
    server.stop()
    worker.stop()
