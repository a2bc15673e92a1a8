"""Reads for the operator console: platform-wide on purpose (staff only), so unlike every
other selector these take no tenant."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from django.urls import NoReverseMatch, Resolver404, resolve, reverse
from django.utils import timezone
from redis import RedisError

from inference.scheduler import scheduler_depths, scheduler_pools
from portal.models import Tenant
from portal.redis import redis_client
from quotas.cost import mcu_to_cu
from quotas.limits import period_of, quota_limits_for
from quotas.selectors import PoolLoad, budget_used_by_tenant, pool_load, rejections_recent

logger = logging.getLogger(__name__)

# The console waits this long for workers to answer a ping; a silent worker counts as down.
WORKER_PING_TIMEOUT_S = 0.5
# One ping's answer serves every console page load in this process for this long: concurrent
# loads wait for the ping in flight instead of each broadcasting to every worker.
WORKER_PING_REUSE_S = 2.0
# The ping's connection gives up on a broker read after this long: above the 0.5 s its reply
# queue's BRPOP takes to come back empty, so only a broker that took the connection and then
# said nothing (stopped, hung) hits it. Without it the console waited for such a broker forever.
WORKER_PING_SOCKET_TIMEOUT_S = 1.0
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


def pools_state() -> list[PoolState] | None:
    """None while Redis does not answer: the console still renders, saying so (it answered 500
    during the outage an operator opens it for)."""
    client = redis_client()
    try:
        return [PoolState(load=pool_load(pool=pool, client=client), depths=scheduler_depths(pool=pool))
                for pool in scheduler_pools()]
    except RedisError:
        logger.warning("could not read the pools' state", exc_info=True)
        return None


_worker_ping_lock = threading.Lock()
_worker_ping_answer: tuple[float, list[str] | None] | None = None  # (monotonic time, answer)


def workers_alive() -> list[str] | None:
    """Names of the Celery workers that answered a ping; None if the broker is unreachable."""
    global _worker_ping_answer

    with _worker_ping_lock:
        if _worker_ping_answer and time.monotonic() - _worker_ping_answer[0] < WORKER_PING_REUSE_S:
            return _worker_ping_answer[1]
        answer = _workers_ping()
        _worker_ping_answer = (time.monotonic(), answer)
        return answer


def _workers_ping() -> list[str] | None:
    """A ping on a broker connection of its own, closed after it. On a pooled connection a ping
    left its last BRPOP (of its own, then deleted, reply queue) in flight for the rest of the Redis
    transport's brpop_timeout (1 s), and the next ping to take that connection could not send
    its own until it returned: its replies were read after ~0.5 s, often after its 0.5 s
    timeout, and the console listed no workers (measured: 3 of 15 back-to-back pings, 9 of 45
    in threes). With the BRPOP timeout at the ping's own, closing the connection (which reads
    the BRPOP in flight) costs no more wait.

    A broker that does not answer is said at once: one connection attempt, not kombu's retries
    for the broker connection's 4 s (each refused connect then slept 2 s: the console took 6 s to
    say the broker was down), which may take the ping's own 0.5 s to connect and
    WORKER_PING_SOCKET_TIMEOUT_S for each answer."""
    from portal.celery import app

    options = {"polling_interval": WORKER_PING_TIMEOUT_S, "max_retries": 0,
               "socket_connect_timeout": WORKER_PING_TIMEOUT_S,
               "socket_timeout": WORKER_PING_SOCKET_TIMEOUT_S}
    try:
        with app.connection_for_read(transport_options=options) as connection:
            replies = app.control.inspect(timeout=WORKER_PING_TIMEOUT_S, connection=connection).ping()
    except Exception:  # broker down: the console still renders, saying so
        logger.warning("could not ping workers", exc_info=True)
        return None
    return sorted(replies or {})


def admission_rejections(hours: int = 24) -> dict[str, int] | None:
    """None while Redis does not answer (like pools_state)."""
    try:
        return rejections_recent(client=redis_client(), hours=hours)
    except RedisError:
        logger.warning("could not read the admission rejections", exc_info=True)
        return None


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
