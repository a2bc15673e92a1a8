"""Safety rules, policies, moderation cases and their audit trail. Fields and constraints only."""

from __future__ import annotations

import re
from datetime import timedelta

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone

from portal.models import Tenant, Tier


class Category(models.TextChoices):
    """What the cascade labels a prompt. `benign` is never a case category."""

    JAILBREAK = "jailbreak"
    INJECTION = "injection"
    HARMFUL = "harmful"


# Operating points the classifier's thresholds file carries, as false-positive rates on dev.
OPERATING_POINTS = [0.002, 0.005, 0.01, 0.02, 0.05, 0.1]
_OPERATING_POINT_CHOICES = [(fpr, f"{fpr:.1%} false positives on dev") for fpr in OPERATING_POINTS]


class SafetyRule(models.Model):
    """A signature of a known attack family. Moderators edit these in the admin."""

    name = models.CharField(max_length=120, unique=True)
    family = models.CharField(max_length=64, help_text="e.g. dan, developer_mode, ignore_previous")
    label = models.CharField(max_length=16, choices=Category.choices)
    pattern = models.TextField(help_text="Python regular expression, matched case-insensitively")
    enabled = models.BooleanField(default=True)
    description = models.TextField(blank=True)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["family", "name"]

    def __str__(self) -> str:
        return f"{self.family}: {self.name}"

    def clean(self) -> None:
        try:
            re.compile(self.pattern, re.IGNORECASE)
        except re.error as exc:
            raise ValidationError({"pattern": f"Not a valid regular expression: {exc}"}) from exc


class SafetyPolicy(models.Model):
    """Where a tenant's traffic is blocked, and where it is only sent to review.

    Thresholds are operating points (false-positive rate on the dev set) rather than raw
    scores, so a retrained classifier keeps every policy meaning the same thing.
    """

    slug = models.SlugField(max_length=32, unique=True)
    name = models.CharField(max_length=64)
    block_fpr = models.FloatField(choices=_OPERATING_POINT_CHOICES, default=0.01)
    review_fpr = models.FloatField(choices=_OPERATING_POINT_CHOICES, default=0.02)
    # Streams are checked every this many new characters (and once at the end).
    output_window_chars = models.PositiveIntegerField(default=400)
    # The first window is this short, the next ones start at 48 characters (or twice the first)
    # and double up to `output_window_chars`: the client waits for the first one before its
    # first token. A first window under 16 characters is screened by the rules alone and read
    # by the classifier with the next one (moderation.cascade.OutputModerator): holding back a
    # second token would cost a decode step and check nothing more, so the default releases the
    # first token as it comes.
    output_first_window_chars = models.PositiveIntegerField(
        default=1, validators=[MinValueValidator(1)],
        help_text="Characters held back before a stream's first release (the first check); "
                  "the next windows start at 48 characters (or twice this) and double up to "
                  "the output window.",
    )
    is_default = models.BooleanField(default=False)

    class Meta:
        ordering = ["slug"]
        verbose_name_plural = "safety policies"
        constraints = [
            models.UniqueConstraint(
                fields=["is_default"], condition=Q(is_default=True), name="one_default_policy"
            ),
            models.CheckConstraint(
                condition=Q(review_fpr__gte=models.F("block_fpr")),
                name="policy_review_wider_than_block",
            ),
            models.CheckConstraint(
                condition=Q(output_first_window_chars__gte=1)
                & Q(output_first_window_chars__lte=models.F("output_window_chars")),
                name="policy_first_window_within_window",
            ),
        ]

    def __str__(self) -> str:
        return self.name

    # What the cascade reads of a policy (moderation.cascade.Policy): a job carries it, so its
    # stream is judged under the policy that screened its prompt, with no lookup in the worker.
    SNAPSHOT_FIELDS = ("slug", "block_fpr", "review_fpr", "output_window_chars",
                       "output_first_window_chars")

    def snapshot(self) -> dict:
        return {name: getattr(self, name) for name in self.SNAPSHOT_FIELDS}

    @classmethod
    def from_snapshot(cls, data: dict) -> SafetyPolicy:
        return cls(name=data["slug"], **{name: data[name] for name in cls.SNAPSHOT_FIELDS})


class SafetyPolicyAssignment(models.Model):
    """A tier's policy, or one tenant's override of it (exactly one of the two is set)."""

    policy = models.ForeignKey(SafetyPolicy, on_delete=models.PROTECT, related_name="assignments")
    tier = models.OneToOneField(
        Tier, null=True, blank=True, on_delete=models.CASCADE, related_name="safety_assignment"
    )
    tenant = models.OneToOneField(
        Tenant, null=True, blank=True, on_delete=models.CASCADE, related_name="safety_assignment"
    )

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=(Q(tier__isnull=False) & Q(tenant__isnull=True))
                | (Q(tier__isnull=True) & Q(tenant__isnull=False)),
                name="assignment_tier_xor_tenant",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.tenant or self.tier} -> {self.policy}"


class ModerationCase(models.Model):
    class Status(models.TextChoices):
        OPEN = "open"
        ESCALATED = "escalated"
        UPHELD = "upheld"
        OVERTURNED = "overturned"

    class Action(models.TextChoices):
        BLOCKED = "blocked"
        BORDERLINE = "borderline"  # let through, sent to review

    class Source(models.TextChoices):
        INPUT = "input"
        OUTPUT = "output"

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="moderation_cases")
    api_key = models.ForeignKey(
        "portal.ApiKey", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    source = models.CharField(max_length=8, choices=Source.choices, default=Source.INPUT)
    # What the prompt was for ("chat.completions", "videos", ...): context for the reviewer.
    endpoint = models.CharField(max_length=64, blank=True)
    request_id = models.CharField(max_length=128, blank=True)
    action = models.CharField(max_length=16, choices=Action.choices)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.OPEN)
    category = models.CharField(max_length=16, choices=Category.choices)
    score = models.FloatField()
    category_scores = models.JSONField(default=dict)
    # Moderators may see which rule fired; API callers never do.
    matched_rule = models.CharField(max_length=120, blank=True)
    tricks = models.JSONField(default=list, blank=True)
    policy_slug = models.CharField(max_length=32)
    # Redacted (API keys, emails) before storing; emptied when the retention period ends.
    prompt = models.TextField(blank=True)
    prompt_expires_at = models.DateTimeField()
    prompt_purged = models.BooleanField(default=False)
    created_at = models.DateTimeField(default=timezone.now)
    decided_at = models.DateTimeField(null=True, blank=True)
    # A request sent again with the same Idempotency-Key and text is one request: one case, one
    # strike at most (services.case_open). A digest of key and text; empty without a key.
    request_digest = models.CharField(max_length=64, blank=True, default="")

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["status", "-created_at"], name="case_queue"),
            models.Index(fields=["tenant", "status", "decided_at"], name="case_strikes"),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "request_digest"], condition=~Q(request_digest=""),
                name="one_case_per_request",
            ),
        ]
        permissions = [
            ("review_case", "Can review moderation cases and lift suspensions"),
            # Senior reviewers: an escalated case is decided by one who did not escalate it, and
            # only they reverse a strike.
            ("review_escalated", "Can decide escalated moderation cases and overturn upheld ones"),
        ]

    def __str__(self) -> str:
        return f"case {self.pk} ({self.tenant}, {self.category}, {self.status})"

    @property
    def is_decided(self) -> bool:
        return self.status in {self.Status.UPHELD, self.Status.OVERTURNED}

    @property
    def prompt_kept_until(self):
        """The earlier of the retention it was stored under and the current one (shortened
        since, it applies to this case too: selectors.case_prompt_expired)."""
        retention = timedelta(days=settings.SLUICE_MODERATION_PROMPT_RETENTION_DAYS)
        return min(self.prompt_expires_at, self.created_at + retention)

    @property
    def prompt_expired(self) -> bool:
        """Past its retention: shown nowhere, even before the hourly purge empties it."""
        return self.prompt_purged or self.prompt_kept_until <= timezone.now()


class CaseDecision(models.Model):
    """The audit log: every decision on a case, by whom, in order. Never edited."""

    class Decision(models.TextChoices):
        UPHOLD = "uphold"
        OVERTURN = "overturn"  # a false positive
        ESCALATE = "escalate"

    case = models.ForeignKey(ModerationCase, on_delete=models.CASCADE, related_name="decisions")
    moderator = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+"
    )
    decision = models.CharField(max_length=16, choices=Decision.choices)
    note = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["created_at", "pk"]

    def __str__(self) -> str:
        return f"{self.moderator} {self.decision} case {self.case_id}"


class TenantSuspension(models.Model):
    """One reason a tenant is suspended; lifting it is an audited action. The tenant is active
    again only when none of its reasons is open (services._tenant_unsuspend_if_clear)."""

    class Kind(models.TextChoices):
        STRIKES = "strikes"  # repeated upheld strikes, pending a moderator's review
        STAFF = "staff"  # staff's Suspend action in the admin, lifted there

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="suspensions")
    kind = models.CharField(max_length=8, choices=Kind.choices, default=Kind.STRIKES)
    reason = models.TextField()
    strike_count = models.PositiveIntegerField(default=0)
    # The upheld cases a strikes suspension counted, and those upheld while it was open: what
    # the reviewer lifting it reads, and what an overturn recounts.
    cases = models.ManyToManyField(ModerationCase, blank=True, related_name="suspensions")
    created_at = models.DateTimeField(default=timezone.now)
    lifted_at = models.DateTimeField(null=True, blank=True)
    lifted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    lift_note = models.TextField(blank=True)
    # Set when a senior overturning one of its strikes left too few to suspend: such a lift
    # forgives none of the strikes still upheld (selectors.suspension_last_lifted_at).
    lifted_by_decision = models.ForeignKey(
        CaseDecision, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "kind"], condition=Q(lifted_at__isnull=True),
                name="one_open_suspension",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.tenant} suspended ({self.kind}) {self.created_at:%Y-%m-%d}"

    @property
    def is_active(self) -> bool:
        return self.lifted_at is None
