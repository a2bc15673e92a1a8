"""Shared fixtures: a clean Redis database per test, and the cast of every view test.

The cast (STYLE.md): an owner and a read-only member (viewer) of one tenant, and an outsider
who owns another tenant and must get 404 for everything of the first.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from rest_framework.test import APIClient

from portal.models import Membership, Role, Tenant
from portal.redis import redis_client
from tests.factories import MembershipFactory, TenantFactory, UserFactory, api_key_for, tier


@pytest.fixture(autouse=True)
def clean_redis():
    client = redis_client()
    client.flushdb()
    yield client


@dataclass
class Cast:
    tenant: Tenant
    owner: Membership
    admin: Membership
    member: Membership
    viewer: Membership
    outsider_tenant: Tenant
    outsider: Membership
    owner_key: str
    outsider_key: str


@pytest.fixture
def cast(db) -> Cast:
    tenant = TenantFactory(name="Acme", slug="acme", tier=tier("pro"))
    outsider_tenant = TenantFactory(name="Globex", slug="globex", tier=tier("pro"))
    return Cast(
        tenant=tenant,
        owner=MembershipFactory(tenant=tenant, role=Role.OWNER, user=UserFactory(username="owner")),
        admin=MembershipFactory(tenant=tenant, role=Role.ADMIN, user=UserFactory(username="admin1")),
        member=MembershipFactory(tenant=tenant, role=Role.MEMBER, user=UserFactory(username="member")),
        viewer=MembershipFactory(tenant=tenant, role=Role.VIEWER, user=UserFactory(username="viewer")),
        outsider_tenant=outsider_tenant,
        outsider=MembershipFactory(
            tenant=outsider_tenant, role=Role.OWNER, user=UserFactory(username="outsider")
        ),
        owner_key=api_key_for(tenant),
        outsider_key=api_key_for(outsider_tenant),
    )


@pytest.fixture
def api():
    """An API client; `api.bearer(key)` sets the Authorization header."""
    client = APIClient()

    def bearer(key: str | None) -> APIClient:
        if key is None:
            client.credentials()
        else:
            client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
        return client

    client.bearer = bearer
    return client


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    # PBKDF2's deliberate slowness is for production; tests create many users.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
