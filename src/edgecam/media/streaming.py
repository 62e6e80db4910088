"""The RTSP server: relays every camera's H.264 RTP, never re-encoding.

The inference pipeline of each camera sends H.264 RTP to a loopback UDP port. One server
serves every camera of the device, a mount per camera: one shared RTSP media (one
``udpsrc``) per mount takes the RTP in, depayloads and payloads it again (so that clients see
one steady SSRC and sequence even when the pipeline restarts, and SPS/PPS with every
keyframe) and serves it at ``rtsp://HOST:PORT/<camera>`` to any number of clients.

Stopping the streaming closes every client and the listening socket; the pipeline keeps
sending, and its packets to the closed UDP port are simply lost.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import TypeVar

import gi

from edgecam.config import Settings, StreamingConfig
from edgecam.errors import PipelineError
from edgecam.media.gst import (
    RTP_CAPS,
    UDP_BUFFER_BYTES,
    GLib,
    Gst,
    LoopThread,
    init,
    require_elements,
)
from edgecam.ratelimit import Every

gi.require_version("GstRtspServer", "1.0")
gi.require_version("GstRtsp", "1.0")
from gi.repository import GstRtsp, GstRtspServer

__all__ = ["MAX_CLIENTS", "MAX_CLIENTS_PER_ADDRESS", "MAX_REQUEST_BODY", "StreamingServer"]

log = logging.getLogger(__name__)

_ELEMENTS = ("udpsrc", "rtph264depay", "rtph264pay")
_ROLE = "viewer"
# A factory at "/" that no role may access: with authentication on, any unknown path then
# asks for credentials (401) like a real one, so camera names cannot be guessed from 404s;
# once authenticated, an unknown path is a 404.
_DECOY_ROLE = "nobody"
_DECOY_LAUNCH = "( videotestsrc num-buffers=1 ! rtpvrawpay name=pay0 )"
_CALL_TIMEOUT_S = 10.0
_SESSION_CLEANUP_S = 1
# RTSP connections held at once, well under the usual limit of 1024 open files: at that
# limit GstRtspServer cannot accept and tries again at once, taking a core, its main loop
# unable to answer. A connection that sends no whole request is closed after 60 s.
MAX_CLIENTS = 256
# Connections held at once from one address, so that one client cannot take them all.
MAX_CLIENTS_PER_ADDRESS = 32
# The body of one request, in bytes: a request this server answers carries a few parameter
# names at most, and GstRTSPConnection would otherwise hold whatever Content-Length says (a
# 512 MB body took 512 MB). A larger one is answered 413, or its connection closed.
MAX_REQUEST_BODY = 16 * 1024

_T = TypeVar("_T")


def _launch_line(rtp_host: str, rtp_port: int) -> str:
    # No queue and no jitter buffer: loopback does not reorder, and each would add latency.
    return (
        f"( udpsrc address={rtp_host} port={rtp_port} buffer-size={UDP_BUFFER_BYTES} "
        f'caps="{RTP_CAPS}" '
        "! rtph264depay ! rtph264pay name=pay0 pt=96 config-interval=-1 )"
    )


class _Mounts(GstRtspServer.RTSPMountPoints):
    """Mount points that send every path they do not serve to the decoy factory at "/"
    (so that, with authentication on, an unknown path asks for credentials too)."""

    def __init__(self, paths: frozenset[str]) -> None:
        super().__init__()
        self._paths = paths

    def do_make_path(self, url: GstRtsp.RTSPUrl) -> str:
        path = url.abspath or "/"
        return (
            path if path.split("/", 2)[1:2] and f"/{path.split('/', 2)[1]}" in self._paths else "/"
        )


def _offer_basic_too(auth: GstRtspServer.RTSPAuth) -> None:
    """Advertise Basic beside Digest. The methods are a bit mask in C, which PyGObject's
    enum refuses to combine; call the function itself."""
    import ctypes

    lib = ctypes.CDLL("libgstrtspserver-1.0.so.0")
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype = ctypes.c_void_p
    get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    pointer = get_pointer(auth.__gpointer__, None)
    both = int(GstRtsp.RTSPAuthMethod.BASIC) | int(GstRtsp.RTSPAuthMethod.DIGEST)
    lib.gst_rtsp_auth_set_supported_methods(ctypes.c_void_p(pointer), both)


class StreamingServer:
    """RTSP server for the cameras' RTP streams (``mounts``: camera -> RTP port), with an
    explicit life. A connection over ``max_clients``, or over ``max_clients_per_address``
    from one address, is closed as soon as it is accepted.

    ``start()`` runs a private GLib main loop in a thread and begins streaming;
    ``streaming_stop()`` / ``streaming_start()`` close and reopen the RTSP service without
    touching the loop; ``stop()`` ends everything and releases the port. Also a context
    manager. All methods are meant for one controlling thread.
    """

    def __init__(
        self,
        config: StreamingConfig,
        mounts: Mapping[str, int],
        *,
        rtp_host: str = "127.0.0.1",
        max_clients: int = MAX_CLIENTS,
        max_clients_per_address: int = MAX_CLIENTS_PER_ADDRESS,
    ) -> None:
        if not 1 <= max_clients_per_address <= max_clients:
            raise ValueError(
                "max_clients_per_address must be in 1..max_clients, got "
                f"{max_clients_per_address} (max_clients {max_clients})"
            )
        if not mounts:
            raise ValueError("mounts must name at least one camera")
        for camera, rtp_port in mounts.items():
            if not 1 <= rtp_port <= 65535:
                raise ValueError(f"rtp_port must be in 1..65535, got {rtp_port}")
            if not camera or "/" in camera:
                raise ValueError(f"camera must be a non-empty name without '/', got {camera!r}")
        self._config = config
        self._mounts = dict(mounts)
        self._camera = next(iter(self._mounts))
        self._rtp_host = rtp_host
        self._max_clients = max_clients
        self._max_per_address = max_clients_per_address
        self._refusals = Every(10.0)  # a refusal logged at most once in 10 s
        self._loop = LoopThread("rtsp", "the RTSP main loop", _CALL_TIMEOUT_S)
        self._server: GstRtspServer.RTSPServer | None = None
        self._source: GLib.Source | None = None
        self._cleanup: GLib.Source | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> StreamingServer:
        """The server of every camera of ``settings``."""
        mounts = {cam.name: settings.rtp_ports(i)[0] for i, cam in enumerate(settings.cameras)}
        return cls(settings.streaming, mounts)

    # -- public state -------------------------------------------------------------------

    @property
    def cameras(self) -> list[str]:
        return list(self._mounts)

    @property
    def path(self) -> str:
        """The RTSP mount path of the first camera, ``/<camera>``."""
        return f"/{self._camera}"

    @property
    def url(self) -> str:
        """The URL of the first camera for a client on this machine."""
        return self.url_of(self._camera)

    def url_of(self, camera: str) -> str:
        """The URL of ``camera`` for a client on this machine."""
        host = self._config.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        elif ":" in host:
            host = f"[{host}]"
        return f"rtsp://{host}:{self._config.port}/{camera}"

    @property
    def running(self) -> bool:
        """True between ``start()`` and ``stop()``."""
        return self._loop.running

    @property
    def streaming(self) -> bool:
        """True while the RTSP port is open and clients are served."""
        return self._source is not None

    @property
    def client_count(self) -> int:
        """RTSP clients connected right now."""
        if self._server is None:
            return 0
        server = self._server
        return self._call(lambda: len(server.client_filter(None)))

    @property
    def session_count(self) -> int:
        """RTSP sessions alive right now (a session may outlive its client's connection)."""
        if self._server is None:
            return 0
        pool = self._server.get_session_pool()
        return self._call(pool.get_n_sessions)

    # -- life -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the main loop thread and begin streaming; raise if the port is taken."""
        if self._loop.running:
            raise RuntimeError("StreamingServer already started")
        init()
        require_elements(_ELEMENTS)
        self._loop.start()
        try:
            self.streaming_start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop streaming, end the main loop and join its thread. Safe to call twice."""
        if not self._loop.running:
            return
        try:
            self.streaming_stop()
        finally:
            self._loop.stop()

    def streaming_start(self) -> None:
        """Open the RTSP port and serve the stream; a no-op while streaming."""
        if not self._loop.running:
            raise RuntimeError("StreamingServer.start() first")
        if self._source is None:
            self._call(self._open)
            for camera, port in self._mounts.items():
                log.info(
                    "streaming %s (RTP from udp://%s:%d)", self.url_of(camera), self._rtp_host, port
                )

    def streaming_stop(self) -> None:
        """Close every client and the RTSP port; the pipeline is not touched. Idempotent."""
        if not self._loop.running or self._source is None:
            return
        self._call(self._close)
        log.info("streaming stopped on port %d", self._config.port)

    def __enter__(self) -> StreamingServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- main loop thread -----------------------------------------------------------------

    def _call(self, func: Callable[[], _T]) -> _T:
        return self._loop.call(func)

    def _open(self) -> None:
        server = GstRtspServer.RTSPServer()
        server.set_mount_points(_Mounts(frozenset(f"/{c}" for c in self._mounts)))
        server.set_address(self._config.host)
        server.set_service(str(self._config.port))
        # Clients are served by this loop's thread; each media gets its own thread anyway.
        server.get_thread_pool().set_max_threads(0)
        server.connect("client-connected", self._on_client)

        auth = self._config.user is not None and self._config.password is not None
        if auth:
            assert self._config.user is not None and self._config.password is not None
            server.set_auth(
                self._make_auth(
                    self._config.user,
                    self._config.password.get_secret_value(),
                    basic=self._config.basic_auth,
                )
            )
            decoy = GstRtspServer.RTSPMediaFactory()
            decoy.set_launch(_DECOY_LAUNCH)
            decoy.add_role_from_structure(
                Gst.Structure.new_from_string(
                    f"{_DECOY_ROLE}, media.factory.access=(boolean)false, "
                    "media.factory.construct=(boolean)false"
                )
            )
            server.get_mount_points().add_factory("/", decoy)
        for camera, port in self._mounts.items():
            factory = GstRtspServer.RTSPMediaFactory()
            factory.set_launch(_launch_line(self._rtp_host, port))
            factory.set_shared(True)
            factory.set_suspend_mode(GstRtspServer.RTSPSuspendMode.NONE)
            if auth:
                factory.add_role_from_structure(
                    Gst.Structure.new_from_string(
                        f"{_ROLE}, media.factory.access=(boolean)true, "
                        "media.factory.construct=(boolean)true"
                    )
                )
            server.get_mount_points().add_factory(f"/{camera}", factory)

        try:
            source = server.create_source(None)
        except GLib.Error as exc:
            message = exc.message or str(exc)
            hint = ""
            if "in use" in message.lower():
                hint = (
                    " (another edgecam streaming worker or RTSP server?); stop it or choose "
                    "another port with streaming.port / EDGECAM_STREAMING__PORT"
                )
            raise PipelineError(
                f"cannot listen for RTSP on {self._config.host}:{self._config.port}: "
                f"{message}{hint}"
            ) from exc
        source.attach(self._loop.context)
        # GstRtspServer never expires sessions by itself: a client that vanished without
        # TEARDOWN would stay forever.
        pool = server.get_session_pool()
        cleanup = GLib.timeout_source_new_seconds(_SESSION_CLEANUP_S)
        cleanup.set_callback(lambda *_: pool.cleanup() >= 0)
        cleanup.attach(self._loop.context)
        self._server, self._source, self._cleanup = server, source, cleanup

    def _on_client(
        self, server: GstRtspServer.RTSPServer, client: GstRtspServer.RTSPClient
    ) -> None:
        connection = client.get_connection()
        address = connection.get_ip()
        held = [c for c in server.client_filter(None) if c is not client]
        # A client on its way out may have no connection left.
        ips = [conn.get_ip() for c in held if (conn := c.get_connection()) is not None]
        mine = ips.count(address)
        why = ""
        if len(held) >= self._max_clients:
            why = f"{len(held)} RTSP connections held, the most there may be"
        elif mine >= self._max_per_address:
            why = f"{address} holds {mine} RTSP connections, the most one address may"
        if why:
            if self._refusals.due():
                log.warning("%s; new connections are closed at once", why)
            # The client reads the end of its stream and closes itself, as if it had left.
            connection.get_read_socket().shutdown(True, True)
            return
        # On the connection: the client's own setter reaches only a connection set after it.
        connection.set_content_length_limit(MAX_REQUEST_BODY)
        client.connect("new-session", self._on_session)

    def _on_session(self, _client: object, session: GstRtspServer.RTSPSession) -> None:
        session.set_timeout(self._config.session_timeout_s)

    @staticmethod
    def _make_auth(user: str, password: str, *, basic: bool) -> GstRtspServer.RTSPAuth:
        auth = GstRtspServer.RTSPAuth()
        token = GstRtspServer.RTSPToken()
        token.set_string(GstRtspServer.RTSP_TOKEN_MEDIA_FACTORY_ROLE, _ROLE)
        auth.add_digest(user, password, token)
        auth.set_supported_methods(GstRtsp.RTSPAuthMethod.DIGEST)
        if basic:
            auth.add_basic(GstRtspServer.RTSPAuth.make_basic(user, password), token)
            _offer_basic_too(auth)
        auth.set_realm("edgecam")
        return auth

    def _close(self) -> None:
        server, source, cleanup = self._server, self._source, self._cleanup
        self._server = self._source = self._cleanup = None
        if server is None or source is None or cleanup is None:
            return
        cleanup.destroy()
        source.destroy()  # closes the listening socket: no new clients
        server.client_filter(lambda _s, _c, *_: GstRtspServer.RTSPFilterResult.REMOVE)
        # Sessions outlive their TCP connection (RTSP allows reconnecting); drop them so the
        # shared media is unprepared now and its udpsrc releases the RTP port.
        server.get_session_pool().filter(lambda _p, _s, *_: GstRtspServer.RTSPFilterResult.REMOVE)
        mounts = server.get_mount_points()
        for camera in self._mounts:
            mounts.remove_factory(f"/{camera}")
        mounts.remove_factory("/")
