"""GET /v1/jobs/{id}/events answers as every API endpoint does (DESIGN.md): with a key, its
stream, its 204 and its errors carry the key's rate-limit headers and an x-request-id."""

from __future__ import annotations

import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient

from inference.services import job_cancel
from tests.factories import api_key_obj, video_job_submit

pytestmark = pytest.mark.django_db(transaction=True)

RATE_HEADERS = ("x-ratelimit-limit-cu", "x-ratelimit-remaining-cu", "x-ratelimit-reset-cu")


def _ended_job(tenant):
    """Queued (seq 1), then cancelled (seq 2)."""
    return job_cancel(job=video_job_submit(api_key_obj(tenant), cu=0.01, params={}).job)


async def test_events_answers_carry_the_keys_rate_limit_headers(cast, sent_tasks):
    job = await sync_to_async(_ended_job)(cast.tenant)
    auth = {"Authorization": f"Bearer {cast.owner_key}"}
    stream = await AsyncClient().get(f"/v1/jobs/{job.pk}/events", headers=auth)
    assert stream.status_code == 200 and stream["Content-Type"] == "text/event-stream"
    assert b"job.cancelled" in b"".join([chunk async for chunk in stream.streaming_content])
    resumed_after_the_end = await AsyncClient().get(f"/v1/jobs/{job.pk}/events",
                                                    headers={"Last-Event-ID": "2", **auth})
    assert resumed_after_the_end.status_code == 204
    missing = await AsyncClient().get("/v1/jobs/job_nope/events", headers=auth)
    outsiders = await AsyncClient().get(f"/v1/jobs/{job.pk}/events",
                                        headers={"Authorization": f"Bearer {cast.outsider_key}"})
    assert missing.status_code == outsiders.status_code == 404
    for response in (stream, resumed_after_the_end, missing, outsiders):
        assert response["x-ratelimit-limit-cu"] == "2000", response  # pro tier
        assert all(name in response for name in (*RATE_HEADERS, "x-request-id"))
    # No key, or a wrong one: no bucket to report, still an id.
    for headers in ({}, {"Authorization": "Bearer sk-nope"}):
        refused = await AsyncClient().get(f"/v1/jobs/{job.pk}/events", headers=headers)
        assert refused.status_code == 401 and "x-request-id" in refused
        assert "x-ratelimit-limit-cu" not in refused


@pytest.mark.parametrize("method", ["post", "put", "delete", "options"])
async def test_another_method_than_a_read_is_the_json_405(cast, sent_tasks, method):
    """POST, PUT and DELETE got CSRF's HTML 403 page, OPTIONS the event stream."""
    job = await sync_to_async(_ended_job)(cast.tenant)
    client = AsyncClient(enforce_csrf_checks=True)  # as a client without Django's cookie is
    auth = {"Authorization": f"Bearer {cast.owner_key}"}
    response = await getattr(client, method)(f"/v1/jobs/{job.pk}/events", headers=auth)
    assert response.status_code == 405
    assert response["Allow"] == "GET, HEAD"
    assert response.json()["error"]["code"] == "method_not_allowed"
    assert response["x-ratelimit-limit-cu"] == "2000" and "x-request-id" in response
    wrong_key = await getattr(client, method)(f"/v1/jobs/{job.pk}/events",
                                              headers={"Authorization": "Bearer sk-nope"})
    assert wrong_key.status_code == 401
