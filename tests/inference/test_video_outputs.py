"""A video job's files across its attempts (inference/engines/diffusers.py, inference/media.py).
The reaper may take a worker for lost and hand its job to a second attempt while the first runs
on: each attempt stores under names of its own, nothing deletes or rewrites the files the job's
result points at, and the files of an attempt whose end did not stand go. The tiny real pipeline
runs in-process through the real runner; the runner's attempt check reads on a connection of its
own, which cannot see these tests' uncommitted rows, so a superseded attempt runs to its end, as
one whose check came too late does."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from django.core.files.storage import default_storage
from django.utils import timezone

from inference import runner
from inference.engines import engine_for
from inference.engines.base import RunContext
from inference.models import Job
from inference.registry import model_get
from inference.retention import jobs_content_expire
from inference.runner import job_run
from inference.services import job_claim, job_recover_lost

pytestmark = pytest.mark.django_db

VIDEO_BODY = {"model": "sluice-video-tiny", "prompt": "a blue circle", "size": "64x64",
              "seconds": 0.5, "num_inference_steps": 2}


@pytest.fixture(autouse=True)
def media_root(settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path
    return tmp_path


def create_video(api, key) -> str:
    response = api.bearer(key).post("/v1/videos", VIDEO_BODY, format="json")
    assert response.status_code == 201, response.json()
    return response.json()["id"]


def job_files(job_id: str) -> list[str]:
    """Every file stored for the job, whoever wrote it."""
    if not default_storage.exists("videos"):
        return []
    return sorted(name for name in default_storage.listdir("videos")[1] if name.startswith(job_id))


def published_files(job_id: str) -> dict[str, bytes]:
    result = Job.objects.get(pk=job_id).result
    return {result[variant]: default_storage.open(result[variant]).read()
            for variant in ("video", "thumbnail")}


def ended_by_its_second_attempt(job_id: str) -> Job:
    """Attempt 1 is claimed, then taken for lost (what the reaper does once its heartbeat is
    gone); attempt 2 runs the job to its end. Returns attempt 1's row as its worker read it."""
    first = job_claim(job_id=job_id, attempt=1)
    assert job_recover_lost(job=first) == "requeued"
    assert job_run(job_id=job_id, attempt=2) == "succeeded"
    return first


def late_end(first: Job) -> None:
    """The superseded attempt, running on, reaches its end only now (what job_run does after
    its claim), with another seed: another video than the one published."""
    first.params = {**first.params, "seed": 1234}
    assert runner._job_run_claimed(first) == "superseded"


def test_an_attempt_that_ends_after_the_one_that_replaced_it_leaves_its_files_alone(cast, api,
                                                                                     sent_tasks):
    job_id = create_video(api, cast.owner_key)
    first = ended_by_its_second_attempt(job_id)
    published = published_files(job_id)
    result = Job.objects.get(pk=job_id).result
    assert sorted(Path(name).name for name in published) == [f"{job_id}-2.jpg", f"{job_id}-2.mp4"]

    late_end(first)
    assert published_files(job_id) == published  # the same files, the same bytes
    assert job_files(job_id) == sorted(Path(name).name for name in published)  # its own went
    job = Job.objects.get(pk=job_id)
    assert (job.status, job.attempts, job.result) == ("succeeded", 2, result)


@pytest.mark.parametrize("second_attempt", ["succeeds", "never runs"])
def test_the_files_of_an_attempt_whose_worker_died_after_storing_them_go_when_the_job_ends(
        cast, api, sent_tasks, settings, second_attempt):
    job_id = create_video(api, cast.owner_key)
    first = job_claim(job_id=job_id, attempt=1)
    # Its engine stores the video; its worker dies before the job's end.
    engine_for(model_get(first.model)).run(RunContext(
        job_id=job_id, params=first.params, variant=first.variant, attempt=first.attempts,
        emit_progress=lambda progress, data: None, emit_output=lambda data: None,
        should_stop=lambda: False))
    assert job_files(job_id) == [f"{job_id}-1.jpg", f"{job_id}-1.mp4"]
    if second_attempt == "succeeds":
        assert job_recover_lost(job=first) == "requeued"
        assert job_run(job_id=job_id, attempt=2) == "succeeded"
        assert job_files(job_id) == [f"{job_id}-2.jpg", f"{job_id}-2.mp4"]
        assert sorted(Path(name).name for name in published_files(job_id)) == job_files(job_id)
    else:  # its last attempt: the reaper fails the job
        settings.SLUICE_JOB_MAX_ATTEMPTS = 1
        assert job_recover_lost(job=first) == "failed"
        assert job_files(job_id) == []


def test_content_stays_the_published_file_and_deletion_removes_it(cast, api, sent_tasks):
    job_id = create_video(api, cast.owner_key)
    first = ended_by_its_second_attempt(job_id)
    url = f"/v1/videos/{job_id}/content"
    whole = api.get(url)
    video = b"".join(whole.streaming_content)
    etag = whole["ETag"]
    assert whole.status_code == 200 and video == published_files(job_id)[Job.objects.get(
        pk=job_id).result["video"]]

    late_end(first)
    # A client's copy is still the current one, and a download resumes on the same bytes.
    assert api.get(url, HTTP_IF_NONE_MATCH=etag).status_code == 304
    part = api.get(url, HTTP_RANGE="bytes=10-99", HTTP_IF_RANGE=etag)
    assert part.status_code == 206 and b"".join(part.streaming_content) == video[10:100]
    assert b"".join(api.get(url).streaming_content) == video
    assert api.bearer(cast.outsider_key).get(url).status_code == 404

    assert api.bearer(cast.owner_key).delete(f"/v1/videos/{job_id}").json()["deleted"] is True
    assert job_files(job_id) == []


def test_retention_removes_the_files_of_a_video_ended_by_its_second_attempt(cast, api, sent_tasks,
                                                                            settings):
    settings.SLUICE_MEDIA_RETENTION_DAYS = 30
    job_id = create_video(api, cast.owner_key)
    late_end(ended_by_its_second_attempt(job_id))
    assert len(job_files(job_id)) == 2
    Job.objects.filter(pk=job_id).update(finished_at=timezone.now() - timedelta(days=31))
    assert jobs_content_expire() == 1
    assert job_files(job_id) == []
    assert api.bearer(cast.owner_key).get(f"/v1/videos/{job_id}/content").status_code == 404
