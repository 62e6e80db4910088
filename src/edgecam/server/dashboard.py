"""The web dashboard: server-rendered pages and htmx fragments, behind the login."""

from __future__ import annotations

import json
import logging
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy.exc import OperationalError

from edgecam.protocol import DEVICE_NAME
from edgecam.server import api, auth
from edgecam.server.auth import Principal
from edgecam.server.context import SESSION_COOKIE, Conn, ctx_of, disk_full, page_user

__all__ = ["router"]

log = logging.getLogger(__name__)
TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
LOGIN_CSRF_COOKIE = "edgecam_login_csrf"
KNOWN_COOKIE = "edgecam_known"
RANGES = [("1 h", 3600), ("6 h", 6 * 3600), ("24 h", 86400), ("7 d", 7 * 86400)]
DEFAULT_WORKERS = ["inference", "streaming", "recorder", "fileserver"]

router = APIRouter(include_in_schema=False)
PageUser = Annotated[Principal, Depends(page_user)]


def _ago(ts: float | None) -> str:
    if ts is None:
        return "never"
    s = max(0.0, time.time() - ts)
    if s < 60:
        return f"{s:.0f} s ago"
    if s < 3600:
        return f"{s / 60:.0f} min ago"
    if s < 86400:
        return f"{s / 3600:.1f} h ago"
    return f"{s / 86400:.1f} d ago"


def _dt(ts: float | None) -> str:
    if ts is None:
        return "-"
    try:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, ValueError, OSError):  # a time no date can show: never a 500
        return "-"


def _json(value: Any) -> str:
    # Jinja's tojson writes < > & ' as \u escapes (safe inside <script>): in a page's text
    # they showed as such. Here the text is escaped like any other.
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


TEMPLATES.env.filters["ago"] = _ago
TEMPLATES.env.filters["dt"] = _dt
TEMPLATES.env.filters["json"] = _json


def _render(
    request: Request, name: str, user: Principal | None, status: int = 200, **ctx: Any
) -> HTMLResponse:
    return TEMPLATES.TemplateResponse(
        request,
        name,
        {"user": user, "csrf": user.csrf if user else None, **ctx},
        status_code=status,
    )


def _secure(request: Request) -> bool:
    configured = ctx_of(request).cfg.secure_cookies
    return request.url.scheme == "https" if configured is None else configured


def _safe_next(target: str) -> str:
    # Only a path on this site: no scheme, no host, no protocol-relative //host.
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def _login_page(
    request: Request,
    error: str | None = None,
    status: int = 200,
    username: str = "",
    next_: str = "/",
) -> HTMLResponse:
    token = request.cookies.get(LOGIN_CSRF_COOKIE) or secrets.token_urlsafe(24)
    response = _render(
        request,
        "login.html",
        None,
        status,
        error=error,
        login_csrf=token,
        username=username,
        next=_safe_next(next_),
    )
    response.set_cookie(
        LOGIN_CSRF_COOKIE,
        token,
        httponly=True,
        samesite="strict",
        secure=_secure(request),
        path="/login",
    )
    return response


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str = "/") -> HTMLResponse:
    return _login_page(request, next_=next)


@router.post("/login", response_model=None)
def login(
    request: Request,
    username: Annotated[str, Form(max_length=64)],
    password: Annotated[str, Form(max_length=1024)],
    csrf: Annotated[str, Form(max_length=128)] = "",
    next: Annotated[str, Form(max_length=2000)] = "/",
) -> Response:
    ctx = ctx_of(request)
    if not auth.same_secret(csrf, request.cookies.get(LOGIN_CSRF_COOKIE)):
        return _login_page(request, "The form expired; please log in again.", 403, username, next)
    client = request.client.host if request.client else "unknown"
    known = _known_browser(request, username)
    if not ctx.limiter.attempt(username, client, known):
        return _login_page(request, "Too many failed logins; try again later.", 429, username, next)
    try:
        user = auth.check_login(ctx.engine, username, password)
    except BaseException as exc:
        ctx.limiter.cancel(username, client, known)  # not judged: not a failure
        if isinstance(exc, OperationalError):
            return _database_failed(request, exc, username, next)
        raise
    if user is None:  # counted as a failure already, by attempt()
        return _login_page(request, "Wrong user name or password.", 401, username, next)
    ctx.limiter.succeeded(username, client, known)
    try:
        session = auth.start_session(ctx.engine, user.user_id, ctx.cfg.session_hours)
    except OperationalError as exc:
        return _database_failed(request, exc, username, next)
    response = RedirectResponse(_safe_next(next), status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        session,
        max_age=int(ctx.cfg.session_hours * 3600),
        httponly=True,
        samesite="lax",
        secure=_secure(request),
    )
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
    # This browser is known to the name from now on: the name's own lock, against many
    # addresses guessing, does not hold it (see LoginLimiter).
    response.set_cookie(
        KNOWN_COOKIE,
        ctx.limiter.known_value(username, user.stamp),
        max_age=ctx.limiter.KNOWN_DAYS * 86400,
        path="/login",
        httponly=True,
        samesite="lax",
        secure=_secure(request),
    )
    return response


def _known_browser(request: Request, username: str) -> bool:
    """Whether this browser shows a known-browser cookie of ``username`` made under its
    password of now (see :class:`~edgecam.server.auth.LoginLimiter`)."""
    value = request.cookies.get(KNOWN_COOKIE)
    if not value:
        return False
    ctx = ctx_of(request)
    try:
        stamp = auth.password_stamp(ctx.engine, username)
    except OperationalError:
        return False  # the login itself meets the failure, and says so
    return ctx.limiter.is_known(value, username, stamp)


def _database_failed(
    request: Request, exc: OperationalError, username: str, next_: str
) -> HTMLResponse:
    log.error("login of %r: the database failed: %s", username, exc.orig)
    why, status = (
        ("its disk is full", 507) if disk_full(exc) else ("its database is unavailable", 503)
    )
    message = f"The server cannot log you in now ({why}); try again later."
    return _login_page(request, message, status, username, next_)


@router.post("/logout")
def logout(request: Request, _user: PageUser) -> RedirectResponse:
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        auth.end_session(ctx_of(request).engine, cookie)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE)
    return response


@router.get("/", response_class=HTMLResponse)
def fleet(request: Request, user: PageUser, conn: Conn) -> HTMLResponse:
    cfg = ctx_of(request).cfg
    return _render(
        request,
        "fleet.html",
        user,
        devices=api.list_devices(conn, cfg.device_offline_s),
        alerts=api.list_alerts(conn, None, None, 20),
    )


@router.get("/ui/devices", response_class=HTMLResponse)
def devices_fragment(request: Request, user: PageUser, conn: Conn) -> HTMLResponse:
    devices = api.list_devices(conn, ctx_of(request).cfg.device_offline_s)
    return _render(request, "_devices.html", user, devices=devices)


@router.get("/alerts", response_class=HTMLResponse)
def alerts_page(request: Request, user: PageUser, conn: Conn) -> HTMLResponse:
    return _render(request, "alerts.html", user, alerts=api.list_alerts(conn, None, None, 200))


@router.get("/ui/alerts", response_class=HTMLResponse)
def alerts_fragment(
    request: Request,
    user: PageUser,
    conn: Conn,
    device: Annotated[str | None, Query(pattern=DEVICE_NAME)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> HTMLResponse:
    return _render(request, "_alerts.html", user, alerts=api.list_alerts(conn, device, None, limit))


def _worker_names(device: api.DeviceOut) -> list[str]:
    names = sorted({w["name"] for w in device.workers if "name" in w})
    return names or DEFAULT_WORKERS


@router.get("/devices/{device}", response_class=HTMLResponse)
def device_page(
    request: Request, device: api.DeviceName, user: PageUser, conn: Conn
) -> HTMLResponse:
    d = api.get_device(conn, device, ctx_of(request).cfg.device_offline_s)
    return _render(
        request,
        "device.html",
        user,
        device=d,
        ranges=RANGES,
        worker_names=_worker_names(d),
        commands=api.list_commands(conn, device, 10),
        clips=api.list_clips(conn, device, 50),
        alerts=api.list_alerts(conn, device, None, 20),
    )


@router.get("/ui/devices/{device}/state", response_class=HTMLResponse)
def device_state(
    request: Request, device: api.DeviceName, user: PageUser, conn: Conn
) -> HTMLResponse:
    d = api.get_device(conn, device, ctx_of(request).cfg.device_offline_s)
    return _render(request, "_device_state.html", user, device=d)


@router.get("/ui/devices/{device}/commands", response_class=HTMLResponse)
def commands_fragment(
    request: Request, device: api.DeviceName, user: PageUser, conn: Conn
) -> HTMLResponse:
    return _render(request, "_commands.html", user, commands=api.list_commands(conn, device, 10))


@router.post("/ui/devices/{device}/commands", response_class=HTMLResponse)
def command_form(
    request: Request,
    device: api.DeviceName,
    user: PageUser,
    conn: Conn,
    name: Annotated[str, Form(max_length=32)],
    worker: Annotated[str | None, Form(max_length=64)] = None,
) -> HTMLResponse:
    args: dict[str, Any] = {}
    if name.startswith("worker_") and worker:
        args["worker"] = worker
    if name == "save_clip":
        args["reason"] = f"dashboard ({user.name})"
    error = None
    try:
        api.send_command(request, device, api.CommandIn(name=name, args=args), user, conn)
    except HTTPException as exc:
        error = f"Not sent: {exc.detail}"
    return _render(
        request, "_commands.html", user, commands=api.list_commands(conn, device, 10), error=error
    )


@router.get("/ui/devices/{device}/clips", response_class=HTMLResponse)
def clips_fragment(
    request: Request, device: api.DeviceName, user: PageUser, conn: Conn
) -> HTMLResponse:
    return _render(request, "_clips.html", user, clips=api.list_clips(conn, device, 50))
