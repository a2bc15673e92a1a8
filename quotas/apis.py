"""/v1/quotes and /v1/usage."""

from __future__ import annotations

from datetime import date

from django.utils import timezone
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from quotas.cost import mcu_to_cu
from quotas.selectors import GROUPINGS, usage_rows
from quotas.services import budget_status, quote_build


class QuoteApi(APIView):
    """Price a request (a chat/completions or videos body) without running it."""

    @extend_schema(
        operation_id="quotes_create",
        request=inline_serializer("QuoteRequest", {"model": serializers.CharField()}),
        responses=inline_serializer(
            "Quote",
            {
                "object": serializers.CharField(),
                "model": serializers.CharField(),
                "variant": serializers.CharField(),
                "estimated_cu": serializers.FloatField(),
                "breakdown": serializers.DictField(),
            },
        ),
    )
    def post(self, request):
        quote = quote_build(tenant=request.user.tenant, payload=request.data)
        body = {
            "object": "quote",
            "model": quote.spec.id,
            "variant": quote.variant.name,
            "estimated_cu": quote.estimate.cu,
            "breakdown": quote.estimate.breakdown,
        }
        return Response(body, headers={"x-cu-estimate": str(quote.estimate.cu)})


class UsageApi(APIView):
    class Input(serializers.Serializer):
        start_date = serializers.DateField(required=False)
        end_date = serializers.DateField(required=False)
        group_by = serializers.CharField(required=False, default="day")

        def validate_group_by(self, value: str) -> list[str]:
            names = [name.strip() for name in value.split(",") if name.strip()]
            unknown = [name for name in names if name not in GROUPINGS]
            if unknown or not names:
                raise serializers.ValidationError(
                    f"Group by any of {', '.join(GROUPINGS)} (comma-separated)."
                )
            return names

        def validate(self, attrs):
            today = timezone.now().date()
            attrs.setdefault("end_date", today)
            attrs.setdefault("start_date", attrs["end_date"].replace(day=1))
            if attrs["start_date"] > attrs["end_date"]:
                raise serializers.ValidationError({"start_date": "must not be after end_date."})
            if (attrs["end_date"] - attrs["start_date"]).days > 366:
                raise serializers.ValidationError({"start_date": "the range is at most 366 days."})
            return attrs

    @extend_schema(operation_id="usage_retrieve", parameters=[Input])
    def get(self, request):
        params = self.Input(data=request.query_params)
        params.is_valid(raise_exception=True)
        data = params.validated_data
        tenant = request.user.tenant
        rows = usage_rows(tenant=tenant, start=data["start_date"], end=data["end_date"],
                          group_by=data["group_by"])
        status = budget_status(tenant=tenant)
        return Response({
            "object": "usage",
            "start_date": data["start_date"].isoformat(),
            "end_date": data["end_date"].isoformat(),
            "group_by": data["group_by"],
            "total_cu": mcu_to_cu(sum(row["mcu"] for row in rows)),
            "data": [_usage_row(row) for row in rows],
            "budget": {
                "period": status.period,
                "limit_cu": status.limit_cu,
                "used_cu": status.used_cu,
                "used_pct": status.used_pct,
            },
        })


def _usage_row(row: dict) -> dict:
    shaped = {"cu": mcu_to_cu(row["mcu"]), "requests": row["requests"]}
    if "day" in row:
        shaped["date"] = row["day"].isoformat() if isinstance(row["day"], date) else row["day"]
    if "model" in row:
        shaped["model"] = row["model"]
    if "api_key_id" in row:
        shaped["api_key_id"] = row["api_key_id"]
    return shaped

