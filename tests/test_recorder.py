"""Recorder worker: real GStreamer ring, real clips checked with ffprobe and a full decode."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import free_udp_pair

from edgecam.config import Settings
from edgecam.media.clips import (
    ClipPlanner,
    ClipRequest,
    ClipStore,
    DiskFullError,
    SegmentRing,
    pick_run,
    segment_name,
)
from edgecam.media.recorder import Recorder, send_command
from edgecam.protocol import ClipReady, Command

SEG = 1.0
TOL = 0.25  # timing slack on top of one segment


def _settings(tmp_path: Path, **recorder: Any) -> Settings:
    cfg: dict[str, Any] = {
        "ring_dir": tmp_path / "ring",
        "clips_dir": tmp_path / "clips",
        "ring_seconds": 6,
        "segment_s": SEG,
        "pre_s": 2,
        "post_s": 2,
        "min_free_bytes": 0,
    }
    cfg.update(recorder)
    return Settings(device="testdev", recorder=cfg)


def _packets(path: Path) -> list[tuple[float, bool]]:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "v:0",
         "-show_entries", "packet=pts_time,flags", "-of", "csv=p=0", str(path)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rows = [line.split(",") for line in out.splitlines() if line.strip()]
    return [(float(row[0]), "K" in row[1]) for row in rows if row[0] != "N/A"]


def _duration(path: Path) -> float:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0",
         str(path)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return float(out)


def _assert_playable(path: Path) -> None:
    """First frame a keyframe, timestamps without gaps, decodes to the end without error."""
    packets = _packets(path)
    assert packets, f"{path} holds no video"
    assert packets[0][1], "first frame is not a keyframe"
    pts = sorted(p for p, _ in packets)
    gaps = [b - a for a, b in itertools.pairwise(pts)]
    assert max(gaps) < 0.1, f"timestamp gap of {max(gaps):.3f} s"
    proc = subprocess.run(
        ["ffmpeg", "-v", "error", "-nostdin", "-i", str(path), "-f", "null", "-"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    # The fixture's x264enc (tune=zerolatency, so sliced threads) with rtph264pay
    # config-interval=-1 puts SPS/PPS between the slices of each keyframe; ffmpeg then
    # splits that access unit in two and its null muxer warns about the repeated DTS.
    # That is the sender's stream, not the clip: every other message fails the test.
    errors = [
        line
        for line in proc.stderr.splitlines()
        if line.strip() and "non monotonically increasing dts" not in line
    ]
    assert proc.returncode == 0 and not errors, proc.stderr


def _ring_extent(folder: Path, now: float) -> tuple[float, int]:
    """(seconds, bytes) of the ring folder, from the segments' names and sizes."""
    segs = sorted(folder.glob("seg-*.ts"))
    starts = [int(s.name.split("-")[1]) / 1000 for s in segs]
    secs = sum(b - a for a, b in itertools.pairwise(starts))
    if starts:
        secs += max(0.0, now - starts[-1])
    size = 0
    for s in segs:
        with contextlib.suppress(FileNotFoundError):
            size += s.stat().st_size
    return secs, size


class _Sampler:
    """Watches the ring folder's extent in a thread, keeping the maxima."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.max_secs = 0.0
        self.max_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            secs, size = _ring_extent(self.folder, time.time())
            self.max_secs = max(self.max_secs, secs)
            self.max_bytes = max(self.max_bytes, size)

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_clip_holds_window_merges_overlaps_and_plays(
    tmp_path: Path, rtp_sender: Callable[..., subprocess.Popen[bytes]]
) -> None:
    port = free_udp_pair()
    settings = _settings(tmp_path, ring_max_bytes=64 * 1024 * 1024)
    got: list[ClipReady] = []
    rtp_sender(port)
    with Recorder(settings, port=port) as rec, _Sampler(rec.folder) as sampler:
        rec.subscribe(got.append)
        assert rec.wait_ready(10), "no segment within 10 s"
        time.sleep(3.5)
        t = time.time()
        first = rec.request_clip(reason="no_mask", key="alert-1", counts={"no_mask": 2})
        time.sleep(1.0)
        second = rec.request_clip(reason="manual")  # overlaps: the same clip
        clip = first.result(timeout=15)
        assert second.result(timeout=5) == clip

        # Below the free-space floor: refused and reported, the recorder goes on.
        rec.store.min_free_bytes = 1 << 62
        with pytest.raises(DiskFullError):
            rec.request_clip(pre=1, post=0).result(timeout=15)
        assert rec.running
        time.sleep(2.0)  # let the ring run past its bound for a while
    assert sampler.max_secs <= settings.recorder.ring_seconds + TOL, sampler.max_secs
    assert sampler.max_bytes <= settings.recorder.ring_max_bytes

    assert got == [clip]
    mp4s = sorted((tmp_path / "clips").glob("*.mp4"))
    assert [p.name for p in mp4s] == [clip.name]
    path = Path(clip.path)
    assert clip.requests == 2 and clip.reasons == ["no_mask", "manual"]
    # The window [t - pre, t + 1 + post], within one segment on each side.
    want_start, want_end = t - 2, t + 1 + 2
    assert want_start - SEG - TOL <= clip.start <= want_start + TOL
    assert want_end - TOL <= clip.end <= want_end + SEG + TOL
    assert abs(_duration(path) - clip.duration) < TOL
    assert clip.size == path.stat().st_size
    assert clip.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    head = path.read_bytes()[:4096]
    assert head.find(b"moov") < head.find(b"mdat") or b"mdat" not in head, "not faststart"
    _assert_playable(path)
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["device"] == "testdev" and sidecar["camera"] == "main"
    assert sidecar["start"] == clip.start and sidecar["end"] == clip.end
    assert sidecar["triggers"][0]["counts"] == {"no_mask": 2}


def test_ring_stays_within_byte_bound(
    tmp_path: Path, rtp_sender: Callable[..., subprocess.Popen[bytes]]
) -> None:
    port = free_udp_pair()
    cap = 1024 * 1024  # about 6 s of the test stream
    settings = _settings(tmp_path, ring_seconds=60, ring_max_bytes=cap)
    rtp_sender(port)
    with Recorder(settings, port=port) as rec, _Sampler(rec.folder) as sampler:
        assert rec.wait_ready(10)
        time.sleep(9)
        secs, size = rec.ring.totals(time.time())
    assert sampler.max_bytes <= cap, sampler.max_bytes
    assert size > cap / 2 and secs < 60  # the byte bound, not the duration, applied


def _write_segments(folder: Path, run: str, starts: list[float], size: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, start in enumerate(starts):
        path = folder / segment_name(start, run, i)
        path.write_bytes(b"\x47" * size)
        os.utime(path, (start + 1, start + 1))


def test_ring_rebuilds_from_folder_and_trims_oldest(tmp_path: Path) -> None:
    folder = tmp_path / "ring"
    now = time.time()
    _write_segments(folder, "aaaaaaaa", [now - 20 + i for i in range(5)], 1000)
    _write_segments(folder, "bbbbbbbb", [now - 10 + i for i in range(5)], 1000)
    (folder / segment_name(now - 1, "bbbbbbbb", 9)).write_bytes(b"")  # killed while opening
    (folder / "notes.txt").write_text("not a segment")
    ring = SegmentRing(folder, max_seconds=7.5, max_bytes=10**9)
    assert ring.rebuild() == 10
    assert not (folder / segment_name(now - 1, "bbbbbbbb", 9)).exists()
    segs = ring.snapshot()
    assert all(s.end is not None for s in segs)
    assert segs[0].end == pytest.approx(segs[1].start)
    assert ring.covered_until("bbbbbbbb") == pytest.approx(now - 5)
    # A window spanning both runs takes the run that holds most of it.
    spanning = ring.overlapping(now - 17, now - 9)
    assert {s.run for s in spanning} == {"aaaaaaaa", "bbbbbbbb"}
    assert pick_run(spanning, now - 17, now - 9) == "aaaaaaaa"
    removed = ring.trim(now)
    assert len(removed) == 3 and all("aaaaaaaa" in p.name for p in removed)
    assert ring.totals(now)[0] <= 7.5
    assert (folder / "notes.txt").exists()
    ring.max_bytes = 3500
    ring.trim(now)
    assert ring.totals(now)[1] <= 3500
    assert [s.index for s in ring.snapshot()] == [2, 3, 4]


def _req(at: float, pre: float = 2, post: float = 2, key: str | None = None) -> ClipRequest:
    return ClipRequest(at=at, pre=pre, post=post, key=key)


@pytest.mark.parametrize(
    ("requests", "jobs", "clips"),
    [
        ([_req(100), _req(101)], [(98, 103)], 1),  # overlapping: one clip
        ([_req(100), _req(110)], [(98, 102), (108, 112)], 2),  # apart: two clips
        ([_req(100, key="a"), _req(110, key="a")], [(98, 112)], 1),  # same alert: extended
        ([_req(100, key="a"), _req(110, key="b")], [(98, 102), (108, 112)], 2),
        ([_req(100, post=30)], [(98, 118), (118, 130)], 1),  # longer than max: continued
        ([_req(100, key="a"), _req(125, key="a")], [(98, 118), (118, 127)], 1),
    ],
)
def test_planner_merges_requests(
    requests: list[ClipRequest], jobs: list[tuple[float, float]], clips: int
) -> None:
    planner = ClipPlanner(max_clip_s=20)
    futures: list[Future[ClipReady]] = [planner.add(r) for r in requests]
    assert [(j.start, j.end) for j in planner.drain()] == jobs
    assert len({id(f) for f in futures}) == clips


def test_planner_never_saves_video_twice() -> None:
    planner = ClipPlanner(max_clip_s=60)
    first = planner.add(_req(100))
    assert [(j.start, j.end) for j in planner.due(102.5, 103, 5)] == [(98, 102)]
    assert planner.add(_req(100.5, pre=1, post=1)) is first  # inside the saved clip
    planner.add(_req(101, pre=2, post=3))  # overlaps it: starts where it ended
    assert [(j.start, j.end) for j in planner.drain()] == [(102, 104)]


def test_retention_removes_oldest_over_cap_and_too_old(tmp_path: Path) -> None:
    clips = tmp_path / "clips"
    clips.mkdir()
    now = time.time()
    names = [f"main_2024010{i}T000000Z_abcdef.mp4" for i in range(1, 7)]
    ages_days = [40, 5, 4, 3, 2, 1]
    for name, age in zip(names, ages_days, strict=True):
        path = clips / name
        path.write_bytes(b"\0" * 400_000)
        path.with_suffix(".json").write_text("{}")
        mtime = now - age * 86400
        os.utime(path, (mtime, mtime))
    (clips / ".tmp-deadbeef").mkdir()
    os.utime(clips / ".tmp-deadbeef", (now - 7200, now - 7200))
    store = ClipStore(clips, max_bytes=1_000_000, max_age_s=30 * 86400, min_free_bytes=0)
    removed = store.apply_retention(now)
    assert removed == names[:4]  # 40 days old first, then the oldest over the cap
    assert sorted(p.name for p in clips.iterdir()) == sorted(
        [n for n in names[4:]] + [n.replace(".mp4", ".json") for n in names[4:]]
    )
    assert [c.name for c in store.clips()] == [names[5], names[4]]  # newest first


def _wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _worker(cfg: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "edgecam.cli", "worker", "recorder", "--config", str(cfg)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip


def _alive(sock: Path) -> bool:
    if not sock.exists():
        return False
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(sock))
        except OSError:
            return False
    return True


def test_kill9_keeps_clips_and_restart_works(
    tmp_path: Path, rtp_sender: Callable[..., subprocess.Popen[bytes]]
) -> None:
    port = free_udp_pair()  # the camera's RTP pair: streaming on port, recorder on port + 1
    cfg = tmp_path / "edgecam.yaml"
    cfg.write_text(yaml.safe_dump({
        "device": "testdev",
        "cameras": [{"name": "main", "rtp_port": port}],
        "recorder": {"ring_dir": str(tmp_path / "ring"), "clips_dir": str(tmp_path / "clips"),
                     "ring_seconds": 8, "segment_s": SEG, "pre_s": 1, "post_s": 1,
                     "min_free_bytes": 0},
    }))  # fmt: skip
    sock = tmp_path / "ring" / "main" / "control.sock"
    rtp_sender(port + 1)
    proc = _worker(cfg)
    try:
        _wait_for(lambda: _alive(sock), 15, "the control socket")
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        _wait_for(lambda: len(list(sock.parent.glob("seg-*.ts"))) >= 3, 10, "segments")
        out = subprocess.run(
            [sys.executable, "-m", "edgecam.cli", "clip", "--config", str(cfg),
             "--reason", "test"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        clip = ClipReady.model_validate_json(out.stdout)
        bad = send_command(sock, Command(name="no_such_command"))
        assert not bad.ok and "unknown command" in (bad.error or "")
        time.sleep(1.5)  # the ring is writing its next segments
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()

    path = Path(clip.path)
    assert clip.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    _assert_playable(path)
    left = sorted(sock.parent.glob("seg-*.ts"))
    assert left, "the ring folder was emptied"

    proc = _worker(cfg)
    try:
        _wait_for(lambda: _alive(sock), 15, "the control socket after restart")
        status = send_command(sock, Command(name="status"))
        assert status.ok and status.data["segments"] >= len(left) - 1
        again = send_command(
            sock, Command(name="save_clip", args={"pre": 1, "post": 1}), timeout=30
        )
        assert again.ok, again.error
        _assert_playable(Path(again.data["path"]))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
    assert not sock.exists()
    newest = max(sock.parent.glob("seg-*.ts"))
    assert _packets(newest), "the last segment is not readable after SIGTERM"
