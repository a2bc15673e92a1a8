"""The last owner stays when two requests change the tenant's owners at once: each request runs
on its own thread and PostgreSQL connection, both held where the services lock the owners until
both wait there, then let go together."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from django.db import connection, transaction
from django.http import HttpResponse
from django.test import Client

from portal.models import Membership, Role, Tenant

pytestmark = pytest.mark.django_db(transaction=True)

LAST_OWNER = "A tenant needs at least one owner."


def _backends_waiting_on_locks() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                       "AND wait_event_type = 'Lock'")
        return cursor.fetchone()[0]


def at_once(tenant: Tenant, *requests: Callable[[], object]) -> list[object]:
    """Run the requests concurrently, each in its own transaction, released together once all
    of them wait for the tenant's owners' rows (held meanwhile by a third transaction)."""
    if connection.vendor != "postgresql":
        pytest.skip("row locks and concurrent transactions need PostgreSQL")
    held, release = threading.Event(), threading.Event()
    results: list[object] = [None] * len(requests)

    def hold_the_owners() -> None:
        try:
            with transaction.atomic():
                list(Membership.objects.select_for_update()
                     .filter(tenant=tenant, role=Role.OWNER).order_by("pk"))
                held.set()
                release.wait(90)
        finally:
            connection.close()

    def run(index: int, request: Callable[[], object]) -> None:
        try:
            results[index] = request()
        finally:
            connection.close()

    holder = threading.Thread(target=hold_the_owners)
    holder.start()
    assert held.wait(10)
    threads = [threading.Thread(target=run, args=pair) for pair in enumerate(requests)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60  # the first request of a session imports the views
    while _backends_waiting_on_locks() < len(requests):
        assert time.monotonic() < deadline, "the requests never both waited for the owners' lock"
        time.sleep(0.02)
    release.set()
    holder.join()
    for thread in threads:
        thread.join(60)
    return results


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
