"""/v1/webhooks: endpoint CRUD, secret rotation, the delivery log and manual redelivery."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.permissions import IsAuthenticated
from rest_framework.response import Response
from rest_framework.views import APIView

from inference import webhook_selectors as selectors
from inference import webhooks as services
from inference.apis import ListInput, list_body
from inference.webhook_models import WEBHOOK_EVENT_TYPES, WebhookDelivery, WebhookEndpoint
from portal.authentication import IssuedByTenantAdmin
from portal.errors import InvalidParameter


def _input_validated(serializer_class, data) -> dict:
    """The body's fields, an unknown one (a misspelt `events`) refused by name rather than
    dropped: dropped, the endpoint silently got the default events."""
    params = serializer_class(data=data)
    for name in data.keys() if hasattr(data, "keys") else ():  # not an object: is_valid says so
        if name not in params.fields:
            raise InvalidParameter(f"Unrecognized request argument supplied: {name}", param=name)
    params.is_valid(raise_exception=True)
    return params.validated_data


def _unix(moment) -> int | None:
    return int(moment.timestamp()) if moment else None


class EndpointOutput(serializers.Serializer):
    id = serializers.CharField()
    object = serializers.SerializerMethodField()
    url = serializers.CharField()
    description = serializers.CharField()
    event_types = serializers.ListField(child=serializers.CharField())
    enabled = serializers.BooleanField()
    disabled_reason = serializers.CharField()
    disabled_at = serializers.SerializerMethodField()
    consecutive_failures = serializers.IntegerField()
    created_at = serializers.SerializerMethodField()

    def get_object(self, endpoint: WebhookEndpoint) -> str:
        return "webhook_endpoint"

    def get_disabled_at(self, endpoint: WebhookEndpoint) -> int | None:
        return _unix(endpoint.disabled_at)

    def get_created_at(self, endpoint: WebhookEndpoint) -> int:
        return _unix(endpoint.created_at)


class EndpointWithSecretOutput(EndpointOutput):
    """Only in the answers to create and rotate: the one time the secret is shown (null in a
    create replayed for its Idempotency-Key: shown once means once; rotate for a new one)."""

    secret = serializers.CharField(allow_null=True)


class AttemptOutput(serializers.Serializer):
    number = serializers.IntegerField()
    attempted_at = serializers.SerializerMethodField()
    url = serializers.CharField()
    status_code = serializers.IntegerField(allow_null=True)
    latency_ms = serializers.IntegerField()
    response_snippet = serializers.CharField()
    error = serializers.CharField()

    def get_attempted_at(self, attempt) -> int:
        return _unix(attempt.attempted_at)


class DeliveryOutput(serializers.Serializer):
    id = serializers.CharField()
    object = serializers.SerializerMethodField()
    endpoint_id = serializers.CharField()
    event_id = serializers.CharField()
    event_type = serializers.CharField(source="event.type")
    redelivery_of = serializers.CharField(source="redelivery_of_id", allow_null=True)
    status = serializers.CharField()
    attempts = serializers.IntegerField()
    next_attempt_at = serializers.SerializerMethodField()
    last_status_code = serializers.IntegerField(allow_null=True)
    last_latency_ms = serializers.IntegerField(allow_null=True)
    last_response_snippet = serializers.CharField()
    last_error = serializers.CharField()
    created_at = serializers.SerializerMethodField()

    def get_object(self, delivery: WebhookDelivery) -> str:
        return "webhook_delivery"

    def get_next_attempt_at(self, delivery: WebhookDelivery) -> int | None:
        # While an attempt is in flight the stored time is a lease, not a schedule.
        return _unix(delivery.next_attempt_at) if delivery.is_live else None

    def get_created_at(self, delivery: WebhookDelivery) -> int:
        return _unix(delivery.created_at)


class DeliveryWithLogOutput(DeliveryOutput):
    log = AttemptOutput(many=True)


_NO_STORE = {"Cache-Control": "no-store"}

# Any key reads; changes need a key an admin issued (the dashboard's rule for the same pages).
_ADMIN_WRITES = [IsAuthenticated, IssuedByTenantAdmin]


def _endpoint_for(request, endpoint_id: str) -> WebhookEndpoint:
    return selectors.webhook_endpoint_get_for_tenant(tenant=request.user.tenant,
                                                     endpoint_id=endpoint_id)


class WebhookListApi(APIView):
    permission_classes = _ADMIN_WRITES

    class Input(serializers.Serializer):
        url = serializers.CharField(max_length=2000)
        event_types = serializers.ListField(
            child=serializers.ChoiceField(choices=WEBHOOK_EVENT_TYPES), required=False,
            allow_empty=False,
        )
        description = serializers.CharField(max_length=200, required=False, allow_blank=True,
                                            default="")
        enabled = serializers.BooleanField(required=False, default=True)

    @extend_schema(
        operation_id="webhooks_list",
        responses=inline_serializer("WebhookEndpointList", {
            "object": serializers.CharField(), "data": EndpointOutput(many=True)}),
    )
    def get(self, request):
        endpoints = selectors.webhook_endpoints_for_tenant(tenant=request.user.tenant)
        return Response({"object": "list", "data": EndpointOutput(endpoints, many=True).data})

    @extend_schema(operation_id="webhooks_create", request=Input,
                   responses={201: EndpointWithSecretOutput, 200: EndpointWithSecretOutput})
    def post(self, request):
        created = services.webhook_endpoint_create_idempotent(
            tenant=request.user.tenant, actor=request.user.api_key,
            idempotency_key=request.headers.get("Idempotency-Key"),
            **_input_validated(self.Input, request.data))
        if created.replayed:
            # The secret is shown once, in the first answer: a replay (anyone who sends the key
            # and body again within a day) does not read it back; a client that lost that
            # answer rotates the secret.
            return Response({**EndpointOutput(created.endpoint).data, "secret": None},
                            status=status.HTTP_200_OK, headers=_NO_STORE)
        return Response(EndpointWithSecretOutput(created.endpoint).data,
                        status=status.HTTP_201_CREATED, headers=_NO_STORE)


class WebhookDetailApi(APIView):
    permission_classes = _ADMIN_WRITES

    class Input(serializers.Serializer):
        url = serializers.CharField(max_length=2000, required=False)
        event_types = serializers.ListField(
            child=serializers.ChoiceField(choices=WEBHOOK_EVENT_TYPES), required=False,
            allow_empty=False,
        )
        description = serializers.CharField(max_length=200, required=False, allow_blank=True)
        enabled = serializers.BooleanField(required=False)

    @extend_schema(operation_id="webhooks_retrieve", responses=EndpointOutput)
    def get(self, request, endpoint_id: str):
        return Response(EndpointOutput(_endpoint_for(request, endpoint_id)).data)

    @extend_schema(operation_id="webhooks_update", request=Input, responses=EndpointOutput)
    def patch(self, request, endpoint_id: str):
        endpoint = _endpoint_for(request, endpoint_id)
        endpoint = services.webhook_endpoint_update(endpoint=endpoint, actor=request.user.api_key,
                                                   **_input_validated(self.Input, request.data))
        return Response(EndpointOutput(endpoint).data)

    @extend_schema(operation_id="webhooks_delete", responses=inline_serializer(
        "WebhookEndpointDeleted", {"id": serializers.CharField(), "object": serializers.CharField(),
                                   "deleted": serializers.BooleanField()}))
    def delete(self, request, endpoint_id: str):
        endpoint = _endpoint_for(request, endpoint_id)
        services.webhook_endpoint_delete(endpoint=endpoint, actor=request.user.api_key)
        return Response({"id": endpoint_id, "object": "webhook_endpoint", "deleted": True})


class WebhookRotateSecretApi(APIView):
    permission_classes = _ADMIN_WRITES

    @extend_schema(operation_id="webhooks_rotate_secret", request=None,
                   responses=EndpointWithSecretOutput)
    def post(self, request, endpoint_id: str):
        endpoint = services.webhook_endpoint_secret_rotate(
            endpoint=_endpoint_for(request, endpoint_id), actor=request.user.api_key)
        return Response(EndpointWithSecretOutput(endpoint).data, headers=_NO_STORE)


class WebhookDeliveryListApi(APIView):
    class Input(ListInput):
        status = serializers.ChoiceField(choices=WebhookDelivery.Status.choices, required=False)

    @extend_schema(
        operation_id="webhooks_deliveries_list", parameters=[Input],
        responses=inline_serializer("WebhookDeliveryList", {
            "object": serializers.CharField(), "data": DeliveryWithLogOutput(many=True),
            "first_id": serializers.CharField(allow_null=True),
            "last_id": serializers.CharField(allow_null=True),
            "has_more": serializers.BooleanField()}),
    )
    def get(self, request, endpoint_id: str):
        endpoint = _endpoint_for(request, endpoint_id)
        params = self.Input(data=request.query_params)
        params.is_valid(raise_exception=True)
        page = selectors.webhook_deliveries_page_for_endpoint(
            tenant=request.user.tenant, endpoint=endpoint, **params.validated_data)
        return Response(list_body(page, DeliveryWithLogOutput(page.rows, many=True).data))


class WebhookRedeliverApi(APIView):
    permission_classes = _ADMIN_WRITES

    @extend_schema(operation_id="webhooks_deliveries_redeliver", request=None,
                   responses={202: DeliveryOutput})
    def post(self, request, delivery_id: str):
        delivery = selectors.webhook_delivery_get_for_tenant(tenant=request.user.tenant,
                                                             delivery_id=delivery_id)
        again = services.webhook_delivery_redeliver(delivery=delivery)
        return Response(DeliveryOutput(again).data, status=status.HTTP_202_ACCEPTED)
