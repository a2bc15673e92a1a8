"""Jobs: every generation, text or video, is a Job with a strict state machine."""

from __future__ import annotations

from django.db import models
from django.utils import timezone
from ulid import ULID

from portal.models import ApiKey, Tenant


def job_id_new() -> str:
    return f"job_{str(ULID()).lower()}"


# A job that still holds outputs, or the prompt it was sent (a video's `prompt`, a text job's
# `prompt_token_ids`).
HOLDS_CONTENT = (~models.Q(result={}) | models.Q(params__has_key="prompt")
                 | models.Q(params__has_key="prompt_token_ids"))
# A deleted one: the reaper removes its content once it has ended.
DELETED_WITH_CONTENT = models.Q(deleted_at__isnull=False) & HOLDS_CONTENT
# The key a result holds once retention removed its content (inference/retention.py).
CONTENT_EXPIRED_KEY = "expired_at"
# An ended job whose content retention will remove: the hourly task's rows, in the order of
# their end. Expired and deleted ones leave the index, so each run reads only what is due.
EXPIRABLE = (models.Q(finished_at__isnull=False, deleted_at__isnull=True) & HOLDS_CONTENT
             & ~models.Q(result__has_key=CONTENT_EXPIRED_KEY))
# A job whose cancel was requested and that has not ended (Job.ACTIVE): Redis refused the
# cancel's second step, or its running worker has yet to stop. The reconciliation finishes it.
CANCEL_UNFINISHED = (models.Q(cancel_requested_at__isnull=False)
                     & models.Q(status__in=("queued", "running")))


class Job(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        CANCELLED = "cancelled"
        REJECTED = "rejected"  # refused at admission; kept for the record of the attempt

    class Kind(models.TextChoices):
        TEXT = "text"
        VIDEO = "video"

    TERMINAL = (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED, Status.REJECTED)
    ACTIVE = (Status.QUEUED, Status.RUNNING)  # waiting for a pool, or holding one
    # Legal moves. RUNNING -> QUEUED is the redelivery after a worker was lost.
    TRANSITIONS = {
        Status.QUEUED: (Status.RUNNING, Status.CANCELLED, Status.FAILED),
        Status.RUNNING: (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED, Status.QUEUED),
    }

    id = models.CharField(primary_key=True, max_length=40, default=job_id_new, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="jobs")
    api_key = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    kind = models.CharField(max_length=8, choices=Kind.choices)
    model = models.CharField(max_length=64)
    variant = models.CharField(max_length=16, default="full")
    params = models.JSONField(default=dict)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    priority = models.PositiveSmallIntegerField()
    pool = models.CharField(max_length=64)
    reservation = models.OneToOneField(
        "quotas.Reservation", null=True, blank=True, on_delete=models.SET_NULL, related_name="job"
    )
    estimated_mcu = models.BigIntegerField()
    actual_mcu = models.BigIntegerField(null=True, blank=True)
    progress = models.FloatField(default=0.0)  # 0-100
    attempts = models.PositiveSmallIntegerField(default=0)
    queued_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    first_output_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    cancel_requested_at = models.DateTimeField(null=True, blank=True)
    error_code = models.CharField(max_length=64, blank=True)
    error_message = models.CharField(max_length=500, blank=True)
    # Where the output lives: {"text": ...} for completions, {"video": path, "thumbnail": path}.
    result = models.JSONField(default=dict, blank=True)
    usage = models.JSONField(default=dict, blank=True)
    # The job ended (committed) but Redis refused its terminal event: followers and webhooks
    # learn of the end from that event, so the reaper publishes it once Redis answers again.
    terminal_event_pending = models.BooleanField(default=False)
    # Deleted by its tenant (DELETE /v1/videos/{id}, /v1/jobs/{id}): hidden from every read, its
    # outputs removed, the row kept for the ledger and usage that refer to it.
    deleted_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-queued_at"]
        indexes = [
            models.Index(fields=["tenant", "-queued_at"], name="job_tenant_recent"),
            models.Index(fields=["status", "started_at"], name="job_status_started"),
            models.Index(fields=["terminal_event_pending"], name="job_terminal_event_pending",
                         condition=models.Q(terminal_event_pending=True)),
            # The reaper's look for what a deleted job still holds (it ended after its delete).
            models.Index(fields=["deleted_at"], name="job_deleted_with_content",
                         condition=DELETED_WITH_CONTENT),
            models.Index(fields=["finished_at"], name="job_content_expirable",
                         condition=EXPIRABLE),
            # The reconciliation's look for cancels still to finish: nearly always empty.
            models.Index(fields=["cancel_requested_at"], name="job_cancel_unfinished",
                         condition=CANCEL_UNFINISHED),
        ]

    def __str__(self) -> str:
        return f"{self.id} {self.kind} {self.status}"

    @property
    def is_terminal(self) -> bool:
        return self.status in self.TERMINAL


class IdempotencyKey(models.Model):
    """`Idempotency-Key` of a creating POST, scoped per tenant and kept for 24 h: the job or the
    webhook endpoint the first request made (inference/idempotency.py)."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    key = models.CharField(max_length=255)
    request_hash = models.CharField(max_length=64)
    job = models.ForeignKey(Job, null=True, blank=True, on_delete=models.CASCADE, related_name="+")
    # Kept when the endpoint is deleted (emptied): a retry is told it is gone, as for a deleted
    # job, rather than making another one.
    webhook_endpoint = models.ForeignKey("inference.WebhookEndpoint", null=True, blank=True,
                                         on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "key"], name="idempotency_key_per_tenant")
        ]

    def __str__(self) -> str:
        return f"{self.tenant_id}:{self.key}"


# Webhook models live in their own module; re-exported here for Django's model registry.
from inference.webhook_models import (  # noqa: E402, F401
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookEvent,
)
