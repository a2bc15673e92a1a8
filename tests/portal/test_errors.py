"""Django's and DRF's own refusals of a request, in DESIGN.md's error body like every other."""

from __future__ import annotations

import pytest

from inference.models import Job

pytestmark = pytest.mark.django_db

RATE_HEADERS = ("x-ratelimit-limit-cu", "x-ratelimit-remaining-cu", "x-ratelimit-reset-cu")


@pytest.mark.parametrize(("path", "encoding"), [
    ("/v1/quotes", "json"), ("/v1/videos", "json"), ("/v1/videos", "multipart"),
    ("/v1/moderations", "json"), ("/v1/webhooks", "json"),
])
def test_a_body_over_the_upload_limit_is_a_413_in_the_error_shape(cast, api, sent_tasks, settings,
                                                                   path, encoding):
    """Django refuses to read a body over DATA_UPLOAD_MAX_MEMORY_SIZE; an API view answered that
    with a 500 internal_error (an SDK retries a 500 twice, to the same end)."""
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    body = {"model": "sluice-video-tiny", "prompt": "a blue circle " * 100, "input": "x" * 1500,
            "url": "https://example.com/hooks"}
    response = api.bearer(cast.owner_key).post(path, body, format=encoding)
    assert response.status_code == 413, response.content
    assert response.json()["error"] == {
        "type": "invalid_request_error", "code": "invalid_parameter", "param": None,
        "message": "The request body is over 1,000 bytes, the most this server accepts."}
    assert response["x-should-retry"] == "false"
    assert all(name in response for name in (*RATE_HEADERS, "x-request-id"))
    assert not Job.objects.exists()


def test_too_many_form_fields_is_a_400_in_the_error_shape(cast, api, sent_tasks, settings):
    settings.DATA_UPLOAD_MAX_NUMBER_FIELDS = 3
    body = {"model": "sluice-video-tiny", "prompt": "a blue circle", "size": "64x64",
            "seconds": "0.5", "num_inference_steps": "2"}
    response = api.bearer(cast.owner_key).post("/v1/videos", body, format="multipart")
    assert response.status_code == 400, response.content
    assert response.json()["error"]["code"] == "invalid_parameter"
    assert "DATA_UPLOAD_MAX_NUMBER_FIELDS" in response.json()["error"]["message"]
    assert not Job.objects.exists()


def test_a_host_the_server_does_not_answer_to_is_a_400_in_the_error_shape_under_v1(cast, api, client):
    """Django's host check answered API clients with its HTML 'Bad Request (400)' page."""
    response = api.bearer(cast.owner_key).get("/v1/models", HTTP_HOST="attacker.example")
    assert response.status_code == 400
    assert response.json()["error"] == {
        "type": "invalid_request_error", "code": "invalid_parameter", "param": "Host",
        "message": "This server does not answer to that Host header."}
    assert "x-request-id" in response
    # The dashboard keeps Django's page.
    page = client.get("/accounts/login/", HTTP_HOST="attacker.example")
    assert page.status_code == 400 and page["Content-Type"].startswith("text/html")
