"""The tenant's audit log: each change to members, keys, webhooks and standing is recorded with
who made it, in the change's transaction, and only the tenant's admins read it."""

from __future__ import annotations

import re

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from inference.webhooks import (
    webhook_endpoint_create,
    webhook_endpoint_delete,
    webhook_endpoint_secret_rotate,
    webhook_endpoint_update,
)
from portal.models import ApiKey, AuditEvent
from portal.services import tenant_suspend
from tests.factories import api_key_obj

pytestmark = pytest.mark.django_db


def login(membership) -> Client:
    client = Client()
    client.force_login(membership.user)
    return client


def log(tenant) -> list[tuple[str, str, str]]:
    return [(e.action, e.actor, e.target)
            for e in AuditEvent.objects.filter(tenant=tenant).order_by("created_at", "pk")]


def test_dashboard_changes_to_people_and_keys_are_recorded_with_who_made_them(cast, mailoutbox):
    member = login(cast.member)
    page = member.post("/t/acme/keys/", {"name": "laptop"}).content.decode()
    full_key = re.search(r'value="(sk-[A-Za-z0-9]+)"', page).group(1)
    laptop = ApiKey.objects.get(tenant=cast.tenant, name="laptop")
    owner = login(cast.owner)
    owner.post("/t/acme/members/", {"email": "new@acme.example", "role": "viewer"})
    owner.post(f"/t/acme/members/{cast.viewer.pk}/", {"action": "change_role", "role": "member"})
    owner.post(f"/t/acme/members/{cast.member.pk}/", {"action": "remove"})

    member_email = cast.member.user.email or cast.member.user.get_username()
    owner_email = cast.owner.user.email or cast.owner.user.get_username()
    assert log(cast.tenant)[-5:] == [
        ("key.issued", member_email, f"{laptop.masked} laptop"),
        ("member.invited", owner_email, "new@acme.example"),
        ("member.role_changed", owner_email,
         cast.viewer.user.email or cast.viewer.user.get_username()),
        ("key.revoked", owner_email, f"{laptop.masked} laptop"),
        ("member.removed", owner_email, member_email),
    ]
    removed = AuditEvent.objects.get(tenant=cast.tenant, action="member.removed")
    assert removed.detail == {"role": "member", "keys_revoked": [laptop.masked]}
    changed = AuditEvent.objects.get(tenant=cast.tenant, action="member.role_changed")
    assert changed.detail == {"from": "viewer", "to": "member"}
    assert not AuditEvent.objects.filter(target__contains=full_key[3:]).exists()  # no secret
    # The other tenant's log holds its own key's issue only.
    assert list(AuditEvent.objects.filter(tenant=cast.outsider_tenant)
                .values_list("action", flat=True)) == ["key.issued"]


def test_webhook_changes_name_the_key_or_member_and_keep_only_the_receivers_host(cast, settings):
    settings.SLUICE_WEBHOOK_ALLOW_PRIVATE = True
    admin_key = api_key_obj(cast.tenant, name="deploy", created_by=cast.admin.user)
    endpoint = webhook_endpoint_create(tenant=cast.tenant, url="http://127.0.0.1:9/h?token=s3cret",
                                       actor=admin_key)
    endpoint_id = endpoint.id
    webhook_endpoint_update(endpoint=endpoint, enabled=False, actor=cast.owner)
    webhook_endpoint_secret_rotate(endpoint=endpoint, actor=admin_key)
    webhook_endpoint_delete(endpoint=endpoint, actor=cast.owner)

    key_label = f"key {admin_key.masked} ({cast.admin.user.email or cast.admin.user.get_username()})"
    owner_label = cast.owner.user.email or cast.owner.user.get_username()
    events = AuditEvent.objects.filter(tenant=cast.tenant, action__startswith="webhook.")
    assert [(e.action, e.actor, e.target) for e in events.order_by("pk")] == [
        ("webhook.created", key_label, endpoint_id),
        ("webhook.updated", owner_label, endpoint_id),
        ("webhook.secret_rotated", key_label, endpoint_id),
        ("webhook.deleted", owner_label, endpoint_id),
    ]
    assert events.get(action="webhook.created").detail["host"] == "127.0.0.1"
    assert events.get(action="webhook.updated").detail == {"fields": ["enabled"], "enabled": False}
    assert "s3cret" not in str(list(events.values_list("detail", flat=True)))


def test_suspensions_name_sluice_or_its_staff_never_the_person(cast):
    from moderation.services import tenant_staff_suspend, tenant_staff_unsuspend

    staff = get_user_model().objects.create_user("ops", "ops@sluice.example", is_staff=True)
    tenant_staff_suspend(tenant=cast.tenant, user=staff)
    tenant_staff_unsuspend(tenant=cast.tenant, user=staff)
    tenant_suspend(tenant=cast.tenant, reason="moderation strikes")
    tenant_suspend(tenant=cast.tenant)  # already suspended: nothing changed, nothing recorded
    assert [(e.action, e.actor, e.detail) for e in AuditEvent.objects.order_by("pk")
            if e.action.startswith("tenant.")] == [
        ("tenant.suspended", "Sluice staff", {"reason": "suspended by Sluice staff"}),
        ("tenant.unsuspended", "Sluice staff", {"reason": "unsuspended by Sluice staff"}),
        ("tenant.suspended", "Sluice", {"reason": "moderation strikes"}),
    ]
    assert AuditEvent.objects.filter(actor_user=staff).count() == 2  # the platform knows who


def test_admins_read_the_log_members_may_not_and_outsiders_get_404(cast):
    login(cast.owner).post(f"/t/acme/members/{cast.viewer.pk}/",
                           {"action": "change_role", "role": "member"})
    page = login(cast.admin).get("/t/acme/audit/")
    assert page.status_code == 200
    body = page.content.decode()
    assert "member.role_changed" in body and "Audit log" in body
    filtered = login(cast.admin).get("/t/acme/audit/?action=key.issued").content.decode()
    assert "member.role_changed</code>" not in filtered
    assert login(cast.member).get("/t/acme/audit/").status_code == 403
    assert "/t/acme/audit/" not in login(cast.member).get("/t/acme/").content.decode()
    assert login(cast.outsider).get("/t/acme/audit/").status_code == 404
    assert "member.role_changed</code>" not in login(cast.outsider).get("/t/globex/audit/").content.decode()
