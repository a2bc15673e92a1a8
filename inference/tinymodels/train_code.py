"""Train sluice-code-tiny from scratch: tokenizer, model, training log, eval, model card.

    python -m inference.tinymodels.train_code --out inference/artifacts/sluice-code-tiny

Everything comes from the running interpreter's standard library; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from inference.tinymodels import code_model
from inference.tinymodels.code_model import CodeModelShape, TrainingPlan
from inference.tinymodels.code_tokenizer import (
    build_code_tokenizer,
    split_train_validation,
    stdlib_source_files,
)
from inference.tinymodels.model_card import write_code_model_card


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    defaults = TrainingPlan()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=defaults.max_minutes)
    parser.add_argument("--max-steps", type=int, default=defaults.max_steps)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--sequence-length", type=int, default=defaults.sequence_length)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--validation-windows", type=int, default=200)
    parser.add_argument("--eval-completions", type=int, default=100)
    parser.add_argument(
        "--eval-only",
        action="store_true",
        help="re-run the evaluation (and model card) of the model already in --out",
    )
    parser.add_argument(
        "--tiny", action="store_true", help="a one-layer toy shape, for tests of this command"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    arguments = parse_arguments(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(arguments.threads)
    out: Path = arguments.out
    out.mkdir(parents=True, exist_ok=True)
    command_started = time.monotonic()

    shape = code_model.TINY_TEST_SHAPE if arguments.tiny else CodeModelShape()
    plan = TrainingPlan(
        max_steps=arguments.max_steps,
        max_minutes=arguments.minutes,
        batch_size=arguments.batch_size,
        sequence_length=arguments.sequence_length,
        seed=arguments.seed,
    )

    train_files, validation_files = split_train_validation(stdlib_source_files())
    tokenizer = build_code_tokenizer(
        train_files, vocab_size=shape.vocab_size, model_max_length=code_model.CONTEXT_LENGTH
    )
    train_stream = code_model.token_stream(train_files, tokenizer)
    validation_stream = code_model.token_stream(validation_files, tokenizer)
    print(
        f"corpus: {len(train_files)} train files ({len(train_stream)} tokens), "
        f"{len(validation_files)} validation files ({len(validation_stream)} tokens)",
        flush=True,
    )

    config = code_model.build_llama_config(shape, tokenizer)
    model = code_model.build_untrained_model(config, seed=arguments.seed)
    untrained_validation_loss = code_model.validation_loss(
        model, validation_stream, plan.sequence_length, arguments.validation_windows
    )
    print(f"untrained validation loss {untrained_validation_loss:.3f}", flush=True)

    if arguments.eval_only:
        # Training figures come from the run that made the weights; only the eval is new.
        previous = json.loads((out / "eval.json").read_text(encoding="utf-8"))
        training, plan = previous["training"], TrainingPlan(**previous["plan"])
        command = previous["command"]
        threads = previous["threads"]
        model = AutoModelForCausalLM.from_pretrained(out)
        tokenizer = AutoTokenizer.from_pretrained(out)
    else:
        command = "python -m inference.tinymodels.train_code " + " ".join(sys.argv[1:])
        threads = arguments.threads
        with (out / "training_log.jsonl").open("w", encoding="utf-8") as log_file:

            def log_line(record: dict) -> None:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                if record["step"] % 25 == 0 or record["step"] == 1:
                    print(json.dumps(record), flush=True)

            training = code_model.train_code_model(model, train_stream, plan, log_line)
        model.generation_config = code_model.default_generation_config(tokenizer)
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)

    trained_validation_loss = code_model.validation_loss(
        model, validation_stream, plan.sequence_length, arguments.validation_windows
    )
    headers = code_model.sample_headers(
        code_model.function_headers(validation_files), arguments.eval_completions, arguments.seed
    )
    completions = code_model.header_completion_eval(model, tokenizer, headers, seed=arguments.seed)
    evaluation = {
        "parameters": code_model.parameter_count(model),
        "shape": asdict(shape),
        "plan": asdict(plan),
        "training": training,
        "corpus": {
            "python": platform.python_version(),
            "train_files": len(train_files),
            "validation_files": len(validation_files),
            "train_tokens": len(train_stream),
            "validation_tokens": len(validation_stream),
            "vocab_size": len(tokenizer),
        },
        "validation": {
            "windows": min(
                arguments.validation_windows, (len(validation_stream) - 1) // plan.sequence_length
            ),
            "sequence_length": plan.sequence_length,
            "trained_loss": round(trained_validation_loss, 4),
            "trained_perplexity": round(math.exp(trained_validation_loss), 2),
            "untrained_loss": round(untrained_validation_loss, 4),
            "untrained_perplexity": round(math.exp(untrained_validation_loss), 2),
        },
        "header_completions": {
            key: value for key, value in completions.items() if key != "examples"
        },
        "threads": threads,
        "command_seconds": round(time.monotonic() - command_started, 1)
        if not arguments.eval_only
        else previous["command_seconds"],
        "command": command,
    }
    code_model.write_json(out / "eval.json", evaluation)
    code_model.write_json(out / "eval_completions.json", {"examples": completions["examples"]})
    write_code_model_card(out, evaluation)
    print(json.dumps({k: v for k, v in evaluation.items() if k != "plan"}, indent=2), flush=True)
    return out


if __name__ == "__main__":
    main()
