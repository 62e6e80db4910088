"""The fleet server's HTTP API and login over a real broker, SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import hashlib
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.routing import APIRoute
from server_support import FleetServer, server_settings, wait_until

from edgecam import httpconn
from edgecam.device.upload import UploadError, upload_clip
from edgecam.protocol import ClipReady
from edgecam.server import api, auth, dashboard
from edgecam.server.simulate import SimDevice, make_stats

ROOT = Path(__file__).resolve().parents[1]
CLIP = ROOT / "media" / "motion_720p30_4s.mp4"
PARAMS = {
    "device": "cam-1",
    "name": "a.mp4",
    "command_id": "0" * 32,
    "token_id": "1",
}


@pytest.fixture
def device(fleet: FleetServer, broker: int, prefix: str) -> Iterator[SimDevice]:
    dev = SimDevice("cam-1", "127.0.0.1", broker, prefix).start()
    wait_until(lambda: fleet.http.get("/api/devices").json())
    yield dev
    dev.stop()


def _protected_routes() -> list[tuple[str, str]]:
    out = [("GET", "/docs"), ("GET", "/openapi.json")]
    for route in [*api.router.routes, *dashboard.router.routes]:
        assert isinstance(route, APIRoute)
        if route.path in ("/health", "/login"):
            continue
        path = re.sub(r"\{(\w+)\}", lambda m: PARAMS[m.group(1)], route.path)
        out += [(method, path) for method in sorted(route.methods)]
    return out


def test_every_route_needs_credentials(fleet: FleetServer) -> None:
    routes = _protected_routes()
    assert len(routes) > 15
    for method, path in routes:
        response = fleet.anon.request(method, path, follow_redirects=False)
        if path.startswith(("/api", "/metrics", "/openapi")):
            assert response.status_code == 401, (method, path, response.status_code)
        else:  # dashboard pages send the browser to the login page
            assert response.status_code in (303, 401), (method, path, response.status_code)
        bad = fleet.anon.request(
            method, path, headers={"Authorization": "Bearer nope"}, follow_redirects=False
        )
        assert bad.status_code in (303, 401), (method, path, bad.status_code)
    assert fleet.anon.get("/health").json() == {"status": "ok"}
    assert fleet.anon.get("/login").status_code == 200
    assert fleet.anon.get("/static/app.css").status_code == 200


def _login(client: httpx.Client, password: str, known: str | None = None) -> httpx.Response:
    client.cookies.clear()
    if known is not None:  # this browser logged in before
        client.cookies.set("edgecam_known", known, path="/login")
    form = client.get("/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert csrf
    return client.post(
        "/login",
        data={"username": "admin", "password": password, "csrf": csrf.group(1)},
        follow_redirects=False,
    )


def test_login_wrong_password_lockout_and_csrf(fleet: FleetServer) -> None:
    client = fleet.anon
    assert _login(client, "wrong password").status_code == 401
    ok = _login(client, "correct horse battery")
    assert ok.status_code == 303
    assert "httponly" in ok.headers["set-cookie"].lower()
    assert client.get("/api/devices").status_code == 200  # the session works for the API
    # A change with the session cookie but without the CSRF token is refused.
    assert client.post("/api/tokens", json={}).status_code == 403
    page = client.get("/")
    csrf = re.search(r'"X-CSRF-Token": "([^"]+)"', page.text)
    assert csrf
    made = client.post("/api/tokens", json={"label": "x"}, headers={"X-CSRF-Token": csrf.group(1)})
    assert made.status_code == 201
    # Repeated failures lock the name out at that address, even with the right password...
    for _ in range(fleet.ctx.cfg.login_max_failures):
        _login(client, "guess")
    assert _login(client, "correct horse battery").status_code == 429
    # ...but not from another address: failing on purpose cannot lock the owner out.
    elsewhere = httpx.Client(
        base_url=fleet.url, transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=30
    )
    with elsewhere:
        assert _login(elsewhere, "correct horse battery").status_code == 303
    # The login form refuses a post without its CSRF cookie pair.
    client.cookies.clear()
    r = client.post("/login", data={"username": "admin", "password": "x", "csrf": "forged"})
    assert r.status_code == 403


@pytest.mark.parametrize(
    "path", ["/", "/alerts", "/docs", "/login", "/static/device.js", "/api/devices", "/nope"]
)
def test_every_answer_carries_the_security_headers(fleet: FleetServer, path: str) -> None:
    headers = fleet.http.get(path).headers
    assert headers["x-content-type-options"] == "nosniff"
    csp = dict(rule.strip().split(" ", 1) for rule in headers["content-security-policy"].split(";"))
    assert csp["frame-ancestors"] == "'none'"  # no page of it framed by another site
    # Scripts only from the server's own files (the API page: its one inline script, by hash).
    scripts = csp.get("script-src", csp["default-src"]).split()
    assert all(s == "'self'" or s.startswith("'sha256-") for s in scripts), scripts


def test_only_names_the_server_is_known_by_are_served(
    database_url: str, broker: int, prefix: str, tmp_path: Path
) -> None:
    """Against DNS rebinding: another site's name, pointed at the server by its DNS, makes
    the site's page same-origin with the server (to guess passwords from inside the
    network); its requests still name that site."""
    settings = server_settings(
        database_url, broker, prefix, tmp_path, allowed_hosts=["fleet.example.com"]
    )
    fleet = FleetServer(settings)
    try:
        for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "x%2ey"):
            refused = fleet.anon.get("/login", headers={"Host": host})
            assert refused.status_code == 400, host
            assert "server.allowed_hosts" in refused.json()["error"]
            assert refused.headers["x-content-type-options"] == "nosniff"
            api_call = fleet.http.get("/api/devices", headers={"Host": host})
            assert api_call.status_code == 400  # a token does not make a name known
        for host in ("127.0.0.1", "[::1]:8000", "fleet-1", "fleet.lan", "fleet.example.com"):
            assert fleet.anon.get("/login", headers={"Host": host}).status_code == 200, host
        assert fleet.http.get("/api/devices", headers={"Host": "fleet.example.com"}).is_success
    finally:
        fleet.close()


def test_one_client_cannot_hold_every_connection(fleet: FleetServer) -> None:
    """Slowloris: connections that never finish their request head, all from one address,
    are held only up to that address's share; the rest of the world is served."""
    port = int(fleet.url.rsplit(":", 1)[1])
    with contextlib.ExitStack() as held:

        def connect() -> socket.socket:
            sock = held.enter_context(
                socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0))
            )
            sock.sendall(b"GET /login HTTP/1.1\r\nHost: x\r\n")
            sock.settimeout(0.5)
            return sock

        socks = [connect() for _ in range(httpconn.MAX_CONNECTIONS_PER_CLIENT)]
        with pytest.raises(TimeoutError):
            socks[-1].recv(1)  # held, waiting for the rest of its head
        with pytest.raises(ConnectionResetError):  # closed as soon as accepted, head unread
            connect().recv(1)
        assert fleet.anon.get("/login").status_code == 200


def test_a_trusted_proxy_is_held_to_the_cap_in_all_only(
    database_url: str, broker: int, prefix: str, tmp_path: Path
) -> None:
    """A reverse proxy's connections carry many clients: one address, but no share of one."""
    settings = server_settings(
        database_url, broker, prefix, tmp_path, trusted_proxies=["127.0.0.2"]
    )
    fleet = FleetServer(settings)
    port = int(fleet.url.rsplit(":", 1)[1])
    try:
        with contextlib.ExitStack() as held:
            socks = [
                held.enter_context(
                    socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0))
                )
                for _ in range(httpconn.MAX_CONNECTIONS_PER_CLIENT + 10)
            ]
            for sock in socks:
                sock.sendall(b"GET /login HTTP/1.1\r\nHost: x\r\n")
            socks[-1].settimeout(0.5)
            with pytest.raises(TimeoutError):
                socks[-1].recv(1)  # held, waiting for the rest of its head
            socks[-1].sendall(b"\r\n")
            socks[-1].settimeout(5)
            assert socks[-1].recv(12) == b"HTTP/1.1 200"
    finally:
        fleet.close()


def test_token_revocation(fleet: FleetServer) -> None:
    made = fleet.http.post("/api/tokens", json={"label": "script"}).json()
    other = httpx.Client(base_url=fleet.url, headers={"Authorization": f"Bearer {made['token']}"})
    with other:
        assert other.get("/api/devices").status_code == 200
        assert fleet.http.delete(f"/api/tokens/{made['id']}").status_code == 204
        assert other.get("/api/devices").status_code == 401
    assert fleet.http.delete(f"/api/tokens/{made['id']}").status_code == 404


def test_device_online_stats_with_seq_and_buckets(fleet: FleetServer, device: SimDevice) -> None:
    devices = fleet.http.get("/api/devices").json()
    assert devices[0]["name"] == "cam-1"
    assert devices[0]["online"] is True
    assert devices[0]["cameras"] == ["main"]
    assert {w["name"] for w in devices[0]["workers"]} >= {"inference", "recorder"}
    now = time.time()
    for i in range(120):
        device.publish(make_stats("cam-1", i, now - 120 + i))
    device.seq = 120
    url = f"/api/devices/cam-1/stats?start={now - 200}&end={now + 1}"
    wait_until(lambda: len(fleet.http.get(url).json()) == 120)
    rows = fleet.http.get(url).json()
    assert [r["seq"] for r in rows] == list(range(120))
    buckets = fleet.http.get(url + "&bucket=60").json()
    assert sum(b["messages"] for b in buckets) == 120
    assert sum(b["people"] for b in buckets) == sum(r["people"] for r in rows)
    assert fleet.http.get(f"/api/devices/cam-1/stats?start={now}&end={now - 1}").status_code == 422
    metrics = fleet.http.get("/metrics").text
    assert "edgecam_devices_online 1" in metrics
    assert re.search(r"edgecam_messages_ingested_total \d+", metrics)
    # A device whose clock is a day behind moves the messages' age, not the ingest lag (the
    # time a message waited in this server, by this server's clock alone).
    device.publish(make_stats("cam-1", 120, now - 86400))
    device.seq = 121
    wait_until(lambda: "edgecam_message_age_seconds 86" in fleet.http.get("/metrics").text)
    lag = re.search(r"edgecam_ingest_lag_seconds ([0-9.e-]+)", fleet.http.get("/metrics").text)
    assert lag and float(lag.group(1)) < 10
    # Clips the device has still to upload are shown on its page.
    assert "clips to upload" not in fleet.http.get("/ui/devices/cam-1/state").text
    device.publish(device.status().model_copy(update={"uploads": 3}), retain=True)
    wait_until(lambda: fleet.http.get("/api/devices").json()[0]["uploads"] == 3)
    assert "clips to upload 3" in fleet.http.get("/ui/devices/cam-1/state").text


def test_command_and_its_result(fleet: FleetServer, device: SimDevice) -> None:
    r = fleet.http.post(
        "/api/devices/cam-1/commands", json={"name": "save_clip", "args": {"reason": "test"}}
    )
    assert r.status_code == 202, r.text
    command_id = r.json()["id"]
    wait_until(lambda: fleet.http.get(f"/api/commands/{command_id}").json()["result"])
    out = fleet.http.get(f"/api/commands/{command_id}").json()
    assert out["result"]["ok"] is True and out["sent"] is True
    assert device.commands[-1].args["reason"] == "test"
    bad = fleet.http.post("/api/devices/cam-1/commands", json={"name": "format_disk"})
    assert bad.status_code == 422
    bad = fleet.http.post(
        "/api/devices/cam-1/commands", json={"name": "worker_restart", "args": {"x": 1}}
    )
    assert bad.status_code == 422
    missing = fleet.http.post("/api/devices/nobody/commands", json={"name": "status"})
    assert missing.status_code == 404
    # A command the device would refuse unread (over 64 KiB) is refused here, not sent.
    sent = len(device.commands)
    huge = {"rule": "occupancy", "params": {"note": "x" * 200_000}}
    big = fleet.http.post("/api/devices/cam-1/commands", json={"name": "set_rule", "args": huge})
    assert big.status_code == 422 and "bytes" in big.text
    # NaN in the body: a clear 422, not a 500 (the error echoed the value, which no JSON has).
    nan = fleet.http.post(
        "/api/devices/cam-1/commands",
        content=b'{"name": "status", "args": NaN}',
        headers={"Content-Type": "application/json"},
    )
    assert nan.status_code == 422, nan.text
    time.sleep(0.5)
    assert len(device.commands) == sent


def test_clip_upload_with_device_token_sha_checked(
    fleet: FleetServer, device: SimDevice, tmp_path: Path
) -> None:
    _, token = auth.create_token(fleet.ctx.engine, "admin", "cam-1 uploads", device="cam-1")
    data = CLIP.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    clip = ClipReady(
        device="cam-1",
        camera="main",
        name="main-20260101-000000.mp4",
        path="/clips/main-20260101-000000.mp4",
        size=len(data),
        duration=4.0,
        sha256=sha,
        start=time.time() - 10,
        end=time.time() - 6,
        trigger=time.time() - 8,
        reason="manual",
    )
    device.publish(clip)
    upload_clip(fleet.url, "cam-1", token, CLIP, clip)
    upload_clip(fleet.url, "cam-1", token, CLIP, clip)  # again: harmless
    clips = fleet.http.get("/api/clips?device=cam-1").json()
    assert clips[0]["stored"] is True
    wait_until(lambda: fleet.http.get("/api/clips").json()[0]["duration"] == 4.0)
    got = fleet.http.get(clips[0]["play_url"])
    assert got.status_code == 200 and got.content == data
    part = fleet.http.get(clips[0]["play_url"], headers={"Range": "bytes=0-99"})
    assert part.status_code == 206 and part.content == data[:100]
    download = fleet.http.get(clips[0]["download_url"])
    assert "attachment" in download.headers["content-disposition"]
    # The device token uploads only its own clips and reads nothing.
    with pytest.raises(UploadError, match="403"):
        upload_clip(fleet.url, "cam-2", token, CLIP, attempts=1)
    device_client = httpx.Client(base_url=fleet.url, headers={"Authorization": f"Bearer {token}"})
    with device_client:
        assert device_client.get("/api/devices").status_code == 403
    # A damaged upload is refused.
    broken = tmp_path / "other.mp4"
    broken.write_bytes(data[:1000])
    with pytest.raises(UploadError, match="SHA-256"):
        upload_clip(fleet.url, "cam-1", token, broken, clip, attempts=1)
    # Other bytes, with their own right hash, never replace the clip the device announced.
    other = fleet.http.put(
        f"/api/devices/cam-1/clips/{clip.name}",
        content=data[:1000],
        headers={"X-Content-SHA256": hashlib.sha256(data[:1000]).hexdigest()},
    )
    assert other.status_code == 409, other.text
    assert fleet.http.get(clips[0]["play_url"]).content == data
    # No path escapes the clips folder.
    escape = fleet.http.put(
        "/api/devices/cam-1/clips/..%2F..%2Fx.mp4",
        content=b"x",
        headers={"X-Content-SHA256": hashlib.sha256(b"x").hexdigest()},
    )
    assert escape.status_code in (404, 422)
    assert not any(p.name == "x.mp4" for p in Path(fleet.ctx.cfg.clips_dir).parent.rglob("x.mp4"))


@pytest.mark.parametrize("ts", [1e20, -1e13, float("inf"), float("nan")])
def test_a_time_no_date_can_show_is_shown_as_a_dash(ts: float) -> None:
    # Such a time in the database broke every page that showed it (500), for good.
    assert dashboard._dt(ts) == "-"
    assert dashboard._dt(0.0) == "1970-01-01 00:00:00 UTC"


_SIGNED = "?expires=1767225600&sig=" + "ab" * 32


@pytest.mark.parametrize(
    ("url", "hosts", "why"),
    [
        # By default: private addresses and local names.
        ("http://10.0.0.5:8081/clips/a.mp4" + _SIGNED, [], None),
        ("http://127.0.0.1:8081/clips/a.mp4" + _SIGNED, [], None),
        ("http://[fd00::5]:8081/clips/a.mp4" + _SIGNED, [], None),
        ("http://door-1:8081/clips/a.mp4" + _SIGNED, [], None),
        ("http://door-1.lan:8081/edgecam/clips/a.mp4" + _SIGNED, [], None),
        ("http://door-1.local./clips/a.mp4" + _SIGNED, [], None),
        ("https://cam.example/edgecam/clips/a.mp4" + _SIGNED, [], "local network"),
        ("https://evil.example/phish/clips/a.mp4" + _SIGNED, [], "local network"),
        ("https://8.8.8.8/clips/a.mp4" + _SIGNED, [], "local network"),
        # Hosts a browser reads otherwise than written.
        ("http://evil%2ecom/clips/a.mp4" + _SIGNED, [], "local network"),
        ("http://evil%E3%80%82com/clips/a.mp4" + _SIGNED, [], "local network"),
        ("http://evil\u3002com/clips/a.mp4" + _SIGNED, [], "local network"),
        ("http://2130706433/clips/a.mp4" + _SIGNED, [], "local network"),
        ("http://134744072/clips/a.mp4" + _SIGNED, [], "local network"),
        ("http://0x8080808/clips/a.mp4" + _SIGNED, [], "local network"),
        ("http://0x7f.1/clips/a.mp4" + _SIGNED, [], "local network"),
        ("http://10.1/clips/a.mp4" + _SIGNED, [], "local network"),
        ("http://[::ffff:8.8.8.8]/clips/a.mp4" + _SIGNED, [], "local network"),
        ("http://0.0.0.0:8081/clips/a.mp4" + _SIGNED, [], "local network"),
        ("http://[::ffff:10.0.0.5]/clips/a.mp4" + _SIGNED, [], None),
        ("http://10.0.0.7%2eevil%2eexample/clips/a.mp4" + _SIGNED, ["10.0.0.*"], "device_link"),
        # Listed hosts, label by label.
        ("https://cam.example/edgecam/clips/a.mp4" + _SIGNED, ["cam.example"], None),
        ("http://cam-1.cams.lan:8081/clips/a.mp4" + _SIGNED, ["*.cams.lan"], None),
        ("http://CAM-1.Cams.LAN/clips/a.mp4" + _SIGNED, ["*.cams.lan"], None),
        ("http://10.0.0.5/clips/a.mp4" + _SIGNED, ["10.0.0.*"], None),
        ("http://[fd00::5]/clips/a.mp4" + _SIGNED, ["fd00:0:0:0::0005"], None),
        ("http://cam_1.cams.lan/clips/a.mp4" + _SIGNED, ["*.cams.lan"], None),
        ("http://10.0.0.7.evil.example/clips/a.mp4" + _SIGNED, ["10.0.0.*"], "device_link"),
        ("http://a.b.cams.lan/clips/a.mp4" + _SIGNED, ["*.cams.lan"], "device_link_hosts"),
        ("http://evil.example/clips/a.mp4" + _SIGNED, ["*.cams.lan"], "device_link_hosts"),
        ("http://10.0.0.5/clips/a.mp4" + _SIGNED, ["*.cams.lan"], "device_link_hosts"),
        # Only to that clip, signed.
        ("http://10.0.0.5/login", [], "this clip"),
        ("http://10.0.0.5/clips/b.mp4" + _SIGNED, [], "this clip"),
        ("http://10.0.0.5/clips/a.mp4/../../login" + _SIGNED, [], "this clip"),
        ("http://10.0.0.5/clips/a.mp4", [], "signed"),
        ("http://10.0.0.5/clips/a.mp4" + _SIGNED + "&next=https://evil.example", [], "signed"),
        ("https://10.0.0.5@evil.example/clips/a.mp4" + _SIGNED, [], "user name"),
        ("http://10.0.0.5/clips/a.mp4" + _SIGNED + "#x", [], "fragment"),
        ("javascript:alert(1)//clips/a.mp4", [], "http(s)"),
        ("http://[::1/clips/a.mp4" + _SIGNED, [], "not a URL"),
    ],
)
def test_device_links_are_followed_only_to_that_clip(
    url: str, hosts: list[str], why: str | None
) -> None:
    reason = api.refuse_device_link(url, "a.mp4", hosts)
    if why is None:
        assert reason is None
    else:
        assert reason is not None and why in reason


def test_a_device_cannot_send_the_operator_elsewhere(fleet: FleetServer, device: SimDevice) -> None:
    """A clip announced with a link that is not the device's signed link to it is shown,
    but the server does not redirect to it (a compromised camera could phish operators)."""

    def announce(name: str, url: str) -> None:
        now = time.time()
        device.publish(
            ClipReady(
                device="cam-1",
                camera="main",
                name=name,
                path=f"/clips/{name}",
                size=1000,
                duration=4.0,
                sha256="0" * 64,
                start=now - 10,
                end=now - 6,
                trigger=now - 8,
                reason="manual",
                url=url,
            )
        )

    good, bad = "main-20260101-000001.mp4", "main-20260101-000002.mp4"
    announce(good, f"http://10.0.0.5:8081/clips/{good}{_SIGNED}")
    announce(bad, "https://evil.example/login")
    wait_until(lambda: len(fleet.http.get("/api/clips").json()) == 2)
    followed = fleet.http.get(f"/api/clips/cam-1/{good}", follow_redirects=False)
    assert followed.status_code == 307
    assert followed.headers["location"] == f"http://10.0.0.5:8081/clips/{good}{_SIGNED}"
    refused = fleet.http.get(f"/api/clips/cam-1/{bad}", follow_redirects=False)
    assert refused.status_code == 404
    assert "location" not in refused.headers
    assert "not followed" in refused.json()["detail"]


@pytest.mark.parametrize("trusted", [True, False])
def test_behind_a_trusted_proxy_the_limits_count_the_real_clients(
    database_url: str, broker: int, prefix: str, tmp_path: Path, trusted: bool
) -> None:
    """Behind a reverse proxy every login comes from the proxy's address: with
    server.trusted_proxies its X-Forwarded-For names the client, and one client's failures
    do not lock out the others. Without, the header is a client's word and is ignored."""
    proxies = ["127.0.0.0/8"] if trusted else []  # a network, as uvicorn >= 0.31 reads them
    fleet = FleetServer(
        server_settings(database_url, broker, prefix, tmp_path, trusted_proxies=proxies)
    )
    try:
        client = fleet.anon
        client.headers["X-Forwarded-For"] = "203.0.113.5"
        for _ in range(fleet.ctx.cfg.login_max_failures):
            assert _login(client, "guess").status_code == 401
        assert _login(client, "correct horse battery").status_code == 429
        client.headers["X-Forwarded-For"] = "203.0.113.6"  # another client, or a spoofed one
        assert _login(client, "correct horse battery").status_code == (303 if trusted else 429)
    finally:
        fleet.close()


def test_a_trusted_proxy_must_be_an_ip_address() -> None:
    from edgecam.config import load_settings
    from edgecam.errors import ConfigError

    proxies = [" ::1 ", "10.1.2.3/8"]
    assert load_settings(**{"server.trusted_proxies": proxies}).server.trusted_proxies == [
        "::1",
        "10.0.0.0/8",
    ]
    with pytest.raises(ConfigError, match=r"server\.trusted_proxies.*'proxy\.lan' is not an IP"):
        load_settings(**{"server.trusted_proxies": ["proxy.lan"]})


def test_a_name_guessed_from_many_addresses_still_opens_from_a_known_browser(
    database_url: str, broker: int, prefix: str, tmp_path: Path
) -> None:
    # Two failures a name at an address (each failure is a password hash checked: fewer
    # make a faster test of the same limits).
    settings = server_settings(
        database_url, broker, prefix, tmp_path, trusted_proxies=["127.0.0.1"], login_max_failures=2
    )
    fleet = FleetServer(settings)
    owner = httpx.Client(base_url=fleet.url, timeout=30, headers={"X-Forwarded-For": "192.0.2.10"})
    try:
        assert _login(owner, "correct horse battery").status_code == 303
        known = owner.cookies.get("edgecam_known")
        assert known
        # Many addresses guess the admin's password, two tries each.
        guesses = fleet.ctx.cfg.login_max_failures * fleet.ctx.limiter.NAME_FACTOR
        guesser = fleet.anon
        for i in range(guesses):
            guesser.headers["X-Forwarded-For"] = f"198.51.100.{i // 2}"
            assert _login(guesser, "guess").status_code == 401
        # A new browser, from a new address: the name is locked.
        guesser.headers["X-Forwarded-For"] = "203.0.113.7"
        assert _login(guesser, "correct horse battery").status_code == 429
        # The owner's browser, known to the name, is not held by the name's lock.
        assert _login(owner, "correct horse battery", known=known).status_code == 303
        # Until the password changes: a cookie of the old one is known no more (whoever
        # had the old password has the old cookie too).
        auth.create_user(fleet.ctx.engine, "admin", "a new password, long enough")
        assert _login(owner, "a new password, long enough", known=known).status_code == 429
    finally:
        owner.close()
        fleet.close()


def test_logins_during_a_database_outage_lock_nobody_out(
    fleet: FleetServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy.exc import OperationalError

    real = auth.check_login

    def lost(*_args: object) -> None:
        raise OperationalError("SELECT", {}, Exception("server closed the connection"))

    monkeypatch.setattr(auth, "check_login", lost)
    for _ in range(3 * fleet.ctx.cfg.login_max_failures):  # a user retrying through it
        page = _login(fleet.anon, "correct horse battery")
        assert page.status_code == 503 and "database is unavailable" in page.text
    monkeypatch.setattr(auth, "check_login", real)
    assert _login(fleet.anon, "correct horse battery").status_code == 303
