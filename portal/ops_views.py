"""The operator console (/ops/): staff only. Everyone else gets the same 404 as a missing page."""

from __future__ import annotations

from functools import wraps

from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.shortcuts import render

from portal import ops_selectors


def staff_page(view):
    @login_required
    @wraps(view)
    def wrapper(request, *args, **kwargs):
        if not request.user.is_staff:
            raise Http404
        return view(request, *args, **kwargs)

    return wrapper


@staff_page
def ops_console(request):
    period, tenants = ops_selectors.tenants_with_usage()
    return render(request, "portal/ops.html", {
        "period": period,
        "tenants": tenants,
        "pools": ops_selectors.pools_state(),
        "workers": ops_selectors.workers_alive(),
        "rejections": ops_selectors.admission_rejections(),
        "moderation_url": ops_selectors.moderation_queue_url(),
    })
