"""The scheduler's reconciliation (beat, every 30 s): the database says which jobs wait, Redis
only where. Queued jobs are put back where they belong when Redis lost them or when a step
between the database and Redis failed half-way, instead of waiting out their reservation (a
day) and failing with `queue_timeout`:

- a job whose reservation waits for the pool and that is in no scheduler queue (Redis lost its
  data, or `job_submit` committed and then Redis refused the enqueue) is queued again;
- a job a dispatch round took onto the pool whose admission the database never recorded has it
  recorded: the round's process died before `reservations_admitted`, or the database refused
  it and Redis then refused to keep the job for the pool's next round, which records it
  itself (inference/scheduler.py);
- an admitted job no worker claimed (its Celery message was never sent, or was lost with the
  broker's data) is sent again. A duplicate is harmless: `job_claim` takes the job only for the
  attempt after the one it is at, once;
- a job's end whose settlement committed and whose process died before mirroring it into Redis
  (the reservation's marker still there: its unused part still charged, its slot held) is
  mirrored (`settlements_mirror_missed`);
- a queued or running job of a suspended tenant is cancelled as the suspension cancels it
  (`jobs_cancel_for_suspended_tenants`: refunded, or stopped and billed for what it ran): the
  suspension's own sweep runs once, after its commit, and misses a job when Redis refuses that
  cancel or the process dies first;
- a cancel that was requested (recorded in the database) and not finished, because Redis
  refused its second step, is finished (`jobs_cancel_finish`): a queued or admitted job is
  cancelled and refunded in full, a running one whose flag Redis never got has it raised again.
  (`job_claim` never starts a job whose cancel was requested either.)
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.utils import timezone

from inference.models import Job
from inference.scheduler import scheduler_enqueue, scheduler_queued, scheduler_remove
from inference.services import job_send, jobs_cancel_finish, jobs_cancel_for_suspended_tenants
from portal.redis import redis_client
from quotas.ledger import counters_rebuild, reservations_admitted, settlements_mirror_missed
from quotas.limits import pool_lease_s, quota_limits_for, reservation_marker
from quotas.models import Reservation

logger = logging.getLogger(__name__)

RECONCILE_BATCH = 500
RESENT_KEY = "s:resent:{job_id}"


def jobs_reconcile(*, now: datetime | None = None) -> dict[str, int]:
    """The suspended tenants' jobs still queued or running first (cancelled, so none of them is
    queued again below), then the cancels requested and not finished, then every queued job
    older than SLUICE_SCHEDULER_RECONCILE_AFTER_S (none with a cancel requested), a batch at a
    time in id (= submission) order, then the settlements never mirrored. Returns how many were
    `cancelled`, `cancels_finished`, `cancel_flags_raised`, `enqueued`, `admitted`, `resent`
    and `mirrored` (only those above zero)."""
    now = now or timezone.now()
    settled_before = now - timedelta(seconds=settings.SLUICE_SCHEDULER_RECONCILE_AFTER_S)
    outcomes: dict[str, int] = {}
    if cancelled := jobs_cancel_for_suspended_tenants():
        outcomes["cancelled"] = cancelled
    outcomes.update(jobs_cancel_finish(now=now))
    after = ""
    while True:
        batch = list(
            Job.objects.filter(status=Job.Status.QUEUED, pk__gt=after, queued_at__lt=settled_before,
                               cancel_requested_at__isnull=True,
                               reservation__state__in=Reservation.ACTIVE_STATES,
                               reservation__expires_at__gt=now)
            .select_related("reservation", "tenant__tier", "api_key")
            .order_by("pk")[:RECONCILE_BATCH]
        )
        for outcome, count in _batch_reconcile(batch, now=now).items():
            outcomes[outcome] = outcomes.get(outcome, 0) + count
        if len(batch) < RECONCILE_BATCH:
            break
        after = batch[-1].pk
    if mirrored := settlements_mirror_missed(now=now):
        outcomes["mirrored"] = mirrored
    return outcomes


def _batch_reconcile(jobs: list[Job], *, now: datetime) -> dict[str, int]:
    outcomes: dict[str, int] = {}
    waiting = [job for job in jobs if job.reservation.state == Reservation.State.QUEUED]
    by_pool: dict[str, list[Job]] = {}
    rebuilt: set[tuple[int, str]] = set()  # (tenant, period): one rebuild each
    for job in waiting:
        by_pool.setdefault(job.pool, []).append(job)
    for pool, pool_jobs in by_pool.items():
        queued = scheduler_queued(pool=pool, jobs=[(job.pk, job.priority) for job in pool_jobs])
        for job in pool_jobs:
            if job.pk not in queued and (outcome := _waiting_job_restore(job, rebuilt=rebuilt)):
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
    for job in jobs:
        if job.reservation.state == Reservation.State.ADMITTED and _unclaimed_resend(job, now=now):
            outcomes["resent"] = outcomes.get("resent", 0) + 1
    return outcomes


def _waiting_job_restore(job: Job, *, rebuilt: set[tuple[int, str]]) -> str | None:
    """A job waiting for its pool that no queue holds: queued again (`enqueued`), or, when a
    dispatch round took it onto the pool and the database missed it, its admission recorded
    (`admitted`); its message is then `_unclaimed_resend`'s once the round's own send had time."""
    reservation = job.reservation
    client = redis_client()
    marker = reservation_marker(reservation.id)
    if (job.tenant_id, reservation.period) not in rebuilt and not client.exists(marker):
        # Redis lost it (and the tenant's counters with it): the ledger has them.
        counters_rebuild(tenant_id=job.tenant_id, period=reservation.period)
        rebuilt.add((job.tenant_id, reservation.period))
    if client.hget(marker, "state") == b"admitted":
        reservations_admitted(reservation_ids=[reservation.id], pool=job.pool)
        return "admitted"
    job_cap = quota_limits_for(tenant=job.tenant, api_key=job.api_key).max_concurrent_jobs
    if scheduler_enqueue(job_id=job.pk, pool=job.pool, priority=job.priority,
                         tenant_id=job.tenant_id, cost_mcu=reservation.reserved_mcu,
                         reservation_id=reservation.id, job_cap=job_cap) is None:
        return None  # a dispatch round took it meanwhile: that round starts it
    # Cancelled (or timed out) between the read and the enqueue: its entry must not stay behind.
    if not Job.objects.filter(pk=job.pk, status=Job.Status.QUEUED).exists():
        scheduler_remove(job_id=job.pk, pool=job.pool, priority=job.priority)
        return None
    logger.warning("job %s was queued but in no scheduler queue: queued again", job.pk)
    return "enqueued"


def _unclaimed_resend(job: Job, *, now: datetime) -> bool:
    """Send an admitted job again when no worker claimed it SLUICE_JOB_RESEND_AFTER_S after its
    admission (or its redelivery: both give the reservation a whole lease), at most once per
    that interval, so a pool whose workers are all down does not pile messages up."""
    resend_after_s = settings.SLUICE_JOB_RESEND_AFTER_S
    admitted_at = job.reservation.expires_at - timedelta(seconds=pool_lease_s(job.pool))
    if admitted_at > now - timedelta(seconds=resend_after_s):
        return False
    if not redis_client().set(RESENT_KEY.format(job_id=job.pk), 1, nx=True, ex=resend_after_s):
        return False
    logger.warning("job %s admitted %s ago and not claimed: sent again", job.pk, now - admitted_at)
    job_send(job.pk, pool=job.pool, attempt=job.attempts + 1)
    return True
