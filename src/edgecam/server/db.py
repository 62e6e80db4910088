"""The fleet server's tables, the engine for one database URL, and migrations on start.

SQLite (the embedded default) runs in WAL mode with a busy timeout, so that the ingest
writer and the API's readers never see "database is locked"; PostgreSQL is used as is.
The schema is created by the Alembic migrations shipped in ``migrations/``, applied on start.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    create_engine,
    event,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from edgecam.config import redact_url
from edgecam.errors import EdgecamError

__all__ = [
    "Alert",
    "Base",
    "Clip",
    "CommandResult",
    "CommandRow",
    "Device",
    "SessionRow",
    "StatsHourly",
    "StatsMinute",
    "StatsRow",
    "StatusRow",
    "Token",
    "User",
    "make_engine",
    "migrate",
]

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
# How long a SQLite connection waits for the writer's lock before giving up.
SQLITE_BUSY_TIMEOUT_MS = 30_000


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


class Device(Base):
    __tablename__ = "devices"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    state_ts: Mapped[float | None] = mapped_column(Float)
    last_seen: Mapped[float | None] = mapped_column(Float)
    version: Mapped[str | None] = mapped_column(String(64))
    profile: Mapped[str | None] = mapped_column(String(32))
    started: Mapped[float | None] = mapped_column(Float)
    cameras: Mapped[list[Any]] = mapped_column(JSON, default=list)
    workers: Mapped[list[Any]] = mapped_column(JSON, default=list)
    rules: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    outbox: Mapped[int | None] = mapped_column(Integer)
    outbox_dropped: Mapped[int | None] = mapped_column(BigInteger)
    uploads: Mapped[int | None] = mapped_column(Integer)
    status_seq: Mapped[int | None] = mapped_column(BigInteger)


class StatusRow(Base):
    """Each status message once, so that a replayed one never undoes a newer state."""

    __tablename__ = "status_messages"
    __table_args__ = (Index("ix_status_messages_ts", "ts"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    device: Mapped[str] = mapped_column(String(64))
    ts: Mapped[float] = mapped_column(Float)
    state: Mapped[str] = mapped_column(String(16))


class StatsRow(Base):
    __tablename__ = "stats"
    __table_args__ = (Index("ix_stats_device_start", "device", "t_start"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    device: Mapped[str] = mapped_column(String(64))
    camera: Mapped[str] = mapped_column(String(64))
    seq: Mapped[int] = mapped_column(BigInteger)
    ts: Mapped[float] = mapped_column(Float)
    t_start: Mapped[float] = mapped_column(Float)
    t_end: Mapped[float] = mapped_column(Float)
    people: Mapped[int] = mapped_column(Integer, default=0)
    peak: Mapped[int] = mapped_column(Integer, default=0)
    mask: Mapped[int] = mapped_column(Integer, default=0)
    no_mask: Mapped[int] = mapped_column(Integer, default=0)
    undecided: Mapped[int] = mapped_column(Integer, default=0)
    person: Mapped[int] = mapped_column(Integer, default=0)
    fps_in: Mapped[float] = mapped_column(Float, default=0.0)
    fps_out: Mapped[float] = mapped_column(Float, default=0.0)
    frames_dropped: Mapped[int] = mapped_column(Integer, default=0)
    received: Mapped[float] = mapped_column(Float)


class StatsMinute(Base):
    """Stats summed per device, camera and minute as they are stored: charts of long ranges
    read 1,440 rows a day instead of 86,400."""

    __tablename__ = "stats_minute"
    __table_args__ = (Index("ix_stats_minute_minute", "minute"),)

    device: Mapped[str] = mapped_column(String(64), primary_key=True)
    camera: Mapped[str] = mapped_column(String(64), primary_key=True)
    minute: Mapped[float] = mapped_column(Float, primary_key=True)
    messages: Mapped[int] = mapped_column(Integer)
    people: Mapped[int] = mapped_column(BigInteger)
    peak: Mapped[int] = mapped_column(Integer)
    mask: Mapped[int] = mapped_column(BigInteger)
    no_mask: Mapped[int] = mapped_column(BigInteger)
    undecided: Mapped[int] = mapped_column(BigInteger)
    person: Mapped[int] = mapped_column(BigInteger)


class StatsHourly(Base):
    """Stats summed per device, camera and hour: history kept past the raw retention."""

    __tablename__ = "stats_hourly"
    __table_args__ = (Index("ix_stats_hourly_hour", "hour"),)

    device: Mapped[str] = mapped_column(String(64), primary_key=True)
    camera: Mapped[str] = mapped_column(String(64), primary_key=True)
    hour: Mapped[float] = mapped_column(Float, primary_key=True)
    messages: Mapped[int] = mapped_column(Integer)
    people: Mapped[int] = mapped_column(Integer)
    peak: Mapped[int] = mapped_column(Integer)
    mask: Mapped[int] = mapped_column(Integer)
    no_mask: Mapped[int] = mapped_column(Integer)
    undecided: Mapped[int] = mapped_column(Integer)
    person: Mapped[int] = mapped_column(Integer)


class Alert(Base):
    __tablename__ = "alerts"
    __table_args__ = (Index("ix_alerts_ts", "ts"), Index("ix_alerts_device_ts", "device", "ts"))

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    alert_id: Mapped[str] = mapped_column(String(32), index=True)
    device: Mapped[str] = mapped_column(String(64))
    camera: Mapped[str | None] = mapped_column(String(64))
    rule: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)
    value: Mapped[float | None] = mapped_column(Float)
    threshold: Mapped[float | None] = mapped_column(Float)
    started: Mapped[float] = mapped_column(Float)
    ended: Mapped[float | None] = mapped_column(Float)
    clip: Mapped[str | None] = mapped_column(String(255))
    clip_url: Mapped[str | None] = mapped_column(Text)
    ts: Mapped[float] = mapped_column(Float)


class Clip(Base):
    """A clip a device saved (from its clips message) and/or uploaded (``stored``)."""

    __tablename__ = "clips"
    __table_args__ = (Index("ix_clips_device_start", "device", "start"),)

    device: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    msg_id: Mapped[str | None] = mapped_column(String(32), unique=True)
    camera: Mapped[str | None] = mapped_column(String(64))
    size: Mapped[int | None] = mapped_column(BigInteger)
    duration: Mapped[float | None] = mapped_column(Float)
    sha256: Mapped[str | None] = mapped_column(String(64))
    start: Mapped[float | None] = mapped_column(Float)
    end: Mapped[float | None] = mapped_column(Float)
    reason: Mapped[str | None] = mapped_column(Text)
    alert_id: Mapped[str | None] = mapped_column(String(32))
    url: Mapped[str | None] = mapped_column(Text)
    stored: Mapped[bool] = mapped_column(Boolean, default=False)
    stored_at: Mapped[float | None] = mapped_column(Float)
    ts: Mapped[float] = mapped_column(Float)


class CommandRow(Base):
    __tablename__ = "commands"
    __table_args__ = (Index("ix_commands_device_ts", "device", "ts"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    device: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(32))
    args: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    ts: Mapped[float] = mapped_column(Float)
    user: Mapped[str | None] = mapped_column(String(64))
    sent: Mapped[bool] = mapped_column(Boolean, default=False)


class CommandResult(Base):
    __tablename__ = "command_results"
    __table_args__ = (Index("ix_command_results_ts", "ts"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    command_id: Mapped[str] = mapped_column(String(64), index=True)
    device: Mapped[str] = mapped_column(String(64))
    ok: Mapped[bool] = mapped_column(Boolean)
    error: Mapped[str | None] = mapped_column(Text)
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    ts: Mapped[float] = mapped_column(Float)


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(Text)
    created: Mapped[float] = mapped_column(Float)


class Token(Base):
    """An API token; only its SHA-256 is kept. ``device`` limits it to that device's uploads."""

    __tablename__ = "tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    label: Mapped[str | None] = mapped_column(String(128))
    device: Mapped[str | None] = mapped_column(String(64))
    created: Mapped[float] = mapped_column(Float)
    revoked: Mapped[float | None] = mapped_column(Float)


class SessionRow(Base):
    """A login session; only the SHA-256 of the cookie value is kept."""

    __tablename__ = "sessions"

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    csrf: Mapped[str] = mapped_column(String(64))
    created: Mapped[float] = mapped_column(Float)
    expires: Mapped[float] = mapped_column(Float, index=True)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(url: str) -> Engine:
    """An engine for ``url``: sqlite:///FILE (WAL, busy timeout) or postgresql+psycopg://."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise EdgecamError(f"server.database_url {redact_url(url)!r} is not a valid URL") from exc
    if parsed.get_backend_name() == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise EdgecamError("server.database_url: SQLite needs a file (sqlite:///PATH)")
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        # WAL lets readers run beside the one writer; writers wait on each other (busy timeout).
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if parsed.get_backend_name() == "postgresql":
        return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)
    raise EdgecamError(
        f"server.database_url {redact_url(url)!r}: use sqlite:///FILE or postgresql+psycopg://..."
    )


def migrate(engine: Engine) -> None:
    """Bring the database schema up to date with the shipped Alembic migrations."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    except OperationalError as exc:
        raise EdgecamError(
            f"cannot reach the database {redact_url(str(engine.url))}: {exc.orig}"
        ) from exc
