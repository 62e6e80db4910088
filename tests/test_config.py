"""The strict config tree: defaults, typos, ranges, file vs environment, the CLI checks."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from edgecam.config import load_settings, settings_to_yaml, zone_depth_limit
from edgecam.errors import ConfigError


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "edgecam.yaml"
    path.write_text(text)
    return path


def test_defaults_are_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGECAM_CONFIG", raising=False)
    s = load_settings()
    assert [c.name for c in s.cameras] == ["main"]
    assert s.vision.profile == "mask"
    assert s.streaming.port == 8554 and s.fileserver.port == 8081
    assert s.rtp_ports(0) == (5400, 5401, 5402)


def _circle(n: int) -> str:
    """A polygon of ``n`` points on a circle, as YAML."""
    points = (
        (0.5 + 0.4 * math.cos(2 * math.pi * i / n), 0.5 + 0.4 * math.sin(2 * math.pi * i / n))
        for i in range(n)
    )
    return "[" + ", ".join(f"[{x:.4f}, {y:.4f}]" for x, y in points) + "]"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("vision:\n  profil: mask\n", "vision.profil: unknown key"),
        ("vision:\n  profile: cars\n", "vision.profile"),
        ("vision:\n  detect_fps: -1\n", "vision.detect_fps"),
        ("cameras:\n  - name: a\n    fps: 0\n", "cameras.0.fps"),
        ("cameras:\n  - name: a\n  - name: a\n", "camera names must be unique"),
        ("voting:\n  enter: 0.6\n  leave: 0.7\n", "leave must be < enter"),
        ("voting:\n  settle_votes: 20\n", "settle_votes (20) must be <= window (15)"),
        ("voting:\n  recheck_frames: 0\n", "voting.recheck_frames"),
        ("vision:\n  face_input: [650, 352]\n", "multiples of 32"),
        ("vision:\n  person_input: [400, 400]\n", "vision: person_input (400, 400) must be"),
        ("vision:\n  person_input: [0, 416]\n", "person_input (0, 416) must be multiples"),
        ("vision:\n  person_input: [416]\n", "vision.person_input"),
        ("vision:\n  person_input: 416x416\n", "vision.person_input"),
        ("vision:\n  face_input: [99999, 352]\n", "from 32 to 4096"),
        ("vision:\n  face_detector: yolo\n", "vision.face_detector"),
        ("vision:\n  backend: tensorrt\n", "vision.backend"),
        ("vision:\n  provider: torch\n", "vision.provider"),
        ("vision:\n  half: true\n", "half: fp16 needs backend 'torch' and provider 'cuda'"),
        ("vision:\n  backend: torch\n  half: true\n", "got backend 'torch' and provider 'cpu'"),
        ("vision:\n  face_model_precision: int4\n", "vision.face_model_precision"),
        ("vision:\n  mask_batch: 0\n", "vision.mask_batch"),
        ("vision:\n  person_detector: yolo\n", "vision.person_detector"),
        ("vision:\n  person_tiles: [0, 1]\n", "person_tiles (0, 1) must be 1..4"),
        (
            "vision:\n  person_tiles: [2, 1]\n  person_tile_overlap: 40\n",
            "person_tile_overlap 40 must be a multiple of 32",
        ),
        ("cameras:\n  - source: ''\n", "source is empty"),
        ("cameras:\n  - source: rtsp://u:pw@/x\n", "'rtsp://***@/x' names no host"),
        ("cameras:\n  - source: rtsp://:554/x\n", "names no host"),
        ("overlay:\n  colours:\n    mask: [300, 0, 0]\n", "overlay.colours.mask.0"),
        ("overlay:\n  colours:\n    mask: [0, -1, 0]\n", "overlay.colours.mask.1"),
        ("encoder:\n  preset: bogus\n", "encoder.preset"),
        ("recorder:\n  segment_s: 30\n  ring_seconds: 40\n", "must hold at least two segments"),
        ("recorder:\n  pre_s: 120\n", "pre_s (120) must be <= ring_seconds (60)"),
        ("colour: red\n", "colour: unknown key"),
        ("- just\n- a list\n", "mapping at the top level"),
        ("vision: [\n", "not valid YAML"),
        ("streaming:\n  user: alice\n", "user and password must be set together"),
        ("streaming:\n  host: 0.0.0.0\n", "needs user and password"),
        (
            "cameras:\n  - zones:\n      bow: [[0, 0], [1, 1], [1, 0], [0, 1]]\n",
            "cameras.0.zones: zone 'bow': the polygon crosses itself",
        ),
        (
            "cameras:\n  - zones:\n      tiny: [[0, 0], [1, 1]]\n",
            "zone 'tiny': a polygon needs at least 3 points, got 2",
        ),
        (
            "cameras:\n  - zones:\n      flat: [[0, 0], [0.5, 0.5], [1, 1]]\n",
            "zone 'flat': the polygon has no area",
        ),
        (
            "cameras:\n  - zones:\n      big: [[0, 0], [1.5, 0], [0, 1]]\n",
            "cameras.0.zones.big.1.0: Input should be less than or equal to 1",
        ),
        ("cameras:\n  - zones:\n      'a b': [[0, 0], [1, 0], [0, 1]]\n", "cameras.0.zones.a b"),
        (
            "cameras:\n  - lines:\n      door: {start: [0.5, 0.2], end: [0.5, 0.2]}\n",
            "cameras.0.lines.door: the line has zero length",
        ),
        (
            "cameras:\n  - lines:\n      door: {start: [0.5, -0.1], end: [0.5, 1]}\n",
            "cameras.0.lines.door.start.1: Input should be greater than or equal to 0",
        ),
        ("cameras:\n  - lines:\n      door: {start: [0.5, 0]}\n", "cameras.0.lines.door.end"),
        (
            "cameras:\n  - lines:\n      door: {start: [0, 0], end: [1, 1], in_side: up}\n",
            "cameras.0.lines.door.in_side",
        ),
        # A zone nowhere deeper than zone_band on any frame could never hold anyone.
        (
            "cameras:\n  - name: gate\n    zones:\n"
            "      strip: [[0.1, 0.49], [0.9, 0.49], [0.9, 0.52], [0.1, 0.52]]\n",
            "cameras.0: camera 'gate': zone 'strip' can never hold anyone: a track enters a "
            "zone when zone_band (0.02 of the frame height) inside its edges, and no point of "
            "'strip' is more than 0.015 inside them on any frame. Make the zone taller",
        ),
        (
            "cameras:\n  - zone_band: 0.1\n    zones:\n"
            "      kerb: [[0, 0.92], [1, 0.92], [1, 1], [0, 1]]\n",
            "zone 'kerb' can never hold anyone",
        ),
        (
            "cameras:\n  - privacy:\n      masks: [[[0, 0], [1, 1], [1, 0], [0, 1]]]\n",
            "cameras.0.privacy.masks: mask 0: the polygon crosses itself",
        ),
        ("cameras:\n  - privacy:\n      faces: smudge\n", "cameras.0.privacy.faces"),
        # A rule naming a zone or line no camera has would never fire.
        (
            "cameras:\n  - zones:\n      queue: [[0, 0], [1, 0], [0, 1]]\n"
            "alerts:\n  dwell:\n    zones: [qeueu]\n",
            "alerts.dwell.zones: 'qeueu' is no camera's zone (the cameras' zones: queue)",
        ),
        (
            "alerts:\n  zone_occupancy:\n    zones: [queue]\n",
            "alerts.zone_occupancy.zones: 'queue' is no camera's zone (the cameras' zones: none)",
        ),
        (
            "alerts:\n  line_crossing:\n    forbidden: {dor: out}\n",
            "alerts.line_crossing.forbidden: 'dor' is no camera's line",
        ),
        # A polygon traced point by point (checked at every load, in the square of its
        # points: 2000 took seconds) or a region a frame too many.
        (
            "cameras:\n  - zones:\n      traced: " + _circle(101) + "\n",
            "cameras.0.zones.traced: List should have at most 100 items",
        ),
        (
            "cameras:\n  - privacy:\n      masks: [" + _circle(2000) + "]\n",
            "cameras.0.privacy.masks.0: List should have at most 100 items",
        ),
        (
            "cameras:\n  - zones:\n"
            + "".join(f"      z{i}: [[0, 0], [1, 0], [0, 1]]\n" for i in range(33)),
            "cameras.0.zones: Dictionary should have at most 32 items",
        ),
        (
            "cameras:\n  - lines:\n"
            + "".join(f"      l{i}: {{start: [0, 0], end: [1, 1]}}\n" for i in range(33)),
            "cameras.0.lines: Dictionary should have at most 32 items",
        ),
        (
            "overlay:\n  element: cairooverlay\ncameras:\n  - privacy:\n      faces: blur\n",
            "needs overlay.element direct or overlaycomposition",
        ),
        (
            "media:\n  backend: cpu\nencoder:\n  element: nvh264\n",
            "encoder.element nvh264 needs media.backend nvidia",
        ),
        ("media:\n  backend: cuda\n", "media.backend"),
        (
            "vision:\n  face_threads: 0\n",
            "vision.face_threads: Input should be greater than or equal to 1",
        ),
        ("alerts:\n  line_crossing:\n    forbidden: {door: sideways}\n", "forbidden.door"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(_write(tmp_path, text))
    assert needle in str(info.value)


def test_zones_lines_and_privacy_parse(tmp_path: Path) -> None:
    s = load_settings(
        _write(
            tmp_path,
            "cameras:\n  - name: door\n"
            "    zones:\n      queue: [[0.1, 0.5], [0.6, 0.5], [0.6, 1], [0.1, 1]]\n"
            "    lines:\n      entry: {start: [0.5, 0], end: [0.5, 1], in_side: right}\n"
            "    privacy:\n      faces: pixelate\n"
            "      masks: [[[0, 0], [0.2, 0], [0.2, 0.2]]]\n",
        )
    )
    cam = s.cameras[0]
    assert cam.zones["queue"][2] == (0.6, 1.0)
    assert cam.lines["entry"].anchor == "bottom_centre" and cam.lines["entry"].in_side == "right"
    assert cam.privacy.faces == "pixelate" and cam.privacy.active
    assert not load_settings(_write(tmp_path, "device: a\n")).cameras[0].privacy.active


def test_environment_beats_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, "vision:\n  detect_fps: 4\n  profile: people\n")
    monkeypatch.setenv("EDGECAM_VISION__DETECT_FPS", "7.5")
    s = load_settings(path)
    assert s.vision.detect_fps == 7.5
    assert s.vision.profile == "people"


def test_config_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGECAM_CONFIG", str(_write(tmp_path, "device: door-1\n")))
    assert load_settings().device == "door-1"


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "nope.yaml")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgecam.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_cli_config_check_and_show(tmp_path: Path) -> None:
    good = _write(tmp_path, "device: cam-7\ncameras:\n  - name: door\n    source: test://\n")
    ok = _cli("config", "check", str(good))
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout
    shown = _cli("config", "show", "--config", str(good))
    assert shown.returncode == 0
    assert "device: cam-7" in shown.stdout and "name: door" in shown.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("recorder:\n  pre_s: -3\n")
    res = _cli("config", "check", str(bad))
    assert res.returncode == 1
    assert "recorder.pre_s" in res.stderr


def test_cli_config_check_names_a_bad_zone_and_line(tmp_path: Path) -> None:
    bad = _write(
        tmp_path,
        "cameras:\n  - name: door\n"
        "    zones:\n      bow: [[0, 0], [1, 1], [1, 0], [0, 1]]\n"
        "    lines:\n      entry: {start: [0.5, 0.5], end: [0.5, 0.5]}\n",
    )
    res = _cli("config", "check", str(bad))
    assert res.returncode == 1
    assert "cameras.0.lines.entry" in res.stderr and "zero length" in res.stderr
    bad.write_text("cameras:\n  - zones:\n      bow: [[0, 0], [1, 1], [1, 0], [0, 1]]\n")
    res = _cli("config", "check", str(bad))
    assert res.returncode == 1 and "zone 'bow': the polygon crosses itself" in res.stderr
    bad.write_text(
        "cameras:\n  - name: door\n    zones:\n"
        "      mat: [[0.2, 0.8], [0.8, 0.8], [0.8, 0.83], [0.2, 0.83]]\n"
    )
    res = _cli("config", "check", str(bad))
    assert res.returncode == 1
    assert "camera 'door': zone 'mat' can never hold anyone" in res.stderr


@pytest.mark.parametrize(
    ("zone", "deepest"),
    [
        ([(0.1, 0.49), (0.9, 0.49), (0.9, 0.52), (0.1, 0.52)], 0.015),  # half its height
        ([(0.0, 0.97), (1.0, 0.97), (1.0, 1.0), (0.0, 1.0)], 0.03),  # along the bottom edge
        ([(0.1, 0.5), (0.45, 0.5), (0.45, 1.0), (0.1, 1.0)], 0.5),  # the README's queue
        ([(0.2, 0.5), (0.5, 0.45), (0.8, 0.5), (0.5, 0.55)], 0.05),  # at its middle corners
        ([(0.5, 0.1), (0.9, 0.9), (0.1, 0.9)], 0.4),  # a triangle, below its apex
        ([(0, 0), (1, 0), (0, 1)], 1.0),  # two sides along the edge
        # Top to bottom: on a wide enough frame anything is deep enough.
        ([(0.45, 0.0), (0.46, 0.0), (0.46, 1.0), (0.45, 1.0)], float("inf")),
        ([(0, 0), (1, 0), (1, 1), (0, 1)], float("inf")),
    ],
)
def test_zone_depth_limit(zone: list[tuple[float, float]], deepest: float) -> None:
    assert zone_depth_limit(zone) == pytest.approx(deepest)


def test_streaming_auth_rules() -> None:
    from edgecam.config import StreamingConfig

    assert StreamingConfig().host == "127.0.0.1"  # loopback unless asked
    StreamingConfig.model_validate({"host": "0.0.0.0", "user": "a", "password": "b"})
    StreamingConfig.model_validate({"host": "0.0.0.0", "allow_anonymous": True})


def test_secrets_never_printed(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "cameras:\n  - name: door\n    source: rtsp://admin:hunter2@192.0.2.5/s\n"
        "fileserver:\n  token: 123456789\n",
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert "123456789" not in str(info.value) and "fileserver.token" in str(info.value)
    path.write_text(
        "cameras:\n  - name: door\n    source: rtsp://admin:hunter2@192.0.2.5/s\n"
        "fileserver:\n  token: s3cr3t-t0ken\nstreaming:\n  user: u\n  password: pw-123\n"
    )
    shown = _cli("config", "show", "--config", str(path))
    assert shown.returncode == 0, shown.stderr
    for secret in ("hunter2", "s3cr3t-t0ken", "pw-123"):
        assert secret not in shown.stdout
    assert "rtsp://***@192.0.2.5/s" in shown.stdout


def test_override_onto_empty_section(tmp_path: Path) -> None:
    path = _write(tmp_path, "vision:\n")
    assert load_settings(path, **{"vision.profile": "people"}).vision.profile == "people"


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"mqtt": {"port": 0}}, "mqtt.port"),
        ({"mqtt": {"password": "x"}}, "password needs username"),
        ({"mqtt": {"prefix": "a/../b c"}}, "mqtt.prefix"),
        ({"mqtt": {"hots": "x"}}, "mqtt.hots: unknown key"),
        ({"server": {"port": 70000}}, "server.port"),
        ({"server": {"ingest_processes": 0}}, "server.ingest_processes"),
    ],
)
def test_bad_mqtt_and_server_sections(tmp_path: Path, data: dict[str, object], needle: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_settings(path)


def test_server_database_url_password_is_masked() -> None:
    settings = load_settings(**{"server.database_url": "postgresql+psycopg://u:hunter2@db/x"})
    assert "hunter2" not in settings_to_yaml(settings)
    assert settings.mqtt.host is None and settings.mqtt.prefix == "edgecam"


_SECRETS = ("PASSWORD1", "QTOKEN123", "FSTOKEN123", "LINKSECRET1", "STREAMPW1")


@pytest.mark.parametrize(
    "text",
    [
        # a model-level check over a camera that holds a password in its URL
        "cameras:\n  - name: a\n    source: rtsp://admin:PASSWORD1@10.0.0.1/s?token=QTOKEN123\n"
        "    reconnect_min_s: 10\n    reconnect_max_s: 5\n",
        # a model-level check over the whole tree, which holds every secret
        "cameras:\n  - name: a\n    source: rtsp://admin:PASSWORD1@10.0.0.1/s\n    rtp_port: 6000\n"
        "  - name: b\n    rtp_port: 6000\nfileserver:\n  token: FSTOKEN123\n"
        "  link_secret: LINKSECRET1\nstreaming:\n  user: u\n  password: STREAMPW1\n",
        # a section-level check with the password beside it
        "streaming:\n  password: STREAMPW1\n",
        "streaming:\n  host: 0.0.0.0\n  user: u\n  password: STREAMPW1\n  port: 0\n",
        # a bad value in the section that holds the token
        "fileserver:\n  token: FSTOKEN123\n  port: -1\n  link_secret: LINKSECRET1\n",
        "cameras:\n  - name: bad name\n    source: rtsp://u:PASSWORD1@h/x?token=QTOKEN123\n",
        "cameras:\n  - source: rtsp://u:PASSWORD1@h/x\n    fps: 9999\n",
    ],
)
def test_secrets_masked_in_every_error(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(_write(tmp_path, text))
    message = str(info.value)
    assert "\n" not in message  # one line
    for secret in _SECRETS:
        assert secret not in message


def test_secrets_masked_in_environment_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGECAM_CONFIG", raising=False)
    monkeypatch.setenv(
        "EDGECAM_CAMERAS",
        '[{"name": "a", "source": "rtsp://u:PASSWORD1@h/x?token=QTOKEN123", '
        '"reconnect_min_s": 10, "reconnect_max_s": 5}]',
    )
    monkeypatch.setenv("EDGECAM_FILESERVER__TOKEN", "FSTOKEN123")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "reconnect_max_s" in str(info.value)
    assert not any(secret in str(info.value) for secret in _SECRETS)
    monkeypatch.setenv("EDGECAM_CAMERAS", "rtsp://u:PASSWORD1@h/x notjson")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "EDGECAM_CAMERAS must be JSON" in str(info.value)
    assert "PASSWORD1" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("rtsp://admin:pw@10.0.0.1:554/s", "rtsp://***@10.0.0.1:554/s"),
        ("rtsp://10.0.0.1/s?token=abc&x=1", "rtsp://10.0.0.1/s?token=***&x=1"),
        ("rtsp://10.0.0.1?api_key=abc", "rtsp://10.0.0.1?api_key=***"),
        ("https://h/p?sig=1&Password=2&user=me", "https://h/p?sig=***&Password=***&user=me"),
        ("cannot open 'rtsp://a:b@h/x': refused", "cannot open 'rtsp://***@h/x': refused"),
        ("/clips/a.mp4", "/clips/a.mp4"),
        # uvicorn's line for a WebSocket: a path and query, no scheme
        (
            '"WebSocket /live/main/ws?expires=9&sig=abc&mode=mse" [accepted]',
            '"WebSocket /live/main/ws?expires=9&sig=***&mode=mse" [accepted]',
        ),
        ("a ? and key=value, not a query", "a ? and key=value, not a query"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    from edgecam.config import redact_url

    assert redact_url(url) == shown


def test_config_show_masks_url_tokens(tmp_path: Path) -> None:
    path = _write(tmp_path, "cameras:\n  - source: rtsp://cam.local/live?token=QTOKEN123\n")
    shown = _cli("config", "show", "--config", str(path))
    assert shown.returncode == 0, shown.stderr
    assert "QTOKEN123" not in shown.stdout and "token=***" in shown.stdout


def test_command_line_beats_environment_beats_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path, "vision:\n  detect_fps: 4\n  profile: people\n  threads: 3\n")
    monkeypatch.setenv("EDGECAM_VISION__DETECT_FPS", "30")
    monkeypatch.setenv("EDGECAM_VISION__PROFILE", "people")
    s = load_settings(path, **{"vision.detect_fps": 0, "vision.profile": "mask"})
    assert (s.vision.detect_fps, s.vision.profile, s.vision.threads) == (0, "mask", 3)
    assert load_settings(path).vision.detect_fps == 30  # environment over file


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"EDGECAM_VISION__DETECT_FSP": "5"}, "EDGECAM_VISION__DETECT_FSP names no config key"),
        ({"EDGECAM_VISON__DETECT_FPS": "5"}, "EDGECAM_VISON__DETECT_FPS names no config key"),
        ({"EDGECAM_DEVICE__NAME": "x"}, "EDGECAM_DEVICE__NAME names no config key"),
        ({"EDGECAM_VISION_DETECT_FPS": "5"}, "write EDGECAM_VISION__DETECT_FPS (two underscores)"),
        ({"EDGECAM_CAMERAS__X__SOURCE": "x"}, "'x' is not a list index"),
        ({"EDGECAM_CAMERAS__5__SOURCE": "x"}, "camera index 5 is past the end"),
        ({"EDGECAM_CAMERAS": "notjson"}, "EDGECAM_CAMERAS must be JSON"),
        ({"EDGECAM_VISION__FACE_INPUT": "640x352"}, "EDGECAM_VISION__FACE_INPUT must be JSON"),
        ({"EDGECAM_VISION__DETECT_FPS": "fast"}, "vision.detect_fps"),
    ],
)
def test_bad_environment_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], needle: str
) -> None:
    monkeypatch.delenv("EDGECAM_CONFIG", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert needle in str(info.value)


def test_environment_reaches_list_items(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGECAM_CONFIG", raising=False)
    monkeypatch.setenv("EDGECAM_CAMERAS__0__SOURCE", "rtsp://192.0.2.1/a")
    s = load_settings()
    assert [(c.name, c.source) for c in s.cameras] == [("main", "rtsp://192.0.2.1/a")]
    path = _write(tmp_path, "cameras:\n  - name: door\n    fps: 15\n")
    monkeypatch.setenv("EDGECAM_CAMERAS__1__NAME", "yard")
    monkeypatch.setenv("EDGECAM_VISION__FACE_INPUT", "[320, 192]")
    monkeypatch.setenv("EDGECAM_OVERLAY__COLOURS", '{"mask": [1, 2, 3]}')
    s = load_settings(path)
    assert [(c.name, c.fps, c.source) for c in s.cameras] == [
        ("door", 15, "rtsp://192.0.2.1/a"),
        ("yard", 30, "test://"),
    ]
    assert s.vision.face_input == (320, 192)
    assert s.overlay.colours == {"mask": (1, 2, 3)}


def test_environment_sets_one_zone_line_or_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGECAM_CONFIG", raising=False)
    triangle = [[0.1, 0.1], [0.9, 0.1], [0.5, 0.9]]
    # A zone is a polygon under its name: JSON like any list (it was taken as text).
    monkeypatch.setenv("EDGECAM_CAMERAS__0__ZONES__QUEUE", json.dumps(triangle))
    monkeypatch.setenv("EDGECAM_CAMERAS__0__LINES__DOOR__START", "[0.5, 0]")
    monkeypatch.setenv("EDGECAM_CAMERAS__0__LINES__DOOR__END", "[0.5, 1]")
    monkeypatch.setenv("EDGECAM_CAMERAS__0__LINES__DOOR__IN_SIDE", "right")
    monkeypatch.setenv("EDGECAM_CAMERAS__0__PRIVACY__MASKS", json.dumps([triangle]))
    cam = load_settings().cameras[0]
    assert cam.zones == {"queue": [tuple(p) for p in triangle]}
    assert cam.lines["door"].in_side == "right" and cam.lines["door"].end == (0.5, 1)
    assert cam.privacy.masks == [[tuple(p) for p in triangle]]


def test_empty_sections_mean_defaults(tmp_path: Path) -> None:
    s = load_settings(_write(tmp_path, "vision:\ncameras:\nrecorder:\ndevice:\n"))
    assert s.vision.profile == "mask" and [c.name for c in s.cameras] == ["main"]


def test_config_file_not_utf8_is_one_clear_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("device: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_settings(path)
    res = _cli("config", "check", str(path))
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr


def test_yaml_alias_bomb_is_refused_at_once(tmp_path: Path) -> None:
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i in range(1, 8):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    path = _write(tmp_path, "\n".join([*lines, "cameras: *a7", ""]))
    start = time.monotonic()
    with pytest.raises(ConfigError, match="expands to more than"):
        load_settings(path)
    assert time.monotonic() - start < 2


def test_too_many_cameras(tmp_path: Path) -> None:
    cams = "".join(f"  - name: c{i}\n    rtp_port: {2000 + 10 * i}\n" for i in range(65))
    with pytest.raises(ConfigError, match="cameras: List should have at most 64 items"):
        load_settings(_write(tmp_path, "cameras:\n" + cams))


def test_other_edgecam_variables_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    # Variables of ours that are not config keys (set by the supervisor, by tests).
    monkeypatch.delenv("EDGECAM_CONFIG", raising=False)
    monkeypatch.setenv("EDGECAM_SUPERVISOR_PID", "1234")
    monkeypatch.setenv("EDGECAM_TEST_PG", "postgresql://u:p@h/db")
    assert load_settings().cameras[0].name == "main"


def _leaf_variables() -> list[str]:
    """EDGECAM_* names of every leaf key of the config tree (list items at index 0)."""
    from pydantic import BaseModel

    from edgecam.config import Settings

    names: list[str] = []

    def walk(model: type[BaseModel], prefix: list[str]) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, [*prefix, name])
            elif getattr(ann, "__origin__", None) is list and (
                isinstance(ann.__args__[0], type) and issubclass(ann.__args__[0], BaseModel)
            ):
                walk(ann.__args__[0], [*prefix, name, "0"])
            else:
                names.append("EDGECAM_" + "__".join(p.upper() for p in [*prefix, name]))

    walk(Settings, [])
    return names


@pytest.mark.parametrize("variable", _leaf_variables())
def test_every_key_takes_any_value_without_a_crash(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    """Every key, set to values of the wrong kind, loads or is one ConfigError line."""
    for name in [n for n in os.environ if n.startswith("EDGECAM_")]:
        monkeypatch.delenv(name)
    for value in ("x", "-1", "1e999", "nan", "inf", "", " ", "[]", "{}", "9" * 30, "true"):
        monkeypatch.setenv(variable, value)
        try:
            load_settings()
        except ConfigError as exc:
            assert "\n" not in str(exc)


@pytest.mark.parametrize(
    ("variable", "needle"),
    [
        ("EDGECAM_RECORDER__RING_DIR", "recorder.ring_dir: must not be empty"),
        ("EDGECAM_RECORDER__CLIPS_DIR", "recorder.clips_dir"),
        ("EDGECAM_VISION__MASK_MODEL", "vision.mask_model"),
        ("EDGECAM_FILESERVER__HOST", "fileserver.host"),
        ("EDGECAM_FILESERVER__TOKEN", "fileserver.token"),
        ("EDGECAM_FILESERVER__LINK_SECRET", "fileserver.link_secret"),
    ],
)
def test_empty_values_are_refused(
    monkeypatch: pytest.MonkeyPatch, variable: str, needle: str
) -> None:
    # An empty folder is the current folder, an empty host every interface, an empty
    # secret no secret: all refused, naming the key.
    monkeypatch.delenv("EDGECAM_CONFIG", raising=False)
    monkeypatch.setenv(variable, "")
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_settings()
