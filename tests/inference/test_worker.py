"""Video jobs through a real Celery worker subprocess running the tiny diffusers pipeline."""

from __future__ import annotations

import time

import imageio_ffmpeg
import pytest
from django.core.files.storage import default_storage

from inference.events import events_read
from inference.models import Job
from inference.services import jobs_reap
from quotas.models import LedgerEntry

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def create_video(api, key, **fields):
    body = {"model": "sluice-video-tiny", "prompt": "a red square moving left", "size": "64x64",
            "seconds": 0.5, "num_inference_steps": 4, "seed": 7, **fields}
    response = api.bearer(key).post("/v1/videos", body, format="json")
    assert response.status_code == 201, response.json()
    return response.json()


def wait_for(predicate, timeout_s: float, worker=None, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}" + (f"\n{worker.output()[-3000:]}" if worker else ""))


def event_types(job_id: str) -> list[str]:
    return [event.type for event in events_read(job_id=job_id)]


def test_video_job_runs_to_a_playable_mp4(cast, api, start_worker):
    worker = start_worker("video-hbm")
    video = create_video(api, cast.owner_key)
    assert video["status"] == "queued" and video["object"] == "video"
    job_id = video["id"]
    wait_for(lambda: Job.objects.get(pk=job_id).status == "succeeded", 120, worker, "completion")

    done = api.get(f"/v1/videos/{job_id}").json()
    assert done["status"] == "completed" and done["progress"] == 100
    assert done["actual_cu"] == done["estimated_cu"] > 0
    types = event_types(job_id)
    assert types[0] == "job.queued" and types[1] == "job.started" and types[-1] == "job.completed"
    steps = [e.data["step"] for e in events_read(job_id=job_id) if e.type == "job.progress"]
    assert steps == [1, 2, 3, 4]  # every step, in order
    seqs = [e.seq for e in events_read(job_id=job_id)]
    assert seqs == list(range(1, len(seqs) + 1))

    content = api.get(f"/v1/videos/{job_id}/content")
    assert content.status_code == 200 and content["Content-Type"] == "video/mp4"
    job = Job.objects.get(pk=job_id)
    reader = imageio_ffmpeg.read_frames(default_storage.path(job.result["video"]))
    meta = next(reader)
    frames = sum(1 for _ in reader)
    assert meta["size"] == (64, 64) and frames == 5
    thumbnail = api.get(f"/v1/videos/{job_id}/content", {"variant": "thumbnail"})
    assert thumbnail.status_code == 200 and thumbnail["Content-Type"] == "image/jpeg"
    settles = LedgerEntry.objects.filter(reservation__job=job, kind="settle")
    assert [entry.mcu for entry in settles] == [job.actual_mcu]


def test_cancel_running_video_stops_within_one_step_and_refunds(cast, api, start_worker):
    worker = start_worker("video-hbm")
    video = create_video(api, cast.owner_key, num_inference_steps=50, size="128x128")
    job_id = video["id"]
    wait_for(lambda: "job.progress" in event_types(job_id), 120, worker, "the first step")
    response = api.delete(f"/v1/videos/{job_id}")
    assert response.status_code == 200
    steps_at_cancel = max(e.data["step"] for e in events_read(job_id=job_id) if e.type == "job.progress")
    wait_for(lambda: Job.objects.get(pk=job_id).status == "cancelled", 60, worker, "the cancel")
    job = Job.objects.get(pk=job_id)
    steps_run = job.usage["steps"]
    assert steps_at_cancel <= steps_run <= steps_at_cancel + 1 < 50
    assert 0 < job.actual_mcu < job.estimated_mcu
    assert job.actual_mcu == pytest.approx(job.estimated_mcu * steps_run / 50, abs=2)
    refund = LedgerEntry.objects.get(reservation__job=job, kind="refund").mcu
    assert refund == job.estimated_mcu - job.actual_mcu
    assert event_types(job_id)[-1] == "job.cancelled"


def test_sigkilled_worker_job_is_redelivered_and_completes_once(cast, api, start_worker):
    first = start_worker("video-hbm")
    video = create_video(api, cast.owner_key, num_inference_steps=12)
    job_id = video["id"]
    wait_for(lambda: "job.progress" in event_types(job_id), 120, first, "the first step")
    first.kill()
    assert Job.objects.get(pk=job_id).status == "running"
    # The heartbeat (2 s in these workers) expires; the reaper hands the job out again.
    outcome = wait_for(lambda: jobs_reap(), 30, what="the reaper to notice")
    assert outcome == {"requeued": 1}
    second = start_worker("video-hbm")
    wait_for(lambda: Job.objects.get(pk=job_id).status == "succeeded", 180, second, "completion")
    job = Job.objects.get(pk=job_id)
    assert job.attempts == 2
    assert event_types(job_id).count("job.completed") == 1
    assert LedgerEntry.objects.filter(reservation__job=job, kind="settle").count() == 1
    assert job.actual_mcu == job.estimated_mcu
