"""Writing validated protocol messages into the database, each exactly once.

Every table is keyed by the message ``id`` and written with INSERT ... ON CONFLICT DO
NOTHING, so a redelivered or replayed message changes nothing. A batch is one transaction.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Connection, Engine, Table, bindparam, select, update
from sqlalchemy.dialects import postgresql, sqlite

from edgecam.protocol import Alert, ClipReady, CommandResult, Payload, Stats, Status
from edgecam.server import db

__all__ = ["BatchResult", "Store"]


@dataclass(frozen=True, slots=True)
class BatchResult:
    stored: int
    duplicates: int


def _t(model: type[db.Base]) -> Table:
    return cast(Table, model.__table__)


def _insert_new(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> set[str]:
    """Insert ``rows`` whose id is not there yet; the ids actually inserted."""
    if not rows:
        return set()
    if conn.dialect.name == "postgresql":
        returning = postgresql.insert(table).on_conflict_do_nothing().returning(table.c.id)
        return {row[0] for row in conn.execute(returning, rows)}
    # One row a statement on SQLite. SQLAlchemy sends rows with RETURNING as one INSERT of
    # them all, whose text changes with their number, and the sqlite3 driver caches each
    # statement (128 a connection) with the values last bound to it: a copy of the last
    # batch of every size met stayed, for as long as the connection lived (95 MB after
    # 20,000 alerts of 64 KB, up to 128 batches' worth).
    stmt = sqlite.insert(table).on_conflict_do_nothing()
    return {row["id"] for row in rows if conn.execute(stmt, row).rowcount == 1}


def _ignore_existing(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
    if rows:
        dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
        conn.execute(dialect.insert(table).on_conflict_do_nothing(), rows)


def _stats_row(m: Stats, now: float) -> dict[str, Any]:
    c = m.counts
    return {
        "id": m.id,
        "device": m.device,
        "camera": m.camera,
        "seq": m.seq,
        "ts": m.ts,
        "t_start": m.start,
        "t_end": m.end,
        "people": m.people,
        "peak": m.peak,
        "mask": c.get("mask", 0),
        "no_mask": c.get("no_mask", 0),
        "undecided": c.get("undecided", 0),
        "person": c.get("person", 0),
        "fps_in": m.fps_in,
        "fps_out": m.fps_out,
        "frames_dropped": m.frames_dropped,
        "received": now,
    }


# Columns of the stats table as _stats_row fills them, with their PostgreSQL array types.
_STATS_TYPES = {
    "id": "text",
    "device": "text",
    "camera": "text",
    "seq": "int8",  # the rest of the integers are int4 columns
    "ts": "float8",
    "t_start": "float8",
    "t_end": "float8",
    "people": "int4",
    "peak": "int4",
    "mask": "int4",
    "no_mask": "int4",
    "undecided": "int4",
    "person": "int4",
    "fps_in": "float8",
    "fps_out": "float8",
    "frames_dropped": "int4",
    "received": "float8",
}


_SUMMED = ("people", "mask", "no_mask", "undecided", "person")
_MINUTE_COLUMNS = "device, camera, minute, messages, peak, " + ", ".join(_SUMMED)
_MINUTE_UPDATE = ", ".join(
    [
        "messages = stats_minute.messages + excluded.messages",
        "peak = CASE WHEN excluded.peak > stats_minute.peak "
        "THEN excluded.peak ELSE stats_minute.peak END",
    ]
    + [f"{k} = stats_minute.{k} + excluded.{k}" for k in _SUMMED]
)


def _alert_row(m: Alert) -> dict[str, Any]:
    return m.model_dump(include=set(_t(db.Alert).columns.keys()))


def _result_row(m: CommandResult, device: str) -> dict[str, Any]:
    return {
        "id": m.id,
        "command_id": m.command_id[:64],
        "device": device,
        "ok": m.ok,
        "error": m.error,
        "data": m.data,
        "ts": m.ts,
    }


class Store:
    """Writes batches of (device, message) into one database."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._known_devices: set[str] = set()
        self._handlers: dict[type[Payload], Callable[[Connection, list[Any], float], int]] = {
            Stats: self._write_stats,
            Status: self._write_status,
            Alert: self._write_alerts,
            ClipReady: self._write_clips,
            CommandResult: self._write_results,
        }

    def close(self) -> None:
        self._engine.dispose()

    def write(self, messages: Sequence[tuple[str, Payload]]) -> BatchResult:
        """Store one batch in one transaction; (stored, duplicates)."""
        now = time.time()
        by_kind: dict[type[Payload], list[tuple[str, Any]]] = {}
        for device, msg in messages:
            by_kind.setdefault(type(msg), []).append((device, msg))
        stored = 0
        with self._engine.begin() as conn:
            added = self._ensure_devices(conn, {device for device, _ in messages})
            for kind, items in by_kind.items():
                stored += self._handlers[kind](conn, items, now)
        # Known only once committed: a batch rolled back (a full disk, a value refused) takes
        # its new devices' rows with it, and the retry must insert them again.
        self._known_devices |= added
        return BatchResult(stored=stored, duplicates=len(messages) - stored)

    def touch(self, last_seen: dict[str, float]) -> None:
        """Move each device's ``last_seen`` forward (never back)."""
        if not last_seen:
            return
        table = _t(db.Device)
        stmt = (
            update(table)
            .where(table.c.name == bindparam("d"))
            .where((table.c.last_seen.is_(None)) | (table.c.last_seen < bindparam("t")))
            .values(last_seen=bindparam("t"))
        )
        with self._engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql(
                    "UPDATE devices SET last_seen = v.t "
                    "FROM unnest(%(d)s::text[], %(t)s::float8[]) AS v(d, t) "
                    "WHERE devices.name = v.d AND (last_seen IS NULL OR last_seen < v.t)",
                    {"d": list(last_seen), "t": list(last_seen.values())},
                )
            else:
                conn.execute(stmt, [{"d": d, "t": t} for d, t in last_seen.items()])

    def _ensure_devices(self, conn: Connection, names: set[str]) -> set[str]:
        """Insert the devices not seen before; which those were."""
        new = names - self._known_devices
        if new:
            rows = [
                {"name": n, "online": False, "cameras": [], "workers": [], "rules": {}} for n in new
            ]
            _ignore_existing(conn, _t(db.Device), rows)
        return new

    def _write_stats(self, conn: Connection, items: list[tuple[str, Stats]], now: float) -> int:
        # The hot path (most messages are stats): the new rows and their per-minute sums in
        # one statement per batch on PostgreSQL. Only rows really inserted are summed, so a
        # replayed message counts once there too.
        rows = [_stats_row(m, now) for _, m in items]
        columns = ", ".join(_STATS_TYPES)
        if conn.dialect.name == "postgresql":
            arrays = ", ".join(f"%({c})s::{t}[]" for c, t in _STATS_TYPES.items())
            sums = ", ".join(f"sum({k})" for k in _SUMMED)
            sql = (
                f"WITH new AS (INSERT INTO stats ({columns}) SELECT * FROM unnest({arrays}) "
                "ON CONFLICT (id) DO NOTHING RETURNING *), "
                f"minutes AS (INSERT INTO stats_minute ({_MINUTE_COLUMNS}) "
                f"SELECT device, camera, floor(t_start / 60) * 60, count(*), max(peak), {sums} "
                "FROM new GROUP BY device, camera, floor(t_start / 60) "
                f"ON CONFLICT (device, camera, minute) DO UPDATE SET {_MINUTE_UPDATE}) "
                "SELECT count(*) FROM new"
            )
            params: Any = {c: [r[c] for r in rows] for c in _STATS_TYPES}
            return int(conn.exec_driver_sql(sql, params).scalar_one())
        marks = ", ".join("?" for _ in _STATS_TYPES)
        insert = f"INSERT OR IGNORE INTO stats ({columns}) VALUES ({marks})"
        minutes: dict[tuple[str, str, float], list[int]] = {}
        for r in rows:
            if conn.exec_driver_sql(insert, tuple(r[c] for c in _STATS_TYPES)).rowcount != 1:
                continue
            key = (r["device"], r["camera"], math.floor(r["t_start"] / 60) * 60.0)
            acc = minutes.setdefault(key, [0, 0] + [0] * len(_SUMMED))
            acc[0] += 1
            acc[1] = max(acc[1], r["peak"])
            for i, k in enumerate(_SUMMED, start=2):
                acc[i] += r[k]
        if minutes:
            marks = ", ".join("?" for _ in range(5 + len(_SUMMED)))
            conn.exec_driver_sql(
                f"INSERT INTO stats_minute ({_MINUTE_COLUMNS}) VALUES ({marks}) "
                f"ON CONFLICT (device, camera, minute) DO UPDATE SET {_MINUTE_UPDATE}",
                [(*key, *acc) for key, acc in minutes.items()],
            )
        return sum(acc[0] for acc in minutes.values())

    def _write_alerts(self, conn: Connection, items: list[tuple[str, Alert]], now: float) -> int:
        return len(_insert_new(conn, _t(db.Alert), [_alert_row(m) for _, m in items]))

    def _write_results(
        self, conn: Connection, items: list[tuple[str, CommandResult]], now: float
    ) -> int:
        rows = [_result_row(m, device) for device, m in items]
        return len(_insert_new(conn, _t(db.CommandResult), rows))

    def _write_clips(self, conn: Connection, items: list[tuple[str, ClipReady]], now: float) -> int:
        stored = 0
        for device, m in items:
            if conn.scalar(select(db.Clip.name).where(db.Clip.msg_id == m.id)) is not None:
                continue
            meta = {
                "msg_id": m.id,
                "camera": m.camera,
                "size": m.size,
                "duration": m.duration,
                "sha256": m.sha256,
                "start": m.start,
                "end": m.end,
                "reason": m.reason,
                "alert_id": m.alert_id,
                "url": m.url,
                "ts": m.ts,
            }
            key = (db.Clip.device == device) & (db.Clip.name == m.name)
            if conn.scalar(select(db.Clip.name).where(key)) is None:
                conn.execute(_t(db.Clip).insert().values(device=device, name=m.name, **meta))
            else:  # uploaded before its message came
                conn.execute(update(db.Clip).where(key).values(**meta))
            stored += 1
        return stored

    def _write_status(self, conn: Connection, items: list[tuple[str, Status]], now: float) -> int:
        rows = [{"id": m.id, "device": device, "ts": m.ts, "state": m.state} for device, m in items]
        new = _insert_new(conn, _t(db.StatusRow), rows)
        # In the order they came, as a batch of one would be: a device's clock set back
        # (or a last will made at connect) gives no order a batch may go by.
        for device, m in items:
            current = conn.execute(
                select(
                    db.Device.online, db.Device.state_ts, db.Device.started, db.Device.status_seq
                ).where(db.Device.name == device)
            ).one()
            # A seen id changes nothing, except a last will firing again: a device makes its
            # will once and the broker may publish that same message at each crash.
            will_again = m.state == "offline" and current.online
            if m.id not in new and not will_again:
                continue
            if not _status_applies(m, current.state_ts, current.started, current.status_seq):
                continue
            # Never ahead of this clock: a device whose own was ahead once (wrong at boot)
            # would have every later, right status taken for an older one.
            values: dict[str, Any] = {
                "online": m.state == "online",
                "state_ts": min(m.ts, now),
                "status_seq": m.seq,
            }
            if m.state == "online":
                values.update(
                    version=m.version,
                    profile=m.profile,
                    started=m.started,
                    cameras=list(m.cameras),
                    workers=[w.model_dump(mode="json") for w in m.workers],
                    rules=m.rules,
                    outbox=m.outbox,
                    outbox_dropped=m.outbox_dropped,
                    uploads=m.uploads,
                )
            else:
                values["workers"] = []
            conn.execute(update(db.Device).where(db.Device.name == device).values(**values))
        return len(new)


def _status_applies(
    m: Status, state_ts: float | None, started: float | None, seq: int | None
) -> bool:
    """Whether status ``m`` is the device's state now. A last will is made when the device
    connects, so it is older than that run's ``online``: it applies when it belongs to the
    current run (or a newer one) even though its own timestamp and number are older. Within
    one run, statuses are ordered by their number where they have one, not by the device's
    clock, which may have been set back meanwhile."""
    same_run = m.started is not None and m.started == started
    if m.state != "offline" and same_run and m.seq is not None and seq is not None:
        return m.seq > seq
    if state_ts is None or m.ts >= state_ts:
        return True
    if m.state == "offline":
        return m.started is not None and started is not None and m.started >= started
    return False
