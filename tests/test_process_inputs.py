"""`edgecam process` on hostile inputs and outputs: clear errors, no lost or partial files."""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import MEDIA

from edgecam.config import load_settings
from edgecam.errors import PipelineError
from edgecam.media.offline import _FileRun, process_file
from edgecam.vision.detections import Detections

EDGECAM = [sys.executable, "-m", "edgecam.cli"]
FFMPEG = ["ffmpeg", "-v", "error", "-y"]


def _ffmpeg(*args: str) -> None:
    subprocess.run([*FFMPEG, *args], check=True, timeout=60)


def _testsrc(path: Path, size: str, *codec: str, seconds: int = 2) -> Path:
    _ffmpeg("-f", "lavfi", "-i", f"testsrc=s={size}:r=30:d={seconds}", *codec, str(path))
    return path


@pytest.fixture(scope="module")
def odd(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small bad and odd inputs, made once."""
    d = tmp_path_factory.mktemp("odd")
    media = {"zero": d / "zero.mp4", "text": d / "text.mp4", "audio": d / "audio.m4a"}
    media["zero"].write_bytes(b"")
    media["text"].write_text("not a video\n")
    _ffmpeg("-f", "lavfi", "-i", "sine=d=1", "-c:a", "aac", str(media["audio"]))
    whole = d / "whole.mp4"
    _ffmpeg("-i", str(MEDIA / "faces.mp4"), "-c", "copy", "-movflags", "+faststart", str(whole))
    media["truncated"] = d / "truncated.mp4"
    media["truncated"].write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    x264 = ("-c:v", "libx264", "-x264-params", "repeat-headers=1")
    media["yuv444"] = _testsrc(d / "odd444.mp4", "321x241", *x264, "-pix_fmt", "yuv444p")
    media["mpeg4"] = _testsrc(d / "odd_mpeg4.mp4", "321x241", "-c:v", "mpeg4")
    # Two encodes of different sizes joined without re-encoding: the H.264 parameters
    # (and the frame size) change at the join, as when a camera is set to another mode.
    small = _testsrc(d / "a.mp4", "320x240", *x264, "-pix_fmt", "yuv420p")
    large = _testsrc(d / "b.mp4", "640x360", *x264, "-pix_fmt", "yuv420p")
    media["tiny"] = _testsrc(d / "tiny.mp4", "2x2", "-c:v", "mpeg4")
    # Variable frame rate: 10 fps for a second, then 30: 40 frames in 2 s, nominally 30 fps.
    media["vfr"] = d / "vfr.mp4"
    _ffmpeg(
        *("-f", "lavfi", "-i", "testsrc=s=320x240:r=30:d=2", "-fps_mode", "vfr"),
        *("-vf", "select='if(lt(t,1),not(mod(n,3)),1)'", "-c:v", "libx264", str(media["vfr"])),
    )
    # Two video streams (320x240 at 30 fps, 640x480 at 25 fps): the first is the video.
    media["two"] = d / "two.mp4"
    _ffmpeg(
        *("-f", "lavfi", "-i", "testsrc=s=320x240:r=30:d=2"),
        *("-f", "lavfi", "-i", "testsrc2=s=640x480:r=25:d=2"),
        *("-map", "0", "-map", "1", "-c:v", "libx264", "-pix_fmt", "yuv420p", str(media["two"])),
    )
    listing = d / "list.txt"
    listing.write_text(f"file '{small}'\nfile '{large}'\n")
    media["joined"] = d / "joined.mp4"
    _ffmpeg("-f", "concat", "-safe", "0", "-i", str(listing), "-c", "copy", str(media["joined"]))
    return media


def _process(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*EDGECAM, "process", *args, "--quiet", "--detect-fps", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _frames(path: Path) -> tuple[int, int, int]:
    """(width, height, frames) of ``path``, decoded by ffmpeg, which must find no error."""
    probe = ["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-of", "csv=p=0"]
    res = subprocess.run(
        [*probe, "-show_entries", "stream=width,height,nb_read_frames", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert res.stderr == "", res.stderr  # no decoding error anywhere in the file
    w, h, n = res.stdout.strip().split(",")
    return int(w), int(h), int(n)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("zero", "is empty (0 bytes), not a video file"),
        ("text", "is not a video file"),
        ("audio", "no video stream in"),
        ("truncated", "ended early: decoded 58 frames (2.0 s), the header promised 120 (4.0 s)"),
    ],
)
def test_bad_input_is_named(odd: dict[str, Path], tmp_path: Path, name: str, needle: str) -> None:
    res = _process(str(odd[name]), "--out", str(tmp_path / "o.mp4"))
    assert res.returncode == 1
    assert needle in res.stderr and str(odd[name]) in res.stderr
    assert "Traceback" not in res.stderr and res.stderr.count("\n") == 1
    left = sorted(p.name for p in tmp_path.iterdir())
    # Only a truncated input gives an output: the frames it has, with the error said.
    assert left == (["o.mp4"] if name == "truncated" else [])


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("yuv444", (320, 240, 60)),  # 321x241: even sizes for the encoder
        ("mpeg4", (320, 240, 60)),
        ("tiny", (16, 16, 60)),  # 2x2: at least 16 a side for the muxer
        ("two", (320, 240, 60)),  # two video streams: the first one
        ("vfr", (320, 240, 40)),  # whole, though 40 < 2 s x 30 fps
    ],
)
def test_odd_size_and_format_are_processed(
    odd: dict[str, Path], tmp_path: Path, name: str, expected: tuple[int, int, int]
) -> None:
    res = _process(str(odd[name]), "--out", str(tmp_path / "o.mp4"))
    assert res.returncode == 0, res.stderr
    assert _frames(tmp_path / "o.mp4") == expected


def test_size_change_mid_file_carries_on(odd: dict[str, Path], tmp_path: Path) -> None:
    res = _process(str(odd["joined"]), "--out", str(tmp_path / "o.mp4"))
    assert res.returncode == 0, res.stderr
    # Every frame, at the first part's size, and nothing the decoder stumbles on.
    assert _frames(tmp_path / "o.mp4") == (320, 240, 120)


@pytest.mark.parametrize(
    ("make_args", "needle"),
    [
        (lambda i, d: ["--out", str(i)], "--out {i} is the input file"),
        (lambda i, d: ["--out", str(d / "o.mp4"), "--events", str(i)], "is the input file"),
        (lambda i, d: ["--out", str(d / "link.mp4")], "is the input file"),  # a hard link
        (lambda i, d: ["--out", str(d / "o.mp4"), "--events", str(d)], "is a folder"),
        (lambda i, d: ["--out", str(d / "o.mp4"), "--events", str(d / "o.mp4")], "--out file"),
        (lambda i, d: ["--out", str(d / "o.avi")], "name it *.mp4"),
    ],
)
def test_outputs_never_overwrite_the_input(tmp_path: Path, make_args: object, needle: str) -> None:
    video = tmp_path / "in.mp4"
    video.write_bytes((MEDIA / "faces.mp4").read_bytes())
    os.link(video, tmp_path / "link.mp4")
    before = _digest(video)
    res = _process(str(video), *make_args(video, tmp_path))  # type: ignore[operator]
    assert res.returncode == 2, res.stderr
    assert needle.format(i=video) in res.stderr and "Traceback" not in res.stderr
    assert _digest(video) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", "link.mp4"]


def test_unwritable_events_is_one_line(tmp_path: Path) -> None:
    res = _process(str(MEDIA / "faces.mp4"), "--out", str(tmp_path / "o.mp4"))
    assert res.returncode == 0, res.stderr
    res = _process(str(MEDIA / "faces.mp4"), "--out", str(tmp_path / "o.mp4"), "--events")
    assert res.returncode == 2  # --events needs a value: argparse's usage error
    res = _process(
        str(MEDIA / "faces.mp4"), "--out", str(tmp_path / "o.mp4"), "--events", "/proc/e.jsonl"
    )
    assert res.returncode == 1 and "cannot write --events /proc/e.jsonl" in res.stderr
    assert res.stderr.count("\n") == 1


class _BrokenDetector:
    input_size = (640, 352)

    def __init__(self) -> None:
        self.calls = 0

    def detect(self, frame: np.ndarray) -> Detections:
        self.calls += 1
        if self.calls > 3:
            raise RuntimeError("model exploded")
        return Detections.empty()

    def close(self) -> None:
        pass


def test_failed_run_keeps_the_old_output_and_leaves_nothing(tmp_path: Path) -> None:
    out, events = tmp_path / "o.mp4", tmp_path / "e.jsonl"
    out.write_bytes(b"the previous result")
    events.write_text("previous events\n")
    settings = load_settings(**{"vision.detect_fps": 10})
    with pytest.raises(PipelineError, match="model exploded"):
        process_file(
            settings,
            MEDIA / "faces.mp4",
            out,
            events=events,
            progress=False,
            detector=_BrokenDetector(),
        )
    assert out.read_bytes() == b"the previous result"
    assert events.read_text() == "previous events\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.jsonl", "o.mp4"]


@pytest.mark.parametrize("value", ["-5", "nan", "inf", "-inf", "1e308", "3601", "abc"])
def test_clip_seconds_checked_by_the_parser(value: str) -> None:
    for option in ("--pre", "--post"):
        res = subprocess.run(
            [*EDGECAM, "clip", f"{option}={value}"], capture_output=True, text=True, timeout=60
        )
        assert res.returncode == 2
        assert f"argument {option}" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["clip", "--reason", ""],
        ["clip", "--reason", "x" * 201],
        ["process", "in.mp4", "--out", "o.mp4", "--detect-fps", "-1"],
        ["process", "in.mp4", "--out", "o.mp4", "--detect-fps", "nan"],
        ["demo", "--live-seconds", "0"],
        ["worker", "nope"],
    ],
)
def test_bad_arguments_are_usage_errors(args: list[str]) -> None:
    res = subprocess.run([*EDGECAM, *args], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "error:" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_stopped_run_keeps_the_old_output_and_leaves_nothing(
    tmp_path: Path, sig: signal.Signals, status: int
) -> None:
    out = tmp_path / "o.mp4"
    out.write_bytes(b"the previous result")
    outputs = ["--out", str(out), "--events", str(tmp_path / "e.jsonl")]
    proc = subprocess.Popen(
        [*EDGECAM, "process", str(MEDIA / "faces_720p30_15s.mp4"), *outputs, "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not any(p.name.endswith(".tmp") and p.stat().st_size for p in tmp_path.iterdir()):
        assert time.monotonic() < deadline and proc.poll() is None, "never started writing"
        time.sleep(0.05)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == status and "Traceback" not in stderr
    assert out.read_bytes() == b"the previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.mp4"]


def test_a_stop_noticed_after_the_run_keeps_the_old_output(tmp_path: Path) -> None:
    # A stop signal whose exception was lost (raised inside a GObject callback) is raised
    # again before the outputs replace their targets: the run then leaves them as they were.
    out, events = tmp_path / "o.mp4", tmp_path / "e.jsonl"
    out.write_bytes(b"the previous result")

    def stopped() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        process_file(
            load_settings(), MEDIA / "faces.mp4", out, events=events, before_commit=stopped
        )
    assert out.read_bytes() == b"the previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.mp4"]


def test_events_into_a_pipe_and_outputs_through_symlinks(tmp_path: Path) -> None:
    # A FIFO (as /dev/stdout is a pipe): written to, not replaced by a renamed file.
    fifo = tmp_path / "events.fifo"
    os.mkfifo(fifo)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(fifo.read_text().splitlines()))
    reader.start()
    res = _process(
        str(MEDIA / "faces.mp4"), "--out", str(tmp_path / "o.mp4"), "--events", str(fifo)
    )
    if reader.is_alive():  # the run never opened the pipe: release the reader
        with open(fifo, "w"):
            pass
    reader.join(timeout=10)
    assert res.returncode == 0, res.stderr
    assert len(lines) == 120  # one JSON line a frame, through the pipe
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    real, link = tmp_path / "real.mp4", tmp_path / "link.mp4"
    real.write_bytes(b"old")
    link.symlink_to(real)
    res = _process(str(MEDIA / "faces.mp4"), "--out", str(link))
    assert res.returncode == 0, res.stderr
    assert link.is_symlink() and real.stat().st_size > 10_000  # the file it points to


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_stopped_run_of_several_inputs_stops_them_all_and_keeps_the_old_outputs(
    tmp_path: Path, sig: signal.Signals, status: int
) -> None:
    # Every file's pipeline is stopped before the shared detector (an interrupted
    # Thread.join made the running ones look finished: their detection failed, loudly).
    (tmp_path / "faces.mp4").write_bytes(b"the previous result")
    inputs = [str(MEDIA / "faces.mp4"), str(MEDIA / "faces_720p30_15s.mp4")]
    proc = subprocess.Popen(
        [*EDGECAM, "process", *inputs, "--out-dir", str(tmp_path), "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not any(p.name.endswith(".tmp") and p.stat().st_size for p in tmp_path.iterdir()):
        assert time.monotonic() < deadline and proc.poll() is None, "never started writing"
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == status
    assert "Traceback" not in stderr and "ERROR" not in stderr, stderr
    assert (tmp_path / "faces.mp4").read_bytes() == b"the previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["faces.mp4"]


def test_a_stop_before_a_files_pipeline_has_started_is_kept(tmp_path: Path) -> None:
    """A stop (Ctrl-C, or another file failing) that comes while a file's thread has not
    yet started its pipeline stops that file too: starting cleared it, and the file ran
    to its end, under a shared detector about to be stopped."""
    settings = load_settings(**{"vision.detect_fps": 0})
    cam = settings.cameras[0].model_copy(
        update={"name": "p", "source": str(MEDIA / "pedestrians_30s.mp4"), "loop": False}
    )
    run = _FileRun(settings.model_copy(update={"cameras": [cam]}), tmp_path / "o.mp4", None, None)
    run.stop()
    run.thread.start()
    assert run.done.wait(30)
    assert run.pipeline.stats.frames < 100  # of 300


def test_every_bad_input_among_several_is_named(odd: dict[str, Path], tmp_path: Path) -> None:
    bad = [odd["zero"], odd["text"], odd["audio"], tmp_path / "missing.mp4", tmp_path]
    res = _process(str(MEDIA / "faces.mp4"), *map(str, bad), "--out-dir", str(tmp_path / "o"))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == len(bad)  # a line for each, not the first alone
    for path, line in zip(bad, lines, strict=True):
        assert line.startswith("edgecam: error: ") and str(path) in line
    assert not (tmp_path / "o").exists()  # refused before anything was written

    # Truncated inputs are found at the end: each is named, the good one written whole.
    second = tmp_path / "second.mp4"
    second.write_bytes(odd["truncated"].read_bytes())
    res = _process(str(odd["truncated"]), str(MEDIA / "faces.mp4"), str(second), "--out-dir",
                   str(tmp_path / "o"))  # fmt: skip
    assert res.returncode == 1
    lines = res.stderr.splitlines()
    assert len(lines) == 2 and all("ended early: decoded 58 frames" in line for line in lines)
    assert str(odd["truncated"]) in lines[0] and str(second) in lines[1]
    assert _frames(tmp_path / "o" / "faces.mp4")[2] == 120


@pytest.mark.parametrize(
    ("inputs", "out_dir", "needle"),
    [
        (["a/x.mp4", "a/x.mp4"], "o", "{d}/a/x.mp4 is given twice"),
        (["a/x.mp4", "b/x.mp4"], "o", "{d}/a/x.mp4 and {d}/b/x.mp4 would both write {d}/o/x."),
        (["a/x.mp4", "b/y.mp4"], "a/x.mp4", "--out-dir {d}/a/x.mp4 is a file; give a folder"),
    ],
)
def test_out_dir_collisions_name_the_inputs(
    tmp_path: Path, inputs: list[str], out_dir: str, needle: str
) -> None:
    for folder, name in (("a", "x.mp4"), ("b", "x.mp4"), ("b", "y.mp4")):
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / name).write_bytes((MEDIA / "faces.mp4").read_bytes())
    before = sorted(tmp_path.rglob("*"))
    res = _process(*(str(tmp_path / i) for i in inputs), "--out-dir", str(tmp_path / out_dir))
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert needle.format(d=tmp_path) in res.stderr
    assert sorted(tmp_path.rglob("*")) == before
