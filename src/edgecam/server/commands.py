"""Commands to devices: validated against the shared argument models, then published on
``PREFIX/DEVICE/cmd`` with QoS 1."""

from __future__ import annotations

import logging
import threading
from typing import Any

from pydantic import BaseModel, ValidationError

from edgecam.config import MqttConfig
from edgecam.errors import EdgecamError
from edgecam.protocol import (
    COMMAND_NAMES,
    MAX_PAYLOAD_BYTES,
    Command,
    SaveClipArgs,
    SetRuleArgs,
    WorkerArgs,
    topic,
)
from edgecam.server.mqtt import make_client

__all__ = ["ARGS", "CommandPublisher", "check_command"]

log = logging.getLogger(__name__)

# Command name -> the model its args must fit (None: no arguments).
ARGS: dict[str, type[BaseModel] | None] = {
    "save_clip": SaveClipArgs,
    "streaming_start": None,
    "streaming_stop": None,
    "worker_restart": WorkerArgs,
    "worker_enable": WorkerArgs,
    "worker_disable": WorkerArgs,
    "status": None,
    "set_rule": SetRuleArgs,
}
assert set(ARGS) == set(COMMAND_NAMES)


def check_command(name: str, args: dict[str, Any]) -> dict[str, Any]:
    """``args`` made canonical for command ``name``; ValueError saying what is wrong."""
    if name not in ARGS:
        raise ValueError(f"unknown command {name!r}; known: {', '.join(COMMAND_NAMES)}")
    model = ARGS[name]
    if model is None:
        if args:
            raise ValueError(f"{name} takes no arguments")
        return {}
    try:
        canonical = model.model_validate(args).model_dump(exclude_defaults=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "args"
        raise ValueError(f"{name}: {where}: {first['msg']}") from exc
    # The device refuses, unread, a message over MAX_PAYLOAD_BYTES: sent, it would wait for
    # an answer for ever.
    size = len(Command(name=name, args=canonical).model_dump_json())
    if size > MAX_PAYLOAD_BYTES:
        raise ValueError(f"{name}: the command is {size} bytes; at most {MAX_PAYLOAD_BYTES}")
    return canonical


class CommandPublisher:
    """One MQTT connection that publishes commands; start() and stop() bound its life."""

    def __init__(self, cfg: MqttConfig) -> None:
        self._cfg = cfg
        self._client = make_client(cfg, "commands")
        self._connected = threading.Event()
        self._client.on_connect = lambda *_a: self._connected.set()
        self._client.on_disconnect = lambda *_a: self._connected.clear()

    def start(self) -> None:
        assert self._cfg.host is not None
        self._client.connect_async(self._cfg.host, self._cfg.port, self._cfg.keepalive_s)
        self._client.loop_start()

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def publish(self, device: str, command: Command, timeout: float = 5.0) -> None:
        """Publish ``command`` and wait for the broker's acknowledgement."""
        if not self._connected.wait(timeout):
            raise EdgecamError("the MQTT broker is not reachable; the command was not sent")
        info = self._client.publish(
            topic(self._cfg.prefix, device, "cmd"), command.model_dump_json(), qos=1
        )
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise EdgecamError("the broker did not acknowledge the command in time")
