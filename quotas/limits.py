"""Who may spend how much how fast: limits resolved from tier, tenant and key, and the
Redis key names of the hot counters that enforce them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.conf import settings

from portal.models import ApiKey, Tenant
from quotas.cost import cu_to_mcu


@dataclass(frozen=True)
class QuotaLimits:
    budget_mcu: int | None  # None: unlimited
    tenant_rate_mcu: int  # per minute
    tenant_burst_mcu: int
    key_cap_mcu: int | None
    key_rate_mcu: int | None
    key_burst_mcu: int | None
    max_concurrent_jobs: int
    fail_open: bool

    @property
    def tenant_rate_cu(self) -> int:
        return self.tenant_rate_mcu // 1000


def quota_limits_for(*, tenant: Tenant, api_key: ApiKey | None = None) -> QuotaLimits:
    """Tier defaults, overridden per tenant (contracts) and narrowed per key."""
    tier = tenant.tier
    if tenant.unlimited_budget:
        budget_cu = None
    elif tenant.monthly_budget_cu_override is not None:
        budget_cu = tenant.monthly_budget_cu_override
    else:
        budget_cu = tier.monthly_budget_cu
    # Rates must be at least 1 (the model validators); a 0 saved before they existed keeps
    # meaning "not set" rather than a bucket that never refills.
    rate_cu = tenant.cu_per_minute_override or tier.cu_per_minute
    burst_cu = tenant.burst_cu_override or tier.burst_cu or rate_cu
    return QuotaLimits(
        budget_mcu=None if budget_cu is None else cu_to_mcu(budget_cu),
        tenant_rate_mcu=cu_to_mcu(rate_cu),
        tenant_burst_mcu=cu_to_mcu(burst_cu),
        # A cap of 0 is a cap (the key may spend nothing), not "no cap".
        key_cap_mcu=cu_to_mcu(api_key.cu_cap) if api_key and api_key.cu_cap is not None else None,
        key_rate_mcu=cu_to_mcu(api_key.cu_per_minute) if api_key and api_key.cu_per_minute else None,
        key_burst_mcu=cu_to_mcu(api_key.cu_per_minute) if api_key and api_key.cu_per_minute else None,
        max_concurrent_jobs=tenant.max_concurrent_jobs_override or tier.max_concurrent_jobs,
        fail_open=tier.fail_open,
    )


def pool_capacity_mcu(pool: str) -> int:
    return cu_to_mcu(settings.SLUICE_POOL_CAPACITY_CU.get(pool, 0))


def pool_slots(pool: str) -> int:
    """Jobs a pool runs at once (worker processes x engine batch), whatever their CU."""
    return settings.SLUICE_POOL_SLOTS.get(pool, 1_000_000)


def pool_lease_s(pool: str) -> int:
    return settings.SLUICE_POOL_LEASE_S.get(pool, 600)


# --- periods --------------------------------------------------------------------------------


def period_of(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m")


def period_bounds(period: str) -> tuple[datetime, datetime]:
    start = datetime.strptime(period, "%Y-%m").replace(tzinfo=UTC)
    end = (start + timedelta(days=32)).replace(day=1)
    return start, end


def counter_ttl_s(period: str, now: datetime) -> int:
    """Counters outlive their period by a day, then Redis drops them."""
    _, end = period_bounds(period)
    return max(60, int((end - now).total_seconds()) + 86_400)


# --- Redis key names --------------------------------------------------------------------------


# Key prefixes a script completes itself (the scheduler's dispatch round: inference/lua/).
IN_FLIGHT_PREFIX = "q:c:"  # + tenant id: the tenant's running reservations (id -> lease expiry)
RESERVATION_MARKER_PREFIX = "q:r:"  # + reservation id: its hash while Redis holds it


@dataclass(frozen=True)
class CounterKeys:
    tenant_id: int
    api_key_id: int
    period: str
    pool: str

    @property
    def budget(self) -> str:
        return f"q:b:{self.tenant_id}:{self.period}"

    @property
    def key_used(self) -> str:
        return key_used_counter(self.api_key_id, self.period)

    @property
    def tenant_tat(self) -> str:
        return f"q:rt:{self.tenant_id}"

    @property
    def key_tat(self) -> str:
        return f"q:rk:{self.api_key_id}"

    @property
    def in_flight(self) -> str:
        return f"{IN_FLIGHT_PREFIX}{self.tenant_id}"

    @property
    def queued(self) -> str:
        """The tenant's reservations admission queued for pool capacity, until their release
        (id -> marker expiry ms): admit.lua, settle.lua, a forced rebuild's read."""
        return f"q:cq:{self.tenant_id}"

    @property
    def pool_hash(self) -> str:
        return f"q:ph:{self.pool}"

    @property
    def pool_zset(self) -> str:
        return f"q:pz:{self.pool}"

    @property
    def pool_sum(self) -> str:
        return f"q:ps:{self.pool}"


def key_used_counter(api_key_id: int | None, period: str) -> str:
    return f"q:k:{api_key_id or 0}:{period}"


def reservation_marker(reservation_id: str) -> str:
    return f"{RESERVATION_MARKER_PREFIX}{reservation_id}"


@dataclass(frozen=True)
class RateHeadroom:
    """Where a tenant's CU/minute token bucket stands now."""

    limit_cu: int
    remaining_cu: int | None  # None: Redis did not answer
    reset_s: int | None  # seconds until the bucket is full again

    @classmethod
    def of_bucket(cls, *, limits: QuotaLimits, remaining_mcu: int, reset_ms: float) -> RateHeadroom:
        """From the bucket in its own units (mCU, ms), as admit.lua returns it after a decision
        and as rate_headroom reads it: whole CU, never above the burst, whole seconds up."""
        import math

        remaining_mcu = max(0, min(remaining_mcu, limits.tenant_burst_mcu))
        return cls(limit_cu=limits.tenant_rate_cu, remaining_cu=remaining_mcu // 1000,
                   reset_s=math.ceil(reset_ms / 1000))


def rate_headroom(*, tenant: Tenant, client) -> RateHeadroom:
    """Read the tenant's GCRA bucket (one GET, no writes): API headers and the dashboard."""
    import math
    import time

    import redis

    limits = quota_limits_for(tenant=tenant)
    try:
        stored = client.get(CounterKeys(tenant_id=tenant.pk, api_key_id=0, period="", pool="").tenant_tat)
    except redis.RedisError:
        return RateHeadroom(limit_cu=limits.tenant_rate_cu, remaining_cu=None, reset_s=None)
    now_ms = time.time() * 1000
    interval = 60_000 / limits.tenant_rate_mcu
    tat = max(float(stored) if stored is not None else now_ms, now_ms)
    remaining_mcu = math.floor((now_ms + limits.tenant_burst_mcu * interval - tat) / interval)
    return RateHeadroom.of_bucket(limits=limits, remaining_mcu=remaining_mcu, reset_ms=tat - now_ms)


def rate_limit_headers(*, headroom: RateHeadroom) -> dict[str, str]:
    """The x-ratelimit-*-cu headers for where the tenant's token bucket stands."""
    headers = {"x-ratelimit-limit-cu": str(headroom.limit_cu)}
    if headroom.remaining_cu is not None:
        headers["x-ratelimit-remaining-cu"] = str(headroom.remaining_cu)
        headers["x-ratelimit-reset-cu"] = str(headroom.reset_s)
    return headers


# Admission rejections per error code and UTC hour (operator console); kept two days.
REJECTIONS_KEPT_S = 48 * 3600


def rejections_key(hour: datetime) -> str:
    return f"q:rej:{hour.astimezone(UTC).strftime('%Y%m%d%H')}"
