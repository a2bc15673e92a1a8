"""ws /ws/tenants/{slug}/jobs/: the live job list's feed, by dashboard session only."""

from __future__ import annotations

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import Client

from inference.events import event_publish
from portal.asgi import application

pytestmark = pytest.mark.django_db(transaction=True)


def session_cookie(user) -> list[tuple[bytes, bytes]]:
    client = Client()
    client.force_login(user)
    return [(b"cookie", f"sessionid={client.cookies['sessionid'].value}".encode())]


async def test_members_get_their_tenants_job_status_changes_and_nobody_else_does(cast):
    viewer_headers = await sync_to_async(session_cookie)(cast.viewer.user)
    viewer = WebsocketCommunicator(application, "/ws/tenants/acme/jobs/", headers=viewer_headers)
    connected, _ = await viewer.connect()
    assert connected
    assert (await viewer.receive_json_from(timeout=5))["type"] == "subscribed"

    outsider_headers = await sync_to_async(session_cookie)(cast.outsider.user)
    # The outsider listens to its own tenant: acme's events must not reach it.
    own = WebsocketCommunicator(application, "/ws/tenants/globex/jobs/", headers=outsider_headers)
    await own.connect()
    assert (await own.receive_json_from(timeout=5))["type"] == "subscribed"

    await sync_to_async(event_publish)(job_id="job_x", tenant_id=cast.tenant.pk,
                                       event_type="job.started", data={"status": "running"})
    await sync_to_async(event_publish)(job_id="job_x", tenant_id=cast.tenant.pk,
                                       event_type="job.progress", data={"progress": 50})
    await sync_to_async(event_publish)(job_id="job_x", tenant_id=cast.tenant.pk,
                                       event_type="job.completed", data={"status": "succeeded"})
    first = await viewer.receive_json_from(timeout=5)
    second = await viewer.receive_json_from(timeout=5)
    # Status changes only: progress stays on the job's own stream.
    assert [first["type"], second["type"]] == ["job.started", "job.completed"]
    assert first["data"]["job_id"] == "job_x"
    assert await own.receive_nothing(timeout=0.5)
    await viewer.disconnect()
    await own.disconnect()

    for path, headers, code in [("/ws/tenants/acme/jobs/", outsider_headers, 4404),
                                ("/ws/tenants/nope/jobs/", viewer_headers, 4404),
                                ("/ws/tenants/acme/jobs/", [], 4401)]:
        intruder = WebsocketCommunicator(application, path, headers=headers)
        await intruder.connect()
        assert await intruder.receive_output(timeout=5) == {"type": "websocket.close", "code": code}


async def test_status_changes_are_broadcast_only_while_someone_listens(cast, monkeypatch):
    """The publish script tells whether the tenant's group has members: with no live list open,
    a status change costs no broadcast; once one is open, it gets them; after it closes, none."""
    from inference import events

    broadcasts = []
    real_broadcast = events.group_broadcast

    def recording_broadcast(group, message):
        broadcasts.append(message["event"])
        real_broadcast(group, message)

    monkeypatch.setattr(events, "group_broadcast", recording_broadcast)
    publish = sync_to_async(event_publish)
    await publish(job_id="job_y", tenant_id=cast.tenant.pk, event_type="job.started", data={})
    assert broadcasts == []

    headers = await sync_to_async(session_cookie)(cast.viewer.user)
    viewer = WebsocketCommunicator(application, "/ws/tenants/acme/jobs/", headers=headers)
    await viewer.connect()
    assert (await viewer.receive_json_from(timeout=5))["type"] == "subscribed"
    await publish(job_id="job_y", tenant_id=cast.tenant.pk, event_type="job.completed", data={})
    assert (await viewer.receive_json_from(timeout=5))["type"] == "job.completed"
    assert broadcasts == ["job.completed"]
    await viewer.disconnect()

    await publish(job_id="job_z", tenant_id=cast.tenant.pk, event_type="job.started", data={})
    assert broadcasts == ["job.completed"]


async def test_a_session_counts_only_on_a_handshake_from_our_own_origin(cast, settings, sent_tasks):
    """Another site's page opens the websocket with the member's cookie (CSRF does not cover
    handshakes): it is anonymous there. Our own pages, and clients that send no Origin, are not."""
    settings.CSRF_TRUSTED_ORIGINS = ["https://dash.example.com"]
    from tests.factories import api_key_obj, video_job_submit

    api_key = await sync_to_async(api_key_obj)(cast.tenant)
    job = (await sync_to_async(video_job_submit)(api_key, cu=0.01, params={})).job
    cookie = await sync_to_async(session_cookie)(cast.viewer.user)
    cases = [
        (b"https://evil.example", 4401),
        (b"http://testserver.evil.example", 4401),
        (b"null", 4401),  # a sandboxed frame or a file: page
        (b"http://testserver", None),  # ALLOWED_HOSTS
        (b"https://dash.example.com", None),  # CSRF_TRUSTED_ORIGINS (behind a proxy)
        (None, None),  # no Origin: not a browser
    ]
    for origin, refused_with in cases:
        headers = cookie + ([(b"origin", origin)] if origin is not None else [])
        feed = WebsocketCommunicator(application, "/ws/tenants/acme/jobs/", headers=headers)
        await feed.connect()
        if refused_with:
            assert await feed.receive_output(timeout=5) == {"type": "websocket.close", "code": refused_with}, origin
        else:
            assert (await feed.receive_json_from(timeout=5))["type"] == "subscribed", origin
            await feed.disconnect()
        events = WebsocketCommunicator(application, f"/ws/jobs/{job.pk}/", headers=headers)
        connected, _ = await events.connect()
        assert connected
        if refused_with:
            assert await events.receive_output(timeout=5) == {"type": "websocket.close", "code": refused_with}, origin
        else:
            assert (await events.receive_json_from(timeout=5))["type"] == "job.queued", origin
        await events.disconnect()
