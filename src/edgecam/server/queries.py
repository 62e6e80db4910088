"""Reading stats over a time range (raw or in buckets) and keeping history small.

Stats are summed per minute as they are stored (``stats_minute``); :func:`downsample` sums
those per hour into ``stats_hourly``. Raw stats and minute sums are kept
``stats_retention_days``, the hourly history ``history_retention_days``.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Integer,
    bindparam,
    cast,
    delete,
    func,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite

from edgecam.server.db import (
    Alert,
    CommandResult,
    CommandRow,
    Device,
    StatsHourly,
    StatsMinute,
    StatsRow,
    StatusRow,
)

__all__ = ["SUMMED", "downsample", "stats_buckets", "stats_raw", "stats_raw_json"]

log = logging.getLogger(__name__)

MINUTE = 60.0
HOUR = 3600.0
SUMMED = ("people", "mask", "no_mask", "undecided", "person")
RAW_COLUMNS = (
    "id",
    "camera",
    "seq",
    "ts",
    "t_start",
    "t_end",
    "people",
    "peak",
    "mask",
    "no_mask",
    "undecided",
    "person",
    "fps_in",
    "fps_out",
    "frames_dropped",
)
# Most rows one raw query returns: 24 h of 1 s stats of one camera, with room to spare.
MAX_RAW_ROWS = 200_000


def stats_raw(
    conn: Connection, device: str, start: float, end: float, camera: str | None = None
) -> list[dict[str, Any]]:
    """Every stored stats message of ``device`` that started in ``[start, end)``."""
    cols = [getattr(StatsRow, c) for c in RAW_COLUMNS]
    stmt = (
        select(*cols)
        .where(StatsRow.device == device, StatsRow.t_start >= start, StatsRow.t_start < end)
        .order_by(StatsRow.t_start, StatsRow.seq)
        .limit(MAX_RAW_ROWS)
    )
    if camera is not None:
        stmt = stmt.where(StatsRow.camera == camera)
    names = [c.replace("t_", "") if c.startswith("t_") else c for c in RAW_COLUMNS]
    return [dict(zip(names, row, strict=True)) for row in conn.execute(stmt)]


def stats_raw_json(
    conn: Connection, device: str, start: float, end: float, camera: str | None = None
) -> str:
    """:func:`stats_raw` as a JSON array built by the database itself: a day of 1 s stats is
    86,400 objects, too many to build one by one in Python within a page load."""
    names = [c.replace("t_", "") if c.startswith("t_") else c for c in RAW_COLUMNS]
    pairs = ", ".join(f"'{n}', {c}" for n, c in zip(names, RAW_COLUMNS, strict=True))
    where = "device = :device AND t_start >= :start AND t_start < :end"
    if camera is not None:
        where += " AND camera = :camera"
    inner = (
        f"SELECT {', '.join(RAW_COLUMNS)} FROM stats WHERE {where} "
        "ORDER BY t_start, seq LIMIT :limit"
    )
    if conn.dialect.name == "postgresql":
        sql = (
            f"SELECT coalesce(json_agg(json_build_object({pairs}) ORDER BY t_start, seq), "
            f"'[]')::text FROM ({inner}) AS s"
        )
    else:  # SQLite keeps the subquery's order
        sql = f"SELECT coalesce(json_group_array(json_object({pairs})), '[]') FROM ({inner})"
    params = {"device": device, "start": start, "end": end, "camera": camera, "limit": MAX_RAW_ROWS}
    return str(conn.execute(text(sql), params).scalar_one())


def _bucket_index(conn: Connection, column: Any, origin: float, size: float) -> Any:
    scaled = (column - origin) / size
    # Times are after origin, so truncation is floor; PostgreSQL's CAST would round instead.
    return func.floor(scaled) if conn.dialect.name == "postgresql" else cast(scaled, Integer)


def stats_buckets(
    conn: Connection,
    device: str,
    start: float,
    end: float,
    size: float,
    camera: str | None = None,
) -> list[dict[str, Any]]:
    """Stats of ``device`` summed over buckets of ``size`` seconds from ``start``: from the
    per-minute sums when ``size`` is whole minutes (buckets then start on a whole minute),
    else from the raw messages; from the hourly history before those were kept."""
    by_minute = size >= MINUTE and size % MINUTE == 0
    if by_minute:
        start = math.floor(start / MINUTE) * MINUTE
        fine: Any = StatsMinute
        fine_time = StatsMinute.minute
        messages: Any = func.sum(StatsMinute.messages)
    else:
        fine, fine_time, messages = StatsRow, StatsRow.t_start, func.count()
    filters = [fine.device == device]
    if camera is not None:
        filters.append(fine.camera == camera)
    oldest = conn.scalar(select(func.min(fine_time)).where(*filters))
    fine_from = max(start, oldest) if oldest is not None else end
    buckets: dict[int, dict[str, Any]] = {}

    def add(index: int, messages: int, peak: int, sums: dict[str, int]) -> None:
        b = buckets.get(index)
        if b is None:
            b = buckets[index] = {
                "start": start + index * size,
                "end": start + (index + 1) * size,
                "messages": 0,
                "peak": 0,
                **dict.fromkeys(SUMMED, 0),
            }
        b["messages"] += int(messages)
        b["peak"] = max(b["peak"], int(peak or 0))
        for k in SUMMED:
            b[k] += int(sums[k] or 0)

    if start < fine_from:
        hourly = [StatsHourly.device == device, StatsHourly.hour >= start - HOUR]
        if camera is not None:
            hourly.append(StatsHourly.camera == camera)
        cols = [StatsHourly.hour, StatsHourly.messages, StatsHourly.peak]
        cols += [getattr(StatsHourly, k) for k in SUMMED]
        old = select(*cols).where(*hourly, StatsHourly.hour < min(fine_from, end))
        for row in conn.execute(old):
            h: list[Any] = list(row)
            index = math.floor((max(h[0], start) - start) / size)
            add(index, h[1], h[2], dict(zip(SUMMED, h[3:], strict=True)))
    if fine_from < end:
        index = _bucket_index(conn, fine_time, start, size).label("b")
        recent = (
            select(
                index,
                messages,
                func.max(fine.peak),
                *[func.sum(getattr(fine, k)) for k in SUMMED],
            )
            .where(*filters, fine_time >= fine_from, fine_time < end)
            .group_by(index)
        )
        for row in conn.execute(recent):
            values: list[Any] = list(row)
            add(int(values[0]), values[1], values[2], dict(zip(SUMMED, values[3:], strict=True)))
    return [buckets[i] for i in sorted(buckets)]


def downsample(engine: Engine, raw_days: float, history_days: float) -> dict[str, int]:
    """Sum recent complete hours of the per-minute sums into ``stats_hourly``, then drop raw
    stats and minute sums older than ``raw_days`` and hourly history older than
    ``history_days``. Every statement reads through an index: the tables are large."""
    now = time.time()
    this_hour = math.floor(now / HOUR) * HOUR
    with engine.begin() as conn:
        last = conn.scalar(select(func.max(StatsHourly.hour)))
        if last is None:
            first = conn.scalar(select(func.min(StatsMinute.minute)))
            since = this_hour if first is None else math.floor(first / HOUR) * HOUR
        else:  # the last hour again, for messages that came in late
            since = last
        hour = (_bucket_index(conn, StatsMinute.minute, 0.0, HOUR) * HOUR).label("hour")
        stmt = (
            select(
                StatsMinute.device,
                StatsMinute.camera,
                hour,
                func.sum(StatsMinute.messages),
                func.max(StatsMinute.peak),
                *[func.sum(getattr(StatsMinute, k)) for k in SUMMED],
            )
            .where(StatsMinute.minute >= since, StatsMinute.minute < this_hour)
            .group_by(StatsMinute.device, StatsMinute.camera, hour)
        )
        rows = [
            {
                "device": r[0],
                "camera": r[1],
                "hour": float(r[2]),
                "messages": int(r[3]),
                "peak": r[4] or 0,
                **{k: int(v or 0) for k, v in zip(SUMMED, r[5:], strict=True)},
            }
            for r in conn.execute(stmt)
        ]
        if rows:
            dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
            ins = dialect.insert(StatsHourly)
            keep = ("messages", "peak", *SUMMED)
            conn.execute(
                ins.on_conflict_do_update(
                    index_elements=["device", "camera", "hour"],
                    set_={k: getattr(ins.excluded, k) for k in keep},
                ),
                rows,
            )
        # On an hour boundary, so that no hour is half raw and half summed.
        raw_cut = min(math.floor((now - raw_days * 86400) / HOUR) * HOUR, this_hour)
        dropped = _delete_per_device(conn, StatsRow, StatsRow.t_start, raw_cut)
        conn.execute(delete(StatsMinute).where(StatsMinute.minute < raw_cut))
        old = conn.execute(
            delete(StatsHourly).where(StatsHourly.hour < now - history_days * 86400)
        ).rowcount  # type: ignore[attr-defined]
    if dropped or old:
        log.info("retention: %d raw stats and %d hourly rows deleted", dropped, old)
    return {"hours": len(rows), "raw_deleted": dropped, "hourly_deleted": old}


def prune_history(engine: Engine, raw_days: float, history_days: float) -> dict[str, int]:
    """Drop what else a device's messages pile up: status messages (kept to tell a replayed
    one from a new one) and commands with their results older than ``raw_days``, alerts
    older than ``history_days``. A replayed status older than that changes nothing anyway:
    the device's state is newer. Every statement reads through an index."""
    now = time.time()
    raw_cut, history_cut = now - raw_days * 86400, now - history_days * 86400
    with engine.begin() as conn:
        deleted = {
            "statuses": _deleted(conn.execute(delete(StatusRow).where(StatusRow.ts < raw_cut))),
            "commands": _delete_per_device(conn, CommandRow, CommandRow.ts, raw_cut),
            "results": _deleted(
                conn.execute(delete(CommandResult).where(CommandResult.ts < raw_cut))
            ),
            "alerts": _deleted(conn.execute(delete(Alert).where(Alert.ts < history_cut))),
        }
    if any(deleted.values()):
        log.info("retention: %s deleted", ", ".join(f"{n} {k}" for k, n in deleted.items()))
    return deleted


def _delete_per_device(conn: Connection, table: Any, at: Any, cut: float) -> int:
    """``table``'s rows whose ``at`` is before ``cut`` deleted device by device, through its
    (device, time) index (one statement over all devices would scan the table); how many."""
    devices = [{"d": d, "cut": cut} for d in conn.scalars(select(Device.name))]
    if not devices:
        return 0
    stmt = delete(table).where(table.device == bindparam("d"), at < bindparam("cut"))
    return _deleted(conn.execute(stmt, devices))


def _deleted(result: Any) -> int:
    return int(result.rowcount)
