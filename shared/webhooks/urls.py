"""Which URLs may receive webhooks, and a POST that connects only to the address that was checked.

A webhook URL is chosen by a tenant but fetched by steprun from inside its
network: without a check, ``http://169.254.169.254/`` or ``http://localhost:6379``
would be a way in (SSRF). URLs resolving to any non-global address (private,
loopback, link-local, reserved, carrier-grade NAT) are refused unless
STEPRUN_WEBHOOK_ALLOW_PRIVATE=true, at creation (400) and again at every
delivery, which then connects to the very address it checked (no DNS rebinding
between check and connect) and never follows a redirect.
"""
from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

from shared.errors import BadInput

MAX_URL = 2048


class DeliveryError(Exception):
    """One attempt could not get an HTTP answer (refused address, DNS, connect, timeout, TLS)."""


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int
    path: str


def parse_url(url: object) -> Target:
    """The URL's parts, or a 400 saying what is wrong with it."""
    if not isinstance(url, str) or not url:
        raise BadInput("'url' is required and must be a string", field="url")
    if len(url) > MAX_URL:
        raise BadInput(f"'url' is longer than {MAX_URL} characters", field="url")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise BadInput(f"'url' is not a valid URL ({exc})", field="url") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadInput("'url' must be an http:// or https:// URL with a host", field="url")
    if parts.username or parts.password:
        raise BadInput("'url' must not carry credentials", field="url")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80), path)


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def resolve(target: Target, allow_private: bool) -> list[str]:
    """The addresses to connect to; raises :class:`DeliveryError` if none may be used."""
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise DeliveryError(f"{target.host} does not resolve ({exc})") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not allow_private:
        refused = [a for a in addresses if not _public(a)]
        if refused:
            raise DeliveryError(f"{target.host} resolves to a private, loopback or link-local address "
                                f"({refused[0]}); set STEPRUN_WEBHOOK_ALLOW_PRIVATE=true to allow it")
    return addresses


def check_url(url: object, allow_private: bool) -> str:
    """``url`` if it may receive webhooks, else a 400."""
    target = parse_url(url)
    if not allow_private:
        try:
            resolve(target, allow_private)
        except DeliveryError as exc:
            raise BadInput(f"'url' refused: {exc}", field="url") from None
    assert isinstance(url, str)
    return url


class _Pinned(http.client.HTTPSConnection):
    """An HTTP(S) connection to a checked address, with the URL's host in Host and TLS SNI."""

    def __init__(self, target: Target, address: str, timeout: float):
        self._tls_context = ssl.create_default_context()
        super().__init__(target.host, target.port, timeout=timeout, context=self._tls_context)
        self._address, self._tls = address, target.scheme == "https"

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._tls_context.wrap_socket(sock, server_hostname=self.host) if self._tls else sock


def post(url: str, body: str, headers: dict[str, str], timeout: float, allow_private: bool) -> int:
    """POST ``body`` to ``url`` and return the status code; :class:`DeliveryError` if there is none."""
    try:
        target = parse_url(url)
    except BadInput as exc:
        raise DeliveryError(exc.message) from None
    addresses = resolve(target, allow_private)
    conn = _Pinned(target, addresses[0], timeout)
    try:
        conn.request("POST", target.path, body=body.encode(), headers=headers)
        response = conn.getresponse()
        response.read(65536)  # the receiver's answer is not used; read a little so the connection closes cleanly
        return response.status
    except (OSError, http.client.HTTPException) as exc:
        raise DeliveryError(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) from None
    finally:
        conn.close()
