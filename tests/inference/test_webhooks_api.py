"""/v1/webhooks: CRUD, secrets shown once, delivery log, redeliver, and outsiders get 404."""

from __future__ import annotations

import pytest

from inference.webhook_models import WebhookDelivery, WebhookEndpoint
from inference.webhooks import webhook_delivery_attempt, webhook_event_publish
from tests.inference.conftest import Reply

pytestmark = pytest.mark.django_db


def create(api, key, **body):
    return api.bearer(key).post("/v1/webhooks", body, format="json")


@pytest.fixture
def endpoint_body(cast, api, receiver):
    response = create(api, cast.owner_key, url=receiver.url, description="orders")
    assert response.status_code == 201, response.json()
    return response.json()


def delivered(tenant) -> WebhookDelivery:
    event = webhook_event_publish(tenant=tenant, event_type="job.completed", data={"id": "j"})
    (delivery,) = event.deliveries.all()
    return webhook_delivery_attempt(delivery_id=delivery.id, attempt=1)


def test_create_shows_the_secret_once(cast, api, endpoint_body, receiver):
    body = endpoint_body
    assert body["object"] == "webhook_endpoint" and body["id"].startswith("we_")
    assert body["secret"].startswith("whsec_")
    assert body["url"] == receiver.url and body["description"] == "orders"
    assert body["enabled"] is True and "job.progress" not in body["event_types"]
    assert "job.completed" in body["event_types"]
    stored = WebhookEndpoint.objects.get(pk=body["id"])
    assert stored.tenant == cast.tenant and stored.secret == body["secret"]

    listed = api.get("/v1/webhooks")
    assert [e["id"] for e in listed.json()["data"]] == [body["id"]]
    retrieved = api.get(f"/v1/webhooks/{body['id']}")
    for response in (listed, retrieved):
        assert response.status_code == 200
        assert body["secret"] not in response.content.decode()
        assert "secret" not in response.content.decode()


def test_create_response_is_not_cached(cast, api, receiver):
    response = create(api, cast.owner_key, url=receiver.url, event_types=["job.progress"])
    assert response["Cache-Control"] == "no-store"
    assert response.json()["event_types"] == ["job.progress"]


@pytest.mark.parametrize(("body", "param"), [
    ({"url": "ftp://example.com/x"}, "url"),
    ({"url": "http://127.0.0.1/x"}, "url"),
    ({"url": "http://169.254.169.254/latest"}, "url"),
    ({}, "url"),
    ({"url": "https://hooks.invalid/x", "event_types": ["job.exploded"]}, "event_types"),
    ({"url": "https://hooks.invalid/x", "event_types": []}, "event_types"),
    # A misspelt field was dropped without a word: the endpoint got every default event.
    ({"url": "https://hooks.invalid/x", "events": ["job.completed"]}, "events"),
])
def test_create_validates(cast, api, settings, body, param):
    settings.SLUICE_WEBHOOK_ALLOW_PRIVATE = False
    response = create(api, cast.owner_key, **body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_parameter" and error["param"].startswith(param)
    assert not WebhookEndpoint.objects.exists()


def test_update_refuses_an_unknown_field(cast, api, endpoint_body):
    response = api.patch(f"/v1/webhooks/{endpoint_body['id']}", {"events": ["job.failed"]},
                         format="json")
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "events"
    assert "Unrecognized request argument" in response.json()["error"]["message"]
    assert WebhookEndpoint.objects.get(pk=endpoint_body["id"]).event_types == endpoint_body["event_types"]


def test_update_changes_what_was_given(cast, api, endpoint_body, receiver):
    endpoint_id = endpoint_body["id"]
    WebhookEndpoint.objects.filter(pk=endpoint_id).update(
        enabled=False, disabled_reason="Disabled automatically", consecutive_failures=5)
    response = api.patch(f"/v1/webhooks/{endpoint_id}",
                         {"event_types": ["job.failed", "job.completed"], "enabled": True},
                         format="json")
    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["event_types"] == ["job.completed", "job.failed"]
    assert body["enabled"] is True and body["disabled_reason"] == ""
    assert body["consecutive_failures"] == 0
    assert body["url"] == receiver.url and body["description"] == "orders"
    refused = api.patch(f"/v1/webhooks/{endpoint_id}", {"url": "gopher://x"}, format="json")
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "url"


def test_rotate_secret_returns_the_new_secret_once(cast, api, endpoint_body):
    endpoint_id = endpoint_body["id"]
    response = api.post(f"/v1/webhooks/{endpoint_id}/rotate_secret")
    assert response.status_code == 200 and response["Cache-Control"] == "no-store"
    new_secret = response.json()["secret"]
    assert new_secret.startswith("whsec_") and new_secret != endpoint_body["secret"]
    assert WebhookEndpoint.objects.get(pk=endpoint_id).secret == new_secret


def test_delete(cast, api, endpoint_body):
    endpoint_id = endpoint_body["id"]
    response = api.delete(f"/v1/webhooks/{endpoint_id}")
    assert response.json() == {"id": endpoint_id, "object": "webhook_endpoint", "deleted": True}
    assert api.get(f"/v1/webhooks/{endpoint_id}").status_code == 404


def test_delivery_log_and_redeliver(cast, api, endpoint_body, receiver):
    receiver.script(Reply(500, b"down for maintenance"))
    delivery = delivered(cast.tenant)
    response = api.get(f"/v1/webhooks/{endpoint_body['id']}/deliveries")
    assert response.status_code == 200
    (logged,) = response.json()["data"]
    assert logged["id"] == delivery.id and logged["event_type"] == "job.completed"
    assert logged["status"] == "failed" and logged["attempts"] == 1
    assert logged["last_status_code"] == 500
    assert logged["last_response_snippet"] == "down for maintenance"
    assert logged["next_attempt_at"] is not None
    (attempt,) = logged["log"]
    assert attempt["number"] == 1 and attempt["status_code"] == 500
    assert attempt["error"] == "HTTP 500" and attempt["latency_ms"] >= 0

    again = api.post(f"/v1/webhooks/deliveries/{delivery.id}/redeliver")
    assert again.status_code == 202
    assert again.json()["redelivery_of"] == delivery.id
    assert again.json()["event_id"] == delivery.event_id and again.json()["status"] == "pending"
    filtered = api.get(f"/v1/webhooks/{endpoint_body['id']}/deliveries?status=pending&limit=5")
    assert [d["id"] for d in filtered.json()["data"]] == [again.json()["id"]]

    api.patch(f"/v1/webhooks/{endpoint_body['id']}", {"enabled": False}, format="json")
    refused = api.post(f"/v1/webhooks/deliveries/{delivery.id}/redeliver")
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_parameter"


def test_the_delivery_log_pages_with_a_cursor_as_the_jobs_list_does(cast, api, endpoint_body):
    endpoint_id = endpoint_body["id"]
    for number in range(5):
        webhook_event_publish(tenant=cast.tenant, event_type="job.completed",
                              data={"id": f"job_{number}"})
    newest_first = list(WebhookDelivery.objects.filter(endpoint_id=endpoint_id)
                        .order_by("-pk").values_list("pk", flat=True))
    url = f"/v1/webhooks/{endpoint_id}/deliveries"

    def page(**params) -> tuple[list[str], dict]:
        response = api.get(url, params)
        assert response.status_code == 200, response.json()
        body = response.json()
        return [delivery["id"] for delivery in body["data"]], body

    ids, first = page(limit=2)
    assert ids == newest_first[:2]
    assert (first["object"], first["first_id"], first["last_id"], first["has_more"]) == (
        "list", newest_first[0], newest_first[1], True)
    # A delivery made meanwhile shifts no page: the next one starts after the last id seen.
    webhook_event_publish(tenant=cast.tenant, event_type="job.failed", data={"id": "job_new"})
    ids, second = page(limit=2, after=first["last_id"])
    assert ids == newest_first[2:4] and second["has_more"] is True
    ids, last = page(limit=2, after=second["last_id"])
    assert ids == newest_first[4:] and last["has_more"] is False  # one more read, not guessed
    assert page(limit=1, after=newest_first[3])[1]["has_more"] is False  # exactly full
    assert page(order="asc", limit=3)[0] == newest_first[::-1][:3]
    assert page(status="succeeded")[0] == []
    for bad in ({"limit": 0}, {"limit": 101}, {"order": "sideways"}):
        response = api.get(url, bad)
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_parameter"
    # Another tenant's endpoint, with or without a cursor from its log: the same 404 as none.
    outsider = api.bearer(cast.outsider_key)
    for params in ({}, {"after": newest_first[0]}):
        response = outsider.get(url, params)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_outsider_gets_404_everywhere(cast, api, endpoint_body, receiver):
    endpoint_id = endpoint_body["id"]
    delivery = delivered(cast.tenant)
    api.bearer(cast.outsider_key)
    assert api.get("/v1/webhooks").json()["data"] == []
    calls = [
        api.get(f"/v1/webhooks/{endpoint_id}"),
        api.patch(f"/v1/webhooks/{endpoint_id}", {"enabled": False}, format="json"),
        api.delete(f"/v1/webhooks/{endpoint_id}"),
        api.post(f"/v1/webhooks/{endpoint_id}/rotate_secret"),
        api.get(f"/v1/webhooks/{endpoint_id}/deliveries"),
        api.post(f"/v1/webhooks/deliveries/{delivery.id}/redeliver"),
    ]
    for response in calls:
        assert response.status_code == 404, response.request
        assert response.json()["error"]["code"] == "not_found"
    # Same answer as for ids that do not exist at all.
    assert api.get("/v1/webhooks/we_missing").json() == calls[0].json()
    stored = WebhookEndpoint.objects.get(pk=endpoint_id)
    assert stored.enabled and stored.secret == endpoint_body["secret"]
    assert WebhookDelivery.objects.count() == 1


def test_requires_an_api_key(api, cast):
    response = api.bearer(None).get("/v1/webhooks")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_changes_need_a_key_an_admin_issued_and_any_key_reads(api, cast, endpoint_body, receiver):
    """A key has no role of its own and any member may issue one: a member's key must not do
    what the member may not in the dashboard (create, change, delete, rotate, redeliver)."""
    from tests.factories import api_key_for

    endpoint_id = endpoint_body["id"]
    delivery = delivered(cast.tenant)
    member_key = api_key_for(cast.tenant, created_by=cast.member.user)
    orphan_key = api_key_for(cast.tenant)  # its issuer's account is gone
    for key in (member_key, orphan_key):
        client = api.bearer(key)
        assert client.get("/v1/webhooks").status_code == 200
        assert client.get(f"/v1/webhooks/{endpoint_id}/deliveries").status_code == 200
        for method, path, body in [
            ("post", "/v1/webhooks", {"url": receiver.url}),
            ("patch", f"/v1/webhooks/{endpoint_id}", {"enabled": False}),
            ("post", f"/v1/webhooks/{endpoint_id}/rotate_secret", None),
            ("post", f"/v1/webhooks/deliveries/{delivery.id}/redeliver", None),
            ("delete", f"/v1/webhooks/{endpoint_id}", None),
        ]:
            response = getattr(client, method)(path, body, format="json")
            assert response.status_code == 403, (method, path)
            assert response.json()["error"]["code"] == "permission_denied"
    stored = WebhookEndpoint.objects.get(pk=endpoint_id)
    assert stored.enabled and stored.secret == endpoint_body["secret"]
    assert WebhookEndpoint.objects.count() == 1 and WebhookDelivery.objects.count() == 1

    admin_key = api_key_for(cast.tenant, created_by=cast.admin.user)
    response = api.bearer(admin_key).patch(f"/v1/webhooks/{endpoint_id}", {"enabled": False},
                                           format="json")
    assert response.status_code == 200 and response.json()["enabled"] is False


# --- Idempotency-Key on create -------------------------------------------------------------


def test_create_with_an_idempotency_key_makes_one_endpoint_and_shows_its_secret_once(
        cast, api, receiver, sent_tasks):
    from inference.models import IdempotencyKey
    from portal.models import AuditEvent

    body = {"url": receiver.url, "event_types": ["job.completed", "job.failed"]}
    client = api.bearer(cast.owner_key)
    first = client.post("/v1/webhooks", body, format="json", HTTP_IDEMPOTENCY_KEY="ep-1")
    assert first.status_code == 201 and first.json()["secret"].startswith("whsec_")
    # The retry of a creation whose answer was lost: the same endpoint, not a second one with a
    # second secret; the secret is not shown again (rotate for a new one).
    again = client.post("/v1/webhooks", body, format="json", HTTP_IDEMPOTENCY_KEY="ep-1")
    assert again.status_code == 200 and again["Cache-Control"] == "no-store"
    assert again.json() == {**first.json(), "secret": None}
    assert WebhookEndpoint.objects.filter(tenant=cast.tenant).count() == 1
    assert AuditEvent.objects.filter(action=AuditEvent.Action.WEBHOOK_CREATED).count() == 1
    record = IdempotencyKey.objects.get(tenant=cast.tenant, key="ep-1")
    assert record.webhook_endpoint_id == first.json()["id"] and record.job_id is None
    assert first.json()["secret"] not in str(vars(record))

    # The same key with another body, here or for a job: the conflict, nothing made.
    for path, other in [("/v1/webhooks", {**body, "description": "other"}),
                        ("/v1/videos", {"model": "sluice-video-tiny", "prompt": "a blue circle",
                                        "size": "64x64", "seconds": 0.5})]:
        conflict = client.post(path, other, format="json", HTTP_IDEMPOTENCY_KEY="ep-1")
        assert conflict.status_code == 409, conflict.json()
        assert (conflict.json()["error"]["code"], conflict.json()["error"]["param"]) == (
            "idempotency_conflict", "Idempotency-Key")
    assert WebhookEndpoint.objects.filter(tenant=cast.tenant).count() == 1 and sent_tasks == []
    # Keys are per tenant: another tenant's same key makes its own endpoint.
    theirs = api.bearer(cast.outsider_key).post("/v1/webhooks", body, format="json",
                                                HTTP_IDEMPOTENCY_KEY="ep-1")
    assert theirs.status_code == 201 and theirs.json()["id"] != first.json()["id"]

    # Once the endpoint is deleted, its retry is told so rather than making another.
    api.bearer(cast.owner_key).delete(f"/v1/webhooks/{first.json()['id']}")
    gone = client.post("/v1/webhooks", body, format="json", HTTP_IDEMPOTENCY_KEY="ep-1")
    assert gone.status_code == 404 and gone.json()["error"]["param"] == "Idempotency-Key"
    too_long = client.post("/v1/webhooks", body, format="json", HTTP_IDEMPOTENCY_KEY="k" * 256)
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "Idempotency-Key"
    assert not WebhookEndpoint.objects.filter(tenant=cast.tenant).exists()
