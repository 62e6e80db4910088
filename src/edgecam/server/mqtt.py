"""MQTT 5 clients of the fleet server, made from the ``mqtt:`` config section."""

from __future__ import annotations

import os
import secrets

import paho.mqtt.client as mqtt

from edgecam.config import MqttConfig
from edgecam.errors import EdgecamError

__all__ = ["make_client"]


def make_client(cfg: MqttConfig, role: str, *, manual_ack: bool = False) -> mqtt.Client:
    """A paho MQTT 5 client for ``role`` (ingest, commands, ...), not yet connected."""
    if cfg.host is None:
        raise EdgecamError("mqtt.host is not set: the fleet server needs a broker")
    base = cfg.client_id or "edgecam-server"
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"{base}-{role}-{os.getpid()}-{secrets.token_hex(3)}",
        protocol=mqtt.MQTTv5,
        manual_ack=manual_ack,
    )
    if cfg.username is not None:
        password = cfg.password.get_secret_value() if cfg.password else None
        client.username_pw_set(cfg.username, password)
    if cfg.tls:
        client.tls_set(ca_certs=str(cfg.ca_file) if cfg.ca_file else None)
    client.reconnect_delay_set(max(1, int(cfg.reconnect_min_s)), max(1, int(cfg.reconnect_max_s)))
    return client
