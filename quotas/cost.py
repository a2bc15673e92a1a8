"""CU estimates from a request's payload (DESIGN.md's cost model).

The same functions price a request before it runs (with max_tokens / requested steps) and
settle it afterwards (with the tokens produced / steps run), so estimate and charge can
never disagree about the formula. Amounts are integer milli-CU (mCU); 1 CU = 1,000 mCU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from inference.registry import ModelSpec, ModelVariant

MCU_PER_CU = 1000
TEXT_TOKENS_PER_CU = 1000
VIDEO_CU_PER_MINUTE_720P = 500
REFERENCE_PIXELS = 1280 * 720


def cu_to_mcu(cu: float) -> int:
    return math.ceil(cu * MCU_PER_CU)


def mcu_to_cu(mcu: int) -> float:
    return round(mcu / MCU_PER_CU, 3)


@dataclass(frozen=True)
class CostEstimate:
    mcu: int
    breakdown: dict = field(default_factory=dict)

    @property
    def cu(self) -> float:
        return mcu_to_cu(self.mcu)

    def as_dict(self) -> dict:
        return {"cu": self.cu, **self.breakdown}


def text_cost(*, spec: ModelSpec, variant: ModelVariant, prompt_tokens: int,
              completion_tokens: int) -> CostEstimate:
    """1 CU per 1,000 tokens (prompt + completion) x model factor x variant discount."""
    tokens = prompt_tokens + completion_tokens
    factor = spec.cu_factor * variant.cu_discount
    mcu = math.ceil(tokens * MCU_PER_CU * factor / TEXT_TOKENS_PER_CU)
    return CostEstimate(
        mcu=mcu,
        breakdown={
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "model_factor": spec.cu_factor,
            "variant": variant.name,
            "variant_discount": variant.cu_discount,
        },
    )


def video_cost(*, spec: ModelSpec, width: int, height: int, frames: int, steps: int) -> CostEstimate:
    """500 CU per minute of 1280x720 at the reference step count, linear in frames, steps, pixels."""
    assert spec.video is not None, f"{spec.id} is not a video model"
    minutes = frames / spec.video.fps / 60
    pixel_ratio = (width * height) / REFERENCE_PIXELS
    step_ratio = steps / spec.video.reference_steps
    cu = VIDEO_CU_PER_MINUTE_720P * minutes * pixel_ratio * step_ratio * spec.cu_factor
    return CostEstimate(
        mcu=max(1, math.ceil(cu * MCU_PER_CU)),
        breakdown={
            "width": width,
            "height": height,
            "frames": frames,
            "fps": spec.video.fps,
            "steps": steps,
            "reference_steps": spec.video.reference_steps,
            "pixel_ratio": round(pixel_ratio, 6),
            "model_factor": spec.cu_factor,
        },
    )


def video_run_cost_mcu(*, spec: ModelSpec, params: dict, steps_run: int) -> int:
    """What a video job (`params`, as it was submitted) costs for the denoising steps it ran:
    the cost model is linear in steps, so a run stopped early pays for those it did (its
    engine's cancel, or the reaper's for a worker lost after the cancel); none, nothing."""
    if steps_run <= 0:
        return 0
    return video_cost(spec=spec, width=int(params["width"]), height=int(params["height"]),
                      frames=int(params["frames"]), steps=steps_run).mcu
