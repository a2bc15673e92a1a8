"""The liveness probes the manifests exec (portal/probes.py) tell a busy worker or beat from a
stuck one."""

from __future__ import annotations

import os
import shelve
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.inference.test_worker import create_video, event_types, wait_for


def probe(*args: str) -> subprocess.CompletedProcess:
    """As the kubelet execs it: a fresh interpreter in the worker's environment."""
    return subprocess.run([sys.executable, "-m", "portal.probes", *args], capture_output=True,
                          text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_worker_probe_passes_mid_job_and_fails_once_the_consumer_is_stuck(cast, api, start_worker):
    worker = start_worker("video-hbm")
    args = worker.process.args
    node_pattern = args[args.index("-n") + 1]
    job_id = create_video(api, cast.owner_key, num_inference_steps=40)["id"]
    wait_for(lambda: "job.progress" in event_types(job_id), 120, worker, "the first step")

    # Prefetch 1, the one prefork child busy with the video: the main process still answers.
    answered = probe("worker", node_pattern)
    assert answered.returncode == 0, answered.stderr + worker.output()[-2000:]
    assert "job.completed" not in event_types(job_id)  # it answered mid-job

    os.kill(worker.process.pid, signal.SIGSTOP)  # a consumer that no longer runs
    try:
        stuck = probe("worker", node_pattern)
    finally:
        os.kill(worker.process.pid, signal.SIGCONT)
    assert stuck.returncode == 1 and "did not answer" in stuck.stderr


def test_beat_probe_fails_once_the_schedule_stops_being_saved(tmp_path):
    schedule = tmp_path / "celerybeat-schedule"
    assert probe("beat", str(schedule), "360").returncode == 1  # never saved

    # As celery beat saves it: whichever files this Python's dbm writes (schedule.dat, .dir...).
    with shelve.open(str(schedule), writeback=True) as store:  # noqa: S301 - our own file
        store["entries"] = {}
    assert probe("beat", str(schedule), "360").returncode == 0

    stale = time.time() - 400
    for path in tmp_path.iterdir():
        os.utime(path, (stale, stale))
    failed = probe("beat", str(schedule), "360")
    assert failed.returncode == 1 and "last saved" in failed.stderr
