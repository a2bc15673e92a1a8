"""Tenancy-level API endpoints: model listing and health probes."""

from __future__ import annotations

import contextlib
import threading

from django.db import DatabaseError, connection
from django.http import HttpResponse, JsonResponse
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from inference.registry import ModelNotFound, ModelSpec, model_get, models_for_tier
from portal.errors import NotFound
from portal.metrics import metrics_exposition, scrape_allowed
from portal.redis import redis_client


class ModelOutputSerializer(serializers.Serializer):
    id = serializers.CharField()
    object = serializers.SerializerMethodField()
    created = serializers.IntegerField()
    owned_by = serializers.CharField()
    kind = serializers.CharField()
    context_length = serializers.IntegerField(allow_null=True)

    def get_object(self, spec: ModelSpec) -> str:
        return "model"


def _models_for(request) -> list[ModelSpec]:
    return models_for_tier(request.user.tenant.tier)


class ModelListApi(APIView):
    @extend_schema(
        operation_id="models_list",
        responses=inline_serializer(
            "ModelList",
            {"object": serializers.CharField(), "data": ModelOutputSerializer(many=True)},
        ),
    )
    def get(self, request):
        data = ModelOutputSerializer(_models_for(request), many=True).data
        return Response({"object": "list", "data": data})


class ModelDetailApi(APIView):
    @extend_schema(operation_id="models_retrieve", responses=ModelOutputSerializer)
    def get(self, request, model_id: str):
        spec = model_get(model_id)
        if not request.user.tenant.tier.allows_model(spec.id):
            # Not visible to this tier: the same 404 as a missing model.
            raise ModelNotFound(f"The model {model_id!r} does not exist.", param="model")
        return Response(ModelOutputSerializer(spec).data)


def healthz(request):
    """Liveness: the process serves requests. Touches no dependency."""
    return JsonResponse({"status": "ok"})


def _check_database() -> str:
    """SELECT 1 on a thread the request waits for at most READINESS_TIMEOUT_S. A database that
    accepts connections and then says nothing held /readyz for psycopg's connect timeout (130 s
    unless the URL sets one, and never under 2 s), or for ever once connected; the thread is left
    to end with its connection attempt."""
    from django.conf import settings

    outcome: list[Exception | None] = []

    def select_one() -> None:
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
                cursor.fetchone()
            outcome.append(None)
        except Exception as exc:  # handed to the request's thread
            outcome.append(exc)
        finally:
            with contextlib.suppress(DatabaseError):
                connection.close()  # this thread's own connection (or back to the pool)

    checker = threading.Thread(target=select_one, name="readyz-database", daemon=True)
    checker.start()
    checker.join(settings.READINESS_TIMEOUT_S)
    if not outcome:
        raise TimeoutError(f"no answer within {settings.READINESS_TIMEOUT_S} s")
    if outcome[0] is not None:
        raise outcome[0]
    return "ok"


def _check_redis() -> str:
    from django.conf import settings

    redis_client(socket_timeout=settings.READINESS_TIMEOUT_S).ping()
    return "ok"


def readyz(request):
    """Readiness: the database and Redis answer. 503 names whichever did not."""
    checks: dict[str, str] = {}
    for name, check in (("database", _check_database), ("redis", _check_redis)):
        try:
            checks[name] = check()
        except Exception as exc:  # any failure of a dependency means "not ready"
            checks[name] = f"error: {exc.__class__.__name__}"
    ready = all(value == "ok" for value in checks.values())
    return JsonResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks},
        status=200 if ready else 503,
    )


def metrics(request):
    """Prometheus scrape endpoint (portal/metrics.py): the bearer token, or loopback only."""
    if not scrape_allowed(request.META):
        return HttpResponse(status=401, headers={"WWW-Authenticate": "Bearer"})
    body, content_type = metrics_exposition(queues=True)
    return HttpResponse(body, content_type=content_type)


class ApiPathNotFound(APIView):
    """Any /v1/ path no route takes: the JSON 404, answered as an API view so that a request
    with a valid key carries its rate-limit headers like every other API response (DESIGN.md),
    and a wrong key is the same 401 as anywhere. No key is not required: it is still a 404."""

    permission_classes: list = []
    schema = None  # not an endpoint of the schema

    def initial(self, request, *args, **kwargs):
        super().initial(request, *args, **kwargs)  # authentication, throttles
        raise NotFound()
