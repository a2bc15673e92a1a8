"""`make run`'s supervisor, started as a real subprocess on a fresh SQLite file."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from portal.embedded_redis import free_port
from portal.launcher import STOP_GRACE_S, WEB_START_TIMEOUT_S

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
REDIS_PASSWORD = "s3cret-redis-pw"  # noqa: S105 - a test value


def _platform_env(tmp_path: Path, redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "SLUICE_DEBUG"}}
    env.update(SLUICE_VAR_DIR=str(tmp_path / "var"), REDIS_URL=redis_url, PYTHONUNBUFFERED="1",
               # The engines take a minute to load; the text tests start them (text_stack).
               SLUICE_VLLM_START="false")
    return env


class Output:
    """Collects the launcher's stdout in a thread so the pipe never fills."""

    def __init__(self, process: subprocess.Popen):
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._pump, args=(process,), daemon=True)
        self._thread.start()

    def _pump(self, process):
        for line in process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout_s: float) -> re.Match:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                match = re.search(pattern, line)
                if match:
                    return match
            time.sleep(0.1)
        raise AssertionError(f"no line matching {pattern!r} in:\n" + "\n".join(self.lines))


def _video_running(base_url: str, key: str, *, size: str, steps: int) -> str:
    """A tiny video's id, once a worker runs it."""
    headers = {"Authorization": f"Bearer {key}"}
    created = httpx.post(f"{base_url}v1/videos", headers=headers, timeout=60, json={
        "model": "sluice-video-tiny", "prompt": "a red square moving left", "size": size,
        "seconds": 1, "num_inference_steps": steps, "seed": 7})
    assert created.status_code == 201, created.text
    video_id = created.json()["id"]
    deadline = time.monotonic() + 180  # the worker may still be importing torch
    while (status := httpx.get(f"{base_url}v1/videos/{video_id}", headers=headers,
                               timeout=60).json()["status"]) == "queued":
        assert time.monotonic() < deadline, "no worker took the video"
        time.sleep(0.2)
    assert status == "in_progress"
    return video_id


def _job_row(var_dir: Path, job_id: str) -> tuple[str, str]:
    """(status, error_code) as the stopped platform left them in its SQLite file."""
    with sqlite3.connect(var_dir / "sluice.sqlite3") as database:
        return database.execute("SELECT status, error_code FROM inference_job WHERE id = ?",
                                (job_id,)).fetchone()


@pytest.mark.parametrize("redis_kind", ["embedded", "configured"])
def test_make_run_serves_the_demo_and_stops_every_child(tmp_path, redis_kind):
    """And how it stops: a video running at the first Ctrl-C (the embedded run) ends succeeded
    before make run exits (it was killed with its worker's process group, and recovered later
    as worker_lost); a second Ctrl-C (the configured run) stops at once, without waiting for
    the video still running."""
    port = free_port()
    # "embedded": REDIS_URL points at a port nobody listens on, so the launcher starts its own.
    # Its password must not be printed.
    redis_url = (os.environ["REDIS_URL"] if redis_kind == "configured"
                 else f"redis://:{REDIS_PASSWORD}@127.0.0.1:{free_port()}/0")
    env = _platform_env(tmp_path, redis_url)
    if redis_kind == "configured":
        # Which Redis is used does not change how the workers start: the embedded run starts
        # all of them, this one only the video pool's, for the video the second Ctrl-C stops
        # (five processes booting at once on two cores took most of its time).
        env["SLUICE_WORKER_QUEUES"] = "video-hbm"
    process = subprocess.Popen(
        [sys.executable, "manage.py", "runplatform", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = Output(process)
    try:
        # As long as make run itself waits: 90 s ran out while a busy machine loaded the classifier.
        dashboard = output.wait_for(r"^Dashboard: (http://\S+)$", timeout_s=WEB_START_TIMEOUT_S).group(1)
        login = output.wait_for(r"^Admin login: (\S+) / (\S+)$", timeout_s=5)
        key = output.wait_for(r"^Demo API key: (sk-\S+)$", timeout_s=5).group(1)
        assert dashboard == f"http://127.0.0.1:{port}/"
        assert (tmp_path / "var" / "demo_api_key").read_text().strip() == key
        if redis_kind == "embedded":
            line = output.wait_for(r"^Redis: .* \(embedded;.*", timeout_s=1).group(0)
            assert "redis://:[redacted]@127.0.0.1:" in line

        assert httpx.get(f"{dashboard}healthz").json() == {"status": "ok"}
        ready = httpx.get(f"{dashboard}readyz")
        assert ready.status_code == 200, ready.text
        models = httpx.get(f"{dashboard}v1/models", headers={"Authorization": f"Bearer {key}"})
        assert models.status_code == 200
        assert "sluice-code-tiny" in {m["id"] for m in models.json()["data"]}

        # The printed admin can log in to the dashboard and owns the pro demo tenant.
        with httpx.Client(base_url=dashboard, follow_redirects=True) as browser:
            page = browser.get("accounts/login/")
            token = browser.cookies["csrftoken"]
            landed = browser.post(
                "accounts/login/",
                data={"username": login.group(1), "password": login.group(2), "csrfmiddlewaretoken": token},
                headers={"Referer": f"{dashboard}accounts/login/"},
            )
            assert page.status_code == 200 and landed.status_code == 200
            assert "Demo Pro" in browser.get("t/demo-pro/").text

        # The embedded run's video lasts seconds (it drains); the other's minutes (not waited for).
        video_id = _video_running(dashboard, key, size="128x128" if redis_kind == "embedded"
                                  else "256x256", steps=10 if redis_kind == "embedded" else 50)
        children = psutil.Process(process.pid).children(recursive=True)
        names = " ".join(" ".join(child.cmdline()) for child in children)
        assert "uvicorn" in names and "celery" in names
        if redis_kind == "embedded":
            assert "redis-server" in names

        process.send_signal(signal.SIGINT)
        output.wait_for(r"^Stopping: 1 job still running; the workers finish them first "
                        r"\(at most \d+ s, SLUICE_STOP_DRAIN_S\)\. Press Ctrl-C again to stop now\.$",
                        timeout_s=30)
        if redis_kind == "embedded":
            # The web server stays up while the workers drain: the job's clients still reach it.
            video = httpx.get(f"{dashboard}v1/videos/{video_id}", timeout=60,
                              headers={"Authorization": f"Bearer {key}"})
            assert video.status_code == 200
            process.wait(timeout=300)
            assert _job_row(tmp_path / "var", video_id) == ("succeeded", "")
        else:
            second_at = time.monotonic()
            process.send_signal(signal.SIGINT)
            process.wait(timeout=60)
            assert time.monotonic() - second_at < STOP_GRACE_S  # nothing waited to be killed
            # Killed mid-job as before the drain existed: the reaper recovers it at the next start.
            assert _job_row(tmp_path / "var", video_id)[0] == "running"
    finally:
        if process.poll() is None:  # a failed run: stop now
            process.send_signal(signal.SIGINT)
            process.send_signal(signal.SIGINT)
            process.wait(timeout=60)
    assert process.returncode == 0
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"left running: {[p.pid for p in alive]}"
    assert output.lines[-1] == "Stopped."
    assert not [line for line in output.lines if REDIS_PASSWORD in line]


def _processes_of_run(var_dir: Path) -> list[psutil.Process]:
    """Every process started for this run: they all inherit its SLUICE_VAR_DIR."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("SLUICE_VAR_DIR") == str(var_dir):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def test_ctrl_c_during_start_up_stops_at_once(tmp_path):
    """Ctrl-C while the platform starts: it went on starting the web server and workers, waited
    for them to answer (up to WEB_START_TIMEOUT_S), printed the credentials and only then
    stopped."""
    env = _platform_env(tmp_path, os.environ["REDIS_URL"])
    env["SLUICE_WORKER_QUEUES"] = "default"
    process = subprocess.Popen(
        [sys.executable, "manage.py", "runplatform", "--port", str(free_port())],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    output = Output(process)
    try:
        output.wait_for(r"^Redis: ", timeout_s=60)  # signal handlers are in place
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0
    time.sleep(0.5)  # the output thread reads the last lines
    assert output.lines[-1] == "Stopped."
    assert not [line for line in output.lines if line.startswith(("Dashboard:", "Admin login:"))]
    gone, alive = psutil.wait_procs(_processes_of_run(tmp_path / "var"), timeout=10)
    assert not alive, f"left running: {[p.cmdline() for p in alive]}"
