"""The one admission decision: a single atomic Redis step (quotas/lua/admit.lua).

Checks together the period budget (and the key's cap), the tenant's and the key's CU/minute
token buckets, the tenant's concurrent-job cap and the pool's weighted semaphore, then
admits (budget reserved, pool capacity held), queues (async work: budget reserved, waiting
for capacity) or rejects with DESIGN.md's error.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import redis
from django.conf import settings
from django.utils import timezone

from portal.redis import lua_script
from quotas.cost import mcu_to_cu
from quotas.errors import InsufficientQuota, RateLimitExceeded, SystemOverloaded
from quotas.limits import (
    REJECTIONS_KEPT_S,
    CounterKeys,
    QuotaLimits,
    RateHeadroom,
    pool_capacity_mcu,
    pool_lease_s,
    pool_slots,
    rejections_key,
)

logger = logging.getLogger(__name__)

ADMITTED = "admitted"
QUEUED = "queued"
RESERVATION_TTL_S = 40 * 86_400  # outlives any period; the marker is deleted on release


class CountersMissing(Exception):
    """Redis has no counters for this tenant and period: rebuild them from the ledger."""


@dataclass(frozen=True)
class AdmissionTicket:
    reservation_id: str
    outcome: str  # ADMITTED | QUEUED
    cost_mcu: int
    budget_used_mcu: int
    rate: RateHeadroom | None  # the tenant's bucket just after this decision


def admission_decide(
    *,
    client: redis.Redis,
    keys: CounterKeys,
    limits: QuotaLimits,
    cost_mcu: int,
    mode: str,
    reservation_id: str,
    retry_after_s: int,
) -> AdmissionTicket:
    """Run admit.lua and translate its verdict; raises the error a rejection maps to."""
    result = lua_script(client, "admit")(
        keys=[
            keys.budget, keys.key_used, keys.tenant_tat, keys.key_tat, keys.in_flight,
            keys.pool_hash, keys.pool_zset, keys.pool_sum,
            f"q:r:{reservation_id}", keys.queued,
        ],
        args=[
            cost_mcu,
            -1 if limits.budget_mcu is None else limits.budget_mcu,
            -1 if limits.key_cap_mcu is None else limits.key_cap_mcu,
            limits.tenant_rate_mcu,
            limits.tenant_burst_mcu,
            limits.key_rate_mcu or -1,
            limits.key_burst_mcu or 0,
            limits.max_concurrent_jobs,
            pool_capacity_mcu(keys.pool),
            mode,
            pool_lease_s(keys.pool) * 1000,
            RESERVATION_TTL_S,
            reservation_id,
            keys.pool,
            retry_after_s * 1000,
            pool_slots(keys.pool),
        ],
    )
    outcome = result[0].decode() if isinstance(result[0], bytes) else result[0]
    retry_after_ms, used_mcu, remaining_mcu, reset_ms = (int(v) for v in result[1:5])
    if outcome == "miss":
        raise CountersMissing()
    rate = RateHeadroom.of_bucket(limits=limits, remaining_mcu=remaining_mcu, reset_ms=reset_ms)
    if outcome in (ADMITTED, QUEUED):
        return AdmissionTicket(
            reservation_id=reservation_id,
            outcome=outcome,
            cost_mcu=cost_mcu,
            budget_used_mcu=used_mcu,
            rate=rate,
        )
    rejection = _rejection(outcome, limits=limits, cost_mcu=cost_mcu, used_mcu=used_mcu,
                           retry_after_ms=retry_after_ms)
    rejection_record(client=client, code=rejection.code)
    raise rejection


def screening_rate_take(*, client: redis.Redis, tenant_id: int, characters: int) -> None:
    """`/v1/moderations` costs no CU (as OpenAI's) but its work is the classifier's CPU on the
    web tier, up to millions of characters a request: each tenant may screen
    SLUICE_MODERATIONS_CHARS_PER_MINUTE characters a minute (as much at once). 429
    rate_limit_exceeded beyond it. Fails open when Redis does not answer: the classifier needs
    no Redis, and a free endpoint should not fail for its bookkeeping."""
    rate = settings.SLUICE_MODERATIONS_CHARS_PER_MINUTE
    if characters > rate:
        rejection_record(client=client, code="rate_limit_exceeded")
        raise RateLimitExceeded(
            f"This request screens {characters:,} characters, more than the {rate:,} a minute "
            "your tenant may screen at once. Split it.", headers={"x-should-retry": "false"})
    try:
        allowed, retry_after_ms = lua_script(client, "bucket_take")(
            keys=[f"q:screen:{tenant_id}"], args=[characters, rate, rate])
    except redis.RedisError:
        logger.warning("screening rate of tenant %s not checked: Redis did not answer", tenant_id)
        return
    if not allowed:
        rejection_record(client=client, code="rate_limit_exceeded")
        retry_after_s = max(1, math.ceil(retry_after_ms / 1000))
        raise RateLimitExceeded(
            f"Rate limit reached: {rate:,} characters screened per minute. Retry in "
            f"{retry_after_s} s.", retry_after_s=retry_after_s)


def rejection_record(*, client: redis.Redis, code: str) -> None:
    """Count a rejection for the operator console. Every admission rejection passes here;
    a lost count must never turn into an error for the caller."""
    try:
        lua_script(client, "reject_count")(keys=[rejections_key(timezone.now())],
                                           args=[code, REJECTIONS_KEPT_S])
    except redis.RedisError:
        logger.warning("could not count a %s rejection", code)


def _rejection(outcome: str, *, limits: QuotaLimits, cost_mcu: int, used_mcu: int,
               retry_after_ms: int) -> Exception:
    cost = mcu_to_cu(cost_mcu)
    retry_after_s = max(1, math.ceil(retry_after_ms / 1000))
    if outcome == "insufficient_quota":
        return InsufficientQuota(
            f"This request needs {cost} CU; {mcu_to_cu(used_mcu)} of your "
            f"{mcu_to_cu(limits.budget_mcu or 0)} CU budget for this period is used or reserved."
        )
    if outcome == "key_cap":
        return InsufficientQuota(
            f"This request needs {cost} CU, more than is left under this API key's CU cap."
        )
    if outcome == "too_large":
        return RateLimitExceeded(
            f"This request needs {cost} CU, more than your CU-per-minute burst allows at once. "
            "Ask for fewer tokens, frames or steps."
        )
    if outcome == "rate_tenant":
        return RateLimitExceeded(
            f"Rate limit reached: {limits.tenant_rate_cu} CU per minute. Retry in {retry_after_s} s.",
            retry_after_s=retry_after_s,
        )
    if outcome == "rate_key":
        return RateLimitExceeded(
            f"Rate limit reached for this API key: {mcu_to_cu(limits.key_rate_mcu or 0)} CU per minute. "
            f"Retry in {retry_after_s} s.",
            retry_after_s=retry_after_s,
        )
    if outcome == "concurrency":
        return RateLimitExceeded(
            f"Too many concurrent jobs: your tier allows {limits.max_concurrent_jobs}.",
            retry_after_s=retry_after_s,
        )
    if outcome == "pool":
        return SystemOverloaded(retry_after_s=retry_after_s)
    raise ValueError(f"unknown admission outcome {outcome!r}")
