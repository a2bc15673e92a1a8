"""Start a real vLLM engine on a checkpoint folder and stream one completion from it.

    python -m inference.tinymodels.check_vllm --model inference/artifacts/sluice-code-tiny

A manual check (an engine start takes ~30 s of CPU), not part of the test suite. It builds
the engine from the same arguments the model card records, streams with DELTA outputs
the way the platform's text engine does, and prints timings and the streamed text.
vLLM starts its engine core with multiprocessing "spawn", so everything runs under the
`__main__` guard: the child re-imports this module and must not start a second engine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

from transformers import AutoTokenizer

from inference.tinymodels.model_card import VLLM_CPU_ENGINE_ARGUMENTS, VLLM_CPU_ENVIRONMENT


async def stream_one_completion(
    model_path: Path, quantization: str | None, dtype: str | None, prompt: str, max_tokens: int
) -> dict:
    # Imported here so `--help` and the module import stay cheap and side-effect free.
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    engine_arguments = {
        **VLLM_CPU_ENGINE_ARGUMENTS,
        "model": str(model_path),
        "tokenizer": str(model_path),
    }
    if quantization:
        engine_arguments["quantization"] = quantization
    if dtype:
        engine_arguments["dtype"] = dtype
    started = time.monotonic()
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_arguments))
    engine_start_seconds = time.monotonic() - started
    try:
        sampling = SamplingParams(
            max_tokens=max_tokens,
            temperature=0.0,
            ignore_eos=True,  # a fixed token count makes the tokens/s figure comparable
            output_kind=RequestOutputKind.DELTA,
        )
        pieces: list[str] = []
        streamed_token_ids: list[int] = []
        finished_flags: list[bool] = []
        token_count = 0
        delta_count = 0
        first_token_seconds = None
        request_started = time.monotonic()
        async for output in engine.generate(prompt, sampling, request_id="check-1"):
            completion = output.outputs[0]
            if first_token_seconds is None and completion.token_ids:
                first_token_seconds = time.monotonic() - request_started
            delta_count += 1
            token_count += len(completion.token_ids)
            streamed_token_ids.extend(completion.token_ids)
            finished_flags.append(output.finished)
            pieces.append(completion.text)
        request_seconds = time.monotonic() - request_started
    finally:
        engine.shutdown()
        # AsyncLLM.__del__ calls shutdown() again; at interpreter exit that raises
        # "TypeError: 'NoneType' object is not callable", so drop the engine while alive.
        del engine
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    streamed_text = "".join(pieces)
    return {
        # DELTA outputs carry only the new tokens and text of each step; joined, they must
        # equal decoding all the ids at once (byte-level BPE can split a UTF-8 character).
        "deltas_join_to_full_decode": streamed_text == tokenizer.decode(streamed_token_ids),
        "only_last_output_finished": finished_flags[-1] and not any(finished_flags[:-1]),
        "engine_arguments": engine_arguments,
        "environment": {key: os.environ.get(key) for key in VLLM_CPU_ENVIRONMENT},
        "engine_start_seconds": round(engine_start_seconds, 1),
        "first_token_seconds": round(first_token_seconds or 0.0, 3),
        "streamed_deltas": delta_count,
        "completion_tokens": token_count,
        "tokens_per_second": round(token_count / request_seconds, 1),
        "text": streamed_text,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--dtype", default=None, help="override the card's float32")
    parser.add_argument(
        "--prompt", default='def fibonacci(n):\n    """Return the n-th Fibonacci — ünïcode.'
    )
    parser.add_argument("--max-tokens", type=int, default=128)
    arguments = parser.parse_args()
    for key, value in VLLM_CPU_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    result = asyncio.run(
        stream_one_completion(
            arguments.model.resolve(),
            arguments.quantization,
            arguments.dtype,
            arguments.prompt,
            arguments.max_tokens,
        )
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
