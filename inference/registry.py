"""The model registry: which models exist, how they run, where, and what they cost.

One table for the whole platform: /v1/models lists it, admission prices from it, the
scheduler routes by its pool, and engines load its checkpoints. Checkpoint locations are
settings (a real deployment points them at real weights); everything else is data here.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from portal.errors import SluiceError

logger = logging.getLogger(__name__)


class ModelNotFound(SluiceError):
    code = "model_not_found"
    http_status = 404
    default_message = "The model does not exist."


@dataclass(frozen=True)
class ModelVariant:
    """A way of serving a model: full precision, or a quantized copy for low tiers."""

    name: str
    checkpoint: Path
    quantization: str | None = None
    cu_discount: float = 1.0  # multiplier on the model's CU factor
    served_name: str = ""  # what the engine serves it as, and what responses say served them
    dtype: str = "float32"


@dataclass(frozen=True)
class VideoSpec:
    """What a video model generates, and the reference its CU price is quoted at."""

    fps: int
    reference_steps: int
    default_steps: int
    max_steps: int
    max_seconds: float
    sizes: tuple[str, ...]  # "WxH" values the model accepts (multiples of 16 for Wan)
    # Wan's VAE compresses time 4x: clips have 4k+1 frames.
    frame_step: int = 4
    # Memory: decoding a 720p clip in one piece needs tens of GiB of activations; tiles of
    # 256 px bound that, at a small cost in speed, from this many output pixels per frame up.
    vae_tiling_min_pixels: int = 512 * 512
    # Slicing decodes a batch one video at a time (only matters for batches > 1).
    vae_slicing: bool = True
    # bf16 halves weights and activations on GPUs; CPUs have no fast bf16 kernels for these ops.
    cuda_dtype: str = "bfloat16"
    cpu_dtype: str = "float32"
    # Previews: a fixed linear map from the latent channels to RGB (rows: channels), plus a
    # bias, so a preview costs a matmul instead of a VAE decode. None: the first three channels.
    preview_rgb_factors: tuple[tuple[float, float, float], ...] | None = None
    preview_rgb_bias: tuple[float, float, float] = (0.0, 0.0, 0.0)
    preview_max_side: int = 128  # px; keeps a preview JPEG under ~6 KB of base64, even of noise

    def frames_for(self, seconds: float) -> int:
        wanted = max(1, round(seconds * self.fps))
        return self.frame_step * max(0, round((wanted - 1) / self.frame_step)) + 1

    def dtype_name(self, device_type: str) -> str:
        return self.cuda_dtype if device_type == "cuda" else self.cpu_dtype

    def vae_tiling_for(self, *, width: int, height: int) -> bool:
        return width * height >= self.vae_tiling_min_pixels


@dataclass(frozen=True)
class ModelSpec:
    id: str
    kind: str  # "text" | "video"
    engine: str  # "vllm" | "transformers" | "diffusers"
    pool: str  # the Celery queue of the GPU pool that serves it
    cu_factor: float
    # Text models: SLUICE_CODE_MAX_MODEL_LEN, a cap on the checkpoints' context length (0: none).
    context_length_cap: int = 0
    created: int = 1_793_491_200  # 2026-11-01, the release of the tiny models
    owned_by: str = "sluice"
    variants: dict[str, ModelVariant] = field(default_factory=dict)
    video: VideoSpec | None = None

    def variant(self, name: str) -> ModelVariant:
        return self.variants.get(name) or self.variants["full"]

    @property
    def context_length(self) -> int | None:
        """Text models: prompt + completion tokens, the length admission allows and the one
        every variant's vLLM server is started with (text_context_length). Read from the
        checkpoints when asked, not when the registry is built: looking up a video model, or
        a text job's row, needs no checkpoint on the pod."""
        if self.kind != "text":
            return None
        return text_context_length(
            checkpoints=[variant.checkpoint for variant in self.variants.values()],
            cap=self.context_length_cap)


# Wan 2.1 latents (normalised, as the denoising loop holds them) -> approximate RGB: the
# 16x3 map and bias of ComfyUI's `comfy/latent_formats.py` Wan21 format, a linear fit of Wan's
# VAE decoder. The tiny model shares the latent layout but its VAE is random, so there its
# previews show structure, not faithful colour; a model with another VAE sets its own map.
WAN21_LATENT_RGB_FACTORS = (
    (-0.1299, -0.1692, 0.2932), (0.0671, 0.0406, 0.0442), (0.3568, 0.2548, 0.1747),
    (0.0372, 0.2344, 0.1420), (0.0313, 0.0189, -0.0328), (0.0296, -0.0956, -0.0665),
    (-0.3477, -0.4059, -0.2925), (0.0166, 0.1902, 0.1975), (-0.0412, 0.0267, -0.1364),
    (-0.1293, 0.0740, 0.1636), (0.0680, 0.3019, 0.1128), (0.0032, 0.0581, 0.0639),
    (-0.1251, 0.0927, 0.1699), (0.0060, -0.0633, 0.0005), (0.3477, 0.2275, 0.2950),
    (0.1984, 0.0913, 0.1861),
)
WAN21_LATENT_RGB_BIAS = (-0.1835, -0.0868, -0.3360)


# config.json keys vLLM reads a model's length from (ModelArchConfigConvertorBase's
# derive_max_model_len_and_key): it takes the smallest present, but model_max_length wins.
_MAX_LENGTH_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length",
                    "model_max_length", "max_target_positions", "max_sequence_length",
                    "max_seq_length", "seq_len")
# RoPE types whose max_position_embeddings is already the scaled length (vLLM applies their
# `factor` no more; for the others it multiplies).
_ROPE_TYPES_PRESCALED = ("su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling")
# vLLM's assumption for a config.json that names no length.
_VLLM_DEFAULT_MAX_MODEL_LEN = 2048


def _json_file(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ImproperlyConfigured(
            f"{path} could not be read ({exc.__class__.__name__}: {exc}); a text checkpoint is a "
            "folder written by save_pretrained (SLUICE_CODE_MODEL_PATH, SLUICE_CODE_MODEL_INT8_PATH)"
        ) from exc


@functools.cache
def checkpoint_max_model_len(checkpoint: str) -> int:
    """The context length vLLM gives a generative model's local checkpoint when started without
    --max-model-len (vllm.config.model._get_and_verify_max_len; its sliding-window and pooling
    cases do not apply): read from config.json once per process, never from a model hub, so a
    checkpoint replaced in place needs the web and worker processes restarted, as its engine
    does. vLLM reads the config through transformers, which fills in a class's defaults: a
    config.json that leaves its length out gets 2048 here where vLLM may say more (Qwen2: 32768),
    an error on the safe side, as every engine is started with this length."""
    config = _json_file(Path(checkpoint) / "config.json")
    text_config = config.get("text_config") or config  # a multimodal model's language part
    lengths = [text_config[key] for key in _MAX_LENGTH_KEYS if text_config.get(key) is not None]
    derived = text_config.get("model_max_length") or min(lengths, default=None)
    if derived is None:
        logger.warning("%s/config.json names no maximum length; assuming vLLM's %d",
                       checkpoint, _VLLM_DEFAULT_MAX_MODEL_LEN)
        derived = _VLLM_DEFAULT_MAX_MODEL_LEN
    return int(_rope_scaled(text_config, derived))


def _rope_scaled(config: dict, derived: float) -> float:
    """vLLM's RoPE step: a scaling `factor` lengthens the context, except for types whose
    max_position_embeddings is already scaled; LongRoPE defaults to its original length."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    nested = all(isinstance(value, dict) for value in rope.values())  # one per layer type
    layers = [layer for layer in (rope.values() if nested else [rope]) if layer]
    if not layers:
        return derived
    types = [layer.get("rope_type") or layer.get("type") for layer in layers]
    if "gemma3" not in config.get("model_type", ""):  # Gemma 3's length is already scaled
        factor = 1.0
        for layer, rope_type in zip(layers, types, strict=True):
            if rope_type not in _ROPE_TYPES_PRESCALED:
                factor = layer.get("factor", factor)
        derived *= factor if factor is not None else 1.0
    if "longrope" in types:
        derived = config.get("original_max_position_embeddings", derived)
    return derived


@functools.cache
def _variants_max_model_len(checkpoints: tuple[str, ...]) -> int:
    lengths = {checkpoint: checkpoint_max_model_len(checkpoint) for checkpoint in checkpoints}
    if len(set(lengths.values())) > 1:
        logger.warning("The text variants' checkpoints disagree on the context length (%s); "
                       "every variant serves the smallest",
                       ", ".join(f"{path}: {length}" for path, length in lengths.items()))
    return min(lengths.values())


def text_context_length(*, checkpoints: list[Path], cap: int) -> int:
    """One text model's context length: the smallest its variants' checkpoints allow (any
    variant may serve a request admission let through, so none may be promised more than the
    shortest serves), lowered to `cap` when that is set (> 0). The registry's spec carries it,
    so admission, /v1/models and each variant's `--max-model-len` (vllm_server_argv) agree."""
    length = _variants_max_model_len(tuple(str(checkpoint) for checkpoint in checkpoints))
    return min(length, cap) if cap > 0 else length


def _registry() -> dict[str, ModelSpec]:
    code_path = Path(settings.SLUICE_CODE_MODEL_PATH)
    code_int8_path = Path(settings.SLUICE_CODE_MODEL_INT8_PATH)
    video_path = Path(settings.SLUICE_VIDEO_MODEL_PATH)
    specs = [
        ModelSpec(
            id="sluice-code-tiny",
            kind="text",
            engine="vllm",
            pool="text-batch",
            cu_factor=1.0,
            context_length_cap=settings.SLUICE_CODE_MAX_MODEL_LEN,
            variants={
                "full": ModelVariant(name="full", checkpoint=code_path, served_name="sluice-code-tiny"),
                # compressed-tensors W8A8 int8 on CPU; fp8 (`--quantization fp8`) on GPUs.
                "quantized": ModelVariant(
                    name="quantized",
                    checkpoint=code_int8_path,
                    quantization="int8",
                    cu_discount=0.5,
                    served_name="sluice-code-tiny-int8",
                    dtype="bfloat16",
                ),
            },
        ),
        ModelSpec(
            id="sluice-video-tiny",
            kind="video",
            engine="diffusers",
            pool="video-hbm",
            cu_factor=1.0,
            variants={"full": ModelVariant(name="full", checkpoint=video_path,
                                           served_name="sluice-video-tiny")},
            video=VideoSpec(
                fps=8,
                reference_steps=20,
                default_steps=20,
                max_steps=50,
                # 12 s and the four sizes are what the openai SDK's typed Videos API sends
                # (seconds "4" | "8" | "12"; 720x1280, 1280x720, 1024x1792, 1792x1024).
                max_seconds=12.0,
                sizes=("64x64", "128x128", "256x256", "1280x720", "720x1280", "1024x1792",
                       "1792x1024"),
                preview_rgb_factors=WAN21_LATENT_RGB_FACTORS,
                preview_rgb_bias=WAN21_LATENT_RGB_BIAS,
            ),
        ),
    ]
    return {spec.id: spec for spec in specs}


def model_list() -> list[ModelSpec]:
    return list(_registry().values())


def models_for_tier(tier) -> list[ModelSpec]:
    """The models a tier may call (/v1/models and the dashboard playground list the same)."""
    return [spec for spec in model_list() if tier.allows_model(spec.id)]


def model_get(model_id: str) -> ModelSpec:
    spec = _registry().get(model_id)
    if spec is None:
        raise ModelNotFound(f"The model {model_id!r} does not exist.", param="model")
    return spec


def variant_for_tier(spec: ModelSpec, tier) -> ModelVariant:
    """Text models serve low tiers from their quantized variant when the tier says so."""
    if spec.kind == "text":
        return spec.variant(tier.text_variant)
    return spec.variant("full")


def text_variants() -> list[tuple[ModelSpec, ModelVariant]]:
    """Every text variant an engine must serve (`make run` starts one server each)."""
    return [(spec, variant) for spec in model_list() if spec.kind == "text"
            for variant in spec.variants.values()]
