"""The strict config tree: defaults, typos, ranges, file vs environment, the CLI checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgecam.config import load_settings
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


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("vision:\n  profil: mask\n", "vision.profil: unknown key"),
        ("vision:\n  profile: cars\n", "vision.profile"),
        ("vision:\n  detect_fps: -1\n", "vision.detect_fps"),
        ("cameras:\n  - name: a\n    fps: 0\n", "cameras.0.fps"),
        ("cameras:\n  - name: a\n  - name: a\n", "camera names must be unique"),
        ("voting:\n  enter: 0.6\n  leave: 0.7\n", "leave must be < enter"),
        ("vision:\n  face_input: [650, 352]\n", "multiples of 32"),
        ("colour: red\n", "colour: unknown key"),
        ("- just\n- a list\n", "mapping at the top level"),
        ("vision: [\n", "not valid YAML"),
        ("streaming:\n  user: alice\n", "user and password must be set together"),
        ("streaming:\n  host: 0.0.0.0\n", "needs user and password"),
        (
            "cameras:\n  - zones:\n      bow: [[0, 0], [1, 1], [1, 0], [0, 1]]\n",
            "cameras.0.zones: Value error, zone 'bow': the polygon crosses itself",
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
            "cameras.0.lines.door: Value error, the line has zero length",
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
        (
            "cameras:\n  - privacy:\n      masks: [[[0, 0], [1, 1], [1, 0], [0, 1]]]\n",
            "cameras.0.privacy.masks: Value error, mask 0: the polygon crosses itself",
        ),
        ("cameras:\n  - privacy:\n      faces: smudge\n", "cameras.0.privacy.faces"),
        (
            "overlay:\n  element: cairooverlay\ncameras:\n  - privacy:\n      faces: blur\n",
            "needs overlay.element overlaycomposition",
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
    assert res.returncode == 2
    assert "recorder.pre_s" in res.stderr


def test_cli_config_check_names_a_bad_zone_and_line(tmp_path: Path) -> None:
    bad = _write(
        tmp_path,
        "cameras:\n  - name: door\n"
        "    zones:\n      bow: [[0, 0], [1, 1], [1, 0], [0, 1]]\n"
        "    lines:\n      entry: {start: [0.5, 0.5], end: [0.5, 0.5]}\n",
    )
    res = _cli("config", "check", str(bad))
    assert res.returncode == 2
    assert "cameras.0.lines.entry" in res.stderr and "zero length" in res.stderr
    bad.write_text("cameras:\n  - zones:\n      bow: [[0, 0], [1, 1], [1, 0], [0, 1]]\n")
    res = _cli("config", "check", str(bad))
    assert res.returncode == 2 and "zone 'bow': the polygon crosses itself" in res.stderr


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
