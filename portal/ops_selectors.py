"""Reads for the operator console: platform-wide on purpose (staff only), so unlike every
other selector these take no tenant."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from django.urls import NoReverseMatch, Resolver404, resolve, reverse
from django.utils import timezone

from inference.scheduler import scheduler_depths, scheduler_pools
from portal.models import Tenant
from portal.redis import redis_client
from quotas.cost import mcu_to_cu
from quotas.limits import period_of, quota_limits_for
from quotas.selectors import PoolLoad, budget_used_by_tenant, pool_load, rejections_recent

logger = logging.getLogger(__name__)

# The console waits this long for workers to answer a ping; a silent worker counts as down.
WORKER_PING_TIMEOUT_S = 0.5
MODERATION_QUEUE_PATH = "/moderation/"


@dataclass(frozen=True)
class TenantUsage:
    tenant: Tenant
    used_cu: float
    budget_cu: float | None

    @property
    def used_pct(self) -> float | None:
        return round(100 * self.used_cu / self.budget_cu, 1) if self.budget_cu else None


def tenants_with_usage() -> tuple[str, list[TenantUsage]]:
    period = period_of(timezone.now())
    used = budget_used_by_tenant(period=period)
    rows = []
    for tenant in Tenant.objects.select_related("tier").order_by("name"):
        budget_mcu = quota_limits_for(tenant=tenant).budget_mcu
        rows.append(TenantUsage(tenant=tenant, used_cu=mcu_to_cu(used.get(tenant.pk, 0)),
                                budget_cu=None if budget_mcu is None else mcu_to_cu(budget_mcu)))
    return period, rows


@dataclass(frozen=True)
class PoolState:
    load: PoolLoad
    depths: dict[int, int]  # queued jobs per priority, highest first

    @property
    def queued(self) -> int:
        return sum(self.depths.values())


def pools_state() -> list[PoolState]:
    client = redis_client()
    return [PoolState(load=pool_load(pool=pool, client=client), depths=scheduler_depths(pool=pool))
            for pool in scheduler_pools()]


def workers_alive() -> list[str] | None:
    """Names of the Celery workers that answered a ping; None if the broker is unreachable."""
    from portal.celery import app

    try:
        replies = app.control.inspect(timeout=WORKER_PING_TIMEOUT_S).ping() or {}
    except Exception:  # broker down: the console still renders, saying so
        logger.warning("could not ping workers")
        return None
    return sorted(replies)


def admission_rejections(hours: int = 24) -> dict[str, int]:
    return rejections_recent(client=redis_client(), hours=hours)


def moderation_queue_url() -> str | None:
    """The moderation review queue, once the moderation app routes it; None until then."""
    try:
        return reverse("moderation-queue")
    except NoReverseMatch:
        pass
    try:
        resolve(MODERATION_QUEUE_PATH)
    except Resolver404:
        return None
    return MODERATION_QUEUE_PATH
