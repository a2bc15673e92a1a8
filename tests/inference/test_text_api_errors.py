"""The text endpoints' refusals before any job: the error shape and the headers every API
response carries (DESIGN.md), as the DRF views answer them. No engine needed."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from inference.models import Job

# The text endpoints are async views: they read the key on their own connection.
pytestmark = pytest.mark.django_db(transaction=True)

RATE_HEADERS = ("x-ratelimit-limit-cu", "x-ratelimit-remaining-cu", "x-ratelimit-reset-cu")
PATHS = ["/v1/completions", "/v1/chat/completions"]


def client(key: str | None) -> APIClient:
    api = APIClient(raise_request_exception=False)
    if key is not None:
        api.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return api


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("method", ["get", "put", "delete", "options"])
def test_another_method_is_a_405_saying_what_is_allowed_with_the_keys_headers(cast, path, method):
    response = getattr(client(cast.owner_key), method)(path)
    assert response.status_code == 405, response.content
    assert response["Allow"] == "POST"  # RFC 9110: a 405 lists the allowed methods
    assert response.json()["error"] == {
        "type": "invalid_request_error", "code": "method_not_allowed", "param": None,
        "message": f'Method "{method.upper()}" not allowed.'}
    assert response["x-ratelimit-limit-cu"] == "2000"  # pro tier
    assert all(name in response for name in (*RATE_HEADERS, "x-request-id"))


@pytest.mark.parametrize("path", PATHS)
def test_a_405_checks_the_key_first_as_every_other_endpoint(cast, path):
    wrong = client("sk-not-a-key").get(path)
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    keyless = client(None).get(path)
    assert keyless.status_code == 405 and "x-ratelimit-limit-cu" not in keyless


@pytest.mark.parametrize("path", PATHS)
def test_a_body_over_the_upload_limit_is_a_413_in_the_error_shape(cast, settings, sent_tasks, path):
    """It was Django's HTML 'Bad Request (400)' page: the SDK's error had no code or message."""
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    body = {"model": "sluice-code-tiny", "prompt": "x" * 2000, "max_tokens": 4,
            "messages": [{"role": "user", "content": "x" * 2000}]}
    response = client(cast.owner_key).post(path, body, format="json")
    assert response.status_code == 413, response.content
    assert response["Content-Type"] == "application/json"
    assert response.json()["error"]["code"] == "invalid_parameter"
    assert "over 1,000 bytes" in response.json()["error"]["message"]
    assert response["x-should-retry"] == "false"
    assert all(name in response for name in (*RATE_HEADERS, "x-request-id"))
    assert not Job.objects.exists()


def test_messages_the_models_chat_template_refuses_are_a_400_invalid_prompt_context(
        cast, code_checkpoints, sent_tasks):
    """It was a 500: a real checkpoint's template raises on turns that do not alternate."""
    code_checkpoints(chat_template=(
        "{% for message in messages %}{% if message['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "{{ message['content'] }}{% endfor %}"))
    response = client(cast.owner_key).post("/v1/chat/completions", {
        "model": "sluice-code-tiny", "max_tokens": 4,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
    }, format="json")
    assert response.status_code == 400, response.content
    assert response.json()["error"] == {
        "type": "invalid_request_error", "code": "invalid_prompt_context", "param": "messages",
        "message": "sluice-code-tiny's chat template refused the messages: System role not supported"}
    assert all(name in response for name in (*RATE_HEADERS, "x-request-id"))
    assert not Job.objects.exists()
