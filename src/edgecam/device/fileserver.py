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
import hashlib
import hmac
import logging
import os
import re
import stat
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from edgecam.config import FileServerConfig, Settings
from edgecam.errors import ConfigError
from edgecam.media.clips import CLIP_NAME_RE, ClipStore, camera_clip_re

__all__ = ["QuietServer", "create_app", "sign_link", "signed_url", "verify_link"]

log = logging.getLogger(__name__)

_CHUNK = 256 * 1024
# 18 digits fit any file size (and an int64); longer numbers are refused, not parsed.
_RANGE_RE = re.compile(r"bytes=([0-9]{0,18})-([0-9]{0,18})", re.IGNORECASE)
# Clocks of the fleet server and the device may differ by this much.
_LINK_SKEW_S = 30
# Sidecar keys that describe the device's file system, not the clip.
_PRIVATE_META = frozenset({"path", "segments"})


class _Unsatisfiable(Exception):
    pass


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
        return "link lifetime longer than fileserver.link_ttl_s"
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
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise _Unsatisfiable
        return max(0, size - suffix), size - 1
    start = int(first)
    end = size - 1 if last == "" else int(last)
    if start >= size or end < start:
        raise _Unsatisfiable
    return start, min(end, size - 1)


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
    if cfg.token is None or not cfg.token.get_secret_value():
        raise ConfigError(
            "the file server needs a token: set fileserver.token in the config file or "
            "EDGECAM_FILESERVER__TOKEN in the environment"
        )
    token = cfg.token.get_secret_value()
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
        return hmac.compare_digest(value.strip().encode(), token.encode())

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

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/clips", list_clips, methods=["GET"]),
            Route("/clips/{name:path}", get_clip, methods=["GET", "HEAD"]),
        ]
    )


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
            response = _clip_response(request, fd, st.st_size)
    finally:
        if not isinstance(response, _FileStream):
            os.close(fd)
    if response is None:
        return JSONResponse({"error": "no such clip"}, status_code=404)
    return response


def _clip_response(request: Request, fd: int, size: int) -> Response:
    """The answer for an open clip: a _FileStream (which then owns ``fd``) or headers only."""
    headers = {
        "Accept-Ranges": "bytes",
        "Content-Type": "video/mp4",
        "Cache-Control": "private, max-age=0",
    }
    try:
        span = _parse_range(request.headers.get("range", ""), size)
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


class QuietServer(uvicorn.Server):
    """uvicorn without its own signal handling: the worker runner owns the signals (and
    uvicorn would re-raise the one that stopped it, so a clean stop would not exit 0)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
