"""Dashboard pages for webhooks: endpoints, their secrets and the delivery log.

Viewers and members read; admins and owners change things.
"""

from __future__ import annotations

from django import forms
from django.contrib import messages
from django.core.paginator import Paginator
from django.http import Http404
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from inference import webhook_selectors as selectors
from inference import webhooks as services
from inference.webhook_models import (
    DEFAULT_EVENT_TYPES,
    WEBHOOK_EVENT_TYPES,
    WebhookEndpoint,
)
from portal.errors import InvalidParameter, SluiceError
from portal.models import Membership, Role
from portal.services import require_role
from portal.views import tenant_page

_MANAGER_ROLE = Role.ADMIN
_DELIVERIES_SHOWN = 50


class WebhookEndpointForm(forms.Form):
    url = forms.CharField(max_length=2000, label="Endpoint URL",
                          widget=forms.URLInput(attrs={"placeholder": "https://example.com/hooks"}))
    description = forms.CharField(max_length=200, required=False, label="Description (optional)")
    event_types = forms.MultipleChoiceField(
        choices=[(name, name) for name in WEBHOOK_EVENT_TYPES],
        initial=DEFAULT_EVENT_TYPES,
        widget=forms.CheckboxSelectMultiple,
        label="Events",
        help_text="job.progress is sent many times per job; subscribe only if you need it.",
    )


def _render_endpoints(request, membership: Membership, *, form=None,
                      revealed: WebhookEndpoint | None = None, status: int = 200):
    tenant = membership.tenant
    endpoints = list(selectors.webhook_endpoints_for_tenant(tenant=tenant))
    context = {
        "tenant": tenant,
        "endpoints": endpoints,
        "auto_disabled": [endpoint for endpoint in endpoints if endpoint.auto_disabled],
        "form": form or WebhookEndpointForm(),
        "revealed": revealed,
        "can_manage": membership.has_role_at_least(_MANAGER_ROLE),
    }
    response = render(request, "inference/webhooks.html", context, status=status)
    if revealed is not None:
        # The secret is in this page only: keep it out of every cache.
        response["Cache-Control"] = "no-store"
    return response


@tenant_page
def webhooks_page(request, membership: Membership):
    if request.method != "POST":
        return _render_endpoints(request, membership)
    require_role(membership=membership, role=_MANAGER_ROLE)
    form = WebhookEndpointForm(request.POST)
    if form.is_valid():
        try:
            endpoint = services.webhook_endpoint_create(tenant=membership.tenant, actor=membership,
                                                       **form.cleaned_data)
            return _render_endpoints(request, membership, revealed=endpoint)
        except SluiceError as exc:  # a bad URL, the endpoint limit, or Redis not answering (503)
            form.add_error(exc.param if exc.param in form.fields else None, exc.message)
            return _render_endpoints(request, membership, form=form, status=exc.http_status)
    return _render_endpoints(request, membership, form=form, status=400)


@tenant_page
def webhook_deliveries_page(request, membership: Membership, endpoint_id: str):
    tenant = membership.tenant
    endpoint = selectors.webhook_endpoint_get_for_tenant(tenant=tenant, endpoint_id=endpoint_id)
    deliveries = selectors.webhook_deliveries_for_endpoint(tenant=tenant, endpoint=endpoint)
    page = Paginator(deliveries, _DELIVERIES_SHOWN).get_page(request.GET.get("page"))
    return render(request, "inference/webhook_deliveries.html", {
        "tenant": tenant,
        "endpoint": endpoint,
        "deliveries": page,
        "can_manage": membership.has_role_at_least(_MANAGER_ROLE),
    })


@require_POST
@tenant_page
def webhook_secret_rotate_view(request, membership: Membership, endpoint_id: str):
    require_role(membership=membership, role=_MANAGER_ROLE)
    endpoint = selectors.webhook_endpoint_get_for_tenant(tenant=membership.tenant,
                                                         endpoint_id=endpoint_id)
    endpoint = services.webhook_endpoint_secret_rotate(endpoint=endpoint, actor=membership)
    return _render_endpoints(request, membership, revealed=endpoint)


def _enable(endpoint: WebhookEndpoint, actor: Membership) -> str:
    services.webhook_endpoint_update(endpoint=endpoint, enabled=True, actor=actor)
    return f"Enabled {endpoint.url}."


def _disable(endpoint: WebhookEndpoint, actor: Membership) -> str:
    services.webhook_endpoint_update(endpoint=endpoint, enabled=False, actor=actor)
    return f"Disabled {endpoint.url}."


def _delete(endpoint: WebhookEndpoint, actor: Membership) -> str:
    services.webhook_endpoint_delete(endpoint=endpoint, actor=actor)
    return f"Deleted {endpoint.url}."


_ACTIONS = {"enable": _enable, "disable": _disable, "delete": _delete}


@require_POST
@tenant_page
def webhook_endpoint_action_view(request, membership: Membership, endpoint_id: str, action: str):
    if action not in _ACTIONS:
        raise Http404
    require_role(membership=membership, role=_MANAGER_ROLE)
    endpoint = selectors.webhook_endpoint_get_for_tenant(tenant=membership.tenant,
                                                         endpoint_id=endpoint_id)
    messages.success(request, _ACTIONS[action](endpoint, membership))
    return redirect("tenant-webhooks", tenant_slug=membership.tenant.slug)


@require_POST
@tenant_page
def webhook_redeliver_view(request, membership: Membership, delivery_id: str):
    require_role(membership=membership, role=_MANAGER_ROLE)
    delivery = selectors.webhook_delivery_get_for_tenant(tenant=membership.tenant,
                                                         delivery_id=delivery_id)
    try:
        again = services.webhook_delivery_redeliver(delivery=delivery)
        messages.success(request, f"Queued {delivery.event_id} again as {again.id}.")
    except InvalidParameter as exc:
        messages.error(request, exc.message)
    return redirect("tenant-webhook-deliveries", tenant_slug=membership.tenant.slug,
                    endpoint_id=delivery.endpoint_id)
