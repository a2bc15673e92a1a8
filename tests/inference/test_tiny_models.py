"""The tiny model artifacts load offline and work; the commands that build them run.

No database and no vLLM engine here (an engine start costs ~30 s of CPU): the vLLM path
is checked by `python -m inference.tinymodels.check_vllm` and by the text engine's tests.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from inference.tinymodels import build_video, quantize_code, train_code, video_model  # noqa: E402
from inference.tinymodels.code_tokenizer import (  # noqa: E402
    is_validation_file,
    stdlib_root,
    stdlib_source_files,
)

ARTIFACTS = Path(__file__).resolve().parents[2] / "inference" / "artifacts"
CODE_MODEL = ARTIFACTS / "sluice-code-tiny"
CODE_MODEL_INT8 = ARTIFACTS / "sluice-code-tiny-int8"
VIDEO_MODEL = ARTIFACTS / "sluice-video-tiny"
# Read once (~2 s: every .py file of the stdlib), for the parametrisation and the train test.
stdlib_files = functools.cache(stdlib_source_files)


@pytest.fixture(autouse=True)
def two_threads():
    """Each test starts at two (the train test's command sets its own, for the process)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def code_tokenizer():
    return AutoTokenizer.from_pretrained(CODE_MODEL)


def greedy_continuation(model, tokenizer, prompt: str, new_tokens: int) -> tuple[str, int]:
    encoded = tokenizer(prompt, return_tensors="pt")
    output = model.generate(
        **encoded, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
    )
    generated = output[0, encoded["input_ids"].shape[1] :]
    return tokenizer.decode(generated, skip_special_tokens=True), len(generated)


def test_code_model_artifact_loads_offline_and_generates(code_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(CODE_MODEL)
    assert model.config.model_type == "llama"
    assert model.config.max_position_embeddings == 1024  # the registry's context_length
    assert model.dtype == torch.float32
    assert model.config.vocab_size == len(code_tokenizer)
    text, token_count = greedy_continuation(model, code_tokenizer, "def parse(line):\n", 12)
    assert token_count == 12
    assert text.strip()
    evaluation = json.loads((CODE_MODEL / "eval.json").read_text())
    assert evaluation["validation"]["trained_loss"] < evaluation["validation"]["untrained_loss"]


def test_code_artifact_total_size_stays_small():
    total_bytes = sum(p.stat().st_size for p in ARTIFACTS.rglob("*") if p.is_file())
    assert total_bytes < 30 * 1024 * 1024


def test_chat_template_renders_a_prompt(code_tokenizer):
    messages = [
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": "A function that adds."},
    ]
    prompt = code_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert prompt == (
        "<|bos|><|system|>\nYou write Python.<|end|>\n"
        "<|user|>\nA function that adds.<|end|>\n<|assistant|>\n"
    )
    ids = code_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids[0] == code_tokenizer.bos_token_id
    assert code_tokenizer.convert_tokens_to_ids("<|assistant|>") in ids


def tricky_stdlib_files() -> list[Path]:
    """Files with CRLF line ends, non-ASCII text, and large ordinary ones.

    (No stdlib .py file is tab-indented or has trailing spaces; the synthetic test below
    covers those.)
    """
    root = stdlib_root()
    files = stdlib_files()
    with_unicode = [root / f.relative_path for f in files if not f.text.isascii()][:3]
    ordinary = [root / name for name in ("typing.py", "inspect.py", "textwrap.py")]
    # CRLF files live in test data dirs, which the corpus skips; the tokenizer must not care.
    with_crlf = [
        root / "lib2to3" / "tests" / "data" / "crlf.py",
        root / "test" / "tokenizedata" / "coding20731.py",
    ]
    chosen = with_unicode + ordinary + [p for p in with_crlf if p.exists()]
    assert with_unicode
    return chosen


@pytest.mark.parametrize("path", tricky_stdlib_files(), ids=lambda p: p.name)
def test_tokenizer_round_trips_stdlib_source_exactly(code_tokenizer, path: Path):
    # Bytes, not read_text(): universal newlines would turn CRLF into LF before the test.
    source = path.read_bytes().decode("utf-8")
    ids = code_tokenizer(source, add_special_tokens=False)["input_ids"]
    assert code_tokenizer.decode(ids) == source


def test_tokenizer_round_trips_awkward_text(code_tokenizer):
    source = (
        "class A:\n\tdef f(\tx ,y ) :\r\n\t\treturn  x+ y   \n\n\n"
        "s = 'naïve café — 日本語 🐍'  # trailing  \n"
        "    \t  \n"
        "x = '<|eos|>'\n"  # a special token's text inside source code
        "\x0c\n"
    )
    ids = code_tokenizer(source, add_special_tokens=False)["input_ids"]
    assert code_tokenizer.decode(ids) == source


def test_train_command_runs_end_to_end_on_a_tiny_budget(tmp_path: Path, monkeypatch):
    # Every validation file but a tenth of the training files: training the tokenizer on all of
    # the stdlib and tokenising its 3.3M tokens took most of this test's time. One torch thread:
    # the tiny model's generation (the completions eval) ran five times slower on two threads
    # while another process used the second core.
    corpus = [source_file for index, source_file in enumerate(stdlib_files())
              if index % 10 == 0 or is_validation_file(source_file.relative_path)]
    monkeypatch.setattr(train_code, "stdlib_source_files", lambda: corpus)
    out = tmp_path / "code"
    train_code.main(
        [
            "--out",
            str(out),
            "--tiny",
            "--max-steps",
            "3",
            "--batch-size",
            "2",
            "--sequence-length",
            "64",
            "--validation-windows",
            "2",
            "--eval-completions",
            "2",
            "--threads",
            "1",
        ]
    )
    log_lines = (out / "training_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log_lines] == [1, 2, 3]
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["training"]["steps"] == 3
    assert evaluation["header_completions"]["completions"] == 2
    assert (out / "MODEL_CARD.md").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    _text, token_count = greedy_continuation(model, tokenizer, "import os\n", 4)
    assert token_count == 4


def test_quantize_command_writes_int8_weights(tmp_path: Path):
    out = quantize_code.main(["--src", str(CODE_MODEL), "--out", str(tmp_path / "int8")])
    from safetensors.torch import load_file

    tensors = load_file(out / "model.safetensors")
    assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == torch.int8
    assert tensors["model.layers.0.self_attn.q_proj.weight_scale"].shape[1] == 1
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"


def test_quantized_artifact_loads_and_generates(code_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(CODE_MODEL_INT8)
    tokenizer = AutoTokenizer.from_pretrained(CODE_MODEL_INT8)
    assert tokenizer.get_vocab() == code_tokenizer.get_vocab()
    text, token_count = greedy_continuation(model, tokenizer, "def parse(line):\n", 12)
    assert token_count == 12
    assert text.strip()


def test_video_artifact_loads_offline_and_generates_with_a_callback_per_step(tmp_path: Path):
    pipeline, load_seconds = video_model.timed_load(VIDEO_MODEL)
    assert load_seconds < 5  # about 0.05 s when the machine is idle
    steps_seen: list[tuple[int, int]] = []
    frames = video_model.generate_frames(
        pipeline,
        "a red square moving left",
        num_frames=9,
        height=32,
        width=32,
        num_inference_steps=3,
        on_step=lambda step, total: steps_seen.append((step, total)),
    )
    assert steps_seen == [(0, 3), (1, 3), (2, 3)]
    assert frames.shape == (9, 32, 32, 3)
    assert frames.min() >= 0.0 and frames.max() <= 1.0
    mp4 = video_model.write_mp4(frames, tmp_path / "clip.mp4")
    assert build_video.probe_mp4_frames(mp4) == 9


def test_video_build_command_runs_to_a_folder_that_loads(tmp_path: Path):
    out = build_video.main(["--out", str(tmp_path / "video")])
    report = json.loads((out / "build_report.json").read_text())
    assert report["callback_steps"] == report["request"]["num_inference_steps"]
    assert report["mp4_decoded_frames"] == 17
    pipeline = video_model.load_video_pipeline(out)
    steps_seen: list[int] = []
    frames = video_model.generate_frames(
        pipeline,
        "a blue circle",
        num_frames=5,
        height=32,
        width=32,
        num_inference_steps=2,
        on_step=lambda step, total: steps_seen.append(step),
    )
    assert steps_seen == [0, 1]
    assert frames.shape == (5, 32, 32, 3)
