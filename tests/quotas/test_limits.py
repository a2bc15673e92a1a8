"""Limits below their meaning: a budget or cap of 0 blocks spending, a negative one is refused
(admit.lua reads a negative limit as none), and a CU/minute rate is at least 1."""

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.test import Client

from portal.models import ApiKey, Tier
from quotas.errors import InsufficientQuota
from quotas.ledger import reservation_open
from quotas.limits import quota_limits_for
from tests.factories import api_key_obj, tenant_with_limits, tier

pytestmark = pytest.mark.django_db


def open_cu(api_key, cu: float):
    return reservation_open(api_key=api_key, model_id="sluice-code-tiny", pool="text-batch",
                            cost_mcu=int(cu * 1000), mode="sync")


def test_a_key_cap_of_zero_blocks_the_key():
    api_key = api_key_obj(tenant_with_limits(budget_cu=1000))
    ApiKey.objects.filter(pk=api_key.pk).update(cu_cap=0)  # the admin allows it
    api_key.refresh_from_db()
    assert quota_limits_for(tenant=api_key.tenant, api_key=api_key).key_cap_mcu == 0
    with pytest.raises(InsufficientQuota):
        open_cu(api_key, 1)


def test_a_budget_of_zero_blocks_the_tenant_and_the_overview_says_so(cast):
    from portal.models import Membership

    poor = tenant_with_limits(budget_cu=0)
    with pytest.raises(InsufficientQuota):
        open_cu(api_key_obj(poor), 1)
    browser = Client()
    browser.force_login(Membership.objects.create(user=cast.viewer.user, tenant=poor).user)
    html = browser.get(f"/t/{poor.slug}/").content.decode()
    assert "None" not in html and "no budget" in html


@pytest.mark.parametrize("field, value", [("monthly_budget_cu", -1), ("cu_per_minute", 0)])
def test_the_admin_refuses_a_negative_budget_and_a_zero_rate(field, value):
    row = tier("pro")
    setattr(row, field, value)
    with pytest.raises(ValidationError) as refused:
        row.full_clean()
    assert field in refused.value.message_dict


def test_the_admin_refuses_negative_tenant_and_key_limits():
    tenant = tenant_with_limits()
    tenant.monthly_budget_cu_override = -1
    with pytest.raises(ValidationError) as refused:
        tenant.full_clean()
    assert "monthly_budget_cu_override" in refused.value.message_dict
    api_key = api_key_obj(tenant_with_limits())
    api_key.cu_cap = -5
    with pytest.raises(ValidationError) as refused:
        api_key.full_clean()
    assert "cu_cap" in refused.value.message_dict


@pytest.mark.parametrize("update", [
    lambda: Tier.objects.filter(slug="pro").update(monthly_budget_cu=-1),
    lambda: Tier.objects.filter(slug="pro").update(cu_per_minute=0),
    lambda: type(tenant_with_limits()).objects.update(monthly_budget_cu_override=-1),
    lambda: ApiKey.objects.update(cu_cap=-1),
])
def test_the_database_refuses_them_too(update):
    tier("pro")
    api_key_obj(tenant_with_limits())
    with pytest.raises(IntegrityError), transaction.atomic():
        update()
