"""Recorder worker: real GStreamer ring, real clips checked with ffprobe and a full decode."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import free_udp_pair

from edgecam.config import Settings
from edgecam.device.control import send_command
from edgecam.device.runner import run_worker
from edgecam.device.workers import RecorderWorker
from edgecam.errors import EdgecamError
from edgecam.media.clips import (
    ClipError,
    ClipJob,
    ClipPlanner,
    ClipRequest,
    ClipStore,
    DiskFullError,
    Segment,
    SegmentRing,
    pick_run,
    segment_name,
)
from edgecam.media.recorder import Recorder
from edgecam.protocol import ClipReady, Command, CommandResult, SaveClipArgs

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
    return Settings(device="testdev", recorder=cfg, runtime={"dir": tmp_path / "run"})


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
    assert size > cap / 3 and secs < 60  # the byte bound, not the duration, applied


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
    ("done", "requests", "jobs", "clips"),
    [
        ([], [_req(100), _req(101)], [(98, 103)], 1),  # overlapping: one clip
        ([], [_req(100), _req(110)], [(98, 102), (108, 112)], 2),  # apart: two clips
        ([], [_req(100, key="a"), _req(110, key="a")], [(98, 112)], 1),  # same alert: extended
        ([], [_req(100, key="a"), _req(110, key="b")], [(98, 102), (108, 112)], 2),
        ([], [_req(100, post=30)], [(98, 118), (118, 130)], 1),  # longer than max: continued
        ([], [_req(100, key="a"), _req(125, key="a")], [(98, 118), (118, 127)], 1),
        # Starts earlier, within the max: the job grows back.
        ([], [_req(20, pre=5, post=5), _req(12, pre=2, post=5)], [(10, 25)], 1),
        # Starts earlier, past the max: the first job keeps all of its window, the rest
        # of the second request is a clip of its own.
        ([], [_req(20, pre=10, post=10), _req(5, pre=5, post=10)], [(0, 10), (10, 30)], 2),
        # Ends later, past the max: grows to the max, the rest follows.
        ([], [_req(20, pre=5, post=5), _req(24, pre=2, post=16)], [(15, 35), (35, 40)], 1),
        # Bridges two pending jobs: both grow, nothing twice.
        ([], [_req(10), _req(20), _req(15, pre=5, post=5)], [(8, 18), (18, 22)], 2),
        ([_req(50, pre=5, post=5)], [_req(50, pre=1, post=1)], [], 1),  # inside a saved clip
        ([_req(50, pre=5, post=5)], [_req(56, pre=3, post=4)], [(55, 60)], 2),  # after it
        ([_req(50, pre=5, post=5)], [_req(45, pre=10, post=5)], [(35, 45)], 2),  # before it
        ([_req(50, pre=5, post=5)], [_req(50, pre=20, post=20)], [(30, 45), (55, 70)], 2),
        (
            [_req(50, pre=5, post=5), _req(70, pre=5, post=5)],
            [_req(60, pre=20, post=20)],
            [(40, 45), (55, 65), (75, 80)],
            3,
        ),
    ],
)
def test_planner_merges_requests(
    done: list[ClipRequest],
    requests: list[ClipRequest],
    jobs: list[tuple[float, float]],
    clips: int,
) -> None:
    planner = ClipPlanner(max_clip_s=20)
    futures: list[Future[ClipReady]] = [planner.add(r) for r in done]
    finished = planner.due(covered_until=1e9, now=1e9, stall_s=0)
    futures += [planner.add(r) for r in requests]
    pending = planner.drain()
    assert [(j.start, j.end) for j in pending] == jobs
    assert len({id(f) for f in futures}) == clips
    # Every request's window is in some clip, none longer than the max, none overlapping.
    windows = sorted((j.start, j.end) for j in finished + pending)
    assert all(b - a <= 20 for a, b in windows)
    assert all(b[0] >= a[1] for a, b in itertools.pairwise(windows))
    for r in done + requests:
        start, end = r.at - r.pre, r.at + r.post
        inside = sum(min(b, end) - max(a, start) for a, b in windows if a < end and start < b)
        assert inside == pytest.approx(end - start), (r, windows)


def test_planner_asks_again_for_a_failed_clip() -> None:
    planner = ClipPlanner(max_clip_s=20)
    first = planner.add(_req(100))
    (job,) = planner.due(covered_until=1e9, now=1e9, stall_s=0)
    job.future.set_exception(ClipError("disk gone"))
    again = planner.add(_req(100))  # the failed clip holds nothing: saved anew
    assert again is not first
    assert [(j.start, j.end) for j in planner.drain()] == [(98, 102)]


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_planner_and_protocol_refuse_non_finite_times(value: str) -> None:
    with pytest.raises(ValueError, match="finite"):
        ClipPlanner(max_clip_s=20).add(_req(float(value)))
    cmd = Command.model_validate_json(f'{{"name": "save_clip", "args": {{"at": {value}}}}}')
    with pytest.raises(ValueError, match="finite"):
        SaveClipArgs.model_validate(cmd.args)


def test_a_pending_clip_is_cut_on_time_when_the_clock_is_set_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = {"wall": 1e9, "steady": 100.0}
    monkeypatch.setattr(time, "time", lambda: clock["wall"])
    monkeypatch.setattr(time, "monotonic", lambda: clock["steady"])
    planner = ClipPlanner(max_clip_s=60)
    planner.add(_req(1e9, pre=5, post=10))  # for [1e9 - 5, 1e9 + 10]

    def due_after(seconds: float) -> list[ClipJob]:
        clock["steady"] = 100.0 + seconds
        clock["wall"] = 1e9 - 3 * 3600 + seconds  # set back 3 h meanwhile
        covered = clock["wall"] - 1  # the ring's video, stamped by the clock as it is set
        return planner.due(covered, time.time(), 5, steady=time.monotonic())

    assert due_after(11) == []  # its video is stamped 3 h earlier now: never past its end
    # 5 s (stall_s) past its end, it is cut with what the ring holds, not 3 h later.
    assert [(j.start, j.end) for j in due_after(15)] == [(1e9 - 5, 1e9 + 10)]


def test_planner_never_saves_video_twice() -> None:
    planner = ClipPlanner(max_clip_s=60)
    first = planner.add(_req(100))
    assert [(j.start, j.end) for j in planner.due(102.5, 103, 5)] == [(98, 102)]
    assert planner.add(_req(100.5, pre=1, post=1)) is first  # inside the saved clip
    planner.add(_req(101, pre=2, post=3))  # overlaps it: starts where it ended
    assert [(j.start, j.end) for j in planner.drain()] == [(102, 104)]


def test_clip_thread_survives_an_unusable_clips_folder(
    tmp_path: Path, rtp_sender: Callable[..., subprocess.Popen[bytes]]
) -> None:
    port = free_udp_pair()
    settings = _settings(tmp_path)
    clips = settings.recorder.clips_dir
    rtp_sender(port)
    with Recorder(settings, port=port) as rec:
        assert rec.wait_ready(10), "no segment within 10 s"
        time.sleep(1.5)
        clips.rmdir()
        clips.write_bytes(b"")  # the clips folder is gone: not even its work folder can be made
        t0 = time.monotonic()
        with pytest.raises(ClipError, match="cannot save clips in"):
            rec.request_clip(pre=1, post=0).result(timeout=10)
        assert time.monotonic() - t0 < 5
        assert all(t.is_alive() for t in rec._threads)
        clips.unlink()
        clips.mkdir()  # fixed: the next clip is saved
        clip = rec.request_clip(pre=1, post=0).result(timeout=10)
    assert Path(clip.path).parent == clips and Path(clip.path).stat().st_size == clip.size


@pytest.fixture
def controlled(tmp_path: Path) -> Iterator[Path]:
    """A recorder worker process and its control socket (no video arrives: commands only)."""
    port = free_udp_pair()
    cfg = tmp_path / "edgecam.yaml"
    cfg.write_text(yaml.safe_dump({
        "device": "testdev",
        "cameras": [{"name": "main", "rtp_port": port}],
        "recorder": {"ring_dir": str(tmp_path / "ring"), "clips_dir": str(tmp_path / "clips"),
                     "ring_seconds": 6, "pre_s": 2, "post_s": 2, "min_free_bytes": 0},
        "runtime": {"dir": str(tmp_path / "run")},
    }))  # fmt: skip
    sock = tmp_path / "run" / "recorder.main.sock"
    proc = _worker(cfg)
    try:
        _wait_for(lambda: _alive(sock), 15, "the control socket")
        yield sock
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        if proc.stderr:
            proc.stderr.close()


def _exchange(sock: Path, data: bytes) -> list[bytes]:
    """Send raw bytes to the control socket; every line it answers before hanging up."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(sock))
        s.sendall(data)
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_WR)
        got = b""
        with contextlib.suppress(ConnectionResetError):  # it hung up on unread bytes
            while chunk := s.recv(65536):
                got += chunk
    return got.splitlines()


@pytest.mark.parametrize(
    ("at", "error"),
    [
        (lambda _now: "NaN", "finite"),
        (lambda _now: "Infinity", "finite"),
        (lambda _now: "1e18", "at must be"),  # would wait forever for its video
        (lambda now: repr(now - 3600), "at must be"),  # long gone from the ring
    ],
    ids=["nan", "inf", "far-future", "long-past"],
)
def test_save_clip_refuses_a_time_it_cannot_serve(
    controlled: Path, at: Callable[[float], str], error: str
) -> None:
    value = at(time.time())
    (line,) = _exchange(
        controlled, f'{{"name": "save_clip", "args": {{"at": {value}}}}}\n'.encode()
    )
    result = CommandResult.model_validate_json(line)
    assert not result.ok and error in (result.error or "")
    status = send_command(controlled, Command(name="status"), timeout=5)
    assert status.ok and status.data["pending_clips"] == 0


def test_control_line_too_long_is_answered_once(controlled: Path) -> None:
    sock = controlled
    big = Command(name="status", args={"pad": "x" * 70_000}).model_dump_json().encode()
    lines = _exchange(sock, big + b"\n")
    assert len(lines) == 1
    result = CommandResult.model_validate_json(lines[0])
    assert not result.ok and "too long" in (result.error or "")
    assert send_command(sock, Command(name="status"), timeout=5).ok  # the server goes on


def test_ring_folder_left_open_is_made_private(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    folder = settings.recorder.ring_dir / "main"
    folder.mkdir(parents=True)
    folder.chmod(0o777)
    umask = os.umask(0o022)
    os.umask(umask)
    with Recorder(settings, port=free_udp_pair()):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert os.umask(umask) == umask  # the process's umask was never changed


def _plant_symlink(folder: Path) -> None:
    elsewhere = folder.parent.parent / "elsewhere"
    elsewhere.mkdir()
    folder.parent.mkdir(parents=True)
    folder.symlink_to(elsewhere)


def _plant_foreign(folder: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("only root can make a folder of another user")
    folder.mkdir(parents=True)
    os.chown(folder, 65534, 65534)


@pytest.mark.parametrize(
    ("plant", "error"),
    [(_plant_symlink, "symlink"), (_plant_foreign, "belongs to uid 65534")],
)
def test_ring_folder_of_someone_else_is_refused(
    tmp_path: Path, plant: Callable[[Path], None], error: str
) -> None:
    settings = _settings(tmp_path)
    folder = settings.recorder.ring_dir / "main"
    plant(folder)
    rec = Recorder(settings, port=free_udp_pair())
    with pytest.raises(EdgecamError, match=error):
        rec.start()
    assert not rec.running


def test_ring_never_follows_symlinked_segments(tmp_path: Path) -> None:
    ring, clips = tmp_path / "ring", tmp_path / "clips"
    now = time.time()
    _write_segments(ring, "aaaaaaaa", [now - 2], 1000)
    secret = tmp_path / "secret"
    secret.write_bytes(b"not video")
    link = ring / segment_name(now - 1, "aaaaaaaa", 1)
    link.symlink_to(secret)
    segments = SegmentRing(ring, max_seconds=60, max_bytes=10**9)
    assert segments.rebuild() == 1
    assert [s.index for s in segments.snapshot()] == [0]
    store = ClipStore(clips, max_bytes=10**9, max_age_s=86400, min_free_bytes=0)
    job = ClipJob(now - 2, now, [_req(now - 1)])
    assert store.add_part(job, segments.snapshot()[0])
    linked = Segment.from_path(link)
    assert linked is not None and not store.add_part(job, linked)
    assert job.workdir is not None
    assert sorted(p.name for p in job.workdir.iterdir()) == [segments.snapshot()[0].path.name]


def test_disabled_recorder_exits_at_once(tmp_path: Path) -> None:
    settings = _settings(tmp_path, enabled=False)
    t0 = time.monotonic()
    assert run_worker(RecorderWorker, settings) == 0
    assert time.monotonic() - t0 < 1
    assert not settings.recorder.ring_dir.exists()


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


def _clip_files(clips: Path, mtimes: list[float]) -> list[Path]:
    paths = []
    for i, mtime in enumerate(mtimes):
        path = clips / f"main_1970011{i}T000000Z_abcdef.mp4"
        path.write_bytes(b"\0" * 1000)
        path.with_suffix(".json").write_text("{}")
        os.utime(path, (mtime, mtime))
        paths.append(path)
    return paths


def _fake_clocks(monkeypatch: pytest.MonkeyPatch, clock: dict[str, float]) -> None:
    """The wall clock and the time since boot (``steady``), which the monotonic clock
    follows unless ``awake`` is given: on Linux it stands still while suspended."""
    real = time.clock_gettime
    monkeypatch.setattr(time, "time", lambda: clock["wall"])
    monkeypatch.setattr(time, "monotonic", lambda: clock.get("awake", clock["steady"]))
    monkeypatch.setattr(
        time,
        "clock_gettime",
        lambda which: clock["steady"] if which == time.CLOCK_BOOTTIME else real(which),
    )


def test_a_clock_stepped_forward_by_years_does_not_age_the_clips(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = {"wall": 1_000_000.0, "steady": 900.0}  # booted at 1970 (no clock battery)
    _fake_clocks(monkeypatch, clock)
    clips = tmp_path / "clips"
    clips.mkdir()
    month = 30 * 86400

    def store() -> ClipStore:
        return ClipStore(clips, max_bytes=10**9, max_age_s=month, min_free_bytes=0)

    recorder, fileserver = store(), store()  # each process has its own
    paths = _clip_files(clips, [clock["wall"] - 600, clock["wall"] - 60])
    step = 55 * 365 * 86400.0
    clock["steady"] += 60
    clock["wall"] += 60 + step  # NTP sets the clock
    assert recorder.apply_retention() == []
    assert fileserver.apply_retention() == []  # moved once only
    now = clock["wall"]
    assert [p.stat().st_mtime for p in paths] == [now - 660, now - 120]
    clock["steady"] += month
    clock["wall"] += month
    assert len(recorder.apply_retention()) == 2  # they still age


def test_a_step_shorter_than_the_uptime_moves_the_clips_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NTP correcting a clock 10 min behind, an hour after boot: the recorder and the file
    server both see the step, and the clips move by it once (before, a clip moved by the
    first lay again in the old clock's range for the second, and moved twice)."""
    clock = {"wall": 1_700_000_000.0, "steady": 3600.0}
    _fake_clocks(monkeypatch, clock)
    clips = tmp_path / "clips"
    clips.mkdir()
    day = 86400

    def store() -> ClipStore:
        return ClipStore(clips, max_bytes=10**9, max_age_s=day, min_free_bytes=0)

    recorder, fileserver = store(), store()
    paths = _clip_files(clips, [clock["wall"] - 3000, clock["wall"] - 60])
    clock["steady"] += 60
    clock["wall"] += 60 + 600
    assert recorder.apply_retention() == []
    assert fileserver.apply_retention() == []
    now = clock["wall"]
    assert [p.stat().st_mtime for p in paths] == [now - 3060, now - 120]


def test_a_suspend_is_no_clock_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine suspended for a day: its clips are as old as they are (before, the monotonic
    clock standing still read as the wall clock stepped a day, and they were moved a day on,
    kept a day longer at each suspend)."""
    clock = {"wall": 1_700_000_000.0, "steady": 3600.0, "awake": 3600.0}
    _fake_clocks(monkeypatch, clock)
    clips = tmp_path / "clips"
    clips.mkdir()
    store = ClipStore(clips, max_bytes=10**9, max_age_s=86400, min_free_bytes=0)
    (path,) = _clip_files(clips, [clock["wall"] - 60])
    clock["steady"] += 86400
    clock["wall"] += 86400
    assert store.apply_retention() == [path.name]


def test_a_clip_dated_before_the_clock_was_set_ages_from_when_it_is_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clips = tmp_path / "clips"
    clips.mkdir()
    (path,) = _clip_files(clips, [86400.0])  # saved in an earlier boot, before NTP
    now = time.time()
    store = ClipStore(clips, max_bytes=10**9, max_age_s=86400, min_free_bytes=0)
    assert store.apply_retention(now) == []
    assert path.stat().st_mtime == pytest.approx(now)
    assert store.apply_retention(now + 86401) == [path.name]


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
        "runtime": {"dir": str(tmp_path / "run")},
    }))  # fmt: skip
    sock = tmp_path / "run" / "recorder.main.sock"
    ring = tmp_path / "ring" / "main"
    rtp_sender(port + 1)
    proc = _worker(cfg)
    try:
        _wait_for(lambda: _alive(sock), 15, "the control socket")
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        _wait_for(lambda: len(list(ring.glob("seg-*.ts"))) >= 3, 10, "segments")
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
    left = sorted(ring.glob("seg-*.ts"))
    assert left, "the ring folder was emptied"

    proc = _worker(cfg)
    try:
        _wait_for(lambda: _alive(sock), 15, "the control socket after restart")
        status = send_command(sock, Command(name="status"))
        assert status.ok and status.data["segments"] >= len(left) - 1
        again = send_command(sock, Command(name="save_clip", args={"pre": 1, "post": 1}))
        assert again.ok and again.data["accepted"], again.error  # answered at once
        job = again.data["job"]

        def ready() -> bool:
            state = send_command(sock, Command(name="clip_status", args={"job": job})).data
            assert state["state"] != "failed", state
            return bool(state["state"] == "ready")

        _wait_for(ready, 30, "the clip")
        state = send_command(sock, Command(name="clip_status", args={"job": job})).data
        _assert_playable(Path(state["clip"]["path"]))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
    assert not sock.exists()
    newest = max(ring.glob("seg-*.ts"))
    assert _packets(newest), "the last segment is not readable after SIGTERM"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a RAM disk that fills in a few seconds of the test stream."""
    folder = tmp_path / "small"
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
        capture_output=True,
        check=False,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {res.stderr!r}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def _still_recording(rec: Recorder, seconds: float = 3.0) -> bool:
    """New video reached the ring within the last ``seconds``."""
    segs = rec.ring.snapshot()
    return bool(segs) and time.time() - max(s.start for s in segs) < seconds


def test_ring_on_a_full_disk_bounds_itself_and_keeps_recording(
    small_disk: Path, tmp_path: Path, rtp_sender: Callable[..., subprocess.Popen[bytes]]
) -> None:
    port = free_udp_pair()
    settings = _settings(tmp_path, ring_dir=small_disk, ring_seconds=60, segment_s=0.5)
    # An earlier run filled the disk with its ring: the restart must not die on it.
    _write_segments(
        small_disk / "main", "aaaaaaaa", [time.time() - 30 + i for i in range(9)], 10**5
    )
    rtp_sender(port)
    with Recorder(settings, port=port) as rec:
        assert rec.wait_ready(10)
        time.sleep(8)  # ~1.4 MB of video into 1 MiB
        assert rec.running and rec.error is None and _still_recording(rec)
        status = rec.status()
        assert status["ring_disk_limited"] and status["ring_limit_bytes"] < 1024 * 1024
        assert shutil.disk_usage(small_disk).free > 0
        clip = rec.request_clip(pre=1.5, post=0).result(timeout=20)
        _assert_playable(Path(clip.path))
        # Something else takes most of what is left: the ring shrinks, recording goes on.
        junk = small_disk / "junk"
        junk.write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 64 * 1024))
        time.sleep(4)
        assert rec.running and rec.error is None and _still_recording(rec)
        limit = rec.status()["ring_limit_bytes"]
        junk.unlink()  # ...and gives it back: the ring grows again
        time.sleep(4)
        assert rec.running and _still_recording(rec)
        assert rec.status()["ring_limit_bytes"] > limit


def test_recorder_waits_out_a_disk_with_no_room_and_recovers(
    small_disk: Path, tmp_path: Path, rtp_sender: Callable[..., subprocess.Popen[bytes]]
) -> None:
    port = free_udp_pair()
    settings = _settings(tmp_path, ring_dir=small_disk, ring_seconds=60, segment_s=0.5)
    junk = small_disk / "junk"
    junk.write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 16 * 1024))
    rtp_sender(port)
    with Recorder(settings, port=port) as rec:
        time.sleep(4)  # "No space left" again and again: no exit, no error
        assert rec.running and rec.error is None
        assert rec.status()["disk_full_restarts"] >= 1
        junk.unlink()
        time.sleep(4)
        assert rec.running and _still_recording(rec)
        clip = rec.request_clip(pre=1.5, post=0).result(timeout=20)
        _assert_playable(Path(clip.path))


def test_start_removes_own_unfinished_clip_folders(tmp_path: Path) -> None:
    # What a recorder killed mid-clip leaves: its work folder, minutes old, not an hour.
    settings = _settings(tmp_path)
    clips = settings.recorder.clips_dir
    leftovers = [".tmp-main.0123abcd", ".tmp-main-b.0123abcd", ".tmp-0123abcd"]
    for name in leftovers:
        (clips / name).mkdir(parents=True)
        (clips / name / "part-000.ts").write_bytes(b"\x47" * 188)
    with Recorder(settings, port=free_udp_pair()):
        pass
    # Its own go at once; another camera's (main-b) and an unnamed one wait for the hour.
    assert sorted(p.name for p in clips.iterdir()) == sorted(leftovers[1:])


@pytest.mark.parametrize("clips_dir", ["/proc/edgecam-clips", "/dev/null/clips"])
def test_unusable_clips_folder_is_a_clear_error(tmp_path: Path, clips_dir: str) -> None:
    settings = _settings(tmp_path, clips_dir=Path(clips_dir))
    with pytest.raises(ClipError, match=r"cannot create the clips folder .*recorder\.clips_dir"):
        Recorder(settings, port=free_udp_pair()).start()
