"""The durable outbox: every outgoing message waits in an SQLite file (WAL) until the broker
has acknowledged it, across broker outages and device restarts.

Bounded by count and bytes: beyond either, the oldest messages go first and the number
dropped is kept (and reported in the device's status). Also holds the device's stats
sequence number, so that ``seq`` goes on across restarts and a gap always means a loss.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from edgecam.errors import EdgecamError

__all__ = ["Outbox", "OutboxMessage"]

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    retain INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class OutboxMessage:
    id: int
    topic: str
    payload: bytes
    retain: bool


class Outbox:
    """A FIFO of MQTT messages on disk. Thread-safe; one instance per file."""

    def __init__(self, path: Path, max_messages: int, max_bytes: int) -> None:
        if max_messages < 1 or max_bytes < 1:
            raise ValueError("max_messages and max_bytes must be >= 1")
        self.path = path
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise EdgecamError(
                f"cannot open the MQTT outbox {path}: {exc}; check mqtt.outbox"
            ) from exc
        self._lock = threading.Lock()
        self._count, self._bytes = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM messages"
        ).fetchone()
        self.added = threading.Event()

    # -- counters ---------------------------------------------------------------------

    def _counter(self, name: str) -> int:
        row = self._db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def _bump(self, name: str, by: int) -> int:
        self._db.execute(
            "INSERT INTO counters(name, value) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            (name, by),
        )
        return self._counter(name)

    def next_seq(self) -> int:
        """The next stats sequence number (0, 1, 2, ... over the device's whole life)."""
        with self._lock:
            return self._bump("seq", 1) - 1

    @property
    def dropped(self) -> int:
        with self._lock:
            return self._counter("dropped")

    # -- queue ------------------------------------------------------------------------

    def put(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Keep a message until :meth:`ack`; drops the oldest beyond the bounds."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO messages(topic, payload, retain) VALUES (?, ?, ?)",
                    (topic, payload, int(retain)),
                )
                self._count += 1
                self._bytes += len(payload)
                dropped = 0
                while self._count > 1 and (
                    self._count > self.max_messages or self._bytes > self.max_bytes
                ):
                    row = self._db.execute(
                        "SELECT id, LENGTH(payload) FROM messages ORDER BY id LIMIT 1"
                    ).fetchone()
                    self._db.execute("DELETE FROM messages WHERE id = ?", (row[0],))
                    self._count -= 1
                    self._bytes -= row[1]
                    dropped += 1
                if dropped:
                    total = self._bump("dropped", dropped)
                    log.warning(
                        "outbox full: dropped the %d oldest message(s) (%d in all)", dropped, total
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        self.added.set()

    def peek(self, limit: int) -> list[OutboxMessage]:
        """The oldest ``limit`` messages, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload, retain FROM messages ORDER BY id LIMIT ?", (limit,)
            ).fetchall()
        return [OutboxMessage(r[0], r[1], bytes(r[2]), bool(r[3])) for r in rows]

    def ack(self, message_id: int) -> None:
        """The broker has it: forget it."""
        with self._lock:
            row = self._db.execute(
                "DELETE FROM messages WHERE id = ? RETURNING LENGTH(payload)", (message_id,)
            ).fetchone()
            if row is not None:
                self._count -= 1
                self._bytes -= row[0]

    def __len__(self) -> int:
        with self._lock:
            return int(self._count)

    def close(self) -> None:
        with self._lock:
            self._db.close()
