"""The Idempotency-Key header itself: a key the job's row cannot hold is the client's 400; two
requests with one key at once make one job or endpoint, and the second replays it."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from inference.models import IdempotencyKey, Job
from inference.webhook_models import WebhookEndpoint
from portal.models import AuditEvent, Tenant
from quotas.ledger import budget_used_from_ledger
from quotas.limits import CounterKeys, period_of
from quotas.models import Reservation
from tests.factories import api_key_obj, tenant_with_limits, video_job_submit
from tests.races import released_together

VIDEO_BODY = {"model": "sluice-video-tiny", "prompt": "a blue circle", "size": "64x64",
              "seconds": 0.5, "num_inference_steps": 2}


def _assert_refused_by_name(response) -> None:
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_parameter", "Idempotency-Key")
    assert error["message"] == "An Idempotency-Key is at most 255 characters."
    assert not Job.objects.exists() and not Reservation.objects.exists()


@pytest.mark.django_db
def test_a_video_with_a_key_over_255_characters_is_a_400_not_a_500(cast, api, sent_tasks):
    """The key's insert failed (PostgreSQL: value too long) after the reservation was opened."""
    client = api.bearer(cast.owner_key)
    _assert_refused_by_name(client.post("/v1/videos", VIDEO_BODY, format="json",
                                        HTTP_IDEMPOTENCY_KEY="k" * 256))
    # At the limit it is a key like any other.
    first = client.post("/v1/videos", VIDEO_BODY, format="json", HTTP_IDEMPOTENCY_KEY="k" * 255)
    again = client.post("/v1/videos", VIDEO_BODY, format="json", HTTP_IDEMPOTENCY_KEY="k" * 255)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["id"] == again.json()["id"] == IdempotencyKey.objects.get().job_id


@pytest.mark.django_db(transaction=True)  # an async view: it reads the key on its own connection
def test_a_completion_with_a_key_over_255_characters_is_a_400_not_a_500(cast, sent_tasks):
    client = APIClient(raise_request_exception=False)
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {cast.owner_key}")
    _assert_refused_by_name(client.post(
        "/v1/completions", {"model": "sluice-code-tiny", "prompt": "def f():", "max_tokens": 4},
        format="json", HTTP_IDEMPOTENCY_KEY="k" * 256))


# --- two requests with one key at once -------------------------------------------------------


def at_once_with_one_key(tenant: Tenant, key: str, *requests: Callable[[], object]) -> list:
    """The requests at once, released together once all of them found no record of `key` and
    wait to insert theirs (a third transaction holds an uncommitted one meanwhile): the race in
    which both pass the lookup. What each returned, or the exception it raised."""
    return released_together(
        lambda: IdempotencyKey.objects.create(tenant=tenant, key=key, request_hash="held"),
        *requests)


@pytest.mark.django_db(transaction=True)  # each request commits on its own connection
def test_two_webhook_creations_with_one_key_at_once_make_one_endpoint(cast, receiver, sent_tasks):
    body = {"url": receiver.url, "event_types": ["job.completed"]}

    def create():
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {cast.owner_key}")
        return client.post("/v1/webhooks", body, format="json", HTTP_IDEMPOTENCY_KEY="ep-race")

    responses = at_once_with_one_key(cast.tenant, "ep-race", create, create)
    assert sorted(response.status_code for response in responses) == [200, 201], responses
    first, replay = sorted(responses, key=lambda response: response.status_code, reverse=True)
    # The loser's endpoint, secret and audit row rolled back; it answers with the winner's,
    # its secret not shown again.
    assert first.json()["secret"].startswith("whsec_")
    assert replay.json() == {**first.json(), "secret": None}
    assert list(WebhookEndpoint.objects.values_list("pk", flat=True)) == [first.json()["id"]]
    assert AuditEvent.objects.filter(action=AuditEvent.Action.WEBHOOK_CREATED).count() == 1
    assert IdempotencyKey.objects.get(key="ep-race").webhook_endpoint_id == first.json()["id"]


@pytest.mark.django_db(transaction=True)  # each submission commits on its own connection
def test_two_job_submissions_with_one_key_at_once_make_one_job_charged_once(
        sent_tasks, clean_redis, settings):
    # Room for both admissions, so the winner is sent at once whichever of the two wins.
    settings.SLUICE_POOL_SLOTS = {"video-hbm": 2}
    api_key = api_key_obj(tenant_with_limits(budget_cu=100, max_jobs=2))

    def submit():
        return video_job_submit(api_key, cu=2, idempotency_key="job-race",
                                request_body={"prompt": "a"})

    submissions = at_once_with_one_key(api_key.tenant, "job-race", submit, submit)
    assert sorted(submission.replayed for submission in submissions) == [False, True], submissions
    (job,) = Job.objects.all()
    assert {submission.job.pk for submission in submissions} == {job.pk}
    assert sent_tasks == [(job.pk, 1, "video-hbm")]
    # The loser's reservation rolled back with its job, and Redis gave back what it admitted.
    assert list(Reservation.objects.values_list("pk", flat=True)) == [job.reservation_id]
    keys = CounterKeys(tenant_id=api_key.tenant_id, api_key_id=api_key.pk,
                       period=period_of(timezone.now()), pool="video-hbm")
    assert budget_used_from_ledger(tenant_id=api_key.tenant_id, period=keys.period)[0] == 2000
    assert int(clean_redis.get(keys.budget)) == 2000 == int(clean_redis.get(keys.pool_sum))
    assert clean_redis.zcard(keys.in_flight) == 1
