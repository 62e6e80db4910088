"""The live half of ``edgecam demo``: every worker as its own process, exercised for real.

The pedestrian clip plays as a camera in real time; the streaming, recorder and file-server
workers run beside the inference worker; the demo then reads the RTSP stream with a real
client, asks the recorder for a clip and downloads it over authenticated HTTP.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from edgecam.config import Settings, load_settings
from edgecam.device.control import send_command, socket_path
from edgecam.errors import EdgecamError
from edgecam.ports import free_port, free_udp_pair
from edgecam.protocol import Command, SaveClipArgs

__all__ = ["run_live_demo"]

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[3]
MEDIA = ROOT / "media"
WORKERS = ("streaming", "recorder", "fileserver", "inference")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _pick_port(preferred: int) -> int:
    return preferred if _port_free(preferred) else free_port()


def _wait_for(check: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if check():
                return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.2)
    raise EdgecamError(f"demo: {what} did not come up within {timeout:.0f} s")


def _http_json(url: str, token: str) -> Any:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


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


def _write_config(settings: Settings, out: Path, token: str) -> tuple[Path, Settings]:
    rtsp_port = _pick_port(settings.streaming.port)
    http_port = _pick_port(settings.fileserver.port)
    rtp_port = free_udp_pair()
    data: dict[str, Any] = {
        "device": settings.device,
        "cameras": [
            {
                "name": "main",
                "source": str(MEDIA / "pedestrians_30s.mp4"),
                "loop": True,
                "rtp_port": rtp_port,
            }
        ],
        "vision": {"profile": "people", "detect_fps": 10},
        "streaming": {"host": "127.0.0.1", "port": rtsp_port},
        "recorder": {
            "ring_dir": str(out / "ring"),
            "clips_dir": str(out / "clips"),
            "ring_seconds": 30,
            "pre_s": 4,
            "post_s": 4,
            "min_free_bytes": 64 * 1024 * 1024,
        },
        "fileserver": {"host": "127.0.0.1", "port": http_port, "token": token},
    }
    path = out / "edgecam-live.yaml"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds the token
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    return path, load_settings(path)


def run_live_demo(settings: Settings, out: Path, seconds: float, token: str) -> int:
    """Run the live demo for about ``seconds``; 0 when every step worked."""
    config, live = _write_config(settings, out, token)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    print(f"\n== live: {len(WORKERS)} workers, each its own process (logs in {logs})")
    try:
        for name in WORKERS:
            with (logs / f"{name}.log").open("wb") as logf:
                procs[name] = subprocess.Popen(
                    [sys.executable, "-m", "edgecam.cli", "worker", name, "--config", str(config)],
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                )
        base = f"http://127.0.0.1:{live.fileserver.port}"
        _wait_for(lambda: urllib.request.urlopen(f"{base}/health", timeout=2), 20, "file server")
        sock = socket_path(live, "recorder")
        _wait_for(sock.exists, 20, "recorder")
        url = f"rtsp://127.0.0.1:{live.streaming.port}/main"
        print(f"   stream: {url}  (try: ffplay -rtsp_transport tcp {url})")
        time.sleep(6)  # let the ring fill past the clip's pre-roll
        frames, size = _rtsp_frames(url)
        print(f"   RTSP client decoded {frames} frames of {size}")
        started = time.monotonic()
        args = SaveClipArgs(reason="demo", pre=live.recorder.pre_s, post=live.recorder.post_s)
        print(f"   saving a clip: {args.pre:.0f} s before now to {args.post:.0f} s after ...")
        result = send_command(sock, Command(name="save_clip", args=args.model_dump()))
        if not result.ok:
            raise EdgecamError(f"demo: the recorder refused the clip: {result.error}")
        clip = result.data
        print(f"   clip ready after {time.monotonic() - started:.1f} s: {json.dumps(clip)}")
        listing = _http_json(f"{base}/clips", token)
        names = [c["name"] for c in listing.get("clips", listing)]
        print(f"   file server lists {len(names)} clip(s): {names}")
        name = names[0]
        req = urllib.request.Request(
            f"{base}/clips/{name}", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            body = resp.read()
        digest = hashlib.sha256(body).hexdigest()
        same = "matches" if digest == clip["sha256"] else "DOES NOT MATCH"
        print(f"   downloaded {name}: {len(body)} bytes, sha256 {digest[:16]}... {same} the clip")
        if digest != clip["sha256"]:
            return 1
        try:
            urllib.request.urlopen(f"{base}/clips", timeout=5)
            print("   WARNING: the file server answered without a token")
            return 1
        except urllib.error.HTTPError as exc:
            print(f"   without the token the file server answers {exc.code}")
        remaining = seconds - (time.monotonic() - started) - 6
        if remaining > 0:
            print(f"   running {remaining:.0f} s more; watch the stream now")
            time.sleep(remaining)
        return 0
    finally:
        for name in reversed(WORKERS):
            proc = procs.get(name)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in procs.items():
            try:
                code = proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            print(f"   worker {name} stopped (exit {code})")
