"""POST /v1/moderations in OpenAI's response shape, with our categories and scores."""

from __future__ import annotations

import uuid

from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from moderation.cascade import SAFETY_LATENCY_HEADER, SafetyVerdict
from moderation.classifier import UNSAFE_LABELS
from moderation.services import moderation_classify
from portal.redis import redis_client
from quotas.admission import screening_rate_take

MAX_INPUTS = 32
MAX_INPUT_CHARS = 100_000


class _InputField(serializers.Field):
    """OpenAI accepts a string, a list of strings (a result each), or a list of multi-modal
    parts (one input, one result) of which we screen the text ones."""

    def to_internal_value(self, data) -> list[str]:
        if isinstance(data, list) and data and all(isinstance(part, dict) for part in data):
            data = self._parts_text(data)
        items = [data] if isinstance(data, str) else data
        if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
            raise serializers.ValidationError("Give a string or a non-empty list of strings.")
        if len(items) > MAX_INPUTS:
            raise serializers.ValidationError(f"At most {MAX_INPUTS} inputs per request.")
        if any(len(item) > MAX_INPUT_CHARS for item in items):
            raise serializers.ValidationError(f"Each input is at most {MAX_INPUT_CHARS} characters.")
        return items

    @staticmethod
    def _parts_text(parts: list[dict]) -> str:
        """`[{"type": "text", "text": ...}, ...]`: the text parts joined by newlines, as a chat
        message's parts are (inference.requests.message_text)."""
        if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in parts):
            raise serializers.ValidationError(
                'Only text parts ({"type": "text", "text": "..."}) are screened here; images are not.')
        return "\n".join(part["text"] for part in parts)


class ModerationsApi(APIView):
    class InputSerializer(serializers.Serializer):
        input = _InputField()
        model = serializers.CharField(required=False, allow_blank=True)

    @staticmethod
    def _result(verdict: SafetyVerdict) -> dict:
        return {
            "flagged": verdict.blocked,
            "categories": {
                label: verdict.blocked and label in verdict.categories for label in UNSAFE_LABELS
            },
            "category_scores": {label: verdict.category_scores[label] for label in UNSAFE_LABELS},
        }

    @extend_schema(
        operation_id="moderations_create",
        request=InputSerializer,
        responses=inline_serializer(
            "ModerationResponse",
            {
                "id": serializers.CharField(),
                "model": serializers.CharField(),
                "results": serializers.ListField(child=serializers.DictField()),
            },
        ),
    )
    def post(self, request):
        payload = self.InputSerializer(data=request.data)
        payload.is_valid(raise_exception=True)
        inputs = payload.validated_data["input"]
        screening_rate_take(client=redis_client(), tenant_id=request.user.tenant.pk,
                            characters=sum(len(text) for text in inputs))
        result = moderation_classify(tenant=request.user.tenant, inputs=inputs)
        latency_ms = sum(verdict.timings_ms["total"] for verdict in result.verdicts)
        return Response(
            {
                "id": f"modr-{uuid.uuid4().hex}",
                "model": result.model,
                "results": [self._result(verdict) for verdict in result.verdicts],
            },
            headers={SAFETY_LATENCY_HEADER: f"{latency_ms:.2f}"},
        )
