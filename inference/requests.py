"""Validation of generation requests: one home for the parameter rules of each model kind.

Used by the quote endpoint now and by the completion and video endpoints; every rule names
the offending parameter in its 400 `invalid_parameter`.
"""

from __future__ import annotations

from dataclasses import dataclass

from rest_framework import serializers

from inference.errors import ContextLengthExceeded, ModelNotAllowed
from inference.registry import ModelSpec, model_get, models_for_tier
from inference.tokenization import decode_checked, encode, encode_chat
from portal.errors import InvalidParameter, to_sluice_error
from portal.models import Tier


def model_for_tier(*, model_id: str, tier: Tier) -> ModelSpec:
    spec = model_get(model_id)
    if not tier.allows_model(spec.id):
        raise ModelNotAllowed(f"The {tier.name} tier does not include {spec.id}.", param="model")
    return spec


def _validated(serializer: serializers.Serializer) -> dict:
    """The validated data, or the first problem as 400 invalid_parameter naming its param
    (raised as a SluiceError, so plain async views render it like DRF views do)."""
    try:
        serializer.is_valid(raise_exception=True)
    except serializers.ValidationError as exc:
        raise to_sluice_error(exc) from exc
    return serializer.validated_data


def message_text(content) -> str:
    """A chat message's text: its content string, or its text parts joined by newlines (as
    vLLM joins them). What the chat template renders and what the input cascade screens."""
    if isinstance(content, list):
        return "\n".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else ""


class _ContentField(serializers.Field):
    """OpenAI's message `content`: a string, or a list of parts of which Sluice's code models
    read the text ones (`{"type": "text", "text": ...}`); images, audio and files are refused."""

    def to_internal_value(self, data):
        if isinstance(data, str):
            return data
        if not isinstance(data, list):
            raise serializers.ValidationError("Send a string or a list of text parts.")
        for part in data:
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise serializers.ValidationError(
                    f"Only text content parts are supported by Sluice's code models, not {kind!r}.")
            if not isinstance(part.get("text"), str):
                raise serializers.ValidationError("A text part needs a string `text`.")
        return message_text(data)

    def to_representation(self, value):
        return value


class _PromptField(serializers.Field):
    """OpenAI's `prompt`: a string, token ids, or a list of either (a batch). With n=1 Sluice
    generates for one prompt per request, so a list holds exactly one; token ids are read as
    they are (the model's vocabulary is checked once the model is known)."""

    def to_internal_value(self, data):
        if isinstance(data, list) and len(data) == 1 and isinstance(data[0], (str, list)):
            data = data[0]  # a batch of one
        if isinstance(data, str):
            return data
        if isinstance(data, list) and data and all(
                isinstance(token, int) and not isinstance(token, bool) for token in data):
            return data
        if isinstance(data, list) and len(data) > 1 and all(isinstance(p, (str, list)) for p in data):
            raise serializers.ValidationError(
                f"Send one prompt per request ({len(data)} were sent; n is 1 on Sluice).")
        raise serializers.ValidationError(
            "Send a string, a non-empty list of token ids, or a list holding one of those.")

    def to_representation(self, value):
        return value


class _MessageInput(serializers.Serializer):
    role = serializers.ChoiceField(choices=["system", "user", "assistant", "developer"])
    content = _ContentField()

    def validate_role(self, value):
        # OpenAI's newer name for the system message; chat templates know only `system`.
        return "system" if value == "developer" else value


# PostgreSQL's JSON refuses U+0000: text kept in a job's params must not hold it (a job's insert
# failed with a 500). DRF's CharField refuses it with this message; these fields are not one.
NULL_CHARACTER = "\x00"
NULL_CHARACTERS_REFUSED = "Null characters are not allowed."


class _StopField(serializers.Field):
    """OpenAI's `stop`: a string or up to 4 strings."""

    def to_internal_value(self, data):
        values = [data] if isinstance(data, str) else data
        if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
            raise serializers.ValidationError("Send a non-empty string or a list of them.")
        if len(values) > 4:
            raise serializers.ValidationError("At most 4 stop sequences.")
        if any(NULL_CHARACTER in value for value in values):
            raise serializers.ValidationError(NULL_CHARACTERS_REFUSED)
        return values

    def to_representation(self, value):
        return value


class _StrictBooleanField(serializers.BooleanField):
    """JSON's true, false (or null, the default): OpenAI refuses "yes", 1 and "on", which DRF's
    BooleanField would read as true."""

    def to_internal_value(self, data):
        if data is None or isinstance(data, bool):
            return bool(data)
        self.fail("invalid", input=data)


class _StreamOptions(serializers.Serializer):
    include_usage = _StrictBooleanField(required=False, default=False, allow_null=True)


class TextInput(serializers.Serializer):
    model = serializers.CharField()
    messages = _MessageInput(many=True, required=False, allow_empty=False)
    prompt = _PromptField(required=False)
    max_tokens = serializers.IntegerField(required=False, min_value=1, allow_null=True)
    max_completion_tokens = serializers.IntegerField(required=False, min_value=1, allow_null=True)
    temperature = serializers.FloatField(required=False, min_value=0, max_value=2, allow_null=True)
    top_p = serializers.FloatField(required=False, min_value=0, max_value=1, allow_null=True)
    stop = _StopField(required=False, allow_null=True)
    seed = serializers.IntegerField(required=False, min_value=0, max_value=2**63 - 1, allow_null=True)
    presence_penalty = serializers.FloatField(required=False, min_value=-2, max_value=2, allow_null=True)
    frequency_penalty = serializers.FloatField(required=False, min_value=-2, max_value=2, allow_null=True)
    n = serializers.IntegerField(required=False, min_value=1, max_value=1, allow_null=True)
    user = serializers.CharField(required=False, max_length=256, allow_blank=True)
    stream = _StrictBooleanField(required=False, default=False, allow_null=True)
    stream_options = _StreamOptions(required=False, allow_null=True)

    def validate(self, attrs):
        if ("messages" in attrs) == ("prompt" in attrs):
            raise serializers.ValidationError({"messages": "Send exactly one of messages or prompt."})
        if attrs.get("stream_options") is not None and not attrs.get("stream"):
            raise serializers.ValidationError(
                {"stream_options": "The 'stream_options' parameter is only allowed when 'stream' "
                                   "is enabled."})
        return attrs


DEFAULT_MAX_TOKENS = 256
_TEXT_ARGUMENTS = frozenset(TextInput().get_fields())

# OpenAI request arguments Sluice accepts and does nothing with: bookkeeping on OpenAI's side
# (`store`, `metadata`, `service_tier`) or meaningless without tools (`parallel_tool_calls`).
# `safety_identifier` (like `user`) and the prompt-cache hints: the engine caches every prefix.
_IGNORED_ARGUMENTS = frozenset({
    "metadata", "store", "service_tier", "parallel_tool_calls", "safety_identifier",
    "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options",
})

# OpenAI features Sluice's code models do not offer, with the values that ask for nothing (what
# some clients send by default). Anything else is refused by name: silently dropping `logprobs`
# or `tools` would hand back a response without what was asked for, and nothing says why.
_UNSUPPORTED_ARGUMENTS: dict[str, tuple] = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False),
    "best_of": (None, 1), "suffix": (None, ""), "logit_bias": (None, {}),
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
    "function_call": (None, "none"), "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,),
    "reasoning_effort": (None,), "web_search_options": (None,), "verbosity": (None,),
    "moderation": (None,),
}


def _refuse_unsupported_arguments(payload: dict) -> None:
    """400 invalid_parameter naming the argument, as OpenAI answers an argument it does not
    know ("Unrecognized request argument supplied"), and for the features Sluice lacks."""
    for name, value in payload.items():
        if name in _TEXT_ARGUMENTS or name in _IGNORED_ARGUMENTS:
            continue
        if name not in _UNSUPPORTED_ARGUMENTS:
            raise InvalidParameter(f"Unrecognized request argument supplied: {name}", param=name)
        if not any(value == neutral and type(value) is type(neutral)
                   for neutral in _UNSUPPORTED_ARGUMENTS[name]):
            raise InvalidParameter(f"{name} is not supported by Sluice's models; leave it unset.",
                                   param=name)


@dataclass(frozen=True)
class TextRequest:
    spec: ModelSpec
    prompt_text: str
    prompt_token_ids: list[int]
    max_tokens: int
    is_chat: bool = False
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool = False
    include_usage: bool = False

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def job_params(self, *, priority: int, safety_policy: dict) -> dict:
        return {
            "prompt_token_ids": self.prompt_token_ids,
            "max_tokens": self.max_tokens,
            # top_p 0 keeps only the likeliest token: greedy decoding, which vLLM (whose top_p
            # must be above 0) spells temperature 0.
            "temperature": (0.0 if self.top_p == 0
                            else 1.0 if self.temperature is None else self.temperature),
            "top_p": 1.0 if self.top_p in (None, 0) else self.top_p,
            "stop": self.stop,
            "seed": self.seed,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "priority": priority,
            # A plain completion continues its prompt: partial repair parses them together.
            "code_context": "" if self.is_chat else self.prompt_text,
            # The output moderator's policy (SafetyPolicy.snapshot()): the one that screened
            # the prompt, so the worker judges the stream without looking it up.
            "safety_policy": safety_policy,
        }


def text_request_parse(*, payload: dict, tier: Tier, chat: bool | None = None) -> TextRequest:
    """`chat`: True for /v1/chat/completions (messages required), False for /v1/completions
    (prompt required), None to accept either (quotes)."""
    _refuse_unsupported_arguments(payload)
    data = _validated(TextInput(data=payload))
    if chat is True and "messages" not in data:
        raise InvalidParameter("messages: This field is required.", param="messages")
    if chat is False and "prompt" not in data:
        raise InvalidParameter("prompt: This field is required.", param="prompt")
    spec = model_for_tier(model_id=data["model"], tier=tier)
    if spec.kind != "text":
        raise InvalidParameter(f"{spec.id} is not a text model.", param="model")
    is_chat = "messages" in data
    if is_chat:
        prompt_text, prompt_token_ids = encode_chat(spec, data["messages"])
    elif isinstance(data["prompt"], list):  # token ids: screened and shown as their text
        prompt_token_ids = data["prompt"]
        prompt_text = decode_checked(spec, prompt_token_ids, param="prompt")
    else:  # a raw prompt is the caller's own: its special tokens (fill-in-the-middle) count
        prompt_text = data["prompt"]
        prompt_token_ids = encode(spec, prompt_text)
    if not is_chat and NULL_CHARACTER in prompt_text:  # kept in the job's params (code_context)
        raise InvalidParameter(f"prompt: {NULL_CHARACTERS_REFUSED}", param="prompt")
    prompt_tokens = len(prompt_token_ids)
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
    if prompt_tokens == 0:
        raise InvalidParameter("The prompt is empty.", param="messages" if is_chat else "prompt")
    return TextRequest(
        spec=spec, prompt_text=prompt_text, prompt_token_ids=prompt_token_ids,
        max_tokens=max_tokens, is_chat=is_chat, temperature=data.get("temperature"),
        top_p=data.get("top_p"), stop=data.get("stop"), seed=data.get("seed"),
        presence_penalty=data.get("presence_penalty"), frequency_penalty=data.get("frequency_penalty"),
        stream=bool(data.get("stream")),
        include_usage=bool((data.get("stream_options") or {}).get("include_usage")),
    )


class VideoInput(serializers.Serializer):
    # Optional, as in OpenAI's SDK: the tier's first video model answers when none is named.
    model = serializers.CharField(required=False)
    prompt = serializers.CharField(max_length=4000)
    seconds = serializers.FloatField(required=False, min_value=0.1)
    size = serializers.RegexField(r"^\d{1,5}x\d{1,5}$", required=False)
    num_inference_steps = serializers.IntegerField(required=False, min_value=1)
    negative_prompt = serializers.CharField(required=False, allow_blank=True, max_length=4000)
    seed = serializers.IntegerField(required=False, min_value=0, max_value=2**32 - 1)


_VIDEO_ARGUMENTS = frozenset(VideoInput().get_fields())

# OpenAI video arguments Sluice's video model cannot honour. Dropped silently, an
# image-to-video request would run (and be billed) as text-to-video.
_UNSUPPORTED_VIDEO_ARGUMENTS = {
    "input_reference": "input_reference is not supported by Sluice's video model (text-to-video "
                       "only); leave it unset.",
}


def _refuse_unknown_video_arguments(payload: dict) -> None:
    for name in payload:
        if name in _VIDEO_ARGUMENTS:
            continue
        raise InvalidParameter(
            _UNSUPPORTED_VIDEO_ARGUMENTS.get(name, f"Unrecognized request argument supplied: {name}"),
            param=name)


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
    _refuse_unknown_video_arguments(payload)
    data = _validated(VideoInput(data=payload))
    if "model" not in data:
        default = next((spec for spec in models_for_tier(tier) if spec.video is not None), None)
        if default is None:
            raise ModelNotAllowed(f"The {tier.name} tier includes no video model.", param="model")
        data["model"] = default.id
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
