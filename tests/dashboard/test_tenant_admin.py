"""A tenant admin's bad input and edge cases on the dashboard: each gets a page with a message,
never a 500, and lands where the next step is."""

from __future__ import annotations

import pytest
from django.test import Client

from portal.models import ApiKey

pytestmark = pytest.mark.django_db


def as_user(user) -> Client:
    client = Client(raise_request_exception=False)  # a 500 is an answer to assert, not a raise
    client.force_login(user)
    return client


@pytest.mark.parametrize(("field", "value"), [
    ("cu_cap", "99999999999999999999"),  # past the bigint column
    ("cu_per_minute", "3000000000"),  # past the integer column
])
def test_a_huge_key_limit_is_a_form_error_not_a_500(cast, field, value):
    response = as_user(cast.admin.user).post("/t/acme/keys/", {"name": "big", field: value})
    assert response.status_code == 200
    assert "less than or equal to" in response.content.decode()
    assert not ApiKey.objects.filter(tenant=cast.tenant, name="big").exists()


def test_the_largest_key_limits_are_issued(cast):
    from portal.forms import API_KEY_CU_CAP_MAX, API_KEY_CU_PER_MINUTE_MAX

    response = as_user(cast.admin.user).post("/t/acme/keys/", {
        "name": "big", "cu_cap": API_KEY_CU_CAP_MAX, "cu_per_minute": API_KEY_CU_PER_MINUTE_MAX})
    assert response.status_code == 200
    key = ApiKey.objects.get(tenant=cast.tenant, name="big")
    assert (key.cu_cap, key.cu_per_minute) == (API_KEY_CU_CAP_MAX, API_KEY_CU_PER_MINUTE_MAX)

