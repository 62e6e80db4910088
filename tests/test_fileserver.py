"""File server: auth, signed links, Range, HEAD, listing, path safety; real uvicorn too."""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import uvicorn
from conftest import closed_at_once, free_port

from edgecam.config import Settings
from edgecam.device import fileserver
from edgecam.device.fileserver import TokenGuard, create_app, sign_link, signed_url
from edgecam.device.liveview_http import live_url
from edgecam.device.runner import run_worker
from edgecam.device.workers import FileServerWorker
from edgecam.errors import ConfigError
from edgecam.media.clips import ClipStore

with warnings.catch_warnings():
    # Starlette 1.x prefers httpx2 for its test client; httpx (a dev dependency) still works.
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from starlette.testclient import TestClient
    from starlette.websockets import WebSocketDisconnect

TOKEN = "s3cret-token"
CLIP = "main_20240101T000000Z_abcdef.mp4"
OLDER = "main_20231231T000000Z_012345.mp4"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _settings(tmp_path: Path, **fileserver: object) -> Settings:
    return Settings(
        device="testdev",
        recorder={"clips_dir": tmp_path / "clips", "ring_dir": tmp_path / "ring"},
        fileserver={"token": TOKEN, **fileserver},
    )


@pytest.fixture
def clips(tmp_path: Path, media: Path) -> Path:
    folder = tmp_path / "clips"
    folder.mkdir()
    shutil.copyfile(media / "motion_720p30_4s.mp4", folder / CLIP)
    (folder / CLIP).with_suffix(".json").write_text(json.dumps({"start": 1704067200.0}))
    (folder / OLDER).write_bytes(b"older")
    (folder / OLDER).with_suffix(".json").write_text(json.dumps({"start": 1703980800.0}))
    secret = tmp_path / "secret.mp4"
    secret.write_bytes(b"outside the clips folder")
    os.symlink(secret, folder / "main_20240102T000000Z_ffffff.mp4")
    return folder


@pytest.fixture
def client(tmp_path: Path, clips: Path) -> Iterator[TestClient]:
    with TestClient(create_app(_settings(tmp_path))) as c:
        yield c


def test_refuses_to_start_without_token(tmp_path: Path) -> None:
    settings = Settings(recorder={"clips_dir": tmp_path})
    with pytest.raises(ConfigError, match=r"fileserver\.token"):
        create_app(settings)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGECAM_")}
    proc = subprocess.run(
        [sys.executable, "-m", "edgecam.cli", "worker", "fileserver"],
        capture_output=True, text=True, timeout=30, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 78 and "needs a token" in proc.stderr  # EX_CONFIG: no restart


def test_health_needs_no_auth(client: TestClient) -> None:
    r = client.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_list_newest_first_with_metadata(client: TestClient) -> None:
    assert client.get("/clips").status_code == 401
    assert client.get("/clips", headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = client.get("/clips", headers=AUTH)
    assert r.status_code == 200
    items = r.json()["clips"]
    assert [c["name"] for c in items] == [CLIP, OLDER]  # no symlink listed
    assert items[0]["meta"] == {"start": 1704067200.0}
    assert items[0]["url"] == f"/clips/{CLIP}"


@pytest.mark.parametrize(
    ("header", "status", "span"),
    [
        ("bytes=0-99", 206, (0, 99)),
        ("bytes=100-", 206, (100, None)),
        ("bytes=-50", 206, (-50, None)),
        ("bytes=10-999999999", 206, (10, None)),
        ("bytes=999999999-", 416, None),
        ("bytes=20-10", 416, None),
        ("bytes=abc", 416, None),
        ("bytes=-0", 416, None),
        ("items=0-10", 200, None),  # another unit: ignored
        ("bytes=" + "1" * 5000 + "-", 416, None),
        ("bytes=-" + "9" * 5000, 206, (0, None)),  # a suffix longer than the file: all
        ("bytes=0-" + "9" * 5000, 206, (0, None)),  # a last byte past the end: to the end
        ("bytes=0-9999999999999999999", 206, (0, None)),
        ("bytes=" + "0" * 30 + "5-" + "0" * 30 + "9", 206, (5, 9)),
    ],
)
def test_range_requests(
    client: TestClient, clips: Path, header: str, status: int, span: tuple[int, int | None] | None
) -> None:
    data = (clips / CLIP).read_bytes()
    size = len(data)
    r = client.get(f"/clips/{CLIP}", headers=AUTH | {"Range": header})
    assert r.status_code == status
    if status == 206:
        assert span is not None
        start, end = span
        first = size + start if start < 0 else start
        last = size - 1 if end is None else end
        assert r.content == data[first : last + 1]
        assert r.headers["content-range"] == f"bytes {first}-{last}/{size}"
        assert int(r.headers["content-length"]) == last - first + 1
    elif status == 416:
        assert r.headers["content-range"] == f"bytes */{size}"
    else:
        assert r.content == data
    assert status == 416 or r.headers["accept-ranges"] == "bytes"


def test_head_gives_headers_only(client: TestClient, clips: Path) -> None:
    r = client.head(f"/clips/{CLIP}", headers=AUTH)
    assert r.status_code == 200 and r.content == b""
    assert int(r.headers["content-length"]) == (clips / CLIP).stat().st_size
    r = client.head(f"/clips/{CLIP}", headers=AUTH | {"Range": "bytes=0-9"})
    assert r.status_code == 206 and r.headers["content-length"] == "10"


def test_signed_links(tmp_path: Path, clips: Path) -> None:
    now = [1_000_000.0]
    app = create_app(_settings(tmp_path, link_secret="link-key"), clock=lambda: now[0])
    with TestClient(app) as c:
        good = sign_link("link-key", CLIP, 1_000_060)
        assert c.get(f"/clips/{CLIP}?{good}").status_code == 200
        other = sign_link("link-key", OLDER, 1_000_060)
        assert c.get(f"/clips/{CLIP}?{other}").status_code == 403  # link of another clip
        forged = sign_link("not-the-key", CLIP, 1_000_060)
        assert c.get(f"/clips/{CLIP}?{forged}").status_code == 403
        stretched = good.replace("1000060", "1999999")
        assert c.get(f"/clips/{CLIP}?{stretched}").status_code == 403
        assert c.get(f"/clips/{CLIP}?expires=1000060").status_code == 401
        now[0] = 1_000_061
        r = c.get(f"/clips/{CLIP}?{good}")
        assert r.status_code == 403 and "expired" in r.json()["error"]
        assert c.get(f"/clips/{CLIP}").status_code == 401
        assert c.get(f"/clips/{CLIP}", headers={"Authorization": "Bearer x"}).status_code == 401


def test_link_secret_falls_back_to_token(client: TestClient) -> None:
    link = sign_link(TOKEN, CLIP, int(time.time()) + 60)
    assert client.get(f"/clips/{CLIP}?{link}").status_code == 200


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/clips/missing_20240101T000000Z_000000.mp4", 404),
        ("/clips/main_20240102T000000Z_ffffff.mp4", 404),  # symlink to outside
        ("/clips/..%2Fsecret.mp4", 400),
        ("/clips/%2e%2e%2fsecret.mp4", 400),
        ("/clips/%2Fetc%2Fpasswd", 400),
        ("/clips//etc/passwd", 400),
        ("/clips/sub%2F..%2F..%2Fsecret.mp4", 400),
        (f"/clips/{CLIP}.json", 400),
        ("/clips/.hidden.mp4", 400),
    ],
)
def test_traversal_rejected(client: TestClient, path: str, status: int) -> None:
    assert client.get(path, headers=AUTH).status_code == status


@pytest.fixture
def server(tmp_path: Path, clips: Path) -> Iterator[int]:
    port = free_port()
    config = uvicorn.Config(
        create_app(_settings(tmp_path)), host="127.0.0.1", port=port, log_config=None
    )
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield port
    srv.should_exit = True
    thread.join(timeout=10)


def _raw(port: int, method: str, path: str, headers: dict[str, str]) -> tuple[int, dict, bytes]:
    """One request with the path sent exactly as given (no client-side normalisation)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers=headers)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def test_real_server_range_and_traversal(server: int, clips: Path) -> None:
    data = (clips / CLIP).read_bytes()
    status, headers, body = _raw(server, "GET", f"/clips/{CLIP}", AUTH | {"Range": "bytes=5-"})
    assert status == 206 and body == data[5:]
    assert headers["content-range"] == f"bytes 5-{len(data) - 1}/{len(data)}"
    status, headers, body = _raw(server, "HEAD", f"/clips/{CLIP}", AUTH)
    assert status == 200 and body == b"" and int(headers["content-length"]) == len(data)
    for path in ("/clips/../secret.mp4", "/clips/%2e%2e/secret.mp4", "/clips/..%2fsecret.mp4"):
        status, _, body = _raw(server, "GET", path, AUTH)
        assert status in (400, 404) and b"outside" not in body, path
    assert _raw(server, "GET", "/health", {})[0] == 200
    assert _raw(server, "GET", f"/clips/{CLIP}", {"Authorization": "Bearer no"})[0] == 401


def test_enabled_false_exits_at_once(tmp_path: Path) -> None:
    settings = Settings(recorder={"clips_dir": tmp_path}, fileserver={"enabled": False})
    assert run_worker(FileServerWorker, settings) == 0  # no token needed: nothing is served
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGECAM_")}
    env["EDGECAM_FILESERVER__ENABLED"] = "false"
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "edgecam.cli", "worker", "fileserver"],
        capture_output=True, text=True, timeout=30, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 0 and "disabled" in proc.stderr
    assert time.monotonic() - started < 20


def test_listing_hides_device_paths(tmp_path: Path, clips: Path) -> None:
    sidecar = {
        "camera": "main",
        "start": 1704067200.0,
        "path": str(clips / CLIP),
        "segments": ["seg_000001.ts", "seg_000002.ts"],
        "sha256": "0" * 64,
    }
    (clips / CLIP).with_suffix(".json").write_text(json.dumps(sidecar))
    with TestClient(create_app(_settings(tmp_path))) as c:
        items = c.get("/clips", headers=AUTH).json()["clips"]
    assert items[0]["meta"] == {"camera": "main", "start": 1704067200.0, "sha256": "0" * 64}
    assert str(tmp_path) not in json.dumps(items)


CAM_A = "a_20240101T000000Z_abcdef.mp4"
CAM_A_B = "a_b_20240101T000000Z_123456.mp4"


@pytest.mark.parametrize(
    ("camera", "own", "foreign"), [("a", CAM_A, CAM_A_B), ("a_b", CAM_A_B, CAM_A)]
)
def test_camera_scope_is_exact(tmp_path: Path, camera: str, own: str, foreign: str) -> None:
    folder = tmp_path / "clips"
    folder.mkdir()
    for name in (CAM_A, CAM_A_B):
        (folder / name).write_bytes(name.encode())
    settings = Settings(
        device="testdev",
        cameras=[{"name": "a"}, {"name": "a_b"}],
        recorder={"clips_dir": folder, "ring_dir": tmp_path / "ring"},
        fileserver={"token": TOKEN},
    )
    with TestClient(create_app(settings, camera)) as c:
        assert [x["name"] for x in c.get("/clips", headers=AUTH).json()["clips"]] == [own]
        assert c.get(f"/clips/{own}", headers=AUTH).content == own.encode()
        assert c.get(f"/clips/{foreign}", headers=AUTH).status_code == 404
        assert c.head(f"/clips/{foreign}", headers=AUTH).status_code == 404
        assert c.get(signed_url(settings, foreign)).status_code == 404
        assert c.get(signed_url(settings, own)).status_code == 200


def test_signed_url_lifetime(tmp_path: Path, clips: Path) -> None:
    now = [1_000_000.0]
    settings = _settings(tmp_path, link_secret="link-key", link_ttl_s=60)
    with TestClient(create_app(settings, clock=lambda: now[0])) as c:
        url = signed_url(settings, CLIP, now=now[0])
        assert url.startswith(f"/clips/{CLIP}?") and "expires=1000060" in url
        assert c.get(url).status_code == 200
        now[0] += 60
        assert c.get(url).status_code == 200
        now[0] += 1
        r = c.get(url)
        assert r.status_code == 403 and "expired" in r.json()["error"]
    default = _settings(tmp_path)
    with TestClient(create_app(default)) as c:
        assert c.get(signed_url(default, CLIP)).status_code == 200  # now: the real clock


@pytest.mark.parametrize(
    ("expires_in", "status"),
    [
        (60, 200),
        (60 + 5, 200),  # the fleet server's clock a little ahead
        (60 + 3600, 403),
        (253402300799 - 1_000_000, 403),  # year 9999
    ],
)
def test_signed_link_longer_than_ttl_rejected(
    tmp_path: Path, clips: Path, expires_in: int, status: int
) -> None:
    now = 1_000_000
    settings = _settings(tmp_path, link_secret="link-key", link_ttl_s=60)
    with TestClient(create_app(settings, clock=lambda: now)) as c:
        r = c.get(f"/clips/{CLIP}?" + sign_link("link-key", CLIP, now + expires_in))
        assert r.status_code == status
        if status == 403:
            assert "link_ttl_s" in r.json()["error"]


def test_a_link_refused_for_the_device_clock_being_behind_says_so(
    tmp_path: Path, clips: Path
) -> None:
    fleet_now = 1_000_000
    device_now = fleet_now - 3 * 3600  # set back 3 h (or not yet set by NTP)
    settings = _settings(tmp_path, link_secret="link-key", link_ttl_s=60)
    with TestClient(create_app(settings, clock=lambda: device_now)) as c:
        r = c.get(f"/clips/{CLIP}?" + sign_link("link-key", CLIP, fleet_now + 60))
    assert r.status_code == 403  # still refused: it cannot be told from a long-lived link
    assert "by 10800 s" in r.json()["error"] and "clock is behind" in r.json()["error"]


def _clip_fds(folder: Path) -> list[str]:
    """This process's open descriptors on files in ``folder``."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(folder.resolve())):
            found.append(target)
    return found


def test_clip_deleted_while_downloading(
    tmp_path: Path, clips: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retention deletes the clip just after the server opened it: the download still works."""
    data = (clips / CLIP).read_bytes()
    real_open = os.open

    def open_then_retention(path: str | os.PathLike[str], flags: int, *args: int) -> int:
        fd = real_open(path, flags, *args)
        if Path(path).name == CLIP:
            ClipStore(clips, max_bytes=0, max_age_s=0, min_free_bytes=0).apply_retention()
        return fd

    monkeypatch.setattr(fileserver.os, "open", open_then_retention)
    with TestClient(create_app(_settings(tmp_path))) as c:
        r = c.get(f"/clips/{CLIP}", headers=AUTH | {"Range": "bytes=10-"})
        assert r.status_code == 206 and r.content == data[10:]
        assert not (clips / CLIP).exists()
        assert c.get(f"/clips/{CLIP}", headers=AUTH).status_code == 404
    assert _clip_fds(clips) == []


def test_clip_deleted_before_open(
    tmp_path: Path, clips: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retention deletes the clip between the name check and the open: 404, nothing leaks."""
    real_path_of = ClipStore.path_of

    def path_of_then_retention(store: ClipStore, name: str) -> Path | None:
        path = real_path_of(store, name)
        if path is not None:
            path.unlink()
        return path

    monkeypatch.setattr(ClipStore, "path_of", path_of_then_retention)
    with TestClient(create_app(_settings(tmp_path)), raise_server_exceptions=False) as c:
        r = c.get(f"/clips/{CLIP}", headers=AUTH)
        assert r.status_code == 404 and r.json() == {"error": "no such clip"}
    assert _clip_fds(clips) == []


def test_aborted_downloads_close_the_file(server: int, clips: Path) -> None:
    big = clips / "main_20240103T000000Z_b16b16.mp4"
    big.write_bytes(os.urandom(16 * 1024 * 1024))  # far more than the socket buffers hold
    request = f"GET /clips/{big.name} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
    for extra in ("", "Range: bytes=100-\r\n"):
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", server), timeout=10) as sock:
                sock.sendall(f"{request}{extra}\r\n".encode())
                assert sock.recv(1000).startswith(b"HTTP/1.1 20")
    _wait_all_closed(clips)
    status, _, body = _raw(server, "GET", f"/clips/{big.name}", AUTH)
    assert status == 200 and len(body) == big.stat().st_size
    # The server closes the file after its last write, which can land after we read it.
    _wait_all_closed(clips)


def _wait_all_closed(clips: Path) -> None:
    deadline = time.monotonic() + 10
    while _clip_fds(clips):
        assert time.monotonic() < deadline, f"clip files left open: {_clip_fds(clips)}"
        time.sleep(0.05)


def test_validators_and_conditional_requests(client: TestClient, clips: Path) -> None:
    data = (clips / CLIP).read_bytes()
    r = client.get(f"/clips/{CLIP}", headers=AUTH)
    etag, modified = r.headers["etag"], r.headers["last-modified"]
    assert etag.startswith('"') and modified.endswith("GMT")
    assert client.head(f"/clips/{CLIP}", headers=AUTH).headers["etag"] == etag
    for headers in ({"If-None-Match": etag}, {"If-None-Match": f'"x", W/{etag}'}):
        r = client.get(f"/clips/{CLIP}", headers=AUTH | headers)
        assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == etag
    r = client.get(f"/clips/{CLIP}", headers=AUTH | {"If-Modified-Since": modified})
    assert r.status_code == 304
    r = client.get(f"/clips/{CLIP}", headers=AUTH | {"If-None-Match": '"other"'})
    assert r.status_code == 200 and r.content == data
    # If-Range: the part while the clip is the same one, else the whole new clip.
    part = {"Range": "bytes=10-19"}
    for validator, status in ((etag, 206), (modified, 206), ('"other"', 200)):
        r = client.get(f"/clips/{CLIP}", headers=AUTH | part | {"If-Range": validator})
        assert r.status_code == status, validator
        assert r.content == (data[10:20] if status == 206 else data)
    # Garbage in the conditional headers is ignored, never an error.
    for name in ("If-Modified-Since", "If-Range"):
        r = client.get(f"/clips/{CLIP}", headers=AUTH | part | {name: "yesterday\x7f"})
        assert r.status_code in (200, 206)


@contextlib.contextmanager
def _guarded_server(tmp_path: Path, **limits: float) -> Iterator[int]:
    """The file server under uvicorn with its own connection limits, changed by ``limits``."""
    settings = _settings(tmp_path, port=free_port())
    config = fileserver.server_config(create_app(settings), settings.fileserver, **limits)  # type: ignore[arg-type]
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield settings.fileserver.port
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def strict_server(tmp_path: Path, clips: Path) -> Iterator[int]:
    """The file server with its connection timeouts shortened."""
    with _guarded_server(tmp_path, header_timeout_s=1, idle_timeout_s=1) as port:
        yield port


def _closed_after(sock: socket.socket, trickle: bytes = b"") -> float:
    """Seconds until the server closes ``sock``, sending ``trickle`` a byte every 0.2 s."""
    start = time.monotonic()
    sock.settimeout(0.2)
    sent = 0
    while time.monotonic() - start < 10:
        try:
            if sock.recv(65536) == b"":
                return time.monotonic() - start
        except TimeoutError:
            if sent < len(trickle):
                sock.sendall(trickle[sent : sent + 1])
                sent += 1
        except ConnectionResetError:
            return time.monotonic() - start
    return math.inf


def test_idle_and_slow_connections_are_closed(strict_server: int) -> None:
    head = f"GET /clips HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n".encode()
    with socket.create_connection(("127.0.0.1", strict_server)) as silent:
        assert _closed_after(silent) < 2.5  # connects, says nothing
    with socket.create_connection(("127.0.0.1", strict_server)) as slow:
        assert _closed_after(slow, head * 10) < 2.5  # a header line a byte at a time
    with socket.create_connection(("127.0.0.1", strict_server)) as idle:
        idle.sendall(head + b"\r\n")
        time.sleep(0.3)
        assert b" 200 " in idle.recv(65536)
        assert _closed_after(idle) < 2.5  # kept alive, then idle
    with socket.create_connection(("127.0.0.1", strict_server)) as second:
        second.sendall(head + b"\r\n")
        time.sleep(0.3)
        assert b" 200 " in second.recv(65536)
        assert _closed_after(second, head * 10) < 2.5  # the next request's head trickles
    # A normal client is served as before.
    assert _raw(strict_server, "GET", "/health", {})[0] == 200


def _served(port: int) -> bool:
    try:
        return _raw(port, "GET", "/health", {})[0] == 200
    except (ConnectionError, http.client.RemoteDisconnected):
        return False


def test_connections_over_the_caps_areclosed_at_once(tmp_path: Path, clips: Path) -> None:
    # Each held connection has sent part of a request head, as a slowloris client does.
    limits = {"max_connections": 6, "max_connections_per_client": 3}
    with _guarded_server(tmp_path, **limits) as port, contextlib.ExitStack() as held:

        def connect(source: str) -> socket.socket:
            sock = held.enter_context(
                socket.create_connection(("127.0.0.1", port), source_address=(source, 0))
            )
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            return sock

        flood = [connect("127.0.0.2") for _ in range(3)]
        assert not any(closed_at_once(s) for s in flood)
        assert closed_at_once(connect("127.0.0.2"))  # one address: no more than 3
        assert _served(port)  # the others are served
        assert not any(closed_at_once(connect("127.0.0.3")) for _ in range(3))
        assert closed_at_once(connect("127.0.0.4"))  # 6 in all: no more
        assert not _served(port)
        for sock in flood:
            sock.close()
        deadline = time.monotonic() + 5
        while not _served(port):
            assert time.monotonic() < deadline, "not served once the flood ended"
            time.sleep(0.1)


def test_damaged_sidecars_and_odd_files_in_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "clips"
    folder.mkdir()
    sidecars = [b"{bad", b"[1, 2]", b'"x"', b'{"a": ' * 5000 + b"1" + b"}" * 5000, b"\xff\xfe"]
    names = [f"main_2024010{i}T000000Z_abcde{i}.mp4" for i in range(len(sidecars))]
    for name, sidecar in zip(names, sidecars, strict=True):
        (folder / name).write_bytes(b"video")
        (folder / name).with_suffix(".json").write_bytes(sidecar)
    fifo, directory = "main_20240109T000000Z_abcdef.mp4", "main_20240108T000000Z_abcdef.mp4"
    os.mkfifo(folder / fifo)  # opening it would block the server
    (folder / directory).mkdir()
    with TestClient(create_app(_settings(tmp_path))) as c:
        r = c.get("/clips", headers=AUTH)
        assert r.status_code == 200
        assert sorted(x["name"] for x in r.json()["clips"]) == names
        assert all(x["meta"] == {} for x in r.json()["clips"])
        for name in (fifo, directory):
            assert c.get(f"/clips/{name}", headers=AUTH).status_code == 404


def test_an_address_guessing_the_token_is_refused_for_a_while(tmp_path: Path, clips: Path) -> None:
    now = [1_000_000.0]
    settings = _settings(tmp_path, max_auth_failures=3, auth_lockout_s=1)
    app = create_app(settings, clock=lambda: now[0])
    wrong = {"Authorization": "Bearer guess"}
    with (
        TestClient(app, client=("10.0.0.9", 5000)) as guesser,
        TestClient(app, client=("10.0.0.1", 5000)) as owner,
    ):
        # Links are signed (nothing to guess at speed): expired or forged, they never count.
        expired = sign_link(TOKEN, CLIP, 999_990)
        forged = sign_link("not-the-key", CLIP, 1_000_060)
        for link in [expired, forged] * 3:
            assert guesser.get(f"/clips/{CLIP}?{link}").status_code == 403
        assert guesser.get("/clips", headers=AUTH).status_code == 200
        for _ in range(3):
            assert guesser.get("/clips", headers=wrong).status_code == 401
        # The third wrong token: from now on even the right one is refused, and health too.
        refused = guesser.get("/clips", headers=AUTH)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert guesser.get("/health").status_code == 429
        # Another address is not concerned.
        assert owner.get("/clips", headers=AUTH).status_code == 200
        assert owner.get("/clips", headers=wrong).status_code == 401
        assert owner.get("/clips", headers=AUTH).status_code == 200
        time.sleep(1.1)  # past the window, the address is served again
        assert guesser.get("/clips", headers=AUTH).status_code == 200


@pytest.mark.parametrize(
    ("host", "served"),
    [
        ("127.0.0.1:8081", True),
        ("[::1]:8081", True),
        ("[fd00::5]", True),
        ("203.0.113.7:8081", True),  # an address cannot be rebound, public or not
        ("door-1:8081", True),  # local names
        ("door-1.local", True),
        ("DOOR-1.LAN.", True),
        ("cam-1.cams.example.com", True),  # fileserver.allowed_hosts
        ("door.example.org:443", True),  # fileserver.public_url's host
        ("evil.example", False),  # a page whose name was pointed at the device
        ("evil.example:8081", False),
        ("127.0.0.1.evil.example", False),
        ("a.b.cams.example.com", False),  # "*" is one label
        ("evil%2eexample", False),
        ("2130706433", False),
        ("[::1", False),
        ("[::1]x", False),
        ("door-1:80:80", False),
        ("", False),
    ],
)
def test_only_names_the_device_is_known_by_are_served(
    tmp_path: Path, clips: Path, host: str, served: bool
) -> None:
    """Against DNS rebinding: another site's name, pointed at the device by its DNS, makes
    the site's page same-origin with the device; its requests still name that site."""
    settings = _settings(
        tmp_path,
        allowed_hosts=["*.cams.example.com"],
        public_url="https://door.example.org/edgecam",
    )
    with TestClient(create_app(settings)) as c:
        r = c.get("/clips", headers={**AUTH, "Host": host})
        if served:
            assert r.status_code == 200, r.text
        else:
            assert r.status_code == 400 and "fileserver.allowed_hosts" in r.json()["error"]
            with (
                pytest.raises(WebSocketDisconnect) as closed,
                c.websocket_connect("/live/main/ws", headers={"Host": host}),
            ):
                pass
            assert closed.value.code == 1008


def test_allowed_hosts_star_takes_every_name(tmp_path: Path, clips: Path) -> None:
    with TestClient(create_app(_settings(tmp_path, allowed_hosts=["*"]))) as c:
        assert c.get("/clips", headers={**AUTH, "Host": "cams.example.com"}).status_code == 200
        assert c.get("/clips", headers={**AUTH, "Host": "evil%2e"}).status_code == 400


@pytest.mark.parametrize(
    ("fileserver", "live"),
    [
        ({"host": "cam-7.example.com"}, {}),  # a name to listen on: the alerts' links
        ({}, {"public_url": "https://live.example.net:8443"}),  # `edgecam live-url`'s links
    ],
)
def test_the_links_the_device_gives_out_are_served(
    tmp_path: Path, clips: Path, fileserver: dict[str, str], live: dict[str, str]
) -> None:
    settings = Settings(
        cameras=[{"name": "main"}],
        recorder={"clips_dir": tmp_path / "clips", "ring_dir": tmp_path / "ring"},
        fileserver={"token": TOKEN, **fileserver},
        live=live,
    )
    with TestClient(create_app(settings)) as c:
        for link in (settings.fileserver.base_url(), live_url(settings)):
            r = c.get("/clips", headers={**AUTH, "Host": urlsplit(link).netloc})
            assert r.status_code == 200, (link, r.text)


def test_allowed_hosts_are_checked_in_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="allowed_hosts"):
        _settings(tmp_path, allowed_hosts=["cams.example.com/x"])


def test_tokens_sent_at_once_cannot_all_be_tried() -> None:
    """The check and the count are one step: 50 guesses at once get as many tries as 50
    one after another (a check at the start and a count at the end let all 50 through)."""
    guard = TokenGuard("the-token", max_failures=5, window_s=60)
    start = threading.Barrier(50)
    tried: list[bool] = []

    def guess(i: int) -> None:
        start.wait()
        tried.append(guard.check(f"guess-{i}", "10.0.0.9"))

    threads = [threading.Thread(target=guess, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert tried.count(False) == 50 and guard.locked("10.0.0.9")
    assert len(guard._failures) == 1 and guard._failures.count("10.0.0.9") == 5
    assert not guard.check("the-token", "10.0.0.9")  # locked: the right token too
    assert guard.check("the-token", "10.0.0.8")


def test_an_ipv6_household_is_counted_by_address_and_its_network_as_a_whole() -> None:
    guard = TokenGuard("the-token", max_failures=3, window_s=60)
    for _ in range(3):
        assert not guard.check("guess", "2001:db8:1:2::9")
    assert guard.locked("2001:db8:1:2::9")
    assert guard.check("the-token", "2001:db8:1:2::10")  # the rest of the household
    # A host taking a new address in its /64 for every few guesses is caught by the /64.
    for i in range(3 * TokenGuard.NETWORK_FACTOR):
        guard.check("guess", f"2001:db8:1:2::{i + 100:x}")
    assert not guard.check("the-token", "2001:db8:1:2::10")
    assert guard.check("the-token", "2001:db8:1:3::10")  # another network
    ipv4 = TokenGuard("the-token", max_failures=3, window_s=60)
    for _ in range(3):
        ipv4.check("guess", "10.0.0.9")
    assert ipv4.locked("10.0.0.9") and not ipv4.locked("10.0.0.8")
