"""The job lifecycle: submit, start, finish, fail, cancel, recover. Every state change is a
conditional update (the row is claimed only if it is still in the expected state), then
the ledger is settled and the event published."""

from __future__ import annotations

import contextlib
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import kombu.exceptions
import redis
from django.conf import settings
from django.db import transaction
from django.db.models import Exists, OuterRef, Q
from django.urls import reverse
from django.utils import timezone

from inference.engines.base import text_usage
from inference.errors import JobNotCancellable
from inference.events import attempt_last_event, event_publish, stream_key
from inference.idempotency import Idempotency, idempotency_record_create, idempotent_create
from inference.models import CANCEL_UNFINISHED, DELETED_WITH_CONTENT, IdempotencyKey, Job
from inference.registry import ModelSpec, ModelVariant, model_get
from inference.scheduler import (
    scheduler_dispatch,
    scheduler_enqueue,
    scheduler_record_run_time,
    scheduler_remove,
)
from inference.webhooks import webhook_events_job_content_remove
from portal.db import update_returning
from portal.errors import NotFound, TenantSuspended
from portal.metrics import job_claim_observe, job_finish_observe
from portal.models import ApiKey, Tenant
from portal.redis import lua_script, redis_client
from quotas.admission import ADMITTED
from quotas.cost import CostEstimate, text_cost, video_run_cost_mcu
from quotas.ledger import (
    Opened,
    reservation_abandon,
    reservation_extend,
    reservation_open,
    reservation_settle_in_ledger,
    settlement_mirror,
)
from quotas.limits import RateHeadroom, pool_lease_s
from quotas.models import Reservation

if TYPE_CHECKING:  # the tokenizer behind it loads on import; callers hand a parsed request
    from inference.requests import TextRequest
    from moderation.models import SafetyPolicy

logger = logging.getLogger(__name__)

HEARTBEAT_KEY = "s:hb:{job_id}"  # the attempt whose worker beats (a stale attempt's beat is no sign of life)
# A worker of a release before heartbeats carried their attempt wrote 1 whatever attempt it ran.
OLD_RELEASE_HEARTBEAT = b"1"
# When the reaper first found a running job's heartbeat missing (epoch seconds): see jobs_reap.
HEARTBEAT_MISSING_KEY = "s:hb:missing:{job_id}"
CANCEL_KEY = "s:cancel:{job_id}"


def _idempotent_job(record: IdempotencyKey) -> tuple[Job, None]:
    if record.job.deleted_at is not None:
        # Neither the deleted job (its text would be replayed) nor a second one (charged again).
        raise NotFound("The job this Idempotency-Key made was deleted.", param="Idempotency-Key")
    return record.job, None  # no reservation opened: the earlier request's job holds its own


@dataclass(frozen=True)
class Submission:
    job: Job
    replayed: bool  # True when an Idempotency-Key returned an earlier job
    rate: RateHeadroom | None = None  # the tenant's CU/minute bucket as this admission left it


def job_submit(
    *,
    api_key: ApiKey,
    spec: ModelSpec,
    variant: ModelVariant,
    params: dict,
    estimate: CostEstimate,
    mode: str,
    idempotency_key: str | None = None,
    request_body: dict | None = None,
) -> Submission:
    """Admit (reserve CU) and queue a job. mode="sync": saturation is a 503 now;
    mode="async": the job waits in the scheduler for capacity."""
    (job, opened), replayed = idempotent_create(
        tenant_id=api_key.tenant_id, idempotency_key=idempotency_key,
        request=request_body if request_body is not None else params,
        create=lambda idempotency: _job_open(api_key=api_key, spec=spec, variant=variant,
                                             params=params, estimate=estimate, mode=mode,
                                             idempotency=idempotency),
        replay=_idempotent_job,
    )
    if replayed:
        return Submission(job=job, replayed=True)
    tenant = api_key.tenant

    # The key was checked before the request was screened and priced; a suspension that
    # committed meanwhile ran its sweep (jobs_cancel_for_tenant) without this job. Read after
    # the job's commit, one of the two sees the other, so the job never runs.
    if Tenant.objects.filter(pk=tenant.pk, status=Tenant.Status.SUSPENDED).exists():
        job_cancel(job=job)  # queued, sent nowhere yet: cancelled and refunded in full
        raise TenantSuspended()

    # The job and its reservation are committed: from here on it is the client's job, and an
    # error answered now would be retried as a second, charged job while the reconciliation
    # (inference/reconcile.py) queues or sends this one all the same once Redis or the broker
    # answers again (a fail-open tier is admitted while Redis is down).
    try:
        event_publish(job_id=job.id, tenant_id=tenant.pk, event_type="job.queued",
                      data={"status": job.status, "estimated_cu": estimate.cu})
    except redis.RedisError:
        logger.warning("job %s submitted but Redis refused its job.queued event", job.id)
    try:
        if opened.ticket.outcome == ADMITTED:
            job_send(job.id, pool=job.pool, attempt=1)
        else:
            scheduler_enqueue(job_id=job.id, pool=job.pool, priority=job.priority,
                              tenant_id=tenant.pk, cost_mcu=estimate.mcu,
                              reservation_id=opened.reservation.id,
                              job_cap=opened.limits.max_concurrent_jobs)
            pool_dispatch(pool=job.pool)
    except (redis.RedisError, kombu.exceptions.OperationalError):
        logger.warning("job %s submitted but not queued yet (Redis or the broker refused); the "
                       "scheduler's reconciliation queues it", job.id, exc_info=True)
    return Submission(job=job, replayed=False, rate=opened.ticket.rate)


def _job_open(*, api_key: ApiKey, spec: ModelSpec, variant: ModelVariant, params: dict,
              estimate: CostEstimate, mode: str, idempotency: Idempotency | None,
              ) -> tuple[Job, Opened]:
    """Admit the job and store it, with its Idempotency-Key. One transaction for the
    reservation, its ledger row, the job and the key: a job never exists without its
    reservation, and one commit instead of two. When it rolls back (a second request with the
    key, among others), what admission holds in Redis is given back before the error goes on."""
    tenant = api_key.tenant
    opened = None
    try:
        with transaction.atomic():
            opened = reservation_open(api_key=api_key, model_id=spec.id, pool=spec.pool,
                                      cost_mcu=estimate.mcu, mode=mode)
            job = Job.objects.create(
                tenant=tenant, api_key=api_key, kind=spec.kind, model=spec.id,
                variant=variant.name, params=params, priority=tenant.tier.queue_priority,
                pool=spec.pool, reservation=opened.reservation, estimated_mcu=estimate.mcu,
            )
            idempotency_record_create(tenant_id=tenant.pk, idempotency=idempotency, job=job)
    except Exception:
        if opened is not None:  # its rows rolled back: release what Redis holds
            reservation_abandon(opened)
        raise
    return job, opened


def video_job_create(*, api_key: ApiKey, payload: dict, idempotency_key: str | None = None,
                     endpoint: str = "videos", request_id: str = "") -> Submission:
    """A text-to-video job from an API-shaped payload (/v1/videos and the dashboard playground):
    validate for the key's tier, screen the prompt, price it, submit it to wait for the pool."""
    from inference.requests import video_request_parse
    from moderation.services import safety_screen_input
    from quotas.cost import video_cost

    video = video_request_parse(payload=payload, tier=api_key.tenant.tier)
    safety_screen_input(tenant=api_key.tenant, api_key=api_key, text=video.prompt,
                        endpoint=endpoint, request_id=request_id, idempotency_key=idempotency_key)
    estimate = video_cost(spec=video.spec, width=video.width, height=video.height,
                          frames=video.frames, steps=video.steps)
    return job_submit(api_key=api_key, spec=video.spec, variant=video.spec.variant("full"),
                      params=video.job_params(), estimate=estimate, mode="async",
                      idempotency_key=idempotency_key, request_body=payload)


def text_job_submit(*, api_key: ApiKey, text: TextRequest, safety_policy: SafetyPolicy, mode: str,
                    idempotency_key: str | None = None, request_body: dict | None = None,
                    ) -> tuple[Submission, ModelVariant, CostEstimate]:
    """Price a validated text request for the key's tier, on
    the variant the tier is served from, and submit it: the OpenAI endpoints (mode "sync") and
    the playground (mode "async") both come here. `safety_policy` is the one that screened the
    prompt: the job carries it, and its stream is moderated under it."""
    from inference.registry import variant_for_tier
    from quotas.cost import text_cost

    tier = api_key.tenant.tier
    variant = variant_for_tier(text.spec, tier)
    estimate = text_cost(spec=text.spec, variant=variant, prompt_tokens=text.prompt_tokens,
                         completion_tokens=text.max_tokens)
    submission = job_submit(api_key=api_key, spec=text.spec, variant=variant,
                            params=text.job_params(priority=tier.queue_priority,
                                                   safety_policy=safety_policy.snapshot()),
                            estimate=estimate,
                            mode=mode, idempotency_key=idempotency_key, request_body=request_body)
    return submission, variant, estimate


def text_job_create(*, api_key: ApiKey, payload: dict, idempotency_key: str | None = None,
                    endpoint: str = "jobs", request_id: str = "") -> Submission:
    """An asynchronous text job from a /v1/completions-shaped payload (the dashboard
    playground): its tokens arrive as job.output events on the job's stream, not in an HTTP
    response. The synchronous endpoints (inference/text_apis.py) screen beside tokenisation."""
    from inference.requests import text_request_parse
    from moderation.selectors import safety_policy_for_tenant
    from moderation.services import safety_screen_input

    text = text_request_parse(payload=payload, tier=api_key.tenant.tier, chat=False)
    policy = safety_policy_for_tenant(tenant=api_key.tenant)
    safety_screen_input(tenant=api_key.tenant, api_key=api_key, text=text.prompt_text,
                        endpoint=endpoint, request_id=request_id, policy=policy,
                        idempotency_key=idempotency_key)
    return text_job_submit(api_key=api_key, text=text, safety_policy=policy, mode="async",
                           idempotency_key=idempotency_key, request_body=payload)[0]


def job_send(job_id: str, *, pool: str, attempt: int) -> None:
    """Send an admitted job to its pool's Celery queue for `attempt`."""
    from inference.tasks import run_job

    run_job.apply_async(args=[job_id, attempt], queue=pool)


def pool_dispatch(*, pool: str) -> int:
    # Jobs wait in the scheduler only between their submission and their first attempt
    # (a redelivered job keeps its pool slot and is sent straight back: job_recover_lost).
    return scheduler_dispatch(pool=pool, start_job=lambda job_id: job_send(job_id, pool=pool, attempt=1))


def job_claim(*, job_id: str, attempt: int, announce: bool = True) -> Job | None:
    """The worker takes the job for `attempt`; a stale or duplicate delivery gets None.

    announce=False leaves `job_started` to the caller: the runner announces once the engine
    has the work, so the announcement overlaps the engine's first step instead of delaying it."""
    now = timezone.now()
    # Only while its reservation is held: one whose lease ran out before a worker took it (its
    # message waited in a busy queue) was refunded in full and its pool slot given away; run,
    # it would be free work on capacity another job holds. The reaper fails it (queue_timeout).
    reservation_held = Exists(Reservation.objects.filter(pk=OuterRef("reservation_id"),
                                                         state__in=Reservation.ACTIVE_STATES))
    # Nor once its cancel was requested: it waited with its cancel unfinished (Redis refused
    # the cancel's second step, and a dispatch round or the reconciliation sent it since).
    claimed = update_returning(
        Job.objects.filter(Q(reservation__isnull=True) | reservation_held, pk=job_id,
                           status=Job.Status.QUEUED, attempts=attempt - 1,
                           cancel_requested_at__isnull=True),
        status=Job.Status.RUNNING, attempts=attempt, started_at=now,
    )
    if not claimed:
        _claim_refused_cancel_finish(job_id=job_id, attempt=attempt)
        return None
    (job,) = claimed
    if announce:
        job_started(job=job)
    return job


def _claim_refused_cancel_finish(*, job_id: str, attempt: int) -> None:
    """A claim found nothing to take (the rare path: read only then). When that is because a
    cancel was requested of the job this message would have started, the cancel is finished
    here: it never ran, so it is cancelled and refunded in full, not left for the
    reconciliation while its worker idles. A Redis error goes to the task, which retries."""
    requested = Job.objects.filter(pk=job_id, status=Job.Status.QUEUED, attempts=attempt - 1,
                                   cancel_requested_at__isnull=False).first()
    if requested is not None:
        with contextlib.suppress(JobNotCancellable):  # it ended meanwhile
            job_cancel(job=requested)


def job_started(*, job: Job, attempt_seq: int | None = None) -> None:
    """Announce a claimed job: its first heartbeat (the reaper gives a job a heartbeat TTL of
    grace after `started_at`, so announcing a few ms after the claim is safe), the claim
    metric, and `job.started` on its stream.

    `attempt_seq` here and in the job's other events of a run: the run's count of its events,
    which makes a publish sent again after a lost reply append once (events.event_publish)."""
    job_heartbeat(job_id=job.pk, attempt=job.attempts)
    job_claim_observe(pool=job.pool, priority=job.priority, queued_at=job.queued_at,
                      started_at=job.started_at)
    event_publish(job_id=job.pk, tenant_id=job.tenant_id, event_type="job.started",
                  data={"status": job.status, "attempt": job.attempts},
                  attempt=job.attempts, attempt_seq=attempt_seq)


def job_heartbeat(*, job_id: str, attempt: int) -> None:
    jobs_heartbeat(attempts={job_id: attempt})


def jobs_heartbeat(*, attempts: dict[str, int]) -> None:
    """job_heartbeat for every job a worker process runs (job id -> the attempt it runs), in
    one round trip."""
    pipeline = redis_client().pipeline(transaction=False)
    for job_id, attempt in attempts.items():
        pipeline.set(HEARTBEAT_KEY.format(job_id=job_id), _heartbeat_value(attempt),
                     ex=settings.SLUICE_JOB_HEARTBEAT_TTL_S)
    pipeline.execute()


def _heartbeat_value(attempt: int) -> str:
    """Attempt 2 beats "+2": signed, so that attempt 1's beat is never OLD_RELEASE_HEARTBEAT
    (which says nothing of the attempt), and still the attempt as an integer for a reaper of the
    release that wrote it unsigned (int(beat))."""
    return f"+{attempt}"


def _heartbeat_is_for(beat: bytes | None, *, attempt: int) -> bool:
    """Whether a running job's heartbeat is its `attempt`'s worker's. OLD_RELEASE_HEARTBEAT is
    taken for any attempt's, as that release's reaper took any heartbeat: during a rolling
    deploy a worker of it may run a job's attempt 2 or 3 (often one redelivered because the
    deploy stopped a worker), and read as attempt 1's beat the job was taken for lost while it
    ran, handed out again and its lease left to run out. Every other beat names its attempt
    (unsigned from the release before this one), so a stale attempt's is still told apart."""
    if beat is None:
        return False
    return beat == OLD_RELEASE_HEARTBEAT or int(beat) == attempt


def jobs_superseded(*, runs: set[tuple[str, int]]) -> set[tuple[str, int]]:
    """Which of the runs a worker has (job id, attempt) are no longer its to run: the reaper
    took the worker for lost (its heartbeat could not reach Redis for a TTL) and queued the job
    again, another attempt claimed it, or it was ended without it. The row decides, not Redis,
    which may just have come back empty. A row this connection cannot see is left alone."""
    rows = Job.objects.filter(pk__in={job_id for job_id, _ in runs})
    now_at = {job_id: (status, attempt)
              for job_id, status, attempt in rows.values_list("pk", "status", "attempts")}
    return {(job_id, attempt) for job_id, attempt in runs
            if job_id in now_at and now_at[job_id] != (Job.Status.RUNNING, attempt)}


def job_cancel_requested(*, job_id: str) -> bool:
    return job_id in jobs_cancel_requested(job_ids=[job_id])


def jobs_cancel_requested(*, job_ids: list[str]) -> set[str]:
    """Which of these jobs a cancel was requested for (one MGET)."""
    flags = redis_client().mget([CANCEL_KEY.format(job_id=job_id) for job_id in job_ids])
    return {job_id for job_id, flag in zip(job_ids, flags, strict=True) if flag is not None}


def job_progress(*, job: Job, progress: float, data: dict, persist: bool = True,
                 attempt_seq: int | None = None) -> None:
    """Every step goes to the stream; the row (which serves polling) only when `persist`:
    a write per denoising step would cost more than the step on small jobs."""
    event_publish(job_id=job.pk, tenant_id=job.tenant_id, event_type="job.progress",
                  data={"progress": progress, **data}, attempt=job.attempts, attempt_seq=attempt_seq)
    if persist:
        Job.objects.filter(pk=job.pk, status=Job.Status.RUNNING).update(progress=progress)


def job_preview(*, job: Job, data: dict, attempt_seq: int | None = None) -> None:
    """A small preview frame of a running job (stream only: no row, no webhook)."""
    event_publish(job_id=job.pk, tenant_id=job.tenant_id, event_type="job.preview", data=data,
                  attempt=job.attempts, attempt_seq=attempt_seq)


def job_output(*, job: Job, data: dict, attempt_seq: int | None = None) -> None:
    """Streamed output (tokens). The row's `first_output_at` is written with the job's end
    (`first_output_at=` of job_succeed and friends): a write per job fewer."""
    event_publish(job_id=job.pk, tenant_id=job.tenant_id, event_type="job.output", data=data,
                  attempt=job.attempts, attempt_seq=attempt_seq)


# A job refused at admission (REJECTED) reads as failed: no event type of its own.
_TERMINAL_EVENT_TYPES = {Job.Status.SUCCEEDED: "job.completed", Job.Status.FAILED: "job.failed",
                         Job.Status.REJECTED: "job.failed", Job.Status.CANCELLED: "job.cancelled"}


def job_terminal_event(job: Job) -> tuple[str, dict]:
    """The event that tells followers and webhooks how `job` (as ended) ended."""
    data: dict = {"status": job.status, "actual_cu": (job.actual_mcu or 0) / 1000}
    if job.status == Job.Status.SUCCEEDED:
        data.update(result=job.result, usage=job.usage)
        if job.kind == Job.Kind.VIDEO:
            # Where a follower or webhook receiver fetches the file (with its API key).
            data["content_url"] = reverse("api-video-content", kwargs={"job_id": job.pk})
    elif job.status in (Job.Status.FAILED, Job.Status.REJECTED):
        data["error"] = {"code": job.error_code, "message": job.error_message}
    elif job.usage or job.started_at:  # cancelled while running: what it produced
        data["usage"] = job.usage
    return _TERMINAL_EVENT_TYPES[job.status], data


def _finish(job: Job, *, status: str, actual_mcu: int, fields: dict,
            from_statuses: tuple[str, ...], first_output_at: datetime | None = None) -> bool:
    """End the job if it is still in one of `from_statuses` and at the attempt `job` was read
    as, and settle its reservation with it. False: someone else ended it first."""
    now = timezone.now()
    if first_output_at is not None:
        fields = {**fields, "first_output_at": first_output_at}
    # The job's end and its settlement commit together: nobody sees a finished job whose
    # ledger is not settled yet. Only the attempt that `job` was read as may end it: a worker
    # the reaper took for lost (its heartbeat stopped) and whose job was handed out again
    # cannot settle it, nor free its pool slot, under the attempt now running.
    # `terminal_event_pending` goes up with the end and down once the event is out: a worker
    # that dies in between leaves it for the reaper (at least once, as webhooks promise).
    with transaction.atomic():
        claimed = Job.objects.filter(pk=job.pk, status__in=from_statuses, attempts=job.attempts).update(
            status=status, finished_at=now, actual_mcu=actual_mcu, terminal_event_pending=True,
            **fields)
        if claimed != 1:
            return False
        settled = None
        if job.reservation_id:
            settled = reservation_settle_in_ledger(reservation_id=job.reservation_id,
                                                   actual_mcu=actual_mcu)
            if settled is None and actual_mcu:
                # Its lease ran out under it (the reaper renews leases of heartbeating jobs, so
                # its worker had stopped heartbeating): already refunded in full, nothing charged.
                logger.warning("job %s ended after its reservation %s was released; %s mCU not "
                               "charged", job.pk, job.reservation_id, actual_mcu)
    if settled is not None:
        # Redis follows what committed: mirrored inside the transaction, a commit that then
        # failed left Redis refunded, and the slot freed, for a reservation still held.
        settlement_mirror(settled)
    for name, value in {"status": status, "finished_at": now, "actual_mcu": actual_mcu,
                        **fields}.items():
        setattr(job, name, value)
    if job.kind == Job.Kind.VIDEO:
        _unpublished_attempts_media_remove(job)
    job_finish_observe(pool=job.pool, model=job.model, status=status, started_at=job.started_at,
                       finished_at=now)
    event_type, event_data = job_terminal_event(job)
    try:
        event_publish(job_id=job.pk, tenant_id=job.tenant_id, event_type=event_type,
                      data=event_data)
    except redis.RedisError:
        # The end is committed; only its announcement is missing. Kept in the row (the database
        # just answered) for the reaper, rather than lost with the webhooks that hang on it.
        logger.warning("job %s ended but Redis refused its %s event; the reaper publishes it",
                       job.pk, event_type)
        return True  # the scheduler's tick dispatches the freed capacity once Redis is back
    # One UPDATE more per job; it cannot join the end's own, which must commit before the
    # event goes out (a follower told of an end reads the row).
    Job.objects.filter(pk=job.pk, terminal_event_pending=True).update(terminal_event_pending=False)
    job.terminal_event_pending = False
    if job.started_at and status == Job.Status.SUCCEEDED:
        # A run cut short (cancelled, failed) did not do its estimate's work: no pace of it.
        scheduler_record_run_time(pool=job.pool, seconds=(now - job.started_at).total_seconds(),
                                  estimated_mcu=job.estimated_mcu)
    _ended_job_keys_drop(job_id=job.pk)
    pool_dispatch(pool=job.pool)  # its capacity is free: the next queued job may start
    return True


def _unpublished_attempts_media_remove(job: Job) -> None:
    """An ended video job's attempts' files that its result does not point at: those of an
    attempt whose worker died after storing them, before its end. (An attempt still running
    removes what it stores later itself, when its end is refused: job_attempt_outputs_discard.)
    Nothing to do after a first attempt's success, the common end."""
    from inference.media import job_media_remove, video_output_names

    try:
        for attempt in range(1, job.attempts + 1):
            job_media_remove(video_output_names(job_id=job.pk, attempt=attempt), keep=job.result)
    except OSError:  # storage trouble: the job's end stands all the same
        logger.warning("could not remove the files of job %s's earlier attempts", job.pk,
                       exc_info=True)


def job_attempt_outputs_discard(*, job: Job, result: dict) -> None:
    """Remove the files an attempt of a video job stored (its `result`) when its end did not
    stand: refused (the row is at another attempt, or was ended without it) or never tried (the
    runner's `superseded`). No row will point at them. Never one the row's result points at."""
    from inference.media import job_media_remove

    if job.kind != Job.Kind.VIDEO or not result:
        return
    published = Job.objects.filter(pk=job.pk).values_list("result", flat=True).first()
    try:
        job_media_remove(result, keep=published)
    except OSError:
        logger.warning("could not remove the files of job %s's superseded attempt %s", job.pk,
                       job.attempts, exc_info=True)


def _ended_job_keys_drop(*, job_id: str) -> None:
    """An ended job's heartbeat and cancel flag: no one reads them any more."""
    redis_client().delete(HEARTBEAT_KEY.format(job_id=job_id), CANCEL_KEY.format(job_id=job_id))


# job_succeed, job_fail and job_cancelled end a running job: the worker's own attempt (a
# worker taken for lost, whose job was queued again, ends nothing), or the reaper's.
# A refused end's result goes with it (job_attempt_outputs_discard).
def job_succeed(*, job: Job, actual_mcu: int, result: dict, usage: dict,
                first_output_at: datetime | None = None) -> bool:
    ended = _finish(job, status=Job.Status.SUCCEEDED, actual_mcu=actual_mcu,
                    fields={"result": result, "usage": usage, "progress": 100.0},
                    first_output_at=first_output_at, from_statuses=(Job.Status.RUNNING,))
    if not ended:
        job_attempt_outputs_discard(job=job, result=result)
    return ended


def job_fail(*, job: Job, code: str, message: str, actual_mcu: int = 0, usage: dict | None = None,
             first_output_at: datetime | None = None,
             from_statuses: tuple[str, ...] = (Job.Status.RUNNING,)) -> bool:
    """Final failure: charge what was used (usually nothing; `usage` says what), refund the
    rest. A running job, unless the caller fails one that never started (the reaper's queue
    timeout)."""
    return _finish(job, status=Job.Status.FAILED, actual_mcu=actual_mcu,
                   fields={"error_code": code, "error_message": message[:500],
                           **({"usage": usage} if usage else {})},
                   first_output_at=first_output_at, from_statuses=from_statuses)


def job_cancelled(*, job: Job, actual_mcu: int, usage: dict | None = None,
                  result: dict | None = None, first_output_at: datetime | None = None) -> bool:
    """The worker stopped a running job on request: charge what it produced."""
    ended = _finish(job, status=Job.Status.CANCELLED, actual_mcu=actual_mcu,
                    fields={"usage": usage or {}, "result": result or {}},
                    first_output_at=first_output_at, from_statuses=(Job.Status.RUNNING,))
    if not ended:
        job_attempt_outputs_discard(job=job, result=result or {})
    return ended


def job_cancel(*, job: Job) -> Job:
    """Queued: it never starts and is refunded in full. Running: the worker stops it at its
    next token or step and settles what it used."""
    if job.is_terminal:
        raise JobNotCancellable(f"The job is already {job.status}.")
    Job.objects.filter(pk=job.pk, cancel_requested_at__isnull=True).update(
        cancel_requested_at=timezone.now()
    )
    if job.status == Job.Status.QUEUED:
        scheduler_remove(job_id=job.pk, pool=job.pool, priority=job.priority)
        # Closed as queued only while it still is: a worker that claimed it since this row was
        # read is generating, and must be stopped by its flag (below) and settle what it used.
        if _finish(job, status=Job.Status.CANCELLED, actual_mcu=0, fields={},
                   from_statuses=(Job.Status.QUEUED,)):
            job.refresh_from_db()
            return job
        job.refresh_from_db()  # it started meanwhile: cancel it as a running job
    if job.status == Job.Status.RUNNING:
        redis_client().set(CANCEL_KEY.format(job_id=job.pk), 1, ex=3600)
    return job


# What a job was sent that says what its tenant asked for: removed with its outputs when the job
# is deleted or its retention ends (inference/retention.py); the rest of params stays for billing.
JOB_CONTENT_PARAMS = frozenset({"prompt", "negative_prompt", "prompt_token_ids", "code_context"})


def job_params_without_content(params: dict) -> dict:
    return {name: value for name, value in params.items() if name not in JOB_CONTENT_PARAMS}


def job_delete(*, job: Job) -> None:
    """DELETE /v1/videos/{id} and /v1/jobs/{id}: the job is hidden from every read and its
    outputs (a video's files, a completion's text) removed. The row stays, with its CU and
    usage: the ledger and the usage reports refer to it. A queued or running job is cancelled
    first (refunded in full, or billed for what it ran, as job_cancel does); outputs it still
    writes as it stops are removed by the reaper."""
    if not job.is_terminal:
        with contextlib.suppress(JobNotCancellable):  # it ended meanwhile
            job_cancel(job=job)
    if not Job.objects.filter(pk=job.pk, deleted_at__isnull=True).update(deleted_at=timezone.now()):
        raise NotFound(f"No job {job.pk!r}.", param="id")  # another request deleted it first
    try:
        _deleted_job_outputs_remove(job_id=job.pk)
    except OSError:  # storage trouble: it is deleted all the same, and the reaper retries
        logger.warning("could not remove the outputs of deleted job %s yet", job.pk, exc_info=True)


def _deleted_job_outputs_remove(*, job_id: str) -> bool:
    """Remove an ended, deleted job's outputs and what it was sent: the files first, then the
    row's pointers to them, so a failure leaves the row for the reaper to try again rather than
    files nobody knows of. Both steps are idempotent: two removers racing do no harm. The
    prompt, its tokens and the code around it go too (a moderation case keeps its own copy,
    under its own retention); the rest of the row stays for billing. Not before the job ended:
    a redelivered attempt of a job that is stopping still reads its params."""
    from inference.media import job_media_remove

    row = (Job.objects.filter(pk=job_id, deleted_at__isnull=False, status__in=Job.TERMINAL)
           .values("kind", "result", "params").first())
    if row is None or (not row["result"] and not JOB_CONTENT_PARAMS & set(row["params"])):
        return False
    if row["kind"] == Job.Kind.VIDEO and row["result"]:
        job_media_remove(row["result"])
    try:  # its events carry what it produced (every token of a completion) for a day
        redis_client().delete(stream_key(job_id))
    except redis.RedisError:
        logger.warning("could not drop the event stream of deleted job %s", job_id)
    # ... and its recorded webhook events (the completion) for SLUICE_WEBHOOK_RETENTION_DAYS.
    webhook_events_job_content_remove(job_id=job_id)
    Job.objects.filter(pk=job_id).update(result={}, params=job_params_without_content(row["params"]))
    return True


def _deleted_jobs_outputs_remove() -> int:
    """Outputs of deleted jobs that ended after their delete (a running job stops at its next
    step, or finished first and stored its video): removed on the reaper's next round."""
    job_ids = Job.objects.filter(DELETED_WITH_CONTENT, status__in=Job.TERMINAL).values_list(
        "pk", flat=True)[:200]
    removed = 0
    for job_id in job_ids:
        try:
            removed += _deleted_job_outputs_remove(job_id=job_id)
        except OSError:  # storage trouble: the next round tries again
            logger.warning("could not remove the outputs of deleted job %s", job_id, exc_info=True)
    return removed


def jobs_cancel_for_tenant(*, tenant_id: int) -> int:
    """A suspended tenant's work stops: its queued jobs are cancelled and refunded, its running
    ones stop at their next token or step and are billed for what they produced. Run after the
    suspension committed (portal.signals.tenant_suspended): a job Redis refused to cancel is
    logged and left to the reconciliation (jobs_cancel_for_suspended_tenants), the rest are
    cancelled all the same, and the caller is not failed for it."""
    cancelled = _jobs_cancel(Job.objects.filter(tenant_id=tenant_id, status__in=Job.ACTIVE))
    if cancelled:
        logger.info("tenant %s suspended: %d jobs cancelled", tenant_id, cancelled)
    return cancelled


# Jobs of suspended tenants the reconciliation cancels per round (the rest on the next ones).
SUSPENDED_SWEEP_BATCH = 500


def jobs_cancel_for_suspended_tenants() -> int:
    """The reconciliation's sweep (inference/reconcile.py): any queued or running job of a
    suspended tenant is cancelled as the suspension's own sweep cancels it; that sweep missed
    it when Redis refused the cancel, or the process died before it ran. One query on the
    active jobs (job_status_started); a running job already told to stop is told again (one
    Redis SET) until it has stopped."""
    jobs = (Job.objects.filter(status__in=Job.ACTIVE, tenant__status=Tenant.Status.SUSPENDED)
            .order_by()[:SUSPENDED_SWEEP_BATCH])  # unordered: the status index alone finds them
    return _jobs_cancel(jobs)


# A recorded cancel request is its own request's to finish for this long (it does within
# milliseconds); then the reconciliation finishes it, not racing a cancel still under way.
CANCEL_FINISH_AFTER = timedelta(seconds=10)
# Cancels the reconciliation finishes per round (the rest on the next ones).
CANCEL_FINISH_BATCH = 500


def jobs_cancel_finish(*, now: datetime) -> dict[str, int]:
    """The reconciliation's sweep (inference/reconcile.py) of cancels recorded and not finished:
    job_cancel records the request (`cancel_requested_at`) before it takes a queued job out of
    the scheduler's queue or raises a running job's flag in Redis, and Redis refusing that step
    left the job queued (a dispatch round could start it) or running unflagged. A queued or
    admitted one is cancelled and refunded in full (`cancels_finished`); a running one whose
    flag Redis has not got has it raised again (`cancel_flags_raised`), and its worker stops it
    and is billed for what it ran. Each through job_cancel, as its own request would have; one
    query on the job_cancel_unfinished index, one MGET for the running ones' flags. Returns the
    counts above zero."""
    jobs = list(Job.objects.filter(CANCEL_UNFINISHED, cancel_requested_at__lt=now - CANCEL_FINISH_AFTER)
                .order_by("cancel_requested_at")[:CANCEL_FINISH_BATCH])
    running = [job for job in jobs if job.status == Job.Status.RUNNING]
    # A flag up is the worker's to read: raising it again would only count the same job every
    # round until its worker stops it (a step of a large video may take a while).
    flagged = jobs_cancel_requested(job_ids=[job.pk for job in running]) if running else set()
    outcomes = {
        "cancels_finished": _jobs_cancel([job for job in jobs if job.status == Job.Status.QUEUED]),
        "cancel_flags_raised": _jobs_cancel([job for job in running if job.pk not in flagged]),
    }
    return {outcome: count for outcome, count in outcomes.items() if count}


def _jobs_cancel(jobs) -> int:
    cancelled = 0
    for job in jobs:
        try:
            job_cancel(job=job)
        except JobNotCancellable:
            continue  # it ended meanwhile
        except redis.RedisError:
            # Its cancel_requested_at is set; the reconciliation finishes it once Redis answers
            # (jobs_cancel_finish).
            logger.warning("could not cancel job %s of tenant %s yet: Redis refused", job.pk,
                           job.tenant_id, exc_info=True)
            continue
        cancelled += 1
    return cancelled


def job_max_run_s(pool: str) -> int:
    return settings.SLUICE_JOB_MAX_RUN_S.get(pool, 3600)


def job_timeout_message(pool: str) -> str:
    return (f"The job ran longer than the {job_max_run_s(pool)} s its pool allows one attempt "
            "and was stopped; only what it produced is charged.")


def job_recover_lost(*, job: Job) -> str:
    """A running job whose worker stopped heartbeating: redeliver it, or after the last
    attempt fail it with worker_lost (a full refund). One that ran past its pool's limit was
    stopped for it (or hung where its worker could not stop it): it fails with job_timeout
    instead of running it all again, billed for what its attempt produced as its worker's
    timeout bills it and as its message says (it was charged nothing). One whose cancel was
    requested while it ran is cancelled and billed for what its attempt produced
    (`cancelled`), as its worker would have ended it: queued again, it was refunded in full
    (its claim is refused, or the reconciliation finishes the cancel of a queued job), so the
    tokens or steps it had streamed were free."""
    if job.cancel_requested_at is not None:
        return _lost_attempt_end(job, timed_out=False)
    limit = timedelta(seconds=job_max_run_s(job.pool))
    if job.started_at and timezone.now() - job.started_at > limit:
        return _lost_attempt_end(job, timed_out=True)
    if job.attempts >= settings.SLUICE_JOB_MAX_ATTEMPTS:
        job_fail(job=job, code="worker_lost",
                 message=f"The worker running this job was lost {job.attempts} times.")
        return "failed"
    requeued = Job.objects.filter(pk=job.pk, status=Job.Status.RUNNING, attempts=job.attempts,
                                  cancel_requested_at__isnull=True).update(
        status=Job.Status.QUEUED, started_at=None, progress=0.0
    )
    if requeued != 1:
        # Its cancel was recorded since the read: the attempt's to bill, not to run again.
        cancelling = Job.objects.filter(pk=job.pk, status=Job.Status.RUNNING, attempts=job.attempts,
                                        cancel_requested_at__isnull=False).first()
        return _lost_attempt_end(cancelling, timed_out=False) if cancelling is not None else "moved"
    if job.reservation_id:  # the next attempt gets a whole lease, as the first one did
        reservation_extend(reservation_id=job.reservation_id, seconds=pool_lease_s(job.pool))
    event_publish(job_id=job.pk, tenant_id=job.tenant_id, event_type="job.queued",
                  data={"status": "queued", "reason": "worker_lost", "attempt": job.attempts})
    job_send(job.pk, pool=job.pool, attempt=job.attempts + 1)  # it still holds its pool slot
    return "requeued"


def _lost_attempt_end(job: Job, *, timed_out: bool) -> str:
    """End a running job whose worker is lost as that worker would have: charged for what the
    attempt produced, the rest refunded; failed with job_timeout (`failed`) when it ran past
    its pool's limit, else cancelled on request (`cancelled`). `moved` when it ended meanwhile
    (its worker was alive after all and settled it, or the row is at another attempt: `_finish`
    claims it at the attempt read, so it is charged once)."""
    actual_mcu, usage = _lost_attempt_produced(job)
    if timed_out:
        ended = job_fail(job=job, code="job_timeout", message=job_timeout_message(job.pool),
                         actual_mcu=actual_mcu, usage=usage)
        outcome, why = "failed", "it ran past its pool's limit; failed"
    else:
        ended = job_cancelled(job=job, actual_mcu=actual_mcu, usage=usage)
        outcome, why = "cancelled", "its cancel was requested; cancelled"
    if not ended:
        return "moved"
    logger.warning("job %s: its worker was lost after %s and charged %s mCU for what attempt %s "
                   "produced", job.pk, why, actual_mcu, job.attempts)
    return outcome


def _lost_attempt_produced(job: Job) -> tuple[int, dict]:
    """What the running attempt of `job` produced, read from what it published (its engine's
    count of it is lost with its worker), priced as its engine prices a stopped run (actual
    mCU, usage). Text: its prompt and the tokens its last job.output counted, once it had
    streamed any (tokens its output moderation still held back are not: nothing is billed that
    was not streamed). Video: the denoising steps its last job.progress reported done. Nothing
    when its stream holds none of them (Redis lost it): refunded in full."""
    spec = model_get(job.model)
    if job.kind == Job.Kind.TEXT:
        output = attempt_last_event(job_id=job.pk, attempt=job.attempts, event_type="job.output")
        if output is None:
            return 0, {}
        prompt_tokens = len(job.params.get("prompt_token_ids") or ())
        completion_tokens = int(output.data.get("tokens") or 0)
        cost = text_cost(spec=spec, variant=spec.variant(job.variant), prompt_tokens=prompt_tokens,
                         completion_tokens=completion_tokens)
        return cost.mcu, text_usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
    progress = attempt_last_event(job_id=job.pk, attempt=job.attempts, event_type="job.progress")
    steps_run = int(progress.data.get("step") or 0) if progress is not None else 0
    if not steps_run:
        return 0, {}
    return (video_run_cost_mcu(spec=spec, params=job.params, steps_run=steps_run),
            {"steps": steps_run, "frames": 0})


# One reaper run at a time: after an outage beat's backlog of ticks arrives at once, and runs
# side by side would recover, renew and announce the same rows twice. Held at most this long
# (a run takes well under a second; one that outlives it is still safe row by row).
REAP_LOCK_KEY = "s:reap:lock"
REAP_LOCK_MS = 60_000


def jobs_reap() -> dict[str, int]:
    """The periodic reaper (beat, every 5 s): recover running jobs whose heartbeat stopped,
    push out the leases of those still heartbeating, and close queued jobs whose reservation
    ran out, and publish the terminal events Redis refused, and remove the outputs of deleted
    jobs that ended after their delete. Returns how many of each (`requeued`, `failed`,
    `cancelled`, `moved`, `renewed`, `timed_out`, `announced`, `purged`), or `skipped` when
    another run holds the reaper's lock."""
    client = redis_client()
    token = secrets.token_hex(8)
    if not client.set(REAP_LOCK_KEY, token, nx=True, px=REAP_LOCK_MS):
        return {"skipped": 1}
    try:
        return _jobs_reap()
    finally:
        lua_script(client, "lock_release", package="inference")(keys=[REAP_LOCK_KEY], args=[token])


def _jobs_reap() -> dict[str, int]:
    now = timezone.now()
    outcomes: dict[str, int] = {}
    for job in _jobs_lost(now=now):
        outcome = job_recover_lost(job=job)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    if renewed := _leases_renew(now=now):
        outcomes["renewed"] = renewed
    if timed_out := _queued_jobs_time_out(now=now):
        outcomes["timed_out"] = timed_out
    if announced := _terminal_events_publish(now=now):
        outcomes["announced"] = announced
    if purged := _deleted_jobs_outputs_remove():
        outcomes["purged"] = purged
    return outcomes


def _jobs_lost(*, now: datetime) -> list[Job]:
    """Running jobs whose worker is gone: no heartbeat for their attempt, and none for a whole
    TTL of the reaper's own watching.

    A heartbeat missing once proves little: a Redis that restarted empty (or failed over to an
    empty replica) has lost every heartbeat at once, while the workers, beating every third of
    the TTL and retrying as soon as Redis answers, are all still there. So the first reaper run
    that finds it missing only notes when (HEARTBEAT_MISSING_KEY); the job counts as lost once
    it is still missing a TTL later, by which time every live worker has beaten again. Time, not
    a count of runs: a backlog of reaper runs may come seconds apart. A heartbeat seen again
    clears the note. Should Redis lose the note too, the wait only starts over."""
    ttl_s = settings.SLUICE_JOB_HEARTBEAT_TTL_S
    running = list(Job.objects.filter(status=Job.Status.RUNNING,
                                      started_at__lt=now - timedelta(seconds=ttl_s))[:200])
    if not running:
        return []
    client = redis_client()
    pipeline = client.pipeline(transaction=False)
    for job in running:
        pipeline.get(HEARTBEAT_KEY.format(job_id=job.pk))
        pipeline.get(HEARTBEAT_MISSING_KEY.format(job_id=job.pk))
    replies = pipeline.execute()
    pipeline = client.pipeline(transaction=False)
    lost = []
    for job, beat, missing_since in zip(running, replies[::2], replies[1::2], strict=True):
        missing_key = HEARTBEAT_MISSING_KEY.format(job_id=job.pk)
        if _heartbeat_is_for(beat, attempt=job.attempts):
            if missing_since is not None:
                pipeline.delete(missing_key)
        elif missing_since is None:
            pipeline.set(missing_key, now.timestamp(), ex=ttl_s * 10)
        elif now.timestamp() - float(missing_since) >= ttl_s:
            pipeline.delete(missing_key)
            lost.append(job)
    pipeline.execute()
    return lost


# How long after a job's end its own worker has to publish the terminal event before the
# reaper does it instead (a worker between its commit and its publish must not be raced).
TERMINAL_EVENT_GRACE = timedelta(seconds=10)


def _terminal_events_publish(*, now: datetime) -> int:
    """Publish the terminal events that were not published when their jobs ended (see
    `_finish`): Redis refused them, or the worker died between its commit and its publish."""
    announced = 0
    pending = Job.objects.filter(terminal_event_pending=True,
                                 finished_at__lt=now - TERMINAL_EVENT_GRACE).values_list("pk", flat=True)
    for job_id in list(pending[:200]):
        with transaction.atomic():
            # Under the row's lock, re-read: another reaper run may hold it or have published.
            job = (Job.objects.select_for_update(skip_locked=True)
                   .filter(pk=job_id, terminal_event_pending=True).first())
            if job is None:
                continue
            event_type, event_data = job_terminal_event(job)
            event_publish(job_id=job.pk, tenant_id=job.tenant_id, event_type=event_type,
                          data=event_data)
            Job.objects.filter(pk=job.pk).update(terminal_event_pending=False)
        _ended_job_keys_drop(job_id=job.pk)
        announced += 1
    return announced


# A reservation's lease (the pool's, SLUICE_POOL_LEASE_S, from admission) is what frees an
# orphan's capacity and refunds it (quotas.ledger.reservations_expire). A job that outlives it
# while its worker still heartbeats - a long video, or one redelivered after a lost worker -
# must keep it: otherwise it would be refunded in full, its pool slot handed to another job,
# and its own settlement then find nothing to charge. The reaper pushes it out this long
# before it would run out.
LEASE_RENEW_MARGIN_S = 60


def _leases_renew(*, now: datetime) -> int:
    due = list(
        Job.objects.filter(
            status=Job.Status.RUNNING,
            reservation__state__in=Reservation.ACTIVE_STATES,
            reservation__expires_at__lt=now + timedelta(seconds=LEASE_RENEW_MARGIN_S),
        ).values_list("pk", "attempts", "reservation_id", "pool")[:500]
    )
    if not due:
        return 0
    pipeline = redis_client().pipeline(transaction=False)
    for job_id, *_ in due:
        pipeline.get(HEARTBEAT_KEY.format(job_id=job_id))
    renewed = 0
    for (_job_id, attempt, reservation_id, pool), beat in zip(due, pipeline.execute(), strict=True):
        # A job whose heartbeat stopped, or beats for an attempt it is no longer at, is
        # _jobs_lost's (redelivered or failed).
        if _heartbeat_is_for(beat, attempt=attempt):
            reservation_extend(reservation_id=reservation_id, seconds=pool_lease_s(pool))
            renewed += 1
    return renewed


def _queued_jobs_time_out(*, now: datetime) -> int:
    """A queued job whose reservation ran out - it waited QUEUE_ALLOWANCE_S for pool capacity,
    or it was admitted and no worker took it within the pool's lease - is failed with
    `queue_timeout` and nothing charged. Left queued, it would never end, and its entry would
    stay at the front of its priority's queue (the oldest finish tags) for every dispatch round."""
    stale = Job.objects.filter(status=Job.Status.QUEUED, reservation__isnull=False).filter(
        Q(reservation__expires_at__lt=now) | ~Q(reservation__state__in=Reservation.ACTIVE_STATES)
    )
    message = ("The job was not started before its reservation ran out (no capacity or no "
               "worker for its pool); nothing was charged.")
    timed_out = 0
    for job in stale[:200]:
        scheduler_remove(job_id=job.pk, pool=job.pool, priority=job.priority)
        timed_out += job_fail(job=job, code="queue_timeout", message=message,
                              from_statuses=(Job.Status.QUEUED,))
    return timed_out
