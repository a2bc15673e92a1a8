import re

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from portal.models import ApiKey, Membership, Role
from tests.factories import api_key_for, tier

pytestmark = pytest.mark.django_db

PAGES = ["/t/acme/", "/t/acme/keys/", "/t/acme/members/"]


def login(client: Client, membership: Membership) -> Client:
    client.force_login(membership.user)
    return client


def test_pages_require_login(client, cast):
    for page in PAGES:
        response = client.get(page)
        assert response.status_code == 302 and "/accounts/login/" in response["Location"]


@pytest.mark.parametrize("role", ["owner", "admin", "member", "viewer"])
def test_every_role_can_view_every_page(client, cast, role):
    login(client, getattr(cast, role))
    for page in PAGES:
        assert client.get(page).status_code == 200, page


def test_outsider_gets_404_on_every_page_and_action(client, cast):
    login(client, cast.outsider)
    key = ApiKey.objects.filter(tenant=cast.tenant).first()
    for page in PAGES:
        assert client.get(page).status_code == 404, page
    assert client.post("/t/acme/keys/", {"name": "x"}).status_code == 404
    assert client.post(f"/t/acme/keys/{key.pk}/revoke/").status_code == 404
    assert client.post(f"/t/acme/members/{cast.owner.pk}/", {"action": "remove"}).status_code == 404
    # Through the outsider's own tenant, the other tenant's objects do not exist either.
    assert client.post(f"/t/globex/keys/{key.pk}/revoke/").status_code == 404
    assert client.post(
        f"/t/globex/members/{cast.owner.pk}/", {"action": "change_role", "role": "viewer"}
    ).status_code == 404
    key.refresh_from_db()
    assert key.revoked_at is None
    assert Membership.objects.get(pk=cast.owner.pk).role == Role.OWNER


def test_member_creates_a_key_shown_exactly_once(client, cast):
    login(client, cast.member)
    response = client.post("/t/acme/keys/", {"name": "laptop"})
    assert response.status_code == 200
    assert response["Cache-Control"] == "no-store"
    full_key = re.search(r'value="(sk-[A-Za-z0-9]+)"', response.content.decode()).group(1)
    created = ApiKey.objects.get(tenant=cast.tenant, name="laptop")
    assert created.created_by == cast.member.user
    assert full_key.startswith(f"sk-{created.prefix}")
    assert full_key not in client.get("/t/acme/keys/").content.decode()
    # The key works against the API.
    assert Client().get("/v1/models", HTTP_AUTHORIZATION=f"Bearer {full_key}").status_code == 200


def test_viewer_cannot_create_or_revoke_keys(client, cast):
    login(client, cast.viewer)
    assert client.post("/t/acme/keys/", {"name": "sneaky"}).status_code == 403
    assert not ApiKey.objects.filter(name="sneaky").exists()
    key = ApiKey.objects.filter(tenant=cast.tenant).first()
    assert client.post(f"/t/acme/keys/{key.pk}/revoke/").status_code == 403
    key.refresh_from_db()
    assert key.revoked_at is None


def test_member_revokes_only_own_keys_admin_revokes_any(client, cast):
    login(client, cast.member)
    client.post("/t/acme/keys/", {"name": "mine"})
    mine = ApiKey.objects.get(name="mine")
    someone_elses = ApiKey.objects.filter(tenant=cast.tenant).exclude(pk=mine.pk).first()
    assert client.post(f"/t/acme/keys/{someone_elses.pk}/revoke/").status_code == 403
    assert client.post(f"/t/acme/keys/{mine.pk}/revoke/").status_code == 302
    mine.refresh_from_db()
    assert mine.revoked_at is not None

    admin_client = login(Client(), cast.admin)
    assert admin_client.post(f"/t/acme/keys/{someone_elses.pk}/revoke/").status_code == 302
    someone_elses.refresh_from_db()
    assert someone_elses.revoked_at is not None
    assert Client().get("/v1/models", HTTP_AUTHORIZATION=f"Bearer {cast.owner_key}").status_code == 401


def test_key_revoke_is_post_only(client, cast):
    login(client, cast.owner)
    key = ApiKey.objects.filter(tenant=cast.tenant).first()
    assert client.get(f"/t/acme/keys/{key.pk}/revoke/").status_code == 405


@pytest.mark.parametrize("role", ["member", "viewer"])
def test_members_and_viewers_cannot_manage_members(client, cast, role):
    login(client, getattr(cast, role))
    response = client.post(
        f"/t/acme/members/{cast.viewer.pk}/", {"action": "change_role", "role": "admin"}
    )
    assert response.status_code == 403
    assert Membership.objects.get(pk=cast.viewer.pk).role == Role.VIEWER
    assert client.post("/t/acme/members/", {"email": "new@example.com", "role": "member"}).status_code == 403


SET_PASSWORD_LINK = re.compile(r"(http://testserver/accounts/set-password/\S+)")


def set_password_with(link: str, password: str) -> None:
    anonymous = Client()
    form_page = anonymous.get(link, follow=True)
    assert form_page.status_code == 200
    post_url = form_page.redirect_chain[-1][0] if form_page.redirect_chain else link
    done = anonymous.post(post_url, {"new_password1": password, "new_password2": password})
    assert done.status_code == 302


def test_admin_invites_a_new_person_who_sets_a_password_from_the_mail(client, cast, mailoutbox):
    login(client, cast.admin)
    response = client.post("/t/acme/members/", {"email": "newbie@example.com", "role": "member"})
    assert response.status_code == 200
    assert "set-password" not in response.content.decode(), "the link goes to the address only"
    assert "mailed them the invitation" in response.content.decode()
    new_user = get_user_model().objects.get(email="newbie@example.com")
    assert not new_user.has_usable_password()
    assert Membership.objects.get(user=new_user, tenant=cast.tenant).role == Role.MEMBER

    (mail,) = mailoutbox
    assert mail.to == ["newbie@example.com"] and not mail.cc and not mail.bcc
    assert "Acme" in mail.subject
    set_password_with(SET_PASSWORD_LINK.search(mail.body).group(1), "A-long-pass-phrase-9")
    assert Client().login(username="newbie@example.com", password="A-long-pass-phrase-9")


def test_admin_invites_an_existing_user_who_is_mailed_without_a_link(client, cast, mailoutbox):
    login(client, cast.admin)
    response = client.post("/t/acme/members/", {"email": cast.outsider.user.email, "role": "viewer"})
    assert response.status_code == 200
    assert Membership.objects.get(user=cast.outsider.user, tenant=cast.tenant).role == Role.VIEWER
    (mail,) = mailoutbox
    assert mail.to == [cast.outsider.user.email]
    assert "set-password" not in mail.body and "/accounts/login/" in mail.body


def test_an_inviter_cannot_take_over_the_account_another_tenant_will_invite(client, cast, mailoutbox):
    """Globex's owner invites an Acme address: the account it makes is only usable through the
    mail to that address, so Acme's later invitation cannot hand Acme to Globex's owner."""
    address = "cfo@acme.example"
    login(client, cast.outsider)
    page = client.post("/t/globex/members/", {"email": address, "role": "viewer"}).content.decode()
    assert "set-password" not in page
    again = client.post("/t/globex/members/", {"email": address, "role": "viewer"}).content.decode()
    assert "sent them a new link" in again and "set-password" not in again
    assert [mail.to for mail in mailoutbox] == [[address], [address]]

    login(client, cast.owner)
    client.post("/t/acme/members/", {"email": address, "role": "admin"})
    assert mailoutbox[-1].to == [address]
    cfo = get_user_model().objects.get(email=address)
    assert not cfo.has_usable_password(), "nobody but the address's owner has chosen a password"
    assert Membership.objects.get(user=cfo, tenant=cast.tenant).role == Role.ADMIN
    # The address's owner uses the newest link and is in.
    set_password_with(SET_PASSWORD_LINK.search(mailoutbox[-1].body).group(1), "Chosen-by-the-cfo-7")
    cfo_client = Client()
    assert cfo_client.login(username=address, password="Chosen-by-the-cfo-7")
    assert cfo_client.get("/t/acme/keys/").status_code == 200


def test_inviting_a_member_again_who_has_a_password_is_refused(client, cast, mailoutbox):
    login(client, cast.admin)
    response = client.post("/t/acme/members/", {"email": cast.viewer.user.email, "role": "admin"})
    assert "is already a member" in response.content.decode()
    assert Membership.objects.get(pk=cast.viewer.pk).role == Role.VIEWER
    assert mailoutbox == []


def test_a_mail_that_cannot_be_sent_keeps_the_member_and_inviting_again_resends(client, cast, settings,
                                                                             mailoutbox):
    from portal.embedded_redis import free_port

    login(client, cast.admin)
    # A real SMTP connection to a port nobody listens on.
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT = "127.0.0.1", free_port()
    page = client.post("/t/acme/members/", {"email": "later@example.com", "role": "member"}).content.decode()
    assert "could not be sent" in page and "set-password" not in page
    assert Membership.objects.filter(tenant=cast.tenant, user__email="later@example.com").exists()

    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    page = client.post("/t/acme/members/", {"email": "later@example.com", "role": "member"}).content.decode()
    assert "sent them a new link" in page
    (mail,) = mailoutbox
    assert mail.to == ["later@example.com"] and SET_PASSWORD_LINK.search(mail.body)


def test_only_owners_grant_or_touch_ownership(client, cast):
    login(client, cast.admin)
    assert client.post(
        f"/t/acme/members/{cast.member.pk}/", {"action": "change_role", "role": "owner"}
    ).status_code == 403
    assert client.post(
        f"/t/acme/members/{cast.owner.pk}/", {"action": "change_role", "role": "viewer"}
    ).status_code == 403
    assert client.post(
        f"/t/acme/members/{cast.viewer.pk}/", {"action": "change_role", "role": "member"}
    ).status_code == 302
    assert Membership.objects.get(pk=cast.viewer.pk).role == Role.MEMBER
    assert Membership.objects.get(pk=cast.member.pk).role == Role.MEMBER
    assert Membership.objects.get(pk=cast.owner.pk).role == Role.OWNER

    owner_client = login(Client(), cast.owner)
    assert owner_client.post(
        f"/t/acme/members/{cast.admin.pk}/", {"action": "change_role", "role": "owner"}
    ).status_code == 302
    assert Membership.objects.get(pk=cast.admin.pk).role == Role.OWNER


def test_the_members_page_offers_only_what_the_viewer_may_do(client, cast):
    """An admin was offered "owner" in every role menu and controls on the owner's row, each a
    403 when used: the page now offers only the roles and rows the services allow."""
    page = login(client, cast.admin).get("/t/acme/members/").content.decode()
    invite_menu = re.search(r'<select name="role"[^>]*>(.*?)</select>', page, re.S).group(1)
    assert 'value="owner"' not in invite_menu and 'value="admin"' in invite_menu
    assert f'id="role-{cast.owner.pk}"' not in page, "the owner's row has no role menu for an admin"
    assert f'id="role-{cast.member.pk}"' in page
    member_menu = re.search(rf'<select id="role-{cast.member.pk}"[^>]*>(.*?)</select>', page, re.S).group(1)
    assert 'value="owner"' not in member_menu
    # A forged post of the hidden choice is still refused by the form, and nobody is added.
    response = client.post("/t/acme/members/", {"email": "boss@example.com", "role": "owner"})
    assert response.status_code == 200 and not Membership.objects.filter(user__email="boss@example.com").exists()

    page = login(Client(), cast.owner).get("/t/acme/members/").content.decode()
    invite_menu = re.search(r'<select name="role"[^>]*>(.*?)</select>', page, re.S).group(1)
    assert 'value="owner"' in invite_menu
    assert f'id="role-{cast.admin.pk}"' in page


def test_the_last_owner_cannot_be_demoted_or_removed(client, cast):
    login(client, cast.owner)
    client.post(f"/t/acme/members/{cast.owner.pk}/", {"action": "change_role", "role": "admin"})
    client.post(f"/t/acme/members/{cast.owner.pk}/", {"action": "remove"})
    assert Membership.objects.get(pk=cast.owner.pk).role == Role.OWNER


def test_forms_require_csrf(cast):
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(cast.owner.user)
    assert browser.post("/t/acme/keys/", {"name": "no-token"}).status_code == 403
    assert not ApiKey.objects.filter(name="no-token").exists()
    page = browser.get("/t/acme/keys/")
    token = page.cookies["csrftoken"].value
    response = browser.post("/t/acme/keys/", {"name": "with-token", "csrfmiddlewaretoken": token})
    assert response.status_code == 200
    assert ApiKey.objects.filter(name="with-token").exists()


def test_tenant_switcher_lists_only_own_tenants(client, cast):
    Membership.objects.create(user=cast.member.user, tenant=cast.outsider_tenant, role=Role.VIEWER)
    login(client, cast.member)
    html = client.get("/t/acme/").content.decode()
    assert 'value="acme"' in html and 'value="globex"' in html
    viewer_html = login(Client(), cast.viewer).get("/t/acme/").content.decode()
    assert 'value="globex"' not in viewer_html
    # Home remembers the last tenant visited.
    client.get("/t/globex/")
    assert client.get("/")["Location"] == "/t/globex/"


def test_api_key_of_one_tenant_never_lists_anothers(cast, api):
    api_key_for(cast.outsider_tenant, name="globex-secret-name")
    browser = login(Client(), cast.owner)
    assert "globex-secret-name" not in browser.get("/t/acme/keys/").content.decode()


def test_overview_shows_budget_use_and_the_80_percent_banner(client, cast):
    from portal.models import ApiKey
    from quotas.ledger import reservation_open

    cast.tenant.monthly_budget_cu_override = 10
    cast.tenant.save(update_fields=["monthly_budget_cu_override"])
    login(client, cast.viewer)
    html = client.get("/t/acme/").content.decode()
    assert "0.0% used" in html and "alert at" not in html
    api_key = ApiKey.objects.select_related("tenant__tier").get(prefix=cast.owner_key[3:15])
    reservation_open(api_key=api_key, model_id="sluice-code-tiny", pool="text-batch",
                     cost_mcu=8500, mode="sync")
    html = client.get("/t/acme/").content.decode()
    assert "85.0% used" in html and "alert at 80%" in html
    assert "8.5 of 10 CU" in html  # the figures, not only their ratio


def test_the_budget_banner_goes_once_a_raised_budget_leaves_the_use_under_its_threshold(client, cast):
    # The alert is recorded once per period; the banner said "used 0.0% (alert at 80%)" for
    # the rest of the month after the budget was raised (or made unlimited).
    from portal.models import ApiKey
    from quotas.ledger import reservation_open

    cast.tenant.monthly_budget_cu_override = 10
    cast.tenant.save(update_fields=["monthly_budget_cu_override"])
    api_key = ApiKey.objects.select_related("tenant__tier").get(prefix=cast.owner_key[3:15])
    reservation_open(api_key=api_key, model_id="sluice-code-tiny", pool="text-batch",
                     cost_mcu=8500, mode="sync")
    login(client, cast.viewer)
    assert "alert at 80%" in client.get("/t/acme/").content.decode()
    cast.tenant.monthly_budget_cu_override = 1000
    cast.tenant.save(update_fields=["monthly_budget_cu_override"])
    assert "alert at" not in client.get("/t/acme/").content.decode()
    cast.tenant.unlimited_budget = True
    cast.tenant.save(update_fields=["unlimited_budget"])
    assert "alert at" not in client.get("/t/acme/").content.decode()
    cast.tenant.unlimited_budget = False
    cast.tenant.monthly_budget_cu_override = 10
    cast.tenant.save(update_fields=["unlimited_budget", "monthly_budget_cu_override"])
    assert "alert at 80%" in client.get("/t/acme/").content.decode()


def test_overview_shows_an_unlimited_budgets_use_in_cu(client, cast):
    from portal.models import ApiKey
    from quotas.ledger import reservation_open

    cast.tenant.tier = tier("enterprise")
    cast.tenant.save(update_fields=["tier"])
    api_key = ApiKey.objects.select_related("tenant__tier").get(prefix=cast.owner_key[3:15])
    reservation_open(api_key=api_key, model_id="sluice-code-tiny", pool="text-batch",
                     cost_mcu=12345, mode="sync")
    login(client, cast.viewer)
    html = client.get("/t/acme/").content.decode()
    assert "unlimited" in html and "12.345 CU used" in html


def test_removing_a_member_says_which_of_their_keys_were_revoked(client, cast):
    api_key_for(cast.tenant, name="ci runner", created_by=cast.member.user)
    login(client, cast.admin)
    response = client.post(f"/t/acme/members/{cast.member.pk}/", {"action": "remove"}, follow=True)
    assert "Removed member and revoked the 1 API key they created: ci runner." in response.content.decode()
    assert ApiKey.objects.get(name="ci runner").revoked_at is not None


def test_overview_counts_usable_keys_and_the_tenants_own_job_cap(client, cast):
    from datetime import timedelta

    from django.utils import timezone

    expired = ApiKey.objects.get(prefix=api_key_for(cast.tenant, name="old")[3:15])
    ApiKey.objects.filter(pk=expired.pk).update(expires_at=timezone.now() - timedelta(days=1))
    revoked = ApiKey.objects.get(prefix=api_key_for(cast.tenant, name="gone")[3:15])
    ApiKey.objects.filter(pk=revoked.pk).update(revoked_at=timezone.now())
    api_key_for(cast.tenant, name="later", expires_at=timezone.now() + timedelta(days=1))
    cast.tenant.max_concurrent_jobs_override = 3
    cast.tenant.save(update_fields=["max_concurrent_jobs_override"])
    html = login(client, cast.viewer).get("/t/acme/").content.decode()
    assert "2 active keys" in html  # the cast's key and "later"
    assert "at most 3 at once" in html


def test_after_logging_in_a_member_of_several_tenants_lands_on_the_one_they_last_visited(cast):
    """Home opened the first tenant by name whatever the user had been doing; now it opens the
    last one they switched to, across logins, and before any visit one they own."""
    from tests.factories import TenantFactory, tier

    user = cast.member.user  # a member of Acme
    zeta = TenantFactory(name="Zeta", slug="zeta", tier=tier("pro"))
    Membership.objects.create(user=user, tenant=zeta, role=Role.OWNER)
    assert login(Client(), cast.member).get("/")["Location"] == "/t/zeta/"  # owned, not by name

    browser = login(Client(), cast.member)
    browser.get("/t/acme/keys/")
    assert browser.get("/")["Location"] == "/t/acme/"
    assert login(Client(), cast.member).get("/")["Location"] == "/t/acme/"  # a new login too
    browser.get("/t/zeta/")
    assert login(Client(), cast.member).get("/")["Location"] == "/t/zeta/"
    # Another user's visits do not move this one's landing.
    Membership.objects.create(user=cast.outsider.user, tenant=cast.tenant, role=Role.VIEWER)
    login(Client(), cast.outsider).get("/t/acme/")
    assert login(Client(), cast.member).get("/")["Location"] == "/t/zeta/"
    # Leaving the tenant one last visited lands on another.
    Membership.objects.filter(user=user, tenant=zeta).delete()
    assert browser.get("/")["Location"] == "/t/acme/"


def test_the_demo_user_lands_on_the_tenant_of_the_key_make_run_prints(db, api):
    from portal.demo import DEMO_PRINTED_TIER, DEMO_USERNAME, demo_seed

    for _run in range(2):  # a second make run on the same database, after browsing elsewhere
        credentials = demo_seed()
        browser = Client()
        assert browser.login(username=DEMO_USERNAME, password=credentials.password)
        landing = browser.get("/")["Location"]
        assert landing == "/t/demo-pro/"
        browser.get("/t/demo-enterprise/")
    from portal.keys import key_material_parse

    printed = key_material_parse(credentials.keys_by_tier[DEMO_PRINTED_TIER])
    assert ApiKey.objects.get(prefix=printed.prefix, revoked_at__isnull=True).tenant.slug == "demo-pro"
    assert api.bearer(credentials.keys_by_tier[DEMO_PRINTED_TIER]).get("/v1/usage").status_code == 200
