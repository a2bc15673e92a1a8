"""A null character where a text job keeps text (its prompt, its stop sequences): PostgreSQL's
JSON refuses U+0000, so it is a 400 naming the field, not a job whose insert fails (a 500)."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from inference.models import Job

# The text endpoints are async views: they read the key on their own connection.
pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "def f():\u0000"}, "prompt"),
    ({"prompt": "def f():", "stop": ["\n\u0000"]}, "stop"),
    ({"prompt": "def f():", "stop": "\u0000"}, "stop"),
])
def test_a_null_character_in_a_completion_is_a_400_naming_the_field(cast, sent_tasks, body, param):
    client = APIClient(raise_request_exception=False)
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {cast.owner_key}")
    response = client.post("/v1/completions", {"model": "sluice-code-tiny", "max_tokens": 4, **body},
                           format="json")
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_parameter", param)
    assert "Null characters are not allowed." in error["message"]
    assert not Job.objects.exists()
