"""The CU ledger: the source of truth for budgets. Redis only holds hot copies of it.

Amounts are integers in milli-CU (mCU; 1 CU = 1,000 mCU) so a 20-token completion is
counted exactly. Budget used in a period = sum(reserve) - sum(refund) + sum(adjust);
billed usage = sum(settle) + sum(adjust).
"""

from __future__ import annotations

from django.db import models
from django.utils import timezone

from portal.models import ApiKey, Tenant


class Reservation(models.Model):
    class State(models.TextChoices):
        QUEUED = "queued"  # budget reserved, waiting for pool capacity
        ADMITTED = "admitted"  # budget reserved and a pool slot held
        SETTLED = "settled"  # actual usage charged, the rest refunded
        EXPIRED = "expired"  # orphan (worker died): released in full by the reaper

    ACTIVE_STATES = (State.QUEUED, State.ADMITTED)

    id = models.CharField(primary_key=True, max_length=32)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="reservations")
    api_key = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    model = models.CharField(max_length=64)
    pool = models.CharField(max_length=64)
    # The tier it was admitted under (its tenant may move later): settlement metrics and audits.
    tier = models.CharField(max_length=32, blank=True)
    period = models.CharField(max_length=7)  # "2026-11", UTC month
    reserved_mcu = models.BigIntegerField()
    settled_mcu = models.BigIntegerField(null=True, blank=True)
    state = models.CharField(max_length=16, choices=State.choices)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    settled_at = models.DateTimeField(null=True, blank=True)
    # False while Redis has not yet seen this reservation's latest state (it was down).
    redis_synced = models.BooleanField(default=True)

    class Meta:
        indexes = [
            models.Index(fields=["state", "expires_at"], name="reservation_state_expiry"),
            models.Index(fields=["tenant", "period", "state"], name="reservation_tenant_period"),
            models.Index(fields=["redis_synced"], name="reservation_unsynced",
                         condition=models.Q(redis_synced=False)),
            # The reconciler's look back over recent settlements (quotas.ledger
            # settlements_mirror_missed) and a rebuild's (counters_rebuild).
            models.Index(fields=["settled_at"], name="reservation_settled_at",
                         condition=models.Q(settled_at__isnull=False)),
        ]

    def __str__(self) -> str:
        return f"{self.id} {self.state} {self.reserved_mcu} mCU"


class LedgerEntry(models.Model):
    class Kind(models.TextChoices):
        RESERVE = "reserve"
        SETTLE = "settle"
        REFUND = "refund"
        ADJUST = "adjust"

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="ledger_entries")
    api_key = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    reservation = models.ForeignKey(
        Reservation, null=True, blank=True, on_delete=models.PROTECT, related_name="entries"
    )
    kind = models.CharField(max_length=8, choices=Kind.choices)
    mcu = models.BigIntegerField()
    period = models.CharField(max_length=7)
    model = models.CharField(max_length=64, blank=True)
    note = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name_plural = "ledger entries"
        indexes = [
            models.Index(fields=["tenant", "period", "kind"], name="ledger_tenant_period"),
            models.Index(fields=["tenant", "created_at"], name="ledger_tenant_time"),
        ]
        constraints = [
            # One settle and one refund per reservation: settlement cannot be applied twice.
            models.UniqueConstraint(
                fields=["reservation", "kind"],
                condition=models.Q(reservation__isnull=False),
                name="ledger_once_per_reservation_kind",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.mcu} mCU ({self.tenant_id}, {self.period})"


class BudgetAlert(models.Model):
    """The soft-limit alert, raised once per tenant, period and threshold."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="budget_alerts")
    period = models.CharField(max_length=7)
    threshold_pct = models.PositiveSmallIntegerField()
    used_mcu = models.BigIntegerField()
    limit_mcu = models.BigIntegerField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "period", "threshold_pct"], name="budget_alert_once"
            )
        ]

    def __str__(self) -> str:
        return f"{self.tenant_id} passed {self.threshold_pct}% in {self.period}"
