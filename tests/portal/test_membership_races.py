"""The last owner stays when two requests change the tenant's owners at once: each request runs
on its own thread and PostgreSQL connection, both held where the services lock the owners until
both wait there, then let go together."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from django.http import HttpResponse
from django.test import Client

from portal.models import Membership, Role, Tenant
from tests.races import released_together

pytestmark = pytest.mark.django_db(transaction=True)

LAST_OWNER = "A tenant needs at least one owner."


def at_once(tenant: Tenant, *requests: Callable[[], object]) -> list[object]:
    """The requests at once, released together once all of them wait for the tenant's owners'
    rows (held meanwhile by a third transaction)."""
    return released_together(
        lambda: list(Membership.objects.select_for_update()
                     .filter(tenant=tenant, role=Role.OWNER).order_by("pk")),
        *requests)


def two_owners(cast) -> tuple[Membership, Membership]:
    Membership.objects.filter(pk=cast.admin.pk).update(role=Role.OWNER)
    return cast.owner, Membership.objects.get(pk=cast.admin.pk)


def owners_left(tenant: Tenant) -> int:
    return Membership.objects.filter(tenant=tenant, role=Role.OWNER).count()


def posting(client: Client, url: str, data: dict) -> Callable[[], HttpResponse]:
    return lambda: client.post(url, data)


def flashed(response: HttpResponse) -> list[str]:
    """The messages the request left for the next page."""
    return [str(message) for message in response.wsgi_request._messages]


def browser(user) -> Client:
    client = Client(raise_request_exception=False)  # a 500 is an answer here, not an exception
    client.force_login(user)
    return client


@pytest.mark.parametrize("data", [{"action": "remove"}, {"action": "change_role", "role": "admin"}])
def test_the_last_two_owners_leaving_at_once_on_the_dashboard_leaves_one(cast, data):
    owners = two_owners(cast)
    responses = at_once(cast.tenant, *(
        posting(browser(owner.user), f"/t/acme/members/{owner.pk}/", data) for owner in owners))
    assert [response.status_code for response in responses] == [302, 302]
    assert sorted(flashed(response) == [LAST_OWNER] for response in responses) == [False, True]
    assert owners_left(cast.tenant) == 1


@pytest.mark.parametrize("page, data", [("change", {"role": "viewer"}), ("delete", {"post": "yes"})])
def test_staff_demoting_or_removing_the_last_two_owners_at_once_keeps_one(cast, admin_user, page, data):
    """Each request passes the page's own check while both owners are there; the later one is
    refused as it is when it comes alone (the form's error, or the admin's 403 for a removal),
    not with a 500."""
    owners = two_owners(cast)
    responses = at_once(cast.tenant, *(
        posting(browser(admin_user), f"/admin/portal/membership/{owner.pk}/{page}/", data)
        for owner in owners))
    refused_status = 200 if page == "change" else 403
    assert sorted(response.status_code for response in responses) == sorted([302, refused_status])
    if page == "change":
        refused = next(response for response in responses if response.status_code == 200)
        assert LAST_OWNER in refused.content.decode()
    assert owners_left(cast.tenant) == 1


def test_staff_removing_one_membership_twice_at_once_removes_it_once(cast, admin_user):
    _, second_owner = two_owners(cast)
    responses = at_once(cast.tenant, *(
        posting(browser(admin_user), "/admin/portal/membership/",
                {"action": "remove", "_selected_action": [second_owner.pk]})
        for _ in range(2)))
    assert [response.status_code for response in responses] == [302, 302]
    assert sorted(flashed(response) for response in responses) == [
        ["Removed admin1 @ Acme (owner); revoked 0 key(s)."],
        ["admin1 @ Acme (owner) was removed already."]]
    assert owners_left(cast.tenant) == 1
