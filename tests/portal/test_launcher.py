"""make run's supervisor (portal/launcher.py): how long it waits for the web server, and how it
stops its children."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest

from portal import launcher


def test_make_run_waits_minutes_for_the_web_server_not_one():
    """At start-up the web server, four workers and two vLLM engines all import torch on the
    2-core machine, and the web server then loads the safety classifier before it answers:
    55 s and 50 s on two runs of an otherwise idle machine, past 60 s with a test suite beside
    it, and make run gave up ("did not answer within 60 s")."""
    assert launcher.WEB_START_TIMEOUT_S >= 300


def test_a_web_server_that_never_answers_is_reported_with_the_likely_cause(monkeypatch):
    monkeypatch.setattr(launcher.time, "sleep", lambda _s: None)
    with pytest.raises(RuntimeError, match="did not answer within 0 s.*safety classifier"):
        launcher._wait_for_http("http://127.0.0.1:9/healthz", launcher.Supervisor(), timeout_s=0)


def test_the_web_server_ends_open_streams_before_make_run_kills_it():
    """On Ctrl-C uvicorn waited for every open SSE stream, so a dashboard or client following a
    job had the web server SIGKILLed STOP_GRACE_S later. It ends them itself, in time."""
    argv = launcher.web_server_argv(host="127.0.0.1", port=8000)
    graceful_s = float(argv[argv.index("--timeout-graceful-shutdown") + 1])
    assert 0 < graceful_s <= launcher.STOP_GRACE_S - 3  # uvicorn's own exit after it


# A Celery worker as the stop sees it: a main process that on SIGTERM (warm shutdown) waits for
# its running job, which runs in a child in its process group as prefork's does. The job ends
# when the test creates FINISH; signalled, it dies and the worker exits non-zero.
WORKER_STAND_IN = """
import os, signal, subprocess, sys
from pathlib import Path

job = subprocess.Popen([sys.executable, "-c", "import os, time\\n"
                        "while not os.path.exists(os.environ['FINISH']): time.sleep(0.05)"])
signal.signal(signal.SIGTERM, lambda *_: Path(os.environ["DRAINING"]).touch())
Path(os.environ["READY"]).touch()
sys.exit(0 if job.wait() == 0 else 1)
"""


def _wait_for_file(path, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.05)


@pytest.mark.parametrize("then", ["the job ends", "a second stop request"])
def test_the_first_stop_lets_the_workers_jobs_end_and_keeps_the_engines_up(tmp_path, then):
    """The first Ctrl-C sent SIGTERM to every process group: prefork children died mid-job (a
    video recovered later as worker_lost) and the engines a text job streamed from went with
    them. Now a worker's main process alone is asked to finish its jobs, the engines wait for
    it, and the next request stops everything without waiting."""
    supervisor = launcher.Supervisor()
    markers = {name: tmp_path / name for name in ("READY", "DRAINING", "FINISH")}
    env = dict(os.environ, **{name: str(path) for name, path in markers.items()})
    supervisor.spawn("engine:code", [sys.executable, "-c", "import time; time.sleep(120)"], env)
    supervisor.spawn(f"{launcher.WORKER_PREFIX}text", [sys.executable, "-c", WORKER_STAND_IN], env)
    engine, worker = supervisor.children.values()
    stopping = threading.Thread(target=supervisor.stop, kwargs={"drain_s": 60})
    try:
        _wait_for_file(markers["READY"])
        supervisor.request_stop()
        stopping.start()
        _wait_for_file(markers["DRAINING"])
        assert worker.poll() is None and engine.poll() is None
        if then == "the job ends":
            markers["FINISH"].touch()
        else:
            supervisor.request_stop()
        stopping.join(timeout=launcher.STOP_GRACE_S - 5)
        assert not stopping.is_alive()
        # Its job ran to its end, or was stopped at once by the second request.
        assert worker.returncode == (0 if then == "the job ends" else 1)
        assert engine.returncode == -signal.SIGTERM
    finally:
        for _ in range(2):  # a failed run: stop now
            supervisor.request_stop()
        if stopping.is_alive():
            stopping.join()
        else:
            supervisor.stop()


@pytest.mark.django_db
def test_the_stop_line_says_when_no_job_is_running():
    """It read 'Stopping: 0 jobs still running; the workers finish them first…'."""
    assert launcher._drain_line(["text-batch", "video-hbm"], 30) == "Stopping: no job is running."
