import pytest

from portal.models import ApiKey

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
