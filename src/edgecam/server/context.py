"""What every request handler of the fleet server shares, and who is asking.

Credentials: ``Authorization: Bearer TOKEN`` (scripts) or the session cookie of a login
(the dashboard). A request with a session cookie that changes something must also carry the
session's CSRF token (``X-CSRF-Token`` header or a ``csrf`` form field).
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from sqlalchemy import Connection, Engine

from edgecam.config import MqttConfig, ServerConfig
from edgecam.server import auth
from edgecam.server.auth import LoginLimiter, Principal
from edgecam.server.commands import CommandPublisher
from edgecam.server.ingest import Counters

__all__ = [
    "CSRF_HEADER",
    "SESSION_COOKIE",
    "Conn",
    "LoginRequired",
    "ServerContext",
    "User",
    "ctx_of",
    "disk_full",
    "page_user",
    "require_user",
]

SESSION_COOKIE = "edgecam_session"
CSRF_HEADER = "X-CSRF-Token"
_SAFE = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass
class ServerContext:
    cfg: ServerConfig
    mqtt: MqttConfig
    engine: Engine
    counters: Counters
    limiter: LoginLimiter
    publisher: CommandPublisher | None = None


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (an ``OSError``, or the database's error) says the disk is full."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    orig = getattr(exc, "orig", exc)
    # PostgreSQL: SQLSTATE 53100 (disk_full), whatever the server's language; SQLite:
    # "database or disk is full".
    if getattr(orig, "sqlstate", None) == "53100" or getattr(orig, "pgcode", None) == "53100":
        return True
    text = str(orig).lower()
    return "disk is full" in text or "no space left" in text


def ctx_of(request: Request) -> ServerContext:
    ctx: ServerContext = request.app.state.ctx
    return ctx


class LoginRequired(Exception):
    """A dashboard page was asked for without a login: answered with a redirect."""


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(401, detail, headers={"WWW-Authenticate": "Bearer"})


async def _csrf_ok(request: Request, principal: Principal) -> bool:
    sent = request.headers.get(CSRF_HEADER)
    if sent is None and request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        form = await request.form()
        value = form.get("csrf")
        sent = value if isinstance(value, str) else None
    return auth.same_secret(sent, principal.csrf)


async def identify(request: Request) -> Principal | None:
    """Who is asking, from the bearer token or the session cookie; None: nobody."""
    ctx = ctx_of(request)
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise _unauthorized("use Authorization: Bearer TOKEN")
        principal = auth.check_token(ctx.engine, value.strip())
        if principal is None:
            raise _unauthorized("unknown or revoked token")
        return principal
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        principal = auth.check_session(ctx.engine, cookie)
        if principal is None:
            return None
        if request.method not in _SAFE and not await _csrf_ok(request, principal):
            raise HTTPException(403, "missing or wrong CSRF token")
        return principal
    return None


async def any_principal(request: Request) -> Principal:
    """Anyone with credentials, device upload tokens included."""
    principal = await identify(request)
    if principal is None:
        raise _unauthorized("log in or send Authorization: Bearer TOKEN")
    return principal


async def require_user(principal: Annotated[Principal, Depends(any_principal)]) -> Principal:
    """A user (by session or a user token); device upload tokens are refused."""
    if principal.device is not None:
        raise HTTPException(403, "this token may only upload clips of its device")
    return principal


async def page_user(request: Request) -> Principal:
    """Like :func:`require_user` for dashboard pages: no login sends to the login page."""
    try:
        principal = await identify(request)
    except HTTPException as exc:
        if exc.status_code == 401:
            raise LoginRequired from exc
        raise
    if principal is None or principal.device is not None:
        raise LoginRequired
    return principal


def connection(request: Request) -> Iterator[Connection]:
    with ctx_of(request).engine.connect() as conn:
        yield conn


User = Annotated[Principal, Depends(require_user)]
Conn = Annotated[Connection, Depends(connection)]
