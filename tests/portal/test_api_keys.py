from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from portal.models import ApiKey, Tenant
from portal.services import api_key_issue, api_key_revoke, tenant_suspend
from tests.factories import api_key_for

pytestmark = pytest.mark.django_db

UNAUTHORIZED_BODY = {
    "error": {
        "type": "authentication_error",
        "code": "invalid_api_key",
        "message": "Incorrect API key provided.",
        "param": None,
    }
}


def test_issued_key_is_shown_once_and_only_its_digest_is_stored(cast):
    issued = api_key_issue(tenant=cast.tenant, name="ci")
    assert issued.full_key.startswith("sk-") and len(issued.full_key) == 3 + 12 + 40
    secret = issued.full_key[3 + 12 :]
    row = ApiKey.objects.get(pk=issued.api_key.pk)
    assert row.prefix == issued.full_key[3:15]
    assert secret not in row.secret_digest and len(row.secret_digest) == 64
    # No column of the table holds the secret in any form we could read back.
    with connection.cursor() as cursor:
        cursor.execute("SELECT * FROM portal_apikey WHERE id = %s", [row.pk])
        assert not any(secret in str(value) for value in cursor.fetchone())
    assert secret not in str(row) and secret not in row.masked


def test_valid_key_authenticates_and_records_last_use(cast, api):
    response = api.bearer(cast.owner_key).get("/v1/models")
    assert response.status_code == 200
    key = ApiKey.objects.get(prefix=cast.owner_key[3:15])
    assert key.last_used_at is not None
    first_use = key.last_used_at
    api.get("/v1/models")
    key.refresh_from_db()
    assert key.last_used_at == first_use  # written at most once a minute, not per request


@pytest.mark.parametrize(
    "header",
    [
        "Bearer sk-",
        "Bearer nonsense",
        "Bearer sk-short",
        "Bearer sk-UPPERCASEPFX" + "a" * 40,
        "Bearer sk-abcdefghijkl" + "a" * 39 + "!",
        "Basic dXNlcjpwYXNz",
        "Bearer",
        "Bearer two tokens",
    ],
)
def test_malformed_keys_get_the_same_401(cast, api, header):
    response = api.get("/v1/models", HTTP_AUTHORIZATION=header)
    assert response.status_code == 401
    assert response.json() == UNAUTHORIZED_BODY
    assert response["WWW-Authenticate"].startswith("Bearer")


def test_unknown_prefix_and_wrong_secret_get_the_same_401(cast, api):
    unknown = "sk-" + "z" * 12 + "A" * 40
    wrong_secret = cast.owner_key[:15] + "B" * 40
    for key in (unknown, wrong_secret):
        response = api.bearer(key).get("/v1/models")
        assert response.status_code == 401
        assert response.json() == UNAUTHORIZED_BODY


def test_missing_key_is_401_invalid_api_key(api, db):
    response = api.get("/v1/models")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert "x-request-id" in response


def test_revoked_key_is_refused(cast, api):
    key = ApiKey.objects.get(prefix=cast.owner_key[3:15])
    api_key_revoke(api_key=key)
    first_revocation = ApiKey.objects.get(pk=key.pk).revoked_at
    api_key_revoke(api_key=key)
    assert ApiKey.objects.get(pk=key.pk).revoked_at == first_revocation
    response = api.bearer(cast.owner_key).get("/v1/models")
    assert response.status_code == 401
    assert response.json() == UNAUTHORIZED_BODY


def test_expired_key_is_refused(cast, api):
    full_key = api_key_for(cast.tenant, expires_at=timezone.now() + timedelta(seconds=30))
    assert api.bearer(full_key).get("/v1/models").status_code == 200
    ApiKey.objects.filter(prefix=full_key[3:15]).update(expires_at=timezone.now() - timedelta(seconds=1))
    response = api.get("/v1/models")
    assert response.status_code == 401
    assert response.json() == UNAUTHORIZED_BODY


def test_suspended_tenant_gets_403_tenant_suspended(cast, api):
    tenant_suspend(tenant=cast.tenant)
    response = api.bearer(cast.owner_key).get("/v1/models")
    assert response.status_code == 403
    assert response.json()["error"] == {
        "type": "permission_error",
        "code": "tenant_suspended",
        "message": "This tenant is suspended. Contact support to have it reviewed.",
        "param": None,
    }
    # The other tenant is unaffected.
    assert api.bearer(cast.outsider_key).get("/v1/models").status_code == 200
    assert Tenant.objects.get(pk=cast.tenant.pk).is_suspended


def test_issue_rejects_bad_input(cast):
    from portal.errors import InvalidParameter

    with pytest.raises(InvalidParameter) as exc:
        api_key_issue(tenant=cast.tenant, name="   ")
    assert exc.value.param == "name"
    with pytest.raises(InvalidParameter) as exc:
        api_key_issue(tenant=cast.tenant, name="x", expires_at=timezone.now() - timedelta(days=1))
    assert exc.value.param == "expires_at"
    with pytest.raises(InvalidParameter) as exc:
        api_key_issue(tenant=cast.tenant, name="x", cu_cap=0)
    assert exc.value.param == "cu_cap"


def test_request_id_is_generated_or_echoed(cast, api):
    generated = api.bearer(cast.owner_key).get("/v1/models")
    assert generated["x-request-id"].startswith("req_")
    echoed = api.get("/v1/models", HTTP_X_REQUEST_ID="client-trace-42")
    assert echoed["x-request-id"] == "client-trace-42"
    unsafe = api.get("/v1/models", HTTP_X_REQUEST_ID="bad id\nwith newline")
    assert unsafe["x-request-id"].startswith("req_")
