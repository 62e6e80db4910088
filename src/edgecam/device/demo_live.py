"""The live half of ``edgecam demo``: the whole device, as a user would run it.

A Mosquitto of its own (one MQTT user per device, an ACL, from ``edgecam broker-config``);
``edgecam run`` on the pedestrian clip played as a camera, with an occupancy rule that the
clip trips; the MQTT messages printed as they arrive. Then, checked rather than assumed: the
RTSP stream decodes, the alert's clip downloads through its signed link with the sha256 the
device announced, a command sent over MQTT gets its result, and SIGTERM stops every process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgecam.config import Settings, load_settings
from edgecam.device.broker import LocalBroker
from edgecam.device.harness import Device, write_private_yaml
from edgecam.errors import EdgecamError
from edgecam.ports import free_port, free_udp_pair

__all__ = ["run_live_demo"]

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[3]
MEDIA = ROOT / "media"
_DEVICE = "demo-cam"


def _rtsp_frames(url: str, count: int = 30, timeout: float = 15.0) -> tuple[int, str]:
    """Decode ``count`` frames from ``url`` with GStreamer's RTSP client; (frames, size)."""
    from edgecam.media.gst import Gst, init

    init()
    pipe = Gst.parse_launch(
        "rtspsrc name=src latency=100 protocols=tcp ! rtph264depay ! h264parse ! avdec_h264 "
        "! appsink name=sink sync=false max-buffers=2 drop=true"
    )
    pipe.get_by_name("src").set_property("location", url)
    sink = pipe.get_by_name("sink")
    pipe.set_state(Gst.State.PLAYING)
    frames, size = 0, "?"
    end = time.monotonic() + timeout
    try:
        while frames < count and time.monotonic() < end:
            sample = sink.try_pull_sample(Gst.SECOND)
            if sample is None:
                continue
            s = sample.get_caps().get_structure(0)
            size = f"{s.get_value('width')}x{s.get_value('height')}"
            frames += 1
    finally:
        pipe.set_state(Gst.State.NULL)
    return frames, size


def demo_config(
    out: Path, broker: LocalBroker, token: str, device: str = _DEVICE
) -> dict[str, Any]:
    """The device configuration of the demo (and of the end-to-end tests)."""
    return {
        "device": device,
        "cameras": [
            {
                "name": "main",
                "source": str(MEDIA / "pedestrians_30s.mp4"),
                "loop": True,
                "rtp_port": free_udp_pair(),
            }
        ],
        "vision": {"profile": "people", "detect_fps": 5},
        "streaming": {"host": "127.0.0.1", "port": free_port()},
        "recorder": {
            "ring_dir": str(out / "ring"),
            "clips_dir": str(out / "clips"),
            "ring_seconds": 30,
            "pre_s": 3,
            "post_s": 3,
            "max_clip_s": 10,
            "min_free_bytes": 64 * 1024 * 1024,
        },
        "fileserver": {"host": "127.0.0.1", "port": free_port(), "token": token},
        "runtime": {"dir": str(out / "run"), "log_dir": str(out / "logs")},
        "stats": {"interval_s": 5},
        "alerts": {"occupancy": {"max_people": 4, "hold_s": 0.5, "clear_s": 3}},
        "mqtt": {
            "host": "127.0.0.1",
            "port": broker.port,
            "username": device,
            "password": broker.credentials[device],
            "outbox": str(out / "outbox.sqlite"),
        },
    }


def _brief(kind: str, data: dict[str, Any]) -> str:
    if kind == "status":
        workers = ", ".join(
            f"{w['name']}{'/' + w['camera'] if w.get('camera') else ''}={w['state']}"
            for w in data.get("workers", [])
        )
        return f"{data.get('state')} [{workers}]"
    if kind == "stats":
        return (
            f"seq {data['seq']} {data['camera']}: people {data['people']} {data['counts']}, "
            f"peak {data['peak']}, {data['fps_out']} fps, {data['detections_per_s']} det/s"
        )
    if kind == "alerts":
        extra = f" clip {data['clip']}" if data.get("clip") else ""
        return f"{data['rule']} {data['state']}: {data['message']}{extra}"
    if kind == "clips":
        return f"{data['name']} {data['duration']:.1f} s sha256 {data['sha256'][:12]}..."
    if kind == "cmd/result":
        return f"ok={data['ok']} {data.get('error') or ''}{json.dumps(data.get('data'))[:80]}"
    return json.dumps(data)[:100]


def _print(kind: str, data: dict[str, Any]) -> None:
    print(f"   mqtt {kind:<16} {_brief(kind, data)}", flush=True)


class _FleetServer:
    """``edgecam server`` as its own process (SQLite, the demo's broker), a demo user, and
    an upload token for the device: the fleet side of the demo, as a user would set it up."""

    def __init__(self, out: Path, broker: LocalBroker) -> None:
        self.folder = out / "server"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.password = secrets.token_urlsafe(9)
        user = broker.server_user
        self.config = self.folder / "server.yaml"
        write_private_yaml(
            self.config,
            {
                "server": {
                    "host": "127.0.0.1",
                    "port": self.port,
                    "database_url": f"sqlite:///{self.folder / 'fleet.db'}",
                    "clips_dir": str(self.folder / "clips"),
                    "secure_cookies": False,  # plain HTTP on loopback
                },
                "mqtt": {
                    "host": "127.0.0.1",
                    "port": broker.port,
                    "username": user,
                    "password": broker.credentials[user],
                    "client_id": "edgecam-demo-server",
                },
            },
        )
        self._cli("create-user", "demo", stdin=self.password + "\n")
        self.token = self._cli("create-token", "demo").strip().splitlines()[0]
        self.device_token = (
            self._cli("create-token", "demo", "--device", _DEVICE).strip().splitlines()[0]
        )
        with (out / "logs" / "server.log").open("wb") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgecam.cli", "server", "--config", str(self.config)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2).close()
                break
            except (urllib.error.URLError, OSError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise EdgecamError(
                        f"the fleet server did not start; see {out / 'logs' / 'server.log'}"
                    ) from None
                time.sleep(0.2)

    def _cli(self, *args: str, stdin: str | None = None) -> str:
        res = subprocess.run(
            [sys.executable, "-m", "edgecam.cli", "server", *args, "--config", str(self.config)],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if res.returncode != 0:
            raise EdgecamError(f"edgecam server {args[0]} failed: {res.stderr.strip()}")
        return res.stdout

    def get(self, path: str) -> Any:
        req = urllib.request.Request(
            self.url + path, headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.load(resp)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def _wait_for(what: str, check: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise EdgecamError(f"demo: no {what} within {timeout:.0f} s")


def run_live_demo(settings: Settings, out: Path, seconds: float, token: str) -> int:
    """Run the live demo for about ``seconds``; 0 when every check passed."""
    del settings  # the live demo has its own configuration, written below
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    print("\n== live: the whole device (`edgecam run`) reporting over MQTT to the fleet server")
    with LocalBroker(out / "broker", [_DEVICE]) as broker:
        print(f"   broker: mosquitto on 127.0.0.1:{broker.port}, one user per device + ACL")
        fleet = _FleetServer(out, broker)
        print(
            f"   fleet server: {fleet.url}/  (log in as demo / {fleet.password}; it stops "
            "with the demo: `edgecam demo --live-seconds 300` leaves time to look)"
        )
        config = demo_config(out, broker, token)
        config["upload"] = {
            "url": fleet.url,
            "token": fleet.device_token,
            "queue": str(out / "uploads"),
        }
        device = Device(
            out,
            config,
            broker,
            printer=_print,
            log=out / "logs" / "device.log",
            config_name="edgecam-live.yaml",
        )
        live = load_settings(device.path)
        device.start()
        assert device.proc is not None
        print(
            f"   device: edgecam run --config {device.path} (pid {device.proc.pid}, "
            f"logs in {out}/logs)"
        )
        started = time.monotonic()
        ok = False
        try:
            ok = _exercise(live, device, started, seconds) and _fleet_saw(fleet, device)
        except (EdgecamError, AssertionError, OSError) as exc:
            print(f"   FAILED: {exc}")
        finally:
            children = device.descendants()
            try:
                code = device.stop()
            except subprocess.TimeoutExpired:
                code = -9
            left = [p for p in children if p.is_running() and p.status() != "zombie"]
            print(f"   device stopped (exit {code}); {len(left)} process(es) left behind")
            try:
                device.listener.wait(
                    "offline status", lambda k, d: k == "status" and d["state"] == "offline", 10
                )
                _wait_for(
                    "device shown offline by the fleet server",
                    lambda: not fleet.get("/api/devices")[0]["online"],
                    20,
                )
                print("   the fleet server shows the device offline")
            except (AssertionError, EdgecamError) as exc:
                print(f"   {exc}")
                ok = False
            device.listener.close()
            server_code = fleet.stop()
            print(f"   fleet server stopped (exit {server_code})")
            ok = ok and code == 0 and not left and server_code == 0
    print("\n== demo " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


def _fleet_saw(fleet: _FleetServer, device: Device) -> bool:
    """What the fleet server stored of the device: its state, stats, alerts, uploaded clip."""
    found = _wait_for("device at the fleet server", lambda: fleet.get("/api/devices"), 30)[0]
    stats = _wait_for(
        "stats at the fleet server", lambda: fleet.get(f"/api/devices/{_DEVICE}/stats"), 30
    )
    seqs = [s["seq"] for s in stats]
    alerts = fleet.get("/api/alerts")
    print(
        f"   fleet server: {found['name']} {'online' if found['online'] else 'offline'}, "
        f"{len(stats)} stats messages (seq {seqs[0]}..{seqs[-1]}, none missing: "
        f"{seqs == list(range(seqs[0], seqs[-1] + 1))}), {len(alerts)} alert message(s)"
    )
    uploaded = _wait_for(
        "a clip uploaded to the fleet server",
        lambda: [c for c in fleet.get("/api/clips") if c.get("stored")],
        60,
    )
    print(f"   clip uploaded to the fleet server: {uploaded[0]['name']}")
    del device
    return bool(found["online"]) and seqs == list(range(seqs[0], seqs[-1] + 1)) and bool(alerts)


def _exercise(live: Settings, device: Device, started: float, seconds: float) -> bool:
    listener = device.listener
    device.wait_running()
    url = f"rtsp://127.0.0.1:{live.streaming.port}/main"
    print(f"   stream: {url}  (try: ffplay -rtsp_transport tcp {url})")
    frames, size = _rtsp_frames(url)
    print(f"   RTSP client decoded {frames} frames of {size}")
    alert = listener.wait("alert", lambda k, d: k == "alerts" and d["state"] == "raised", 60)
    print(f"   alert raised: {alert['message']}; waiting for its clip ...")
    with_clip = listener.wait(
        "the alert's clip",
        lambda k, d: (
            k == "alerts" and d["alert_id"] == alert["alert_id"] and bool(d.get("clip_url"))
        ),
        60,
    )
    body = urllib.request.urlopen(with_clip["clip_url"], timeout=30).read()
    digest = hashlib.sha256(body).hexdigest()
    clip_path = Path(live.recorder.clips_dir) / with_clip["clip"]
    sidecar = json.loads(clip_path.with_suffix(".json").read_text())
    same = digest == sidecar["sha256"]
    print(
        f"   downloaded {with_clip['clip']} through the alert's signed link (no token): "
        f"{len(body)} bytes, sha256 {'matches' if same else 'DOES NOT MATCH'} the device's"
    )
    try:
        urllib.request.urlopen(f"{live.fileserver.base_url()}/clips", timeout=5)
        print("   WARNING: the file server answered without a token")
        return False
    except urllib.error.HTTPError as exc:
        print(f"   without a token the file server answers {exc.code}")
    result = device.command("save_clip", camera="main", reason="demo", pre=2)
    print(f"   command save_clip over MQTT: ok={result['ok']} job {result['data'].get('job')}")
    remaining = seconds - (time.monotonic() - started)
    if remaining > 0:
        print(f"   running {remaining:.0f} s more; watch the stream now")
        time.sleep(remaining)
    return same and bool(result["ok"]) and frames >= 30
