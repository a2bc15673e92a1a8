"""The Idempotency-Key header itself: a key the job's row cannot hold is the client's 400."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from inference.models import IdempotencyKey, Job
from quotas.models import Reservation

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
