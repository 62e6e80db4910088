"""Connection limits of edgecam's HTTP servers (the device's and the fleet server's):
uvicorn's HTTP/1.1 protocol with a deadline for each request head and a cap on the
connections held, in all and from one client address; on the device, uvicorn's WebSocket
protocol cutting off a peer that stopped reading."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Iterable

from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from edgecam.ratelimit import Every

__all__ = [
    "HEADER_TIMEOUT_S",
    "IDLE_TIMEOUT_S",
    "MAX_CONNECTIONS",
    "MAX_CONNECTIONS_PER_CLIENT",
    "WRITE_STALL_S",
    "GuardedH11Protocol",
    "GuardedWebSocketProtocol",
    "guarded_protocol",
    "guarded_websocket",
]

log = logging.getLogger(__name__)

# A client gets this long, from connecting or from the end of its previous response, to
# send a whole request head; one that trickles bytes (slowloris) or sends nothing is cut off.
HEADER_TIMEOUT_S = 10.0
# A kept-alive connection with no request for this long is closed.
IDLE_TIMEOUT_S = 5.0
# Connections (WebSockets included) held at once. Well under the usual limit of 1024 open
# files: a server at that limit cannot accept, and asyncio logs a traceback for every try.
MAX_CONNECTIONS = 400
# Connections held at once from one address, so that one client cannot take them all.
MAX_CONNECTIONS_PER_CLIENT = 50
# A WebSocket whose peer takes none of what is sent for this long (the transport's buffer
# stays over its high-water mark) is cut off. A peer that stopped reading keeps its TCP
# window shut: sends wait for ever, and a close waits for ever to flush what is buffered.
WRITE_STALL_S = 20.0
# A refusal is logged at most once in 10 s, for every server of the process (a flood would
# flood the log).
_REFUSALS = Every(10.0)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for each request head (uvicorn's own
    keep-alive timer is disarmed by any byte received, so a client that trickles a header
    line a byte at a time, or connects and says nothing, would hold a connection for ever)
    and caps on the connections held: one over a cap is closed as soon as it is accepted."""

    header_timeout_s = HEADER_TIMEOUT_S
    max_connections = MAX_CONNECTIONS
    max_connections_per_client = MAX_CONNECTIONS_PER_CLIENT
    # Addresses that speak for many clients (trusted reverse proxies): no cap of their own.
    many_clients: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    _header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        why = self._over_cap()
        if why:
            self._log_refusal(why)
            transport.close()
            return
        self._arm_header_deadline()

    def _over_cap(self) -> str:
        held = self.server_state.connections  # this one included, WebSockets too
        if len(held) > self.max_connections:
            return f"{len(held) - 1} connections held, the most there may be"
        host = self.client[0] if self.client else None
        if host is None or self._speaks_for_many(host):
            return ""
        mine = sum(1 for c in held if (getattr(c, "client", None) or ("",))[0] == host)
        if mine > self.max_connections_per_client:
            return f"{host} holds {mine - 1} connections, the most one client may"
        return ""

    def _speaks_for_many(self, host: str) -> bool:
        with contextlib.suppress(ValueError):
            address = ipaddress.ip_address(host)
            return any(address in network for network in self.many_clients)
        return False

    def _log_refusal(self, why: str) -> None:
        if _REFUSALS.due():
            log.warning("HTTP server: %s; new connections are closed at once", why)

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        super().data_received(data)
        # A whole request head arrived; or it was a WebSocket upgrade, and the connection
        # is the WebSocket protocol's now (with its own pings): not to be cut off.
        if self.cycle is not cycle or self._upgraded():
            self._disarm_header_deadline()

    def _upgraded(self) -> bool:
        transport = self.transport
        return transport is not None and transport.get_protocol() is not self

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.cycle is None or self.cycle.response_complete:
            self._arm_header_deadline()  # for the next request on this connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._header_late)

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _header_late(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing() and not self._upgraded():
            log.info("HTTP server: no request head within %.0f s; closing", self.header_timeout_s)
            self.transport.close()


class GuardedWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol, cutting off (aborting) a connection whose send buffer
    stays full for ``write_stall_s`` (its peer stopped reading, or reads far slower than it
    is sent to): the app's blocked send then fails, and what it held (a live viewer's place,
    its queue) is let go. uvicorn's own ping timeout only closes, and a close waits for the
    buffer to drain, which it then never does."""

    write_stall_s = WRITE_STALL_S
    _stall: asyncio.TimerHandle | None = None

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stall is None:
            self._stall = self.loop.call_later(self.write_stall_s, self._stalled)

    def resume_writing(self) -> None:
        self._cancel_stall()
        super().resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_stall()
        super().connection_lost(exc)

    def _cancel_stall(self) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    def _stalled(self) -> None:
        self._stall = None
        host = self.client[0] if self.client else "?"
        log.info("WebSocket of %s: nothing drained for %.0f s; cut off", host, self.write_stall_s)
        self.transport.abort()


def guarded_websocket(*, write_stall_s: float = WRITE_STALL_S) -> type[GuardedWebSocketProtocol]:
    """A :class:`GuardedWebSocketProtocol` with this stall limit, for uvicorn's ``ws``
    option."""
    if write_stall_s <= 0:
        raise ValueError(f"write_stall_s must be > 0, got {write_stall_s}")
    return type("GuardedWebSocket", (GuardedWebSocketProtocol,), {"write_stall_s": write_stall_s})


def guarded_protocol(
    *,
    header_timeout_s: float = HEADER_TIMEOUT_S,
    max_connections: int = MAX_CONNECTIONS,
    max_connections_per_client: int = MAX_CONNECTIONS_PER_CLIENT,
    many_clients: Iterable[str] = (),
) -> type[GuardedH11Protocol]:
    """A :class:`GuardedH11Protocol` with these limits, for uvicorn's ``http`` option.
    ``many_clients``: addresses or networks (trusted reverse proxies, whose connections
    carry many clients') held to the cap in all only."""
    if header_timeout_s <= 0:
        raise ValueError(f"header_timeout_s must be > 0, got {header_timeout_s}")
    if not 1 <= max_connections_per_client <= max_connections:
        raise ValueError(
            "max_connections_per_client must be in 1..max_connections, got "
            f"{max_connections_per_client} (max_connections {max_connections})"
        )
    return type(
        "GuardedProtocol",
        (GuardedH11Protocol,),
        {
            "header_timeout_s": header_timeout_s,
            "max_connections": max_connections,
            "max_connections_per_client": max_connections_per_client,
            "many_clients": tuple(ipaddress.ip_network(n, strict=False) for n in many_clients),
        },
    )
