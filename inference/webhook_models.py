"""Webhook endpoints, the events published to them and the log of every delivery attempt.

Kept apart from the Job model (inference/models.py re-exports these names) so the two halves of
the inference app can grow without stepping on each other.
"""

from __future__ import annotations

from django.core.serializers.json import DjangoJSONEncoder
from django.db import models
from django.utils import timezone
from ulid import ULID

from portal.models import Tenant

# DESIGN.md's events, plus the quotas issue's budget alert. Order is the dashboard's order.
WEBHOOK_EVENT_TYPES = (
    "job.queued",
    "job.started",
    "job.progress",
    "job.completed",
    "job.failed",
    "job.cancelled",
    "moderation.case_opened",
    "budget.threshold_reached",
)
# job.progress can fire many times a second per job: an endpoint only gets it if it asks.
OPT_IN_EVENT_TYPES = frozenset({"job.progress"})
DEFAULT_EVENT_TYPES = [name for name in WEBHOOK_EVENT_TYPES if name not in OPT_IN_EVENT_TYPES]


# Prefixed, time-ordered ids: readable in logs and in receivers, and they leak no row counts.
def endpoint_id_new() -> str:
    return f"we_{ULID()}"


def event_id_new() -> str:
    return f"msg_{ULID()}"


def delivery_id_new() -> str:
    return f"wd_{ULID()}"


def default_event_types() -> list[str]:
    return list(DEFAULT_EVENT_TYPES)


class WebhookEndpoint(models.Model):
    id = models.CharField(primary_key=True, max_length=32, default=endpoint_id_new, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="webhook_endpoints")
    url = models.URLField(max_length=2000)
    description = models.CharField(max_length=200, blank=True, default="")
    event_types = models.JSONField(default=default_event_types)
    # Standard Webhooks `whsec_<base64>`. Stored because signing needs it; never logged, shown
    # only when created or rotated. Rotated-out secrets keep signing until they expire so that
    # receivers can roll over without dropping messages: `[{"secret", "expires_at" (ISO)}]`,
    # newest last. Each rotation adds one, so rotating twice in a row (a mistyped copy, a leak
    # found during the roll-over) still signs with the one the receiver has.
    secret = models.CharField(max_length=80)
    retired_secrets = models.JSONField(default=list, blank=True)
    enabled = models.BooleanField(default=True)
    # Set when Sluice disabled the endpoint itself; the dashboard shows it as a notice.
    disabled_reason = models.CharField(max_length=300, blank=True, default="")
    disabled_at = models.DateTimeField(null=True, blank=True)
    # Deliveries in a row that exhausted their retry schedule; any success resets it.
    consecutive_failures = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["tenant", "enabled"], name="webhook_ep_tenant_enabled")]

    def __str__(self) -> str:
        return f"{self.id} -> {self.url}"  # never the secret

    @property
    def auto_disabled(self) -> bool:
        return not self.enabled and bool(self.disabled_reason)

    def subscribes_to(self, event_type: str) -> bool:
        return event_type in self.event_types


class WebhookEvent(models.Model):
    """One occurrence; its id is the `webhook-id` every delivery of it carries."""

    id = models.CharField(primary_key=True, max_length=32, default=event_id_new, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="webhook_events")
    type = models.CharField(max_length=64)
    # The whole body as sent: {"type", "timestamp", "data"}.
    payload = models.JSONField(encoder=DjangoJSONEncoder)
    # The job a job.* event tells of (its `data.id`); None for the others (moderation, budget).
    # A column, not the payload's key: a job's deletion or expiry finds its events by it.
    # Null rather than "": the partial index below leaves out every event that is not a job's.
    job_id = models.CharField(max_length=40, null=True, blank=True)  # noqa: DJ001
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["job_id"], name="webhook_event_job",
                                condition=models.Q(job_id__isnull=False))]

    def __str__(self) -> str:
        return f"{self.id} {self.type}"


class WebhookDelivery(models.Model):
    """One event to one endpoint, retried on a schedule until it succeeds or gives up."""

    class Status(models.TextChoices):
        PENDING = "pending"  # waiting for its first attempt
        FAILED = "failed"  # the last attempt failed; another is due at next_attempt_at
        SUCCEEDED = "succeeded"
        GIVING_UP = "giving_up"  # schedule exhausted or endpoint disabled: no more attempts

    LIVE_STATUSES = (Status.PENDING, Status.FAILED)

    id = models.CharField(primary_key=True, max_length=32, default=delivery_id_new, editable=False)
    endpoint = models.ForeignKey(
        WebhookEndpoint, on_delete=models.CASCADE, related_name="deliveries"
    )
    event = models.ForeignKey(WebhookEvent, on_delete=models.CASCADE, related_name="deliveries")
    # Set on a manual redelivery: the delivery it repeats.
    redelivery_of = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    # When the sweeper may dispatch the next attempt. While an attempt runs it is pushed one lease
    # ahead, so a worker that dies mid-attempt is retried instead of forgotten.
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    last_status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    last_latency_ms = models.PositiveIntegerField(null=True, blank=True)
    last_response_snippet = models.TextField(blank=True, default="")
    last_error = models.CharField(max_length=300, blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["status", "next_attempt_at"], name="webhook_dlv_due"),
            models.Index(fields=["endpoint", "-created_at"], name="webhook_dlv_endpoint"),
        ]

    def __str__(self) -> str:
        return f"{self.id} {self.status}"

    @property
    def is_live(self) -> bool:
        return self.status in self.LIVE_STATUSES


class WebhookAttempt(models.Model):
    delivery = models.ForeignKey(WebhookDelivery, on_delete=models.CASCADE, related_name="log")
    number = models.PositiveIntegerField()
    attempted_at = models.DateTimeField(default=timezone.now)
    url = models.URLField(max_length=2000)  # the last hop, when redirects were followed
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    latency_ms = models.PositiveIntegerField(default=0)
    response_snippet = models.TextField(blank=True, default="")
    error = models.CharField(max_length=300, blank=True, default="")

    class Meta:
        ordering = ["-attempted_at", "-number"]
        constraints = [
            models.UniqueConstraint(fields=["delivery", "number"], name="webhook_attempt_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.delivery_id} #{self.number}"

    @property
    def succeeded(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300
