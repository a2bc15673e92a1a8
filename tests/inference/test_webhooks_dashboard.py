"""The /t/<slug>/webhooks/ pages: roles, outsiders, secrets shown once, CSRF."""

from __future__ import annotations

import re

import pytest
from django.test import Client

from inference.webhook_models import WebhookDelivery, WebhookEndpoint
from inference.webhooks import (
    webhook_delivery_attempt,
    webhook_endpoint_create,
    webhook_event_publish,
)
from portal.models import Membership

pytestmark = pytest.mark.django_db


def login(client: Client, membership: Membership) -> Client:
    client.force_login(membership.user)
    return client


@pytest.fixture
def endpoint(cast, receiver) -> WebhookEndpoint:
    return webhook_endpoint_create(tenant=cast.tenant, url=receiver.url)


@pytest.fixture
def delivery(cast, endpoint) -> WebhookDelivery:
    event = webhook_event_publish(tenant=cast.tenant, event_type="job.completed", data={"id": "j"})
    (pending,) = event.deliveries.all()
    return webhook_delivery_attempt(delivery_id=pending.id, attempt=1)


def form_data(url: str) -> dict:
    return {"url": url, "description": "ci", "event_types": ["job.completed", "job.failed"]}


@pytest.mark.parametrize("role", ["owner", "admin", "member", "viewer"])
def test_every_role_can_read(client, cast, endpoint, delivery, role):
    login(client, getattr(cast, role))
    page = client.get("/t/acme/webhooks/")
    assert page.status_code == 200 and endpoint.url in page.content.decode()
    assert endpoint.secret not in page.content.decode()
    log = client.get(f"/t/acme/webhooks/{endpoint.pk}/")
    assert log.status_code == 200 and delivery.event_id in log.content.decode()
    can_manage = role in {"owner", "admin"}
    assert ("Add an endpoint" in page.content.decode()) is can_manage
    assert ("Redeliver" in log.content.decode()) is can_manage


def test_tab_in_the_tenant_nav(client, cast):
    login(client, cast.viewer)
    assert 'href="/t/acme/webhooks/"' in client.get("/t/acme/").content.decode()


@pytest.mark.parametrize("role", ["member", "viewer"])
def test_readers_cannot_change_anything(client, cast, endpoint, delivery, receiver, role):
    login(client, getattr(cast, role))
    assert client.post("/t/acme/webhooks/", form_data(receiver.url)).status_code == 403
    for action in ("rotate-secret", "disable", "delete"):
        assert client.post(f"/t/acme/webhooks/{endpoint.pk}/{action}/").status_code == 403
    assert client.post(f"/t/acme/webhook-deliveries/{delivery.pk}/redeliver/").status_code == 403
    stored = WebhookEndpoint.objects.get()
    assert stored.enabled and stored.secret == endpoint.secret
    assert WebhookDelivery.objects.count() == 1


def test_outsider_gets_404_on_every_page_and_action(client, cast, endpoint, delivery, receiver):
    login(client, cast.outsider)
    assert client.get("/t/acme/webhooks/").status_code == 404
    assert client.get(f"/t/acme/webhooks/{endpoint.pk}/").status_code == 404
    assert client.post("/t/acme/webhooks/", form_data(receiver.url)).status_code == 404
    for prefix in ("/t/acme", "/t/globex"):  # also through the outsider's own tenant
        assert client.get(f"{prefix}/webhooks/{endpoint.pk}/").status_code == 404
        for action in ("rotate-secret", "disable", "delete"):
            assert client.post(f"{prefix}/webhooks/{endpoint.pk}/{action}/").status_code == 404
        assert client.post(f"{prefix}/webhook-deliveries/{delivery.pk}/redeliver/").status_code == 404
    stored = WebhookEndpoint.objects.get()
    assert stored.enabled and stored.secret == endpoint.secret and stored.tenant == cast.tenant
    assert WebhookDelivery.objects.count() == 1


def test_admin_creates_an_endpoint_and_sees_the_secret_once(client, cast, receiver):
    login(client, cast.admin)
    response = client.post("/t/acme/webhooks/", form_data(receiver.url))
    assert response.status_code == 200 and response["Cache-Control"] == "no-store"
    secret = re.search(r'value="(whsec_[A-Za-z0-9+/=]+)"', response.content.decode()).group(1)
    created = WebhookEndpoint.objects.get(tenant=cast.tenant)
    assert created.secret == secret and created.event_types == ["job.completed", "job.failed"]
    assert secret not in client.get("/t/acme/webhooks/").content.decode()

    rotated = client.post(f"/t/acme/webhooks/{created.pk}/rotate-secret/")
    created.refresh_from_db()
    assert created.secret != secret and created.secret in rotated.content.decode()
    assert rotated["Cache-Control"] == "no-store"


def test_create_refuses_a_loopback_url(client, cast, settings):
    settings.SLUICE_WEBHOOK_ALLOW_PRIVATE = False
    login(client, cast.owner)
    response = client.post("/t/acme/webhooks/", form_data("http://127.0.0.1:9/hook"))
    assert response.status_code == 400 and "loopback" in response.content.decode()
    assert not WebhookEndpoint.objects.exists()


def test_disable_enable_delete_and_redeliver(client, cast, endpoint, delivery):
    login(client, cast.owner)
    client.post(f"/t/acme/webhooks/{endpoint.pk}/disable/")
    assert not WebhookEndpoint.objects.get().enabled
    client.post(f"/t/acme/webhooks/{endpoint.pk}/enable/")
    assert WebhookEndpoint.objects.get().enabled
    response = client.post(f"/t/acme/webhook-deliveries/{delivery.pk}/redeliver/")
    assert response.status_code == 302
    assert WebhookDelivery.objects.filter(redelivery_of=delivery).count() == 1
    assert client.post(f"/t/acme/webhooks/{endpoint.pk}/explode/").status_code == 404
    client.post(f"/t/acme/webhooks/{endpoint.pk}/delete/")
    assert not WebhookEndpoint.objects.exists()


def test_auto_disabled_notice(client, cast, endpoint):
    WebhookEndpoint.objects.filter(pk=endpoint.pk).update(
        enabled=False, disabled_reason="Disabled automatically after 5 deliveries in a row failed")
    login(client, cast.viewer)
    page = client.get("/t/acme/webhooks/").content.decode()
    assert "was disabled" in page and "5 deliveries in a row failed" in page
    assert "disabled automatically" in page


def test_forms_need_the_csrf_token(cast, receiver):
    client = login(Client(enforce_csrf_checks=True), cast.owner)
    assert client.post("/t/acme/webhooks/", form_data(receiver.url)).status_code == 403
    assert not WebhookEndpoint.objects.exists()
    page = client.get("/t/acme/webhooks/").content.decode()
    assert 'name="csrfmiddlewaretoken"' in page
