"""Tenancy: tiers, tenants, memberships and API keys. Fields and constraints only."""

from __future__ import annotations

from django.conf import settings
from django.core.validators import MinValueValidator
from django.db import models
from django.utils import timezone


class Tier(models.Model):
    """A price plan. Limits live here as data so operators edit them in the admin."""

    slug = models.SlugField(max_length=32, unique=True)
    name = models.CharField(max_length=64)
    # None means unlimited (enterprise contracts are set per tenant); 0 means nothing may be spent.
    monthly_budget_cu = models.BigIntegerField(null=True, blank=True, validators=[MinValueValidator(0)])
    # At least 1: the token bucket refills at this rate, and a tier that may spend nothing has a
    # budget of 0 instead.
    cu_per_minute = models.PositiveIntegerField(validators=[MinValueValidator(1)])
    max_concurrent_jobs = models.PositiveIntegerField()
    # Higher runs first. Celery/Redis priorities are derived from it by the scheduler.
    queue_priority = models.PositiveSmallIntegerField()
    text_variant = models.CharField(
        max_length=16,
        choices=[("quantized", "quantized"), ("full", "full precision")],
        default="full",
    )
    # Model ids this tier may call; an empty list means every model in the registry.
    allowed_models = models.JSONField(default=list, blank=True)
    # Token-bucket depth for the CU/minute limit; None means one minute's worth.
    burst_cu = models.PositiveIntegerField(null=True, blank=True)
    # When Redis is unreachable: False refuses work (503), True admits it and reconciles later.
    fail_open = models.BooleanField(default=False)

    class Meta:
        ordering = ["queue_priority"]
        constraints = [
            # admit.lua reads a negative budget as "no budget": one typed in would mean unlimited.
            models.CheckConstraint(condition=models.Q(monthly_budget_cu__gte=0),
                                   name="tier_budget_not_negative"),
            models.CheckConstraint(condition=models.Q(cu_per_minute__gte=1),
                                   name="tier_rate_positive"),
        ]

    def __str__(self) -> str:
        return self.name

    def allows_model(self, model_id: str) -> bool:
        return not self.allowed_models or model_id in self.allowed_models


class Tenant(models.Model):
    class Status(models.TextChoices):
        ACTIVE = "active"
        SUSPENDED = "suspended"

    name = models.CharField(max_length=120)
    slug = models.SlugField(max_length=64, unique=True)
    tier = models.ForeignKey(Tier, on_delete=models.PROTECT, related_name="tenants")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE)
    created_at = models.DateTimeField(default=timezone.now)
    # Per-tenant overrides of the tier's limits (contracts); None means "the tier's value".
    # A budget of 0 blocks spending; an unlimited contract is `unlimited_budget`.
    monthly_budget_cu_override = models.BigIntegerField(
        null=True, blank=True, validators=[MinValueValidator(0)])
    unlimited_budget = models.BooleanField(default=False)
    cu_per_minute_override = models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1)])
    burst_cu_override = models.PositiveIntegerField(null=True, blank=True)
    max_concurrent_jobs_override = models.PositiveIntegerField(null=True, blank=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(condition=models.Q(monthly_budget_cu_override__gte=0),
                                   name="tenant_budget_override_not_negative"),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def is_suspended(self) -> bool:
        return self.status == self.Status.SUSPENDED


class Role(models.TextChoices):
    OWNER = "owner"
    ADMIN = "admin"
    MEMBER = "member"
    VIEWER = "viewer"


# What each role may do on the dashboard. One table, read by portal.services' checks.
ROLE_RANK = {Role.VIEWER: 0, Role.MEMBER: 1, Role.ADMIN: 2, Role.OWNER: 3}


class Membership(models.Model):
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships"
    )
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.MEMBER)
    created_at = models.DateTimeField(default=timezone.now)
    # When the user last switched to this tenant in the dashboard: where they land after logging in.
    last_visited_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "user"], name="membership_unique_user"),
        ]
        ordering = ["tenant__name", "user__username"]

    def __str__(self) -> str:
        return f"{self.user} @ {self.tenant} ({self.role})"

    def has_role_at_least(self, role: str) -> bool:
        return ROLE_RANK[Role(self.role)] >= ROLE_RANK[Role(role)]

    def roles_grantable(self) -> list[Role]:
        """The roles this member may give (inviting, changing a role): an admin gives any role
        but owner, an owner any role, anyone else none. The dashboard offers only these, and the
        services refuse the rest."""
        if not self.has_role_at_least(Role.ADMIN):
            return []
        return [role for role in Role if role != Role.OWNER or self.role == Role.OWNER]

    def may_manage(self, other: Membership) -> bool:
        """Whether this member may change `other`'s role or remove them: admins and owners may,
        except that only an owner touches an owner."""
        return self.has_role_at_least(Role.ADMIN) and (other.role != Role.OWNER or self.role == Role.OWNER)


class ApiKey(models.Model):
    """`sk-<prefix><secret>`: the prefix finds the row, only an HMAC of the secret is stored."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=120)
    prefix = models.CharField(max_length=16, unique=True)
    secret_digest = models.CharField(max_length=64)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    # Optional monthly CU cap for this key on top of the tenant's budget; 0 blocks the key's spending.
    cu_cap = models.BigIntegerField(null=True, blank=True, validators=[MinValueValidator(0)])
    # Optional CU/minute limit for this key on top of the tenant's (burst: one minute's worth).
    cu_per_minute = models.PositiveIntegerField(null=True, blank=True, validators=[MinValueValidator(1)])

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(condition=models.Q(cu_cap__gte=0), name="apikey_cap_not_negative"),
        ]

    def __str__(self) -> str:
        return f"{self.name} (sk-{self.prefix}…)"

    @property
    def masked(self) -> str:
        return f"sk-{self.prefix}…"

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None

    def is_expired(self, now=None) -> bool:
        return self.expires_at is not None and self.expires_at <= (now or timezone.now())

    @property
    def is_usable(self) -> bool:
        return not self.is_revoked and not self.is_expired()


class AuditEvent(models.Model):
    """One change to a tenant's people, keys, webhooks or standing: who, what, when. Written in
    the transaction of the change (portal.audit.audit_record), kept for as long as the tenant,
    read by its admins; never edited."""

    class Action(models.TextChoices):
        MEMBER_INVITED = "member.invited"
        MEMBER_ROLE_CHANGED = "member.role_changed"
        MEMBER_REMOVED = "member.removed"
        KEY_ISSUED = "key.issued"
        KEY_REVOKED = "key.revoked"
        WEBHOOK_CREATED = "webhook.created"
        WEBHOOK_UPDATED = "webhook.updated"
        WEBHOOK_DELETED = "webhook.deleted"
        WEBHOOK_SECRET_ROTATED = "webhook.secret_rotated"  # noqa: S105 (an action name)
        TENANT_SUSPENDED = "tenant.suspended"
        TENANT_UNSUSPENDED = "tenant.unsuspended"

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="audit_events")
    action = models.CharField(max_length=32, choices=Action.choices)
    # The person, when one acted (kept as a label if their account goes): a member in the
    # dashboard, the issuer of an API key, platform staff. No user: Sluice itself.
    actor_user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True,
                                   on_delete=models.SET_NULL, related_name="+")
    actor = models.CharField(max_length=200)  # "ana@acme.example", "key sk-abc… (ana@…)", "Sluice"
    target = models.CharField(max_length=300, blank=True, default="")  # never a secret
    detail = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at", "-pk"]
        indexes = [models.Index(fields=["tenant", "-created_at"], name="audit_tenant_recent")]

    def __str__(self) -> str:
        return f"{self.created_at:%Y-%m-%d %H:%M} {self.tenant_id} {self.action} by {self.actor}"
