"""Simulated devices that speak the real protocol over a real broker, for tests and benches.

A :class:`SimDevice` connects like a device does (retained ``online`` status, ``offline`` as
its last will), publishes stats, alerts and clip messages built with the shared models, and
answers commands on ``cmd`` with a result on ``cmd/result``.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt

from edgecam.protocol import (
    COMMAND_NAMES,
    Alert,
    ClipReady,
    Command,
    CommandResult,
    Payload,
    Stats,
    Status,
    WorkerState,
    topic,
)

__all__ = ["SimDevice", "make_stats"]

log = logging.getLogger(__name__)


def make_stats(device: str, seq: int, at: float, interval: float = 1.0) -> Stats:
    """A plausible stats message of ``device`` for the interval ending at ``at``."""
    # Slow waves, as people come and go, so that a chart of them shows something.
    mask = round(3 + 2 * math.sin(at / 600))
    no_mask = round(1.5 + 1.5 * math.sin(at / 900 + 1))
    undecided = seq % 2
    return Stats(
        device=device,
        camera="main",
        seq=seq,
        start=at - interval,
        end=at,
        ts=at,
        counts={"mask": mask, "no_mask": no_mask, "undecided": undecided},
        people=mask + no_mask + undecided,
        peak=max(mask, no_mask),
        fps_in=30.0,
        fps_out=30.0,
        detections_per_s=10.0,
    )


def _workers(now: float) -> list[WorkerState]:
    return [
        WorkerState(name="inference", camera="main", state="running", pid=101, since=now),
        WorkerState(name="streaming", camera="main", state="running", pid=102, since=now),
        WorkerState(name="recorder", camera="main", state="running", pid=103, since=now),
        WorkerState(name="fileserver", state="running", pid=104, since=now),
    ]


class SimDevice:
    """One simulated device on its own MQTT connection."""

    def __init__(
        self, name: str, host: str, port: int, prefix: str = "edgecam", *, answer: bool = True
    ) -> None:
        self.name = name
        self.prefix = prefix
        self.started = time.time()
        self.seq = 0
        self.commands: list[Command] = []
        self._answer = answer
        self._connected = threading.Event()
        self._host, self._port = host, port
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"sim-{name}-{secrets.token_hex(3)}",
            protocol=mqtt.MQTTv5,
        )
        will = Status(device=name, state="offline", started=self.started)
        self._client.will_set(
            topic(prefix, name, "status"), will.model_dump_json(), qos=1, retain=True
        )
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message

    def start(self, timeout: float = 10.0) -> SimDevice:
        self._client.connect(self._host, self._port, keepalive=5)
        self._client.loop_start()
        if not self._connected.wait(timeout):
            raise TimeoutError(f"{self.name}: no connection to the broker")
        return self

    def stop(self, *, clean: bool = True) -> None:
        """Disconnect: cleanly (publishing ``offline``) or as a crash (the will fires)."""
        if clean:
            self.publish(Status(device=self.name, state="offline", started=self.started), True)
            self._client.disconnect()
        else:
            # Closing the socket without DISCONNECT makes the broker publish the will.
            sock = self._client.socket()
            if sock is not None:
                sock.close()
        self._client.loop_stop()

    def status(self) -> Status:
        now = time.time()
        return Status(
            device=self.name,
            state="online",
            version="0.1.0",
            profile="mask",
            cameras=["main"],
            workers=_workers(now),
            started=self.started,
            rules={"no_mask": {"threshold": 1}},
            outbox=0,
            outbox_dropped=0,
            broker="connected",
        )

    def publish(self, msg: Payload, retain: bool = False) -> mqtt.MQTTMessageInfo:
        kinds: dict[type[Payload], Any] = {
            Status: "status",
            Stats: "stats",
            Alert: "alerts",
            ClipReady: "clips",
            CommandResult: "cmd/result",
        }
        return self._client.publish(
            topic(self.prefix, self.name, kinds[type(msg)]),
            msg.model_dump_json(),
            qos=1,
            retain=retain,
        )

    def publish_raw(self, kind: str, payload: bytes | str, qos: int = 1) -> mqtt.MQTTMessageInfo:
        return self._client.publish(f"{self.prefix}/{self.name}/{kind}", payload, qos=qos)

    def send_stats(self, at: float | None = None) -> Stats:
        msg = make_stats(self.name, self.seq, at if at is not None else time.time())
        self.seq += 1
        self.publish(msg).wait_for_publish(5)
        return msg

    def _on_connect(
        self, client: mqtt.Client, _userdata: Any, _flags: Any, _reason: Any, _props: Any
    ) -> None:
        client.subscribe(topic(self.prefix, self.name, "cmd"), qos=1)
        self.publish(self.status(), retain=True)
        self._connected.set()

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            cmd = Command.model_validate_json(msg.payload)
        except ValueError:
            log.warning("%s: malformed command", self.name)
            return
        self.commands.append(cmd)
        if not self._answer:
            return
        if cmd.name in COMMAND_NAMES:
            result = CommandResult(command_id=cmd.id, ok=True, data={"done": cmd.name})
        else:
            result = CommandResult(command_id=cmd.id, ok=False, error=f"unknown {cmd.name!r}")
        self.publish(result)
