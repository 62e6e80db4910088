"""The fleet server's JSON API (``/api``), ``/health`` and ``/metrics``."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, PlainTextResponse, RedirectResponse, Response
from pydantic import BaseModel, Field
from sqlalchemy import Connection, func, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from edgecam.errors import EdgecamError
from edgecam.hostnames import is_local_name, matches, read_host
from edgecam.protocol import CLIP_NAME, DEVICE_NAME, Command
from edgecam.server import auth, db
from edgecam.server.commands import check_command
from edgecam.server.context import Conn, User, any_principal, ctx_of, disk_full
from edgecam.server.queries import stats_buckets, stats_raw_json

__all__ = ["refuse_device_link", "router"]

log = logging.getLogger(__name__)
router = APIRouter()

MAX_RANGE_S = 400 * 86400
DEFAULT_RANGE_S = 3600.0
UPLOAD_CHUNK = 1024 * 1024

DeviceName = Annotated[str, PathParam(pattern=DEVICE_NAME, description="Device name.")]
ClipName = Annotated[str, PathParam(pattern=CLIP_NAME, description="Clip file name.")]
Time = Annotated[
    float | None, Query(ge=0, le=1e11, allow_inf_nan=False, description="Unix seconds.")
]


class Health(BaseModel):
    status: str


class DeviceOut(BaseModel):
    name: str
    online: bool = Field(description="From the retained status and the last will.")
    stale: bool = Field(description="Nothing heard for server.device_offline_s.")
    last_seen: float | None = Field(description="Newest message of the device (Unix s).")
    state_ts: float | None = Field(description="When the current status was sent.")
    version: str | None
    profile: str | None
    started: float | None
    cameras: list[str]
    workers: list[dict[str, Any]]
    rules: dict[str, Any]
    outbox: int | None
    outbox_dropped: int | None = Field(description="Messages the device's outbox dropped.")
    uploads: int | None = Field(description="Clips the device has still to upload.")


class StatsPoint(BaseModel):
    id: str
    camera: str
    seq: int
    ts: float
    start: float
    end: float
    people: int
    peak: int
    mask: int
    no_mask: int
    undecided: int
    person: int
    fps_in: float
    fps_out: float
    frames_dropped: int


class StatsBucket(BaseModel):
    start: float
    end: float
    messages: int
    people: int
    peak: int
    mask: int
    no_mask: int
    undecided: int
    person: int


class AlertOut(BaseModel):
    id: str
    alert_id: str
    device: str
    camera: str | None
    rule: str
    state: str
    message: str
    value: float | None
    threshold: float | None
    started: float
    ended: float | None
    clip: str | None
    ts: float


class ClipOut(BaseModel):
    device: str
    name: str
    camera: str | None
    size: int | None
    duration: float | None
    sha256: str | None
    start: float | None
    end: float | None
    reason: str | None
    alert_id: str | None
    stored: bool = Field(description="Uploaded to this server (plays without the device).")
    play_url: str | None
    download_url: str | None


class CommandIn(BaseModel):
    name: str = Field(max_length=32, description="save_clip, streaming_start, ...")
    args: dict[str, Any] = Field(default_factory=dict, description="Command arguments.")


class CommandCreated(BaseModel):
    id: str


class ResultOut(BaseModel):
    ok: bool
    error: str | None
    data: dict[str, Any]
    ts: float


class CommandOut(BaseModel):
    id: str
    device: str
    name: str
    args: dict[str, Any]
    ts: float
    user: str | None
    sent: bool
    result: ResultOut | None


class TokenIn(BaseModel):
    label: str | None = Field(None, max_length=128)
    device: str | None = Field(
        None, pattern=DEVICE_NAME, description="Limit the token to this device's clip uploads."
    )


class TokenOut(BaseModel):
    id: int
    label: str | None
    device: str | None
    created: float
    revoked: float | None


class TokenCreated(TokenOut):
    token: str = Field(description="Shown once; only its hash is kept.")


@router.get("/health", tags=["meta"])
def health() -> Health:
    """Liveness; needs no login."""
    return Health(status="ok")


def _device_out(d: db.Device, offline_s: float, now: float) -> DeviceOut:
    return DeviceOut(
        name=d.name,
        online=bool(d.online),
        stale=d.last_seen is None or now - d.last_seen > offline_s,
        last_seen=d.last_seen,
        state_ts=d.state_ts,
        version=d.version,
        profile=d.profile,
        started=d.started,
        cameras=list(d.cameras or []),
        workers=list(d.workers or []),
        rules=dict(d.rules or {}),
        outbox=d.outbox,
        outbox_dropped=d.outbox_dropped,
        uploads=d.uploads,
    )


def list_devices(conn: Connection, offline_s: float) -> list[DeviceOut]:
    now = time.time()
    with Session(conn) as s:
        rows = s.scalars(select(db.Device).order_by(db.Device.name)).all()
        return [_device_out(d, offline_s, now) for d in rows]


def get_device(conn: Connection, name: str, offline_s: float) -> DeviceOut:
    with Session(conn) as s:
        d = s.get(db.Device, name)
        if d is None:
            raise HTTPException(404, f"no device named {name!r}")
        return _device_out(d, offline_s, time.time())


@router.get("/api/devices", tags=["devices"])
def devices(request: Request, _user: User, conn: Conn) -> list[DeviceOut]:
    """Every device the server has heard of, with its state."""
    return list_devices(conn, ctx_of(request).cfg.device_offline_s)


@router.get("/api/devices/{device}", tags=["devices"])
def device(request: Request, device: DeviceName, _user: User, conn: Conn) -> DeviceOut:
    return get_device(conn, device, ctx_of(request).cfg.device_offline_s)


def time_range(start: float | None, end: float | None) -> tuple[float, float]:
    end = time.time() if end is None else end
    start = end - DEFAULT_RANGE_S if start is None else start
    if end <= start:
        raise HTTPException(422, "end must be after start")
    if end - start > MAX_RANGE_S:
        raise HTTPException(422, f"a range may span at most {MAX_RANGE_S // 86400} days")
    return start, end


@router.get(
    "/api/devices/{device}/stats",
    tags=["devices"],
    response_model=list[StatsPoint] | list[StatsBucket],
)
def stats(
    device: DeviceName,
    _user: User,
    conn: Conn,
    start: Time = None,
    end: Time = None,
    bucket: Annotated[
        float | None,
        Query(ge=1, le=MAX_RANGE_S, allow_inf_nan=False, description="Bucket size (s)."),
    ] = None,
    camera: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    """Stats messages of ``device`` that started in [start, end) (default: the last hour),
    each with its ``seq``; with ``bucket``, sums over buckets of that many seconds."""
    t0, t1 = time_range(start, end)
    if bucket is None:
        body = stats_raw_json(conn, device, t0, t1, camera)
    else:
        if (t1 - t0) / bucket > 100_000:
            raise HTTPException(422, "too many buckets: choose a larger bucket")
        items = stats_buckets(conn, device, t0, t1, bucket, camera)
        body = json.dumps(items, separators=(",", ":"))
    return Response(body, media_type="application/json")


def list_alerts(
    conn: Connection, device: str | None, since: float | None, limit: int
) -> list[AlertOut]:
    stmt = select(db.Alert).order_by(db.Alert.ts.desc()).limit(limit)
    if device is not None:
        stmt = stmt.where(db.Alert.device == device)
    if since is not None:
        stmt = stmt.where(db.Alert.ts >= since)
    with Session(conn) as s:
        return [AlertOut.model_validate(a, from_attributes=True) for a in s.scalars(stmt)]


Limit = Annotated[int, Query(ge=1, le=1000)]
DeviceFilter = Annotated[str | None, Query(pattern=DEVICE_NAME)]


@router.get("/api/alerts", tags=["alerts"])
def alerts(
    _user: User,
    conn: Conn,
    device: DeviceFilter = None,
    since: Time = None,
    limit: Limit = 100,
) -> list[AlertOut]:
    """Alert messages, newest first (across the fleet, or of one device)."""
    return list_alerts(conn, device, since, limit)


def _clip_out(c: db.Clip) -> ClipOut:
    base = f"/api/clips/{c.device}/{c.name}"
    playable = c.stored or bool(c.url)
    return ClipOut(
        device=c.device,
        name=c.name,
        camera=c.camera,
        size=c.size,
        duration=c.duration,
        sha256=c.sha256,
        start=c.start,
        end=c.end,
        reason=c.reason,
        alert_id=c.alert_id,
        stored=c.stored,
        play_url=base if playable else None,
        download_url=f"{base}?download=true" if playable else None,
    )


def list_clips(conn: Connection, device: str | None, limit: int) -> list[ClipOut]:
    stmt = select(db.Clip).order_by(db.Clip.ts.desc()).limit(limit)
    if device is not None:
        stmt = stmt.where(db.Clip.device == device)
    with Session(conn) as s:
        return [_clip_out(c) for c in s.scalars(stmt)]


@router.get("/api/clips", tags=["clips"])
def clips(
    _user: User, conn: Conn, device: DeviceFilter = None, limit: Limit = 100
) -> list[ClipOut]:
    """Clips the devices saved, newest first."""
    return list_clips(conn, device, limit)


def clip_path(clips_dir: Path, device: str, name: str) -> Path:
    """Where an uploaded clip lives; never outside ``clips_dir``."""
    if not re.fullmatch(DEVICE_NAME, device) or not re.fullmatch(CLIP_NAME, name):
        raise HTTPException(422, "bad device or clip name")
    root = clips_dir.resolve()
    path = (root / device / name).resolve()
    if not path.is_relative_to(root):
        raise HTTPException(422, "bad clip name")
    return path


def _device_link(cfg_url: str, secret: str, name: str, ttl_s: int, device: str) -> str:
    expires = int(time.time()) + ttl_s
    sig = hmac.new(secret.encode(), f"{name}\n{expires}".encode(), hashlib.sha256).hexdigest()
    base = cfg_url.format(device=device).rstrip("/")
    return f"{base}/clips/{name}?" + urlencode({"expires": expires, "sig": sig})


@router.get("/api/clips/{device}/{name}", tags=["clips"], response_model=None)
def clip_file(
    request: Request,
    device: DeviceName,
    name: ClipName,
    _user: User,
    conn: Conn,
    download: bool = False,
) -> Response:
    """The clip itself (HTTP Range for seeking) when uploaded; else a redirect to a signed
    link on the device's file server."""
    ctx = ctx_of(request)
    with Session(conn) as s:
        clip = s.get(db.Clip, (device, name))
    if clip is None:
        raise HTTPException(404, "no such clip")
    if clip.stored:
        path = clip_path(ctx.cfg.clips_dir, device, name)
        if path.is_file():
            disposition = "attachment" if download else "inline"
            return FileResponse(
                path, media_type="video/mp4", filename=name, content_disposition_type=disposition
            )
    secret = ctx.cfg.link_secret
    if ctx.cfg.device_clips_url and secret is not None:
        link = _device_link(
            ctx.cfg.device_clips_url, secret.get_secret_value(), name, ctx.cfg.link_ttl_s, device
        )
        return RedirectResponse(link, status_code=307)
    if clip.url:
        why = refuse_device_link(clip.url, name, ctx.cfg.device_link_hosts)
        if why is None:
            return RedirectResponse(clip.url, status_code=307)
        log.warning(
            "device %s announced a link to clip %s that is not followed: %s", device, name, why
        )
        raise HTTPException(404, f"the device's link to this clip is not followed: {why}")
    raise HTTPException(404, "the clip is only on the device and no link to it is known")


def _host_allowed(host: str, patterns: list[str]) -> bool:
    """``host`` matches one of ``patterns`` (see :func:`edgecam.hostnames.matches`); with no
    patterns, it is a private address or a local name. A host a browser reads otherwise
    than it is written is refused (see :func:`edgecam.hostnames.read_host`)."""
    read = read_host(host)
    if read is None:
        return False
    if patterns:
        return matches(read, patterns)
    if isinstance(read, str):
        return is_local_name(read)
    return read.is_private and not read.is_unspecified


def refuse_device_link(url: str, name: str, hosts: list[str]) -> str | None:
    """Why the fleet server does not send a user to the link a device announced for its clip
    ``name``, or None. Devices announce ``{base}/clips/{name}?expires=...&sig=...`` (their
    file server's signed link): anything else would let a device send the operators
    anywhere, a login page of its own making included. The host must be one of
    ``server.device_link_hosts`` or, when that is empty, on a local network.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return "not a URL"
    if parts.scheme not in ("http", "https") or not host:
        return "not an http(s) URL"
    if parts.username is not None or parts.password is not None or parts.fragment:
        return "it carries a user name or a fragment"
    if not _host_allowed(host, hosts):
        return (
            f"host {host} is not in server.device_link_hosts"
            if hosts
            else f"host {host} is not on a local network (see server.device_link_hosts)"
        )
    if not unquote(parts.path).endswith(f"/clips/{name}"):
        return "it does not lead to this clip on the device's file server"
    query = parse_qs(parts.query, keep_blank_values=True)
    if sorted(query) != ["expires", "sig"]:
        return "it is not a signed link"
    return None


@router.put("/api/devices/{device}/clips/{name}", tags=["clips"], status_code=201)
async def upload_clip(
    request: Request,
    device: DeviceName,
    name: ClipName,
    principal: Annotated[auth.Principal, Depends(any_principal)],
) -> ClipOut:
    """Upload a clip (the body is the MP4; ``X-Content-SHA256`` its hash). Needs a user
    token or a token made for this device."""
    ctx = ctx_of(request)
    if principal.device is not None and principal.device != device:
        raise HTTPException(403, "this token may only upload clips of its own device")
    want = request.headers.get("x-content-sha256", "").lower()
    if not re.fullmatch(r"[0-9a-f]{64}", want):
        raise HTTPException(422, "send the file's SHA-256 in X-Content-SHA256")
    path = clip_path(ctx.cfg.clips_dir, device, name)
    with Session(ctx.engine) as s:
        known = s.get(db.Clip, (device, name))
    if known is not None and known.sha256 is not None and known.sha256 != want:
        # The device announced this clip with its hash, or it is stored already: a clip is
        # never replaced by other bytes under its name.
        raise HTTPException(409, "this clip is known with another SHA-256; it is not replaced")
    limit = ctx.cfg.clip_max_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"clips may be at most {limit} bytes")
    tmp = path.with_name(f".{name}.{os.getpid()}.{time.monotonic_ns()}.part")
    digest = hashlib.sha256()
    size = 0
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
        with os.fdopen(fd, "wb") as f:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise HTTPException(413, f"clips may be at most {limit} bytes")
                digest.update(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        if digest.hexdigest() != want:
            raise HTTPException(422, "SHA-256 mismatch: the clip arrived damaged; send it again")
        existed = path.is_file()
        written = os.stat(tmp).st_ino
        os.replace(tmp, path)
    except OSError as exc:
        if not disk_full(exc):
            raise
        log.error("clip %s of %s not stored: %s", name, device, exc)
        raise HTTPException(507, "the server's disk is full: the clip was not stored") from exc
    finally:
        tmp.unlink(missing_ok=True)
    now = time.time()
    try:
        with Session(ctx.engine) as s, s.begin():
            clip = s.get(db.Clip, (device, name))
            if clip is None:
                clip = db.Clip(device=device, name=name, ts=now, size=size, sha256=want)
                s.add(clip)
            clip.stored, clip.stored_at = True, now
            s.flush()
            return _clip_out(clip)
    except OperationalError:
        # Not stored after all: no file is left without its row (unless another upload of
        # the same clip has put its own there since).
        with contextlib.suppress(OSError):
            if not existed and os.stat(path).st_ino == written:
                path.unlink()
        raise


@router.post("/api/devices/{device}/commands", tags=["commands"], status_code=202)
def send_command(
    request: Request, device: DeviceName, body: CommandIn, user: User, conn: Conn
) -> CommandCreated:
    """Send a command to a device; its result appears at ``/api/commands/{id}``."""
    ctx = ctx_of(request)
    try:
        args = check_command(body.name, body.args)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from exc
    with Session(conn) as s:
        if s.get(db.Device, device) is None:
            raise HTTPException(404, f"no device named {device!r}")
    command = Command(name=body.name, args=args)
    with Session(ctx.engine) as s, s.begin():
        s.add(
            db.CommandRow(
                id=command.id,
                device=device,
                name=command.name,
                args=args,
                ts=command.ts,
                user=user.name,
                sent=False,
            )
        )
    if ctx.publisher is None:
        raise HTTPException(503, "no MQTT broker is configured (mqtt.host)")
    try:
        ctx.publisher.publish(device, command)
    except EdgecamError as exc:
        raise HTTPException(503, str(exc)) from exc
    with ctx.engine.begin() as wconn:
        wconn.execute(update(db.CommandRow).where(db.CommandRow.id == command.id).values(sent=True))
    return CommandCreated(id=command.id)


def _command_out(c: db.CommandRow, r: db.CommandResult | None) -> CommandOut:
    result = None
    if r is not None:
        result = ResultOut(ok=r.ok, error=r.error, data=dict(r.data or {}), ts=r.ts)
    return CommandOut(
        id=c.id,
        device=c.device,
        name=c.name,
        args=dict(c.args or {}),
        ts=c.ts,
        user=c.user,
        sent=c.sent,
        result=result,
    )


def list_commands(conn: Connection, device: str, limit: int) -> list[CommandOut]:
    with Session(conn) as s:
        stmt = (
            select(db.CommandRow, db.CommandResult)
            .outerjoin(db.CommandResult, db.CommandResult.command_id == db.CommandRow.id)
            .where(db.CommandRow.device == device)
            .order_by(db.CommandRow.ts.desc())
            .limit(limit)
        )
        return [_command_out(c, r) for c, r in s.execute(stmt)]


@router.get("/api/commands/{command_id}", tags=["commands"])
def command(
    command_id: Annotated[str, PathParam(pattern=r"^[0-9a-f]{32}$")], _user: User, conn: Conn
) -> CommandOut:
    """A command sent from here, with its result once the device answered."""
    with Session(conn) as s:
        c = s.get(db.CommandRow, command_id)
        if c is None:
            raise HTTPException(404, "no such command")
        r = s.scalars(
            select(db.CommandResult).where(db.CommandResult.command_id == command_id).limit(1)
        ).first()
        return _command_out(c, r)


@router.get("/api/devices/{device}/commands", tags=["commands"])
def device_commands(
    device: DeviceName, _user: User, conn: Conn, limit: Limit = 50
) -> list[CommandOut]:
    return list_commands(conn, device, limit)


def _token_out(t: db.Token) -> TokenOut:
    return TokenOut(id=t.id, label=t.label, device=t.device, created=t.created, revoked=t.revoked)


@router.get("/api/tokens", tags=["tokens"])
def tokens(request: Request, user: User) -> list[TokenOut]:
    """Your API tokens (never the tokens themselves)."""
    return [_token_out(t) for t in auth.list_tokens(ctx_of(request).engine, user.user_id)]


@router.post("/api/tokens", tags=["tokens"], status_code=201)
def new_token(request: Request, body: TokenIn, user: User) -> TokenCreated:
    """A new API token of yours; ``device`` makes a device's clip upload token."""
    engine = ctx_of(request).engine
    token_id, token = auth.create_token(engine, user.name, body.label, body.device)
    row = next(t for t in auth.list_tokens(engine, user.user_id) if t.id == token_id)
    return TokenCreated(token=token, **_token_out(row).model_dump())


@router.delete("/api/tokens/{token_id}", tags=["tokens"], status_code=204)
def revoke(
    request: Request, token_id: Annotated[int, PathParam(ge=1, le=2**62)], user: User
) -> Response:
    """Revoke one of your tokens: it stops working at once."""
    if not auth.revoke_token(ctx_of(request).engine, token_id, user.user_id):
        raise HTTPException(404, "no such active token")
    return Response(status_code=204)


def _metric(lines: list[str], name: str, kind: str, help_: str, value: float) -> None:
    lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value:g}"]


@router.get("/metrics", tags=["meta"], response_class=PlainTextResponse)
def metrics(request: Request, _user: User, conn: Conn) -> PlainTextResponse:
    """Prometheus text format."""
    c = ctx_of(request).counters.snapshot()
    online = conn.scalar(select(func.count()).select_from(db.Device).where(db.Device.online))
    total = conn.scalar(select(func.count()).select_from(db.Device))
    lines: list[str] = []
    _metric(
        lines,
        "edgecam_messages_received_total",
        "counter",
        "MQTT messages taken in.",
        c["received"],
    )
    _metric(
        lines,
        "edgecam_messages_ingested_total",
        "counter",
        "Messages stored (new ids).",
        c["stored"],
    )
    _metric(
        lines,
        "edgecam_messages_duplicate_total",
        "counter",
        "Messages whose id was stored already.",
        c["duplicates"],
    )
    _metric(
        lines, "edgecam_messages_rejected_total", "counter", "Malformed messages.", c["rejected"]
    )
    _metric(
        lines,
        "edgecam_ingest_write_errors_total",
        "counter",
        "Failed batch writes.",
        c["write_errors"],
    )
    _metric(
        lines,
        "edgecam_messages_dropped_total",
        "counter",
        "QoS 0 messages dropped while ingest was behind.",
        c["dropped"],
    )
    _metric(
        lines,
        "edgecam_ingest_lag_seconds",
        "gauge",
        "How long the oldest message of the last batch written waited here, from receipt "
        "to stored.",
        c["lag_s"],
    )
    _metric(
        lines,
        "edgecam_message_age_seconds",
        "gauge",
        "Age of the oldest message of the last batch written, by its device's own clock.",
        c["age_s"],
    )
    _metric(
        lines, "edgecam_devices_online", "gauge", "Devices whose status is online.", online or 0
    )
    _metric(lines, "edgecam_devices", "gauge", "Devices known.", total or 0)
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")
