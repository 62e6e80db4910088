"""The file-server worker: saved clips over HTTP, for the fleet dashboard and browsers.

Routes: ``GET /health`` (open), ``GET /clips`` (JSON list, newest first, with each clip's
sidecar), ``GET|HEAD /clips/<name>`` (the MP4, with HTTP Range so that a video element can
seek). Access needs the bearer token from ``fileserver.token``, or, for one clip, a signed
link that expires (:func:`signed_url`; the fleet server makes them with the same secret,
valid for at most ``fileserver.link_ttl_s``).

Clip names from the request are never used as paths: a name must match the clip-name
pattern, and the file must be a regular file (not a symlink) directly in the clips folder.
A server for one camera serves only that camera's clips; the listing never shows the
device's file-system paths.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import hmac
import logging
import os
import re
import socket
import stat
import time
from collections.abc import AsyncIterator, Callable, Hashable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from edgecam.config import FileServerConfig, Settings
from edgecam.errors import ConfigError
from edgecam.hostnames import HostGate
from edgecam.httpconn import (
    HEADER_TIMEOUT_S,
    IDLE_TIMEOUT_S,
    MAX_CONNECTIONS,
    MAX_CONNECTIONS_PER_CLIENT,
    WRITE_STALL_S,
    guarded_protocol,
    guarded_websocket,
)
from edgecam.media.clips import CLIP_NAME_RE, ClipStore, camera_clip_re
from edgecam.ratelimit import Failures, client_key

__all__ = [
    "QuietServer",
    "TokenGate",
    "TokenGuard",
    "create_app",
    "server_config",
    "sign_link",
    "signed_url",
    "verify_link",
]

log = logging.getLogger(__name__)

_CHUNK = 256 * 1024
_RANGE_RE = re.compile(r"bytes=([0-9]*)-([0-9]*)", re.IGNORECASE)
# A byte position of more digits than this is past the end of any file: it is not parsed
# (Python refuses to parse very long numbers, and need not).
_MAX_DIGITS = 18
_PAST_ANY_FILE = 10**_MAX_DIGITS
# Clocks of the fleet server and the device may differ by this much.
_LINK_SKEW_S = 30
# What a 304 repeats of the 200 it stands for (RFC 9110 15.4.5).
_NOT_MODIFIED_HEADERS = ("ETag", "Last-Modified", "Cache-Control")
# Sidecar keys that describe the device's file system, not the clip.
_PRIVATE_META = frozenset({"path", "segments"})


class _Unsatisfiable(Exception):
    pass


class TokenGuard:
    """The device's token, checked with a brake on guessing it (a short one is allowed):
    an address that gave ``max_failures`` wrong tokens within ``window_s`` is refused, the
    right token included, until the window has passed. The check and the count happen in
    one step, so requests sent at once cannot all be tried before the lock. An IPv6 address
    is counted whole (a household shares one /64) and its /64 too, at ``NETWORK_FACTOR``
    times as many (a host can take a new address in its /64 at will).
    """

    NETWORK_FACTOR = 4

    def __init__(self, token: str, max_failures: int, window_s: float) -> None:
        self._token = token.encode()
        self._max = max_failures
        self.window_s = window_s
        self._failures = Failures(window_s)

    @classmethod
    def from_config(cls, cfg: FileServerConfig, user: str = "the file server") -> TokenGuard:
        """The guard of ``cfg``'s token; ConfigError, naming ``user``, when there is none."""
        token = cfg.token.get_secret_value() if cfg.token is not None else ""
        if not token:
            raise ConfigError(
                f"{user} needs a token: set fileserver.token in the config file or "
                "EDGECAM_FILESERVER__TOKEN in the environment"
            )
        return cls(token, cfg.max_auth_failures, cfg.auth_lockout_s)

    def _limits(self, address: str) -> dict[Hashable, int]:
        host, network = client_key(address, 128), client_key(address, 64)
        if network == host:  # IPv4, or not an address
            return {host: self._max}
        return {host: self._max, network: self._max * self.NETWORK_FACTOR}

    def locked(self, address: str) -> bool:
        return any(self._failures.count(k) >= n for k, n in self._limits(address).items())

    def check(self, presented: str, address: str) -> bool:
        """Whether ``presented`` is the token; False without looking from a locked address."""
        if hmac.compare_digest(presented.encode(), self._token):
            return not self.locked(address)
        limits = self._limits(address)
        if not self._failures.add_within(limits):
            return False
        if self.locked(address):
            log.warning("%s gave too many wrong tokens: refused for now", address)
        return False


class TokenGate:
    """ASGI middleware: requests (WebSockets too) from an address its guard has locked are
    answered 429 before any handler runs."""

    def __init__(self, app: Any, guard: TokenGuard) -> None:
        self.app = app
        self._guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = scope.get("client")
        if scope["type"] in ("http", "websocket") and self._guard.locked(
            client[0] if client else ""
        ):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            refused = JSONResponse(
                {"error": "too many wrong tokens from this address; try again later"},
                status_code=429,
                headers={"Retry-After": str(round(self._guard.window_s))},
            )
            await refused(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _known_names(settings: Settings) -> list[str]:
    """The names this server is reached under besides IP addresses and local names (see
    :class:`~edgecam.hostnames.HostGate`): ``fileserver.allowed_hosts``, this machine's
    name and the hosts of the links the device gives out (alerts' and `edgecam live-url`'s).
    """
    names = [*settings.fileserver.allowed_hosts, socket.gethostname()]
    for base in (settings.fileserver.base_url(), settings.live.public_url):
        if base:
            names.append(urlsplit(base).hostname or "")
    return names


def _signature(secret: str, clip_name: str, expires_at: int) -> str:
    msg = f"{clip_name}\n{expires_at}".encode()
    return hmac.new(secret.encode(), msg, hashlib.sha256).hexdigest()


def sign_link(secret: str, clip_name: str, expires_at: int) -> str:
    """Query string (``expires=...&sig=...``) that grants a download of one clip until
    ``expires_at`` (Unix seconds). Append it to ``/clips/<clip_name>?``."""
    if not secret:
        raise ValueError("secret must not be empty")
    expires_at = int(expires_at)
    return urlencode({"expires": expires_at, "sig": _signature(secret, clip_name, expires_at)})


def _link_secret(cfg: FileServerConfig) -> str:
    secret = cfg.link_secret if cfg.link_secret is not None else cfg.token
    return secret.get_secret_value() if secret is not None else ""


def signed_url(settings: Settings, clip_name: str, now: float | None = None) -> str:
    """``/clips/<clip_name>?expires=...&sig=...``, valid for ``fileserver.link_ttl_s`` from
    ``now`` (default: the current time). What the fleet server hands to a user."""
    cfg = settings.fileserver
    now = time.time() if now is None else now
    query = sign_link(_link_secret(cfg), clip_name, int(now) + cfg.link_ttl_s)
    return f"/clips/{quote(clip_name)}?{query}"


def verify_link(
    secret: str, clip_name: str, expires: str, sig: str, now: float, *, ttl_s: float
) -> str | None:
    """None when the link is valid, else why it is not.

    A link that expires later than ``ttl_s`` (plus some clock skew) from ``now`` was not made
    by :func:`signed_url` with this configuration and is refused.
    """
    try:
        expires_at = int(expires)
    except ValueError:
        return "malformed link"
    expected = _signature(secret, clip_name, expires_at)
    if not hmac.compare_digest(expected.encode(), sig.encode()):
        return "invalid link signature"
    if now > expires_at:
        return "link expired"
    if expires_at > now + ttl_s + _LINK_SKEW_S:
        # Refused all the same: a device whose clock is behind (not yet set by NTP, or set
        # back) cannot tell a fresh link from one made long ago with a longer lifetime.
        return (
            f"link lifetime longer than fileserver.link_ttl_s by {expires_at - now - ttl_s} s "
            "by this device's clock: if links made just now are refused, this device's clock "
            "is behind (check NTP)"
        )
    return None


def _public_meta(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if k not in _PRIVATE_META}


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """The inclusive byte range asked for, None for the whole file (no or ignored header).

    Raises _Unsatisfiable for a malformed bytes range or one outside the file.
    """
    header = header.strip()
    if not header.lower().startswith("bytes="):
        return None  # another unit: ignored, as RFC 9110 asks
    if "," in header:
        return None  # several ranges: the whole file is a valid answer
    m = _RANGE_RE.fullmatch(header.replace(" ", ""))
    if m is None:
        raise _Unsatisfiable
    first, last = m.group(1), m.group(2)
    if first == "" and last == "":
        raise _Unsatisfiable
    if first == "":
        suffix = _position(last)
        if suffix == 0 or size == 0:
            raise _Unsatisfiable
        return max(0, size - suffix), size - 1  # a suffix longer than the file: all of it
    start = _position(first)
    end = size - 1 if last == "" else _position(last)
    if start >= size or end < start:
        raise _Unsatisfiable
    return start, min(end, size - 1)  # a last position past the end: up to the end


def _position(digits: str) -> int:
    digits = digits.lstrip("0") or "0"
    return _PAST_ANY_FILE if len(digits) > _MAX_DIGITS else int(digits)


async def _chunks(fd: int, start: int, length: int) -> AsyncIterator[bytes]:
    offset, end = start, start + length
    while offset < end:
        chunk = await run_in_threadpool(os.pread, fd, min(_CHUNK, end - offset), offset)
        if not chunk:
            break
        offset += len(chunk)
        yield chunk


class _FileStream(StreamingResponse):
    """Streams part of an open file and closes it when done, failed or cut off."""

    def __init__(self, fd: int, start: int, length: int, status: int, headers: dict[str, str]):
        self._fd = fd
        super().__init__(_chunks(fd, start, length), status_code=status, headers=headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            os.close(self._fd)


def create_app(
    settings: Settings,
    camera: str | None = None,
    *,
    clock: Callable[[], float] = time.time,
) -> Starlette:
    """The file server's ASGI app. Raises ConfigError when no token is configured."""
    cfg = settings.fileserver
    guard = TokenGuard.from_config(cfg)
    secret = _link_secret(cfg)
    if camera is not None:
        settings.camera(camera)  # validates the name
    ours = camera_clip_re(camera)
    rec = settings.recorder
    store = ClipStore(
        rec.clips_dir,
        max_bytes=rec.max_clips_bytes,
        max_age_s=rec.max_clip_age_days * 86400,
        min_free_bytes=rec.min_free_bytes,
    )

    def bearer_ok(request: Request) -> bool | None:
        """True/False for a right/wrong bearer token, None when none was sent."""
        auth = request.headers.get("authorization")
        if auth is None:
            return None
        scheme, _, value = auth.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return guard.check(value.strip(), request.client.host if request.client else "")

    def unauthorized(detail: str) -> Response:
        return JSONResponse(
            {"error": detail},
            status_code=401,
            headers={"WWW-Authenticate": 'Bearer realm="edgecam"'},
        )

    async def health(_request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def list_clips(request: Request) -> Response:
        ok = bearer_ok(request)
        if not ok:
            return unauthorized("missing bearer token" if ok is None else "wrong token")
        clips = [
            {
                "name": c.name,
                "size": c.size,
                "mtime": c.mtime,
                "url": f"/clips/{c.name}",
                "meta": _public_meta(c.meta),
            }
            for c in store.clips()
            if ours.fullmatch(c.name)
        ]
        return JSONResponse({"clips": clips})

    async def get_clip(request: Request) -> Response:
        name: str = request.path_params["name"]
        ok = bearer_ok(request)
        if ok is False:
            return unauthorized("wrong token")
        if ok is None:
            expires, sig = request.query_params.get("expires"), request.query_params.get("sig")
            if expires is None or sig is None:
                return unauthorized("missing bearer token or signed link")
            why = verify_link(secret, name, expires, sig, clock(), ttl_s=cfg.link_ttl_s)
            if why is not None:
                return JSONResponse({"error": why}, status_code=403)
        if not CLIP_NAME_RE.fullmatch(name):
            return JSONResponse({"error": "invalid clip name"}, status_code=400)
        path = store.path_of(name)
        if path is None or not ours.fullmatch(name):
            return JSONResponse({"error": "no such clip"}, status_code=404)
        return _file_response(request, path)

    app = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/clips", list_clips, methods=["GET"]),
            Route("/clips/{name:path}", get_clip, methods=["GET", "HEAD"]),
        ],
        middleware=[
            Middleware(HostGate, names=_known_names(settings), setting="fileserver.allowed_hosts"),
            Middleware(TokenGate, guard=guard),
        ],
    )
    app.state.token_guard = guard  # for the live view's routes, added to this app
    return app


def _file_response(request: Request, path: Path) -> Response:
    # Retention may delete the clip at any moment: once open, the file stays readable, so
    # everything below works on the descriptor, never on the path again.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return JSONResponse({"error": "no such clip"}, status_code=404)
    response: Response | None = None
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            response = _clip_response(request, fd, st)
    finally:
        if not isinstance(response, _FileStream):
            os.close(fd)
    if response is None:
        return JSONResponse({"error": "no such clip"}, status_code=404)
    return response


def _etag(st: os.stat_result) -> str:
    """A strong validator: a saved clip is never rewritten, only replaced or deleted."""
    return f'"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"'


def _not_modified(request: Request, etag: str, mtime: int) -> bool:
    """RFC 9110 13.2.2: If-None-Match first; If-Modified-Since only without it."""
    none_match = request.headers.get("if-none-match")
    if none_match is not None:
        tags = [t.strip().removeprefix("W/") for t in none_match.split(",")]
        return "*" in tags or etag in tags
    since = _http_date(request.headers.get("if-modified-since"))
    return since is not None and mtime <= since


def _range_applies(request: Request, etag: str, mtime: int) -> bool:
    """If-Range: the Range holds only while the clip is the one the client has part of."""
    if_range = request.headers.get("if-range")
    if if_range is None:
        return True
    if_range = if_range.strip()
    if if_range.startswith('"'):
        return if_range == etag  # strong comparison
    date = _http_date(if_range)
    return date is not None and date == mtime


def _http_date(value: str | None) -> int | None:
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if parsed.tzinfo is None:
        return None
    return int(parsed.timestamp())


def _clip_response(request: Request, fd: int, st: os.stat_result) -> Response:
    """The answer for an open clip: a _FileStream (which then owns ``fd``) or headers only."""
    size, mtime, etag = st.st_size, int(st.st_mtime), _etag(st)
    headers = {
        "Accept-Ranges": "bytes",
        "Content-Type": "video/mp4",
        "Cache-Control": "private, max-age=0",
        "ETag": etag,
        "Last-Modified": email.utils.formatdate(mtime, usegmt=True),
    }
    if _not_modified(request, etag, mtime):
        return Response(status_code=304, headers={k: headers[k] for k in _NOT_MODIFIED_HEADERS})
    try:
        wanted = request.headers.get("range", "") if _range_applies(request, etag, mtime) else ""
        span = _parse_range(wanted, size)
    except _Unsatisfiable:
        return Response(status_code=416, headers={"Content-Range": f"bytes */{size}"})
    status, start, length = 200, 0, size
    if span is not None:
        status, start, length = 206, span[0], span[1] - span[0] + 1
        headers["Content-Range"] = f"bytes {span[0]}-{span[1]}/{size}"
    headers["Content-Length"] = str(length)
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers)
    return _FileStream(fd, start, length, status, headers)


def server_config(
    app: Starlette,
    cfg: FileServerConfig,
    *,
    header_timeout_s: float = HEADER_TIMEOUT_S,
    idle_timeout_s: float = IDLE_TIMEOUT_S,
    max_connections: int = MAX_CONNECTIONS,
    max_connections_per_client: int = MAX_CONNECTIONS_PER_CLIENT,
    write_stall_s: float = WRITE_STALL_S,
) -> uvicorn.Config:
    """The uvicorn configuration of the file server, with its connection limits
    (:mod:`edgecam.httpconn`)."""
    protocol = guarded_protocol(
        header_timeout_s=header_timeout_s,
        max_connections=max_connections,
        max_connections_per_client=max_connections_per_client,
    )
    return uvicorn.Config(
        app,
        host=cfg.host,
        port=cfg.port,
        http=protocol,
        ws=guarded_websocket(write_stall_s=write_stall_s),
        timeout_keep_alive=max(1, round(idle_timeout_s)),
        log_config=None,
        access_log=False,
    )


class QuietServer(uvicorn.Server):
    """uvicorn without its own signal handling: the worker runner owns the signals (and
    uvicorn would re-raise the one that stopped it, so a clean stop would not exit 0)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
