"""The registry's text context length: the checkpoints' own, the one the engines start with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from inference.engines.vllm import vllm_server_argv
from inference.registry import checkpoint_max_model_len, model_get, text_variants

MODEL = "sluice-code-tiny"


def max_model_len_flags() -> set[int]:
    """The --max-model-len each text variant's vLLM server is started with."""
    values = set()
    for spec, variant in text_variants():
        argv = vllm_server_argv(spec=spec, variant=variant, port=8101)
        values.add(int(argv[argv.index("--max-model-len") + 1]))
    return values


def test_the_tiny_models_context_length_is_its_checkpoints_1024():
    assert model_get(MODEL).context_length == 1024
    assert max_model_len_flags() == {1024}


def test_the_context_length_is_the_checkpoints_and_the_engines_are_started_with_it(code_checkpoints):
    code_checkpoints(4096)
    assert model_get(MODEL).context_length == 4096
    assert max_model_len_flags() == {4096}


def test_a_checkpoint_shorter_than_1024_lowers_it_so_vllm_still_starts(code_checkpoints):
    code_checkpoints(512)
    assert model_get(MODEL).context_length == 512
    assert max_model_len_flags() == {512}


def test_the_setting_caps_it_and_never_raises_it(code_checkpoints, settings):
    code_checkpoints(4096)
    settings.SLUICE_CODE_MAX_MODEL_LEN = 3000
    assert model_get(MODEL).context_length == 3000
    assert max_model_len_flags() == {3000}
    settings.SLUICE_CODE_MAX_MODEL_LEN = 8192  # more than the model has: vLLM would refuse it
    assert model_get(MODEL).context_length == 4096


@pytest.mark.parametrize(("full", "quantized"), [(4096, 2048), (2048, 4096)])
def test_variants_whose_checkpoints_disagree_both_serve_the_smaller(code_checkpoints, full, quantized):
    code_checkpoints(full, quantized)
    assert model_get(MODEL).context_length == 2048
    assert max_model_len_flags() == {2048}


# What vLLM 0.32's ModelConfig(model=<folder>).max_model_len gave for the same config.json
# (checked side by side; importing vLLM here would cost ~10 s).
@pytest.mark.parametrize(("changes", "expected"), [
    ({"max_position_embeddings": 4096, "model_max_length": 2000}, 2000),
    ({"max_position_embeddings": 4096,
      "rope_parameters": {"rope_theta": 1e4, "rope_type": "linear", "factor": 2.0}}, 8192),
    ({"max_position_embeddings": 4096, "rope_parameters": None,
      "rope_scaling": {"type": "linear", "factor": 2.0}}, 8192),
    ({"max_position_embeddings": 32768, "rope_parameters": {
        "rope_theta": 1e4, "rope_type": "yarn", "factor": 4.0,
        "original_max_position_embeddings": 8192}}, 32768),
    ({"max_position_embeddings": 131072, "rope_parameters": {
        "rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}, 131072),
    ({"max_position_embeddings": None, "n_positions": 1536}, 1536),
    ({"max_position_embeddings": None}, 2048),  # vLLM's assumption
], ids=["model_max_length", "linear", "legacy-rope_scaling", "yarn", "llama3", "n_positions",
        "no-length"])
def test_the_length_is_derived_from_config_json_as_vllm_derives_it(settings, tmp_path, changes, expected):
    source = json.loads((Path(settings.SLUICE_CODE_MODEL_PATH) / "config.json").read_text())
    config = {key: value for key, value in {**source, **changes}.items() if value is not None}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert checkpoint_max_model_len(str(tmp_path)) == expected


def test_a_missing_text_checkpoint_fails_only_what_needs_its_length(settings, tmp_path):
    """Every registry lookup read both text checkpoints' config.json: a pod without them (or a
    missing int8 build) failed video requests, /v1/models and the reaper's lookups too."""
    settings.SLUICE_CODE_MODEL_INT8_PATH = str(tmp_path / "not-built")
    assert model_get("sluice-video-tiny").context_length is None
    spec = model_get(MODEL)
    assert spec.variant("full").served_name == MODEL
    with pytest.raises(ImproperlyConfigured, match="not-built"):
        assert spec.context_length
