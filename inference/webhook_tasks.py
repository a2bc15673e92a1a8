"""Celery tasks for webhooks, on the short-work `webhooks` queue.

Retries are not Celery retries: a failed attempt stores its next due time and the periodic
dispatcher re-enqueues it (see inference/webhooks.py for why).
"""

from celery import shared_task

from inference.webhooks import (
    webhook_deliveries_dispatch,
    webhook_delivery_attempt,
    webhook_records_purge,
)


@shared_task(name="inference.webhook_deliver", queue="webhooks", ignore_result=True)
def webhook_deliver_task(delivery_id: str, attempt: int) -> None:
    webhook_delivery_attempt(delivery_id=delivery_id, attempt=attempt)


@shared_task(name="inference.webhook_deliveries_dispatch", queue="webhooks", ignore_result=True)
def webhook_deliveries_dispatch_task() -> int:
    return webhook_deliveries_dispatch()


@shared_task(name="inference.webhook_records_purge", ignore_result=True)
def webhook_records_purge_task() -> int:
    return webhook_records_purge()
