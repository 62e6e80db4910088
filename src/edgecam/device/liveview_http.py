"""Live view routes for the device's HTTP server: pages, one WebSocket per viewer, save clip.

Routes (all behind the clips' auth):

- ``GET /live``: an index of the cameras;
- ``GET /live/CAMERA``: a page with one ``<video>`` element, the camera's counts beside it
  and a save-clip button;
- ``WS /live/CAMERA/ws?mode=webrtc|mse``: WebRTC signalling, or fMP4 media for MSE, plus
  the counts once a second, for one viewer;
- ``POST /live/CAMERA/clip``: calls the host's ``save_clip(camera)``;
- ``GET|POST /live/login``: a form that trades the device token for a login cookie.

Credentials: the bearer token (``fileserver.token``), the login cookie, or a signed link
from :func:`live_url` (the fleet dashboard makes the same with the same secret). Opening a
valid signed link leaves a cookie for that camera, so the page's WebSocket and button work
with no other credentials; the cookie lasts ``live.session_ttl_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import html
import inspect
import json
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from importlib import resources
from typing import Any
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection, Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from edgecam.config import Settings
from edgecam.device.fileserver import TokenGuard, sign_link, verify_link
from edgecam.errors import ConfigError, LiveViewError
from edgecam.media.liveview import LiveView, ViewerKind
from edgecam.ratelimit import client_key

__all__ = ["CountsSource", "SaveClip", "camera_cookie", "live_path", "live_routes", "live_url"]

log = logging.getLogger(__name__)

CountsSource = Callable[[str], Mapping[str, int] | None]
"""The current counts of a camera (label -> tracks), or None when unknown."""
SaveClip = Callable[[str], Awaitable[Mapping[str, Any]] | Mapping[str, Any]]
"""Save a clip of a camera now; returns what the page shows (e.g. the clip's name)."""

COOKIE = "edgecam_live"


def camera_cookie(camera: str) -> str:
    """The name of the cookie a camera's signed link leaves (camera names are cookie-safe)."""
    return f"{COOKIE}_{camera}"


_ALL_CAMERAS = "*"
_COUNTS_INTERVAL_S = 1.0
# Messages waiting for one viewer's socket before its frames are dropped to the next
# keyframe (about 2 s of video): a slow viewer never slows the others.
_SEND_QUEUE = 60
# A fetch() with this header cannot come from another site without a CORS preflight,
# which this server never grants: together with SameSite=Lax, no cross-site POST.
_CSRF_HEADER = "x-edgecam-live"
_WS_POLICY_VIOLATION = 1008
_WS_TRY_AGAIN_LATER = 1013
_LINK_NAME = "live/{camera}"  # what a live link signs; clip names cannot hold '/'
# No page of another origin may frame these (its Save clip button could be clicked for the
# viewer): frame-ancestors, and X-Frame-Options for browsers without it.
_PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; "
    "connect-src 'self'; media-src 'self' blob:; img-src 'self' data:; "
    "frame-ancestors 'none'"
)


def _secret(settings: Settings) -> str:
    """The key of signed links and cookies: the clips' link secret (the token by default)."""
    cfg = settings.fileserver
    secret = cfg.link_secret if cfg.link_secret is not None else cfg.token
    value = secret.get_secret_value() if secret is not None else ""
    if not value:
        raise ConfigError(
            "the live view needs fileserver.token (or fileserver.link_secret) to sign links"
        )
    return value


def live_path(settings: Settings, camera: str, now: float | None = None) -> str:
    """``/live/CAMERA?expires=...&sig=...``, valid for ``live.link_ttl_s`` from ``now``."""
    settings.camera(camera)  # validates the name
    now = time.time() if now is None else now
    query = sign_link(
        _secret(settings), _LINK_NAME.format(camera=camera), int(now) + settings.live.link_ttl_s
    )
    return f"/live/{quote(camera)}?{query}"


def live_url(settings: Settings, camera: str | None = None, now: float | None = None) -> str:
    """The full signed URL of a camera's live page (the first camera when None)."""
    _index, cam = settings.camera(camera)
    base = settings.live.public_url
    if base is None:
        host = settings.fileserver.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        elif ":" in host:
            host = f"[{host}]"
        base = f"http://{host}:{settings.fileserver.port}"
    return base + live_path(settings, cam.name, now)


class _Auth:
    """Who may watch what: bearer token, login cookie or signed link."""

    def __init__(self, settings: Settings, clock: Callable[[], float], guard: TokenGuard) -> None:
        self._guard = guard
        self._secret = _secret(settings)
        self._link_ttl_s = settings.live.link_ttl_s
        self.session_ttl_s = settings.live.session_ttl_s
        self._clock = clock

    def _cookie_sig(self, scope: str, expires: int) -> str:
        msg = f"live-session\n{scope}\n{expires}".encode()
        return hmac.new(self._secret.encode(), msg, hashlib.sha256).hexdigest()

    def cookie_value(self, scope: str) -> str:
        expires = int(self._clock()) + self.session_ttl_s
        return f"{scope}.{expires}.{self._cookie_sig(scope, expires)}"

    def token_ok(self, conn: HTTPConnection, token: str) -> bool:
        """Whether ``token`` is the device's; a wrong one counts towards the address's
        lockout (the token is the one secret here that can be guessed)."""
        return self._guard.check(token, conn.client.host if conn.client else "")

    def allows(self, conn: HTTPConnection, camera: str | None) -> bool:
        """Whether ``conn`` may see ``camera`` (None: the index, which needs full access)."""
        auth = conn.headers.get("authorization")
        if auth is not None:
            scheme, _, value = auth.partition(" ")
            return scheme.lower() == "bearer" and self.token_ok(conn, value.strip())
        if self._cookie_ok(conn.cookies.get(COOKIE, ""), camera):
            return True
        if camera is None:
            return False
        own = conn.cookies.get(camera_cookie(camera), "")
        return self._cookie_ok(own, camera) or self.link_ok(conn, camera)

    def link_ok(self, conn: HTTPConnection, camera: str) -> bool:
        expires, sig = conn.query_params.get("expires"), conn.query_params.get("sig")
        if expires is None or sig is None:
            return False
        why = verify_link(
            self._secret,
            _LINK_NAME.format(camera=camera),
            expires,
            sig,
            self._clock(),
            ttl_s=self._link_ttl_s,
        )
        return why is None

    def _cookie_ok(self, value: str, camera: str | None) -> bool:
        scope, _, rest = value.partition(".")
        expires, _, sig = rest.partition(".")
        # ASCII digits, not too many: str.isdigit takes "²", and int() refuses 5000 digits.
        if not scope or not re.fullmatch(r"[0-9]{1,12}", expires) or not sig:
            return False
        if not hmac.compare_digest(self._cookie_sig(scope, int(expires)).encode(), sig.encode()):
            return False
        if self._clock() > int(expires):
            return False
        return scope in (_ALL_CAMERAS, camera)


def _same_origin(conn: HTTPConnection) -> bool:
    """No ``Origin`` (not a browser's cross-site request), or the page's own."""
    origin = conn.headers.get("origin")
    return origin is None or origin.split("://", 1)[-1] == conn.headers.get("host")


class _SocketLink:
    """A :class:`~edgecam.media.liveview.ViewerLink` onto one WebSocket: GStreamer threads
    queue messages, the event loop sends them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[bytes | str | None] = asyncio.Queue()
        self._lock = threading.Lock()  # _pending: GStreamer threads add, the event loop takes
        self._pending = 0
        self.reason: str | None = None

    def _take(self, delta: int) -> None:
        with self._lock:
            self._pending += delta

    def send(self, message: bytes | str) -> bool:
        with self._lock:
            if self._pending >= _SEND_QUEUE:
                return False
            self._pending += 1
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, message)
        except RuntimeError:  # the event loop is closed: the server is going away
            return False
        return True

    def closed(self, reason: str) -> None:
        self.reason = reason
        with contextlib.suppress(RuntimeError):  # the event loop is closed
            self._loop.call_soon_threadsafe(self._queue.put_nowait, None)

    def put_text(self, message: str) -> None:
        """Queue a message from the event loop itself (not counted against the limit)."""
        self._take(1)
        self._queue.put_nowait(message)

    async def pump(self, ws: WebSocket) -> None:
        """Send queued messages until the view closes this viewer."""
        while True:
            message = await self._queue.get()
            if message is None:
                return
            try:
                if isinstance(message, bytes):
                    await ws.send_bytes(message)
                else:
                    await ws.send_text(message)
            finally:
                self._take(-1)


def _page(title: str, body: str, script: bool = False) -> HTMLResponse:
    tag = '<script src="/live/live.js" defer></script>' if script else ""
    document = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>{tag}
<style>
body {{ font-family: system-ui, sans-serif; margin: 1rem; background: #111; color: #eee; }}
a {{ color: #8cf; }}
main {{ display: flex; flex-wrap: wrap; gap: 1rem; align-items: flex-start; }}
video {{ max-width: 100%; width: 960px; background: #000; }}
aside {{ min-width: 12rem; }}
dl {{ display: grid; grid-template-columns: auto auto; gap: 0.2rem 1rem; }}
dd {{ margin: 0; text-align: right; font-variant-numeric: tabular-nums; }}
</style></head>
<body>{body}</body></html>"""
    headers = {
        "Content-Security-Policy": _PAGE_CSP,
        "X-Frame-Options": "DENY",
        "Cache-Control": "no-store",
    }
    return HTMLResponse(document, headers=headers)


def live_routes(
    settings: Settings,
    views: Mapping[str, LiveView],
    counts_source: CountsSource | None = None,
    save_clip: SaveClip | None = None,
    *,
    clock: Callable[[], float] = time.time,
    guard: TokenGuard | None = None,
) -> list[BaseRoute]:
    """The live view's routes, to add to the device's Starlette app.

    ``views`` maps camera names to their :class:`LiveView` (started or not: a stopped view
    answers "live view off" and pages retry until it is started). ``counts_source(camera)``
    gives the counts shown beside the video; ``save_clip(camera)`` (sync or async) is what
    the save-clip button calls. ``guard``: the file server's (``app.state.token_guard``),
    so that wrong tokens count once an address whichever route they came by; by default
    one of the routes' own. No routes when ``live.enabled`` is false. Raises ConfigError
    when no token is configured.
    """
    if not settings.live.enabled:
        return []
    # Without a token (and so without a guard), a ConfigError here.
    auth = _Auth(
        settings, clock, guard or TokenGuard.from_config(settings.fileserver, "the live view")
    )
    for name in views:
        settings.camera(name)  # validates the names
    ice_servers = [{"urls": settings.live.stun_server}] if settings.live.stun_server else []
    script = resources.files("edgecam.device").joinpath("live.js").read_bytes()

    # Viewers now by (camera, client address); only the event loop touches it.
    per_client: Counter[tuple[str, str]] = Counter()

    def refused() -> Response:
        return RedirectResponse("/live/login", status_code=303)

    async def index(request: Request) -> Response:
        if not auth.allows(request, None):
            return refused()
        items = "".join(
            f'<li><a href="/live/{quote(name)}">{html.escape(name)}</a>'
            f"{'' if view.running else ' (off)'}</li>"
            for name, view in views.items()
        )
        return _page("edgecam live", f"<h1>Cameras</h1><ul>{items}</ul>")

    async def login_form(_request: Request) -> Response:
        return _page(
            "edgecam login",
            '<h1>Log in</h1><form method="post" action="/live/login">'
            '<label>Device token <input type="password" name="token" autofocus></label> '
            '<button type="submit">Log in</button></form>',
        )

    async def login(request: Request) -> Response:
        if not _same_origin(request):
            # Another site's page posting guesses from a viewer's browser would count them
            # against the viewer's address (and could lock the household out).
            return JSONResponse({"error": "a login from another site"}, status_code=403)
        form = await request.form()
        token = form.get("token")
        if not isinstance(token, str) or not auth.token_ok(request, token):
            return JSONResponse({"error": "wrong token"}, status_code=401)
        response = RedirectResponse("/live", status_code=303)
        _set_cookie(request, response, auth.cookie_value(_ALL_CAMERAS))
        return response

    def _set_cookie(
        request: Request, response: Response, value: str, camera: str | None = None
    ) -> None:
        # A camera's own cookie has its own name and path: one camera's link opened after
        # another's must not replace the first one's (its tab could not reconnect).
        response.set_cookie(
            COOKIE if camera is None else camera_cookie(camera),
            value,
            max_age=auth.session_ttl_s,
            path="/live" if camera is None else f"/live/{quote(camera)}",
            secure=request.url.scheme == "https",
            httponly=True,
            samesite="lax",
        )

    async def page(request: Request) -> Response:
        camera: str = request.path_params["camera"]
        by_link = auth.link_ok(request, camera)
        if not by_link and not auth.allows(request, camera):
            return JSONResponse({"error": "missing or expired credentials"}, status_code=401)
        if camera not in views:
            return JSONResponse({"error": "no such camera"}, status_code=404)
        config = {
            "camera": camera,
            "ws": f"/live/{quote(camera)}/ws",
            "clip": f"/live/{quote(camera)}/clip",
            "webrtc": settings.live.webrtc,
            "iceServers": ice_servers,
            # Three keep-alives in each viewer timeout: one lost or late costs nothing.
            "pingMs": int(settings.live.viewer_timeout_s * 1000 / 3),
        }
        # JSON in a script element: '<' escaped so that no value can close the element.
        data = json.dumps(config).replace("<", "\\u003c")
        name = html.escape(camera)
        response = _page(
            f"{camera} - edgecam live",
            f'<h1>{name}</h1><main><video id="video" autoplay muted playsinline></video>'
            f'<aside><p id="status">starting</p><dl id="counts"></dl>'
            f'<button id="save-clip" type="button">Save clip</button>'
            f'<p id="clip-result"></p><p><a href="/live">all cameras</a></p></aside></main>'
            f'<script id="live-config" type="application/json">{data}</script>',
            script=True,
        )
        if by_link:
            _set_cookie(request, response, auth.cookie_value(camera), camera)
        return response

    async def live_js(_request: Request) -> Response:
        return Response(
            script,
            media_type="text/javascript",
            headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
        )

    async def clip(request: Request) -> Response:
        camera: str = request.path_params["camera"]
        if not auth.allows(request, camera):
            return JSONResponse({"error": "missing or expired credentials"}, status_code=401)
        if request.headers.get(_CSRF_HEADER) != "1" and "authorization" not in request.headers:
            return JSONResponse({"error": f"missing {_CSRF_HEADER} header"}, status_code=403)
        if camera not in views:
            return JSONResponse({"error": "no such camera"}, status_code=404)
        if save_clip is None:
            return JSONResponse({"error": "saving clips is not available"}, status_code=501)
        try:
            if inspect.iscoroutinefunction(save_clip):
                result = await save_clip(camera)
            else:  # off the event loop: a slow recorder must not stop every viewer's video
                result = await asyncio.to_thread(save_clip, camera)
                if isinstance(result, Awaitable):
                    result = await result
        except Exception:
            log.exception("save clip for %s from the live page failed", camera)
            # The details (a socket path, say) are the device's: in its log, not the page.
            return JSONResponse({"error": "saving the clip failed"}, status_code=502)
        return JSONResponse(dict(result))

    async def socket(ws: WebSocket) -> None:
        camera: str = ws.path_params["camera"]
        view = views.get(camera)
        if view is None or not _same_origin(ws) or not auth.allows(ws, camera):
            await ws.close(code=_WS_POLICY_VIOLATION)
            return
        mode = ws.query_params.get("mode", "webrtc")
        if mode not in ("webrtc", "mse"):
            await ws.close(code=_WS_POLICY_VIOLATION)
            return
        await ws.accept()
        client = (camera, client_key(ws.client.host if ws.client is not None else "", 128))
        if per_client[client] >= settings.live.max_viewers_per_client:
            refusal = (
                f"{per_client[client]} viewers of this camera from your address already, as "
                "many as live.max_viewers_per_client allows"
            )
            await ws.send_text(json.dumps({"type": "error", "error": refusal}))
            await ws.close(code=_WS_TRY_AGAIN_LATER)
            return
        per_client[client] += 1
        try:
            await _serve_viewer(ws, view, mode, counts_source)  # type: ignore[arg-type]
        finally:
            per_client[client] -= 1
            if not per_client[client]:
                del per_client[client]

    return [
        Route("/live", index, methods=["GET"]),
        Route("/live/login", login_form, methods=["GET"]),
        Route("/live/login", login, methods=["POST"]),
        Route("/live/live.js", live_js, methods=["GET"]),
        Route("/live/{camera}", page, methods=["GET"]),
        Route("/live/{camera}/clip", clip, methods=["POST"]),
        WebSocketRoute("/live/{camera}/ws", socket),
    ]


async def _serve_viewer(
    ws: WebSocket, view: LiveView, mode: ViewerKind, counts_source: CountsSource | None
) -> None:
    link = _SocketLink(asyncio.get_running_loop())
    try:
        viewer = await run_in_threadpool(view.add_viewer, mode, link)
    except LiveViewError as exc:
        await ws.send_text(json.dumps({"type": "error", "error": str(exc)}))
        await ws.close(code=_WS_TRY_AGAIN_LATER)
        return

    async def receive() -> None:
        while True:
            received = await ws.receive()
            if received["type"] == "websocket.disconnect":
                raise WebSocketDisconnect(received.get("code", 1000))
            text = received.get("text")
            if text is None:
                continue  # a binary frame: the page sends none
            try:
                message = json.loads(text)
            except ValueError:
                continue
            if isinstance(message, dict):
                await run_in_threadpool(viewer.receive, message)

    async def counts() -> None:
        while True:
            current = counts_source(view.camera) if counts_source is not None else None
            link.put_text(
                json.dumps({"type": "counts", "counts": current or {}, "viewers": view.counts()})
            )
            await asyncio.sleep(_COUNTS_INTERVAL_S)

    tasks = [asyncio.create_task(t) for t in (link.pump(ws), receive(), counts())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            error = task.exception()
            if error is not None and not isinstance(error, WebSocketDisconnect):
                log.warning("live viewer %d of %s: %r", viewer.id, view.camera, error)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await run_in_threadpool(viewer.close)
        if link.reason is not None:
            # The browser closed it first.
            with contextlib.suppress(RuntimeError, WebSocketDisconnect):
                await ws.close(code=_WS_TRY_AGAIN_LATER, reason=link.reason[:120])
