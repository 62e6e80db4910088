"""Home Assistant MQTT discovery: the device appears in Home Assistant with no YAML.

Per camera: sensors for people (and, in the mask profile, with / without a mask) seen in the
last statistics interval, a binary sensor for an active alert, a button that saves a clip
and a switch for streaming (device-wide: it starts or stops every camera's stream). The
entities read one retained JSON state message per camera and are available while the
device's retained status says ``online``.
"""

from __future__ import annotations

import json
from typing import Any

import edgecam
from edgecam.config import Settings
from edgecam.protocol import Command, Stats, topic

__all__ = ["command_for", "command_topics", "discovery_messages", "state_message", "state_topic"]

_PRESS = "PRESS"


def _base(settings: Settings) -> str:
    return f"{settings.mqtt.prefix}/{settings.device}/ha"


def state_topic(settings: Settings, camera: str) -> str:
    return f"{_base(settings)}/{camera}/state"


def command_topics(settings: Settings) -> tuple[str, ...]:
    """Topics the device subscribes to for Home Assistant's buttons and switches."""
    return (f"{_base(settings)}/+/save_clip", f"{_base(settings)}/+/streaming/set")


def discovery_messages(settings: Settings) -> list[tuple[str, bytes]]:
    """(topic, retained config payload) of every entity of every camera."""
    device = settings.device
    dp = settings.mqtt.discovery_prefix
    common: dict[str, Any] = {
        "availability_topic": topic(settings.mqtt.prefix, device, "status"),
        "availability_template": "{{ value_json.state }}",
        "payload_available": "online",
        "payload_not_available": "offline",
        "device": {
            "identifiers": [f"edgecam_{device}"],
            "name": device,
            "manufacturer": "edgecam",
            "model": "edgecam smart camera",
            "sw_version": edgecam.__version__,
        },
    }
    counts = ["people"] + (["mask", "no_mask"] if settings.vision.profile == "mask" else [])
    out: list[tuple[str, bytes]] = []
    for cam in settings.cameras:
        state = state_topic(settings, cam.name)
        entities: list[tuple[str, str, dict[str, Any]]] = [
            (
                "sensor",
                name,
                {
                    "name": f"{cam.name} {name.replace('_', ' ')}",
                    "state_topic": state,
                    "value_template": f"{{{{ value_json.{name} }}}}",
                    "unit_of_measurement": "people",
                    "state_class": "measurement",
                },
            )
            for name in counts
        ]
        entities += [
            (
                "binary_sensor",
                "alert",
                {
                    "name": f"{cam.name} alert",
                    "state_topic": state,
                    "value_template": "{{ value_json.alert }}",
                    "payload_on": "ON",
                    "payload_off": "OFF",
                    "device_class": "problem",
                },
            ),
            (
                "button",
                "save_clip",
                {
                    "name": f"{cam.name} save clip",
                    "command_topic": f"{_base(settings)}/{cam.name}/save_clip",
                    "payload_press": _PRESS,
                },
            ),
            (
                "switch",
                "streaming",
                {
                    "name": f"{cam.name} streaming",
                    "state_topic": state,
                    "value_template": "{{ value_json.streaming }}",
                    "command_topic": f"{_base(settings)}/{cam.name}/streaming/set",
                    "payload_on": "ON",
                    "payload_off": "OFF",
                },
            ),
        ]
        for component, object_id, config in entities:
            uid = f"edgecam_{device}_{cam.name}_{object_id}"
            payload = {**config, **common, "unique_id": uid, "object_id": uid}
            name = f"{dp}/{component}/{device}/{cam.name}_{object_id}/config"
            out.append((name, json.dumps(payload).encode()))
    return out


def state_message(
    settings: Settings,
    camera: str,
    stats: Stats | None,
    alert: bool,
    streaming: bool | None,
) -> tuple[str, bytes]:
    """The retained state of ``camera``'s entities."""
    counts = stats.counts if stats is not None else {}
    state = {
        "people": stats.people if stats is not None else 0,
        "mask": counts.get("mask", 0),
        "no_mask": counts.get("no_mask", 0),
        "alert": "ON" if alert else "OFF",
        "streaming": "ON" if streaming else "OFF",
    }
    return state_topic(settings, camera), json.dumps(state).encode()


def command_for(settings: Settings, name: str, payload: bytes) -> Command | None:
    """The device command a button press or switch change stands for (None: not one)."""
    head = f"{_base(settings)}/"
    if not name.startswith(head):
        return None
    camera, _, action = name[len(head) :].partition("/")
    if camera not in {c.name for c in settings.cameras}:
        return None
    text = payload.decode("utf-8", "replace").strip().upper()
    if action == "save_clip" and text == _PRESS:
        return Command(name="save_clip", args={"camera": camera, "reason": "homeassistant"})
    if action == "streaming/set" and text in ("ON", "OFF"):
        return Command(name="streaming_start" if text == "ON" else "streaming_stop")
    return None
