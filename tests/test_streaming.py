"""The streaming worker with real RTSP clients (rtspsrc in-process, raw RTSP requests)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import ROOT, closed_at_once, free_port, free_udp_pair
from pydantic import SecretStr

from edgecam.config import StreamingConfig
from edgecam.errors import PipelineError

# PyGObject's importer warns on Python 3.11 ("exec_module() not found"); harmless.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", ImportWarning)
    from edgecam.media.gst import Gst, init
    from edgecam.media.streaming import MAX_REQUEST_BODY, StreamingServer

WIDTH, HEIGHT = 320, 180
Sender = Callable[..., subprocess.Popen[bytes]]


class Client:
    """An rtspsrc -> decoder -> appsink pipeline: a real RTSP client that decodes."""

    def __init__(
        self,
        url: str,
        *,
        protocols: str = "tcp",
        user: str | None = None,
        password: str | None = None,
    ) -> None:
        init()
        auth = f' user-id="{user}" user-pw="{password}"' if user is not None else ""
        self.pipeline = Gst.parse_launch(
            f"rtspsrc location={url} latency=0 protocols={protocols} tcp-timeout=5000000"
            f"{auth} ! rtph264depay wait-for-keyframe=true ! avdec_h264 ! videoconvert "
            "! video/x-raw,format=I420 "
            "! appsink name=sink sync=false max-buffers=4 drop=true"
        )
        self.sink = self.pipeline.get_by_name("sink")
        self.bus = self.pipeline.get_bus()
        self.pipeline.set_state(Gst.State.PLAYING)

    def frames(self, n: int, timeout: float = 10.0) -> tuple[int, int]:
        """Decode ``n`` frames; return the (width, height) from their caps."""
        deadline = time.monotonic() + timeout
        size = (0, 0)
        for _ in range(n):
            sample = None
            while sample is None:
                self.raise_error()
                if time.monotonic() > deadline:
                    raise AssertionError(f"no {n} frames within {timeout} s")
                sample = self.sink.try_pull_sample(100 * Gst.MSECOND)
            s = sample.get_caps().get_structure(0)
            size = (s.get_value("width"), s.get_value("height"))
        return size

    def raise_error(self) -> None:
        msg = self.bus.pop_filtered(Gst.MessageType.ERROR)
        if msg is not None:
            err, debug = msg.parse_error()
            raise ClientError(err, debug)

    def wait_end(self, timeout: float = 10.0) -> Gst.Message:
        """Wait for the stream to end (EOS or an error, e.g. the server went away)."""
        msg = self.bus.timed_pop_filtered(
            int(timeout * Gst.SECOND), Gst.MessageType.ERROR | Gst.MessageType.EOS
        )
        assert msg is not None, f"stream still running after {timeout} s"
        return msg

    def close(self) -> None:
        self.pipeline.set_state(Gst.State.NULL)


class ClientError(Exception):
    def __init__(self, err: object, debug: str | None) -> None:
        super().__init__(f"{err} ({debug})")
        self.err = err


@pytest.fixture
def clients() -> Iterator[Callable[..., Client]]:
    made: list[Client] = []

    def make(url: str, **kwargs: object) -> Client:
        client = Client(url, **kwargs)  # type: ignore[arg-type]
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture
def rtp_port(rtp_sender: Sender) -> int:
    port = free_udp_pair()
    rtp_sender(port, width=WIDTH, height=HEIGHT)
    return port


def _server(rtp_port: int, **config: object) -> StreamingServer:
    return StreamingServer(
        StreamingConfig(host="127.0.0.1", port=free_port(), **config),  # type: ignore[arg-type]
        {"main": rtp_port},
    )


def _rtsp_status(url: str, port: int, authorization: str | None = None) -> str:
    """Send one DESCRIBE and return the status line of the answer."""
    lines = [f"DESCRIBE {url} RTSP/1.0", "CSeq: 1", "Accept: application/sdp"]
    if authorization:
        lines.append(f"Authorization: {authorization}")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = s.recv(4096)
            if not chunk:
                break
            answer += chunk
    return answer.decode(errors="replace")


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize("protocols", ["tcp", "udp"])
def test_client_receives_decodable_frames(
    rtp_port: int, clients: Callable[..., Client], protocols: str
) -> None:
    with _server(rtp_port) as server:
        assert server.url.endswith("/main")
        client = clients(server.url, protocols=protocols)
        assert client.frames(15) == (WIDTH, HEIGHT)


def test_two_clients_at_once_share_one_media(rtp_port: int, clients: Callable[..., Client]) -> None:
    with _server(rtp_port) as server:
        first = clients(server.url)
        first.frames(5)
        second = clients(server.url, protocols="udp")
        second.frames(5)
        assert server.client_count == 2
        # Both keep receiving: a second udpsrc on the same port would starve the first.
        assert first.frames(15) == (WIDTH, HEIGHT)
        assert second.frames(15) == (WIDTH, HEIGHT)


def test_stop_and_start_streaming(
    rtp_port: int, rtp_sender: Sender, clients: Callable[..., Client]
) -> None:
    with _server(rtp_port) as server:
        port = int(server.url.rsplit(":", 1)[1].split("/")[0])
        before = clients(server.url)
        before.frames(5)

        server.streaming_stop()
        assert not server.streaming
        before.wait_end()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        # The RTP port is released (media unprepared), and the sender never noticed.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", rtp_port))

        server.streaming_stop()  # idempotent
        server.streaming_start()
        assert server.streaming
        after = clients(server.url)
        assert after.frames(10) == (WIDTH, HEIGHT)


@pytest.mark.parametrize(
    ("basic_auth", "path", "authorization", "status"),
    [
        (False, "main", None, "401"),
        (False, "main", _basic("alice", "s3cret"), "401"),  # Basic is not accepted
        (True, "main", _basic("alice", "wrong"), "401"),
        (True, "main", _basic("mallory", "s3cret"), "401"),
        (True, "main", _basic("alice", "s3cret"), "200"),
        (False, "nope", None, "401"),  # an unknown camera asks for credentials too
        (True, "nope", _basic("mallory", "s3cret"), "401"),
        (True, "nope", _basic("alice", "s3cret"), "404"),  # once authenticated: not found
    ],
)
def test_auth_status(
    rtp_port: int, basic_auth: bool, path: str, authorization: str | None, status: str
) -> None:
    config = {"user": "alice", "password": SecretStr("s3cret"), "basic_auth": basic_auth}
    with _server(rtp_port, **config) as server:
        port = int(server.url.rsplit(":", 1)[1].split("/")[0])
        answer = _rtsp_status(server.url_of(path), port, authorization)
        assert answer.split("\r\n", 1)[0].split(" ")[1] == status, answer
        if status == "401":
            assert 'WWW-Authenticate: Digest realm="edgecam"' in answer
            assert ("WWW-Authenticate: Basic" in answer) == basic_auth


def test_auth_with_real_clients(rtp_port: int, clients: Callable[..., Client]) -> None:
    with _server(rtp_port, user="alice", password=SecretStr("s3cret")) as server:
        good = clients(server.url, user="alice", password="s3cret")
        assert good.frames(5) == (WIDTH, HEIGHT)
        bad = clients(server.url, user="alice", password="nope")
        msg = bad.wait_end()
        assert msg.type == Gst.MessageType.ERROR
        assert msg.parse_error()[0].matches(
            Gst.ResourceError.quark(), Gst.ResourceError.NOT_AUTHORIZED
        )


def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = StreamingServer(
            StreamingConfig(host="127.0.0.1", port=port), {"main": free_udp_pair()}
        )
        with pytest.raises(PipelineError, match=rf"{port}.*in use.*streaming\.port"):
            server.start()
        assert not server.running


def test_stop_releases_port_and_thread(rtp_port: int, clients: Callable[..., Client]) -> None:
    threads = set(threading.enumerate())
    server = _server(rtp_port)
    server.start()
    clients(server.url).frames(3)
    server.stop()
    server.stop()  # idempotent
    assert set(threading.enumerate()) == threads
    # Same port again at once, with a client connected a moment ago.
    again = StreamingServer(server._config, {"main": rtp_port})
    with again:
        assert clients(again.url).frames(3) == (WIDTH, HEIGHT)


@pytest.mark.parametrize(
    ("mounts", "match"),
    [
        ({"main": 0}, "rtp_port"),
        ({"a/b": 5400}, "camera"),
        ({"main": 70000}, "rtp_port"),
        ({}, "at least one camera"),
    ],
)
def test_constructor_validates(mounts: dict[str, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        StreamingServer(StreamingConfig(), mounts)


def test_one_server_serves_every_camera(rtp_sender: Sender, clients: Callable[..., Client]) -> None:
    first, second = free_udp_pair(), free_udp_pair()
    rtp_sender(first, width=WIDTH, height=HEIGHT)
    rtp_sender(second, width=320, height=240)
    config = StreamingConfig(host="127.0.0.1", port=free_port())
    with StreamingServer(config, {"door": first, "yard": second}) as server:
        assert clients(server.url_of("door")).frames(3) == (WIDTH, HEIGHT)
        assert clients(server.url_of("yard")).frames(3) == (320, 240)
        port = config.port
        assert _rtsp_status(server.url_of("nope"), port).split()[1] == "404"


def test_worker_process_serves_obeys_commands_and_stops_on_sigterm(
    rtp_port: int, clients: Callable[..., Client], tmp_path: Path
) -> None:
    port = free_port()
    env = {
        **os.environ,
        "EDGECAM_STREAMING__HOST": "127.0.0.1",
        "EDGECAM_STREAMING__PORT": str(port),
        "EDGECAM_CAMERAS": f'[{{"name": "cam1", "rtp_port": {rtp_port}}}]',
        "EDGECAM_RUNTIME__DIR": str(tmp_path / "run"),
    }

    def command(action: str) -> dict[str, object]:
        res = subprocess.run(
            [sys.executable, "-m", "edgecam.cli", "streaming", action],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 0, res.stderr
        return dict(json.loads(res.stdout))

    env.pop("EDGECAM_CONFIG", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgecam.cli", "worker", "streaming"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        client = None
        deadline = time.monotonic() + 15
        while client is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                client = clients(f"rtsp://127.0.0.1:{port}/cam1")
            except ConnectionRefusedError:
                assert proc.poll() is None, proc.communicate()[0].decode()
                assert time.monotonic() < deadline, "worker never listened"
                time.sleep(0.1)
        assert client.frames(5) == (WIDTH, HEIGHT)
        sock = tmp_path / "run" / "streaming.sock"
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        assert command("status")["streaming"] is True
        # stop on command: the RTSP port closes, the worker process lives on
        assert command("stop")["streaming"] is False
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        assert proc.poll() is None
        # start on command: clients decode again
        assert command("start")["streaming"] is True
        assert clients(f"rtsp://127.0.0.1:{port}/cam1").frames(5) == (WIDTH, HEIGHT)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
        assert proc.returncode == 0, out.decode()
        assert b"streaming: SIGTERM, stopping" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_session_of_vanished_client_expires(rtp_port: int) -> None:
    with _server(rtp_port, session_timeout_s=2) as server:
        proc = subprocess.Popen(
            [
                "gst-launch-1.0",
                "-q",
                "rtspsrc",
                f"location={server.url}",
                "protocols=udp",
                "!",
                "fakesink",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_for(lambda: server.session_count == 1, 10, "the client never set up")
        finally:
            proc.kill()  # no TEARDOWN, no more keep-alives
            proc.wait()
        _wait_for(lambda: server.session_count == 0, 15, "the stale session stayed")


def _describes(server: StreamingServer) -> bool:
    try:
        return _rtsp_status(server.url, _port(server)).startswith("RTSP/1.0 200")
    except ConnectionResetError:
        return False


def _port(server: StreamingServer) -> int:
    return int(server.url.rsplit(":", 1)[1].split("/", 1)[0])


def test_connections_over_the_caps_areclosed_at_once(rtp_port: int) -> None:
    """One address holding connections (each with part of a request, as a slowloris client
    sends) gets no more than its share; the server as a whole holds no more than its cap,
    far from the limit of open files where it could no longer accept nor answer."""
    config = StreamingConfig(host="127.0.0.1", port=free_port())
    server = StreamingServer(config, {"main": rtp_port}, max_clients=6, max_clients_per_address=3)
    with server, contextlib.ExitStack() as held:

        def connect(source: str) -> socket.socket:
            sock = held.enter_context(
                socket.create_connection(("127.0.0.1", config.port), source_address=(source, 0))
            )
            sock.sendall(b"OPTIONS * RTSP/1.0\r\nCSeq: 1\r\n")
            return sock

        flood = [connect("127.0.0.2") for _ in range(3)]
        assert not any(closed_at_once(s) for s in flood)
        assert closed_at_once(connect("127.0.0.2"))  # one address: no more than 3
        assert _describes(server)  # the others are served
        assert not any(closed_at_once(connect("127.0.0.3")) for _ in range(3))
        assert closed_at_once(connect("127.0.0.4"))  # 6 in all: no more
        assert not _describes(server)
        for sock in flood:
            sock.close()
        _wait_for(lambda: _describes(server), 5, "not served once the flood ended")


def test_a_request_body_over_the_limit_is_not_held(rtp_port: int) -> None:
    """A request declaring a body of 256 MB, sent as fast as loopback goes: before, the
    server held it all (RSS grew by the body's size) before answering."""
    with _server(rtp_port) as server:

        def get_parameter(length: int) -> socket.socket:
            sock = socket.create_connection(("127.0.0.1", _port(server)), timeout=5)
            sock.sendall(
                f"GET_PARAMETER {server.url} RTSP/1.0\r\nCSeq: 1\r\n"
                f"Content-Type: text/parameters\r\nContent-Length: {length}\r\n\r\n".encode()
            )
            return sock

        with get_parameter(100) as sock:  # a small body is read and answered
            sock.sendall(b"x" * 100)
            assert sock.recv(100).startswith(b"RTSP/1.0 451")
        with get_parameter(MAX_REQUEST_BODY + 1) as sock:
            assert sock.recv(100).startswith(b"RTSP/1.0 413")
        sent = 0
        with get_parameter(256 << 20) as sock, contextlib.suppress(OSError):
            while sent < 256 << 20:
                sock.sendall(b"x" * (1 << 20))
                sent += 1 << 20
        assert sent < 16 << 20, f"{sent >> 20} MB of the body taken"
        assert _describes(server)


def _wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)
