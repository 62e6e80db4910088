"""Host names as a browser reads them, and shell patterns matched against them label by
label: for the fleet server's check of the links devices announce, and the device's check
of the names it is reached under."""

from __future__ import annotations

import contextlib
import fnmatch
import ipaddress
import re
from collections.abc import Iterable

__all__ = ["LOCAL_SUFFIXES", "Address", "is_local_name", "matches", "read_host"]

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
