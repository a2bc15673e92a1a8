"""Models of the inference app. Webhooks live in inference/webhook_models.py."""

from inference.webhook_models import (  # noqa: F401  (re-exported for Django's model registry)
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookEvent,
)
