"""Demo data for `make run`: one tenant per tier, a superuser who owns them, a key each.

Keys and the password are shown once, so every run issues fresh ones and revokes the
previous run's demo keys (a demo key printed in an old terminal stops working).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from portal.models import ApiKey, Membership, Role, Tenant, Tier
from portal.services import api_key_issue, membership_visit

DEMO_USERNAME = "admin"
DEMO_KEY_NAME = "Demo key (make run)"
DEMO_TENANTS = [("demo-free", "Demo Free", "free"), ("demo-pro", "Demo Pro", "pro"),
                ("demo-enterprise", "Demo Enterprise", "enterprise")]
# make run prints this tier's key as "Demo API key", and the dashboard opens on its tenant.
DEMO_PRINTED_TIER = "pro"


@dataclass(frozen=True)
class DemoCredentials:
    username: str
    password: str
    keys_by_tier: dict[str, str]


def demo_seed() -> DemoCredentials:
    User = get_user_model()
    password = secrets.token_urlsafe(12)
    keys_by_tier: dict[str, str] = {}
    with transaction.atomic():
        admin, _ = User.objects.get_or_create(
            username=DEMO_USERNAME, defaults={"email": "admin@sluice.local"}
        )
        admin.is_staff = True
        admin.is_superuser = True
        admin.set_password(password)
        admin.save(update_fields=["is_staff", "is_superuser", "password"])
        for slug, name, tier_slug in DEMO_TENANTS:
            tenant, _ = Tenant.objects.get_or_create(
                slug=slug, defaults={"name": name, "tier": Tier.objects.get(slug=tier_slug)}
            )
            membership, _ = Membership.objects.get_or_create(
                user=admin, tenant=tenant, defaults={"role": Role.OWNER}
            )
            if tier_slug == DEMO_PRINTED_TIER:
                membership_visit(membership=membership)
            ApiKey.objects.filter(tenant=tenant, name=DEMO_KEY_NAME, revoked_at__isnull=True).update(
                revoked_at=timezone.now()
            )
            issued = api_key_issue(tenant=tenant, name=DEMO_KEY_NAME, created_by=admin)
            keys_by_tier[tier_slug] = issued.full_key
    return DemoCredentials(username=DEMO_USERNAME, password=password, keys_by_tier=keys_by_tier)
