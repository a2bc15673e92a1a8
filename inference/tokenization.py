"""Counting tokens with each model's own tokenizer (loaded once per process, offline)."""

from __future__ import annotations

import functools
from pathlib import Path

# Imported at start-up, not lazily on the first request: transformers' lazy first import is
# not thread-safe, and concurrent first requests failed with "cannot import name AutoTokenizer".
from transformers import AutoTokenizer

from inference.registry import ModelSpec


@functools.cache
def _tokenizer(checkpoint: str):
    return AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)


def tokenizer_for(spec: ModelSpec, variant: str = "full"):
    return _tokenizer(str(Path(spec.variant(variant).checkpoint)))


def render_chat(spec: ModelSpec, messages: list[dict]) -> str:
    """The prompt text a chat request becomes, through the model's chat template."""
    return tokenizer_for(spec).apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode(spec: ModelSpec, text: str) -> list[int]:
    # The chat template writes its own special tokens; plain prompts get none added.
    return tokenizer_for(spec)(text, add_special_tokens=False)["input_ids"]


def count_tokens(spec: ModelSpec, text: str) -> int:
    return len(encode(spec, text))
