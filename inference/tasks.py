"""Celery tasks of the inference app (autodiscovered). Webhook tasks: inference/webhook_tasks.py."""

from inference.webhook_tasks import (  # noqa: F401  (registered with Celery on import)
    webhook_deliver_task,
    webhook_deliveries_dispatch_task,
)
