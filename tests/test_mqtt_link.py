"""The device's MQTT link alone, against real Mosquitto brokers: TLS, credentials, order."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from conftest import free_port
from paho.mqtt.enums import CallbackAPIVersion

from edgecam.config import MqttConfig, Settings
from edgecam.device.mqtt import MqttLink
from edgecam.device.outbox import Outbox
from edgecam.device.supervisor import Supervisor
from edgecam.protocol import Status


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=edgecam test CA",
        "-keyout",
        str(d / "ca.key"),
        "-out",
        str(d / "ca.crt"),
    )
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        str(d / "server.key"),
        "-out",
        str(d / "server.csr"),
    )
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        str(d / "server.csr"),
        "-CA",
        str(d / "ca.crt"),
        "-CAkey",
        str(d / "ca.key"),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        str(d / "ext.cnf"),
        "-out",
        str(d / "server.crt"),
    )
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=some other CA",
        "-keyout",
        str(d / "other.key"),
        "-out",
        str(d / "other.crt"),
    )
    return d  # fmt: skip


@pytest.fixture(scope="module")
def tls_broker(certs: Path) -> Iterator[int]:
    port = free_port()
    conf = certs / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\n"
        f"cafile {certs / 'ca.crt'}\ncertfile {certs / 'server.crt'}\n"
        f"keyfile {certs / 'server.key'}\nuser root\n"
    )
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while subprocess.run(["ss", "-ltn", f"sport = :{port}"], capture_output=True,
                             text=True).stdout.count("LISTEN") == 0:  # fmt: skip
            assert proc.poll() is None and time.monotonic() < deadline, "mosquitto did not start"
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(5)
        if proc.stderr:
            proc.stderr.close()


def _link(port: int, tmp_path: Path, ca: Path) -> tuple[MqttLink, Outbox]:
    cfg = MqttConfig(host="127.0.0.1", port=port, tls=True, ca_file=ca, reconnect_max_s=1)
    outbox = Outbox(tmp_path / "o.sqlite", 100, 10**6)
    link = MqttLink(
        cfg, "tlsdev", outbox, lambda _t, _p: None, lambda: Status(device="tlsdev", state="offline")
    )
    return link, outbox


def test_tls_link_delivers_in_order(tls_broker: int, certs: Path, tmp_path: Path) -> None:
    got: list[bytes] = []
    done = threading.Event()
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="tls-sub")
    sub.tls_set(ca_certs=str(certs / "ca.crt"))

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        got.append(msg.payload)
        if len(got) == 20:
            done.set()

    sub.on_message = on_message
    sub.connect("127.0.0.1", tls_broker)
    sub.subscribe("edgecam/tlsdev/stats", qos=1)
    sub.loop_start()
    link, outbox = _link(tls_broker, tmp_path, certs / "ca.crt")
    try:
        for i in range(20):
            outbox.put("edgecam/tlsdev/stats", f"{i}".encode())
        link.start()
        assert done.wait(20), got
        assert got == [f"{i}".encode() for i in range(20)]
        deadline = time.monotonic() + 5
        while len(outbox) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(outbox) == 0  # acknowledged, so forgotten
    finally:
        link.stop()
        sub.loop_stop()
        sub.disconnect()


# paho-mqtt leaves the socket of a failed TLS handshake to the garbage collector.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_tls_link_refuses_a_broker_it_cannot_verify(
    tls_broker: int, certs: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    link, outbox = _link(tls_broker, tmp_path, certs / "other.crt")
    outbox.put("edgecam/tlsdev/stats", b"secret")
    try:
        link.start()
        time.sleep(3)
        assert not link.connected and len(outbox) == 1  # kept for a broker it can trust
    finally:
        link.stop()
    unreachable = [r for r in caplog.records if "broker" in r.getMessage()]
    assert len(unreachable) == 1  # said once, not at every retry


def test_a_disabled_camera_runs_no_workers() -> None:
    settings = Settings(cameras=[{"name": "a"}, {"name": "b", "enabled": False}])
    children = Supervisor(settings, None, None).children
    # One inference worker runs every enabled camera; each camera has its recorder.
    assert children["inference"].enabled and children["recorder/a"].enabled
    assert not children["recorder/b"].enabled and children["recorder/b"].state == "disabled"
    assert "inference/a" not in children and "inference/b" not in children
    none = Settings(cameras=[{"name": "a", "enabled": False}])
    assert Supervisor(none, None, None).children["inference"].state == "disabled"
