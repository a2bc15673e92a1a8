"""The SSRF guard: addresses, names, schemes, the allowlist, redirects and pinning."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from inference.ssrf import UnsafeUrl, address_refusal, url_target_resolve
from inference.webhook_models import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from inference.webhooks import (
    webhook_delivery_attempt,
    webhook_endpoint_create,
    webhook_event_publish,
)
from portal.errors import InvalidParameter
from tests.inference.conftest import Reply


@pytest.fixture
def strict(settings):
    settings.SLUICE_WEBHOOK_ALLOW_PRIVATE = False
    settings.SLUICE_WEBHOOK_ALLOWED_HOSTS = []
    return settings


@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.8.9.10", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254",
    "100.64.0.1", "0.0.0.0", "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.255",  # noqa: S104
    "198.18.0.1", "::1", "::", "fc00::1", "fd12:3456::1", "fe80::1", "ff02::1", "fec0::1",
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "64:ff9b::a9fe:a9fe",
    "2002:7f00:1::", "2001:db8::1",
])
def test_inward_addresses_are_refused(address):
    assert address_refusal(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.216.34", "2606:4700:4700::1111",
                                     "::ffff:8.8.8.8"])
def test_public_addresses_pass(address):
    assert address_refusal(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/hook",
    "http://10.0.0.1/hook",
    "http://169.254.169.254/latest/meta-data/",
    "http://[::1]:8080/hook",
    "http://[::ffff:7f00:1]/hook",
    "http://localhost/hook",  # a name that resolves to loopback
    "http://2130706433/hook",  # 127.0.0.1 written as one number
    "https://0.0.0.0/hook",
])
def test_urls_pointing_inward_are_refused(strict, url):
    with pytest.raises(UnsafeUrl):
        url_target_resolve(url, timeout_s=5)


def test_a_refused_name_says_which_address_and_why(strict):
    # It read "localhost resolves to 127.0.0.1 is a loopback address".
    with pytest.raises(UnsafeUrl) as refused:
        url_target_resolve("http://localhost/hook", timeout_s=5)
    assert str(refused.value) in (
        "127.0.0.1 is a loopback address (localhost resolves to it)",
        "::1 is a loopback address (localhost resolves to it)",
    )


@pytest.mark.parametrize(("url", "reason"), [
    ("ftp://example.com/hook", "only http and https"),
    ("file:///etc/passwd", "only http and https"),
    ("gopher://example.com/", "only http and https"),
    ("http://user:pw@example.com/hook", "credentials"),
    ("http:///nohost", "no host"),
])
def test_only_plain_http_urls_are_accepted(strict, url, reason):
    with pytest.raises(UnsafeUrl, match=reason):
        url_target_resolve(url, timeout_s=5)


@pytest.mark.django_db
@pytest.mark.parametrize("url", ["http://127.0.0.1/", "http://10.0.0.1/", "http://[::1]/",
                                 "http://169.254.169.254/", "http://localhost:8000/"])
def test_registration_refuses_inward_urls(strict, cast, url):
    with pytest.raises(InvalidParameter) as refused:
        webhook_endpoint_create(tenant=cast.tenant, url=url)
    assert refused.value.param == "url"
    assert not WebhookEndpoint.objects.exists()


@pytest.mark.django_db
def test_registration_accepts_a_name_that_does_not_resolve_yet(strict, cast):
    endpoint = webhook_endpoint_create(tenant=cast.tenant, url="https://hooks.invalid/sluice")
    assert endpoint.url == "https://hooks.invalid/sluice"


def _deliver_once(tenant) -> WebhookDelivery:
    event = webhook_event_publish(tenant=tenant, event_type="job.completed", data={"id": "j"})
    (delivery,) = event.deliveries.all()
    return webhook_delivery_attempt(delivery_id=delivery.id, attempt=1)


@pytest.mark.django_db
def test_every_delivery_checks_again(cast, receiver, settings):
    webhook_endpoint_create(tenant=cast.tenant, url=receiver.url)  # allowed while registering
    settings.SLUICE_WEBHOOK_ALLOW_PRIVATE = False
    delivery = _deliver_once(cast.tenant)
    assert delivery.status == WebhookDelivery.Status.FAILED
    assert "127.0.0.1 is a loopback address" in delivery.last_error
    assert receiver.requests == []


@pytest.mark.django_db
def test_the_allowlist_is_exact_host_and_port(cast, receiver, second_receiver, settings):
    settings.SLUICE_WEBHOOK_ALLOW_PRIVATE = False
    settings.SLUICE_WEBHOOK_ALLOWED_HOSTS = [f"127.0.0.1:{receiver.port}"]
    assert url_target_resolve(receiver.url, timeout_s=5).address == "127.0.0.1"
    for other in (second_receiver.url, f"http://localhost:{receiver.port}/hooks"):
        with pytest.raises(UnsafeUrl):
            url_target_resolve(other, timeout_s=5)


@pytest.mark.django_db
def test_a_redirect_to_loopback_is_refused(cast, receiver, second_receiver, settings):
    settings.SLUICE_WEBHOOK_ALLOW_PRIVATE = False
    settings.SLUICE_WEBHOOK_ALLOWED_HOSTS = [f"127.0.0.1:{receiver.port}"]
    webhook_endpoint_create(tenant=cast.tenant, url=receiver.url)
    receiver.script(Reply(302, b"", headers={"Location": second_receiver.url}))

    delivery = _deliver_once(cast.tenant)

    assert len(receiver.requests) == 1  # the allowed first hop was asked
    assert second_receiver.requests == []  # the loopback target never was
    assert delivery.status == WebhookDelivery.Status.FAILED
    assert "loopback" in delivery.last_error
    assert WebhookAttempt.objects.get(delivery=delivery).url == second_receiver.url


@pytest.mark.django_db
def test_the_connection_is_pinned_to_the_checked_address(cast, receiver, settings, monkeypatch):
    """`hooks.sluice-test` exists only in our resolver: the delivery can only have arrived
    because httpx connected to the address we checked, not to a second lookup of the name."""
    real_getaddrinfo = socket.getaddrinfo
    lookups = []

    def resolver(host, *args, **kwargs):
        if host == "hooks.sluice-test":
            lookups.append(host)
            return real_getaddrinfo("127.0.0.1", *args, **kwargs)
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    settings.SLUICE_WEBHOOK_ALLOW_PRIVATE = False
    settings.SLUICE_WEBHOOK_ALLOWED_HOSTS = [f"hooks.sluice-test:{receiver.port}"]
    webhook_endpoint_create(tenant=cast.tenant, url=f"http://hooks.sluice-test:{receiver.port}/h")
    lookups.clear()

    delivery = _deliver_once(cast.tenant)

    assert delivery.status == WebhookDelivery.Status.SUCCEEDED
    assert lookups == ["hooks.sluice-test"]  # resolved once, by the guard
    assert receiver.requests[0].headers["Host"] == f"hooks.sluice-test:{receiver.port}"


@pytest.mark.django_db
def test_a_slow_name_server_cannot_hold_a_delivery_or_a_registration_past_its_deadline(
        cast, receiver, settings, monkeypatch):
    """The customer chooses the name and so its name server: one that answers after 4 s must
    cost a delivery its timeout (0.5 s), not the lookup's, and registration its own 3 s."""
    import threading
    import time

    real_getaddrinfo = socket.getaddrinfo
    released = threading.Event()

    def slow_resolver(host, *args, **kwargs):
        if host == "slow.sluice-test":
            released.wait(4)
            return real_getaddrinfo("127.0.0.1", *args, **kwargs)
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow_resolver)
    settings.SLUICE_WEBHOOK_TIMEOUT_S = 0.5
    url = f"http://slow.sluice-test:{receiver.port}/h"
    started = time.monotonic()
    webhook_endpoint_create(tenant=cast.tenant, url=url)  # accepted: delivery checks again
    assert 2.9 < time.monotonic() - started < 3.8

    started = time.monotonic()
    delivery = _deliver_once(cast.tenant)
    assert time.monotonic() - started < 1.5
    released.set()
    assert delivery.status == WebhookDelivery.Status.FAILED
    assert "timed out after 0.5 s" in delivery.last_error
    assert receiver.requests == []
