"""The device's MQTT link: retained status with a last will, the outbox sent in order with
QoS 1, and commands received.

paho-mqtt runs its network loop in its own thread and reconnects with backoff. A sender
thread publishes the outbox's oldest message, waits for the broker's acknowledgement, and
only then removes it and sends the next: messages arrive in the order they were made, and
none is lost while the broker is away (they wait on disk).
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgecam.config import MqttConfig
from edgecam.device.outbox import Outbox
from edgecam.protocol import MAX_PAYLOAD_BYTES, Status, topic

__all__ = ["MqttLink"]

log = logging.getLogger(__name__)

_ACK_TIMEOUT_S = 10.0
_BATCH = 100

CommandCallback = Callable[[str, bytes], None]


class MqttLink:
    """One device's connection to the broker, with an explicit life (``start``/``stop``).

    ``on_message(topic, payload)`` is called (in paho's thread; keep it short) for every
    message on the subscribed topics: the device's ``cmd`` and any ``extra_topics``.
    """

    def __init__(
        self,
        config: MqttConfig,
        device: str,
        outbox: Outbox,
        on_message: CommandCallback,
        offline: Callable[[], Status],
        extra_topics: tuple[str, ...] = (),
    ) -> None:
        if config.host is None:
            raise ValueError("MqttLink needs mqtt.host")
        self.config = config
        self.device = device
        self.outbox = outbox
        self._on_message_cb = on_message
        self._topics = (topic(config.prefix, device, "cmd"), *extra_topics)
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._said_unreachable = False
        self._on_connect_hooks: list[Callable[[], None]] = []
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=config.client_id or f"edgecam-{device}",
            protocol=mqtt.MQTTv311,
        )
        if config.username is not None:
            client.username_pw_set(
                config.username,
                config.password.get_secret_value() if config.password is not None else None,
            )
        if config.tls:
            ca = str(config.ca_file) if config.ca_file is not None else None
            client.tls_set(ca_certs=ca, cert_reqs=ssl.CERT_REQUIRED)
        self._offline = offline
        self._client = client
        self._set_will()
        client.reconnect_delay_set(
            max(1, int(config.reconnect_min_s)), max(1, int(config.reconnect_max_s))
        )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_connect_fail = self._on_connect_fail
        self._sender = threading.Thread(target=self._send_loop, name="mqtt-sender", daemon=True)

    def _set_will(self) -> None:
        """The last will for the next connection: a new message (its own id) each time,
        so that a server storing each message once stores every time the device went away."""
        self._client.will_set(
            topic(self.config.prefix, self.device, "status"),
            self._offline().model_dump_json().encode(),
            qos=1,
            retain=True,
        )

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def on_connect(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` (in paho's thread) after every (re)connection."""
        self._on_connect_hooks.append(hook)

    def start(self) -> None:
        cfg = self.config
        assert cfg.host is not None
        log.info("MQTT: connecting to %s:%d as %s", cfg.host, cfg.port, self._client._client_id)
        self._client.connect_async(cfg.host, cfg.port, keepalive=cfg.keepalive_s)
        self._client.loop_start()
        self._sender.start()

    def stop(self, final_status: Status | None = None) -> None:
        """Publish ``final_status`` (retained) if connected, then disconnect cleanly."""
        self._stopping.set()
        self.outbox.added.set()
        self._sender.join(timeout=_ACK_TIMEOUT_S + 1)
        if final_status is not None and self.connected:
            info = self._client.publish(
                topic(self.config.prefix, self.device, "status"),
                final_status.model_dump_json().encode(),
                qos=1,
                retain=True,
            )
            info.wait_for_publish(timeout=2)
        self._client.disconnect()
        self._client.loop_stop()

    def publish_now(self, name: str, payload: bytes, retain: bool = False) -> None:
        """Publish at once, not through the outbox (state that only its latest value
        matters for: status, Home Assistant discovery). Lost when not connected."""
        if self.connected:
            self._client.publish(name, payload, qos=1, retain=retain)

    # -- paho callbacks (paho's thread) ------------------------------------------------

    def _on_connect(
        self, client: mqtt.Client, _ud: object, _flags: object, rc: object, *_: object
    ) -> None:
        if getattr(rc, "is_failure", False):
            self._report_unreachable(f"refused: {rc}")
            return
        log.info("MQTT: connected to %s:%d", self.config.host, self.config.port)
        self._said_unreachable = False
        for name in self._topics:
            client.subscribe(name, qos=1)
        for hook in self._on_connect_hooks:
            try:
                hook()
            except Exception:
                log.exception("MQTT on-connect hook failed")
        self._connected.set()
        self.outbox.added.set()
        self._set_will()  # sent with the next CONNECT

    def _on_disconnect(
        self, _client: mqtt.Client, _ud: object, _flags: object, rc: object, *_: object
    ) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if was and not self._stopping.is_set():
            log.warning("MQTT: disconnected (%s); messages wait in the outbox", rc)

    def _on_connect_fail(self, _client: mqtt.Client, _ud: object) -> None:
        self._report_unreachable("unreachable")

    def _report_unreachable(self, why: str) -> None:
        if not self._said_unreachable:  # once per outage, not every retry
            self._said_unreachable = True
            log.warning(
                "MQTT: broker %s:%d %s; retrying with backoff, messages wait in the outbox (%s)",
                self.config.host,
                self.config.port,
                why,
                self.outbox.path,
            )

    def _on_message(self, _client: mqtt.Client, _ud: object, msg: mqtt.MQTTMessage) -> None:
        if len(msg.payload) > MAX_PAYLOAD_BYTES:
            log.warning(
                "MQTT: message on %s of %d bytes refused (limit %d)",
                msg.topic,
                len(msg.payload),
                MAX_PAYLOAD_BYTES,
            )
            return
        try:
            self._on_message_cb(msg.topic, bytes(msg.payload))
        except Exception:
            log.exception("MQTT: handling a message on %s failed", msg.topic)

    # -- sender thread -------------------------------------------------------------------

    def _send_loop(self) -> None:
        while not self._stopping.is_set():
            if not self._connected.wait(0.5):
                continue
            batch = self.outbox.peek(_BATCH)
            if not batch:
                self.outbox.added.wait(0.5)
                self.outbox.added.clear()
                continue
            for message in batch:
                if self._stopping.is_set() or not self._connected.is_set():
                    break
                info = self._client.publish(
                    message.topic, message.payload, qos=1, retain=message.retain
                )
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    break  # not connected after all: wait for the reconnection
                try:
                    info.wait_for_publish(timeout=_ACK_TIMEOUT_S)
                except (RuntimeError, ValueError):
                    break
                if not info.is_published():
                    break  # no acknowledgement: sent again after reconnecting
                self.outbox.ack(message.id)
