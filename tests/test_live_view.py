"""Live view: real GStreamer, real uvicorn, Debian's chromium (headless) through Playwright.

A test host app serves :func:`live_routes` for one :class:`LiveView` fed by a real H.264 RTP
sender (the ``rtp_sender`` fixture, the pipeline's output format).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import uvicorn
from conftest import free_port
from starlette.applications import Starlette

from edgecam.config import LiveViewConfig, Settings, load_settings
from edgecam.device.fileserver import server_config
from edgecam.device.liveview_http import COOKIE, live_path, live_routes, live_url
from edgecam.errors import ConfigError, LiveViewError
from edgecam.media.fmp4 import Fmp4Writer, codec_string
from edgecam.media.gst import GLib, Gst
from edgecam.media.liveview import LiveView, _WebRtcBranch, refuse_candidate

playwright_api = pytest.importorskip("playwright.sync_api")

TOKEN = "live-test-token"
CHROMIUM = shutil.which("chromium")
WIDTH, HEIGHT = 640, 360
# Video must advance by this much over the observation window.
MIN_ADVANCE_S = 1.0

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")


@dataclass
class Host:
    base: str
    settings: Settings
    view: LiveView
    rtp_port: int
    clips: list[str] = field(default_factory=list)


def _settings(**live: Any) -> Settings:
    return Settings(
        cameras=[{"name": "main"}],
        fileserver={"token": TOKEN},
        live=live,
    )


def _free_udp_port() -> int:
    return free_port(socket.SOCK_DGRAM)


@pytest.fixture
def host() -> Iterator[Host]:
    # The shortest deadlines: the pages' keep-alives, and their WebRTC, must hold them.
    settings = _settings(viewer_timeout_s=3, connect_timeout_s=10)
    rtp_port = _free_udp_port()
    view = LiveView(settings.live, camera="main", rtp_port=rtp_port)
    clips: list[str] = []

    async def save_clip(camera: str) -> dict[str, str]:
        clips.append(camera)
        return {"name": f"{camera}_clip.mp4"}

    app = Starlette(
        routes=live_routes(
            settings, {"main": view}, lambda _cam: {"mask": 2, "no_mask": 1}, save_clip
        )
    )
    port = free_port()
    # The worker's own server, its head deadline short: a WebSocket must outlive it (every
    # viewer was cut off when it ran out, 10 s after connecting).
    served = settings.fileserver.model_copy(update={"host": "127.0.0.1", "port": port})
    server = uvicorn.Server(server_config(app, served, header_timeout_s=2.0))
    thread = threading.Thread(target=server.run, daemon=True)
    view.start()
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    try:
        yield Host(f"http://127.0.0.1:{port}", settings, view, rtp_port, clips)
    finally:
        server.should_exit = True
        thread.join(10)
        view.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--autoplay-policy=no-user-gesture-required"],
        )
        yield b
        b.close()


def _open(browser: Any, host: Host, mode: str) -> Any:
    page = browser.new_page()
    page.goto(host.base + live_path(host.settings, "main") + f"&mode={mode}")
    return page


def _wait_playing(page: Any, timeout_s: float = 15) -> dict[str, Any]:
    """Wait until the video has advanced MIN_ADVANCE_S; return what the page saw."""
    page.wait_for_function(
        "() => { const v = document.getElementById('video');"
        " return v.videoWidth > 0 && window.edgecamLive.frames > 5; }",
        timeout=timeout_s * 1000,
    )
    first = page.evaluate("() => document.getElementById('video').currentTime")
    page.wait_for_function(
        f"() => document.getElementById('video').currentTime > {first + MIN_ADVANCE_S}",
        timeout=timeout_s * 1000,
    )
    return page.evaluate(
        "() => { const v = document.getElementById('video');"
        " return {w: v.videoWidth, h: v.videoHeight, mode: window.edgecamLive.mode,"
        " frames: window.edgecamLive.frames, counts: window.edgecamLive.counts}; }"
    )


@pytest.mark.parametrize("mode", ["mse", "webrtc"])
def test_page_plays_the_stream(browser: Any, host: Host, rtp_sender: Any, mode: str) -> None:
    page = _open(browser, host, mode)  # before the camera sends: the page waits for it
    try:
        rtp_sender(host.rtp_port, WIDTH, HEIGHT)
        seen = _wait_playing(page)
        assert (seen["w"], seen["h"]) == (WIDTH, HEIGHT)
        assert seen["mode"] == mode
        assert seen["counts"] == {"mask": 2, "no_mask": 1}
        assert host.view.counts()[mode] == 1
        # Past the viewer timeout, the page's keep-alives hold the same connection.
        time.sleep(host.settings.live.viewer_timeout_s + 1)
        assert page.evaluate("() => window.edgecamLive.connects") == 1
        page.click("#save-clip")
        page.wait_for_function(
            "() => document.getElementById('clip-result').textContent.startsWith('saved')"
        )
        assert host.clips == ["main"]
    finally:
        page.close()


def test_page_falls_back_to_mse_when_webrtc_cannot_connect(
    browser: Any, host: Host, rtp_sender: Any
) -> None:
    rtp_sender(host.rtp_port, WIDTH, HEIGHT)
    page = browser.new_page()
    # No UDP path: relay candidates only, and no relay server, so ICE never connects.
    page.add_init_script(
        """window.RTCPeerConnection = class extends window.RTCPeerConnection {
             constructor(config) { super({ ...config, iceTransportPolicy: 'relay' }); }
           };"""
    )
    try:
        page.goto(host.base + live_path(host.settings, "main"))  # no mode: the page picks
        assert page.evaluate("() => window.edgecamLive.mode") == "webrtc"
        seen = _wait_playing(page, timeout_s=25)
        assert seen["mode"] == "mse"
        assert (seen["w"], seen["h"]) == (WIDTH, HEIGHT)
        assert host.view.counts() == {"webrtc": 0, "mse": 1}  # the failed viewer is gone
    finally:
        page.close()


def test_without_credentials_page_and_socket_are_refused(browser: Any, host: Host) -> None:
    page = browser.new_page()
    try:
        response = page.goto(host.base + "/live/main")
        assert response.status == 401
        response = page.goto(host.base + "/live")
        assert page.url.endswith("/live/login")  # the index sends strangers to log in
        # A forged and an expired link are refused too.
        good = live_path(host.settings, "main")
        assert page.goto(host.base + good.replace("sig=", "sig=0")).status == 401
        old = live_path(host.settings, "main", now=time.time() - 2 * 86400)
        assert page.goto(host.base + old).status == 401
        # The WebSocket from a page of this origin without the cookie: refused.
        outcome = page.evaluate(
            """() => new Promise((resolve) => {
                const ws = new WebSocket(`ws://${location.host}/live/main/ws?mode=mse`);
                ws.onopen = () => resolve('open');
                ws.onclose = (ev) => resolve(`closed ${ev.code}`);
            })"""
        )
        assert outcome != "open"
    finally:
        page.close()
    assert host.view.counts() == {"webrtc": 0, "mse": 0}


def test_login_cookie_opens_index_and_pages(browser: Any, host: Host) -> None:
    context = browser.new_context()
    page = context.new_page()
    try:
        page.goto(host.base + "/live/login")
        page.fill("input[name=token]", TOKEN)
        page.click("button[type=submit]")
        page.wait_for_url(host.base + "/live")
        assert page.get_by_role("link", name="main").count() == 1
        cookie = next(c for c in context.cookies() if c["name"] == COOKIE)
        assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"
        assert page.goto(host.base + "/live/main").status == 200
    finally:
        context.close()


def test_four_viewers_at_once(browser: Any, host: Host, rtp_sender: Any) -> None:
    rtp_sender(host.rtp_port, WIDTH, HEIGHT)
    assert host.view._pipeline is not None
    elements = len(host.view._pipeline.children)
    pages = [_open(browser, host, mode) for mode in ("webrtc", "mse", "webrtc", "mse")]
    try:
        for page in pages:
            seen = _wait_playing(page)
            assert (seen["w"], seen["h"]) == (WIDTH, HEIGHT)
        assert host.view.counts() == {"webrtc": 2, "mse": 2}
        # A fifth from the same address is one more than live.max_viewers_per_client: its
        # page says why, and keeps trying.
        pages.append(_open(browser, host, "mse"))
        pages[-1].wait_for_function(
            "() => document.getElementById('status').textContent"
            ".includes('live.max_viewers_per_client allows; trying again')",
            timeout=10000,
        )
        assert host.view.counts() == {"webrtc": 2, "mse": 2}
    finally:
        for page in pages:
            page.close()
    deadline = time.monotonic() + 10
    while host.view.counts() != {"webrtc": 0, "mse": 0} and time.monotonic() < deadline:
        time.sleep(0.1)
    assert host.view.counts() == {"webrtc": 0, "mse": 0}
    # The viewers' WebRTC branches are gone from the pipeline: they cost nothing now.
    while len(host.view._pipeline.children) != elements and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(host.view._pipeline.children) == elements


def test_page_resumes_when_the_live_view_is_turned_off_and_on(
    browser: Any, host: Host, rtp_sender: Any
) -> None:
    rtp_sender(host.rtp_port, WIDTH, HEIGHT)
    page = _open(browser, host, "webrtc")
    try:
        _wait_playing(page)
        connects = page.evaluate("() => window.edgecamLive.connects")
        host.view.stop()  # streaming_stop
        page.wait_for_function("() => window.edgecamLive.state !== 'playing'", timeout=10000)
        time.sleep(1)
        frames = page.evaluate("() => window.edgecamLive.frames")
        host.view.start()  # streaming_start
        page.wait_for_function(f"() => window.edgecamLive.frames > {frames + 30}", timeout=15000)
        assert page.evaluate("() => window.edgecamLive.connects") > connects
        _wait_playing(page)
        assert host.view.counts()["webrtc"] == 1
    finally:
        page.close()


@pytest.mark.parametrize("mode", ["mse", "webrtc"])
def test_page_resumes_after_the_source_restarts(
    browser: Any, host: Host, rtp_sender: Any, mode: str
) -> None:
    sender = rtp_sender(host.rtp_port, WIDTH, HEIGHT)
    page = _open(browser, host, mode)
    try:
        _wait_playing(page)
        assert page.evaluate("() => window.edgecamLive.state") == "playing"
        sender.terminate()  # the inference worker goes away...
        sender.wait(5)
        # The frozen picture is not called playing (it was, for as long as it lasted).
        page.wait_for_function("() => window.edgecamLive.state === 'stalled'", timeout=8000)
        assert "no new picture for" in page.inner_text("#status")
        frames = page.evaluate("() => window.edgecamLive.frames")
        rtp_sender(host.rtp_port, WIDTH, HEIGHT)  # ...and its restart sends a new stream
        page.wait_for_function(f"() => window.edgecamLive.frames > {frames + 30}", timeout=15000)
        seen = _wait_playing(page)
        assert (seen["w"], seen["h"]) == (WIDTH, HEIGHT)
        page.wait_for_function("() => window.edgecamLive.state === 'playing'", timeout=5000)
        assert page.inner_text("#status") == f"{mode} playing"
    finally:
        page.close()


def test_a_webrtc_viewer_gone_silent_is_dropped(browser: Any, host: Host, rtp_sender: Any) -> None:
    """A page whose peer connection is closed while its WebSocket goes on with keep-alives
    (a script; a browser whose UDP path is lost): webrtcbin (1.22, with libnice) still
    calls it connected 40 s later, and before, it stayed a viewer for as long as the
    keep-alives came. Now it is dropped once nothing has come over its connection for
    live.connect_timeout_s; a page that watches is not, however long it watches."""
    rtp_sender(host.rtp_port, WIDTH, HEIGHT)
    timeout = host.settings.live.connect_timeout_s
    page = browser.new_page()
    page.add_init_script(
        """window.peerConnections = [];
           window.RTCPeerConnection = class extends window.RTCPeerConnection {
             constructor(config) { super(config); window.peerConnections.push(this); }
           };"""
    )
    try:
        page.goto(host.base + live_path(host.settings, "main") + "&mode=webrtc")
        _wait_playing(page)
        (viewer,) = host.view._viewers.values()
        time.sleep(timeout + 2)  # past the deadline, watching: the same viewer still
        assert list(host.view._viewers.values()) == [viewer]
        assert page.evaluate("() => window.edgecamLive.connects") == 1
        page.evaluate("() => window.peerConnections[0].close()")  # not the socket
        closed = time.monotonic()
        while viewer.id in host.view._viewers:
            assert time.monotonic() < closed + timeout + 3, "still a viewer"
            time.sleep(0.2)
        assert time.monotonic() - closed > timeout - 1
        # Its page is told, connects again and plays.
        frames = page.evaluate("() => window.edgecamLive.frames")
        page.wait_for_function(f"() => window.edgecamLive.frames > {frames + 30}", timeout=15000)
        assert page.evaluate("() => window.edgecamLive.connects") == 2
    finally:
        page.close()


def test_a_silent_viewer_is_dropped_after_the_timeout(host: Host) -> None:
    closed = threading.Event()

    class Link:
        def send(self, _message: bytes | str) -> bool:
            return True

        def closed(self, _reason: str) -> None:
            closed.set()

    host.view.add_viewer("mse", Link())
    assert host.view.counts()["mse"] == 1
    assert closed.wait(host.settings.live.viewer_timeout_s + 3)
    assert host.view.counts()["mse"] == 0


def test_viewer_limit_and_stopped_view() -> None:
    view = LiveView(LiveViewConfig(max_viewers=1), camera="main", rtp_port=_free_udp_port())

    class Link:
        def send(self, _message: bytes | str) -> bool:
            return True

        def closed(self, _reason: str) -> None:
            pass

    with pytest.raises(LiveViewError, match="off"):
        view.add_viewer("mse", Link())
    with view:
        view.add_viewer("mse", Link())
        with pytest.raises(LiveViewError, match="max_viewers"):
            view.add_viewer("mse", Link())
    # Stopping dropped the viewer; the view starts again (streaming_start after a stop).
    with view:
        assert view.counts() == {"webrtc": 0, "mse": 0}


@pytest.mark.parametrize(
    ("live", "key"),
    [
        ({"max_viewers": 0}, "live.max_viewers"),
        ({"max_viewers_per_client": 0}, "live.max_viewers_per_client"),
        ({"viewer_timeout_s": 0.5}, "live.viewer_timeout_s"),
        ({"connect_timeout_s": 5}, "live.connect_timeout_s"),
        ({"link_ttl_s": 1}, "live.link_ttl_s"),
        ({"stun_server": "http://stun.example"}, "live.stun_server"),
        ({"public_url": "https://cam.example/live"}, "live.public_url"),
        ({"webrtcc": False}, "live.webrtcc"),
    ],
)
def test_bad_live_config_names_the_key(live: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_settings(None, **{f"live.{k}": v for k, v in live.items()})


def test_webrtc_off_and_live_view_off() -> None:
    settings = _settings(webrtc=False)
    view = LiveView(settings.live, camera="main", rtp_port=_free_udp_port())

    class Link:
        def send(self, _message: bytes | str) -> bool:
            return True

        def closed(self, _reason: str) -> None:
            pass

    with view:
        with pytest.raises(LiveViewError, match="WebRTC is off"):
            view.add_viewer("webrtc", Link())
        view.add_viewer("mse", Link()).close()
    assert live_routes(_settings(enabled=False), {"main": view}) == []


def test_live_url_is_signed_and_expires() -> None:
    settings = _settings(link_ttl_s=60, public_url="https://cam.example:8443")
    url = live_url(settings, "main", now=1_000_000)
    assert url.startswith("https://cam.example:8443/live/main?expires=1000060&sig=")


def test_fmp4_init_segment_names_the_codec() -> None:
    avcc = bytes.fromhex("0142c01fffe1000467") + b"\0" * 4
    writer = Fmp4Writer(avcc, 640, 360)
    assert writer.codec == codec_string(avcc) == "avc1.42c01f"
    assert writer.init_segment[4:8] == b"ftyp"
    fragment = writer.fragment(b"\0\0\0\x01\x65", 9000, 3000, keyframe=True)
    assert fragment[4:8] == b"moof"
    assert fragment.endswith(b"\0\0\0\x0dmdat\0\0\0\x01\x65")


def test_cli_live_url(capsys: pytest.CaptureFixture[str], tmp_path: Any) -> None:
    from edgecam.cli import main

    config = tmp_path / "edgecam.yaml"
    config.write_text(json.dumps({"fileserver": {"token": TOKEN}}))
    assert main(["live-url", "--config", str(config)]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("http://127.0.0.1:8081/live/main?expires=")
    # No link to a page nobody serves (it answered 404).
    for off, key in (({"live": {"enabled": False}}, "live.enabled"),
                     ({"fileserver": {"enabled": False}}, "fileserver.enabled")):  # fmt: skip
        data = {"fileserver": {"token": TOKEN}}
        for section, values in off.items():
            data[section] = {**data.get(section, {}), **values}
        config.write_text(json.dumps(data))
        assert main(["live-url", "--config", str(config)]) == 1
        captured = capsys.readouterr()
        assert not captured.out and key in captured.err


def test_two_cameras_links_keep_their_own_cookies_and_bad_cookies_are_refused() -> None:
    with warnings.catch_warnings():  # Starlette prefers httpx2 for its test client
        warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
        from starlette.testclient import TestClient

    settings = Settings(
        cameras=[{"name": "main"}, {"name": "cam2"}], fileserver={"token": TOKEN}, live={}
    )
    views = {
        name: LiveView(settings.live, camera=name, rtp_port=_free_udp_port())
        for name in ("main", "cam2")
    }
    app = Starlette(routes=live_routes(settings, views, lambda _cam: {}, lambda _cam: {}))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        page = client.get(live_path(settings, "main"))
        assert page.status_code == 200
        # Never framed by another page (a click on Save clip for the viewer).
        assert page.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert client.get(live_path(settings, "cam2")).status_code == 200
        # Each camera's page opens again on its own cookie, the first after the second's.
        assert client.get("/live/main").status_code == 200
        assert client.get("/live/cam2").status_code == 200
        # A camera's cookie is not the index's: to the login form.
        assert client.get("/live", follow_redirects=False).status_code == 303
    with TestClient(app, base_url="http://127.0.0.1") as client:
        for bad in (b"*.9" + b"9" * 5000 + b".x", b"*.\xb2.x", b"main.12.", b"..", b"*"):
            cookie = {"Cookie": COOKIE.encode() + b"=" + bad}
            # a 500 before, for the first two
            assert client.get("/live/main", headers=cookie).status_code == 401, bad
            index = client.get("/live", headers=cookie, follow_redirects=False)
            assert index.status_code == 303, bad


def test_a_slow_recorder_does_not_stop_the_server() -> None:
    settings = _settings()
    view = LiveView(settings.live, camera="main", rtp_port=_free_udp_port())

    def slow_save_clip(_camera: str) -> dict[str, str]:
        time.sleep(2.0)  # a recorder that takes its time (it froze every viewer's video)
        raise OSError("no answer on /dev/shm/edgecam-run/recorder.main.sock")

    app = Starlette(routes=live_routes(settings, {"main": view}, lambda _c: {}, slow_save_clip))
    port = free_port()
    served = settings.fileserver.model_copy(update={"host": "127.0.0.1", "port": port})
    server = uvicorn.Server(server_config(app, served))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        base = f"http://127.0.0.1:{port}"
        auth = {"Authorization": f"Bearer {TOKEN}"}
        answers: list[httpx.Response] = []
        clip = threading.Thread(
            target=lambda: answers.append(
                httpx.post(f"{base}/live/main/clip", headers=auth, timeout=10)
            )
        )
        clip.start()
        time.sleep(0.3)
        t0 = time.monotonic()
        assert httpx.get(f"{base}/live", headers=auth, timeout=10).status_code == 200
        assert time.monotonic() - t0 < 1.0  # answered while the clip is being saved
        clip.join(10)
        assert answers[0].status_code == 502
        assert "sock" not in answers[0].text  # the device's paths stay in its log
    finally:
        server.should_exit = True
        thread.join(10)


def _ws_connect(port: int, source: str, rcvbuf: int | None = None) -> socket.socket:
    """A live viewer's WebSocket (MSE, by the bearer token) from ``source``, upgraded."""
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    sock.settimeout(5)
    sock.sendall(
        f"GET /live/main/ws?mode=mse HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
        f"Authorization: Bearer {TOKEN}\r\n\r\n".encode()
    )
    assert sock.recv(12) == b"HTTP/1.1 101"
    return sock


def test_a_viewer_that_stops_reading_is_cut_off(rtp_sender: Any) -> None:
    """A viewer whose socket stops reading (a phone asleep with the page open; a script):
    before, its sends waited for ever, and so did uvicorn's close after its ping timed out:
    its WebSocket and its place (of max_viewers_per_client, and of max_viewers while its
    keep-alives came) were held until it read again, its queue of counts growing."""
    settings = _settings(max_viewers_per_client=1, viewer_timeout_s=60)
    rtp_port = _free_udp_port()
    rtp_sender(rtp_port, pattern="snow", bitrate=4000)  # 500 kB/s fills buffers at once
    view = LiveView(settings.live, camera="main", rtp_port=rtp_port)
    app = Starlette(routes=live_routes(settings, {"main": view}, lambda _c: {}, None))
    port = free_port()
    served = settings.fileserver.model_copy(update={"host": "127.0.0.1", "port": port})
    server = uvicorn.Server(server_config(app, served, write_stall_s=2.0))
    thread = threading.Thread(target=server.run, daemon=True)
    with view, contextlib.ExitStack() as sockets:
        thread.start()
        try:
            deadline = time.monotonic() + 10
            while not server.started and time.monotonic() < deadline:
                time.sleep(0.05)
            good = sockets.enter_context(_ws_connect(port, "127.0.0.2"))
            stalled = sockets.enter_context(_ws_connect(port, "127.0.0.1", rcvbuf=4096))
            deadline = time.monotonic() + 5
            while view.counts()["mse"] < 2:
                assert time.monotonic() < deadline, view.counts()
                time.sleep(0.05)
            received: list[int] = []  # by the good viewer, each second
            deadline = time.monotonic() + 20
            while view.counts()["mse"] == 2:
                assert time.monotonic() < deadline, "the viewer that stopped reading stayed"
                second = time.monotonic() + 1
                received.append(0)
                while time.monotonic() < second:
                    received[-1] += len(good.recv(1 << 20))
            # The good viewer got the stream all along: a keyframe's worth every second.
            assert min(received[1:]) > 100_000, received
            stalled.settimeout(5)
            with contextlib.suppress(ConnectionResetError):
                while stalled.recv(1 << 20):  # what was in flight, then the end
                    pass
            # Its place is given back: the same address may watch again.
            again = sockets.enter_context(_ws_connect(port, "127.0.0.1"))
            assert b'"type": "error"' not in again.recv(1 << 16)
        finally:
            server.should_exit = True
            thread.join(10)


def _threads_and_descriptors() -> tuple[int, int]:
    """This process's threads that Python did not start (GStreamer's, libnice's, GLib's),
    and its open file descriptors."""
    # Those Python started: not the GStreamer threads that merely called into it.
    python = {
        thread.native_id
        for thread in threading.enumerate()
        if not isinstance(thread, threading._DummyThread)
    }
    native = [task for task in os.listdir("/proc/self/task") if int(task) not in python]
    return len(native), len(os.listdir("/proc/self/fd"))


def _answer_without_ice(offer: str) -> str:
    """An answer to the device's offer as a browser would make it, from a client that never
    does ICE: credentials of its own, and no candidate ever."""
    replaced = {
        "a=setup:": "a=setup:active",
        "a=ice-ufrag:": "a=ice-ufrag:neverconnects",
        "a=ice-pwd:": "a=ice-pwd:neverconnectsneverconnects",
        "a=sendonly": "a=recvonly",
    }
    lines = []
    for line in offer.splitlines():
        if not line or line.startswith(("a=candidate", "a=end-of-candidates")):
            continue
        prefix = next((p for p in replaced if line.startswith(p)), None)
        lines.append(replaced[prefix] if prefix is not None else line)
    return "\r\n".join(lines) + "\r\n"


def test_a_webrtc_viewer_that_never_connects_is_dropped(
    rtp_sender: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that takes the offer, answers it and sends keep-alives, but never does ICE
    (a script holding places): before, it stayed a viewer for as long as it kept this up,
    with a webrtcbin of its own (10 threads, 26 descriptors), and such clients could hold
    every place of max_viewers, shutting real viewers out for good."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import ClientConnection, connect

    settings = _settings(max_viewers=1, connect_timeout_s=10)
    timeout = settings.live.connect_timeout_s
    rtp_port = _free_udp_port()
    rtp_sender(rtp_port, WIDTH, HEIGHT)
    view = LiveView(settings.live, camera="main", rtp_port=rtp_port)
    app = Starlette(routes=live_routes(settings, {"main": view}, lambda _c: {}, None))
    port = free_port()
    served = settings.fileserver.model_copy(update={"host": "127.0.0.1", "port": port})
    server = uvicorn.Server(server_config(app, served))
    thread = threading.Thread(target=server.run, daemon=True)
    url = f"ws://127.0.0.1:{port}/live/main/ws?mode=webrtc"
    auth = {"Authorization": f"Bearer {TOKEN}"}

    def offer(ws: ClientConnection) -> str:
        while True:
            message = json.loads(ws.recv(timeout=10))
            if message["type"] == "offer":
                return str(message["sdp"])
            assert message["type"] == "counts", message

    def settled(elements: int, resources: tuple[int, int] | None = None) -> bool:
        """Within 5 s: no viewer, and no more elements (threads, descriptors) than given."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            pipeline = view._pipeline
            now = _threads_and_descriptors()
            if (
                view.counts()["webrtc"] == 0
                and pipeline is not None
                and len(pipeline.children) <= elements
                and (resources is None or (now[0] <= resources[0] and now[1] <= resources[1]))
            ):
                return True
            time.sleep(0.1)
        return False

    with view:
        thread.start()
        try:
            deadline = time.monotonic() + 10
            while not server.started and time.monotonic() < deadline:
                time.sleep(0.05)
            assert view._pipeline is not None
            elements = len(view._pipeline.children)
            # A viewer in and out first: the stream is up, the server's worker threads made.
            with connect(url, additional_headers=auth) as first:
                offer(first)
            assert settled(elements)
            before = _threads_and_descriptors()
            with connect(url, additional_headers=auth) as hostile:
                answer = _answer_without_ice(offer(hostile))
                hostile.send(json.dumps({"type": "answer", "sdp": answer}))
                offered = time.monotonic()
                with connect(url, additional_headers=auth) as refused:  # the one place is taken
                    refusal = json.loads(refused.recv(timeout=5))
                    assert "live.max_viewers" in refusal.get("error", ""), refusal
                held = before
                with pytest.raises(ConnectionClosed) as closed:
                    while True:  # keep-alives as the page sends them, until the device ends it
                        assert time.monotonic() < offered + timeout + 3, "still a viewer"
                        hostile.send(json.dumps({"type": "ping"}))
                        with contextlib.suppress(TimeoutError):
                            while True:
                                hostile.recv(timeout=0.5)
                        now = _threads_and_descriptors()
                        held = (max(held[0], now[0]), max(held[1], now[1]))
                dropped_after = time.monotonic() - offered
            assert closed.value.rcvd is not None, closed.value
            assert closed.value.rcvd.code == 1013, closed.value.rcvd
            assert "not connected" in closed.value.rcvd.reason, closed.value.rcvd
            assert timeout - 1 <= dropped_after <= timeout + 3, dropped_after
            # It did hold its own threads and descriptors; they are all given back.
            assert held[0] > before[0] and held[1] >= before[1] + 10, (before, held)
            assert settled(elements, before), (before, _threads_and_descriptors())
            # And said so.
            said = [r for r in caplog.records if "live.connect_timeout_s" in r.getMessage()]
            assert [r.levelname for r in said] == ["WARNING"]
            # Its place is another viewer's now.
            with connect(url, additional_headers=auth) as again:
                assert "m=video" in offer(again)
            assert settled(elements)
        finally:
            server.should_exit = True
            thread.join(10)


def test_an_error_in_the_view_starts_it_afresh(rtp_sender: Any) -> None:
    # A WebRTC branch that could not take the camera's new stream (another H.264 level)
    # stopped the whole view with "not-negotiated": no viewer got a frame again.
    port = _free_udp_port()
    view = LiveView(LiveViewConfig(), camera="main", rtp_port=port)

    class Link:
        def __init__(self) -> None:
            self.data = 0
            self.reasons: list[str] = []

        def send(self, message: bytes | str) -> bool:
            self.data += isinstance(message, bytes)
            return True

        def closed(self, reason: str) -> None:
            self.reasons.append(reason)

    def wait(what: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 15
        while not what():
            assert time.monotonic() < deadline
            time.sleep(0.05)

    with view:
        rtp_sender(port, WIDTH, HEIGHT)
        first = Link()
        view.add_viewer("mse", first)
        wait(lambda: first.data > 5)
        pipeline = view._pipeline
        assert pipeline is not None
        error = GLib.Error.new_literal(Gst.StreamError.quark(), "not negotiated", 11)
        pipeline.get_bus().post(Gst.Message.new_error(pipeline, error, "test"))
        wait(lambda: bool(first.reasons))
        assert "afresh" in first.reasons[0]
        second = Link()
        wait(lambda: view._pipeline is not None and view._pipeline is not pipeline)
        view.add_viewer("mse", second)
        wait(lambda: second.data > 5)  # frames again, on the new pipeline


def test_one_client_cannot_take_every_viewer_place() -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
        from starlette.testclient import TestClient
    from starlette.websockets import WebSocketDisconnect

    settings = _settings(max_viewers_per_client=2)
    view = LiveView(settings.live, camera="main", rtp_port=_free_udp_port())
    app = Starlette(routes=live_routes(settings, {"main": view}, lambda _c: {}, None))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    url = "/live/main/ws?mode=mse"

    def wait_viewers(n: int) -> None:
        deadline = time.monotonic() + 5
        while view.counts()["mse"] != n and time.monotonic() < deadline:
            time.sleep(0.02)
        assert view.counts()["mse"] == n

    with (
        view,
        TestClient(app, base_url="http://127.0.0.1") as client,
        client.websocket_connect(url, headers=auth) as first,
    ):
        # Each socket is closed, and its viewer's clean-up let finish, inside its block:
        # leaving a block with the socket open cancels the app under the test client.
        with client.websocket_connect(url, headers=auth) as second:
            wait_viewers(2)
            with client.websocket_connect(url, headers=auth) as third:
                refusal = json.loads(third.receive_text())
                assert refusal["type"] == "error"
                assert "live.max_viewers_per_client" in refusal["error"]
                with pytest.raises(WebSocketDisconnect) as closed:
                    third.receive_text()
                assert closed.value.code == 1013
            assert view.counts()["mse"] == 2  # the third never became a viewer
            second.close()
            wait_viewers(1)
            time.sleep(0.2)
        # A place given back is a place to take again.
        with client.websocket_connect(url, headers=auth) as again:
            assert json.loads(again.receive_text())["type"] in ("counts", "codec")
            wait_viewers(2)
            again.close()
            wait_viewers(1)
            time.sleep(0.2)
        first.close()
        wait_viewers(0)
        time.sleep(0.2)


def test_a_binary_frame_from_the_page_is_ignored() -> None:
    with warnings.catch_warnings():  # Starlette prefers httpx2 for its test client
        warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
        from starlette.testclient import TestClient

    settings = _settings()
    view = LiveView(settings.live, camera="main", rtp_port=_free_udp_port())
    app = Starlette(routes=live_routes(settings, {"main": view}, lambda _c: {"mask": 1}, None))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with view, TestClient(app, base_url="http://127.0.0.1") as client:
        with client.websocket_connect("/live/main/ws?mode=mse", headers=auth) as ws:
            ws.send_bytes(b"\x00\xff")  # it ended the viewer (KeyError 'text'), logged
            ws.send_text('{"type": "ping"}')
            for _ in range(3):  # the counts keep coming: the viewer is still there
                message = json.loads(ws.receive_text())
                assert message["type"] in ("counts", "codec")
            # Closed here, and its clean-up let finish: leaving the block cancels the app.
            ws.close()
            deadline = time.monotonic() + 5
            while view.counts()["mse"] and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.2)
        assert view.counts() == {"webrtc": 0, "mse": 0}


_HOST = "candidate:1 1 udp 2113937151 {address} {port} typ host generation 0"


@pytest.mark.parametrize(
    ("candidate", "why"),
    [
        (_HOST.format(address="841e91e2-6e7a-469e-8082-f0d9be6eafad.local", port=57616), "name"),
        (_HOST.format(address="192.0.2.7", port=50000), None),
        (_HOST.format(address="2001:db8::7", port=50000), None),
        ("a=" + _HOST.format(address="10.1.2.3", port=1024), None),
        ("candidate:1 1 udp 1677729535 203.0.113.5 53417 typ srflx raddr 0.0.0.0 rport 0", None),
        ("candidate:1 1 tcp 1518280447 192.0.2.7 9 typ host tcptype active", "transport"),
        ("candidate:1 1 TCP 1518280447 192.0.2.7 5432 typ host tcptype passive", "transport"),
        (_HOST.format(address="192.0.2.7", port=53), "port"),
        (_HOST.format(address="192.0.2.7", port=0), "port"),
        (_HOST.format(address="192.0.2.7", port=70000), "port"),
        (_HOST.format(address="192.0.2.7", port="5e4"), "port"),
        (_HOST.format(address="127.0.0.1", port=1883), "address"),
        (_HOST.format(address="::1", port=1883), "address"),
        (_HOST.format(address="::ffff:127.0.0.1", port=1883), "address"),
        (_HOST.format(address="169.254.169.254", port=8080), "address"),
        (_HOST.format(address="fe80::1", port=5000), "address"),
        (_HOST.format(address="224.0.0.251", port=5353), "address"),
        (_HOST.format(address="255.255.255.255", port=9999), "address"),
        (_HOST.format(address="0.0.0.0", port=9999), "address"),
        (_HOST.format(address="db.internal.example", port=5432), "name"),
        (_HOST.format(address="localhost", port=5432), "name"),
        (_HOST.format(address="a.b.local", port=5432), "name"),
        (_HOST.format(address="0127.0.0.1", port=5432), "name"),  # inet_aton reads octal
        (_HOST.format(address="127.1", port=5432), "name"),
        (_HOST.format(address="0.1.2.3", port=5000), "address"),
        (_HOST.format(address="2001:db8::7%eth0", port=5000), "zone"),
        # libnice splits on single spaces: a tab would hide 127.0.0.1:53 from a split()
        ("candidate:1 1 udp 1\t10.0.0.1\t5000\ttyp\thost 127.0.0.1 53 typ host", "printable"),
        ("candidate:1\t1\tudp 1 1 tcp 1 10.0.0.1 5000 typ host", "printable"),
        ("candidate:1 1 udp 1  10.0.0.1 5000 typ host", "printable"),
        ("candidate:1 1 udp 1 10.0.0.1 5000 typ host\r\na=candidate:x", "printable"),
        ("candidate:1 1 udp 1 192.0.2.7 50000", "not a candidate"),
        ("hello", "not a candidate"),
    ],
)
def test_remote_ice_candidates_only_aim_at_unicast_udp(candidate: str, why: str | None) -> None:
    reason = refuse_candidate(candidate)
    if why is None:
        assert reason is None
    else:
        assert reason is not None and why in reason


def test_refused_candidates_never_reach_webrtcbin() -> None:
    """Trickled and in the answer's SDP, and no more than the limit from one viewer."""
    emitted: list[tuple[Any, ...]] = []

    class FakeWebrtc:
        def emit(self, *args: Any) -> None:
            emitted.append(args)

    class FakeViewer:
        id = 1

    branch = _WebRtcBranch.__new__(_WebRtcBranch)
    branch.viewer = FakeViewer()  # type: ignore[assignment]
    branch._webrtc = FakeWebrtc()  # type: ignore[assignment]
    branch._remote_candidates = 0
    good = _HOST.format(address="192.0.2.7", port=50000)
    branch.receive({"type": "ice", "candidate": good, "sdpMLineIndex": 0})
    branch.receive({"type": "ice", "candidate": _HOST.format(address="127.0.0.1", port=1883)})
    branch.receive({"type": "ice", "candidate": "candidate:1 1 tcp 1 192.0.2.7 22 typ host"})
    assert emitted == [("add-ice-candidate", 0, good)]
    sdp = (
        "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n"
        f"a={good}\r\n"
        f"a={_HOST.format(address='10.0.0.1', port=22)}\r\n"
        "a=sendrecv\r\n"
    )
    assert branch._answer_text(sdp) == (
        f"v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na={good}\r\na=sendrecv\r\n"
    )
    for _ in range(100):
        branch.receive({"type": "ice", "candidate": good, "sdpMLineIndex": 0})
    # Five looked at so far: 27 more are taken, the rest left out.
    assert len(emitted) == 1 + 27


def test_every_candidate_gstsdp_reads_in_an_answer_was_checked() -> None:
    """Whatever GstSdp (and so webrtcbin) reads as a candidate attribute of the answer
    passed :func:`refuse_candidate`: lines indented, tabbed or cased to slip past a check
    of the raw text included."""
    from edgecam.media.liveview import GstSdp

    class FakeViewer:
        id = 1

    branch = _WebRtcBranch.__new__(_WebRtcBranch)
    branch.viewer = FakeViewer()  # type: ignore[assignment]
    branch._remote_candidates = 0
    good = _HOST.format(address="192.0.2.7", port=50000)
    sdp = (
        "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
        "a=candidate:9 1 udp 1 127.0.0.1 5000 typ host\r\n"  # session level
        "m=video 9 UDP/TLS/RTP/SAVPF 96\r\n"
        f"a={good}\r\n"
        " a=candidate:2 1 udp 1 127.0.0.1 5000 typ host\r\n"
        "\ta=candidate:3 1 tcp 1 169.254.169.254 8080 typ host\r\n"
        "a=candidate:4 1 udp 1\t10.0.0.1\t5000\ttyp\thost 127.0.0.1 5353 typ host\r\n"
        "a=CANDIDATE:5 1 udp 1 127.0.0.1 5000 typ host\n"
        "a= candidate:8 1 udp 1 127.0.0.1 1883 typ host\r\n"
        "a=\tcandidate:9 1 tcp 1 169.254.169.254 80 typ host\r\n"
        "a=candidate:6 1 udp 1 10.0.0.1 5000 typ host\ra=candidate:7 1 tcp 1 10.0.0.1 22 typ host\n"
        "a=sendrecv\r\n"
    )
    result, message = GstSdp.SDPMessage.new_from_text(branch._answer_text(sdp))
    assert result == GstSdp.SDPResult.OK
    seen = []
    attributes = [message.get_attribute(i) for i in range(message.attributes_len())]
    for m in range(message.medias_len()):
        media = message.get_media(m)
        attributes += [media.get_attribute(i) for i in range(media.attributes_len())]
    for attribute in attributes:
        if attribute.key.lower() == "candidate":
            seen.append(f"candidate:{attribute.value}")
    assert seen == [good]
    assert any(a.key == "sendrecv" for a in attributes)  # the rest of the answer is kept


def test_wrong_tokens_lock_an_address_out_and_old_tabs_do_not(tmp_path: Any) -> None:
    """On the device's own app (the file server's, with the live routes added, as its worker
    builds it): wrong tokens, by the login form, a header or a WebSocket, count towards the
    address's lockout; cookies and links do not, expired or signed with a token since
    changed, as the tabs left open keep sending them every 2 s."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
        from starlette.testclient import TestClient
    from starlette.websockets import WebSocketDisconnect

    from edgecam.device.fileserver import create_app

    def device_app(token: str) -> tuple[Starlette, Settings]:
        settings = Settings(
            cameras=[{"name": "main"}],
            recorder={"clips_dir": tmp_path / "clips", "ring_dir": tmp_path / "ring"},
            fileserver={"token": token, "max_auth_failures": 3, "auth_lockout_s": 60},
            live={"session_ttl_s": 60},
        )
        app = create_app(settings)
        view = LiveView(settings.live, camera="main", rtp_port=_free_udp_port())
        app.router.routes.extend(
            live_routes(
                settings,
                {"main": view},
                lambda _c: {},
                None,
                clock=lambda: now[0],
                guard=app.state.token_guard,
            )
        )
        return app, settings

    now = [1_000_000.0]
    old_app, old_settings = device_app(TOKEN)
    with TestClient(old_app, base_url="http://127.0.0.1", client=("10.0.0.1", 1)) as tab:
        assert tab.get(live_path(old_settings, "main", now=now[0])).status_code == 200
        assert tab.get("/live/main").status_code == 200
        cookies = dict(tab.cookies)
    # The token is changed; the tab, its cookie now signed with the old one, keeps asking.
    app, settings = device_app("a-new-token")
    with TestClient(
        app, base_url="http://127.0.0.1", client=("10.0.0.1", 1), cookies=cookies
    ) as tab:
        for _ in range(10):
            assert tab.get("/live/main", follow_redirects=False).status_code in (303, 401)
            with pytest.raises(WebSocketDisconnect), tab.websocket_connect("/live/main/ws"):
                pass
        now[0] += 120  # and expired: still no guess
        assert tab.get("/live/main", follow_redirects=False).status_code in (303, 401)
        old_link = live_path(old_settings, "main", now=now[0])
        assert tab.get(old_link, follow_redirects=False).status_code in (303, 401)
        # Not locked out: the new token's login and link work.
        assert tab.post("/live/login", data={"token": "a-new-token"}).status_code == 200
        assert tab.get(live_path(settings, "main", now=now[0])).status_code == 200
    with TestClient(app, base_url="http://127.0.0.1", client=("10.0.0.9", 1)) as guesser:
        # Another site's page posting guesses from this browser: refused, and not counted.
        evil = {"Origin": "http://evil.example"}
        for _ in range(5):
            posted = guesser.post("/live/login", data={"token": "guess"}, headers=evil)
            assert posted.status_code == 403
        assert guesser.post("/live/login", data={"token": "guess"}).status_code == 401
        bad = {"Authorization": "Bearer guess"}
        assert guesser.get("/live", headers=bad, follow_redirects=False).status_code == 303
        with (
            pytest.raises(WebSocketDisconnect),
            guesser.websocket_connect("/live/main/ws", headers=bad),
        ):
            pass
        # Three wrong tokens: now even the right one is refused, page and socket alike.
        good = {"Authorization": "Bearer a-new-token"}
        assert guesser.get("/live/main", headers=good).status_code == 429
        assert guesser.get("/clips", headers=good).status_code == 429  # one count, all routes
        with (
            pytest.raises(WebSocketDisconnect),
            guesser.websocket_connect("/live/main/ws", headers=good),
        ):
            pass
