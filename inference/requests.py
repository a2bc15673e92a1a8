"""Validation of generation requests: one home for the parameter rules of each model kind.

Used by the quote endpoint now and by the completion and video endpoints; every rule names
the offending parameter in its 400 `invalid_parameter`.
"""

from __future__ import annotations

from dataclasses import dataclass

from rest_framework import serializers

from inference.registry import ModelSpec, model_get
from inference.tokenization import count_tokens, render_chat
from portal.errors import InvalidParameter, SluiceError
from portal.models import Tier


class ModelNotAllowed(SluiceError):
    code = "model_not_allowed"
    http_status = 403
    default_message = "Your tier does not include this model."


class ContextLengthExceeded(SluiceError):
    code = "context_length_exceeded"
    http_status = 400
    default_message = "The prompt and max_tokens exceed the model's context length."


def model_for_tier(*, model_id: str, tier: Tier) -> ModelSpec:
    spec = model_get(model_id)
    if not tier.allows_model(spec.id):
        raise ModelNotAllowed(f"The {tier.name} tier does not include {spec.id}.", param="model")
    return spec


def _validated(serializer: serializers.Serializer) -> dict:
    serializer.is_valid(raise_exception=True)  # ValidationError -> invalid_parameter (param named)
    return serializer.validated_data


class _MessageInput(serializers.Serializer):
    role = serializers.ChoiceField(choices=["system", "user", "assistant", "developer"])
    content = serializers.CharField(allow_blank=True, trim_whitespace=False)


class TextInput(serializers.Serializer):
    model = serializers.CharField()
    messages = _MessageInput(many=True, required=False, allow_empty=False)
    prompt = serializers.CharField(required=False, allow_blank=True, trim_whitespace=False)
    max_tokens = serializers.IntegerField(required=False, min_value=1, allow_null=True)
    max_completion_tokens = serializers.IntegerField(required=False, min_value=1, allow_null=True)

    def validate(self, attrs):
        if ("messages" in attrs) == ("prompt" in attrs):
            raise serializers.ValidationError({"messages": "Send exactly one of messages or prompt."})
        return attrs


DEFAULT_MAX_TOKENS = 256


@dataclass(frozen=True)
class TextRequest:
    spec: ModelSpec
    prompt_text: str
    prompt_tokens: int
    max_tokens: int


def text_request_parse(*, payload: dict, tier: Tier) -> TextRequest:
    data = _validated(TextInput(data=payload))
    spec = model_for_tier(model_id=data["model"], tier=tier)
    if spec.kind != "text":
        raise InvalidParameter(f"{spec.id} is not a text model.", param="model")
    prompt_text = render_chat(spec, data["messages"]) if "messages" in data else data["prompt"]
    prompt_tokens = count_tokens(spec, prompt_text)
    context = spec.context_length or 0
    max_tokens = data.get("max_completion_tokens") or data.get("max_tokens")
    if max_tokens is None:
        max_tokens = max(1, min(DEFAULT_MAX_TOKENS, context - prompt_tokens))
    if prompt_tokens + max_tokens > context:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {context} tokens; the prompt has "
            f"{prompt_tokens} tokens and max_tokens asks for {max_tokens}.",
            param="messages" if "messages" in data else "prompt",
        )
    return TextRequest(spec=spec, prompt_text=prompt_text, prompt_tokens=prompt_tokens,
                       max_tokens=max_tokens)


class VideoInput(serializers.Serializer):
    model = serializers.CharField()
    prompt = serializers.CharField(max_length=4000)
    seconds = serializers.FloatField(required=False, min_value=0.1)
    size = serializers.RegexField(r"^\d{1,5}x\d{1,5}$", required=False)
    num_inference_steps = serializers.IntegerField(required=False, min_value=1)
    negative_prompt = serializers.CharField(required=False, allow_blank=True, max_length=4000)
    seed = serializers.IntegerField(required=False, min_value=0, max_value=2**32 - 1)


@dataclass(frozen=True)
class VideoRequest:
    spec: ModelSpec
    prompt: str
    width: int
    height: int
    frames: int
    steps: int
    seconds: float
    negative_prompt: str = ""
    seed: int | None = None

    def job_params(self) -> dict:
        return {"prompt": self.prompt, "negative_prompt": self.negative_prompt, "width": self.width,
                "height": self.height, "frames": self.frames, "steps": self.steps,
                "seconds": self.seconds, "seed": self.seed}


def video_request_parse(*, payload: dict, tier: Tier) -> VideoRequest:
    data = _validated(VideoInput(data=payload))
    spec = model_for_tier(model_id=data["model"], tier=tier)
    if spec.video is None:
        raise InvalidParameter(f"{spec.id} is not a video model.", param="model")
    video = spec.video
    size = data.get("size", video.sizes[0])
    if size not in video.sizes:
        raise InvalidParameter(f"size must be one of {', '.join(video.sizes)}.", param="size")
    seconds = data.get("seconds", 2.0)
    if seconds > video.max_seconds:
        raise InvalidParameter(f"seconds must be at most {video.max_seconds:g}.", param="seconds")
    steps = data.get("num_inference_steps", video.default_steps)
    if steps > video.max_steps:
        raise InvalidParameter(f"num_inference_steps must be at most {video.max_steps}.",
                               param="num_inference_steps")
    width, height = (int(part) for part in size.split("x"))
    return VideoRequest(spec=spec, prompt=data["prompt"], width=width, height=height,
                        frames=video.frames_for(seconds), steps=steps, seconds=seconds,
                        negative_prompt=data.get("negative_prompt", ""), seed=data.get("seed"))
