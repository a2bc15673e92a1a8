"""SIGTERM on a GPU worker mid-job loses nothing: the job completes exactly once."""

from __future__ import annotations

import os
import signal

import pytest

from inference.models import Job
from inference.services import jobs_reap
from quotas.models import LedgerEntry
from tests.inference.test_worker import create_video, event_types, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def test_sigterm_mid_job_finishes_or_hands_back_the_job_exactly_once(cast, api, start_worker, settings):
    settings.SLUICE_JOB_HEARTBEAT_TTL_S = 2  # the reaper's grace: the workers' heartbeat TTL
    worker = start_worker("video-hbm")
    job_id = create_video(api, cast.owner_key, num_inference_steps=12)["id"]
    wait_for(lambda: "job.progress" in event_types(job_id), 120, worker, "the first step")

    # What Kubernetes does on a scale-down or a drain: SIGTERM to the container's PID 1 (the
    # Celery main process; exec-form command). Celery's warm shutdown lets the job finish.
    os.kill(worker.process.pid, signal.SIGTERM)
    wait_for(lambda: worker.process.poll() is not None, 60, worker, "the warm shutdown")
    job = Job.objects.get(pk=job_id)
    if job.status != Job.Status.SUCCEEDED:
        # Handed back instead (e.g. the grace period ran out): the heartbeat expires, the reaper
        # redelivers, and a fresh worker finishes it.
        wait_for(lambda: jobs_reap(), 30, what="the reaper to redeliver")
        second = start_worker("video-hbm")
        wait_for(lambda: Job.objects.get(pk=job_id).status == "succeeded", 120, second, "completion")
        job.refresh_from_db()

    assert worker.process.returncode == 0, worker.output()[-2000:]
    assert job.status == Job.Status.SUCCEEDED and job.actual_mcu == job.estimated_mcu
    assert event_types(job_id).count("job.completed") == 1
    assert LedgerEntry.objects.filter(reservation__job=job, kind="settle").count() == 1
