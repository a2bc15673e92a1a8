"""Reads for webhooks. Another tenant's endpoint or delivery is NotFound, like a missing one."""

from __future__ import annotations

from django.db.models import Prefetch, QuerySet

from inference.webhook_models import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from portal.db import Page, page_after
from portal.errors import NotFound
from portal.models import Tenant


def webhook_endpoints_for_tenant(*, tenant: Tenant) -> QuerySet[WebhookEndpoint]:
    return WebhookEndpoint.objects.filter(tenant=tenant)


def webhook_endpoint_get_for_tenant(*, tenant: Tenant, endpoint_id: str) -> WebhookEndpoint:
    endpoint = WebhookEndpoint.objects.filter(tenant=tenant, pk=endpoint_id).first()
    if endpoint is None:
        raise NotFound()
    return endpoint


def webhook_deliveries_for_endpoint(
    *, tenant: Tenant, endpoint: WebhookEndpoint
) -> QuerySet[WebhookDelivery]:
    """Newest first, with the event and the attempt log loaded."""
    return (
        WebhookDelivery.objects.filter(endpoint__tenant=tenant, endpoint=endpoint)
        .order_by("-created_at", "-pk")  # one order for every page, ties too
        .select_related("event")
        .prefetch_related(
            Prefetch("log", queryset=WebhookAttempt.objects.order_by("-number"))
        )
    )


def webhook_deliveries_page_for_endpoint(
    *, tenant: Tenant, endpoint: WebhookEndpoint, status: str | None = None,
    after: str | None = None, order: str = "desc", limit: int = 20,
) -> Page:
    """A page of the endpoint's delivery log in id order (ids are ULIDs: their creation's), after
    the delivery `after`, as the jobs list pages (a log that grows while it is read never
    repeats or skips a delivery, as an offset did)."""
    deliveries = webhook_deliveries_for_endpoint(tenant=tenant, endpoint=endpoint)
    if status:
        deliveries = deliveries.filter(status=status)
    return page_after(deliveries, after=after, order=order, limit=limit)


def webhook_delivery_get_for_tenant(*, tenant: Tenant, delivery_id: str) -> WebhookDelivery:
    delivery = (
        WebhookDelivery.objects.filter(endpoint__tenant=tenant, pk=delivery_id)
        .select_related("endpoint", "event")
        .first()
    )
    if delivery is None:
        raise NotFound()
    return delivery
