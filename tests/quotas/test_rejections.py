"""Admission rejections counted per error code and hour (quotas/lua/reject_count.lua), the
pools' load and tenants' period use as the operator console reads them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from portal.redis import redis_client
from quotas.admission import rejection_record
from quotas.errors import InsufficientQuota, RateLimitExceeded, SystemOverloaded
from quotas.ledger import reservation_open
from quotas.limits import REJECTIONS_KEPT_S, rejections_key
from quotas.selectors import budget_used_by_tenant, pool_load, rejections_recent
from tests.factories import api_key_obj, tenant_with_limits

POOL = "text-batch"


def open_cu(api_key, cu: float):
    return reservation_open(api_key=api_key, model_id="sluice-code-tiny", pool=POOL,
                            cost_mcu=int(cu * 1000), mode="sync")


@pytest.mark.django_db
def test_every_admission_rejection_is_counted_under_its_code(settings):
    settings.SLUICE_POOL_CAPACITY_CU = {POOL: 3}
    poor = api_key_obj(tenant_with_limits(budget_cu=2))
    with pytest.raises(InsufficientQuota):
        open_cu(poor, 5)
    slow = api_key_obj(tenant_with_limits(budget_cu=1000, rate_cu=2, burst_cu=2))
    open_cu(slow, 2)
    with pytest.raises(RateLimitExceeded):
        open_cu(slow, 1)
    busy = api_key_obj(tenant_with_limits(budget_cu=1000))
    open_cu(busy, 1)
    with pytest.raises(SystemOverloaded):
        open_cu(busy, 1)
    with pytest.raises(SystemOverloaded):
        open_cu(busy, 1)
    assert rejections_recent(client=redis_client()) == {
        "system_overloaded": 2, "insufficient_quota": 1, "rate_limit_exceeded": 1}
    assert 0 < redis_client().ttl(rejections_key(datetime.now(UTC))) <= REJECTIONS_KEPT_S


def test_rejections_are_summed_over_the_window_and_expire_by_hour():
    client = redis_client()
    now = datetime(2026, 11, 27, 12, 30, tzinfo=UTC)
    for hours_ago, code in [(0, "rate_limit_exceeded"), (5, "rate_limit_exceeded"), (30, "insufficient_quota")]:
        client.hincrby(rejections_key(now - timedelta(hours=hours_ago)), code, 1)
    assert rejections_recent(client=client, now=now) == {"rate_limit_exceeded": 2}
    assert rejections_recent(client=client, now=now, hours=48) == {
        "rate_limit_exceeded": 2, "insufficient_quota": 1}


def test_a_redis_outage_never_turns_a_count_into_an_error():
    import redis

    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.1)
    rejection_record(client=dead, code="insufficient_quota")  # logs, does not raise


@pytest.mark.django_db
def test_pool_load_and_tenant_use_this_period(settings):
    settings.SLUICE_POOL_CAPACITY_CU = {POOL: 10}
    settings.SLUICE_POOL_SLOTS = {POOL: 4}
    api_key = api_key_obj(tenant_with_limits(budget_cu=1000))
    open_cu(api_key, 3)
    open_cu(api_key, 2)
    load = pool_load(pool=POOL, client=redis_client())
    assert (load.in_flight_mcu, load.capacity_mcu, load.jobs_in_flight, load.slots) == (5000, 10000, 2, 4)
    assert load.used_pct == 50.0
    assert budget_used_by_tenant(period=datetime.now(UTC).strftime("%Y-%m"))[api_key.tenant_id] == 5000
