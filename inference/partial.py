"""Partial completions: when generation stops early (length, cancel, disconnect, content
filter), the longest prefix of the generated code that parses as Python, repaired where
possible by closing open strings and brackets and giving an open block a body.

The repair is syntactic only: it never invents code beyond closers and `pass`.
"""

from __future__ import annotations

import ast
import io
import tokenize
from dataclasses import dataclass

_CLOSER = {"(": ")", "[": "]", "{": "}"}
MAX_CUTS = 60


@dataclass(frozen=True)
class PartialCompletion:
    text: str  # the kept prefix of the generation plus the closers added
    kept_chars: int  # how much of the generation was kept
    added: str  # what the repair appended

    def as_dict(self) -> dict:
        return {"text": self.text, "kept_chars": self.kept_chars, "added": self.added}


def _parses(source: str) -> bool:
    try:
        ast.parse(source)
        return True
    except (SyntaxError, ValueError):
        return False


def _open_state(source: str) -> tuple[list[str], str | None]:
    """Open brackets (innermost last) and the quote of an unterminated string, if any."""
    stack: list[str] = []
    quote: str | None = None
    index = 0
    while index < len(source):
        char = source[index]
        if quote is not None:
            if char == "\\":
                index += 2
                continue
            if source.startswith(quote, index):
                index += len(quote)
                quote = None
                continue
            if char == "\n" and len(quote) == 1:
                quote = None  # a single-quoted string cannot span lines: the line is broken
            index += 1
            continue
        if char == "#":
            newline = source.find("\n", index)
            index = len(source) if newline == -1 else newline
            continue
        if char in "'\"":
            triple = source[index:index + 3]
            quote = triple if triple in ('"""', "'''") else char
            index += len(quote)
            continue
        if char in _CLOSER:
            stack.append(char)
        elif char in ")]}" and stack and _CLOSER[stack[-1]] == char:
            stack.pop()
        index += 1
    return stack, quote


def _last_code_line(source: str) -> str:
    for line in reversed(source.splitlines()):
        if line.strip() and not line.strip().startswith("#"):
            return line
    return ""


def _repair(source: str) -> str:
    """The closers that would make `source` complete: string, brackets, then a block body."""
    stack, quote = _open_state(source)
    added = (quote or "") + "".join(_CLOSER[bracket] for bracket in reversed(stack))
    last = _last_code_line(source + added)
    if last.rstrip().endswith(":"):
        indent = len(last) - len(last.lstrip())
        added += ("" if (source + added).endswith("\n") else "\n") + " " * (indent + 4) + "pass\n"
    return added


def _cut_points(text: str) -> list[int]:
    """Where to try cutting: the whole text, then line ends and token ends, longest first."""
    cuts = {len(text)}
    cuts.update(index + 1 for index, char in enumerate(text) if char == "\n")
    # Where each line starts (tokenize counts lines from 1, as splitlines splits them).
    line_starts = [0]
    for line in text.splitlines(keepends=True):
        line_starts.append(line_starts[-1] + len(line))
    try:
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            cuts.add(line_starts[min(token.end[0] - 1, len(line_starts) - 1)] + token.end[1])
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    return sorted((cut for cut in cuts if 0 < cut <= len(text)), reverse=True)[:MAX_CUTS]


def partial_completion(generated: str, *, context: str = "") -> PartialCompletion | None:
    """The longest repaired prefix of `generated` that parses when appended to `context`
    (the prompt, for plain completions). None when nothing does."""
    for cut in _cut_points(generated):
        kept = generated[:cut]
        added = _repair(context + kept)
        if _parses(context + kept + added):
            return PartialCompletion(text=kept + added, kept_chars=cut, added=added)
    return None
