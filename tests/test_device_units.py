"""The device's logic without processes: rules, interval statistics, the outbox, the event
channel, Home Assistant discovery, the broker's files."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from edgecam.config import AlertsConfig, Settings
from edgecam.device import homeassistant
from edgecam.device.broker import acl_text, password_line, write_broker_config
from edgecam.device.events import EventReceiver, EventSender, FrameSummary, Heartbeat
from edgecam.device.outbox import Outbox
from edgecam.device.rules import RuleEngine
from edgecam.device.stats import CameraFigures, IntervalStats
from edgecam.errors import ConfigError
from edgecam.protocol import WorkerState

if TYPE_CHECKING:
    from edgecam.device.orchestrator import Orchestrator
    from edgecam.protocol import Alert

# -- rules ------------------------------------------------------------------------------------


def _engine(**rules: dict[str, object]) -> RuleEngine:
    return RuleEngine(AlertsConfig.model_validate(rules))


def test_occupancy_trips_after_hold_ends_after_clear_and_cools_down() -> None:
    engine = _engine(occupancy={"max_people": 2, "hold_s": 1, "clear_s": 2, "cooldown_s": 10})
    three = [(1, "person"), (2, "person"), (3, "person")]
    assert engine.on_frame("cam", 0.0, 1, three) == []  # over, not yet for hold_s
    assert engine.on_frame("cam", 0.5, 1, three) == []
    (raised,) = engine.on_frame("cam", 1.0, 1, three)
    assert raised.change == "raised" and raised.alert.value == 3 and raised.alert.camera == "cam"
    assert engine.on_frame("cam", 1.5, 1, three) == []  # once per incident
    assert engine.on_frame("cam", 2.0, 1, three[:1]) == []  # under, not yet for clear_s
    (ended,) = engine.on_frame("cam", 4.0, 1, three[:1])
    assert ended.change == "ended" and ended.alert.alert_id == raised.alert.alert_id
    engine.on_frame("cam", 5.0, 1, three)
    assert engine.on_frame("cam", 6.5, 1, three) == []  # cooling down until 14.0
    assert engine.on_frame("cam", 14.0, 1, three)[0].change == "raised"


def test_occupancy_is_per_camera() -> None:
    engine = _engine(occupancy={"max_people": 0, "hold_s": 0})
    assert engine.on_frame("a", 0.0, 1, [(1, "person")])[0].alert.camera == "a"
    assert engine.on_frame("b", 0.0, 1, []) == []
    assert set(engine.active) == {("occupancy", "a")}


def test_no_mask_share_over_a_window_with_min_people() -> None:
    engine = _engine(no_mask={"threshold": 0.5, "min_people": 3, "window_s": 10})
    assert engine.on_frame("c", 0.0, 1, [(1, "no_mask"), (2, "no_mask")]) == []  # 2 < 3 people
    (raised,) = engine.on_frame("c", 1.0, 1, [(3, "mask")])  # 2 of 3 without: 0.67 > 0.5
    assert raised.alert.rule == "no_mask" and raised.alert.value == pytest.approx(0.667, 1e-3)
    assert engine.on_frame("c", 2.0, 1, [(4, "undecided")]) == []  # undecided: not counted
    (ended,) = engine.on_frame("c", 3.0, 1, [(4, "mask"), (5, "mask")])  # 2 of 5
    assert ended.change == "ended"


def test_no_mask_forgets_tracks_older_than_the_window() -> None:
    engine = _engine(no_mask={"threshold": 0.5, "min_people": 2, "window_s": 5})
    engine.on_frame("c", 0.0, 1, [(1, "no_mask"), (2, "no_mask")])
    assert engine.active
    changes = engine.on_frame("c", 6.0, 1, [(3, "mask")])  # 1 and 2 left the window
    assert changes[0].change == "ended"


def test_camera_offline_and_worker_down() -> None:
    engine = _engine(camera_offline={"after_s": 5}, worker_down={"after_s": 3})
    assert engine.tick(10.0, {"cam": 6.0}, []) == []
    (off,) = engine.tick(11.0, {"cam": 6.0}, [])
    assert off.alert.rule == "camera_offline" and "no video for 5 s" in off.alert.message
    assert engine.tick(12.0, {"cam": 11.5}, [])[0].change == "ended"
    down = WorkerState(name="recorder", camera="cam", state="restarting", restarts=1, since=0.0)
    assert engine.tick(2.0, {}, [down]) == []
    (w,) = engine.tick(3.0, {}, [down])
    assert w.alert.rule == "worker_down" and w.alert.subject == "recorder/cam"
    looping = down.model_copy(update={"state": "crash_loop", "since": 2.9})
    assert engine.tick(3.0, {}, [looping]) == []  # the same incident goes on
    up = down.model_copy(update={"state": "running"})
    assert engine.tick(4.0, {}, [up])[0].change == "ended"


def test_crash_loop_alerts_at_once_and_first_start_is_not_down() -> None:
    engine = _engine(worker_down={"after_s": 60})
    starting = WorkerState(name="inference", camera="c", state="starting", restarts=0, since=0)
    assert engine.tick(100.0, {}, [starting]) == []  # starting for the first time: not down
    loop = starting.model_copy(update={"state": "crash_loop", "restarts": 6, "since": 99.0})
    assert engine.tick(100.0, {}, [loop])[0].alert.message.startswith("worker inference/c is crash")


def test_set_rule_validates_and_applies() -> None:
    engine = _engine()
    assert engine.set_rule("occupancy", {"max_people": 1})["max_people"] == 1
    assert engine.config.occupancy.max_people == 1
    assert engine.describe()["occupancy"]["max_people"] == 1
    with pytest.raises(ValueError, match="unknown rule 'nope'"):
        engine.set_rule("nope", {})
    with pytest.raises(ValueError, match="max_people"):
        engine.set_rule("occupancy", {"max_people": -1})
    with pytest.raises(ValueError, match="bogus"):
        engine.set_rule("occupancy", {"bogus": 1})
    assert engine.config.occupancy.max_people == 1  # a refused change changes nothing


def test_disabled_rule_never_trips() -> None:
    engine = _engine(occupancy={"enabled": False, "max_people": 0, "hold_s": 0})
    assert engine.on_frame("c", 0.0, 1, [(1, "person")]) == []


# -- statistics -------------------------------------------------------------------------------


def test_interval_counts_each_track_once_under_its_last_label() -> None:
    stats = IntervalStats(start=0.0)
    stats.add_frame(7, [(1, "undecided"), (2, "mask")])
    stats.add_frame(7, [(1, "no_mask"), (2, "mask"), (3, "mask")])
    stats.add_frame(8, [(1, "mask")])  # a restarted worker: its track 1 is another person
    assert stats.counts(("mask", "no_mask", "undecided")) == {
        "mask": 3,
        "no_mask": 1,
        "undecided": 0,
    }
    assert stats.peak == 3 and stats.frames == 3


def test_figures_after_a_worker_restart_count_from_zero() -> None:
    before, after = CameraFigures(100, 99, 30), CameraFigures(10, 10, 3)
    assert after.minus(before) == CameraFigures(10, 10, 3)
    assert CameraFigures(130, 129, 40).minus(before) == CameraFigures(30, 30, 10)


class _Clock:
    """Wall and monotonic time, each moved by the test: the wall clock may be stepped."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, wall: float = 1.7e9) -> None:
        self.wall, self.steady = wall, 1000.0
        monkeypatch.setattr(time, "time", lambda: self.wall)
        monkeypatch.setattr(time, "monotonic", lambda: self.steady)

    def advance(self, seconds: float, step: float = 0.0) -> None:
        """``seconds`` pass; the wall clock is also stepped by ``step``."""
        self.steady += seconds
        self.wall += seconds + step


@pytest.mark.parametrize("step", [-3 * 3600.0, 10 * 365 * 86400.0, 0.0])
def test_stats_rates_hold_when_the_wall_clock_is_stepped(
    monkeypatch: pytest.MonkeyPatch, step: float
) -> None:
    from edgecam.device.orchestrator import Orchestrator
    from edgecam.protocol import Stats

    clock = _Clock(monkeypatch)
    orchestrator = Orchestrator(Settings())
    sent: list[Stats] = []
    monkeypatch.setattr(orchestrator, "_send", lambda _kind, payload: sent.append(payload))
    orchestrator._figures["main"] = CameraFigures(300, 300, 60)
    clock.advance(10.0, step)  # NTP, or an operator, sets the clock during the interval
    orchestrator._emit_stats()
    (stats,) = sent
    assert (stats.fps_in, stats.fps_out, stats.detections_per_s) == (30.0, 30.0, 6.0)
    assert stats.end == clock.wall and stats.end - stats.start == pytest.approx(10.0)


def _device_alerts(
    monkeypatch: pytest.MonkeyPatch, **alerts: object
) -> tuple[Orchestrator, list[Alert]]:
    """An orchestrator (no processes started) and the alerts it sends."""
    from edgecam.device.orchestrator import Orchestrator
    from edgecam.protocol import Alert

    orchestrator = Orchestrator(Settings(alerts=alerts))
    sent: list[Alert] = []

    def send(kind: str, payload: object) -> None:
        if isinstance(payload, Alert):
            sent.append(payload)

    monkeypatch.setattr(orchestrator, "_send", send)
    return orchestrator, sent


def _frame(people: int, wall: float) -> FrameSummary:
    tracks = [(i, "no_mask") for i in range(people)]
    return FrameSummary(worker="inference", camera="main", frame=1, wall_time=wall, tracks=tracks)


@pytest.mark.parametrize("step", [10 * 365 * 86400.0, -3 * 3600.0])
def test_no_false_or_missed_alerts_when_the_wall_clock_is_stepped(
    monkeypatch: pytest.MonkeyPatch, step: float
) -> None:
    clock = _Clock(monkeypatch)
    orchestrator, sent = _device_alerts(
        monkeypatch,
        camera_offline={"after_s": 5},
        worker_down={"after_s": 30},
        occupancy={"max_people": 1, "hold_s": 2, "clear_s": 2, "cooldown_s": 5},
        no_mask={"enabled": False},
    )
    recorder = orchestrator.supervisor.children["recorder/main"]
    recorder.set_state("restarting")  # down for 1 s when the clock is stepped
    recorder.restarts = 1
    orchestrator._on_frame(_frame(2, clock.wall))
    clock.advance(1.0, step)
    orchestrator._on_frame(_frame(2, clock.wall))  # the camera goes on, a frame a second
    orchestrator._tick_rules()
    assert sent == []  # neither "no video for 315360001 s" nor a worker down for years
    clock.advance(1.0)
    orchestrator._on_frame(_frame(2, clock.wall))
    (raised,) = sent  # over the limit for hold_s, however the clock was set meanwhile
    assert (raised.rule, raised.state, raised.started) == ("occupancy", "raised", clock.wall)
    orchestrator._on_frame(_frame(0, clock.wall))
    clock.advance(2.0)
    orchestrator._on_frame(_frame(0, clock.wall))
    assert [(a.rule, a.state, a.ended) for a in sent[1:]] == [("occupancy", "ended", clock.wall)]
    clock.advance(5.0)
    orchestrator._tick_rules()  # 5 s silent: set back 3 h, it once needed 3 h more
    assert [(a.rule, a.state) for a in sent[2:]] == [("camera_offline", "raised")]


def test_an_alert_clip_is_extended_after_the_wall_clock_is_set_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = _Clock(monkeypatch)
    orchestrator, _sent = _device_alerts(
        monkeypatch, occupancy={"max_people": 0, "hold_s": 0}, no_mask={"enabled": False}
    )
    orchestrator.supervisor.children["recorder/main"].set_state("running")
    asked: list[str] = []
    monkeypatch.setattr(orchestrator, "_request_clip", lambda _c, args: asked.append(args.key))
    orchestrator._on_frame(_frame(1, clock.wall))  # raised: its clip asked for
    clock.advance(6.0, -3 * 3600)  # past half of recorder.post_s (10 s), the clock set back
    orchestrator._on_frame(_frame(1, clock.wall))
    orchestrator._tick_rules()
    assert len(asked) == 2 and asked[0] == asked[1]  # the same clip, extended


# -- outbox -----------------------------------------------------------------------------------


def test_outbox_keeps_order_across_reopen_and_seq_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "state" / "outbox.sqlite"
    box = Outbox(path, max_messages=100, max_bytes=10**6)
    assert [box.next_seq() for _ in range(3)] == [0, 1, 2]
    for i in range(5):
        box.put("t", f"m{i}".encode())
    first = box.peek(2)
    box.ack(first[0].id)
    box.close()
    box = Outbox(path, max_messages=100, max_bytes=10**6)  # a device restart
    assert [m.payload for m in box.peek(10)] == [b"m1", b"m2", b"m3", b"m4"]
    assert len(box) == 4 and box.next_seq() == 3


def test_outbox_drops_oldest_beyond_count_and_bytes(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite", max_messages=3, max_bytes=10**6)
    for i in range(5):
        box.put("t", f"m{i}".encode())
    assert [m.payload for m in box.peek(10)] == [b"m2", b"m3", b"m4"] and box.dropped == 2
    box = Outbox(tmp_path / "b.sqlite", max_messages=100, max_bytes=250)
    for i in range(4):
        box.put("t", bytes([i]) * 100)
    assert [m.payload[0] for m in box.peek(10)] == [2, 3] and box.dropped == 2


def test_outbox_in_an_unusable_place_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(Exception, match=r"cannot open the MQTT outbox .*mqtt\.outbox"):
        Outbox(tmp_path / "file" / "o.sqlite", 10, 10**6)


# -- event channel ------------------------------------------------------------------------------


def test_events_cross_the_socket_and_garbage_is_counted(tmp_path: Path) -> None:
    receiver = EventReceiver(tmp_path / "events.sock")
    assert stat.S_IMODE((tmp_path / "events.sock").stat().st_mode) == 0o600
    sender = EventSender(tmp_path / "events.sock")
    try:
        assert sender.send(FrameSummary(worker="inference", camera="c", frame=3, wall_time=1.0,
                                        tracks=[(1, "mask")]))  # fmt: skip
        got = receiver.receive(1)
        assert isinstance(got, FrameSummary) and got.tracks == [(1, "mask")]
        assert got.pid == os.getpid()
        sender._sock.sendto(b'{"kind": "nope"}', str(tmp_path / "events.sock"))
        assert receiver.receive(1) is None and receiver.rejected == 1
    finally:
        sender.close()
        receiver.close()


def test_sender_without_a_listener_never_blocks_or_raises(tmp_path: Path) -> None:
    sender = EventSender(tmp_path / "nobody.sock")
    assert not sender.send(Heartbeat(worker="recorder", camera="c"))
    assert sender.dropped == 1
    sender.close()


# -- Home Assistant -------------------------------------------------------------------------------


def test_discovery_entities_per_camera() -> None:
    settings = Settings(device="door", cameras=[{"name": "a"}, {"name": "b"}])
    messages = dict(homeassistant.discovery_messages(settings))
    assert len(messages) == 2 * 6  # people, mask, no mask, alert, button, switch per camera
    button = json.loads(messages["homeassistant/button/door/a_save_clip/config"])
    assert button["command_topic"] == "edgecam/door/ha/a/save_clip"
    assert button["availability_topic"] == "edgecam/door/status"
    sensor = json.loads(messages["homeassistant/sensor/door/b_no_mask/config"])
    assert sensor["state_topic"] == "edgecam/door/ha/b/state"
    people_only = Settings(device="door", vision={"profile": "people"})
    assert len(homeassistant.discovery_messages(people_only)) == 4


@pytest.mark.parametrize(
    ("name", "payload", "command"),
    [
        ("edgecam/door/ha/a/save_clip", b"PRESS", "save_clip"),
        ("edgecam/door/ha/a/streaming/set", b"OFF", "streaming_stop"),
        ("edgecam/door/ha/a/streaming/set", b"on", "streaming_start"),
        ("edgecam/door/ha/a/streaming/set", b"maybe", None),
        ("edgecam/door/ha/zzz/save_clip", b"PRESS", None),
        ("edgecam/other/ha/a/save_clip", b"PRESS", None),
    ],
)
def test_home_assistant_commands(name: str, payload: bytes, command: str | None) -> None:
    settings = Settings(device="door", cameras=[{"name": "a"}])
    got = homeassistant.command_for(settings, name, payload)
    assert (got.name if got else None) == command


# -- broker files ---------------------------------------------------------------------------------


def test_password_lines_are_mosquitto_pbkdf2() -> None:
    line = password_line("d1", "pw", salt=b"0123456789ab")
    user, rest = line.split(":", 1)
    assert user == "d1" and rest.startswith("$7$101$") and len(rest.split("$")) == 5


def test_acl_lets_a_device_write_only_its_topics() -> None:
    text = acl_text(["d1"], "fleet", "edgecam", "homeassistant")
    block = text.split("user d1\n")[1]
    assert "topic write edgecam/d1/stats" in block and "topic read edgecam/d1/cmd" in block
    assert "edgecam/#" not in block and "d2" not in block


def test_broker_config_files_are_private(tmp_path: Path) -> None:
    written = write_broker_config(tmp_path / "b", devices=["d1", "d2"])
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "b").stat().st_mode) == 0o700
    with pytest.raises(ConfigError, match="not a valid name"):
        write_broker_config(tmp_path / "c", devices=["bad name"])
    with pytest.raises(ConfigError, match="distinct"):
        write_broker_config(tmp_path / "c", devices=["fleet"])


def test_a_full_outbox_disk_loses_messages_not_the_device(tmp_path: Path) -> None:
    from edgecam.device.orchestrator import Orchestrator
    from edgecam.protocol import Stats

    mount = tmp_path / "small"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)])
    if mounted.returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        settings = Settings(mqtt={"host": "127.0.0.1", "outbox": mount / "o.sqlite"})
        orchestrator = Orchestrator(settings)
        orchestrator.outbox = Outbox(settings.mqtt.outbox, 10**6, 10**9)
        stats = Stats(device="d", camera="main", seq=0, start=0, end=1)
        big = stats.model_copy(update={"counts": {f"label{i}": i for i in range(2000)}})
        for _ in range(200):  # far more than 256 kB
            orchestrator._send("stats", big)
        assert orchestrator._outbox_errors > 0  # logged and counted, never raised
        assert len(orchestrator.outbox) > 0  # what fitted is kept
        orchestrator.outbox.close()
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize(
    ("mqtt", "upload", "said"),
    [
        ({"host": "mqtt.example.com", "username": "d", "password": "p"}, None, ["MQTT to"]),
        ({"host": "1.2.3.4", "username": "d", "password": "p"}, None, ["MQTT to"]),
        ({"host": "mqtt.example.com", "username": "d", "password": "p", "tls": True}, None, []),
        ({"host": "broker.lan", "username": "d", "password": "p"}, None, []),
        ({"host": "192.168.1.4", "username": "d", "password": "p"}, None, []),
        ({"host": "[fd00::1]", "username": "d", "password": "p"}, None, []),
        ({}, "http://fleet.example.com:8000", ["upload.url is plain HTTP"]),
        ({}, "http://[2606:4700::1111]:8000", ["upload.url is plain HTTP"]),
        ({}, "https://fleet.example.com", []),
        ({}, "http://10.0.0.2:8000", []),
        ({}, "http://fleet:8000", []),
    ],
)
def test_secrets_sent_in_clear_beyond_the_local_network_are_warned_of(
    mqtt: dict[str, object], upload: str | None, said: list[str]
) -> None:
    from edgecam.device.orchestrator import sent_in_clear

    config: dict[str, object] = {"mqtt": mqtt}
    if upload:
        config["upload"] = {"url": upload, "token": "t"}
    warnings = sent_in_clear(Settings.model_validate(config))
    assert [w for w in warnings if not any(w.startswith(s) for s in said)] == []
    assert len(warnings) == len(said)
