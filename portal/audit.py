"""A tenant's audit log: the one place changes to its members, keys, webhooks and standing are
recorded. Each service records its change inside the change's own transaction, so the log and
the state cannot disagree."""

from __future__ import annotations

import json

from django.contrib.auth.models import AbstractBaseUser
from django.core.serializers.json import DjangoJSONEncoder
from django.db.models import QuerySet

from portal.models import ApiKey, AuditEvent, Membership, Tenant

# Who acted: a member (the dashboard), an API key (the API: its issuer is the person), a user
# (platform staff in the admin), or None (Sluice itself: strikes, the playground's own key).
Actor = Membership | ApiKey | AbstractBaseUser | None

# The label of an event by platform staff or a moderator: only actor_user says who it was.
STAFF_LABEL = "Sluice staff"


def user_label(user) -> str:
    return user.email or user.get_username()


def _actor_fields(actor: Actor, tenant_id: int) -> tuple[AbstractBaseUser | None, str]:
    if isinstance(actor, Membership):
        return actor.user, user_label(actor.user)
    if isinstance(actor, ApiKey):
        issuer = actor.created_by
        return issuer, f"key {actor.masked}" + (f" ({user_label(issuer)})" if issuer else "")
    if actor is None:
        return None, "Sluice"
    # A user outside the tenant is platform staff or a moderator: the tenant reads the role,
    # not the person (kept in actor_user for the platform).
    if Membership.objects.filter(tenant_id=tenant_id, user=actor).exists():
        return actor, user_label(actor)
    return actor, STAFF_LABEL


def audit_record(*, tenant: Tenant | int, action: str, actor: Actor = None, target: str = "",
                 detail: dict | None = None) -> AuditEvent:
    tenant_id = tenant if isinstance(tenant, int) else tenant.pk
    user, label = _actor_fields(actor, tenant_id)
    return AuditEvent.objects.create(
        tenant_id=tenant_id, action=action, actor_user=user, actor=label[:200],
        target=target[:300], detail=json.loads(json.dumps(detail or {}, cls=DjangoJSONEncoder)))


def audit_events_for_tenant(*, tenant: Tenant) -> QuerySet[AuditEvent]:
    return AuditEvent.objects.filter(tenant=tenant).order_by("-created_at", "-pk")
