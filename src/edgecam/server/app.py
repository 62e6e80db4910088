"""``edgecam server``: the FastAPI app, and the one place where ingest, the command
publisher, retention and the HTTP server start and stop."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import multiprocessing as mp
import os
import re
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from edgecam.config import ServerConfig, Settings, redact_url
from edgecam.errors import EdgecamError
from edgecam.hostnames import HostGate
from edgecam.server import api, auth, dashboard, db
from edgecam.server.auth import LoginLimiter, Principal
from edgecam.server.commands import CommandPublisher
from edgecam.server.context import LoginRequired, ServerContext, User, disk_full, page_user
from edgecam.server.ingest import Counters, Ingest, run_ingest_process
from edgecam.server.queries import downsample, prune_history

__all__ = [
    "BackgroundServer",
    "Server",
    "create_app",
    "create_token_cli",
    "create_user_cli",
    "delete_user_cli",
    "run_server",
]

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
_LOGIN_KEY_BYTES = 32
CSP = (
    "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "media-src 'self' http: https:; frame-ancestors 'none'; form-action 'self'"
)


def create_app(ctx: ServerContext) -> FastAPI:
    """The HTTP app over ``ctx``; starting and stopping its parts is the caller's job."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield

    app = FastAPI(
        title="edgecam fleet server",
        version="1",
        description="Devices, stats, alerts, clips and commands of an edgecam fleet. "
        "Authenticate with `Authorization: Bearer TOKEN` (edgecam server create-token).",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.ctx = ctx
    app.add_middleware(
        HostGate,
        names=[*ctx.cfg.allowed_hosts, socket.gethostname()],
        setting="server.allowed_hosts",
    )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own answer echoes the input, which a body with NaN in it made
        # unanswerable (a 500): say where and what, not the value.
        errors = [{k: v for k, v in e.items() if k != "input"} for e in exc.errors()]
        return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)

    @app.exception_handler(OperationalError)
    async def _database_failed(request: Request, exc: OperationalError) -> JSONResponse:
        # A full disk or a lost database: say which, keep the details in the log.
        full = disk_full(exc)
        log.error(
            "%s %s: the database failed: %s",
            request.method,
            request.url.path,
            exc.orig,
            exc_info=None if full else exc,
        )
        if full:
            return JSONResponse(
                {"detail": "the server's disk is full: nothing was stored"}, status_code=507
            )
        return JSONResponse(
            {"detail": "the database is unavailable; try again"},
            status_code=503,
            headers={"Retry-After": "10"},
        )

    app.include_router(api.router)
    app.include_router(dashboard.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # The API's description, like everything else, is for logged-in users only.
    @app.get("/openapi.json", include_in_schema=False)
    def _openapi(_user: User) -> JSONResponse:
        return JSONResponse(app.openapi())

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer"}
            }
            schema["security"] = [{"bearer": []}]
            schema["paths"]["/health"]["get"]["security"] = []
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/docs", include_in_schema=False)
    def _docs(_user: Annotated[Principal, Depends(page_user)]) -> HTMLResponse:
        page = get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="edgecam fleet server API",
            swagger_js_url="/static/vendor/swagger-ui-bundle-5.35.0.js",
            swagger_css_url="/static/vendor/swagger-ui-5.35.0.css",
            swagger_favicon_url="data:,",
        )
        page.headers["Content-Security-Policy"] = _csp_with_inline_scripts(bytes(page.body))
        return page

    @app.exception_handler(LoginRequired)
    async def _to_login(request: Request, _exc: LoginRequired) -> Response:
        target = request.url.path
        if request.headers.get("hx-request"):
            return Response(status_code=401, headers={"HX-Redirect": "/login"})
        return RedirectResponse(f"/login?next={target}", status_code=303)

    @app.middleware("http")
    async def _headers(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        response.headers.setdefault("Content-Security-Policy", CSP)
        return response

    return app


def _csp_with_inline_scripts(page: bytes) -> str:
    """:data:`CSP`, letting the inline scripts of ``page`` (one of ours: Swagger UI starts
    from one) run, and no other."""
    hashes = [
        base64.b64encode(hashlib.sha256(script).digest()).decode()
        for script in re.findall(rb"<script>(.*?)</script>", page, re.DOTALL)
    ]
    return f"{CSP}; script-src 'self' " + " ".join(f"'sha256-{h}'" for h in hashes)


class Server:
    """The fleet server's parts, started and stopped in one visible order."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cfg = settings.server
        self.engine: Engine = db.make_engine(self.cfg.database_url)
        self.counters = Counters()
        self.ctx = ServerContext(
            cfg=self.cfg,
            mqtt=settings.mqtt,
            engine=self.engine,
            counters=self.counters,
            limiter=LoginLimiter(
                self.cfg.login_max_failures,
                self.cfg.login_lockout_s,
                _login_key(self.cfg.clips_dir),
            ),
        )
        self._ingest: Ingest | None = None
        self._procs: list[Any] = []
        self._stop_procs: Any = None
        self._stop = threading.Event()
        self._retention: threading.Thread | None = None

    def start(self) -> None:
        db.migrate(self.engine)
        self.cfg.clips_dir.mkdir(parents=True, exist_ok=True)
        if self.settings.mqtt.host is None:
            log.warning("mqtt.host is not set: no ingest and no commands (set EDGECAM_MQTT__HOST)")
        else:
            publisher = CommandPublisher(self.settings.mqtt)
            publisher.start()
            self.ctx.publisher = publisher
            if self.cfg.ingest:
                self._start_ingest()
        self._retention = threading.Thread(
            target=self._retention_loop, name="retention", daemon=True
        )
        self._retention.start()

    def _start_ingest(self) -> None:
        if self.cfg.ingest_processes == 1:
            self._ingest = Ingest(self.settings.mqtt, self.cfg, self.counters)
            self._ingest.start()
            return
        ctx = mp.get_context("spawn")
        self._stop_procs = ctx.Event()
        for _ in range(self.cfg.ingest_processes):
            ready = ctx.Event()
            proc = ctx.Process(
                target=run_ingest_process,
                args=(self.settings.mqtt, self.cfg, self.counters, self._stop_procs, ready),
                name="edgecam-ingest",
            )
            proc.start()
            self._procs.append((proc, ready))
        for proc, ready in self._procs:
            if not ready.wait(60):
                log.error("ingest process %s did not subscribe within 60 s", proc.pid)

    def _retention_loop(self) -> None:
        while not self._stop.wait(self.cfg.retention_interval_s):
            try:
                days = (self.cfg.stats_retention_days, self.cfg.history_retention_days)
                downsample(self.engine, *days)
                prune_history(self.engine, *days)
                prune_clips(
                    self.cfg.clips_dir, self.cfg.clips_max_age_days, self.cfg.clips_max_bytes
                )
            except Exception:
                log.exception("retention run failed; trying again later")

    def stop(self) -> None:
        self._stop.set()
        if self._ingest is not None:
            self._ingest.stop()
        if self._stop_procs is not None:
            self._stop_procs.set()
            for proc, _ready in self._procs:
                proc.join(timeout=30)
                if proc.is_alive():
                    proc.terminate()
        if self.ctx.publisher is not None:
            self.ctx.publisher.stop()
        if self._retention is not None:
            self._retention.join(timeout=10)
        self.engine.dispose()


def _login_key(folder: Path) -> bytes | None:
    """The server's own key for the known-browser cookies of its logins, kept in
    ``folder/.login-key`` (0600) so that a restart does not forget the browsers; no device
    holds it. The file appears whole or not at all (written aside, then linked into place:
    two servers starting at once read the same key), and one found damaged (a start that
    died half-way) is replaced. None (a key of the process's own) when the folder cannot
    keep it."""
    path = folder / ".login-key"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            with contextlib.suppress(FileNotFoundError):
                key = path.read_bytes()
                if len(key) == _LOGIN_KEY_BYTES:
                    return key
                log.warning("%s is damaged: a new key replaces it", path)
                path.unlink()
            aside = folder / f".login-key.{os.getpid()}.{secrets.token_hex(4)}"
            fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(secrets.token_bytes(_LOGIN_KEY_BYTES))
                    f.flush()
                    os.fsync(f.fileno())
                with contextlib.suppress(FileExistsError):  # another server was first
                    os.link(aside, path)
            finally:
                aside.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("no login key kept in %s (%s): browsers forgotten at restart", folder, exc)
    return None


def prune_clips(folder: Path, max_age_days: float, max_bytes: int) -> int:
    """Delete uploaded clips older than ``max_age_days``, then the oldest past ``max_bytes``."""
    if not folder.is_dir():
        return 0
    files = sorted(
        (p.stat().st_mtime, p.stat().st_size, p) for p in folder.glob("*/*.mp4") if p.is_file()
    )
    cutoff = time.time() - max_age_days * 86400
    total = sum(size for _, size, _ in files)
    removed = 0
    for mtime, size, path in files:
        if mtime >= cutoff and total <= max_bytes:
            break
        path.unlink(missing_ok=True)
        total -= size
        removed += 1
    return removed


class BackgroundServer:
    """The whole fleet server in threads of this process, for the demo and the tests:
    ``start()`` returns once HTTP answers on ``url``; ``stop()`` undoes it in order."""

    def __init__(self, settings: Settings) -> None:
        self.server = Server(settings)
        self.ctx = self.server.ctx
        self.app = create_app(self.ctx)
        self.url = f"http://{settings.server.host}:{settings.server.port}"
        self._settings = settings
        self._http: Any = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        import uvicorn

        self.server.start()
        cfg = self._settings.server
        self._http = uvicorn.Server(
            uvicorn.Config(
                self.app,
                host=cfg.host,
                port=cfg.port,
                log_level="warning",
                **_http_options(cfg),
            )
        )
        self._thread = threading.Thread(target=self._http.run, name="http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._http.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise EdgecamError(f"the fleet server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=20)
        self.server.stop()


def _http_server(config: Any) -> Any:
    import uvicorn

    class _Http(uvicorn.Server):
        # uvicorn re-raises SIGTERM/SIGINT after its shutdown, which would end the process
        # before ingest is flushed and stopped; here a signal only ends the HTTP loop.
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            signals = (signal.SIGINT, signal.SIGTERM)
            old = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
            try:
                yield
            finally:
                for sig, handler in old.items():
                    signal.signal(sig, handler)

    return _Http(config)


def _http_options(cfg: ServerConfig) -> dict[str, Any]:
    """uvicorn's options: the connection limits of :mod:`edgecam.httpconn`, and for
    ``server.trusted_proxies`` their forwarded headers believed, nobody else's, and no
    per-address cap (a proxy's connections are many clients')."""
    from edgecam.httpconn import guarded_protocol

    protocol = guarded_protocol(many_clients=cfg.trusted_proxies)
    if not cfg.trusted_proxies:
        return {"http": protocol, "proxy_headers": False}
    return {
        "http": protocol,
        "proxy_headers": True,
        "forwarded_allow_ips": ",".join(cfg.trusted_proxies),
    }


def run_server(settings: Settings) -> int:
    """Run ``edgecam server`` until interrupted (SIGINT or SIGTERM), then stop in order."""
    import uvicorn

    server = Server(settings)
    log.info(
        "fleet server: database %s, broker %s",
        redact_url(settings.server.database_url),
        settings.mqtt.host or "(none)",
    )
    server.start()
    try:
        config = uvicorn.Config(
            create_app(server.ctx),
            host=settings.server.host,
            port=settings.server.port,
            log_level="warning",
            **_http_options(settings.server),
        )
        http = _http_server(config)
        print(f"edgecam server: http://{settings.server.host}:{settings.server.port}/", flush=True)
        http.run()
    finally:
        server.stop()
    return 0


def _engine(settings: Settings) -> Engine:
    engine = db.make_engine(settings.server.database_url)
    db.migrate(engine)
    return engine


def create_user_cli(settings: Settings, name: str) -> int:
    """``edgecam server create-user NAME``: the password is read from stdin."""
    if sys.stdin.isatty():
        import getpass

        password = getpass.getpass(f"password for {name}: ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    engine = _engine(settings)
    try:
        auth.create_user(engine, name, password)
    finally:
        engine.dispose()
    print(f"user {name} saved", file=sys.stderr)
    return 0


def create_token_cli(settings: Settings, name: str, device: str | None = None) -> int:
    """``edgecam server create-token NAME``: prints a new API token of user NAME."""
    engine = _engine(settings)
    try:
        token_id, token = auth.create_token(engine, name, "cli", device)
    finally:
        engine.dispose()
    print(token)
    print(
        f"token {token_id} of {name}" + (f" (uploads of {device})" if device else ""),
        file=sys.stderr,
    )
    return 0


def delete_user_cli(settings: Settings, name: str) -> int:
    """``edgecam server delete-user NAME``: the user, its sessions and tokens, at once."""
    engine = _engine(settings)
    try:
        auth.delete_user(engine, name)
    finally:
        engine.dispose()
    print(f"user {name} deleted, with its sessions and tokens", file=sys.stderr)
    return 0


def revoke_token_cli(settings: Settings, token_id: int) -> int:
    engine = _engine(settings)
    try:
        if not auth.revoke_token(engine, token_id):
            raise EdgecamError(f"no active token {token_id}")
    finally:
        engine.dispose()
    print(f"token {token_id} revoked", file=sys.stderr)
    return 0


def server_cli(settings: Settings, action: str, name: str | None, device: str | None) -> int:
    """Dispatch ``edgecam server [ACTION [NAME]]``."""
    if action == "run":
        return run_server(settings)
    if name is None:
        raise EdgecamError(f"edgecam server {action} needs a NAME")
    if action == "create-user":
        return create_user_cli(settings, name)
    if action == "create-token":
        return create_token_cli(settings, name, device)
    if action == "delete-user":
        return delete_user_cli(settings, name)
    if not name.isdigit():
        raise EdgecamError("edgecam server revoke-token needs the token's number")
    return revoke_token_cli(settings, int(name))
