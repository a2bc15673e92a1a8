from __future__ import annotations

import importlib

import factory
from django.contrib.auth import get_user_model

from portal.models import Membership, Role, Tenant, Tier
from portal.services import api_key_issue

_seed_migration = importlib.import_module("portal.migrations.0002_seed_tiers")


def tier(slug: str) -> Tier:
    """The seeded tier; re-seeded when a transactional test flushed the table."""
    spec = next(t for t in _seed_migration.TIERS if t["slug"] == slug)
    found, _ = Tier.objects.get_or_create(slug=slug, defaults=spec)
    return found


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda u: f"{u.username}@example.com")
    password = factory.django.Password("correct horse battery staple")


class TenantFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Tenant

    name = factory.Sequence(lambda n: f"Tenant {n}")
    slug = factory.Sequence(lambda n: f"tenant-{n}")
    tier = factory.LazyFunction(lambda: tier("pro"))


class MembershipFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Membership

    user = factory.SubFactory(UserFactory)
    tenant = factory.SubFactory(TenantFactory)
    role = Role.MEMBER


def api_key_for(tenant: Tenant, *, name: str = "test key", **kwargs) -> str:
    return api_key_issue(tenant=tenant, name=name, **kwargs).full_key


def api_key_obj(tenant: Tenant, **kwargs):
    from portal.models import ApiKey

    full_key = api_key_for(tenant, **kwargs)
    return ApiKey.objects.select_related("tenant__tier").get(prefix=full_key[3:15])


def tenant_with_limits(*, tier_slug: str = "pro", **overrides) -> Tenant:
    """A tenant whose limits are overridden (budget in CU, rate in CU/min, burst, concurrency)."""
    fields = {
        "monthly_budget_cu_override": overrides.pop("budget_cu", None),
        "cu_per_minute_override": overrides.pop("rate_cu", None),
        "burst_cu_override": overrides.pop("burst_cu", None),
        "max_concurrent_jobs_override": overrides.pop("max_jobs", None),
    }
    assert not overrides, overrides
    return TenantFactory(tier=tier(tier_slug), **{k: v for k, v in fields.items() if v is not None})


VIDEO_JOB_PARAMS = {"prompt": "a red square", "width": 64, "height": 64, "frames": 5, "steps": 2,
                    "seconds": 0.5}


def video_job_submit(api_key, *, cu: float = 1.0, mode: str = "async", params: dict | None = None,
                     idempotency_key: str | None = None, request_body: dict | None = None):
    """A small video job costing `cu` through the real job_submit (admission, ledger rows,
    scheduler); returns its Submission."""
    from inference.registry import model_get
    from inference.services import job_submit
    from quotas.cost import CostEstimate

    spec = model_get("sluice-video-tiny")
    return job_submit(api_key=api_key, spec=spec, variant=spec.variant("full"),
                      params=VIDEO_JOB_PARAMS if params is None else params,
                      estimate=CostEstimate(mcu=round(cu * 1000)), mode=mode,
                      idempotency_key=idempotency_key, request_body=request_body)
