"""`make run` pins each engine it started to SLUICE_ENGINE_CPUS once it has loaded: vLLM's CPU
engine busy-polls, and on every core of a small machine it starved everything else."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest
from django.core.exceptions import ImproperlyConfigured

from inference.registry import text_variants
from portal.embedded_redis import free_port
from portal.env import env_cpus
from portal.launcher import Supervisor, _engines_pin_when_loaded, engine_cpus, process_tree_pin

needs_two_cpus = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")


@pytest.mark.parametrize(("raw", "read"), [
    ("auto", "auto"), ("", "auto"), ("NONE", "none"), ("0", frozenset({0})), ("0-2,5", frozenset({0, 1, 2, 5})),
])
def test_the_setting_reads_auto_none_or_a_cpu_list(monkeypatch, raw, read):
    monkeypatch.setenv("SLUICE_ENGINE_CPUS", raw)
    assert env_cpus("SLUICE_ENGINE_CPUS", "auto") == read


@pytest.mark.parametrize("raw", ["cores", "1-", "-1", "2-1", "0,,1"])
def test_a_bad_cpu_list_stops_the_start(monkeypatch, raw):
    monkeypatch.setenv("SLUICE_ENGINE_CPUS", raw)
    with pytest.raises(ImproperlyConfigured):
        env_cpus("SLUICE_ENGINE_CPUS", "auto")


def test_auto_leaves_the_last_cpu_to_the_rest_on_a_cpu_machine_only():
    assert engine_cpus("auto", available={0, 1}, has_gpu=False) == {0}
    assert engine_cpus("auto", available={0, 1, 2, 3}, has_gpu=False) == {0, 1, 2}
    assert engine_cpus("auto", available={0}, has_gpu=False) is None
    assert engine_cpus("auto", available={0, 1}, has_gpu=True) is None
    assert engine_cpus("none", available={0, 1}, has_gpu=False) is None
    assert engine_cpus(frozenset({1, 7}), available={0, 1}, has_gpu=False) == {1}
    assert engine_cpus(frozenset({7}), available={0, 1}, has_gpu=False) is None


THREADED_CHILD = """
import subprocess, sys, threading, time
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
time.sleep(60)
"""


@needs_two_cpus
def test_every_thread_of_the_tree_is_pinned():
    parent = subprocess.Popen([sys.executable, "-c", THREADED_CHILD])
    try:
        tree = psutil.Process(parent.pid)
        deadline = time.monotonic() + 10
        while not (tree.children() and tree.num_threads() >= 2) and time.monotonic() < deadline:
            time.sleep(0.05)
        pinned = process_tree_pin([tree], {0})
        threads = [t.id for member in (tree, *tree.children()) for t in member.threads()]
        assert len(pinned) == len(threads) >= 3
        assert {frozenset(os.sched_getaffinity(thread)) for thread in threads} == {frozenset({0})}
    finally:
        parent.kill()
        parent.wait()


@needs_two_cpus
@pytest.mark.django_db
def test_an_engine_is_pinned_once_it_answers_its_health_check(tmp_path, settings, capsys):
    """A stand-in answers /health only after a while, as an engine does once loaded: it stays
    on every CPU until then."""
    _spec, variant = text_variants()[0]
    port = free_port()
    settings.SLUICE_VLLM_URLS = {variant.served_name: f"http://127.0.0.1:{port}"}
    (tmp_path / "health").write_text("ok")
    supervisor = Supervisor()
    supervisor.spawn("engine", [sys.executable, "-c", f"""
import http.server, os, time
time.sleep(1.5)
os.chdir({str(tmp_path)!r})
http.server.test(http.server.SimpleHTTPRequestHandler, port={port}, bind="127.0.0.1")
"""], dict(os.environ))
    try:
        engine = psutil.Process(supervisor.children["engine"].pid)
        time.sleep(0.5)
        assert os.sched_getaffinity(engine.pid) == os.sched_getaffinity(0)  # loading: every CPU
        _engines_pin_when_loaded(supervisor, [("engine", variant)], {0})
        assert {frozenset(os.sched_getaffinity(t.id)) for t in engine.threads()} == {frozenset({0})}
        assert f"Engine: {variant.served_name} ready;" in capsys.readouterr().out
    finally:
        supervisor.stop()
