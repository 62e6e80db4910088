"""The file-server worker: saved clips over HTTP, for the fleet dashboard and browsers.

Routes: ``GET /health`` (open), ``GET /clips`` (JSON list, newest first, with each clip's
sidecar), ``GET|HEAD /clips/<name>`` (the MP4, with HTTP Range so that a video element can
seek). Access needs the bearer token from ``fileserver.token``, or, for one clip, a signed
link that expires (:func:`sign_link`; the fleet server makes them with the same secret).

Clip names from the request are never used as paths: a name must match the clip-name
pattern, and the file must be a regular file (not a symlink) directly in the clips folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import IO
from urllib.parse import urlencode

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from edgecam.config import Settings
from edgecam.errors import ConfigError
from edgecam.media.clips import CLIP_NAME_RE, ClipStore

__all__ = ["create_app", "run_worker", "sign_link", "verify_link"]

log = logging.getLogger(__name__)

_CHUNK = 256 * 1024
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


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


def verify_link(secret: str, clip_name: str, expires: str, sig: str, now: float) -> str | None:
    """None when the link is valid, else why it is not."""
    try:
        expires_at = int(expires)
    except ValueError:
        return "malformed link"
    expected = _signature(secret, clip_name, expires_at)
    if not hmac.compare_digest(expected.encode(), sig.encode()):
        return "invalid link signature"
    if now > expires_at:
        return "link expired"
    return None


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """The inclusive byte range asked for, None for the whole file (no or ignored header).

    Raises _Unsatisfiable for a malformed bytes range or one outside the file.
    """
    header = header.strip()
    if not header.lower().startswith("bytes="):
        return None  # another unit: ignored, as RFC 9110 asks
    if "," in header:
        return None  # several ranges: the whole file is a valid answer
    m = _RANGE_RE.match(header.replace(" ", ""))
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


def _read(f: IO[bytes], start: int, length: int) -> Iterator[bytes]:
    try:
        f.seek(start)
        while length > 0:
            chunk = f.read(min(_CHUNK, length))
            if not chunk:
                break
            length -= len(chunk)
            yield chunk
    finally:
        f.close()


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
    secret = cfg.link_secret.get_secret_value() if cfg.link_secret is not None else token
    if camera is not None:
        settings.camera(camera)  # validates the name
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
                "meta": c.meta,
            }
            for c in store.clips()
            if camera is None or c.name.startswith(f"{camera}_")
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
            why = verify_link(secret, name, expires, sig, clock())
            if why is not None:
                return JSONResponse({"error": why}, status_code=403)
        if not CLIP_NAME_RE.fullmatch(name):
            return JSONResponse({"error": "invalid clip name"}, status_code=400)
        path = store.path_of(name)
        if path is None or (camera is not None and not name.startswith(f"{camera}_")):
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
    try:
        f = path.open("rb")
    except OSError:
        return JSONResponse({"error": "no such clip"}, status_code=404)
    size = path.stat().st_size
    headers = {
        "Accept-Ranges": "bytes",
        "Content-Type": "video/mp4",
        "Cache-Control": "private, max-age=0",
    }
    try:
        span = _parse_range(request.headers.get("range", ""), size)
    except _Unsatisfiable:
        f.close()
        return Response(status_code=416, headers={"Content-Range": f"bytes */{size}"})
    status, start, length = 200, 0, size
    if span is not None:
        status, start, length = 206, span[0], span[1] - span[0] + 1
        headers["Content-Range"] = f"bytes {span[0]}-{span[1]}/{size}"
    headers["Content-Length"] = str(length)
    if request.method == "HEAD":
        f.close()
        return Response(status_code=status, headers=headers)
    return StreamingResponse(_read(f, start, length), status_code=status, headers=headers)


class _WorkerServer(uvicorn.Server):
    """uvicorn re-raises the signal that stopped it (exit -15); a worker asked to stop that
    stopped cleanly exits 0, so :func:`run_worker` handles the signals instead."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def run_worker(settings: Settings, camera: str | None = None) -> int:
    """``edgecam worker fileserver``: serve clips until SIGTERM/SIGINT."""

    app = create_app(settings, camera)
    cfg = settings.fileserver
    log.info(
        "file server on http://%s:%d serving %s", cfg.host, cfg.port, settings.recorder.clips_dir
    )
    server = _WorkerServer(
        uvicorn.Config(app, host=cfg.host, port=cfg.port, log_config=None, access_log=False)
    )

    def _stop(signum: int, _frame: FrameType | None) -> None:
        log.info("file server: signal %d, stopping", signum)
        server.should_exit = True

    previous = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0 if server.started else 1
