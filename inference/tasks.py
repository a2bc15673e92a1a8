"""Celery tasks: ids in, services do the work. Redelivery is normal (job_claim checks)."""

from celery import shared_task
from django.db import DatabaseError
from django.utils import timezone
from redis import RedisError

from inference.idempotency import IDEMPOTENCY_TTL
from inference.models import IdempotencyKey
from inference.reconcile import jobs_reconcile
from inference.retention import jobs_content_expire
from inference.runner import job_run
from inference.scheduler import scheduler_pools
from inference.services import jobs_reap, pool_dispatch


@shared_task(
    name="inference.run_job", acks_late=True, reject_on_worker_lost=False, ignore_result=True,
    # The database or Redis briefly unreachable (a full connection pool, a failover) must not
    # strand a job in "queued": retry the delivery; the claim makes a repeat harmless.
    autoretry_for=(DatabaseError, RedisError), retry_backoff=1, retry_backoff_max=30,
    max_retries=8,
)
def run_job(job_id: str, attempt: int) -> str:
    return job_run(job_id=job_id, attempt=attempt)


@shared_task(name="inference.scheduler_tick", ignore_result=True)
def scheduler_tick() -> int:
    """Safety net: dispatch every pool (finishing jobs also dispatch, so this rarely acts)."""
    return sum(pool_dispatch(pool=pool) for pool in scheduler_pools())


@shared_task(name="inference.scheduler_reconcile", ignore_result=True)
def scheduler_reconcile() -> dict:
    """Queued jobs Redis lost, or that a failed step left out of every queue, go back to it;
    admitted ones no worker claimed are sent again; settlements a dying process never
    mirrored into Redis are mirrored; suspended tenants' jobs still queued or running are
    cancelled, and cancels whose Redis step was refused are finished (inference/reconcile.py)."""
    return jobs_reconcile()


@shared_task(name="inference.jobs_reap", ignore_result=True)
def jobs_reap_task() -> dict:
    return jobs_reap()


@shared_task(name="inference.jobs_content_expire", ignore_result=True)
def jobs_content_expire_task() -> int:
    """Videos, results and prompts of jobs ended SLUICE_MEDIA_RETENTION_DAYS ago go."""
    return jobs_content_expire()


@shared_task(name="inference.idempotency_purge", ignore_result=True)
def idempotency_purge() -> int:
    deleted, _ = IdempotencyKey.objects.filter(created_at__lt=timezone.now() - IDEMPOTENCY_TTL).delete()
    return deleted


# Webhook delivery tasks live in inference/webhook_tasks.py; importing registers them.
from inference.webhook_tasks import (  # noqa: E402, F401
    webhook_deliver_task,
    webhook_deliveries_dispatch_task,
    webhook_records_purge_task,
)
