"""Deactivating an account (the admin's Active box, its "Deactivate" action, user_deactivate)
revokes every key the account created; its sessions, already open ones included, sign in no
more; ticking Active again restores no key."""

from __future__ import annotations

import threading
import time

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.db import connection, transaction
from django.test import Client

from portal import services
from portal.errors import PermissionDenied
from portal.models import ApiKey, AuditEvent, Role
from tests.factories import MembershipFactory, UserFactory, api_key_for
from tests.portal.test_admin import change_messages, form_fields

DEACTIVATED = "its issuer's account was deactivated"


def user_change_url(user) -> str:
    return f"/admin/auth/user/{user.pk}/change/"


def user_form(admin_client, user, *, active: bool) -> dict:
    """The user's change form as a browser posts it, Active ticked or not (an unticked box is
    not posted; the empty multi-selects neither)."""
    data = {k: v for k, v in form_fields(admin_client.get(user_change_url(user))).items()
            if k not in ("is_active", "groups", "user_permissions")}
    return {**data, "is_active": "on"} if active else data


def flashed(response) -> list[str]:
    return [str(message) for message in response.context["messages"]]


def key_answer(api, key: str) -> tuple[int, str | None]:
    response = api.bearer(key).get("/v1/models")
    return response.status_code, None if response.status_code == 200 else response.json()["error"]["code"]


def revocations(tenant) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(tenant=tenant, action=AuditEvent.Action.KEY_REVOKED).order_by("pk"))


@pytest.mark.django_db
def test_unticking_active_in_the_admin_revokes_the_keys_the_account_created(admin_client, cast, api):
    member = cast.member.user
    MembershipFactory(tenant=cast.outsider_tenant, user=member, role=Role.MEMBER)
    acme_key = api_key_for(cast.tenant, name="member's laptop", created_by=member)
    globex_key = api_key_for(cast.outsider_tenant, name="member's ci", created_by=member)
    colleague_key = api_key_for(cast.tenant, name="admin's", created_by=cast.admin.user)
    assert key_answer(api, acme_key) == key_answer(api, globex_key) == (200, None)

    response = admin_client.post(user_change_url(member), user_form(admin_client, member, active=False),
                                 follow=True)

    assert response.status_code == 200
    member.refresh_from_db()
    assert not member.is_active
    assert key_answer(api, acme_key) == key_answer(api, globex_key) == (401, "invalid_api_key")
    assert (f"member is deactivated; revoked 2 key(s) it created: {acme_key[:15]}…, {globex_key[:15]}…. "
            "Ticking Active again restores no key: revoked keys stay revoked, the person issues new "
            "ones.") in flashed(response)
    # Keys others created, in the same tenant and elsewhere, keep working.
    for key in (cast.owner_key, colleague_key, cast.outsider_key):
        assert key_answer(api, key) == (200, None)
    for tenant, key in ((cast.tenant, acme_key), (cast.outsider_tenant, globex_key)):
        [event] = revocations(tenant)
        assert (event.target.split()[0], event.detail, event.actor, event.actor_user.username) == (
            key[:15] + "…", {"reason": DEACTIVATED}, "Sluice staff", "admin")

    # Saving the inactive account again changes nothing, and says nothing about keys.
    revoked_at = dict(ApiKey.objects.filter(created_by=member).values_list("prefix", "revoked_at"))
    again = admin_client.post(user_change_url(member), user_form(admin_client, member, active=False),
                              follow=True)
    assert not any("deactivated" in message for message in flashed(again))
    assert dict(ApiKey.objects.filter(created_by=member).values_list("prefix", "revoked_at")) == revoked_at
    assert len(revocations(cast.tenant)) == len(revocations(cast.outsider_tenant)) == 1

    # Ticking Active again restores no key; a key issued afterwards works.
    admin_client.post(user_change_url(member), user_form(admin_client, member, active=True))
    member.refresh_from_db()
    assert member.is_active
    assert key_answer(api, acme_key) == (401, "invalid_api_key")
    assert key_answer(api, api_key_for(cast.tenant, name="new laptop", created_by=member)) == (200, None)


@pytest.mark.django_db
def test_the_deactivate_action_revokes_each_accounts_keys_once(admin_client, cast, api):
    member_key = api_key_for(cast.tenant, name="member's", created_by=cast.member.user)
    # Deactivated before deactivating revoked keys: its key works until staff deactivate it again.
    former = UserFactory(username="former")
    MembershipFactory(tenant=cast.tenant, user=former, role=Role.MEMBER)
    former_key = api_key_for(cast.tenant, name="former's", created_by=former)
    type(former).objects.filter(pk=former.pk).update(is_active=False)
    action = {"action": "deactivate", "_selected_action": [cast.member.user.pk, former.pk]}

    response = admin_client.post("/admin/auth/user/", action, follow=True)

    assert flashed(response) == [
        "Deactivated 1 account(s) (1 inactive already); revoked 2 key(s) they created. Ticking Active "
        "again restores no key: revoked keys stay revoked, the person issues new ones."]
    assert not type(former).objects.filter(pk__in=[former.pk, cast.member.user.pk], is_active=True).exists()
    assert key_answer(api, member_key) == key_answer(api, former_key) == (401, "invalid_api_key")
    assert key_answer(api, cast.owner_key) == (200, None)
    assert [event.detail for event in revocations(cast.tenant)] == [{"reason": DEACTIVATED}] * 2
    assert change_messages(cast.member.user) == ["Deactivated (admin action); revoked 1 key(s)."]

    again = admin_client.post("/admin/auth/user/", action, follow=True)
    assert flashed(again)[0].startswith("Deactivated 0 account(s) (2 inactive already); revoked 0 key(s)")
    assert len(revocations(cast.tenant)) == 2
    assert change_messages(cast.member.user) == ["Deactivated (admin action); revoked 1 key(s)."]


@pytest.mark.django_db
def test_an_inactive_account_issues_no_keys(cast):
    member = cast.member.user
    assert services.user_deactivate(user=member, actor=None) == []
    with pytest.raises(PermissionDenied):
        services.api_key_issue(tenant=cast.tenant, name="after", created_by=member)
    assert not ApiKey.objects.filter(created_by=member).exists()


@pytest.mark.django_db
def test_a_deactivated_accounts_open_dashboard_session_is_refused(admin_client, cast):
    browser = Client()
    browser.force_login(cast.member.user)
    assert browser.get("/t/acme/").status_code == 200

    admin_client.post(user_change_url(cast.member.user),
                      user_form(admin_client, cast.member.user, active=False))

    page = browser.get("/t/acme/")
    assert page.status_code == 302 and page.url.startswith("/accounts/login/")
    assert browser.post("/t/acme/keys/", {"name": "after"}).status_code == 302
    assert not ApiKey.objects.filter(created_by=cast.member.user).exists()


@pytest.mark.django_db(transaction=True)
async def test_a_deactivated_accounts_session_opens_no_live_job_feed(cast):
    from portal.asgi import application

    def session_cookie(user) -> list[tuple[bytes, bytes]]:
        client = Client()
        client.force_login(user)
        return [(b"cookie", f"sessionid={client.cookies['sessionid'].value}".encode())]

    headers = await sync_to_async(session_cookie)(cast.member.user)
    await sync_to_async(services.user_deactivate)(user=cast.member.user, actor=None)
    feed = WebsocketCommunicator(application, "/ws/tenants/acme/jobs/", headers=headers)
    await feed.connect()
    assert await feed.receive_output(timeout=5) == {"type": "websocket.close", "code": 4401}


def _waiting_on_locks() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                       "AND wait_event_type = 'Lock'")
        return cursor.fetchone()[0]


@pytest.mark.django_db(transaction=True)
def test_a_key_issued_while_the_account_is_deactivated_is_refused_not_left_working(cast):
    """The issuer's dashboard request passed its login check before staff deactivated the account
    and issues the key while the deactivation's transaction is still open: it waits for it and
    is refused (before, the key landed after the revocation and kept working)."""
    if connection.vendor != "postgresql":
        pytest.skip("row locks and concurrent transactions need PostgreSQL")
    member = cast.member.user
    deactivated, release = threading.Event(), threading.Event()
    outcome: dict[str, object] = {}

    def deactivate() -> None:
        try:
            with transaction.atomic():  # the admin's form: the save and the revocations, then commit
                services.user_deactivate(user=member, actor=None)
                deactivated.set()
                release.wait(60)
        finally:
            connection.close()

    def issue() -> None:
        try:
            outcome["key"] = services.api_key_issue(tenant=cast.tenant, name="racing", created_by=member)
        except PermissionDenied as exc:
            outcome["refused"] = exc
        finally:
            connection.close()

    staff = threading.Thread(target=deactivate)
    staff.start()
    assert deactivated.wait(30)
    issuer = threading.Thread(target=issue)
    issuer.start()
    deadline = time.monotonic() + 30
    while issuer.is_alive() and _waiting_on_locks() < 1:
        assert time.monotonic() < deadline, "the key's issue neither ended nor waited"
        time.sleep(0.02)
    release.set()
    staff.join(30)
    issuer.join(30)

    assert "refused" in outcome
    assert not ApiKey.objects.filter(created_by=member, revoked_at__isnull=True).exists()
