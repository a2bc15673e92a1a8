"""A completion whose job was cancelled before it started (its idempotent retry after the
client left, a cancel over the API, a suspension's sweep): its answer says so, in OpenAI's
shape. No engine needed: the job never runs."""

from __future__ import annotations

import json

import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient
from openai._models import construct_type
from openai.types import Completion
from rest_framework.test import APIClient

from inference.services import job_cancel, text_job_create
from tests.factories import api_key_obj

# The text endpoints are async views: they read the key on their own connection.
pytestmark = pytest.mark.django_db(transaction=True)

BODY = {"model": "sluice-code-tiny", "prompt": "def add(a, b):", "max_tokens": 4}
NO_TOKENS = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def _cancelled_before_it_started(tenant, body: dict, idempotency_key: str) -> None:
    submission = text_job_create(api_key=api_key_obj(tenant), payload=body,
                                 idempotency_key=idempotency_key)
    job_cancel(job=submission.job)


def _client(key: str) -> APIClient:
    client = APIClient(raise_request_exception=False)
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return client


def test_a_non_streamed_answer_says_cancelled_and_counts_no_tokens(cast, sent_tasks):
    """It said finish_reason "stop" with `usage: {}`: the SDK's usage counts read None."""
    _cancelled_before_it_started(cast.tenant, BODY, "retry-1")
    response = _client(cast.owner_key).post("/v1/completions", BODY, format="json",
                                            HTTP_IDEMPOTENCY_KEY="retry-1")
    assert response.status_code == 200, response.content
    completion = construct_type(type_=Completion, value=response.json())
    assert completion.choices[0].text == ""
    assert completion.choices[0].finish_reason == "cancelled"  # as a job cancelled while running
    assert completion.usage.model_dump(exclude_none=True) == NO_TOKENS


async def test_a_streamed_answer_says_cancelled_and_its_usage_chunk_counts_no_tokens(cast, sent_tasks):
    body = {**BODY, "stream": True, "stream_options": {"include_usage": True}}
    await sync_to_async(_cancelled_before_it_started)(cast.tenant, body, "retry-2")
    response = await AsyncClient().post(
        "/v1/completions", body, content_type="application/json",
        headers={"Authorization": f"Bearer {cast.owner_key}", "Idempotency-Key": "retry-2"})
    assert response.status_code == 200
    events = b"".join([part async for part in response.streaming_content]).decode().split("\n\n")
    chunks = [json.loads(event.removeprefix("data: ")) for event in events
              if event.startswith("data: {")]
    assert events[-2] == "data: [DONE]"
    assert [chunk["choices"][0]["finish_reason"] for chunk in chunks if chunk["choices"]] == [
        "cancelled"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == NO_TOKENS
