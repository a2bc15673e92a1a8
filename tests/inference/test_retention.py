"""Retention (inference/retention.py): SLUICE_MEDIA_RETENTION_DAYS after a job ended its files,
result and prompt go, the row, its usage and its ledger stay, and the content endpoint says the
video expired."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.utils import timezone

from inference import retention
from inference.models import Job
from inference.retention import jobs_content_expire
from inference.services import job_claim, job_fail, job_succeed
from quotas.models import LedgerEntry

pytestmark = pytest.mark.django_db

VIDEO_BODY = {"model": "sluice-video-tiny", "prompt": "a blue circle", "size": "64x64",
              "seconds": 0.5, "num_inference_steps": 2}


def ended_video(api, key, *, days_ago: float, succeed: bool = True) -> tuple[str, dict]:
    job_id = api.bearer(key).post("/v1/videos", VIDEO_BODY, format="json").json()["id"]
    job = job_claim(job_id=job_id, attempt=1)
    files = {}
    if succeed:
        files = {"video": default_storage.save(f"videos/{job_id}.mp4", ContentFile(b"mp4")),
                 "thumbnail": default_storage.save(f"videos/{job_id}.jpg", ContentFile(b"jpg"))}
        job_succeed(job=job, actual_mcu=700, result=files, usage={"steps": 2})
    else:
        job_fail(job=job, code="engine_error", message="boom")
    Job.objects.filter(pk=job_id).update(finished_at=timezone.now() - timedelta(days=days_ago))
    return job_id, files


def test_a_video_past_its_retention_loses_its_files_and_content_says_it_expired(
        cast, api, sent_tasks, settings):
    settings.SLUICE_MEDIA_RETENTION_DAYS = 30
    old_id, old_files = ended_video(api, cast.owner_key, days_ago=31)
    failed_id, _ = ended_video(api, cast.owner_key, days_ago=31, succeed=False)
    recent_id, recent_files = ended_video(api, cast.owner_key, days_ago=29)
    ledger = list(LedgerEntry.objects.values_list("pk", "kind", "mcu"))

    assert jobs_content_expire() == 2
    assert not any(default_storage.exists(name) for name in old_files.values())
    assert all(default_storage.exists(name) for name in recent_files.values())
    old = Job.objects.get(pk=old_id)
    assert old.result == {"expired_at": old.result["expired_at"], "retention_days": 30}
    assert "prompt" not in old.params and old.params["steps"] == 2
    assert (old.status, old.actual_mcu, old.usage) == ("succeeded", 700, {"steps": 2})
    failed = Job.objects.get(pk=failed_id)
    assert failed.result == {} and "prompt" not in failed.params and failed.error_code == "engine_error"
    assert list(LedgerEntry.objects.values_list("pk", "kind", "mcu")) == ledger
    assert jobs_content_expire() == 0  # idempotent

    for variant in ("video", "thumbnail"):
        response = api.bearer(cast.owner_key).get(f"/v1/videos/{old_id}/content?variant={variant}")
        assert response.status_code == 404
        error = response.json()["error"]
        assert error["code"] == "not_found" and "expired" in error["message"]
        assert "30 days" in error["message"]
    assert api.get(f"/v1/videos/{old_id}").json()["status"] == "completed"  # the video object stays
    assert api.get(f"/v1/videos/{recent_id}/content").status_code == 200
    outsider = api.bearer(cast.outsider_key).get(f"/v1/videos/{old_id}/content")
    assert outsider.status_code == 404 and "expired" not in outsider.json()["error"]["message"]


def test_zero_keeps_everything_and_a_run_is_bounded(cast, api, sent_tasks, settings, monkeypatch):
    settings.SLUICE_MEDIA_RETENTION_DAYS = 0
    job_ids = [ended_video(api, cast.owner_key, days_ago=400)[0] for _ in range(3)]
    assert jobs_content_expire() == 0
    settings.SLUICE_MEDIA_RETENTION_DAYS = 30
    monkeypatch.setattr(retention, "EXPIRE_BATCH", 2)
    assert jobs_content_expire() == 2
    assert jobs_content_expire() == 1
    assert all("expired_at" in Job.objects.get(pk=job_id).result for job_id in job_ids)


def test_a_file_removed_under_its_pointer_is_a_404_not_a_500(cast, api, sent_tasks):
    job_id, files = ended_video(api, cast.owner_key, days_ago=1)
    default_storage.delete(files["video"])
    response = api.bearer(cast.owner_key).get(f"/v1/videos/{job_id}/content")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_the_retention_runs_on_beat(settings):
    assert any(entry["task"] == "inference.jobs_content_expire"
               for entry in settings.CELERY_BEAT_SCHEDULE.values())
