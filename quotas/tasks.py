"""Periodic upkeep of the ledger (Celery beat runs these; see CELERY_BEAT_SCHEDULE)."""

from celery import shared_task

from quotas.ledger import reservations_expire, reservations_sync


@shared_task(name="quotas.reservations_expire", ignore_result=True)
def reservations_expire_task() -> int:
    return reservations_expire()


@shared_task(name="quotas.reservations_sync", ignore_result=True)
def reservations_sync_task() -> int:
    return reservations_sync()
