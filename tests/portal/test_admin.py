from html.parser import HTMLParser

import pytest
from django.contrib.admin.models import DELETION, LogEntry
from django.contrib.contenttypes.models import ContentType

from portal.models import ApiKey, Membership, Role, Tenant
from tests.factories import api_key_obj

pytestmark = pytest.mark.django_db


def test_admin_key_list_never_shows_digest_or_secret(admin_client, cast):
    key = ApiKey.objects.get(prefix=cast.owner_key[3:15])
    html = admin_client.get("/admin/portal/apikey/").content.decode()
    assert key.masked in html
    assert key.secret_digest not in html and cast.owner_key not in html
    change = admin_client.get(f"/admin/portal/apikey/{key.pk}/change/").content.decode()
    assert key.secret_digest not in change
    assert admin_client.get("/admin/portal/apikey/add/").status_code == 403


def test_admin_pages_for_tenancy_load(admin_client, cast):
    for url in ("/admin/portal/tier/", "/admin/portal/tenant/", "/admin/portal/membership/",
                f"/admin/portal/tenant/{cast.tenant.pk}/change/"):
        assert admin_client.get(url).status_code == 200, url


def test_staff_without_superuser_cannot_open_admin_models(client, cast):
    cast.member.user.is_staff = True
    cast.member.user.save(update_fields=["is_staff"])
    client.force_login(cast.member.user)
    assert client.get("/admin/portal/apikey/").status_code == 403


class _FormFields(HTMLParser):
    """The values a browser would post from the page's main form (inputs, selects, textareas)."""

    def __init__(self):
        super().__init__()
        self.data: dict[str, str] = {}
        self._select = self._textarea = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        name = attrs.get("name")
        if tag == "input" and name and attrs.get("type") not in ("submit", "button", "file"):
            if attrs.get("type") not in ("checkbox", "radio") or "checked" in attrs:
                self.data[name] = attrs.get("value") or ""
        elif tag == "select" and name:
            self._select = name
            self.data.setdefault(name, "")
        elif tag == "option" and self._select and "selected" in attrs:
            self.data[self._select] = attrs.get("value") or ""
        elif tag == "textarea" and name:
            self._textarea = name
            self.data[name] = ""

    def handle_endtag(self, tag):
        if tag == "select":
            self._select = None
        elif tag == "textarea":
            self._textarea = None

    def handle_data(self, data):
        if self._textarea:
            self.data[self._textarea] += data.lstrip("\n")


def form_fields(response) -> dict[str, str]:
    parser = _FormFields()
    parser.feed(response.content.decode())
    return parser.data


def change_messages(obj) -> list[str]:
    return [entry.get_change_message() for entry in LogEntry.objects.filter(
        content_type=ContentType.objects.get_for_model(obj), object_id=str(obj.pk))]


def test_the_tenant_form_cannot_change_its_status_only_the_actions_can(admin_client, cast, monkeypatch,
                                                                     django_capture_on_commit_callbacks):
    from portal import signals

    suspended = []
    monkeypatch.setattr(signals.tenant_suspended, "send", lambda **kw: suspended.append(kw["tenant"]))
    url = f"/admin/portal/tenant/{cast.tenant.pk}/change/"
    data = {**form_fields(admin_client.get(url)), "status": "suspended", "name": "Acme Renamed"}
    assert admin_client.post(url, data).status_code == 302
    cast.tenant.refresh_from_db()
    assert (cast.tenant.name, cast.tenant.status) == ("Acme Renamed", Tenant.Status.ACTIVE)

    action = {"action": "suspend", "_selected_action": [cast.tenant.pk]}
    with django_capture_on_commit_callbacks(execute=True):
        admin_client.post("/admin/portal/tenant/", action)
    cast.tenant.refresh_from_db()
    assert cast.tenant.is_suspended and [t.pk for t in suspended] == [cast.tenant.pk]
    admin_client.post("/admin/portal/tenant/", action)  # already suspended: nothing to record
    admin_client.post("/admin/portal/tenant/", {**action, "action": "unsuspend"})
    assert "Suspended (admin action)." in change_messages(cast.tenant)
    assert change_messages(cast.tenant).count("Suspended (admin action).") == 1
    assert "Unsuspended (admin action)." in change_messages(cast.tenant)


def test_revoking_keys_in_the_admin_is_recorded(admin_client, cast):
    key = ApiKey.objects.get(prefix=cast.owner_key[3:15])
    admin_client.post("/admin/portal/apikey/", {"action": "revoke", "_selected_action": [key.pk]})
    key.refresh_from_db()
    assert key.is_revoked and change_messages(key) == ["Revoked (admin action)."]


def test_the_admin_cannot_demote_or_remove_the_last_owner(admin_client, cast):
    url = f"/admin/portal/membership/{cast.owner.pk}/change/"
    response = admin_client.post(url, {**form_fields(admin_client.get(url)), "role": "viewer"})
    assert response.status_code == 200 and "A tenant needs at least one owner." in response.content.decode()
    assert admin_client.get(f"/admin/portal/membership/{cast.owner.pk}/delete/").status_code == 403
    changelist = "/admin/portal/membership/"
    assert "delete_selected" not in admin_client.get(changelist).content.decode()
    admin_client.post(changelist, {"action": "delete_selected", "_selected_action": [cast.owner.pk],
                                   "post": "yes"})
    admin_client.post(changelist, {"action": "remove", "_selected_action": [cast.owner.pk]})
    assert Membership.objects.get(pk=cast.owner.pk).role == Role.OWNER

    # Through the tenant's page, memberships are added only.
    tenant_url = f"/admin/portal/tenant/{cast.tenant.pk}/change/"
    data = form_fields(admin_client.get(tenant_url))
    owner_row = next(k[:-3] for k, v in data.items() if k.endswith("-id") and v == str(cast.owner.pk))
    response = admin_client.post(tenant_url, {**data, f"{owner_row}-DELETE": "on",
                                              f"{owner_row}-role": "viewer"})
    assert response.status_code == 302
    assert Membership.objects.get(pk=cast.owner.pk).role == Role.OWNER


def test_removing_a_member_in_the_admin_revokes_their_keys_and_is_recorded(admin_client, cast):
    key = api_key_obj(cast.tenant, name="member's", created_by=cast.member.user)
    admin_client.post("/admin/portal/membership/", {"action": "remove", "_selected_action": [cast.member.pk]})
    assert not Membership.objects.filter(pk=cast.member.pk).exists()
    key.refresh_from_db()
    assert key.is_revoked
    assert LogEntry.objects.filter(object_id=str(cast.member.pk), action_flag=DELETION).exists()

    url = f"/admin/portal/membership/{cast.admin.pk}/change/"
    admin_client.post(url, {**form_fields(admin_client.get(url)), "role": "viewer"})
    assert Membership.objects.get(pk=cast.admin.pk).role == Role.VIEWER


def user_delete_url(user) -> str:
    return f"/admin/auth/user/{user.pk}/delete/"


def test_the_admin_refuses_deleting_a_tenants_last_owner(admin_client, cast, api):
    refusal = "Acme (acme) would be left without an owner"
    page = admin_client.get(user_delete_url(cast.owner.user))
    assert refusal in page.content.decode()
    response = admin_client.post(user_delete_url(cast.owner.user), {"post": "yes"})
    assert response.status_code == 200 and refusal in response.content.decode()
    assert Membership.objects.get(pk=cast.owner.pk).role == Role.OWNER
    assert api.bearer(cast.owner_key).get("/v1/models").status_code == 200


def test_deleting_a_member_in_the_admin_removes_them_through_the_services(admin_client, cast, api):
    from portal.models import AuditEvent
    from tests.factories import MembershipFactory, TenantFactory, UserFactory, api_key_for

    member = cast.member.user
    MembershipFactory(tenant=cast.outsider_tenant, user=member, role=Role.MEMBER)
    acme_key = api_key_for(cast.tenant, name="member's laptop", created_by=member)
    globex_key = api_key_for(cast.outsider_tenant, name="member's ci", created_by=member)
    # A key from a tenant they left before removals revoked keys: it works to this day.
    left_tenant = TenantFactory(name="Initech", slug="initech")
    MembershipFactory(tenant=left_tenant, user=UserFactory(username="initech-owner"), role=Role.OWNER)
    left = MembershipFactory(tenant=left_tenant, user=member, role=Role.MEMBER)
    left_key = api_key_for(left_tenant, name="old", created_by=member)
    left.delete()

    assert admin_client.post(user_delete_url(member), {"post": "yes"}).status_code == 302

    assert not type(member).objects.filter(pk=member.pk).exists()
    assert [api.bearer(key).get("/v1/models").status_code for key in (acme_key, globex_key, left_key)] \
        == [401, 401, 401]
    assert api.bearer(cast.owner_key).get("/v1/models").status_code == 200
    assert api.bearer(cast.outsider_key).get("/v1/models").status_code == 200
    removed = AuditEvent.objects.get(tenant=cast.tenant, action=AuditEvent.Action.MEMBER_REMOVED)
    assert (removed.target, removed.actor, removed.actor_user.username) == (
        "member@example.com", "Sluice staff", "admin")
    assert removed.detail == {"role": "member", "keys_revoked": [acme_key[:15] + "…"]}
    assert AuditEvent.objects.filter(tenant=cast.outsider_tenant,
                                     action=AuditEvent.Action.MEMBER_REMOVED).exists()
    assert AuditEvent.objects.filter(tenant=left_tenant, action=AuditEvent.Action.KEY_REVOKED,
                                     detail={"reason": "its issuer's account was deleted"}).exists()
    assert LogEntry.objects.filter(object_id=str(member.pk), action_flag=DELETION).exists()


def test_bulk_deleting_users_in_the_admin_goes_through_the_services_too(admin_client, cast, api):
    from portal.models import AuditEvent
    from tests.factories import api_key_for

    Membership.objects.filter(pk=cast.admin.pk).update(role=Role.OWNER)
    owners = {"action": "delete_selected", "_selected_action": [cast.owner.user.pk, cast.admin.user.pk]}
    # Either alone may go; both would leave Acme without an owner.
    assert "Acme (acme) would be left without an owner" in admin_client.post(
        "/admin/auth/user/", owners).content.decode()
    admin_client.post("/admin/auth/user/", {**owners, "post": "yes"})
    assert Membership.objects.filter(tenant=cast.tenant, role=Role.OWNER).count() == 2

    member_key = api_key_for(cast.tenant, name="member's laptop", created_by=cast.member.user)
    members = {"action": "delete_selected", "_selected_action": [cast.member.user.pk, cast.viewer.user.pk],
               "post": "yes"}
    assert admin_client.post("/admin/auth/user/", members).status_code == 302
    assert set(Membership.objects.filter(tenant=cast.tenant).values_list("user__username", flat=True)) \
        == {"owner", "admin1"}
    assert api.bearer(member_key).get("/v1/models").status_code == 401
    assert sorted(AuditEvent.objects.filter(tenant=cast.tenant, action=AuditEvent.Action.MEMBER_REMOVED)
                  .values_list("target", flat=True)) == ["member@example.com", "viewer@example.com"]


def test_deleting_an_account_that_history_names_is_refused_deactivating_it_is_not(admin_client, client, cast):
    from django.contrib.auth.models import Permission
    from django.utils import timezone

    from moderation.models import CaseDecision, ModerationCase
    from moderation.services import case_decide
    from tests.factories import UserFactory

    ops = UserFactory(username="ops", is_staff=True, is_superuser=True)
    client.force_login(ops)
    key = ApiKey.objects.get(prefix=cast.owner_key[3:15])
    client.post("/admin/portal/apikey/", {"action": "revoke", "_selected_action": [key.pk]})
    ops_log = list(LogEntry.objects.filter(user=ops).values_list("pk", flat=True))
    assert ops_log

    moderator = UserFactory(username="moderator")
    moderator.user_permissions.add(Permission.objects.get(codename="review_case"))
    case = ModerationCase.objects.create(
        tenant=cast.tenant, action="blocked", category="injection", score=0.99, policy_slug="standard",
        prompt_expires_at=timezone.now())
    decision = case_decide(case=case, moderator=moderator, decision="uphold", note="a strike")

    for user in (ops, moderator):
        page = admin_client.post(user_delete_url(user), {"post": "yes"}).content.decode()
        assert "Deactivate it instead" in page, user
    bulk = {"action": "delete_selected", "_selected_action": [ops.pk, moderator.pk], "post": "yes"}
    assert "Deactivate it instead" in admin_client.post("/admin/auth/user/", bulk).content.decode()

    assert type(ops).objects.filter(pk__in=[ops.pk, moderator.pk]).count() == 2
    assert list(LogEntry.objects.filter(user=ops).values_list("pk", flat=True)) == ops_log
    assert CaseDecision.objects.get(pk=decision.pk).moderator == moderator

    url = f"/admin/auth/user/{ops.pk}/change/"
    data = {k: v for k, v in form_fields(admin_client.get(url)).items() if k not in ("is_active", "groups", "user_permissions")}
    assert admin_client.post(url, data).status_code == 302
    ops.refresh_from_db()
    assert not ops.is_active
    assert client.get("/admin/portal/apikey/").status_code == 302  # its session signs in no more


def tenant_delete_url(tenant) -> str:
    return f"/admin/portal/tenant/{tenant.pk}/delete/"


def test_deleting_a_tenant_with_history_is_refused_in_the_admin_and_everywhere(admin_client, cast, api,
                                                                             sent_tasks):
    """Deleting a tenant cascaded to its ledger, jobs, moderation cases and suspensions: its bill
    and its audit trail. It is refused, by the page, the bulk action, the service and the
    shell alike, with the way out (suspend it); nothing goes."""
    from django.db import transaction
    from django.db.models import ProtectedError
    from django.utils import timezone

    from inference.models import Job
    from moderation.models import ModerationCase, TenantSuspension
    from moderation.services import tenant_staff_suspend
    from portal.errors import InvalidParameter
    from quotas.models import LedgerEntry
    from tests.factories import UserFactory, video_job_submit

    video_job_submit(ApiKey.objects.select_related("tenant__tier").get(prefix=cast.owner_key[3:15]))
    ModerationCase.objects.create(tenant=cast.outsider_tenant, action="blocked", category="injection",
                                  score=0.99, policy_slug="standard", prompt_expires_at=timezone.now())
    tenant_staff_suspend(tenant=cast.outsider_tenant, user=UserFactory(username="ops", is_staff=True))
    kept = (LedgerEntry.objects.count(), Job.objects.count(), ModerationCase.objects.count(),
            TenantSuspension.objects.count())
    assert kept[0] and all(kept)

    acme_refusal = "Acme (acme) has ledger entries, budget reservations, jobs: deleting the tenant would"
    globex_refusal = "Globex (globex) has moderation cases, suspensions"
    page = admin_client.get(tenant_delete_url(cast.tenant)).content.decode()
    assert acme_refusal in page and "Suspend it instead" in page
    response = admin_client.post(tenant_delete_url(cast.tenant), {"post": "yes"})
    assert response.status_code == 200 and acme_refusal in response.content.decode()
    bulk = {"action": "delete_selected", "_selected_action": [cast.tenant.pk, cast.outsider_tenant.pk],
            "post": "yes"}
    page = admin_client.post("/admin/portal/tenant/", bulk).content.decode()
    assert acme_refusal in page and globex_refusal in page

    from portal.services import tenant_delete

    with pytest.raises(InvalidParameter, match="Suspend it instead"):
        tenant_delete(tenant=cast.tenant)
    # Each in a transaction of its own, as the shell's autocommit runs it: Django's delete
    # leaves its caller's transaction unusable once the guard refused it.
    with pytest.raises(ProtectedError, match="suspend the tenant instead"), transaction.atomic():
        cast.outsider_tenant.delete()
    with pytest.raises(ProtectedError), transaction.atomic():
        Tenant.objects.filter(pk=cast.tenant.pk).delete()

    assert Tenant.objects.filter(pk__in=[cast.tenant.pk, cast.outsider_tenant.pk]).count() == 2
    assert (LedgerEntry.objects.count(), Job.objects.count(), ModerationCase.objects.count(),
            TenantSuspension.objects.count()) == kept
    assert api.bearer(cast.owner_key).get("/v1/models").status_code == 200
    assert not LogEntry.objects.filter(content_type=ContentType.objects.get_for_model(Tenant),
                                       action_flag=DELETION).exists()


def test_a_tenant_without_history_is_deleted_in_the_admin_its_keys_revoked_first(admin_client, cast, api):
    from django.db.models.signals import pre_delete

    from tests.factories import MembershipFactory, TenantFactory, UserFactory, api_key_for

    def fresh(slug: str) -> tuple[Tenant, str]:
        tenant = TenantFactory(name=slug.title(), slug=slug)
        owner = MembershipFactory(tenant=tenant, role=Role.OWNER, user=UserFactory(username=f"{slug}-owner"))
        return tenant, api_key_for(tenant, created_by=owner.user)

    revoked_when_deleted = {}

    def record(sender, instance, **kwargs):
        revoked_when_deleted[instance.masked] = instance.revoked_at is not None

    pre_delete.connect(record, sender=ApiKey, dispatch_uid="test.revoked_when_deleted")
    try:
        initech, initech_key = fresh("initech")
        page = admin_client.get(tenant_delete_url(initech)).content.decode()
        assert "Suspend it instead" not in page and 'name="post"' in page
        assert admin_client.post(tenant_delete_url(initech), {"post": "yes"}).status_code == 302
        assert not Tenant.objects.filter(pk=initech.pk).exists()
        assert api.bearer(initech_key).get("/v1/models").status_code == 401
        assert revoked_when_deleted == {initech_key[:15] + "…": True}
        assert LogEntry.objects.filter(object_id=str(initech.pk), action_flag=DELETION).exists()
        assert type(cast.owner.user).objects.filter(username="initech-owner").exists()  # the account stays

        (hooli, hooli_key), (umbrella, umbrella_key) = fresh("hooli"), fresh("umbrella")
        bulk = {"action": "delete_selected", "_selected_action": [hooli.pk, umbrella.pk]}
        assert "Suspend it instead" not in admin_client.post("/admin/portal/tenant/", bulk).content.decode()
        assert admin_client.post("/admin/portal/tenant/", {**bulk, "post": "yes"}).status_code == 302
        assert not Tenant.objects.filter(pk__in=[hooli.pk, umbrella.pk]).exists()
        assert revoked_when_deleted[hooli_key[:15] + "…"] and revoked_when_deleted[umbrella_key[:15] + "…"]
    finally:
        pre_delete.disconnect(dispatch_uid="test.revoked_when_deleted", sender=ApiKey)
    assert Tenant.objects.filter(pk__in=[cast.tenant.pk, cast.outsider_tenant.pk]).count() == 2
    assert api.bearer(cast.owner_key).get("/v1/models").status_code == 200
