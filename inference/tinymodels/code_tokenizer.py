"""The code model's corpus (the interpreter's own standard library) and its BPE tokenizer.

The corpus is whatever `.py` files the running interpreter ships, so a fresh machine can
rebuild the tokenizer and the model without any download. Files go to train or validation
by a hash of their path relative to the stdlib, so the split is the same on every machine
with the same Python version and never leaks one file into both sides.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BOS_TOKEN = "<|bos|>"  # noqa: S105 (a special token, not a secret)
EOS_TOKEN = "<|eos|>"  # noqa: S105 (a special token, not a secret)
PAD_TOKEN = "<|pad|>"  # noqa: S105 (a special token, not a secret)
SYSTEM_TOKEN = "<|system|>"  # noqa: S105 (a special token, not a secret)
USER_TOKEN = "<|user|>"  # noqa: S105 (a special token, not a secret)
ASSISTANT_TOKEN = "<|assistant|>"  # noqa: S105 (a special token, not a secret)
END_TOKEN = "<|end|>"  # noqa: S105 (a special token, not a secret)
SPECIAL_TOKENS = [
    PAD_TOKEN,
    BOS_TOKEN,
    EOS_TOKEN,
    SYSTEM_TOKEN,
    USER_TOKEN,
    ASSISTANT_TOKEN,
    END_TOKEN,
]

# Each message is "<|role|>\n{content}<|end|>\n"; a generation prompt ends with
# "<|assistant|>\n" so the model continues as the assistant. The model never saw chat
# data (it only knows Python), but the platform needs a real template to render
# /v1/chat/completions requests and count their tokens.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# Test suites and vendored packages would dominate the corpus with asserts and
# third-party style; the rest of the stdlib is plenty for a few-million-parameter model.
_SKIPPED_DIRECTORY_NAMES = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)
VALIDATION_SHARE_PERCENT = 5


@dataclass(frozen=True)
class SourceFile:
    relative_path: str
    text: str


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_source_files(root: Path | None = None) -> list[SourceFile]:
    """Every UTF-8 `.py` file under the stdlib, sorted by relative path."""
    root = root or stdlib_root()
    files: list[SourceFile] = []
    for path in sorted(root.rglob("*.py")):
        relative_parts = path.relative_to(root).parts
        if any(part in _SKIPPED_DIRECTORY_NAMES for part in relative_parts[:-1]):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a handful of files are latin-1 test fixtures; not worth a special case
        if text.strip():
            files.append(SourceFile(relative_path="/".join(relative_parts), text=text))
    return files


def is_validation_file(relative_path: str) -> bool:
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % 100 < VALIDATION_SHARE_PERCENT


def split_train_validation(
    files: list[SourceFile],
) -> tuple[list[SourceFile], list[SourceFile]]:
    train = [f for f in files if not is_validation_file(f.relative_path)]
    validation = [f for f in files if is_validation_file(f.relative_path)]
    return train, validation


def train_tokenizer(train_files: list[SourceFile], vocab_size: int) -> Tokenizer:
    """Byte-level BPE: every byte is in the base alphabet, so any text round-trips."""
    tokenizer = Tokenizer(models.BPE())
    # GPT-2's split keeps runs of spaces together, so indentation becomes few tokens;
    # no prefix space, so decoding gives back exactly the bytes that went in.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_texts(train_files), trainer=trainer)
    return tokenizer


def _texts(files: list[SourceFile]) -> Iterator[str]:
    for source_file in files:
        yield source_file.text


def wrap_tokenizer(tokenizer: Tokenizer, model_max_length: int) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, END_TOKEN],
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
        # Cleaning up "tokenization spaces" would delete spaces before punctuation,
        # which breaks the exact round trip of source code.
        clean_up_tokenization_spaces=False,
        padding_side="left",
    )


def build_code_tokenizer(
    train_files: list[SourceFile], vocab_size: int = 6144, model_max_length: int = 1024
) -> PreTrainedTokenizerFast:
    return wrap_tokenizer(train_tokenizer(train_files, vocab_size), model_max_length)
