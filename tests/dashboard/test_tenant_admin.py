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
