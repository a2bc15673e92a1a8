"""make run's supervisor (portal/launcher.py): how long it waits for the web server."""

from __future__ import annotations

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
