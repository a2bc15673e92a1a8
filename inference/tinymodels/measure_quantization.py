"""Compare the full-precision code model with its int8 variants: quality and speed.

    python -m inference.tinymodels.measure_quantization \\
        --full inference/artifacts/sluice-code-tiny \\
        --int8 inference/artifacts/sluice-code-tiny-int8 \\
        --out inference/artifacts/quantization_report.json

Quality is the validation loss on the same held-out windows the training eval uses.
In vLLM it comes from `prompt_logprobs` (the served engine itself scores the text); in
transformers from the logits. Speed is greedy decoding tokens/s. Starts two vLLM engines
one after the other (about a minute of CPU), so it is a manual step, not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from inference.tinymodels import code_model
from inference.tinymodels.code_tokenizer import split_train_validation, stdlib_source_files
from inference.tinymodels.model_card import VLLM_CPU_ENGINE_ARGUMENTS, VLLM_CPU_ENVIRONMENT

SEQUENCE_LENGTH = 256
DECODE_PROMPT = "def parse_header(line):"
DECODE_TOKENS = 128
BATCH_REQUESTS = 16


def validation_windows(tokenizer, window_count: int) -> list[list[int]]:
    _train, validation_files = split_train_validation(stdlib_source_files())
    stream = code_model.token_stream(validation_files, tokenizer)
    return [
        stream[i * SEQUENCE_LENGTH : (i + 1) * SEQUENCE_LENGTH + 1].tolist()
        for i in range(window_count)
    ]


@torch.no_grad()
def transformers_figures(model, tokenizer, windows: list[list[int]]) -> dict:
    model.eval()
    token_logprobs: list[float] = []
    for window in windows:
        ids = torch.tensor([window])
        logits = model(input_ids=ids[:, :-1]).logits.float()
        logprobs = torch.log_softmax(logits[0], dim=-1).gather(1, ids[0, 1:, None])[:, 0]
        token_logprobs.extend(logprobs.tolist())
    prompt = tokenizer(DECODE_PROMPT, return_tensors="pt")
    model.generate(**prompt, max_new_tokens=8, do_sample=False)  # warm-up
    # Best of three: the machine is shared, and the fastest run is the least disturbed.
    seconds = math.inf
    for _attempt in range(3):
        started = time.monotonic()
        output = model.generate(
            **prompt, max_new_tokens=DECODE_TOKENS, min_new_tokens=DECODE_TOKENS, do_sample=False
        )
        seconds = min(seconds, time.monotonic() - started)
    new_tokens = output.shape[1] - prompt["input_ids"].shape[1]
    loss = -sum(token_logprobs) / len(token_logprobs)
    return {
        "token_logprobs": token_logprobs,
        "validation_loss": round(loss, 5),
        "perplexity": round(math.exp(loss), 2),
        "decode_tokens_per_second": round(new_tokens / seconds, 1),
    }


def vllm_figures(model_path: Path, dtype: str, windows: list[list[int]]) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    started = time.monotonic()
    engine = LLM(
        **{
            **VLLM_CPU_ENGINE_ARGUMENTS,
            "model": str(model_path),
            "tokenizer": str(model_path),
            "dtype": dtype,
        }
    )
    engine_start_seconds = time.monotonic() - started
    scoring = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    outputs = engine.generate([TokensPrompt(prompt_token_ids=w) for w in windows], scoring)
    token_logprobs: list[float] = []
    for window, output in zip(windows, outputs, strict=True):
        # prompt_logprobs[i] maps token ids to Logprob for position i; the actual token
        # is always included, whatever the top-k.
        token_logprobs.extend(
            output.prompt_logprobs[i][window[i]].logprob for i in range(1, len(window))
        )
    decode = SamplingParams(max_tokens=DECODE_TOKENS, temperature=0.0, ignore_eos=True)
    engine.generate([DECODE_PROMPT], decode)  # warm-up
    single_seconds = batch_seconds = math.inf
    for _attempt in range(3):  # best of three, as above
        started = time.monotonic()
        single = engine.generate([DECODE_PROMPT], decode)
        single_seconds = min(single_seconds, time.monotonic() - started)
        started = time.monotonic()
        batch = engine.generate([DECODE_PROMPT] * BATCH_REQUESTS, decode)
        batch_seconds = min(batch_seconds, time.monotonic() - started)
    loss = -sum(token_logprobs) / len(token_logprobs)
    result = {
        "token_logprobs": token_logprobs,
        "engine_start_seconds": round(engine_start_seconds, 1),
        "validation_loss": round(loss, 5),
        "perplexity": round(math.exp(loss), 2),
        "decode_tokens_per_second_1_request": round(
            len(single[0].outputs[0].token_ids) / single_seconds, 1
        ),
        f"decode_tokens_per_second_{BATCH_REQUESTS}_requests": round(
            sum(len(o.outputs[0].token_ids) for o in batch) / batch_seconds, 1
        ),
        "greedy_sample": single[0].outputs[0].text[:200],
    }
    del engine
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--full", type=Path, required=True)
    parser.add_argument("--int8", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--windows", type=int, default=200)  # as in eval.json
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-vllm", action="store_true")
    arguments = parser.parse_args()
    for key, value in VLLM_CPU_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    torch.set_num_threads(arguments.threads)

    tokenizer = AutoTokenizer.from_pretrained(arguments.full)
    windows = validation_windows(tokenizer, arguments.windows)
    report: dict = {
        "windows": len(windows),
        "sequence_length": SEQUENCE_LENGTH,
        "decode_tokens": DECODE_TOKENS,
        "threads": arguments.threads,
    }

    full_model = AutoModelForCausalLM.from_pretrained(arguments.full)
    report["transformers_fp32"] = transformers_figures(full_model, tokenizer, windows)
    dynamic_int8 = torch.ao.quantization.quantize_dynamic(
        full_model, {torch.nn.Linear}, dtype=torch.qint8
    )
    report["transformers_fp32_quantize_dynamic_int8"] = transformers_figures(
        dynamic_int8, tokenizer, windows
    )
    del full_model, dynamic_int8
    int8_model = AutoModelForCausalLM.from_pretrained(arguments.int8)
    report["transformers_int8_checkpoint"] = transformers_figures(int8_model, tokenizer, windows)
    del int8_model

    if not arguments.skip_vllm:
        report["vllm_fp32"] = vllm_figures(arguments.full, "float32", windows)
        # bfloat16 without int8 separates what the 16-bit activations cost from what int8 costs.
        report["vllm_bf16"] = vllm_figures(arguments.full, "bfloat16", windows)
        report["vllm_int8_w8a8"] = vllm_figures(arguments.int8, "bfloat16", windows)
    reference = report["transformers_fp32"]["token_logprobs"]
    for figures in report.values():
        if isinstance(figures, dict) and "token_logprobs" in figures:
            variant = figures.pop("token_logprobs")
            # The mean loss hides noise that cancels out; the per-token difference does not.
            figures["mean_abs_logprob_diff_vs_transformers_fp32"] = round(
                sum(abs(a - b) for a, b in zip(variant, reference, strict=True)) / len(reference), 5
            )
    arguments.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
