"""Host names as a browser reads them, and shell patterns matched against them label by
label: for the fleet server's check of the links devices announce, and for the check of
the names the device's and the fleet server's HTTP servers are reached under
(:class:`HostGate`)."""

from __future__ import annotations

import contextlib
import fnmatch
import ipaddress
import re
from collections.abc import Iterable
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

__all__ = [
    "LOCAL_SUFFIXES",
    "Address",
    "HostGate",
    "beyond_local_network",
    "is_local_name",
    "matches",
    "read_host",
]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
# Names that only a local network resolves: one label, or one of these endings.
LOCAL_SUFFIXES = (".local", ".lan", ".home.arpa", ".internal")


def read_host(host: str) -> str | Address | None:
    """``host`` (no port; an IPv6 address without brackets) as a browser reads it: an IP
    address, a lower-case name without its final dot, or None where a browser would read
    it otherwise than it is written.

    Only plain ASCII names and IP addresses in their usual form are read: a browser
    decodes "%2e" to a dot, reads "2130706433" or "0x7f.1" as an IPv4 address and maps
    "evil。com" to "evil.com". An IPv4 address mapped into IPv6 is read as the IPv4 one.
    """
    host = host.lower().removesuffix(".")
    if ":" in host:
        try:
            ip = ipaddress.IPv6Address(host)
        except ValueError:
            return None
        return ip.ipv4_mapped or ip
    if not re.fullmatch(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*", host):
        return None
    if re.fullmatch(r"[0-9]+|0x[0-9a-f]*", host.rsplit(".", 1)[-1]):
        # A browser reads a host whose last label is a number as an IPv4 address.
        try:
            return ipaddress.IPv4Address(host)
        except ValueError:
            return None
    return host


def matches(host: str | Address, patterns: Iterable[str]) -> bool:
    """Whether a host from :func:`read_host` matches one of ``patterns`` label by label
    ("*" stands for one label or part of one: "10.0.0.*" is not "10.0.0.7.evil.example")."""
    labels = str(host).split(".")
    for pattern in patterns:
        with contextlib.suppress(ValueError):  # an address: in the form hosts are read
            pattern = str(ipaddress.ip_address(pattern))
        parts = pattern.lower().removesuffix(".").split(".")
        if len(parts) == len(labels) and all(
            fnmatch.fnmatchcase(a, b) for a, b in zip(labels, parts, strict=True)
        ):
            return True
    return False


def is_local_name(name: str) -> bool:
    """Whether a name from :func:`read_host` is one only a local network resolves."""
    return "." not in name or name.endswith(LOCAL_SUFFIXES)


def beyond_local_network(host: str) -> bool:
    """Whether ``host`` (a name or an address, as config gives it) may be reached across
    networks someone else runs: a public address, or a DNS name that is not local."""
    read = read_host(host[1:-1] if host.startswith("[") and host.endswith("]") else host)
    if read is None:
        return True
    if isinstance(read, str):
        return not is_local_name(read)
    return not (read.is_private or read.is_loopback or read.is_link_local)


def _host_of(header: str) -> str | None:
    """The host of a Host header (an IPv6 address without brackets), None if malformed."""
    if header.startswith("["):
        address, bracket, rest = header[1:].partition("]")
        return address if bracket and (not rest or re.fullmatch(r":[0-9]+", rest)) else None
    name, colon, port = header.partition(":")
    return name if not colon or re.fullmatch(r"[0-9]+", port) else None


class HostGate:
    """ASGI middleware: a request (a WebSocket too) naming in its Host header a host the
    server is not known by is answered 400 before any handler runs.

    Against DNS rebinding: another site's page whose name its DNS then points at the
    server is same-origin with it in the browser, and can send requests to it and read the
    answers (guess passwords or tokens from inside the network, read whatever needs
    none). Its requests name that site's host. An IP address cannot be rebound and is
    always taken, as are local names (:func:`is_local_name`) and ``names`` (patterns as
    :func:`matches` takes them; "*" takes every name). ``setting``: the config key that
    lists more names, for the refusal to point at.
    """

    def __init__(self, app: Any, names: Iterable[str], setting: str) -> None:
        self.app = app
        self._names = list(names)
        self._any = "*" in self._names
        self._setting = setting

    def allows(self, header: str) -> bool:
        """Whether a request with this Host header is served."""
        host = _host_of(header)
        read = read_host(host) if host is not None else None
        if read is None:
            return False
        if self._any or not isinstance(read, str):
            return True
        return is_local_name(read) or matches(read, self._names)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            # HTTP/1.1 requires one Host header (h11 refuses a request without); HTTP/1.0
            # need not send one, and no browser sends such a request.
            hosts = [v for k, v in scope["headers"] if k == b"host"]
            if hosts and not self.allows(hosts[0].decode("latin-1")):
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                refused = JSONResponse(
                    {
                        "error": "this server is not known by the host named in the request: "
                        f"add the name to {self._setting}"
                    },
                    status_code=400,
                )
                await refused(scope, receive, send)
                return
        await self.app(scope, receive, send)
