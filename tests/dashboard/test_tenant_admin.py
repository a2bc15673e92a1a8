"""A tenant admin's bad input and edge cases on the dashboard: each gets a page with a message,
never a 500, and lands where the next step is."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from portal.models import ApiKey, Membership

pytestmark = pytest.mark.django_db


def as_user(user) -> Client:
    client = Client(raise_request_exception=False)  # a 500 is an answer to assert, not a raise
    client.force_login(user)
    return client


@pytest.mark.parametrize(("field", "value"), [
    ("cu_cap", "99999999999999999999"),  # past the bigint column
    ("cu_per_minute", "3000000000"),  # past the integer column
])
def test_a_huge_key_limit_is_a_form_error_not_a_500(cast, field, value):
    response = as_user(cast.admin.user).post("/t/acme/keys/", {"name": "big", field: value})
    assert response.status_code == 200
    assert "less than or equal to" in response.content.decode()
    assert not ApiKey.objects.filter(tenant=cast.tenant, name="big").exists()


def test_the_largest_key_limits_are_issued(cast):
    from portal.forms import API_KEY_CU_CAP_MAX, API_KEY_CU_PER_MINUTE_MAX

    response = as_user(cast.admin.user).post("/t/acme/keys/", {
        "name": "big", "cu_cap": API_KEY_CU_CAP_MAX, "cu_per_minute": API_KEY_CU_PER_MINUTE_MAX})
    assert response.status_code == 200
    key = ApiKey.objects.get(tenant=cast.tenant, name="big")
    assert (key.cu_cap, key.cu_per_minute) == (API_KEY_CU_CAP_MAX, API_KEY_CU_PER_MINUTE_MAX)


def test_inviting_an_address_longer_than_a_user_name_is_a_form_error(cast, mailoutbox):
    address = "a" * 150 + "@example.com"  # a valid address; user names hold 150 characters
    response = as_user(cast.admin.user).post("/t/acme/members/", {"email": address, "role": "member"})
    assert response.status_code == 200
    assert "more than 150 characters" in response.content.decode()
    assert not get_user_model().objects.filter(email=address).exists()
    assert mailoutbox == []


def test_a_long_address_that_has_an_account_is_invited(cast, mailoutbox):
    address = "b" * 150 + "@example.com"
    person = get_user_model().objects.create_user(username="bee", email=address)
    response = as_user(cast.admin.user).post("/t/acme/members/", {"email": address, "role": "viewer"})
    assert response.status_code == 200
    assert Membership.objects.filter(tenant=cast.tenant, user=person).exists()
    assert [mail.to for mail in mailoutbox] == [[address]]



def test_inviting_an_address_that_is_another_accounts_user_name_is_a_form_error(cast, mailoutbox):
    """That account's address changed since an invitation made it: it is not the address's
    account (accounts are matched by address), and a new one cannot take its user name."""
    moved = get_user_model().objects.create_user(username="alice@example.com",
                                                 email="alice@new.example")
    browser = as_user(cast.admin.user)
    response = browser.post("/t/acme/members/", {"email": "Alice@example.com", "role": "member"})
    assert response.status_code == 200
    assert "Alice@example.com is another account&#x27;s user name" in response.content.decode()
    assert not Membership.objects.filter(tenant=cast.tenant, user=moved).exists()
    assert get_user_model().objects.filter(email__iexact="alice@example.com").count() == 0
    assert mailoutbox == []
    # The form and the tenant carry on: the next invitation goes through.
    assert "mailed them the invitation" in browser.post(
        "/t/acme/members/", {"email": "bob@example.com", "role": "member"}).content.decode()

def test_an_admin_who_removes_themselves_lands_on_their_home_not_a_404(cast):
    browser = as_user(cast.admin.user)
    browser.get("/t/acme/members/")
    response = browser.post(f"/t/acme/members/{cast.admin.pk}/", {"action": "remove"}, follow=True)
    assert response.status_code == 200
    assert response.redirect_chain[-1][0] == "/"
    assert "You are not a member of any tenant" in response.content.decode()
    assert f"Removed {cast.admin.user}." in response.content.decode()
    assert not Membership.objects.filter(pk=cast.admin.pk).exists()
    # Removing someone else still comes back to the members page.
    owner = as_user(cast.owner.user)
    response = owner.post(f"/t/acme/members/{cast.viewer.pk}/", {"action": "remove"})
    assert response["Location"] == "/t/acme/members/"


@pytest.mark.parametrize("dates", ["start=9999-12-31&end=9999-12-31", "start=9999-01-01&end=9999-12-31"])
def test_usage_export_of_the_last_representable_day_is_empty_not_a_500(cast, dates):
    response = as_user(cast.viewer.user).get(f"/t/acme/usage.csv?{dates}")
    assert response.status_code == 200
    assert b"".join(response.streaming_content).decode().splitlines() == ["date,model,api_key,requests,cu"]


def test_usage_api_of_the_last_representable_day_is_empty_not_a_500(cast, api):
    response = api.bearer(cast.owner_key).get("/v1/usage?start_date=9999-12-31&end_date=9999-12-31")
    assert response.status_code == 200
    assert response.json()["data"] == [] and response.json()["total_cu"] == 0


# --- long lists: every row reachable a page at a time, in a bounded number of queries -------------


def _links(html: str, label: str) -> list[str]:
    import html as html_module
    import re

    return [html_module.unescape(href) for href in re.findall(rf'<a href="([^"]*)">{label}</a>', html)]


def test_every_job_is_reachable_from_the_jobs_list_a_page_at_a_time(cast, video_job, sent_tasks):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from portal.dashboard_views import JOBS_SHOWN
    from portal.services import playground_submit
    from tests.dashboard.conftest import VIDEO

    submitted = [video_job.pk] + [playground_submit(actor=cast.member, payload=dict(VIDEO)).job.pk
                                  for _ in range(JOBS_SHOWN + 5)]
    browser = as_user(cast.viewer.user)
    browser.get("/t/acme/jobs/")
    with CaptureQueriesContext(connection) as queries:
        first = browser.get("/t/acme/jobs/?status=queued&kind=video").content.decode()
    assert len(queries) <= 8, [query["sql"] for query in queries]  # not one per row
    listed = [job_id for job_id in submitted[::-1] if f'id="job-row-{job_id}"' in first]
    assert listed == submitted[::-1][:JOBS_SHOWN]
    (older,) = _links(first, "Older jobs")
    assert "status=queued" in older and "kind=video" in older, "the filters are kept"
    second = browser.get(f"/t/acme/jobs/{older}").content.decode()
    listed = [job_id for job_id in submitted[::-1] if f'id="job-row-{job_id}"' in second]
    assert listed == submitted[::-1][JOBS_SHOWN:]
    assert _links(second, "Older jobs") == []
    assert _links(second, "Newest jobs") in (["?kind=video&status=queued"], ["?status=queued&kind=video"])
    # htmx's refresh of the table keeps the page it shows.
    partial = browser.get(f"/t/acme/jobs/{older}", HTTP_HX_REQUEST="true").content.decode()
    assert f'id="job-row-{video_job.pk}"' in partial and "<html" not in partial


def test_every_delivery_is_reachable_from_the_delivery_log_a_page_at_a_time(cast, settings):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from inference.webhook_models import WebhookAttempt
    from inference.webhook_views import _DELIVERIES_SHOWN
    from inference.webhooks import webhook_endpoint_create, webhook_event_publish

    settings.SLUICE_WEBHOOK_ALLOW_PRIVATE = True
    endpoint = webhook_endpoint_create(tenant=cast.tenant, url="http://127.0.0.1:9/hooks")
    events = [webhook_event_publish(tenant=cast.tenant, event_type="job.completed", data={"n": n})
              for n in range(_DELIVERIES_SHOWN + 3)]
    for event in events:
        (delivery,) = event.deliveries.all()
        WebhookAttempt.objects.create(delivery=delivery, number=1, status_code=500, latency_ms=3)
    browser = as_user(cast.admin.user)
    browser.get(f"/t/acme/webhooks/{endpoint.pk}/")
    with CaptureQueriesContext(connection) as queries:
        first = browser.get(f"/t/acme/webhooks/{endpoint.pk}/").content.decode()
    assert len(queries) <= 10, [query["sql"] for query in queries]  # not one per row
    newest_first = [event.pk for event in events[::-1]]
    assert [pk for pk in newest_first if pk in first] == newest_first[:_DELIVERIES_SHOWN]
    (older,) = _links(first, "Older")
    second = browser.get(f"/t/acme/webhooks/{endpoint.pk}/{older}").content.decode()
    assert [pk for pk in newest_first if pk in second] == newest_first[_DELIVERIES_SHOWN:]
    assert _links(second, "Newer") == ["?page=1"]


# --- Redis not answering: the action's page says so, never a 500 ----------------------------------

REDIS_NOBODY_LISTENS = "redis://127.0.0.1:1/0"


def test_adding_a_webhook_while_redis_does_not_answer_says_to_retry(cast, settings):
    from inference.webhook_models import WebhookEndpoint

    settings.SLUICE_WEBHOOK_ALLOW_PRIVATE = True
    browser = as_user(cast.admin.user)
    form = {"url": "http://127.0.0.1:9/hooks", "event_types": ["job.completed"]}
    healthy_url, settings.REDIS_URL = settings.REDIS_URL, REDIS_NOBODY_LISTENS
    response = browser.post("/t/acme/webhooks/", form)
    assert response.status_code == 503
    assert "cannot be created right now. Retry later." in response.content.decode()
    assert 'value="http://127.0.0.1:9/hooks"' in response.content.decode(), "the form keeps its input"
    assert not WebhookEndpoint.objects.exists()
    settings.REDIS_URL = healthy_url
    assert browser.post("/t/acme/webhooks/", form).status_code == 200
    assert WebhookEndpoint.objects.filter(tenant=cast.tenant).count() == 1


def test_cancelling_while_redis_does_not_answer_says_so_and_cancelling_again_finishes(cast, video_job,
                                                                                      settings):
    from inference.models import Job

    browser = as_user(cast.member.user)
    healthy_url, settings.REDIS_URL = settings.REDIS_URL, REDIS_NOBODY_LISTENS
    response = browser.post(f"/t/acme/jobs/{video_job.pk}/cancel/", follow=True)
    assert response.status_code == 200
    assert response.redirect_chain == [(f"/t/acme/jobs/{video_job.pk}/", 302)]
    assert f"Could not cancel {video_job.pk} right now: try again in a moment." in response.content.decode()
    settings.REDIS_URL = healthy_url
    response = browser.post(f"/t/acme/jobs/{video_job.pk}/cancel/", follow=True)
    assert f"Cancelling {video_job.pk}" in response.content.decode()
    video_job.refresh_from_db()
    assert video_job.status == Job.Status.CANCELLED
    assert video_job.reservation.state == "settled" and video_job.reservation.settled_mcu == 0


# --- usage: the export's numbers are the ledger's, at the month's edge too ------------------------


def _csv_rows(browser: Client, start, end) -> list[list[str]]:
    import csv

    response = browser.get(f"/t/acme/usage.csv?start={start}&end={end}")
    assert response.status_code == 200
    return list(csv.reader(b"".join(response.streaming_content).decode().splitlines()))[1:]


def _billed_cu(tenant, period: str) -> float:
    """What the ledger bills the tenant for a period: its settlements and adjustments."""
    from django.db.models import Sum

    from quotas.models import LedgerEntry

    mcu = LedgerEntry.objects.filter(tenant=tenant, period=period, kind__in=["settle", "adjust"]
                                     ).aggregate(total=Sum("mcu"))["total"] or 0
    return mcu / 1000


def test_usage_export_agrees_with_the_ledger_for_a_month_a_job_ran_across_the_end_of(cast, api):
    """A job admitted at 23:59:50 on the last day of a month and settled at 00:00:10 on the
    next is the earlier month's: its budget was reserved from, and its settlement billed to, that
    period. The export and /v1/usage counted it on the settlement's day, in the next month."""
    from datetime import timedelta

    from django.utils import timezone

    from quotas.ledger import ledger_adjust, reservation_open, reservation_settle
    from quotas.limits import period_bounds, period_of
    from quotas.models import LedgerEntry, Reservation

    api_key = ApiKey.objects.select_related("tenant__tier").get(prefix=cast.owner_key[3:15])

    def run(cost_cu: float, actual_cu: float) -> str:
        opened = reservation_open(api_key=api_key, model_id="sluice-code-tiny", pool="text-batch",
                                  cost_mcu=int(cost_cu * 1000), mode="sync")
        reservation_settle(reservation_id=opened.reservation.id, actual_mcu=int(actual_cu * 1000))
        return opened.reservation.id

    this_period = period_of(timezone.now())
    month_start = period_bounds(this_period)[0]
    last_period = period_of(month_start - timedelta(days=1))
    # Across the edge: rewritten to the times and period the ledger would have written.
    across = run(5, 3)  # 2 CU refunded
    admitted, settled = month_start - timedelta(seconds=10), month_start + timedelta(seconds=10)
    Reservation.objects.filter(pk=across).update(created_at=admitted, settled_at=settled,
                                                 period=last_period)
    LedgerEntry.objects.filter(reservation_id=across, kind="reserve").update(created_at=admitted,
                                                                           period=last_period)
    LedgerEntry.objects.filter(reservation_id=across).exclude(kind="reserve").update(
        created_at=settled, period=last_period)
    # This month: a settled job with a refund, and an operator's credit on the same key.
    run(4, 1.5)
    ledger_adjust(tenant_id=cast.tenant.pk, mcu=-500, note="goodwill", api_key_id=api_key.pk)

    browser = as_user(cast.viewer.user)
    last_start = period_bounds(last_period)[0].date()
    last_end = month_start.date() - timedelta(days=1)
    today = timezone.now().date()
    for (start, end), period in [((last_start, last_end), last_period),
                                 ((month_start.date(), today), this_period)]:
        rows = _csv_rows(browser, start, end)
        assert sum(float(row[4]) for row in rows) == _billed_cu(cast.tenant, period), period
        usage = api.bearer(cast.owner_key).get(f"/v1/usage?start_date={start}&end_date={end}").json()
        assert usage["total_cu"] == _billed_cu(cast.tenant, period), period
    assert _billed_cu(cast.tenant, last_period) == 3.0 and _billed_cu(cast.tenant, this_period) == 1.0
    (row,) = _csv_rows(browser, last_start, last_end)
    assert row[0] == last_end.isoformat() and row[3] == "1"  # the day it was admitted, one request


def test_a_key_capped_at_zero_is_listed_with_its_cap_not_as_uncapped(cast):
    """A cap of 0 (set in the admin: the key may spend nothing) read as "—", no cap."""
    import re

    blocked = ApiKey.objects.get(prefix=cast.owner_key[3:15])
    ApiKey.objects.filter(pk=blocked.pk).update(cu_cap=0)
    html = as_user(cast.viewer.user).get("/t/acme/keys/").content.decode()
    cells = re.findall(r"<td[^>]*>(.*?)</td>", html.split(blocked.masked, 1)[1], flags=re.S)
    assert cells[4] == "0"  # after the key: created by, created, last used, expires, CU cap


def test_a_code_prompt_with_a_null_character_is_explained_beside_the_form(cast, sent_tasks):
    """The job's params keep the prompt, and PostgreSQL's JSON refuses U+0000: it was a 500."""
    from inference.models import Job

    response = as_user(cast.member.user).post("/t/acme/playground/", {
        "model": "sluice-code-tiny", "prompt": "def f():\x00", "max_tokens": "4"})
    assert response.status_code == 400
    assert "prompt: Null characters are not allowed." in response.content.decode()
    assert not Job.objects.exists() and sent_tasks == []


def test_a_members_key_named_like_the_playground_key_is_not_the_playgrounds(cast, sent_tasks):
    """The playground took any key of that name: every member's jobs ran on this member's key,
    under its cap, billed to it."""
    from inference.models import Job
    from portal.services import PLAYGROUND_KEY_NAME
    from tests.dashboard.conftest import VIDEO

    as_user(cast.member.user).post("/t/acme/keys/", {"name": PLAYGROUND_KEY_NAME, "cu_cap": "1"})
    decoy = ApiKey.objects.get(tenant=cast.tenant, name=PLAYGROUND_KEY_NAME)
    response = as_user(cast.admin.user).post("/t/acme/playground/", VIDEO)
    assert response.status_code == 302, response.content.decode()
    playground_key = Job.objects.get(pk=response["Location"].split("job=")[1]).api_key
    assert playground_key != decoy and playground_key.created_by is None
    assert playground_key.name == PLAYGROUND_KEY_NAME and playground_key.cu_cap is None
