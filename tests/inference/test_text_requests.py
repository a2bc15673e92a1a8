"""A text request's parsing, in-process (the API tests against the real stack are in
test_text.py)."""

from __future__ import annotations

import pytest

from inference.requests import text_request_parse
from portal.errors import InvalidParameter
from tests.factories import tier

MODEL = "sluice-code-tiny"


@pytest.mark.django_db
@pytest.mark.parametrize("prompt", [["def f():", "class A:"], ["def f():"], [1, 2, 3], [[1, 2]], 5])
def test_a_prompt_that_is_not_one_string_is_refused_saying_what_is_supported(prompt):
    with pytest.raises(InvalidParameter) as refused:
        text_request_parse(payload={"model": MODEL, "prompt": prompt}, tier=tier("pro"), chat=False)
    assert refused.value.param == "prompt"
    assert "Send one prompt as a string" in str(refused.value)


@pytest.mark.django_db
def test_a_string_prompt_is_taken_as_it_is():
    text = text_request_parse(payload={"model": MODEL, "prompt": "  def f():\n"}, tier=tier("pro"),
                              chat=False)
    assert text.prompt_text == "  def f():\n" and text.prompt_tokens > 0
