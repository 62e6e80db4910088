"""MQTT -> database: validate every device message with the shared models, store it once.

The paho callback only queues the raw message; a writer thread validates, writes a batch in
one transaction and only then acknowledges the batch's QoS 1 messages (manual ack), so a
crash before the write makes the broker deliver them again (and the ids make that harmless).
Several ingest processes share the load through an MQTT 5 shared subscription; ``status``
is subscribed by each of them in full, since brokers send no retained messages to shared
subscriptions.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions
from pydantic import ValidationError
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from edgecam.config import MqttConfig, ServerConfig
from edgecam.heap import release_free_memory
from edgecam.protocol import (
    DEVICE_NAME,
    MAX_PAYLOAD_BYTES,
    Alert,
    ClipReady,
    CommandResult,
    Payload,
    Stats,
    Status,
    parse_topic,
)
from edgecam.ratelimit import Every
from edgecam.server.db import make_engine
from edgecam.server.mqtt import make_client
from edgecam.server.store import BatchResult, Store

__all__ = ["Counters", "Ingest", "Rejected", "decode", "run_ingest_process"]

log = logging.getLogger(__name__)

MODELS: dict[str, type[Payload]] = {
    "status": Status,
    "stats": Stats,
    "alerts": Alert,
    "clips": ClipReady,
    "cmd/result": CommandResult,
}
SHARED_KINDS = ("stats", "alerts", "clips", "cmd/result")
# How often each device's last_seen is written (it changes with every message).
TOUCH_INTERVAL_S = 1.0
# Wait after a failed database write before trying the same batch again.
RETRY_DELAY_S = 1.0
# At most one log line per this many seconds about rejected messages.
REJECT_LOG_INTERVAL_S = 5.0
# Most QoS 1 messages the broker may send an ingest client before it acknowledges any (MQTT 5
# Receive Maximum; 65,535 unless said): the bound of its queue, 64 MiB at the payload limit.
# QoS 0 messages, which the broker does not hold back, are dropped past as many queued.
RECEIVE_MAXIMUM = 1000
# Payload bytes written after which the heap's free memory is given back to the system once
# the queue has drained: glibc kept what a burst of large messages freed, and RSS stayed at
# the burst's peak (10,000 alerts of 64 KB: 470 MB). One call takes 17 ms for 380 MB.
TRIM_AFTER_BYTES = 16 * 1024 * 1024


class Rejected(ValueError):
    """A message that is not a valid edgecam message."""


class Counters:
    """Ingest counters shared by the ingest processes and the API's /metrics."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self.received = ctx.Value("q", 0)
        self.stored = ctx.Value("q", 0)
        self.duplicates = ctx.Value("q", 0)
        self.rejected = ctx.Value("q", 0)
        self.write_errors = ctx.Value("q", 0)
        self.dropped = ctx.Value("q", 0)
        # Of the last batch written: how long its oldest message waited here, from receipt
        # to stored (this server's clock alone), and the age of its oldest message by the
        # device's own clock (the outbox and the broker included; a device's clock skews it).
        self.lag_s = ctx.Value("d", 0.0)
        self.age_s = ctx.Value("d", 0.0)

    def add(self, name: str, n: int) -> None:
        value = getattr(self, name)
        with value.get_lock():
            value.value += n

    def snapshot(self) -> dict[str, float]:
        names = (
            "received",
            "stored",
            "duplicates",
            "rejected",
            "write_errors",
            "dropped",
            "lag_s",
            "age_s",
        )
        return {n: getattr(self, n).value for n in names}


# The database's own failures (down, locked, full): a batch that meets one is tried again.
UNAVAILABLE = (OperationalError, InterfaceError, PoolTimeout)


def decode(prefix: str, topic: str, payload: bytes) -> tuple[str, Payload]:
    """(device, message) of one MQTT message, or :class:`Rejected` saying why not."""
    parsed = parse_topic(prefix, topic)
    if parsed is None or parsed[1] not in MODELS:
        raise Rejected(f"unexpected topic {topic!r}")
    device, kind = parsed
    if not re.fullmatch(DEVICE_NAME, device):  # match: "$" takes a final newline
        raise Rejected(f"unexpected topic {topic!r}: not a device name")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise Rejected(f"{topic}: payload of {len(payload)} bytes is too large")
    try:
        msg = MODELS[kind].model_validate_json(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(payload)"
        raise Rejected(f"{topic}: {where}: {first['msg']}") from exc
    claimed = getattr(msg, "device", device)
    if claimed != device:
        raise Rejected(f"{topic}: payload names device {claimed!r}")
    if isinstance(msg, Stats):
        _check_stats_fit(topic, msg)
    return device, msg


INT4_MAX = 2**31 - 1
NAME_MAX = 64


def _check_stats_fit(topic: str, msg: Stats) -> None:
    """Refuse stats the database columns cannot hold (the same on SQLite and PostgreSQL)."""
    if len(msg.camera) > NAME_MAX:
        raise Rejected(f"{topic}: camera name longer than {NAME_MAX}")
    counts = (msg.people, msg.peak, msg.frames_dropped, *msg.counts.values())
    if msg.seq >= 2**63 or any(abs(n) > INT4_MAX for n in counts):
        raise Rejected(f"{topic}: a count is out of range")


@dataclass(frozen=True, slots=True)
class _Raw:
    topic: str
    payload: bytes
    mid: int
    qos: int
    received: float  # monotonic


class Ingest:
    """One ingest client: an MQTT subscription, a queue and a batch writer thread."""

    def __init__(
        self,
        mqtt_cfg: MqttConfig,
        server_cfg: ServerConfig,
        counters: Counters | None = None,
        *,
        database_url: str | None = None,
    ) -> None:
        self._mqtt_cfg = mqtt_cfg
        self._cfg = server_cfg
        self.counters = counters or Counters()
        self._store = Store(make_engine(database_url or server_cfg.database_url))
        self._queue: queue.SimpleQueue[_Raw] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._writer: threading.Thread | None = None
        self._client: mqtt.Client | None = None
        self._subscribed = threading.Event()
        self._reject_log = Every(REJECT_LOG_INTERVAL_S)
        self._drop_log = Every(REJECT_LOG_INTERVAL_S)

    def start(self) -> None:
        client = make_client(self._mqtt_cfg, "ingest", manual_ack=True)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        self._writer = threading.Thread(target=self._write_loop, name="ingest-writer", daemon=True)
        self._writer.start()
        cfg = self._mqtt_cfg
        assert cfg.host is not None
        props = Properties(PacketTypes.CONNECT)
        props.ReceiveMaximum = RECEIVE_MAXIMUM
        client.connect_async(cfg.host, cfg.port, cfg.keepalive_s, properties=props)
        client.loop_start()
        self._client = client

    def wait_subscribed(self, timeout: float) -> bool:
        """Whether the subscriptions were granted within ``timeout`` seconds."""
        return self._subscribed.wait(timeout)

    def stop(self) -> None:
        """Stop taking messages, write what is queued, disconnect."""
        self._stop.set()
        if self._writer is not None:
            self._writer.join(timeout=30)
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()
        self._store.close()

    def _on_connect(
        self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        if reason.is_failure:
            log.error("broker refused the ingest connection: %s", reason)
            return
        prefix, group = self._mqtt_cfg.prefix, self._cfg.ingest_group
        opts = SubscribeOptions(qos=1)
        topics = [(f"{prefix}/+/status", opts)]
        topics += [(f"$share/{group}/{prefix}/+/{kind}", opts) for kind in SHARED_KINDS]
        client.on_subscribe = lambda *_args: self._subscribed.set()
        client.subscribe(topics)
        log.info("ingest connected to %s:%s", self._mqtt_cfg.host, self._mqtt_cfg.port)

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.qos == 0 and self._queue.qsize() >= RECEIVE_MAXIMUM:
            self.counters.add("dropped", 1)
            if self._drop_log.due():
                log.warning("dropped QoS 0 messages: ingest is %d messages behind", RECEIVE_MAXIMUM)
            return
        self._queue.put(_Raw(msg.topic, bytes(msg.payload), msg.mid, msg.qos, time.monotonic()))

    def _next_batch(self) -> list[_Raw]:
        try:
            first = self._queue.get(timeout=self._cfg.batch_interval_s)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self._cfg.batch_interval_s
        while len(batch) < self._cfg.batch_size:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    batch.append(self._queue.get(timeout=min(left, 0.02)))
                except queue.Empty:
                    continue
        return batch

    def _write_loop(self) -> None:
        seen: dict[str, float] = {}
        last_touch = time.monotonic()
        since_trim = 0
        while (written := self._write_next(seen)) is not None:
            since_trim += written
            # Here, not in _write_next: the last batch and what was made of it are freed.
            if since_trim >= TRIM_AFTER_BYTES and self._queue.empty():
                release_free_memory()
                since_trim = 0
            if seen and time.monotonic() - last_touch >= TOUCH_INTERVAL_S:
                try:
                    self._store.touch(seen)
                    seen.clear()
                except SQLAlchemyError:
                    log.exception("updating last_seen failed")
                last_touch = time.monotonic()

    def _write_next(self, seen: dict[str, float]) -> int | None:
        """Store and acknowledge the next batch (waiting up to a batch interval for one),
        noting in ``seen`` when its devices were last heard of; its payload bytes, or None
        when ingest is stopping."""
        batch = self._next_batch()
        if not batch and self._stop.is_set() and self._queue.empty():
            return None
        messages = self._validate(batch)
        while messages:
            try:
                result = self._store_batch(messages)
            except UNAVAILABLE:  # the database is down, locked or full: again later
                self.counters.add("write_errors", 1)
                log.exception("writing %d messages failed; trying again", len(messages))
                if self._stop.wait(RETRY_DELAY_S):
                    return None  # stopping with the database down: unacknowledged, not lost
                continue
            self.counters.add("stored", result.stored)
            self.counters.add("duplicates", result.duplicates)
            now = time.time()
            self.counters.lag_s.value = time.monotonic() - min(r.received for r in batch)
            self.counters.age_s.value = max(0.0, max(now - m.ts for _, m in messages))
            for device, m in messages:
                # Never ahead of this clock: a device whose own is wrong would otherwise
                # look alive until then.
                seen[device] = max(seen.get(device, 0.0), min(m.ts, now))
            break
        self._ack(batch)
        return sum(len(raw.payload) for raw in batch)

    def _store_batch(self, messages: list[tuple[str, Payload]]) -> BatchResult:
        """Store a batch; where that fails, its messages one by one, rejecting only those
        that fail alone (a value the database refuses: too long, out of range; or one the
        store cannot handle), never the whole batch and never ingest itself. Raises only
        :data:`UNAVAILABLE`, for the batch to be tried again."""
        try:
            return self._store.write(messages)
        except UNAVAILABLE:
            raise
        except Exception:
            return self._write_singly(messages)

    def _write_singly(self, messages: list[tuple[str, Payload]]) -> BatchResult:
        stored = duplicates = 0
        for message in messages:
            try:
                one = self._store.write([message])
            except UNAVAILABLE:
                raise  # the database itself: the batch is tried again
            except Exception as exc:
                self.counters.add("rejected", 1)
                log.warning(
                    "rejected a message from %s that the database or the store refuses: %s",
                    message[0],
                    getattr(exc, "orig", None) or repr(exc),
                )
                continue
            stored += one.stored
            duplicates += one.duplicates
        return BatchResult(stored=stored, duplicates=duplicates)

    def _validate(self, batch: list[_Raw]) -> list[tuple[str, Payload]]:
        self.counters.add("received", len(batch))
        messages: list[tuple[str, Payload]] = []
        for raw in batch:
            try:
                messages.append(decode(self._mqtt_cfg.prefix, raw.topic, raw.payload))
            except Rejected as exc:
                self.counters.add("rejected", 1)
                if self._reject_log.due():
                    log.warning("rejected a message: %s", exc)
        return messages

    def _ack(self, batch: list[_Raw]) -> None:
        client = self._client
        if client is None:
            return
        for raw in batch:
            if raw.qos > 0:
                client.ack(raw.mid, raw.qos)


def run_ingest_process(
    mqtt_cfg: MqttConfig, server_cfg: ServerConfig, counters: Counters, stop: Any, ready: Any
) -> None:
    """Entry point of one ingest process (``server.ingest_processes`` > 1)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    ingest = Ingest(mqtt_cfg, server_cfg, counters)
    ingest.start()
    if ingest.wait_subscribed(30):
        ready.set()
    try:
        stop.wait()
    finally:
        ingest.stop()
