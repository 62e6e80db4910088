"""The whole device: ``edgecam run`` with its workers as real processes, a real Mosquitto,
real clips. One device serves the tests of one module where they do not disturb each other.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import MEDIA, free_udp_pair
from hypothesis import given, settings
from hypothesis import strategies as st

from edgecam.device.broker import LocalBroker
from edgecam.device.demo_live import demo_config
from edgecam.device.harness import Device
from edgecam.protocol import COMMAND_NAMES

pytestmark = pytest.mark.timeout(300)


def _config(
    folder: Path, broker: LocalBroker, name: str = "testcam", **overrides: Any
) -> dict[str, Any]:
    config = demo_config(folder, broker, token="device-test-token", device=name)
    config["stats"] = {"interval_s": 2}
    config["supervisor"] = {"restart_min_s": 0.1, "heartbeat_timeout_s": 5}
    for key, value in overrides.items():
        config[key] = value
    return config


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    devices = ["testcam", "other", "twocams", "killed"]
    with LocalBroker(tmp_path_factory.mktemp("broker"), devices) as b:
        yield b


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory, broker: LocalBroker) -> Iterator[Device]:
    folder = tmp_path_factory.mktemp("device")
    dev = Device(folder, _config(folder, broker), broker)
    dev.start()
    try:
        dev.wait_running()
        yield dev
    finally:
        code = dev.stop()
        dev.listener.close()
        assert code == 0, dev.log()[-3000:]


def _rtsp_ok(port: int, camera: str = "main") -> bool:
    from edgecam.device.demo_live import _rtsp_frames

    frames, _size = _rtsp_frames(f"rtsp://127.0.0.1:{port}/{camera}", count=5, timeout=10)
    return frames == 5


def test_workers_are_processes_named_on_their_command_line(device: Device) -> None:
    workers = device.workers()
    assert set(workers) == {"fileserver", "streaming", "recorder/main", "inference"}
    for key, w in workers.items():
        cmdline = psutil.Process(w["pid"]).cmdline()
        name, _, camera = key.partition("/")
        assert cmdline[cmdline.index("worker") + 1] == name
        if camera:
            assert cmdline[cmdline.index("--camera") + 1] == camera


def test_stats_and_an_alert_with_exactly_one_clip(device: Device) -> None:
    msgs = device.listener
    stats = msgs.wait("stats with people", lambda k, d: k == "stats" and d["people"] >= 1, 30)
    assert stats["camera"] == "main" and set(stats["counts"]) == {"person"}
    assert stats["people"] == sum(stats["counts"].values()) and stats["end"] > stats["start"]
    assert 1 <= stats["peak"] <= 12 and stats["fps_out"] > 5
    assert {w["name"] for w in stats["workers"]} == {
        "fileserver",
        "streaming",
        "recorder",
        "inference",
    }
    seqs = [s["seq"] for s in msgs.of("stats")]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    raised = msgs.wait("an alert", lambda k, d: k == "alerts" and d["state"] == "raised", 60)
    assert raised["rule"] == "occupancy" and raised["value"] > 4
    clip = msgs.wait(
        "the alert's clip",
        lambda k, d: k == "alerts" and d["alert_id"] == raised["alert_id"] and d["clip"],
        60,
    )
    clips = [c for c in msgs.of("clips") if c.get("alert_id") == raised["alert_id"]]
    assert [c["name"] for c in clips][:1] == [clip["clip"]]
    body = urllib.request.urlopen(clip["clip_url"], timeout=30).read()  # the signed link
    import hashlib

    assert hashlib.sha256(body).hexdigest() == clips[0]["sha256"]
    assert clips[0]["duration"] > 3 and clips[0]["camera"] == "main"


def test_commands_round_trip(device: Device) -> None:
    status = device.command("status")
    assert status["ok"] and status["data"]["state"] == "online"
    rule = device.command("set_rule", rule="occupancy", params={"cooldown_s": 5})
    assert rule["ok"] and rule["data"]["params"]["cooldown_s"] == 5
    assert device.command("status")["data"]["rules"]["occupancy"]["cooldown_s"] == 5
    bad = device.command("set_rule", rule="occupancy", params={"max_people": -3})
    assert not bad["ok"] and "max_people" in bad["error"]
    unknown = device.command("reboot_everything")
    assert not unknown["ok"] and "unknown command" in unknown["error"]
    wrong = device.command("worker_restart", worker="nope")
    assert not wrong["ok"] and "unknown worker" in wrong["error"]
    clip = device.command("save_clip", camera="main", reason="test", pre=1, post=1)
    assert clip["ok"] and len(clip["data"]["job"]) == 32
    assert not device.command("save_clip", camera="nope")["ok"]
    stop = device.command("streaming_stop")
    port = device.config["streaming"]["port"]
    assert stop["ok"] and stop["data"]["streaming"] is False
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert device.command("streaming_start")["data"]["streaming"] is True
    assert _rtsp_ok(port)


def test_malformed_commands_get_error_results_and_replays_are_answered_once(
    device: Device,
) -> None:
    msgs = device.listener
    mark = msgs.mark()
    device.listener.publish(device.topic("cmd"), b"{not json")
    device.listener.publish(device.topic("cmd"), b'{"name": 5}')
    device.listener.publish(device.topic("cmd"), b"x" * 100_000)  # over the size limit
    replay = b'{"id": "' + b"a" * 32 + b'", "name": "status"}'
    device.listener.publish(device.topic("cmd"), replay)
    device.listener.publish(device.topic("cmd"), replay)
    msgs.wait("the replayed command's result", lambda k, d: d.get("command_id") == "a" * 32, 20)
    time.sleep(1.0)
    results = [d for k, d in msgs.messages[mark:] if k == "cmd/result"]
    assert sum(1 for r in results if r["command_id"] == "a" * 32) == 1
    errors = [r for r in results if not r["ok"]]
    assert len(errors) == 2 and all("malformed" in r["error"] for r in errors)
    assert device.command("status")["ok"]  # still serving


def test_kill9_of_each_worker_is_undone_alone(device: Device) -> None:
    port = device.config["streaming"]["port"]
    for key in ("fileserver", "streaming", "recorder/main", "inference"):
        before = device.workers()
        victim = before[key]
        mark = device.listener.mark()
        t0 = time.monotonic()
        os.kill(victim["pid"], signal.SIGKILL)
        device.wait_running(timeout=30, after=mark)
        back = time.monotonic() - t0
        after = device.workers()
        assert after[key]["pid"] != victim["pid"] and after[key]["restarts"] == 1
        for other, w in before.items():
            if other != key:
                assert after[other]["pid"] == w["pid"], f"{other} was touched"
        print(f"kill -9 {key}: running again after {back:.2f} s")
        assert back < 5, f"{key} took {back:.1f} s to come back"
    assert _rtsp_ok(port)


def test_a_hung_worker_is_killed_and_restarted(device: Device) -> None:
    victim = device.workers()["fileserver"]
    mark = device.listener.mark()
    os.kill(victim["pid"], signal.SIGSTOP)  # alive, but silent: no heartbeat
    try:
        device.listener.wait(
            "the hung worker restarting",
            lambda k, d: (
                k == "status"
                and any(
                    w["name"] == "fileserver" and w["pid"] != victim["pid"] and w["restarts"] > 0
                    for w in d["workers"]
                )
            ),
            30,
            after=mark,
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim["pid"], signal.SIGCONT)
    device.wait_running(timeout=30, after=mark)
    errors = [
        w["error"]
        for k, d in device.listener.messages[mark:]
        if k == "status"
        for w in d["workers"]
        if w["name"] == "fileserver" and w["error"]
    ]
    assert any("hung (no heartbeat" in e for e in errors), errors
    assert (
        not psutil.pid_exists(victim["pid"]) or psutil.Process(victim["pid"]).status() == "zombie"
    )


def test_worker_disable_enable_restart(device: Device) -> None:
    off = device.command("worker_disable", worker="fileserver")
    assert off["ok"]
    device.listener.wait(
        "fileserver disabled",
        lambda k, d: (
            k == "status"
            and any(w["name"] == "fileserver" and w["state"] == "disabled" for w in d["workers"])
        ),
        20,
    )
    on = device.command("worker_enable", worker="fileserver")
    assert on["ok"]
    mark = device.listener.mark()
    device.wait_running(timeout=30, after=mark)
    pid = device.workers()["recorder/main"]["pid"]
    assert device.command("worker_restart", worker="recorder", camera="main")["ok"]
    mark = device.listener.mark()
    device.wait_running(timeout=30, after=mark)
    assert device.workers()["recorder/main"]["pid"] != pid


def test_a_second_device_and_a_second_worker_are_refused(device: Device, tmp_path: Path) -> None:
    import subprocess
    import sys

    ring = Path(device.config["recorder"]["ring_dir"]) / "main"
    before = sorted(p.name for p in ring.iterdir())
    for args in (["run"], ["worker", "recorder"], ["worker", "inference"]):
        res = subprocess.run(
            [sys.executable, "-m", "edgecam.cli", *args, "--config", str(device.path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 1 and "already running" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
    assert (Path(device.config["runtime"]["dir"]) / "recorder.main.sock").exists()
    after = {p.name for p in ring.iterdir()}
    # The running recorder's ring was not emptied (its oldest segments age out meanwhile).
    assert len(before) >= 3 and set(before[-3:-1]) <= after
    status = subprocess.run(
        [sys.executable, "-m", "edgecam.cli", "status", "--config", str(device.path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert status.returncode == 0 and "inference" in status.stdout and "running" in status.stdout


def test_acl_keeps_devices_apart(device: Device, broker: LocalBroker) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    seen: list[str] = []
    other = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="acl-other")
    other.username_pw_set("other", broker.credentials["other"])
    other.on_message = lambda _c, _u, m: seen.append(m.topic)
    other.connect("127.0.0.1", broker.port)
    other.loop_start()
    try:
        other.subscribe("edgecam/testcam/#", qos=1)
        other.subscribe("edgecam/testcam/cmd", qos=1)
        time.sleep(0.5)
        mark = device.listener.mark()
        other.publish("edgecam/testcam/stats", b'{"spoofed": true}', qos=1).wait_for_publish(5)
        other.publish("edgecam/testcam/cmd", b'{"name": "status"}', qos=1).wait_for_publish(5)
        device.command("status")  # the fleet's command: the other device must not see it
        time.sleep(1.0)
        assert not [d for k, d in device.listener.messages[mark:] if d.get("spoofed")]
        assert seen == []
    finally:
        other.loop_stop()
        other.disconnect()


def test_two_cameras_one_rtsp_port_one_file_server(tmp_path: Path, broker: LocalBroker) -> None:
    cameras = [
        {"name": "street", "source": str(MEDIA / "pedestrians_30s.mp4"), "loop": True,
         "rtp_port": free_udp_pair()},
        {"name": "door", "source": str(MEDIA / "faces.mp4"), "loop": True,
         "rtp_port": free_udp_pair()},
    ]  # fmt: skip
    vision = {"profile": "mask", "detect_fps": 5}
    config = _config(tmp_path, broker, "twocams", cameras=cameras, vision=vision)
    dev = Device(tmp_path, config, broker)
    dev.start()
    try:
        dev.wait_running()
        for cam in ("street", "door"):
            assert _rtsp_ok(config["streaming"]["port"], cam)
            assert dev.command("save_clip", camera=cam, pre=1, post=1)["ok"]
        for cam in ("street", "door"):
            dev.listener.wait(
                f"a clip of {cam}", lambda k, d, c=cam: k == "clips" and d["camera"] == c, 60
            )  # type: ignore[misc]
        # The door clip holds one face on every frame: one person at a time, a mask label.
        door = dev.listener.wait(
            "door stats with a person",
            lambda k, d: k == "stats" and d["camera"] == "door" and d["people"] >= 1,
            30,
        )
        assert set(door["counts"]) == {"mask", "no_mask", "undecided"} and door["peak"] == 1
        assert all(s["peak"] <= 1 for s in dev.listener.of("stats") if s["camera"] == "door")
        assert dev.listener.of("stats")[0]["seq"] + 1 == dev.listener.of("stats")[1]["seq"]
        req = urllib.request.Request(
            f"http://127.0.0.1:{config['fileserver']['port']}/clips",
            headers={"Authorization": "Bearer device-test-token"},
        )
        listing = json.load(urllib.request.urlopen(req, timeout=10))
        names = [c["name"] for c in listing.get("clips", listing)]
        assert any(n.startswith("street_") for n in names)
        assert any(n.startswith("door_") for n in names)
    finally:
        assert dev.stop() == 0, dev.log()[-3000:]
        dev.listener.close()


def test_kill9_of_the_orchestrator_leaves_no_process(tmp_path: Path, broker: LocalBroker) -> None:
    config = _config(tmp_path, broker, "killed")
    dev = Device(tmp_path, config, broker)
    dev.start()
    try:
        dev.wait_running()
        children = dev.descendants()
        assert len(children) >= 4
        assert dev.proc is not None
        dev.proc.kill()
        dev.proc.wait()
        # A worker drains its pipelines, then is forced out 30 s after its signal at most.
        end = time.monotonic() + 40
        while any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children):
            if time.monotonic() > end:
                left = [c.pid for c in children if c.is_running()]
                raise AssertionError(f"still running: {left}\n{dev.log()[-3000:]}")
            time.sleep(0.2)
        offline = dev.listener.wait(
            "the last will", lambda k, d: k == "status" and d["state"] == "offline", 60
        )
        assert offline["device"] == "killed"
        # The device starts again on the same folders: locks of the dead are no obstacle.
        mark = dev.listener.mark()
        dev.start()
        dev.wait_running(after=mark)
    finally:
        dev.stop()
        dev.listener.close()


def test_broker_outage_and_device_restart_lose_nothing(tmp_path: Path) -> None:
    """The broker is away for 16 s; meanwhile the device makes stats, is restarted, makes
    more. Every stats message arrives, in order, when the broker is back: at least once
    (QoS 1: one whose acknowledgement the outage cut off comes again, with its own id, which
    the fleet server stores once)."""
    with LocalBroker(tmp_path / "broker", ["outage"]) as broker:
        config = _config(tmp_path, broker, "outage", stats={"interval_s": 1})
        config["mqtt"]["reconnect_max_s"] = 2  # the test is of what is kept, not of the wait
        dev = Device(tmp_path, config, broker, persistent_listener=True)
        dev.start()
        try:
            dev.wait_running()
            dev.listener.wait("stats", lambda k, d: k == "stats" and d["seq"] >= 2, 30)
            broker.stop()
            outage_start = time.monotonic()
            time.sleep(6)
            assert dev.stop() == 0  # restarted while the broker is down
            dev.start()
            time.sleep(max(0.0, 16 - (time.monotonic() - outage_start)))
            broker.start()
            produced = _last_seq(tmp_path / "outbox.sqlite")
            dev.listener.wait(
                "every stats message made during the outage",
                lambda k, d: k == "stats" and d["seq"] >= produced,
                60,
            )
        finally:
            dev.stop()
            dev.listener.close()
    stats = dev.listener.of("stats")
    first_id: dict[int, str] = {}
    for d in stats:  # a repeat is a redelivery of the same message, never a new one
        assert first_id.setdefault(d["seq"], d["id"]) == d["id"], d
    seqs = list(first_id)
    assert produced >= 8, produced  # about one a second during the outage, less the restart
    assert seqs == list(range(seqs[0], seqs[-1] + 1)), seqs  # none lost, in order
    assert len(stats) - len(seqs) <= 3, [d["seq"] for d in stats]  # redeliveries are rare


def _last_seq(outbox: Path) -> int:
    import sqlite3

    with sqlite3.connect(outbox) as db:
        return int(db.execute("SELECT value FROM counters WHERE name = 'seq'").fetchone()[0]) - 1


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
_commands = st.fixed_dictionaries(
    {"name": st.sampled_from([*COMMAND_NAMES, "nope", "", "x" * 40])},
    optional={
        "id": st.text(max_size=40) | st.just("b" * 32),
        "args": st.dictionaries(
            st.sampled_from(["camera", "worker", "rule", "params", "pre", "post", "at", "x"]),
            _json_values,
            max_size=4,
        )
        | _json_values,
        "v": _json_values,
    },
)
_payloads = _commands.map(lambda d: json.dumps(d, allow_nan=True).encode()) | st.binary(
    max_size=300
)


def test_fuzzed_commands_never_crash_the_device(device: Device) -> None:
    before = {k: w["pid"] for k, w in device.workers().items()}
    sent: list[bytes] = []

    @settings(max_examples=150, deadline=None, database=None)
    @given(_payloads)
    def publish(payload: bytes) -> None:
        if b"worker_disable" in payload or b"streaming_stop" in payload:
            return  # valid ones would do what they say; the rest is covered above
        sent.append(payload)
        device.listener.publish(device.topic("cmd"), payload)

    publish()
    assert len(sent) > 100
    time.sleep(2)
    assert device.proc is not None and device.proc.poll() is None
    assert device.command("status")["ok"]
    after = {k: w["pid"] for k, w in device.workers().items()}
    restarted = {k for k in before if before[k] != after[k]}
    # A fuzzed worker_restart may restart a worker; nothing may die of a command.
    assert all(w["state"] == "running" for w in device.workers().values()), restarted


def test_run_refuses_a_configuration_no_restart_would_mend(tmp_path: Path) -> None:
    import subprocess
    import sys

    config = tmp_path / "c.yaml"
    config.write_text(f"runtime: {{dir: {tmp_path / 'run'}}}\n")  # no file-server token
    res = subprocess.run(
        [sys.executable, "-m", "edgecam.cli", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1, res.stderr
    assert "needs a token" in res.stderr and "fileserver.enabled: false" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "run").exists()


def test_live_page_plays_through_the_device_and_survives_restarts(device: Device) -> None:
    """The device's HTTP worker serves the live view of its camera: a real browser plays
    it, sees the counts, and plays again after the inference worker is killed and after
    streaming is stopped and started by command."""
    import shutil

    from playwright.sync_api import sync_playwright

    from edgecam.config import load_settings
    from edgecam.device.liveview_http import live_url

    settings = load_settings(device.path)
    frames = "() => window.edgecamLive ? window.edgecamLive.frames : 0"
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=shutil.which("chromium"),
            headless=True,
            args=["--autoplay-policy=no-user-gesture-required"],
        )
        try:
            page = browser.new_page()
            page.goto(live_url(settings, "main") + "&mode=mse")
            page.wait_for_function(
                "() => document.getElementById('video').videoWidth === 768"
                " && window.edgecamLive.frames > 10",
                timeout=30_000,
            )
            page.wait_for_function(
                "() => window.edgecamLive.counts && 'person' in window.edgecamLive.counts",
                timeout=15_000,
            )
            os.kill(device.workers()["inference"]["pid"], signal.SIGKILL)
            mark = device.listener.mark()
            device.wait_running(timeout=30, after=mark)
            seen = page.evaluate(frames)
            page.wait_for_function(f"() => window.edgecamLive.frames > {seen + 30}", timeout=30_000)
            stopped = device.command("streaming_stop")
            assert stopped["ok"] and stopped["data"]["live"]["main"]["running"] is False
            started = device.command("streaming_start")
            assert started["ok"] and started["data"]["live"]["main"]["running"] is True
            seen = page.evaluate(frames)
            page.wait_for_function(f"() => window.edgecamLive.frames > {seen + 30}", timeout=30_000)
        finally:
            browser.close()
