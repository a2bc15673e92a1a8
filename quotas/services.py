"""Quotes and budget status: what a request would cost, and where a tenant stands."""

from __future__ import annotations

from dataclasses import dataclass

import redis
from django.utils import timezone

from inference.registry import ModelSpec, ModelVariant, model_get, variant_for_tier
from inference.requests import text_request_parse, video_request_parse
from portal.errors import InvalidParameter
from portal.models import Tenant
from portal.redis import redis_client
from quotas.cost import CostEstimate, mcu_to_cu, text_cost, video_cost
from quotas.ledger import budget_threshold_reached, budget_used_from_ledger
from quotas.limits import CounterKeys, period_of, quota_limits_for
from quotas.models import BudgetAlert


@dataclass(frozen=True)
class Quote:
    spec: ModelSpec
    variant: ModelVariant
    estimate: CostEstimate


def quote_build(*, tenant: Tenant, payload: dict) -> Quote:
    """Price a chat/completion or video payload exactly as admission will, without running it."""
    if not isinstance(payload.get("model"), str):
        raise InvalidParameter("model: This field is required.", param="model")
    kind = model_get(payload["model"]).kind
    if kind == "text":
        request = text_request_parse(payload=payload, tier=tenant.tier)
        variant = variant_for_tier(request.spec, tenant.tier)
        estimate = text_cost(spec=request.spec, variant=variant,
                             prompt_tokens=request.prompt_tokens, completion_tokens=request.max_tokens)
        return Quote(spec=request.spec, variant=variant, estimate=estimate)
    request = video_request_parse(payload=payload, tier=tenant.tier)
    estimate = video_cost(spec=request.spec, width=request.width, height=request.height,
                          frames=request.frames, steps=request.steps)
    return Quote(spec=request.spec, variant=request.spec.variant("full"), estimate=estimate)


@dataclass(frozen=True)
class BudgetStatus:
    period: str
    limit_mcu: int | None
    used_mcu: int  # settled charges plus open reservations
    # The highest soft-limit threshold passed this period that the use still reaches (a budget
    # raised or made unlimited since leaves it None: the alert was recorded, the banner goes).
    alert_pct: int | None = None

    @property
    def used_cu(self) -> float:
        return mcu_to_cu(self.used_mcu)

    @property
    def limit_cu(self) -> float | None:
        return None if self.limit_mcu is None else mcu_to_cu(self.limit_mcu)

    @property
    def used_pct(self) -> float | None:
        if self.limit_mcu is None:
            return None
        if self.limit_mcu == 0:  # nothing may be spent: all of it is used
            return 100.0
        return round(100 * self.used_mcu / self.limit_mcu, 1)


def budget_status(*, tenant: Tenant, now=None) -> BudgetStatus:
    period = period_of(now or timezone.now())
    limits = quota_limits_for(tenant=tenant)
    budget_key = CounterKeys(tenant_id=tenant.pk, api_key_id=0, period=period, pool="").budget
    try:
        hot = redis_client().get(budget_key)
    except redis.RedisError:
        hot = None
    used = int(hot) if hot is not None else budget_used_from_ledger(tenant_id=tenant.pk, period=period)[0]
    alert_pct = None
    if limits.budget_mcu is not None:
        alert_pct = next((pct for pct in BudgetAlert.objects.filter(tenant=tenant, period=period)
                          .order_by("-threshold_pct").values_list("threshold_pct", flat=True)
                          if budget_threshold_reached(used_mcu=used, limit_mcu=limits.budget_mcu,
                                                      threshold_pct=pct)), None)
    return BudgetStatus(period=period, limit_mcu=limits.budget_mcu, used_mcu=used, alert_pct=alert_pct)
