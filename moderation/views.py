"""The moderators' review queue (browser). Platform moderators only: the permission
`moderation.review_case`, which tenant roles never grant."""

from __future__ import annotations

from functools import wraps

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.paginator import Paginator
from django.http import Http404, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from moderation import selectors, services
from moderation.forms import DecisionForm, QueueFilterForm, UnsuspendForm
from moderation.models import ModerationCase
from portal.errors import InvalidParameter, NotFound, PermissionDenied

_UNDECIDED = [ModerationCase.Status.OPEN, ModerationCase.Status.ESCALATED]


def moderator_page(view):
    @login_required
    @wraps(view)
    def wrapper(request, *args, **kwargs):
        try:
            services.moderator_require(user=request.user)
            return view(request, *args, **kwargs)
        except PermissionDenied as exc:
            raise DjangoPermissionDenied(exc.message) from exc
        except NotFound as exc:
            raise Http404 from exc

    return wrapper


@moderator_page
def review_queue(request):
    form = QueueFilterForm(request.GET or None)
    # A filter that does not parse lists nothing (its error says why): ignored, the page listed
    # every tenant's cases under a tenant filter.
    invalid = form.is_bound and not form.is_valid()
    filters = form.cleaned_data if form.is_bound and not invalid else {}
    tenant = None
    if filters.get("tenant"):
        tenant = selectors.tenant_find(slug=filters["tenant"])
    cases = selectors.cases_for_review(
        tenant=tenant,
        statuses=[filters["status"]] if filters.get("status") else _UNDECIDED,
        category=filters.get("category") or None,
        min_score=filters.get("min_score"),
    )
    if invalid or (filters.get("tenant") and tenant is None):
        cases = cases.none()
    page = Paginator(cases, 50).get_page(request.GET.get("page"))
    filters_query = request.GET.copy()
    filters_query.pop("page", None)  # the links add their own
    context = {
        "form": form,
        "page": page,
        "filters_query": filters_query.urlencode(),
        "suspensions": selectors.suspensions_active(tenant=None),
    }
    return render(request, "moderation/queue.html", context)


@moderator_page
def case_detail(request, case_id: int):
    case = selectors.case_get(case_id=case_id)
    form = DecisionForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            services.case_decide(
                case=case,
                moderator=request.user,
                decision=form.cleaned_data["decision"],
                note=form.cleaned_data["note"],
            )
            messages.success(request, f"Case {case.pk}: {case.get_status_display()}.")
            return redirect("moderation-queue")
        except (InvalidParameter, PermissionDenied) as exc:
            form.add_error(None, exc.message)
            # Another moderator decided meanwhile, or the page was stale: show the case as it
            # is now, not the form it was read with.
            case = selectors.case_get(case_id=case_id)
    allowed = services.case_decisions_allowed(case=case, moderator=request.user)
    form.offer(allowed)
    context = {
        "case": case,
        "form": form,
        "decisions_allowed": allowed,
        "decisions": case.decisions.select_related("moderator"),
        "suspension": selectors.suspension_active_for_tenant(tenant=case.tenant),
        "recent_cases": selectors.cases_for_review(tenant=case.tenant).exclude(pk=case.pk)
                        .order_by("-created_at", "-pk")[:10],
    }
    return render(request, "moderation/case.html", context)


@require_POST
@moderator_page
def tenant_unsuspend(request, tenant_slug: str):
    tenant = selectors.tenant_get(slug=tenant_slug)
    form = UnsuspendForm(request.POST)
    if not form.is_valid():
        messages.error(request, f"{tenant.name}: say why the suspension is lifted (a note is required).")
        return redirect("moderation-queue")
    try:
        services.tenant_suspension_lift(tenant=tenant, moderator=request.user,
                                        note=form.cleaned_data["note"])
    except InvalidParameter as exc:  # another moderator lifted it a moment earlier
        messages.error(request, f"{tenant.name}: {exc.message}")
        return redirect("moderation-queue")
    tenant.refresh_from_db(fields=["status"])
    if tenant.is_suspended:  # staff suspended it too: that is lifted in the tenant admin
        messages.warning(request, f"{tenant.name}: the moderation suspension is lifted; staff's "
                                  "suspension remains (the tenant admin lifts it).")
        return redirect("moderation-queue")
    messages.success(request, f"{tenant.name} is active again.")
    return redirect("moderation-queue")


@moderator_page
def overturned_export(request):
    slug = request.GET.get("tenant")
    tenant = selectors.tenant_get(slug=slug) if slug else None
    response = StreamingHttpResponse(
        selectors.overturned_cases_jsonl(tenant=tenant), content_type="application/jsonl"
    )
    response["Content-Disposition"] = 'attachment; filename="overturned_cases.jsonl"'
    return response
