"""Outbound HTTP to customer-chosen URLs without letting them reach inside our network (SSRF).

Every hop (the endpoint URL and each redirect) is resolved once with getaddrinfo; the request is
refused if any address the name resolves to is loopback, private, link-local (the cloud metadata
service at 169.254.169.254), multicast, reserved or unspecified, IPv6 forms included (IPv4-mapped,
6to4, Teredo and NAT64 addresses are judged by the IPv4 address they carry). The connection is
then pinned to the address that was checked: httpx connects to the IP while the Host header and
TLS SNI/certificate check keep the original name, so a DNS answer that changes between the check
and the connect (rebinding) cannot redirect us. Proxies from the environment are ignored for the
same reason.

`SLUICE_WEBHOOK_ALLOW_PRIVATE` lifts the address check (development); `SLUICE_WEBHOOK_ALLOWED_HOSTS`
exempts exact `host:port` pairs (a trusted internal receiver) and nothing else, so a redirect
from an allowed host to another internal address is still refused.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
import time
from dataclasses import dataclass

import httpx
from django.conf import settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS = {"http": 80, "https": 443}


class UnsafeUrl(Exception):
    """The URL may not be fetched. Not a SluiceError: the caller decides what it means."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class UnresolvableHost(Exception):
    def __init__(self, host: str) -> None:
        self.reason = f"could not resolve {host}"
        super().__init__(self.reason)


class ResolveTimeout(Exception):
    def __init__(self, host: str) -> None:
        self.reason = f"resolving {host} timed out"
        super().__init__(self.reason)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def address_refusal(address: IPAddress) -> str | None:
    """Why Sluice must not connect to this address, or None when it is a public one."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            # ::ffff:a.b.c.d is a.b.c.d on a dual-stack socket: judge that address alone.
            reason = address_refusal(address.ipv4_mapped)
            return f"{address} carries {reason}" if reason else None
        embedded = _embedded_ipv4(address)
        if embedded is not None and (reason := address_refusal(embedded)):
            return f"{address} carries {reason}"
    checks = (
        ("is_unspecified", "an unspecified address"),
        ("is_loopback", "a loopback address"),
        ("is_link_local", "a link-local address"),
        ("is_multicast", "a multicast address"),
        ("is_private", "a private address"),
        ("is_reserved", "a reserved address"),
        ("is_site_local", "a site-local address"),
    )
    for attribute, label in checks:
        if getattr(address, attribute, False):
            return f"{address} is {label}"
    if not address.is_global:
        return f"{address} is not a public address"
    return None


@dataclass(frozen=True)
class Target:
    """A URL that passed the check, and the one address we will connect to for it."""

    url: httpx.URL
    address: str

    @property
    def pinned_url(self) -> httpx.URL:
        return self.url.copy_with(host=self.address)

    @property
    def host_header(self) -> str:
        return self.url.netloc.decode("ascii")


def _host_port(url: httpx.URL) -> tuple[str, int]:
    return url.host, url.port or _DEFAULT_PORTS[url.scheme]


def url_shape_check(raw_url: str) -> httpx.URL:
    """Scheme, host and no credentials: what every hop must look like before we resolve it."""
    try:
        url = httpx.URL(raw_url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise UnsafeUrl(f"not a valid URL ({exc})") from exc
    if url.scheme not in _DEFAULT_PORTS:
        raise UnsafeUrl("only http and https URLs are allowed")
    if not url.host:
        raise UnsafeUrl("the URL has no host")
    if url.userinfo:
        # Credentials in the URL would end up in logs and in the delivery log.
        raise UnsafeUrl("credentials in the URL are not allowed")
    return url


# Registration checks the name in an API request; a slower answer is left to delivery.
REGISTRATION_RESOLVE_TIMEOUT_S = 3.0


def _resolve(host: str, port: int, *, timeout_s: float) -> list[IPAddress]:
    """getaddrinfo with a deadline. It cannot be interrupted and the customer picks the name (and
    so can pick a name server that answers slowly): it runs on a daemon thread that is left to
    finish on its own if the deadline passes, so the caller's deadline holds."""
    outcome: list = []

    def lookup() -> None:
        try:
            outcome.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except (OSError, UnicodeError) as exc:
            outcome.append(exc)

    thread = threading.Thread(target=lookup, name="ssrf-resolve", daemon=True)
    thread.start()
    thread.join(max(0.0, timeout_s))
    if not outcome:
        raise ResolveTimeout(host)
    if isinstance(outcome[0], BaseException):
        raise UnresolvableHost(host) from outcome[0]
    # getaddrinfo may append a scope id to link-local IPv6 ("fe80::1%eth0").
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in outcome[0]]


def _is_exempt(host: str, port: int) -> bool:
    if settings.SLUICE_WEBHOOK_ALLOW_PRIVATE:
        return True
    wanted = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return wanted.lower() in {entry.lower() for entry in settings.SLUICE_WEBHOOK_ALLOWED_HOSTS}


def url_target_resolve(raw_url: str | httpx.URL, *, timeout_s: float) -> Target:
    """Check one hop and choose the address to pin. Raises UnsafeUrl, UnresolvableHost or
    ResolveTimeout."""
    url = url_shape_check(str(raw_url))
    host, port = _host_port(url)
    addresses = _resolve(host, port, timeout_s=timeout_s)
    if not addresses:
        raise UnresolvableHost(host)
    if not _is_exempt(host, port):
        # Every answer must be public: a name that also resolves inward is refused outright.
        for address in addresses:
            if reason := address_refusal(address):
                raise UnsafeUrl(reason if str(address) == host else f"{reason} ({host} resolves to it)")
    return Target(url=url, address=str(addresses[0]))


def url_check_for_registration(raw_url: str) -> None:
    """Refuse an endpoint URL that is malformed or points inward. A name that does not resolve
    yet, or not in time, is accepted (DNS may follow the registration); delivery checks again on
    every attempt."""
    try:
        url_target_resolve(raw_url, timeout_s=REGISTRATION_RESOLVE_TIMEOUT_S)
    except (UnresolvableHost, ResolveTimeout):
        return


class _ExchangeDeadline:
    """Cuts the connections when the attempt's deadline passes. httpx's timeouts bound each
    socket read, not the exchange: a receiver that sends its response headers a byte at a time
    never lets one read time out, and would hold the worker for hours (and, past the claim's
    lease, a second worker with the retry). At the deadline a timer shuts the sockets down,
    which wakes the blocked read at once.

    Each connection's socket is learnt from httpcore's `trace` request extension and kept as a
    duplicate: shutdown acts on the connection behind every descriptor of it, TLS wrapping
    (which detaches the original socket object) does not touch the duplicate, and a descriptor
    closed meanwhile cannot be reused under us while the duplicate holds it open."""

    def __init__(self, deadline: float) -> None:
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.expired = False
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _ExchangeDeadline:
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()
        with self._lock:
            for duplicate in self._sockets:
                duplicate.close()
            self._sockets.clear()

    def trace(self, event: str, info: dict) -> None:
        if event != "connection.connect_tcp.complete":
            return
        duplicate = info["return_value"].get_extra_info("socket").dup()
        with self._lock:
            self._sockets.append(duplicate)
            if self.expired:
                self._cut(duplicate)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for duplicate in self._sockets:
                self._cut(duplicate)

    @staticmethod
    def _cut(duplicate: socket.socket) -> None:
        with contextlib.suppress(OSError):  # the peer or we closed it already
            duplicate.shutdown(socket.SHUT_RDWR)


@dataclass(frozen=True)
class GuardedResponse:
    url: str  # the hop that answered
    status_code: int | None
    body_snippet: bytes
    latency_ms: int
    error: str = ""


def _read_capped(response: httpx.Response, *, max_bytes: int, deadline: float) -> bytes:
    body = bytearray()
    # Raw bytes: we asked for identity encoding, and decoding a compressed body could expand a
    # small chunk into a very large one before the cap applies.
    try:
        for chunk in response.iter_raw():
            body.extend(chunk)
            if len(body) >= max_bytes or time.monotonic() >= deadline:
                break
    except httpx.HTTPError:
        pass  # the status already arrived; a body cut short is still a snippet
    return bytes(body[:max_bytes])


def guarded_post(
    raw_url: str,
    *,
    content: bytes,
    headers: dict[str, str],
    timeout_s: float,
    max_redirects: int,
    max_body_bytes: int,
) -> GuardedResponse:
    """POST with the SSRF check on every hop, redirects followed by hand, a deadline over the
    whole exchange and the response body read only up to `max_body_bytes`.

    A redirect repeats the same POST (any of 301/302/303/307/308): a webhook is a POST or
    nothing, and a GET that answered 200 must not count as a delivery.
    """
    started = time.monotonic()
    deadline = started + timeout_s
    hop_url: str | httpx.URL = raw_url

    def elapsed_ms() -> int:
        return int((time.monotonic() - started) * 1000)

    timed_out = f"timed out after {timeout_s:g} s"
    with _ExchangeDeadline(deadline) as cutoff, \
            httpx.Client(trust_env=False, follow_redirects=False) as client:
        for _hop in range(max_redirects + 1):
            try:
                target = url_target_resolve(hop_url, timeout_s=deadline - time.monotonic())
            except ResolveTimeout:
                return GuardedResponse(str(hop_url), None, b"", elapsed_ms(), timed_out)
            except (UnsafeUrl, UnresolvableHost) as exc:
                return GuardedResponse(str(hop_url), None, b"", elapsed_ms(), exc.reason)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return GuardedResponse(str(target.url), None, b"", elapsed_ms(), timed_out)
            request_headers = {**headers, "Host": target.host_header,
                               "Accept-Encoding": "identity"}
            extensions = {"trace": cutoff.trace}
            if target.url.scheme == "https":
                extensions["sni_hostname"] = target.url.host
            try:
                with client.stream("POST", target.pinned_url, content=content,
                                   headers=request_headers, timeout=httpx.Timeout(remaining),
                                   extensions=extensions) as response:
                    location = response.headers.get("location")
                    if response.status_code in _REDIRECT_CODES and location:
                        hop_url = target.url.join(location)
                        continue
                    snippet = _read_capped(response, max_bytes=max_body_bytes, deadline=deadline)
                    return GuardedResponse(str(target.url), response.status_code, snippet,
                                           elapsed_ms())
            except httpx.TimeoutException:
                error = timed_out
            except httpx.HTTPError as exc:
                # Cut at the deadline, the read fails as a closed connection would.
                error = timed_out if cutoff.expired else f"{exc.__class__.__name__}: {exc}"[:300]
            return GuardedResponse(str(target.url), None, b"", elapsed_ms(), error)
    return GuardedResponse(str(hop_url), None, b"", elapsed_ms(),
                           f"more than {max_redirects} redirects")
