"""Retention of what jobs produced and were sent (beat, hourly): SLUICE_MEDIA_RETENTION_DAYS
after a job ended, its video's mp4 and thumbnail are removed from the media volume, its result
(the files' pointers, a completion's text) is replaced by a note of when it expired, and the
prompt it was sent goes (as a deleted job's does), as does the result its recorded webhook
events carry. The row stays, with its usage and CU: the ledger and the usage reports refer to
it. 0 keeps everything for ever. OpenAI's videos expire too; /v1/videos/{id}/content then
answers 404 saying so (inference/media.py)."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.utils import timezone

from inference.media import job_media_remove
from inference.models import CONTENT_EXPIRED_KEY, EXPIRABLE, Job
from inference.services import job_params_without_content
from inference.webhooks import webhook_events_job_content_remove

logger = logging.getLogger(__name__)

EXPIRE_BATCH = 500
EXPIRED = CONTENT_EXPIRED_KEY  # the result's key once its content went: when (epoch seconds)
RETENTION_DAYS = "retention_days"  # ... and after how many days


def job_content_expired(job: Job) -> bool:
    return EXPIRED in (job.result or {})


def jobs_content_expire(*, now: datetime | None = None) -> int:
    """Expire the content of up to EXPIRE_BATCH jobs that ended more than the retention ago,
    oldest first; returns how many. Idempotent: the files go first, then the row's pointers,
    so a failure between the two leaves the row for the next run (a missing file is no error),
    and an expired row is not selected again."""
    days = settings.SLUICE_MEDIA_RETENTION_DAYS
    if not days:
        return 0
    now = now or timezone.now()
    due = (
        Job.objects.filter(EXPIRABLE, status__in=Job.TERMINAL,
                           finished_at__lt=now - timedelta(days=days))
        .order_by("finished_at")
        .values("pk", "kind", "result", "params")[:EXPIRE_BATCH]
    )
    expired = 0
    for row in due:
        try:
            if row["kind"] == Job.Kind.VIDEO and row["result"]:
                job_media_remove(row["result"])
        except OSError:  # storage trouble: the next run tries again
            logger.warning("could not remove the media of job %s", row["pk"], exc_info=True)
            continue
        # Before the row: an expired row is not selected again, so a failure must come first.
        webhook_events_job_content_remove(job_id=row["pk"])
        params = job_params_without_content(row["params"])
        note = {EXPIRED: int(now.timestamp()), RETENTION_DAYS: days} if row["result"] else {}
        expired += Job.objects.filter(pk=row["pk"], deleted_at__isnull=True).exclude(
            result__has_key=EXPIRED).update(result=note, params=params)
    if expired:
        logger.info("expired the content of %d jobs ended more than %d days ago", expired, days)
    return expired
