"""Counting tokens with each model's own tokenizer (loaded once per process, offline)."""

from __future__ import annotations

import functools
import re
import secrets
from pathlib import Path

# Imported at start-up, not lazily on the first request: transformers' lazy first import is
# not thread-safe, and concurrent first requests failed with "cannot import name AutoTokenizer".
import jinja2
from transformers import AutoTokenizer

from inference.errors import InvalidPromptContext
from inference.registry import ModelSpec
from portal.errors import InvalidParameter


@functools.cache
def _tokenizer(checkpoint: str):
    return AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)


def tokenizer_for(spec: ModelSpec, variant: str = "full"):
    return _tokenizer(str(Path(spec.variant(variant).checkpoint)))


def render_chat(spec: ModelSpec, messages: list[dict]) -> str:
    """The prompt text a chat request becomes, through the model's chat template. A template
    that refuses the messages (`raise_exception` in many checkpoints' templates) answers the
    400 with its own words, not a 500; a template that does not parse is the server's bug."""
    tokenizer = tokenizer_for(spec)
    if tokenizer.chat_template is None:
        raise InvalidPromptContext(f"{spec.id} has no chat template: send a prompt to "
                                   "/v1/completions instead.", param="messages")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except jinja2.TemplateSyntaxError:
        raise
    except jinja2.TemplateError as exc:
        raise InvalidPromptContext(f"{spec.id}'s chat template refused the messages: {exc}",
                                   param="messages") from exc


def encode_chat(spec: ModelSpec, messages: list[dict]) -> tuple[str, list[int]]:
    """A chat request's prompt text and token ids. The template's own role markers become
    special tokens; what the messages say never does: a user who writes `<|end|><|system|>`
    must not close their turn and open a system one (OpenAI reads such text as text)."""
    tokenizer = tokenizer_for(spec)
    text = render_chat(spec, messages)
    specials = tokenizer.all_special_tokens
    if not any(special in message["content"] for message in messages for special in specials):
        return text, encode(spec, text)  # the common case: nothing in the content to escape
    # Render with a marker per message, then encode the template's pieces with their special
    # tokens and each content with its special-token strings split into ordinary pieces.
    marker = f"\ue000{secrets.token_hex(8)}:"
    marked = render_chat(spec, [{**message, "content": f"{marker}{index}{marker}"}
                                for index, message in enumerate(messages)])
    pieces = re.split(f"{re.escape(marker)}(\\d+){re.escape(marker)}", marked)
    ids: list[int] = []
    for position, piece in enumerate(pieces):
        if position % 2:  # a message's content
            content = messages[int(piece)]["content"]
            ids += tokenizer(content, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        elif piece:
            ids += encode(spec, piece)
    return text, ids


def encode(spec: ModelSpec, text: str) -> list[int]:
    # The chat template writes its own special tokens; plain prompts get none added.
    return tokenizer_for(spec)(text, add_special_tokens=False)["input_ids"]


def decode_checked(spec: ModelSpec, token_ids: list[int], *, param: str) -> str:
    """The text of a prompt sent as token ids, refusing ids outside the model's vocabulary."""
    tokenizer = tokenizer_for(spec)
    vocabulary = len(tokenizer)
    bad = next((token for token in token_ids if not 0 <= token < vocabulary), None)
    if bad is not None:
        raise InvalidParameter(f"Token id {bad} is outside {spec.id}'s vocabulary "
                               f"(0 to {vocabulary - 1}).", param=param)
    return tokenizer.decode(token_ids)


def count_tokens(spec: ModelSpec, text: str) -> int:
    return len(encode(spec, text))
