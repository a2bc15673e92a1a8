"""A video's `expires_at` (OpenAI's Video field, in the SDK's model): when its files go."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.utils import timezone
from openai._models import construct_type
from openai.types import Video

from inference.models import Job
from inference.retention import jobs_content_expire
from inference.services import job_claim, job_succeed

pytestmark = pytest.mark.django_db

VIDEO_BODY = {"model": "sluice-video-tiny", "prompt": "a blue circle", "size": "64x64",
              "seconds": 0.5, "num_inference_steps": 2}


def _completed_video(api, key) -> Job:
    job_id = api.bearer(key).post("/v1/videos", VIDEO_BODY, format="json").json()["id"]
    job = job_claim(job_id=job_id, attempt=1)
    path = default_storage.save(f"videos/{job_id}-1.mp4", ContentFile(b"mp4"))
    job_succeed(job=job, actual_mcu=job.estimated_mcu, result={"video": path}, usage={})
    return Job.objects.get(pk=job_id)


def _expires_at(api, job_id: str) -> int | None:
    return construct_type(type_=Video, value=api.get(f"/v1/videos/{job_id}").json()).expires_at


def test_a_completed_video_expires_its_retention_after_it_ended(cast, api, sent_tasks, settings):
    """The files go SLUICE_MEDIA_RETENTION_DAYS after the end and the content then answers 404;
    `expires_at` said nothing of it (always null), so no client could fetch its video in time."""
    settings.SLUICE_MEDIA_RETENTION_DAYS = 30
    settings.SLUICE_POOL_SLOTS = {"video-hbm": 0}  # the second one waits
    job = _completed_video(api, cast.owner_key)
    expected = int((job.finished_at + timedelta(days=30)).timestamp())
    assert _expires_at(api, job.pk) == expected
    assert [video["expires_at"] for video in api.get("/v1/videos").json()["data"]] == [expected]
    queued = api.post("/v1/videos", VIDEO_BODY, format="json").json()
    assert queued["expires_at"] is None  # no files yet
    # Once expired, it says when it did (under the retention it expired under).
    jobs_content_expire(now=job.finished_at + timedelta(days=31))
    settings.SLUICE_MEDIA_RETENTION_DAYS = 7
    assert _expires_at(api, job.pk) == expected
    assert api.get(f"/v1/videos/{job.pk}/content").status_code == 404


def test_videos_kept_for_ever_do_not_expire(cast, api, sent_tasks, settings):
    settings.SLUICE_MEDIA_RETENTION_DAYS = 0
    job = _completed_video(api, cast.owner_key)
    assert _expires_at(api, job.pk) is None
    assert jobs_content_expire(now=timezone.now() + timedelta(days=3650)) == 0
