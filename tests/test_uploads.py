"""The device's upload queue against a real fleet server (SQLite, Mosquitto): clips wait on
disk through a server outage and a device restart, and go when the server is back."""

from __future__ import annotations

import hashlib
import http.server
import logging
import shutil
import threading
import time
from pathlib import Path

import pytest
from server_support import FleetServer, server_settings, wait_until

from edgecam.device.upload import Uploads
from edgecam.protocol import ClipReady
from edgecam.server import auth

ROOT = Path(__file__).resolve().parents[1]
CLIP = ROOT / "media" / "motion_720p30_4s.mp4"


def _clip(clips: Path, name: str) -> ClipReady:
    path = clips / name
    shutil.copyfile(CLIP, path)
    now = time.time()
    return ClipReady(
        device="cam-1",
        camera="main",
        name=name,
        path=str(path),
        size=path.stat().st_size,
        duration=4.0,
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        start=now - 10,
        end=now - 6,
        trigger=now - 8,
        reason="manual",
    )


def _stored(fleet: FleetServer) -> set[str]:
    return {c["name"] for c in fleet.http.get("/api/clips?device=cam-1").json() if c["stored"]}


def _queued(folder: Path) -> set[str]:
    return {p.name.removesuffix(".json") for p in folder.glob("*.json")}


def test_clips_wait_through_an_outage_and_a_restart(
    broker: int, prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edgecam.device.upload")
    settings = server_settings(f"sqlite:///{tmp_path / 'server.db'}", broker, prefix, tmp_path)
    fleet = FleetServer(settings)
    port = fleet.port
    _, token = auth.create_token(fleet.ctx.engine, "admin", "cam-1", device="cam-1")
    fleet.close()  # the server goes away
    clips, queue = tmp_path / "clips", tmp_path / "state" / "uploads"
    clips.mkdir()
    fast = {"attempts": 1, "backoff_s": 0.01, "pause_s": 0.1, "max_pause_s": 0.2}

    def uploads(url: str, token: str) -> Uploads:
        return Uploads(queue, clips, url, "cam-1", token, **fast)  # type: ignore[arg-type]

    first = uploads(fleet.url, token)
    first.start()
    first.add(_clip(clips, "main-1.mp4"))
    wait_until(lambda: "not uploaded after 1 attempts" in caplog.text)
    assert _queued(queue) == {"main-1.mp4"}
    assert first.waiting() == 1  # the device's status says so
    assert queue.stat().st_mode & 0o777 == 0o700
    first.stop()  # the device restarts while the server is still away

    second = uploads(fleet.url, token)
    assert second.waiting() == 1
    second.start()
    time.sleep(0.5)  # a few rounds fail
    assert _queued(queue) == {"main-1.mp4"}
    # Entries that are gone or damaged: a removed clip leaves the queue, a damaged entry is
    # uploaded with the hash worked out again.
    (queue / "main-gone.mp4.json").write_text(_clip(clips, "main-gone.mp4").model_dump_json())
    (clips / "main-gone.mp4").unlink()
    _clip(clips, "main-2.mp4")
    (queue / "main-2.mp4.json").write_text("{not json")
    (queue / "passwd.json").write_text("{}")  # not a clip's name: never read
    # The oldest clip cannot be read (EIO, as from a failing card): it must not hold up the
    # others behind it.
    unreadable = _clip(clips, "main-0.mp4").model_copy(update={"end": 1.0})
    (clips / "main-0.mp4").unlink()
    (clips / "main-0.mp4").symlink_to("/proc/self/mem")  # a file whose first read is EIO
    (queue / "main-0.mp4.json").write_text(unreadable.model_dump_json())
    fleet = FleetServer(settings, port)  # the server is back
    try:
        wait_until(lambda: _stored(fleet) == {"main-1.mp4", "main-2.mp4"}, timeout=15)
        wait_until(lambda: _queued(queue) == {"passwd", "main-0.mp4"})
        assert "clip main-gone.mp4 is no longer in" in caplog.text
        assert "clip main-0.mp4 cannot be read" in caplog.text
        assert second.waiting() == 1  # main-0
        # A clip saved while the server is up goes at once.
        second.add(_clip(clips, "main-3.mp4"))
        wait_until(lambda: "main-3.mp4" in _stored(fleet))
        second.stop()

        # A refused clip (a wrong token) is not asked about again in this run, and waits for
        # the next start with the token put right.
        wrong = uploads(fleet.url, "wrong-token")
        wrong.start()
        wrong.add(_clip(clips, "main-4.mp4"))
        wait_until(lambda: "stays queued, tried again in an hour" in caplog.text)
        time.sleep(0.5)
        wrong.stop()
        assert caplog.text.count("the server refused clip main-4.mp4") == 1
        assert "main-4.mp4" in _queued(queue) and "main-4.mp4" not in _stored(fleet)
        right = uploads(fleet.url, token)
        right.start()
        wait_until(lambda: "main-4.mp4" in _stored(fleet))
        wait_until(lambda: "main-4.mp4" not in _queued(queue))
        right.stop()
    finally:
        fleet.close()
    assert (clips / "main-1.mp4").is_file()  # uploading never removes the device's copy


class _NotTheFleetServer(http.server.BaseHTTPRequestHandler):
    """Whatever sits at a wrong upload.url (a proxy's or captive portal's page, another
    service): reads the body and answers 200 without storing anything."""

    def do_PUT(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        body = b"<html>Welcome</html>"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_a_200_that_is_not_the_fleet_servers_word_leaves_the_clip_queued(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clips, queue = tmp_path / "clips", tmp_path / "uploads"
    clips.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotTheFleetServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    uploads = Uploads(queue, clips, url, "cam-1", "token", attempts=1, backoff_s=0.01,
                      pause_s=0.1, max_pause_s=0.2)  # fmt: skip
    try:
        uploads.start()
        uploads.add(_clip(clips, "main-1.mp4"))
        wait_until(lambda: "without the fleet server's word that it stored" in caplog.text)
        # Before, any 2xx was taken as stored: the clip left the queue, and was never uploaded.
        assert _queued(queue) == {"main-1.mp4"}
        assert "check upload.url" in caplog.text
    finally:
        uploads.stop()
        server.shutdown()
        server.server_close()
