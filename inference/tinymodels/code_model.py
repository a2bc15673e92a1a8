"""The tiny Llama code model: its shape, its training loop and its evaluation.

The shape is a real LlamaForCausalLM so vLLM's and transformers' Llama code paths serve it
unchanged; only the sizes are small enough to train on two CPU cores in minutes.
"""

from __future__ import annotations

import ast
import json
import math
import random
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from inference.tinymodels.code_tokenizer import SourceFile

# max_position_embeddings: the registry reads sluice-code-tiny's context_length from it.
CONTEXT_LENGTH = 1024


@dataclass(frozen=True)
class CodeModelShape:
    vocab_size: int = 6144
    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4  # head_dim 64: a size every vLLM CPU attention kernel has
    num_key_value_heads: int = 2


# Small enough for a test to build and train for a few steps in a second or two.
TINY_TEST_SHAPE = CodeModelShape(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=1,
    num_attention_heads=1,
    num_key_value_heads=1,
)


@dataclass(frozen=True)
class TrainingPlan:
    max_steps: int = 1200
    max_minutes: float = 25.0
    batch_size: int = 16
    sequence_length: int = 256
    peak_learning_rate: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    seed: int = 0
    eval_every_steps: int = 0  # 0: only at the end; mid-run evals cost CPU we'd rather train with


def build_llama_config(shape: CodeModelShape, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=CONTEXT_LENGTH,
        rope_theta=10000.0,
        tie_word_embeddings=True,  # the embedding is a third of the weights; sharing it halves that
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )


def build_untrained_model(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def parameter_count(model: torch.nn.Module) -> int:
    # Tied weights appear once in parameters(), so this is the real count.
    return sum(p.numel() for p in model.parameters())


def token_stream(files: list[SourceFile], tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    """All files as one sequence: <bos> file <eos> <bos> file <eos> ..."""
    ids: list[int] = []
    for source_file in files:
        ids.append(tokenizer.bos_token_id)
        ids.extend(tokenizer(source_file.text, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def learning_rate_at(step: int, progress: float, plan: TrainingPlan) -> float:
    """Linear warmup, then cosine to a tenth of the peak as `progress` goes 0 -> 1."""
    if step < plan.warmup_steps:
        return plan.peak_learning_rate * (step + 1) / plan.warmup_steps
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return plan.peak_learning_rate * (0.1 + 0.9 * cosine)


@torch.no_grad()
def validation_loss(
    model: PreTrainedModel, stream: torch.Tensor, sequence_length: int, max_windows: int
) -> float:
    """Mean next-token loss over non-overlapping windows from the start of the stream."""
    model.eval()
    window_count = min(max_windows, (len(stream) - 1) // sequence_length)
    total_loss = 0.0
    for index in range(window_count):
        start = index * sequence_length
        window = stream[start : start + sequence_length + 1]
        logits = model(input_ids=window[:-1].unsqueeze(0)).logits
        total_loss += torch.nn.functional.cross_entropy(logits[0], window[1:]).item()
    return total_loss / window_count


def train_code_model(
    model: LlamaForCausalLM,
    train_stream: torch.Tensor,
    plan: TrainingPlan,
    log_line: Callable[[dict], None],
) -> dict:
    generator = torch.Generator().manual_seed(plan.seed)
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        (no_decay if parameter.ndim < 2 or "norm" in name else decay).append(parameter)
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": plan.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=plan.peak_learning_rate,
        betas=(0.9, 0.95),
    )
    model.train()
    started = time.monotonic()
    budget_seconds = plan.max_minutes * 60.0
    step = 0
    loss_value = float("nan")
    while step < plan.max_steps:
        elapsed = time.monotonic() - started
        if elapsed >= budget_seconds:
            break
        # Progress is whichever runs out first, steps or wall time, so a slower machine
        # still finishes its cosine schedule instead of stopping at a high learning rate.
        progress = max(step / plan.max_steps, elapsed / budget_seconds)
        learning_rate = learning_rate_at(step, progress, plan)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate
        starts = torch.randint(
            0, len(train_stream) - plan.sequence_length - 1, (plan.batch_size,), generator=generator
        )
        batch = torch.stack(
            [train_stream[s : s + plan.sequence_length + 1] for s in starts.tolist()]
        )
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        loss_value = loss.item()
        step += 1
        log_line(
            {
                "step": step,
                "loss": round(loss_value, 4),
                "lr": round(learning_rate, 6),
                "elapsed_s": round(time.monotonic() - started, 2),
            }
        )
    model.eval()
    return {
        "steps": step,
        "final_train_loss": loss_value,
        "train_seconds": round(time.monotonic() - started, 1),
        "tokens_seen": step * plan.batch_size * plan.sequence_length,
    }


def default_generation_config(tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=0.8,
        top_p=0.95,
        max_new_tokens=128,
    )


# --- evaluation: do sampled function bodies parse? ---------------------------------


@dataclass(frozen=True)
class FunctionHeader:
    relative_path: str
    text: str  # dedented, ends with ":\n"
    real_body: str  # what the file has under it, dedented by the same amount


def function_headers(files: list[SourceFile]) -> list[FunctionHeader]:
    """`def ...:` lines (multi-line signatures too) whose body starts on a later line."""
    headers: list[FunctionHeader] = []
    for source_file in files:
        try:
            tree = ast.parse(source_file.text)
        except SyntaxError:
            continue
        lines = source_file.text.splitlines(keepends=True)
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            body_line = node.body[0].lineno
            if body_line <= node.lineno:
                continue  # one-liner "def f(): pass"
            header_line_count = body_line - node.lineno
            whole = textwrap.dedent("".join(lines[node.lineno - 1 : node.end_lineno]))
            whole_lines = whole.splitlines(keepends=True)
            header = "".join(whole_lines[:header_line_count])
            if header.rstrip().endswith(":"):
                headers.append(
                    FunctionHeader(
                        relative_path=source_file.relative_path,
                        text=header.rstrip() + "\n",
                        real_body="".join(whole_lines[header_line_count:]),
                    )
                )
    return headers


def sample_headers(headers: list[FunctionHeader], count: int, seed: int) -> list[FunctionHeader]:
    return random.Random(seed).sample(headers, min(count, len(headers)))  # noqa: S311


def cut_body(generated: str) -> str:
    """Keep the indented body lines up to the first blank line or dedent."""
    kept: list[str] = []
    for line in generated.split("\n"):
        if not line.strip() or not line[:1].isspace():
            break
        kept.append(line)
    return "\n".join(kept) + "\n" if kept else ""


def parses(source: str) -> bool:
    try:
        ast.parse(source)
    except (SyntaxError, ValueError):
        return False
    return True


def _closers_for(text: str) -> str:
    """The brackets and quote that close what `text` leaves open (a rough scanner)."""
    stack: list[str] = []
    pairs = {"(": ")", "[": "]", "{": "}"}
    quote: str | None = None
    index = 0
    while index < len(text):
        char = text[index]
        if quote:
            if char == "\\":
                index += 2
                continue
            if text.startswith(quote, index):
                index += len(quote)
                quote = None
                continue
        elif char == "#":
            newline = text.find("\n", index)
            index = len(text) if newline < 0 else newline
            continue
        elif char in "'\"":
            quote = text[index : index + 3] if text[index : index + 3] in ("'''", '"""') else char
            index += len(quote)
            continue
        elif char in pairs:
            stack.append(pairs[char])
        elif char in ")]}" and stack and stack[-1] == char:
            stack.pop()
        index += 1
    return (quote or "") + "".join(reversed(stack))


def repaired_completion(header: str, body: str) -> str | None:
    """A parseable version of header+body via the documented repairs, or None.

    Repairs, tried with 0, 1, 2 or 3 trailing generated lines dropped (the last line is
    usually cut off mid-statement), but always keeping at least one generated line:
    close an open string and open brackets at the end, and if the last kept line opens a
    block (ends with ":"), add an indented `pass` under it.
    """
    body_lines = body.rstrip("\n").split("\n") if body.strip() else []
    for drop in range(0, min(len(body_lines) - 1, 3) + 1):
        kept = body_lines[: len(body_lines) - drop]
        candidate_body = "\n".join(kept)
        candidate_body += _closers_for(header + candidate_body) + "\n"
        last_line = kept[-1]
        if last_line.rstrip().endswith(":"):
            indent = last_line[: len(last_line) - len(last_line.lstrip())]
            candidate_body += indent + "    pass\n"
        candidate = header + candidate_body
        if parses(candidate):
            return candidate
    return None


@torch.no_grad()
def header_completion_eval(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    headers: list[FunctionHeader],
    seed: int,
    max_new_tokens: int = 128,
    batch_size: int = 25,
) -> dict:
    torch.manual_seed(seed)
    model.eval()
    examples: list[dict] = []
    for batch_start in range(0, len(headers), batch_size):
        batch = headers[batch_start : batch_start + batch_size]
        # The prompt stops at the colon, not after the newline: BPE merges "\n" with the
        # next line's indentation ("\n    " is one token), so a prompt ending in a bare
        # "\n" is a token boundary the model never saw in training.
        prompts = [tokenizer.bos_token + header.text.rstrip("\n") for header in batch]
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        output = model.generate(
            **encoded,
            do_sample=True,
            temperature=0.8,
            top_p=0.95,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = output[:, encoded["input_ids"].shape[1] :]
        for header, tokens in zip(batch, new_tokens, strict=True):
            generated = tokenizer.decode(tokens, skip_special_tokens=True)
            # Whatever the model adds to the header line itself (a comment, say) stays.
            header_line_rest, newline, after_header = generated.partition("\n")
            completed_header = header.text.rstrip("\n") + header_line_rest + "\n"
            body = cut_body(after_header) if newline else ""
            raw = completed_header + body
            repaired = repaired_completion(completed_header, body)
            examples.append(
                {
                    "file": header.relative_path,
                    "completion": raw,
                    "body_empty": not body,
                    # An empty body is a failure even though "header + pass" would parse.
                    "parses_raw": bool(body) and parses(raw),
                    "parses_repaired": bool(body) and repaired is not None,
                }
            )
    total = len(examples)
    # The same cut applied to the real bodies: a blank line inside a real function also
    # ends the "completion", so this is the best share the harness can report.
    ceiling = sum(parses(h.text + cut_body(h.real_body)) for h in headers) / len(headers)
    return {
        "real_body_parse_share": ceiling,
        "real_body_parse_share_repaired": sum(
            repaired_completion(h.text, cut_body(h.real_body)) is not None for h in headers
        )
        / len(headers),
        "completions": total,
        "parse_share_raw": sum(e["parses_raw"] for e in examples) / total,
        "parse_share_repaired": sum(e["parses_repaired"] for e in examples) / total,
        "empty_body_share": sum(e["body_empty"] for e in examples) / total,
        "examples": examples,
    }


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
