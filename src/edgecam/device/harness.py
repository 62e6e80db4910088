"""A whole device run from outside: ``edgecam run`` as a subprocess, and a listener on its
MQTT topics with the fleet's credentials. What the demo, the tests and the benchmarks use
to run the device as a user would and check what it does."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from edgecam.device.broker import LocalBroker
from edgecam.protocol import Command

__all__ = ["Device", "Listener", "write_private_yaml"]

Match = Callable[[str, dict[str, Any]], bool]
Printer = Callable[[str, dict[str, Any]], None]


def write_private_yaml(path: Path, data: dict[str, Any]) -> None:
    """``data`` as YAML in a file only its owner can read (it holds secrets)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)


class Listener:
    """Every message under the device's topics, kept in arrival order."""

    def __init__(
        self,
        broker: LocalBroker,
        prefix: str,
        device: str,
        persistent: bool = False,
        printer: Printer | None = None,
    ) -> None:
        self.prefix = f"{prefix}/{device}/"
        self.printer = printer
        # A persistent session: the broker keeps QoS 1 messages for it while it is away.
        self.persistent = persistent
        self.client_id = f"test-fleet-{device}-{time.monotonic_ns()}"
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self.raw: list[tuple[str, bytes]] = []
        self._cond = threading.Condition()
        self.broker = broker
        self._client: mqtt.Client | None = None
        self.connect()

    def connect(self) -> None:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=not self.persistent,
        )
        user = self.broker.server_user
        client.username_pw_set(user, self.broker.credentials[user])
        client.reconnect_delay_set(1, 2)  # back soon after the broker (paho: up to 120 s)
        client.on_message = self._on_message
        client.on_connect = lambda c, *_: c.subscribe(f"{self.prefix}#", qos=1)
        client.connect("127.0.0.1", self.broker.port)
        client.loop_start()
        self._client = client
        self.wait_connected()

    def wait_connected(self, timeout: float = 10) -> None:
        assert self._client is not None
        end = time.monotonic() + timeout
        while not self._client.is_connected():
            assert time.monotonic() < end, "the listener did not connect"
            time.sleep(0.05)
        time.sleep(0.2)  # the subscription

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        kind = msg.topic.removeprefix(self.prefix)
        received = time.time()
        with self._cond:
            self.raw.append((kind, bytes(msg.payload)))
            with contextlib.suppress(ValueError):
                data = json.loads(msg.payload)
                if isinstance(data, dict):
                    data["_received"] = received
                    self.messages.append((kind, data))
                    if self.printer is not None:
                        self.printer(kind, data)
            self._cond.notify_all()

    def of(self, kind: str) -> list[dict[str, Any]]:
        with self._cond:
            return [d for k, d in self.messages if k == kind]

    def wait(self, what: str, match: Match, timeout: float, after: int = 0) -> dict[str, Any]:
        """The first message (from index ``after``) that ``match``es."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                for kind, data in self.messages[after:]:
                    if match(kind, data):
                        return data
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {what} within {timeout:.0f} s")
                self._cond.wait(left)

    def mark(self) -> int:
        with self._cond:
            return len(self.messages)

    def publish(self, name: str, payload: bytes | str) -> None:
        assert self._client is not None
        self._client.publish(name, payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None


class Device:
    """``edgecam run --config FILE`` with a listener on its topics."""

    def __init__(
        self,
        folder: Path,
        config: dict[str, Any],
        broker: LocalBroker,
        persistent_listener: bool = False,
        printer: Printer | None = None,
        log: Path | None = None,
        config_name: str = "device.yaml",
    ) -> None:
        self.folder = folder
        self.config = config
        self.path = folder / config_name
        write_private_yaml(self.path, config)
        self.prefix = config.get("mqtt", {}).get("prefix", "edgecam")
        self.name = config["device"]
        self.listener = Listener(broker, self.prefix, self.name, persistent_listener, printer)
        self.log_path = log or folder / "device.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def topic(self, kind: str) -> str:
        return f"{self.prefix}/{self.name}/{kind}"

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgecam.cli", "run", "--config", str(self.path)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_running(self, timeout: float = 90, after: int = 0) -> dict[str, Any]:
        return self.listener.wait(
            "device with every worker running",
            lambda k, d: (
                k == "status"
                and d["state"] == "online"
                and all(w["state"] in ("running", "disabled") for w in d["workers"])
            ),
            timeout,
            after,
        )

    def command(self, name: str, timeout: float = 30, **args: Any) -> dict[str, Any]:
        cmd = Command(name=name, args=args)
        self.listener.publish(self.topic("cmd"), cmd.model_dump_json())
        return self.listener.wait(
            f"result of {name}",
            lambda k, d: k == "cmd/result" and d["command_id"] == cmd.id,
            timeout,
        )

    def workers(self) -> dict[str, dict[str, Any]]:
        status = self.command("status")
        assert status["ok"], status
        return {
            w["name"] + (f"/{w['camera']}" if w.get("camera") else ""): w
            for w in status["data"]["workers"]
        }

    def descendants(self) -> list[psutil.Process]:
        assert self.proc is not None
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []

    def stop(self, timeout: float = 40) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")
