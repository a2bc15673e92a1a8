"""The tenant dashboard: thin views that resolve the caller's membership and call a service."""

from __future__ import annotations

from datetime import timedelta
from functools import wraps

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.paginator import Paginator
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.template.defaultfilters import pluralize
from django.utils import timezone
from django.views.decorators.http import require_POST
from django.views.defaults import bad_request as django_bad_request

from portal import selectors, services
from portal.audit import audit_events_for_tenant
from portal.errors import InvalidParameter, NotFound, PermissionDenied, json_error, to_sluice_error
from portal.forms import ApiKeyCreateForm, MemberInviteForm, MemberUpdateForm
from portal.models import AuditEvent, Membership, Role
from quotas.services import budget_status


def tenant_page(view):
    """Resolve /t/<slug>/ to the caller's membership (404 for non-members) and map domain errors."""

    @login_required
    @wraps(view)
    def wrapper(request, tenant_slug: str, *args, **kwargs):
        try:
            membership = selectors.membership_get_for_user(user=request.user, tenant_slug=tenant_slug)
            request.membership = membership
            if request.session.get("current_tenant") != tenant_slug:  # a write per switch, not per page
                services.membership_visit(membership=membership)
                request.session["current_tenant"] = tenant_slug
            return view(request, membership, *args, **kwargs)
        except NotFound as exc:
            raise Http404 from exc
        except PermissionDenied as exc:
            raise DjangoPermissionDenied(exc.message) from exc

    return wrapper


def tenant_context(request) -> dict:
    """Template context: the caller's tenants for the switcher, and the current membership."""
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {}
    return {
        "user_memberships": selectors.memberships_for_user(user=user),
        "current_membership": getattr(request, "membership", None),
        "roles": Role,
    }


@login_required
def dashboard_home(request):
    current = request.session.get("current_tenant")
    if current and selectors.memberships_for_user(user=request.user).filter(tenant__slug=current).exists():
        return redirect("tenant-overview", tenant_slug=current)
    landing = selectors.membership_landing_for_user(user=request.user)
    if landing is None:
        return render(request, "portal/no_tenant.html")
    return redirect("tenant-overview", tenant_slug=landing.tenant.slug)


BURN_CHART_DAYS = 30
ERRORS_WINDOW = timedelta(days=7)


@tenant_page
def tenant_overview(request, membership: Membership):
    from inference.selectors import job_errors_for_tenant, jobs_in_flight_for_tenant
    from portal.redis import redis_client
    from quotas.limits import quota_limits_for, rate_headroom
    from quotas.selectors import usage_chart

    tenant = membership.tenant
    today = timezone.now().date()
    context = {
        "tenant": tenant,
        "tier": tenant.tier,
        "active_keys": selectors.api_keys_usable_for_tenant(tenant=tenant).count(),
        "member_count": selectors.members_for_tenant(tenant=tenant).count(),
        "budget": budget_status(tenant=tenant),
        "headroom": rate_headroom(tenant=tenant, client=redis_client()),
        "max_concurrent_jobs": quota_limits_for(tenant=tenant).max_concurrent_jobs,
        "in_flight": jobs_in_flight_for_tenant(tenant=tenant),
        "errors": job_errors_for_tenant(tenant=tenant, since=timezone.now() - ERRORS_WINDOW),
        "burn": usage_chart(tenant=tenant, start=today - timedelta(days=BURN_CHART_DAYS - 1), end=today),
        "export_start": today.replace(day=1).isoformat(),
        "export_end": today.isoformat(),
    }
    return render(request, "portal/overview.html", context)


@tenant_page
def api_keys_page(request, membership: Membership):
    tenant = membership.tenant
    form = ApiKeyCreateForm(request.POST or None)
    issued = None
    if request.method == "POST":
        services.require_role(membership=membership, role=Role.MEMBER)
        if form.is_valid():
            days = form.cleaned_data["expires_in_days"]
            try:
                issued = services.api_key_issue(
                    tenant=tenant,
                    name=form.cleaned_data["name"],
                    created_by=request.user,
                    expires_at=timezone.now() + timedelta(days=days) if days else None,
                    cu_cap=form.cleaned_data["cu_cap"],
                    cu_per_minute=form.cleaned_data["cu_per_minute"],
                )
                form = ApiKeyCreateForm()
            except InvalidParameter as exc:
                form.add_error(None, exc.message)
    context = {
        "tenant": tenant,
        "keys": selectors.api_keys_for_tenant(tenant=tenant),
        "form": form,
        "issued": issued,
        "can_create": membership.has_role_at_least(Role.MEMBER),
        "can_revoke_any": membership.has_role_at_least(Role.ADMIN),
    }
    response = render(request, "portal/api_keys.html", context)
    if issued is not None:
        # The full key is in this page only: keep it out of every cache.
        response["Cache-Control"] = "no-store"
    return response


@require_POST
@tenant_page
def api_key_revoke_view(request, membership: Membership, key_id: int):
    api_key = selectors.api_key_get_for_tenant(tenant=membership.tenant, key_id=key_id)
    services.api_key_revoke_as(actor=membership, api_key=api_key)
    messages.success(request, f"Revoked {api_key.name} ({api_key.masked}).")
    return redirect("tenant-keys", tenant_slug=membership.tenant.slug)


@tenant_page
def members_page(request, membership: Membership):
    tenant = membership.tenant
    roles = membership.roles_grantable()
    form = MemberInviteForm(request.POST or None, roles=roles)
    if request.method == "POST":
        services.require_role(membership=membership, role=Role.ADMIN)
        if form.is_valid():
            try:
                invitation = services.membership_invite(
                    actor=membership,
                    email=form.cleaned_data["email"],
                    role=form.cleaned_data["role"],
                    site_url=request.build_absolute_uri("/"),
                )
                address = invitation.membership.user.email
                if not invitation.emailed:
                    messages.error(request, f"Added {address}, but the invitation mail could "
                                            "not be sent. Invite them again to resend it.")
                elif invitation.resent:
                    messages.success(request, f"{address} has not chosen a password yet: "
                                              "sent them a new link.")
                else:
                    messages.success(request, f"Added {address} and mailed them the invitation.")
                form = MemberInviteForm(roles=roles)
            except InvalidParameter as exc:
                form.add_error(exc.param if exc.param in form.fields else None, exc.message)
    members = list(selectors.members_for_tenant(tenant=tenant))
    for member in members:  # an owner's row has no controls for an admin: the service refuses them
        member.manageable = membership.may_manage(member)
    context = {
        "tenant": tenant,
        "members": members,
        "form": form,
        "roles_grantable": roles,
        "can_manage": membership.has_role_at_least(Role.ADMIN),
    }
    return render(request, "portal/members.html", context)


AUDIT_PAGE_SIZE = 50


@tenant_page
def audit_log_page(request, membership: Membership):
    """Who changed the tenant's members, keys, webhooks and standing: admins and owners read it
    (the people whose changes it records)."""
    services.require_role(membership=membership, role=Role.ADMIN)
    events = audit_events_for_tenant(tenant=membership.tenant)
    action = request.GET.get("action", "")
    if action in AuditEvent.Action.values:
        events = events.filter(action=action)
    page = Paginator(events, AUDIT_PAGE_SIZE).get_page(request.GET.get("page"))
    return render(request, "portal/audit.html", {
        "tenant": membership.tenant, "page": page, "action": action,
        "actions": AuditEvent.Action.choices,
    })


@require_POST
@tenant_page
def member_update_view(request, membership: Membership, membership_id: int):
    target = selectors.membership_get_for_tenant(tenant=membership.tenant, membership_id=membership_id)
    form = MemberUpdateForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Choose an action and a role.")
        return redirect("tenant-members", tenant_slug=membership.tenant.slug)
    try:
        if form.cleaned_data["action"] == "remove":
            revoked = services.membership_remove(actor=membership, membership=target)
            if revoked:
                messages.success(request, f"Removed {target.user} and revoked the "
                                          f"{len(revoked)} API key{pluralize(len(revoked))} "
                                          f"they created: {', '.join(k.name for k in revoked)}.")
            else:
                messages.success(request, f"Removed {target.user}.")
            if target.pk == membership.pk:  # they left: this tenant's pages are a 404 to them now
                return redirect("dashboard-home")
        else:
            changed = services.membership_role_change(
                actor=membership, membership=target, role=form.cleaned_data["role"]
            )
            messages.success(request, f"{changed.user} is now {changed.role}.")
    except InvalidParameter as exc:
        messages.error(request, exc.message)
    return redirect("tenant-members", tenant_slug=membership.tenant.slug)


def _wants_json(request) -> bool:
    return request.path.startswith("/v1/")


def bad_request(request, exception=None):
    """Django's own 400s (a Host that ALLOWED_HOSTS does not list, a body over its limit read
    outside an API view): an API client gets the error body, not Django's HTML page."""
    if _wants_json(request):
        return json_error(to_sluice_error(exception) or InvalidParameter())
    return django_bad_request(request, exception)


def not_found(request, exception=None):
    if _wants_json(request):
        return json_error(NotFound())
    return render(request, "404.html", status=404)


def server_error(request):
    if _wants_json(request):
        from portal.errors import SluiceError

        return json_error(SluiceError())
    return HttpResponse("Server error", status=500, content_type="text/plain")
