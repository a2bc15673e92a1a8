"""Reads for moderation. Tenant-scoped reads take `tenant=`; the review queue spans tenants
(None) because moderators are platform staff, not tenant members."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import Q, QuerySet
from django.utils import timezone

from moderation.models import ModerationCase, SafetyPolicy, SafetyPolicyAssignment, TenantSuspension
from portal.errors import NotFound
from portal.models import Tenant

# A process keeps each tenant's resolved policy for SLUICE_SAFETY_POLICY_TTL_S seconds: every
# generation needs it (the input screen, then the stream's windows), and resolving it is one or
# two queries. The services that edit policies and assignments clear this process's cache at
# once; other processes follow within the TTL. Keyed by tier too, so a tier change is seen at once.
_policy_lock = threading.Lock()
_policy_cache: dict[tuple[int, int], tuple[float, SafetyPolicy]] = {}  # -> (resolved at, policy)


def safety_policy_for_tenant(*, tenant: Tenant) -> SafetyPolicy:
    """The tenant's own policy, else its tier's, else the default one."""
    key = (tenant.pk, tenant.tier_id)
    now = time.monotonic()
    cached = _policy_cache.get(key)
    if cached is not None and now - cached[0] < settings.SLUICE_SAFETY_POLICY_TTL_S:
        return cached[1]
    policy = _safety_policy_resolve(tenant=tenant)
    with _policy_lock:
        _policy_cache[key] = (now, policy)
    return policy


def safety_policy_cache_clear() -> None:
    with _policy_lock:
        _policy_cache.clear()


def _safety_policy_resolve(*, tenant: Tenant) -> SafetyPolicy:
    assignments = (
        SafetyPolicyAssignment.objects.filter(Q(tenant=tenant) | Q(tier_id=tenant.tier_id))
        .select_related("policy")
    )
    by_scope = {("tenant" if a.tenant_id else "tier"): a.policy for a in assignments}
    policy = by_scope.get("tenant") or by_scope.get("tier")
    if policy is None:
        policy = SafetyPolicy.objects.filter(is_default=True).first()
    if policy is None:
        # No rows at all (a flushed test database): the code's defaults, never "no safety".
        policy = SafetyPolicy(slug="standard", name="Standard")
    return policy


def tenant_find(*, slug: str) -> Tenant | None:
    """Moderators look tenants up across the platform (they are not members of them)."""
    return Tenant.objects.filter(slug=slug).first()


def tenant_get(*, slug: str) -> Tenant:
    tenant = tenant_find(slug=slug)
    if tenant is None:
        raise NotFound()
    return tenant


def cases_for_review(
    *,
    tenant: Tenant | None,
    statuses: list[str] | None = None,
    category: str | None = None,
    min_score: float | None = None,
) -> QuerySet[ModerationCase]:
    cases = ModerationCase.objects.select_related("tenant", "api_key")
    if tenant is not None:
        cases = cases.filter(tenant=tenant)
    if statuses:
        cases = cases.filter(status__in=statuses)
    if category:
        cases = cases.filter(category=category)
    if min_score is not None:
        cases = cases.filter(score__gte=min_score)
    # Oldest first: pages stay put while new cases arrive (they join the end), and the oldest,
    # whose prompts are purged first, are reviewed first.
    return cases.order_by("created_at", "pk")


def case_get(*, case_id: int) -> ModerationCase:
    case = ModerationCase.objects.select_related("tenant", "api_key").filter(pk=case_id).first()
    if case is None:
        raise NotFound()
    return case


def case_get_for_tenant(*, tenant: Tenant, case_id: int) -> ModerationCase:
    case = ModerationCase.objects.filter(tenant=tenant, pk=case_id).first()
    if case is None:
        raise NotFound()
    return case


def strikes(*, tenant: Tenant, since: datetime) -> QuerySet[ModerationCase]:
    return ModerationCase.objects.filter(
        tenant=tenant, status=ModerationCase.Status.UPHELD, decided_at__gte=since
    ).order_by("decided_at", "pk")


# The suspensions below are the strike ones, which moderators review and lift; staff's own
# (TenantSuspension.Kind.STAFF) are lifted in the tenant admin.
_STRIKES = TenantSuspension.Kind.STRIKES


def suspension_active_for_tenant(*, tenant: Tenant) -> TenantSuspension | None:
    return TenantSuspension.objects.filter(tenant=tenant, kind=_STRIKES, lifted_at__isnull=True).first()


def suspension_last_lifted_at(*, tenant: Tenant) -> datetime | None:
    lifted = (
        # A lift by an overturn forgives nothing: the strikes still upheld count on.
        TenantSuspension.objects.filter(tenant=tenant, kind=_STRIKES, lifted_at__isnull=False,
                                        lifted_by_decision__isnull=True)
        .order_by("-lifted_at")
        .values_list("lifted_at", flat=True)
        .first()
    )
    return lifted


def suspensions_active(*, tenant: Tenant | None) -> QuerySet[TenantSuspension]:
    suspensions = (TenantSuspension.objects.filter(kind=_STRIKES, lifted_at__isnull=True)
                   .select_related("tenant").prefetch_related("cases"))
    return suspensions.filter(tenant=tenant) if tenant is not None else suspensions


def case_prompt_expired(*, now: datetime) -> Q:
    """Cases whose prompt is past retention: the period it was stored under, or the current
    SLUICE_MODERATION_PROMPT_RETENTION_DAYS if shortened since (it applies to existing cases)."""
    retention = timedelta(days=settings.SLUICE_MODERATION_PROMPT_RETENTION_DAYS)
    return Q(prompt_expires_at__lte=now) | Q(created_at__lte=now - retention)


def overturned_cases_jsonl(*, tenant: Tenant | None) -> Iterator[str]:
    """False positives as labelled rows for retraining, in the dataset's line format."""
    cases = cases_for_review(tenant=tenant, statuses=[ModerationCase.Status.OVERTURNED])
    # A prompt past its retention is out even before the hourly purge has emptied it.
    kept = cases.filter(prompt_purged=False).exclude(case_prompt_expired(now=timezone.now()))
    for case in kept.order_by("pk").iterator():
        yield json.dumps(
            {
                "text": case.prompt,
                "label": "benign",
                "source": f"sluice:moderation_case/{case.pk}",
                "license": "tenant-data",
                "category": f"overturned:{case.category}",
            },
            ensure_ascii=False,
        ) + "\n"
