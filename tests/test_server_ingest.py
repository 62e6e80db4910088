"""MQTT ingest into SQLite and PostgreSQL through a real Mosquitto: each message once."""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from server_support import wait_until
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import OperationalError

from edgecam.config import MqttConfig, ServerConfig
from edgecam.heap import release_free_memory
from edgecam.protocol import MAX_PAYLOAD_BYTES, Alert, ClipReady, CommandResult, Stats, Status
from edgecam.server import db
from edgecam.server.ingest import RECEIVE_MAXIMUM, Ingest, Rejected, decode
from edgecam.server.simulate import SimDevice, make_stats
from edgecam.server.store import Store

IngestFactory = Callable[..., Ingest]


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    eng = db.make_engine(database_url)
    db.migrate(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def start_ingest(
    broker: int,
    prefix: str,
    database_url: str,
    engine: Engine,
) -> Iterator[IngestFactory]:
    started: list[Ingest] = []

    def start(**server: object) -> Ingest:
        ingest = Ingest(
            MqttConfig(host="127.0.0.1", port=broker, prefix=prefix),
            ServerConfig.model_validate(
                {"database_url": database_url, "batch_interval_s": 0.05, **server}
            ),
        )
        ingest.start()
        assert ingest.wait_subscribed(10)
        started.append(ingest)
        return ingest

    yield start
    for ingest in started:
        ingest.stop()


@pytest.fixture
def device(broker: int, prefix: str) -> Iterator[SimDevice]:
    dev = SimDevice("cam-1", "127.0.0.1", broker, prefix).start()
    yield dev
    dev.stop()


def _count(engine: Engine, model: type[db.Base]) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(model)) or 0)


def test_duplicated_and_replayed_messages_are_stored_once(
    start_ingest: IngestFactory, device: SimDevice, engine: Engine
) -> None:
    ingest = start_ingest()
    sent = [device.send_stats() for _ in range(30)]
    for msg in sent[:10] + sent:  # redelivered, then the whole run replayed
        device.publish(msg)
    alert = Alert(
        device="cam-1",
        alert_id="a" * 32,
        rule="no_mask",
        state="raised",
        message="1 person without a mask",
        started=1.0,
    )
    for _ in range(3):
        device.publish(alert).wait_for_publish(5)
    wait_until(lambda: ingest.counters.snapshot()["received"] >= 30 + 40 + 3 + 1)
    wait_until(lambda: _count(engine, db.StatsRow) == 30)
    # The alert may be written in a batch of its own, after the stats are visible.
    wait_until(lambda: _count(engine, db.Alert) >= 1)
    with engine.connect() as conn:
        seqs = conn.scalars(select(db.StatsRow.seq).order_by(db.StatsRow.seq)).all()
    assert seqs == list(range(30))
    # Counted when each batch is written, which may be just after the rows are visible.
    wait_until(lambda: ingest.counters.snapshot()["duplicates"] >= 40 + 2)
    snap = ingest.counters.snapshot()
    assert snap["duplicates"] == 40 + 2
    assert snap["rejected"] == 0
    assert _count(engine, db.Alert) == 1  # every copy handled by now: stored once


def _stats_with(**fields: object) -> str:
    """A valid stats message's JSON with ``fields`` set to what a model would not hold."""
    message = json.loads(make_stats("cam-1", 1, 1000.0).model_dump_json())
    return json.dumps({**message, **fields})  # NaN and infinities as Python writes them


def _clip(**fields: object) -> str:
    clip = ClipReady(
        device="cam-1", camera="main", name="main-1.mp4", path="/clips/main-1.mp4", size=10,
        duration=1.0, sha256="0" * 64, start=1.0, end=2.0, trigger=1.5, reason="manual",
    )  # fmt: skip
    return json.dumps({**json.loads(clip.model_dump_json()), **fields})


def _status_with(**changes: object) -> str:
    return json.dumps(Status(device="cam-1", state="online").model_dump(mode="json") | changes)


BAD_PAYLOADS = [
    ("stats", b"not json"),
    ("stats", b'{"device": "cam-1"}'),  # required fields missing
    ("stats", make_stats("other", 0, 1.0).model_dump_json()),  # claims another device
    ("alerts", b'{"id": "short"}'),
    ("status", b"x" * (MAX_PAYLOAD_BYTES + 1)),
    ("clips", b"[]"),
    (
        "stats",
        make_stats("cam-1", 2**40, 1.0).model_copy(update={"people": 2**40}).model_dump_json(),
    ),
    (
        "stats",
        make_stats("cam-1", 1, 1.0).model_copy(update={"camera": "c" * 65}).model_dump_json(),
    ),
    # Numbers no column or date holds: one of these stopped the ingest writer for good.
    ("stats", _stats_with(start=float("inf"))),
    ("stats", _stats_with(end=1e999)),
    ("stats", _stats_with(ts=float("nan"))),
    ("stats", _stats_with(ts=1e20)),
    ("stats", _stats_with(start=-5.0)),
    ("stats", _stats_with(counts={"person": -2000000000})),
    ("stats", _stats_with(lines={"door": {"in": -1, "out": 0}})),
    ("stats", _stats_with(fps_in=float("nan"))),
    # A count no integer column holds: the whole status was refused by PostgreSQL.
    ("status", _status_with(uploads=2**31)),
    ("status", _status_with(outbox=2**31)),
    # Names that go into paths and links, links that are not http(s).
    ("clips", _clip(name="../../logout")),
    ("clips", _clip(url="javascript:alert(1)")),
    ("clips", _clip(start=1e15)),
]


def test_malformed_messages_are_rejected_counted_and_ingest_goes_on(
    start_ingest: IngestFactory, device: SimDevice, engine: Engine
) -> None:
    ingest = start_ingest()
    for kind, payload in BAD_PAYLOADS:
        device.publish_raw(kind, payload).wait_for_publish(5)
    device.send_stats()
    wait_until(lambda: _count(engine, db.StatsRow) == 1)
    wait_until(lambda: ingest.counters.snapshot()["rejected"] == len(BAD_PAYLOADS))


@pytest.mark.parametrize(("kind", "payload"), BAD_PAYLOADS)
def test_decode_rejects(kind: str, payload: bytes | str) -> None:
    raw = payload.encode() if isinstance(payload, str) else payload
    with pytest.raises(Rejected):
        decode("edgecam", f"edgecam/cam-1/{kind}", raw)


@pytest.mark.parametrize("device", ["x' OR 1=1--", "caméra", "a" * 65, "a b"])
def test_a_topic_that_names_no_device_is_rejected(device: str) -> None:
    result = CommandResult(command_id="0" * 32, ok=True).model_dump_json().encode()
    with pytest.raises(Rejected, match="not a device name"):
        decode("edgecam", f"edgecam/{device}/cmd/result", result)


def test_a_message_the_store_cannot_handle_is_rejected_and_ingest_goes_on(
    start_ingest: IngestFactory, device: SimDevice, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    handle = Store._write_stats

    def picky(self: Store, conn: Any, items: list[tuple[str, Stats]], now: float) -> int:
        if any(m.seq == 666 for _, m in items):
            raise OverflowError("a value the store cannot convert")
        return handle(self, conn, items, now)

    monkeypatch.setattr(Store, "_write_stats", picky)
    ingest = start_ingest()
    for seq in (1, 666, 2):
        device.publish(make_stats("cam-1", seq, 1000.0 + seq)).wait_for_publish(5)
    wait_until(lambda: ingest.counters.snapshot()["rejected"] == 1)
    device.publish(make_stats("cam-1", 3, 1003.0)).wait_for_publish(5)
    wait_until(lambda: _count(engine, db.StatsRow) == 3)  # all but the culprit, and after it


@contextlib.contextmanager
def _stats_locked(engine: Engine) -> Iterator[None]:
    """Writes into the stats table wait (the ingest writer included) until the block ends."""
    raw = engine.raw_connection()
    try:
        if engine.dialect.name == "postgresql":
            raw.cursor().execute("LOCK TABLE stats IN ACCESS EXCLUSIVE MODE")
        else:
            raw.driver_connection.isolation_level = None  # type: ignore[union-attr]
            raw.cursor().execute("BEGIN IMMEDIATE")
        yield
    finally:
        raw.rollback()
        raw.close()


def test_the_ingest_queue_is_bounded_while_the_database_is_slow(
    start_ingest: IngestFactory, device: SimDevice, engine: Engine
) -> None:
    # A device flooding faster than the writer stores: the broker keeps the QoS 1 messages
    # past the bound (it held 65,535, 4 GiB at the payload limit), QoS 0 ones are dropped.
    ingest = start_ingest()
    sent = 3 * RECEIVE_MAXIMUM
    with _stats_locked(engine):
        for seq in range(sent):
            device.publish(make_stats("cam-1", seq, 1000.0 + seq))
            flood = make_stats("cam-1", sent + seq, 1000.0 + seq).model_dump_json()
            device.publish_raw("stats", flood, qos=0)
        device.publish_raw("stats", "{}").wait_for_publish(10)
        time.sleep(1)  # what the broker would send has come by now
        assert ingest._queue.qsize() <= 2 * RECEIVE_MAXIMUM
        assert ingest.counters.snapshot()["dropped"] > 0

    def qos1_stored() -> int:
        with engine.connect() as conn:
            return int(conn.scalar(select(func.count()).where(db.StatsRow.seq < sent)) or 0)

    wait_until(lambda: qos1_stored() == sent, timeout=15)  # none of them lost


def test_a_new_device_in_a_batch_rolled_back_is_stored_when_it_is_tried_again(
    start_ingest: IngestFactory,
    broker: int,
    prefix: str,
    engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    handle, failures = Store._write_status, [0]

    def full_disk_once(self: Store, conn: Any, items: list[tuple[str, Status]], now: float) -> int:
        if not failures[0]:  # after the device's row went in, in the same transaction
            failures[0] += 1
            raise OperationalError("INSERT", {}, Exception("database or disk is full"))
        return handle(self, conn, items, now)

    monkeypatch.setattr(Store, "_write_status", full_disk_once)
    monkeypatch.setattr("edgecam.server.ingest.RETRY_DELAY_S", 0.1)
    start_ingest()
    dev = SimDevice("cam-9", "127.0.0.1", broker, prefix).start()
    try:

        def online() -> bool | None:
            with engine.connect() as conn:
                return conn.scalar(select(db.Device.online).where(db.Device.name == "cam-9"))

        wait_until(lambda: online() is True)  # stalled for good before: the row was "known"
        assert failures[0] == 1
    finally:
        dev.stop()


def test_status_online_then_last_will_offline(
    start_ingest: IngestFactory,
    broker: int,
    prefix: str,
    engine: Engine,
) -> None:
    start_ingest()
    dev = SimDevice("cam-2", "127.0.0.1", broker, prefix).start()

    def online() -> bool | None:
        with engine.connect() as conn:
            return conn.scalar(select(db.Device.online).where(db.Device.name == "cam-2"))

    wait_until(lambda: online() is True)
    dev.stop(clean=False)  # as if it crashed: the broker publishes its will
    wait_until(lambda: online() is False, timeout=20)
    with engine.connect() as conn:
        row = conn.execute(select(db.Device).where(db.Device.name == "cam-2")).one()
    assert row.version is None or row.version == "0.1.0"


def test_clip_message_stored_once(
    start_ingest: IngestFactory, device: SimDevice, engine: Engine
) -> None:
    start_ingest()
    clip = ClipReady(
        device="cam-1",
        camera="main",
        name="main-1.mp4",
        path="/clips/main-1.mp4",
        size=10,
        duration=1.0,
        sha256="0" * 64,
        start=1.0,
        end=2.0,
        trigger=1.5,
        reason="manual",
    )
    device.publish(clip)
    device.publish(clip)
    wait_until(lambda: _count(engine, db.Clip) == 1)


def test_two_ingest_processes_share_the_load_without_duplicates(
    start_ingest: IngestFactory, device: SimDevice, engine: Engine
) -> None:
    first, second = start_ingest(), start_ingest()
    n = 400
    infos = [device.publish(make_stats("cam-1", seq, 1000.0 + seq)) for seq in range(n)]
    for info in infos:
        info.wait_for_publish(5)
    wait_until(lambda: _count(engine, db.StatsRow) == n, timeout=20)
    stored = [i.counters.snapshot()["stored"] for i in (first, second)]
    assert sum(stored) >= n
    assert all(s > 0 for s in stored), f"one ingest did all the work: {stored}"


def test_stats_model_round_trip() -> None:
    msg = make_stats("cam-1", 3, 10.0)
    assert Stats.model_validate_json(msg.model_dump_json()) == msg


def test_the_same_last_will_twice_sets_offline_twice(
    start_ingest: IngestFactory, broker: int, prefix: str, engine: Engine
) -> None:
    start_ingest()
    dev = SimDevice("cam-3", "127.0.0.1", broker, prefix).start()

    def online() -> bool | None:
        with engine.connect() as conn:
            return conn.scalar(select(db.Device.online).where(db.Device.name == "cam-3"))

    wait_until(lambda: online() is True)
    will = Status(device="cam-3", state="offline", started=dev.started, ts=dev.started)
    dev.publish(will).wait_for_publish(5)
    wait_until(lambda: online() is False)
    dev.publish(dev.status()).wait_for_publish(5)  # it reconnects
    wait_until(lambda: online() is True)
    dev.publish(will).wait_for_publish(5)  # and crashes again: the same will, the same id
    wait_until(lambda: online() is False)
    dev.stop()


def test_a_status_from_a_clock_ahead_does_not_hide_the_next_ones(
    start_ingest: IngestFactory, device: SimDevice, engine: Engine
) -> None:
    start_ingest()

    def version() -> str | None:
        with engine.connect() as conn:
            return conn.scalar(select(db.Device.version).where(db.Device.name == "cam-1"))

    ahead = Status(device="cam-1", state="online", version="clock-ahead", ts=time.time() + 86400)
    device.publish(ahead).wait_for_publish(5)
    wait_until(lambda: version() == "clock-ahead")
    # The device's clock is put right and it restarts: its status must be taken.
    device.publish(Status(device="cam-1", state="online", version="right")).wait_for_publish(5)
    wait_until(lambda: version() == "right")


def test_a_run_whose_clock_is_set_back_keeps_its_state_shown(
    start_ingest: IngestFactory, device: SimDevice, engine: Engine
) -> None:
    """Within one run, statuses are ordered by their number: a device whose clock is set
    back 3 h goes on showing its state (before, its fleet view froze for 3 h), and a status
    of the run delivered late changes nothing."""
    start_ingest()

    def version() -> str | None:
        with engine.connect() as conn:
            return conn.scalar(select(db.Device.version).where(db.Device.name == "cam-1"))

    now, started = time.time(), time.time() - 60
    run = {"device": "cam-1", "state": "online", "started": started}
    device.publish(Status(**run, seq=1, version="first", ts=now)).wait_for_publish(5)
    wait_until(lambda: version() == "first")
    device.publish(Status(**run, seq=2, version="set back", ts=now - 3 * 3600))
    wait_until(lambda: version() == "set back")
    device.publish(Status(**run, seq=1, version="late", ts=now + 1)).wait_for_publish(5)
    device.publish(Status(**run, seq=3, version="third", ts=now - 3 * 3600 + 15))
    wait_until(lambda: version() == "third")  # "late" was never shown: it was older


def test_a_reconnection_in_one_batch_after_the_clock_was_set_back_shows_the_device_online(
    engine: Engine,
) -> None:
    """The broker publishes a run's last will as the device reconnects, then its new
    ``online``: both may come in one batch. In the order they came, not by the device's
    clock: once that clock was set back, the will (made before) had the later timestamp,
    and the device, back online, was shown offline until its next status."""
    store = Store(engine)
    now, started = time.time(), time.time() - 600
    run = {"device": "cam-1", "started": started}
    will = Status(**run, state="offline", seq=1, ts=started)
    store.write([("cam-1", Status(**run, state="online", seq=2, ts=started + 1))])
    store.write([("cam-1", Status(**run, state="online", seq=5, ts=now - 3 * 3600))])
    store.write(
        [
            ("cam-1", will),
            ("cam-1", Status(**run, state="online", seq=7, ts=now - 3 * 3600 + 30)),
        ]
    )
    with engine.connect() as conn:
        assert conn.scalar(select(db.Device.online).where(db.Device.name == "cam-1"))


def _sqlite_heap() -> int:
    """Bytes that SQLite holds in this process (all its connections), by its own count."""
    spec = importlib.util.find_spec("_sqlite3")
    assert spec is not None and spec.origin is not None
    lib = ctypes.CDLL(spec.origin)  # its symbols and those of the libsqlite3 it links
    lib.sqlite3_memory_used.restype = ctypes.c_int64
    return int(lib.sqlite3_memory_used())


def _rss() -> int:
    """This process's resident bytes."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGESIZE")


def _rss_trimmed() -> int:
    """This process's resident bytes once malloc has given back the free memory it can."""
    release_free_memory()
    return _rss()


LARGE_MESSAGE = 60_000  # characters: an alert just under the payload limit
MIB = 1 << 20
# Bursts of 1, 2, ... this many alerts, each stored before the next: batches of every size.
BURST_SIZES = 40


def _large_alert() -> Alert:
    return Alert(
        device="cam-1",
        alert_id=secrets.token_hex(16),
        rule="no_mask",
        state="raised",
        message="x" * LARGE_MESSAGE,
        started=time.time(),
    )


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_large_alerts_in_batches_of_every_size_leave_no_memory_held(
    start_ingest: IngestFactory, device: SimDevice, engine: Engine
) -> None:
    """46 MiB of alerts in batches of 40 sizes. A multi-row INSERT for each batch size stayed
    in the sqlite3 driver's statement cache with the values last bound to it: SQLite kept
    a copy of the last batch of every size (here 45 MiB; 95 MB after 20,000 alerts of 64 KB
    in bursts), freed only when the connection closed."""
    start_ingest()

    def burst(n: int) -> None:
        stored = _count(engine, db.Alert)
        alerts = [_large_alert() for _ in range(n)]
        for info in [device.publish(alert) for alert in alerts]:
            info.wait_for_publish(5)
        wait_until(lambda: _count(engine, db.Alert) == stored + n)

    burst(1)  # the statements prepared, the connection open
    sqlite_before, rss_before = _sqlite_heap(), _rss_trimmed()
    for n in range(1, BURST_SIZES + 1):
        burst(n)
    held = _sqlite_heap() - sqlite_before
    assert held < 8 * MIB, f"SQLite holds {held / MIB:.0f} MiB more"  # its page cache: 2 MiB
    grown = _rss_trimmed() - rss_before
    assert grown < 20 * MIB, f"RSS {grown / MIB:.0f} MiB more"


BURST_ALERTS = 1500  # 86 MiB of messages
# A device of its own process: what it allocates to send is not counted as the server's.
_SEND_LARGE_ALERTS = """
import secrets, sys, time
from edgecam.protocol import Alert
from edgecam.server.simulate import SimDevice

port, prefix, count, size = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
device = SimDevice("cam-1", "127.0.0.1", port, prefix).start()
alerts = (
    Alert(device="cam-1", alert_id=secrets.token_hex(16), rule="no_mask", state="raised",
          message="x" * size, started=time.time())
    for _ in range(count)
)
for info in [device.publish(alert) for alert in alerts]:
    info.wait_for_publish(30)
device.stop()
"""


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_memory_taken_by_a_burst_of_large_alerts_goes_back_to_the_system(
    start_ingest: IngestFactory, broker: int, prefix: str, engine: Engine
) -> None:
    """86 MiB of alerts arriving while the database is busy: about 900 of them wait in the
    queue, RSS grows by about 110 MiB. glibc kept that memory once freed (50 to 80 MiB of
    it here; 10,000 alerts of 64 KB left the server at 470 MB for good)."""
    ingest = start_ingest()
    before = _rss_trimmed()
    with _stats_locked(engine):  # the whole database, on SQLite
        args = [str(broker), prefix, str(BURST_ALERTS), str(LARGE_MESSAGE)]
        subprocess.run([sys.executable, "-c", _SEND_LARGE_ALERTS, *args], check=True, timeout=60)
        wait_until(lambda: ingest._queue.qsize() >= RECEIVE_MAXIMUM // 2)
    wait_until(lambda: _count(engine, db.Alert) == BURST_ALERTS, timeout=15)
    deadline = time.monotonic() + 5  # given back once the writer finds the queue empty
    while (grown := _rss() - before) >= 24 * MIB and time.monotonic() < deadline:
        time.sleep(0.1)
    assert grown < 24 * MIB, f"RSS {grown / MIB:.0f} MiB more"
