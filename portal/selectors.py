"""Reads. Every selector that returns tenant data takes the tenant (or the user) it is for."""

from __future__ import annotations

from django.db.models import Case, F, Q, QuerySet, Value, When
from django.utils import timezone

from portal.errors import NotFound
from portal.models import ApiKey, Membership, Role, Tenant


def memberships_for_user(*, user) -> QuerySet[Membership]:
    return Membership.objects.filter(user=user).select_related("tenant", "tenant__tier")


def membership_landing_for_user(*, user) -> Membership | None:
    """The tenant the dashboard opens on: the one the user last switched to; else one they own,
    the most recently joined first (not the first by name: a new tenant would not be it)."""
    return (
        memberships_for_user(user=user)
        .annotate(owned=Case(When(role=Role.OWNER, then=Value(1)), default=Value(0)))
        .order_by(F("last_visited_at").desc(nulls_last=True), "-owned", "-created_at", "-pk")
        .first()
    )


def membership_get_for_user(*, user, tenant_slug: str) -> Membership:
    """The caller's membership in a tenant; a tenant they are not in is NotFound, like a missing one."""
    if not user.is_authenticated:
        raise NotFound()
    membership = (
        Membership.objects.filter(user=user, tenant__slug=tenant_slug)
        .select_related("tenant", "tenant__tier")
        .first()
    )
    if membership is None:
        raise NotFound()
    return membership


def api_keys_for_tenant(*, tenant: Tenant) -> QuerySet[ApiKey]:
    return ApiKey.objects.filter(tenant=tenant).select_related("created_by")


def api_keys_usable_for_tenant(*, tenant: Tenant) -> QuerySet[ApiKey]:
    """The keys that authenticate now: neither revoked nor expired (ApiKey.is_usable)."""
    return api_keys_for_tenant(tenant=tenant).filter(
        Q(expires_at__isnull=True) | Q(expires_at__gt=timezone.now()), revoked_at__isnull=True)


def api_key_get_for_tenant(*, tenant: Tenant, key_id: int) -> ApiKey:
    key = ApiKey.objects.filter(tenant=tenant, pk=key_id).first()
    if key is None:
        raise NotFound()
    return key


def members_for_tenant(*, tenant: Tenant) -> QuerySet[Membership]:
    return Membership.objects.filter(tenant=tenant).select_related("user").order_by(
        "user__username"
    )


def membership_get_for_tenant(*, tenant: Tenant, membership_id: int) -> Membership:
    membership = (
        Membership.objects.filter(tenant=tenant, pk=membership_id).select_related("user").first()
    )
    if membership is None:
        raise NotFound()
    return membership
