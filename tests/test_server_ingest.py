"""MQTT ingest into SQLite and PostgreSQL through a real Mosquitto: each message once."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from server_support import wait_until
from sqlalchemy import Engine, func, select

from edgecam.config import MqttConfig, ServerConfig
from edgecam.protocol import MAX_PAYLOAD_BYTES, Alert, ClipReady, Stats, Status
from edgecam.server import db
from edgecam.server.ingest import Ingest, Rejected, decode
from edgecam.server.simulate import SimDevice, make_stats

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
    return make_stats("cam-1", 1, 1.0).model_copy(update=fields).model_dump_json()


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
