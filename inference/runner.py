"""What a GPU worker does with one job: claim it, keep its heartbeat, run the engine with
progress/output/stop hooks, then finish, cancel or fail it through the job services."""

from __future__ import annotations

import logging
import threading
import time

from django.conf import settings
from django.utils import timezone

from inference.engines import engine_for
from inference.engines.base import RunContext
from inference.registry import model_get
from inference.services import (
    job_cancel_requested,
    job_cancelled,
    job_claim,
    job_fail,
    job_heartbeat,
    job_output,
    job_preview,
    job_progress,
    job_started,
    job_succeed,
)
from portal.logs import log_context

logger = logging.getLogger(__name__)

# The job row's `progress` (for pollers) is written at most this often; followers get every
# step from the stream, and the finish sets 100.
PROGRESS_ROW_INTERVAL_S = 1.0


class _Heartbeat:
    """Refreshes the job's heartbeat from a thread, so a long engine step never looks lost."""

    def __init__(self, job_id: str):
        self._job_id = job_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name=f"hb-{job_id}")

    def _beat(self) -> None:
        interval = max(1.0, settings.SLUICE_JOB_HEARTBEAT_TTL_S / 3)
        while not self._stop.wait(interval):
            try:
                job_heartbeat(job_id=self._job_id)
            except Exception:  # Redis hiccup: the next beat retries
                logger.warning("heartbeat of %s failed", self._job_id)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join(timeout=5)


def output_moderator_for(job):
    from moderation.cascade import OutputModerator
    from moderation.models import SafetyPolicy
    from moderation.selectors import safety_policy_for_tenant

    snapshot = job.params.get("safety_policy")
    # Jobs queued before jobs carried their policy look it up.
    policy = (SafetyPolicy.from_snapshot(snapshot) if snapshot
              else safety_policy_for_tenant(tenant=job.tenant))
    return OutputModerator(policy=policy)


def output_case_open(*, job, verdict, text: str) -> None:
    """A stream stopped by output moderation opens a case, like a blocked prompt does."""
    from moderation.models import ModerationCase
    from moderation.services import case_open

    case_open(tenant=job.tenant, api_key=job.api_key, verdict=verdict, text=text,
              source=ModerationCase.Source.OUTPUT, endpoint=f"jobs:{job.kind}", request_id=job.pk)


def job_run(*, job_id: str, attempt: int) -> str:
    # Every line logged while the job runs names it (portal/logs.py).
    with log_context(job_id=job_id):
        job = job_claim(job_id=job_id, attempt=attempt, announce=False)
        if job is None:
            return "skipped"  # cancelled, finished, or a stale redelivery
        with log_context(tenant_id=job.tenant_id, pool=job.pool):
            return _job_run_claimed(job)


class _Announcement:
    """`job.started` (job_started), at most once: when the engine has the work, and in any
    case before the job's first output, progress or end, so its stream stays in order."""

    def __init__(self, job):
        self._job = job
        self.done = False

    def __call__(self) -> None:
        if not self.done:
            self.done = True
            job_started(job=self._job)


def _job_run_claimed(job) -> str:
    spec = model_get(job.model)
    announce = _Announcement(job)
    first_output_at = [None]

    def emit_output(data: dict) -> None:
        announce()
        if first_output_at[0] is None:
            first_output_at[0] = timezone.now()
        job_output(job=job, data=data)

    progress_saved_at = [float("-inf")]

    def emit_progress(progress: float, data: dict) -> None:
        announce()
        now = time.monotonic()
        persist = now - progress_saved_at[0] >= PROGRESS_ROW_INTERVAL_S
        if persist:
            progress_saved_at[0] = now
        job_progress(job=job, progress=progress, data=data, persist=persist)

    def emit_preview(data: dict) -> None:
        announce()
        job_preview(job=job, data=data)

    context = RunContext(
        job_id=job.pk,
        params=job.params,
        variant=job.variant,
        emit_progress=emit_progress,
        emit_output=emit_output,
        should_stop=lambda: job_cancel_requested(job_id=job.pk),
        output_moderator=output_moderator_for(job) if spec.kind == "text" else None,
        emit_preview=emit_preview,
        started=announce,
    )
    with _Heartbeat(job.pk):
        try:
            outcome = engine_for(spec).run(context)
        except Exception as exc:
            logger.exception("engine failed on %s", job.pk)
            announce()
            job_fail(job=job, code="engine_error", message=f"{exc.__class__.__name__}: {exc}",
                     first_output_at=first_output_at[0])
            return "failed"
    announce()
    moderator = context.output_moderator
    if moderator is not None and moderator.stopped:
        output_case_open(job=job, verdict=moderator.verdict, text=moderator.text)
    if outcome.stopped:
        job_cancelled(job=job, actual_mcu=outcome.actual_mcu, usage=outcome.usage, result=outcome.result,
                      first_output_at=first_output_at[0])
        return "cancelled"
    job_succeed(job=job, actual_mcu=outcome.actual_mcu, result=outcome.result, usage=outcome.usage,
                first_output_at=first_output_at[0])
    return "succeeded"
