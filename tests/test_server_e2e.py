"""The real device (`edgecam run` on a bundled clip) reporting to the fleet server through a
Mosquitto with per-device credentials and ACLs, end to end."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest
from server_support import FleetServer, server_settings, wait_until

from edgecam.device.broker import LocalBroker
from edgecam.device.demo_live import demo_config
from edgecam.device.harness import Device

pytestmark = pytest.mark.timeout(300)


def test_real_device_reports_to_the_server(tmp_path: Path) -> None:
    with LocalBroker(tmp_path / "broker", ["e2ecam"]) as broker:
        config = demo_config(tmp_path / "device", broker, token="e2e-token", device="e2ecam")
        config["stats"] = {"interval_s": 2}
        prefix = config.get("mqtt", {}).get("prefix", "edgecam")
        user = broker.server_user
        settings = server_settings(
            f"sqlite:///{tmp_path / 'server.db'}",
            broker.port,
            prefix,
            tmp_path,
            mqtt={"username": user, "password": broker.credentials[user]},
        )
        fleet = FleetServer(settings)
        (tmp_path / "device").mkdir(exist_ok=True)
        device = Device(tmp_path / "device", config, broker)
        device.start()
        try:
            device.wait_running()

            def online() -> bool:
                found = fleet.http.get("/api/devices").json()
                return bool(found) and found[0]["online"] and len(found[0]["workers"]) >= 4

            wait_until(online, timeout=30)
            seen = fleet.http.get("/api/devices").json()[0]
            assert seen["name"] == "e2ecam" and seen["cameras"] == ["main"]
            wait_until(lambda: len(fleet.http.get("/api/devices/e2ecam/stats").json()) >= 2, 30)
            seqs = [s["seq"] for s in fleet.http.get("/api/devices/e2ecam/stats").json()]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))

            sent = fleet.http.post(
                "/api/devices/e2ecam/commands",
                json={"name": "save_clip", "args": {"reason": "e2e", "pre": 1, "post": 1}},
            )
            assert sent.status_code == 202, sent.text
            command = f"/api/commands/{sent.json()['id']}"
            wait_until(lambda: fleet.http.get(command).json()["result"], timeout=30)
            assert fleet.http.get(command).json()["result"]["ok"] is True

            def clip() -> dict[str, object] | None:
                clips = [c for c in fleet.http.get("/api/clips").json() if c["play_url"]]
                return clips[0] if clips else None

            wait_until(clip, timeout=60)
            found = clip()
            assert found is not None
            # Not uploaded: the server sends the browser to the device's signed link.
            link = fleet.http.get(str(found["play_url"]), follow_redirects=False)
            assert link.status_code == 307
            body = httpx.get(link.headers["location"], timeout=30).content
            assert hashlib.sha256(body).hexdigest() == found["sha256"]

            assert device.stop() == 0, device.log()[-3000:]
            wait_until(lambda: not fleet.http.get("/api/devices").json()[0]["online"], 15)
        finally:
            if device.proc is not None and device.proc.poll() is None:
                device.stop()
            device.listener.close()
            fleet.close()
