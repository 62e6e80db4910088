"""The recorder's bookkeeping, free of GStreamer: the segment ring, clip planning, clip files.

- :class:`SegmentRing` indexes the MPEG-TS segments of the RAM ring (their wall-clock start
  is in their file name, so the index is rebuilt from the folder after a crash) and trims
  the ring to its duration and byte bounds.
- :class:`ClipPlanner` turns clip requests into clip jobs, merging overlapping requests and
  extending a job while requests with the same key keep coming.
- :class:`ClipStore` is the clips folder: it assembles a clip from segments (remux to MP4,
  no re-encode, written atomically), lists clips with their sidecars and applies retention.
  The file server uses it read-only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import itertools
import json
import logging
import math
import os
import re
import shutil
import stat
import subprocess
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edgecam.errors import EdgecamError, MissingPluginError
from edgecam.protocol import CLIP_NAME, ClipReady

__all__ = [
    "CLIP_NAME_RE",
    "ClipError",
    "ClipInfo",
    "ClipJob",
    "ClipPlanner",
    "ClipStore",
    "DiskFullError",
    "Segment",
    "SegmentRing",
    "camera_clip_re",
    "clip_name",
    "pick_run",
    "segment_name",
]

log = logging.getLogger(__name__)

_SEGMENT_RE = re.compile(r"^seg-(?P<start>\d{13})-(?P<run>[0-9a-f]{8})-(?P<index>\d{6})\.ts$")
CLIP_NAME_RE = re.compile(CLIP_NAME)


def clip_name(camera: str, start: float) -> str:
    """A new clip's file name: camera, UTC start time, a random suffix."""
    stamp = datetime.fromtimestamp(start, UTC).strftime("%Y%m%dT%H%M%S")
    return f"{camera}_{stamp}Z_{uuid.uuid4().hex[:6]}.mp4"


def camera_clip_re(camera: str | None) -> re.Pattern[str]:
    """Names :func:`clip_name` gives ``camera``'s clips (any camera's: None).

    A prefix test would not do: camera ``a`` must not match clips of camera ``a_b``.
    """
    if camera is None:
        return CLIP_NAME_RE
    return re.compile(re.escape(camera) + r"_[0-9]{8}T[0-9]{6}Z_[0-9a-f]{6}\.mp4")


_TMP_PREFIX = ".tmp-"
# Free space the ring leaves on its disk for the segments being written: two of the largest
# segments, and never less than this.
_RESERVE_SEGMENTS = 2
_MIN_DISK_RESERVE = 128 * 1024
_COPY_CHUNK = 1 << 20
# Wall and monotonic time drifting apart by more than this: the wall clock was stepped.
_CLOCK_STEP_S = 300.0
# A clip modified before this (2020-01-01) was written by a clock not yet set (a board
# without a clock battery boots at 1970): its age is unknown.
_CLOCK_FLOOR = 1_577_836_800.0
# In the clips folder: the boot and the wall time at boot that the clips' dates follow, so
# that of the processes sharing the folder only the first to see a step re-dates them.
_CLOCK_MARK = ".clock-step"
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


class ClipError(EdgecamError):
    """A clip could not be saved."""


class DiskFullError(ClipError):
    """Saving a clip would take the disk below ``recorder.min_free_bytes``."""


# --------------------------------------------------------------------------- segment ring


def segment_name(start: float, run: str, index: int) -> str:
    """File name of a ring segment that starts at wall time ``start``."""
    return f"seg-{round(start * 1000):013d}-{run}-{index:06d}.ts"


@dataclass
class Segment:
    """One keyframe-aligned MPEG-TS file of the ring."""

    path: Path
    start: float
    run: str
    index: int
    end: float | None = None  # None while the muxer still writes it
    size: int = 0

    @classmethod
    def from_path(cls, path: Path) -> Segment | None:
        m = _SEGMENT_RE.match(path.name)
        if m is None:
            return None
        return cls(path, int(m["start"]) / 1000, m["run"], int(m["index"]))

    def duration(self, now: float) -> float:
        return max(0.0, (self.end if self.end is not None else now) - self.start)


class SegmentRing:
    """Index of a ring folder's segments, oldest first, kept within its bounds.

    Thread-safe: the pipeline's bus thread adds and closes segments and trims, the clip
    thread selects and opens them.
    """

    def __init__(self, folder: Path, max_seconds: float, max_bytes: int) -> None:
        if max_seconds <= 0:
            raise ValueError(f"max_seconds must be > 0, got {max_seconds}")
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
        self.folder = folder
        self.max_seconds = max_seconds
        self.max_bytes = max_bytes
        # The byte bound in force: max_bytes, or less when the disk has no room for it.
        self.limit_bytes = max_bytes
        self._segments: list[Segment] = []
        self._lock = threading.Lock()

    @property
    def disk_limited(self) -> bool:
        """Whether the free space of the ring's disk, not ``max_bytes``, bounds the ring."""
        return self.limit_bytes < self.max_bytes

    def _disk_bound(self, size: int) -> int:
        """Bytes the ring may hold so that its disk keeps room for the segments being
        written: what it holds plus the free space, less a reserve."""
        try:
            st = os.statvfs(self.folder)
        except OSError:
            return self.max_bytes
        largest = max((s.size for s in self._segments if s.end is not None), default=0)
        reserve = max(_MIN_DISK_RESERVE, _RESERVE_SEGMENTS * largest)
        return size + st.f_bavail * st.f_frsize - reserve

    def _set_limit(self, limit: int, rate: float) -> None:
        was_limited = self.disk_limited
        self.limit_bytes = limit
        if self.disk_limited and not was_limited:
            log.warning(
                "ring %s: its disk has room for %d kB only (recorder.ring_max_bytes is %d kB): "
                "keeping about %.0f s of video instead of %g s",
                self.folder,
                max(0, limit) // 1024,
                self.max_bytes // 1024,
                max(0, limit) / rate if rate > 0 else 0.0,
                self.max_seconds,
            )
        elif was_limited and not self.disk_limited:
            log.info("ring %s: its disk has room again; back to its configured bounds", self.folder)

    def rebuild(self) -> int:
        """Index the segments already in the folder (from an earlier run); returns the count.

        A segment's end is the next segment's start in the same run, or, for the last one
        of a run, its modification time (the muxer's last write). Empty files go.
        """
        found: list[Segment] = []
        for entry in os.scandir(self.folder):
            path = Path(entry.path)
            seg = Segment.from_path(path)
            if seg is None or not entry.is_file(follow_symlinks=False):
                continue  # a symlink is never followed: it could point anywhere
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if st.st_size == 0:
                path.unlink(missing_ok=True)
                continue
            seg.size = st.st_size
            seg.end = max(seg.start, st.st_mtime)
            found.append(seg)
        found.sort(key=lambda s: (s.start, s.index))
        for a, b in itertools.pairwise(found):
            if a.run == b.run and a.end is not None:
                a.end = min(a.end, b.start)
        with self._lock:
            self._segments = found + self._segments
        return len(found)

    def opened(self, path: Path) -> Segment | None:
        """The muxer opened ``path``; the previous segment of its run ends where it starts."""
        seg = Segment.from_path(path)
        if seg is None:
            log.warning("ignoring segment with an unexpected name: %s", path)
            return None
        with self._lock:
            for prev in reversed(self._segments):
                if prev.run == seg.run and prev.end is None:
                    prev.end = seg.start
                    prev.size = _size(prev.path)
                    break
            self._segments.append(seg)
        return seg

    def closed(self, path: Path, end: float) -> None:
        """The muxer finished ``path`` at wall time ``end``."""
        with self._lock:
            for seg in reversed(self._segments):
                if seg.path == path:
                    seg.end = max(seg.start, end)
                    seg.size = _size(path)
                    return

    def close_all(self, now: float) -> None:
        """Mark every open segment closed (after EOS, or if the muxer went away)."""
        with self._lock:
            for seg in self._segments:
                if seg.end is None:
                    seg.end = now
                    seg.size = _size(seg.path)

    def covered_until(self, run: str) -> float:
        """Wall time up to which closed segments of ``run`` hold the video (0 when none)."""
        with self._lock:
            for seg in reversed(self._segments):
                if seg.run == run and seg.end is not None:
                    return seg.end
        return 0.0

    def totals(self, now: float) -> tuple[float, int]:
        """(seconds, bytes) of video in the ring now, the open segment included."""
        with self._lock:
            return self._totals(now)

    def _totals(self, now: float) -> tuple[float, int]:
        secs = sum(s.duration(now) for s in self._segments)
        size = sum(s.size if s.end is not None else _size(s.path) for s in self._segments)
        return secs, size

    def trim(self, now: float, headroom_s: float = 0.0) -> list[Path]:
        """Delete the oldest closed segments until the ring is within its bounds: its
        duration, its bytes, and the free space of its disk (less a reserve for the segments
        being written).

        ``headroom_s``: keep room for that much more video (the time until the next trim),
        so that the ring stays within bounds between two trims as well.
        """
        removed: list[Path] = []
        with self._lock:
            secs, size = self._totals(now)
            rate = size / secs if secs > 0 else 0.0
            self._set_limit(min(self.max_bytes, self._disk_bound(size)), rate)
            max_secs = self.max_seconds - headroom_s
            max_size = self.limit_bytes - rate * headroom_s
            while (
                self._segments
                and self._segments[0].end is not None
                and (secs > max_secs or size > max_size)
            ):
                seg = self._segments.pop(0)
                secs -= seg.duration(now)
                size -= seg.size
                seg.path.unlink(missing_ok=True)
                removed.append(seg.path)
        return removed

    def snapshot(self) -> list[Segment]:
        with self._lock:
            return [Segment(s.path, s.start, s.run, s.index, s.end, s.size) for s in self._segments]

    def overlapping(self, start: float, end: float, include_open: bool = False) -> list[Segment]:
        """Copies of the segments that overlap [start, end], oldest first."""
        now = time.time()
        with self._lock:
            return [
                Segment(
                    s.path, s.start, s.run, s.index, s.end if s.end is not None else now, s.size
                )
                for s in self._segments
                if (s.end is not None or include_open)
                and (s.end if s.end is not None else now) > start
                and s.start < end
            ]

    def first_start(self, run: str) -> float | None:
        with self._lock:
            return next((s.start for s in self._segments if s.run == run), None)


def pick_run(segments: list[Segment], start: float, end: float) -> str | None:
    """The run (recorder life) holding most of [start, end]: timestamps jump between runs,
    and a clip must be continuous."""
    overlap: dict[str, float] = {}
    for seg in segments:
        seg_end = seg.end if seg.end is not None else seg.start
        overlap[seg.run] = overlap.get(seg.run, 0.0) + min(seg_end, end) - max(seg.start, start)
    return max(overlap, key=lambda r: overlap[r]) if overlap else None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


# --------------------------------------------------------------------------- clip planning


@dataclass
class ClipRequest:
    """One ask for a clip: the window [at - pre, at + post]."""

    at: float
    pre: float
    post: float
    reason: str = "manual"
    key: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class ClipJob:
    """A clip to be cut once the ring holds video up to ``end``; answers many requests."""

    start: float
    end: float
    requests: list[ClipRequest]
    future: Future[ClipReady] = field(default_factory=Future)
    # Filled by the recorder while the video arrives, so that a clip may outlive the ring.
    run: str | None = None
    workdir: Path | None = None
    parts: list[Segment] = field(default_factory=list)
    error: Exception | None = None
    # When it was made, by both clocks: how long it has waited is monotonic time.
    made_wall: float = field(default_factory=lambda: time.time())
    made_steady: float = field(default_factory=lambda: time.monotonic())

    @property
    def key(self) -> str | None:
        return self.requests[-1].key


class ClipPlanner:
    """Turns requests into as few clips as possible, none longer than ``max_clip_s``.

    Pending jobs never overlap and only grow, so that video a job has collected stays its
    own. A request joins the pending jobs its window overlaps, and the one with its key
    (the clip extends while the alert goes on): they grow over the rest of its window up
    to ``max_clip_s``, and what is still uncovered becomes new jobs. Video given to an
    earlier clip is not saved twice: a request inside finished clips gets the clip holding
    most of it, one overlapping them gets only the parts outside them. A clip that failed
    holds nothing, so its video may be asked for again.
    """

    _KEEP_DONE = 32
    _EPS = 1e-3  # seconds: a sliver this short left beside a clip is no clip of its own

    def __init__(self, max_clip_s: float) -> None:
        if max_clip_s <= 0:
            raise ValueError(f"max_clip_s must be > 0, got {max_clip_s}")
        self.max_clip_s = max_clip_s
        self._pending: list[ClipJob] = []
        self._done: list[ClipJob] = []
        self._lock = threading.Lock()

    def add(self, req: ClipRequest) -> Future[ClipReady]:
        if not all(math.isfinite(v) for v in (req.at, req.pre, req.post)):
            raise ValueError(f"clip request times must be finite, got {req}")
        start, end = req.at - req.pre, req.at + req.post
        with self._lock:
            keyed = self._keyed(req.key)
            if keyed is not None:
                start, end = min(start, keyed.start), max(end, keyed.end)
            saved = [j for j in self._done if not _failed(j)]
            pieces = [(start, end)]
            for job in saved:
                pieces = self._minus(pieces, job.start, job.end)
            if not pieces:
                job = max(saved, key=lambda j: min(j.end, end) - max(j.start, start))
                job.requests.append(req)
                return job.future
            joined = [j for j in self._pending if j is keyed or _overlaps(j, start, end)]
            for piece in pieces:
                for gap in self._uncovered(piece):
                    joined += self._fill(gap, joined, req)
            for job in joined:
                if not any(r is req for r in job.requests):
                    job.requests.append(req)
            self._pending.sort(key=lambda j: j.start)
            return min(joined, key=lambda j: j.start).future

    def _keyed(self, key: str | None) -> ClipJob | None:
        """The latest pending job that a request with ``key`` asked for."""
        if key is None:
            return None
        jobs = [j for j in self._pending if any(r.key == key for r in j.requests)]
        return max(jobs, key=lambda j: j.end) if jobs else None

    def _minus(
        self, pieces: list[tuple[float, float]], cut_start: float, cut_end: float
    ) -> list[tuple[float, float]]:
        """``pieces`` without [cut_start, cut_end]."""
        out: list[tuple[float, float]] = []
        for a, b in pieces:
            if a == b:  # an instant
                if not cut_start <= a <= cut_end:
                    out.append((a, b))
            elif cut_end <= a or b <= cut_start:
                out.append((a, b))
            else:
                if cut_start - a > self._EPS:
                    out.append((a, cut_start))
                if b - cut_end > self._EPS:
                    out.append((cut_end, b))
        return out

    def _uncovered(self, piece: tuple[float, float]) -> list[tuple[float, float]]:
        gaps = [piece]
        for job in self._pending:
            gaps = self._minus(gaps, job.start, job.end)
        return gaps

    def _fill(
        self, gap: tuple[float, float], joined: list[ClipJob], req: ClipRequest
    ) -> list[ClipJob]:
        """Cover ``gap``, which no pending job overlaps: the joined jobs bordering it grow
        into it up to ``max_clip_s``, new jobs (returned) take the rest."""
        a, b = gap
        instant = a == b
        for job in joined:
            if abs(job.end - a) <= self._EPS and job.end < b:
                job.end = max(job.end, min(b, job.start + self.max_clip_s))
                a = job.end
            elif abs(job.start - b) <= self._EPS and a < job.start:
                job.start = min(job.start, max(a, job.end - self.max_clip_s))
                b = job.start
        new: list[ClipJob] = []
        while instant or b - a > self._EPS:
            job = ClipJob(a, min(b, a + self.max_clip_s), [req])
            new.append(job)
            a = job.end
            instant = False
        self._pending += new
        return new

    def due(
        self, covered_until: float, now: float, stall_s: float, *, steady: float | None = None
    ) -> list[ClipJob]:
        """Jobs whose video is all in the ring, or that waited ``stall_s`` past their end.

        ``steady``: the monotonic time now, to measure the wait by (the wall clock ``now``
        may have been set back by hours since a job was made: its video, stamped by the
        new clock, is never after its end, and it would wait those hours).
        """

        def stalled(j: ClipJob) -> bool:
            if steady is None:
                return now >= j.end + stall_s
            return steady - j.made_steady >= j.end - j.made_wall + stall_s

        with self._lock:
            ready = [j for j in self._pending if j.end <= covered_until or stalled(j)]
            return self._finish(ready)

    def drain(self) -> list[ClipJob]:
        """Every pending job, whatever the ring holds (at shutdown)."""
        with self._lock:
            return self._finish(list(self._pending))

    def jobs(self) -> list[ClipJob]:
        with self._lock:
            return list(self._pending)

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def _finish(self, jobs: list[ClipJob]) -> list[ClipJob]:
        for job in jobs:
            self._pending.remove(job)
        self._done = (self._done + jobs)[-self._KEEP_DONE :]
        return jobs


def _overlaps(job: ClipJob, start: float, end: float) -> bool:
    if start == end:
        return job.start <= start <= job.end
    return start < job.end and job.start < end


def _failed(job: ClipJob) -> bool:
    return job.future.done() and (job.future.cancelled() or job.future.exception() is not None)


# --------------------------------------------------------------------------- clips folder


@dataclass(frozen=True)
class ClipInfo:
    """A saved clip as found in the folder."""

    name: str
    path: Path
    size: int
    mtime: float
    meta: dict[str, Any]


class ClipStore:
    """The clips folder: atomic writes, listing, retention and the free-space floor."""

    def __init__(
        self,
        folder: Path,
        *,
        max_bytes: int,
        max_age_s: float,
        min_free_bytes: int,
        ffmpeg: str = "ffmpeg",
        owner: str | None = None,
    ) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.min_free_bytes = min_free_bytes
        self.ffmpeg = ffmpeg
        # The one writer (a camera's recorder) whose work folders carry this name: it may
        # remove them all when it starts, as no one else writes them. "." is in no camera name.
        self._tmp_prefix = f"{_TMP_PREFIX}{owner}." if owner is not None else _TMP_PREFIX
        # Wall time less monotonic time: the wall time at boot, as long as nobody steps it.
        self._boot_wall = time.time() - _since_boot()

    def remove_own_leftovers(self) -> list[str]:
        """Remove the work folders of this store's owner left by a run that was killed
        mid-clip (other writers' folders wait for the hour-old rule). Returns their names."""
        if self._tmp_prefix == _TMP_PREFIX:
            return []
        removed = []
        try:
            entries = list(os.scandir(self.folder))
        except FileNotFoundError:
            return []
        for entry in entries:
            if entry.name.startswith(self._tmp_prefix) and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(entry.name)
        if removed:
            log.info("removed %d unfinished clip folder(s) of an earlier run", len(removed))
        return removed

    # ---- reading (also used by the file server)

    def path_of(self, name: str) -> Path | None:
        """The clip file called ``name``, or None when the name is not a clip's or absent.

        Never follows a symlink and never leaves the folder, whatever ``name`` holds.
        """
        if not CLIP_NAME_RE.fullmatch(name):
            return None
        root = self.folder.resolve()
        path = root / name
        try:
            if path.is_symlink() or not path.is_file():
                return None
            resolved = path.resolve(strict=True)
        except OSError:
            return None
        if resolved.parent != root:
            return None
        return resolved

    def clips(self) -> list[ClipInfo]:
        """Saved clips, newest first."""
        clips: list[ClipInfo] = []
        try:
            entries = list(os.scandir(self.folder))
        except FileNotFoundError:
            return []
        for entry in entries:
            if not CLIP_NAME_RE.fullmatch(entry.name) or not entry.is_file(follow_symlinks=False):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            clips.append(
                ClipInfo(
                    entry.name,
                    Path(entry.path),
                    st.st_size,
                    st.st_mtime,
                    self._sidecar(Path(entry.path)),
                )
            )
        clips.sort(key=lambda c: (c.meta.get("start", c.mtime), c.mtime), reverse=True)
        return clips

    @staticmethod
    def _sidecar(clip: Path) -> dict[str, Any]:
        try:
            data = json.loads(clip.with_suffix(".json").read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):  # a damaged sidecar: no metadata
            return {}
        return data if isinstance(data, dict) else {}

    # ---- writing

    def add_part(self, job: ClipJob, seg: Segment) -> bool:
        """Copy one ring segment into the job's work folder; False if it is already gone.

        Only a regular file is copied: a symlink (or anything else) in the ring is skipped,
        never followed. Raises :class:`ClipError` when the clips folder cannot take it.
        """
        try:
            fd = os.open(seg.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise ClipError(f"cannot read ring segment {seg.path}: {exc}") from exc
            log.warning("ring: %s is a symlink; not copied into a clip", seg.path)
            return False
        with os.fdopen(fd, "rb") as src:
            st = os.fstat(src.fileno())
            if not stat.S_ISREG(st.st_mode):
                log.warning("ring: %s is not a regular file; not copied into a clip", seg.path)
                return False
            if job.workdir is None:
                job.workdir = self._new_workdir()
            self.check_free(2 * st.st_size)
            try:
                with (job.workdir / seg.path.name).open("wb") as out:
                    shutil.copyfileobj(src, out, _COPY_CHUNK)
            except OSError as exc:
                raise ClipError(f"cannot copy {seg.path.name} into {job.workdir}: {exc}") from exc
        job.parts.append(seg)
        job.parts.sort(key=lambda s: (s.start, s.index))
        return True

    def _new_workdir(self) -> Path:
        workdir = self.folder / f"{self._tmp_prefix}{uuid.uuid4().hex}"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            workdir.mkdir()
        except OSError as exc:
            raise ClipError(
                f"cannot save clips in {self.folder}: {exc}; it must be a writable folder"
            ) from exc
        return workdir

    def discard(self, job: ClipJob) -> None:
        if job.workdir is not None:
            shutil.rmtree(job.workdir, ignore_errors=True)
            job.workdir = None

    def save(self, job: ClipJob, *, device: str, camera: str) -> ClipReady:
        """Write the job's segments as one MP4 clip plus its JSON sidecar; returns its message.

        The segments are joined byte-wise (MPEG-TS concatenates) and remuxed by ffmpeg
        without re-encoding, with the index at the front (faststart) so that browsers can
        seek. Nothing appears under its final name until it is complete.
        """
        try:
            return self._save(job, device=device, camera=camera)
        finally:
            self.discard(job)

    def _save(self, job: ClipJob, *, device: str, camera: str) -> ClipReady:
        parts, tmp = job.parts, job.workdir
        if not parts or tmp is None:
            raise ClipError("the ring holds no video for the requested time")
        if shutil.which(self.ffmpeg) is None:
            raise MissingPluginError(f"{self.ffmpeg!r} not found: install ffmpeg to save clips")
        self.apply_retention()
        self.check_free(2 * sum((tmp / p.path.name).stat().st_size for p in parts))

        start, end = parts[0].start, parts[-1].end or parts[-1].start
        first = job.requests[0]
        name = clip_name(camera, start)
        try:
            joined = tmp / "joined.ts"
            with joined.open("wb") as out:
                for part in parts:
                    with (tmp / part.path.name).open("rb") as f:
                        shutil.copyfileobj(f, out, _COPY_CHUNK)
                    (tmp / part.path.name).unlink()
            mp4 = tmp / name
            self._remux(joined, mp4)
            joined.unlink()
            size, digest = _digest(mp4)
            ready = ClipReady(
                device=device,
                camera=camera,
                name=name,
                path=str((self.folder / name).resolve()),
                size=size,
                duration=round(end - start, 3),
                sha256=digest,
                start=start,
                end=end,
                trigger=first.at,
                reason=first.reason,
                reasons=list(dict.fromkeys(r.reason for r in job.requests)),
                counts=dict(first.counts),
                requests=len(job.requests),
                request_ids=[r.id for r in job.requests],
            )
            sidecar = ready.model_dump(mode="json") | {
                "segments": [p.path.name for p in parts],
                "triggers": [
                    {"id": r.id, "at": r.at, "reason": r.reason, "key": r.key, "counts": r.counts}
                    for r in job.requests
                ],
            }
            side_tmp = tmp / "sidecar.json"
            side_tmp.write_text(json.dumps(sidecar, indent=2), encoding="utf-8")
            _fsync(side_tmp)
            _fsync(mp4)
            # The sidecar first: once the MP4 has its name, its metadata is there too.
            os.replace(side_tmp, (self.folder / name).with_suffix(".json"))
            os.replace(mp4, self.folder / name)
            _fsync_dir(self.folder)
        except OSError as exc:
            raise ClipError(f"cannot write clip {name} in {self.folder}: {exc}") from exc
        self.apply_retention(keep=name)
        return ready

    def _remux(self, src: Path, dst: Path) -> None:
        args = [
            self.ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
            "-fflags", "+genpts", "-i", str(src),
            "-map", "0:v:0", "-c", "copy", "-movflags", "+faststart", "-f", "mp4", str(dst),
        ]  # fmt: skip
        try:
            proc = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
        except subprocess.TimeoutExpired as exc:
            raise ClipError("ffmpeg took over 300 s to remux a clip") from exc
        if proc.returncode != 0:
            raise ClipError(f"ffmpeg failed to remux the clip: {proc.stderr.strip()[-500:]}")

    def check_free(self, needed: int) -> None:
        """Raise :class:`DiskFullError` when writing ``needed`` bytes breaks the floor."""
        try:
            free = shutil.disk_usage(self.folder).free
        except OSError as exc:
            raise ClipError(f"cannot read the free space of {self.folder}: {exc}") from exc
        if free - needed < self.min_free_bytes:
            raise DiskFullError(
                f"not saving a clip: {self.folder} has {free} bytes free, the clip needs "
                f"{needed} and recorder.min_free_bytes is {self.min_free_bytes}"
            )

    def apply_retention(self, now: float | None = None, keep: str | None = None) -> list[str]:
        """Delete clips older than the maximum age, then the oldest until under the cap.

        Also removes leftovers of an interrupted save (temporary folders, lone sidecars).
        ``keep``: a clip never deleted (the one just saved). Returns the deleted names.
        """
        now = time.time() if now is None else now
        self._follow_clock_step()
        self._restamp_unset_clock(now)
        removed: list[str] = []
        clips = sorted(self.clips(), key=lambda c: c.mtime)
        total = sum(c.size for c in clips)
        for clip in clips:
            too_old = now - clip.mtime > self.max_age_s
            if clip.name != keep and (too_old or total > self.max_bytes):
                clip.path.unlink(missing_ok=True)
                clip.path.with_suffix(".json").unlink(missing_ok=True)
                total -= clip.size
                removed.append(clip.name)
        self._remove_leftovers(now)
        if removed:
            log.info("retention removed %d clip(s): %s", len(removed), ", ".join(removed))
        return removed

    def _follow_clock_step(self) -> None:
        """After the wall clock was stepped forward (NTP setting a board's clock at last),
        move the clips written since boot under the old clock by the same step: their age
        is the time since they were written, not the years the clock was wrong by.

        Once per step across the processes that share the folder (each recorder, the file
        server), by a mark in the folder taken under a lock: a moved clip's date alone does
        not tell it was moved, when the step is shorter than the time since boot.
        """
        boot_wall = time.time() - _since_boot()
        step, old_boot = boot_wall - self._boot_wall, self._boot_wall
        self._boot_wall = boot_wall
        if step <= _CLOCK_STEP_S:
            return  # set back: clips are kept longer by as much, never deleted early
        stepped_at = old_boot + _since_boot()  # now, by the old clock
        boot = _boot_id()
        try:
            fd = os.open(self.folder / _CLOCK_MARK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            log.warning("cannot open %s: %s", self.folder / _CLOCK_MARK, exc)
            fd = None
        try:
            if fd is not None:
                # Held while the clips are moved: another process waits, then finds them moved.
                fcntl.flock(fd, fcntl.LOCK_EX)
                seen = os.pread(fd, 100, 0).decode(errors="replace").split()
                if len(seen) == 2 and seen[0] == boot:
                    with contextlib.suppress(ValueError):
                        if abs(float(seen[1]) - boot_wall) <= _CLOCK_STEP_S:
                            return  # another process sharing the folder moved them
            moved = 0
            for clip in self.clips():
                if old_boot <= clip.mtime <= stepped_at:
                    moved += self._set_mtime(clip, clip.mtime + step)
            if fd is not None:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{boot} {boot_wall:.0f}".encode(), 0)
        finally:
            if fd is not None:
                os.close(fd)
        log.warning(
            "the wall clock was stepped forward %.0f s; %d clip(s) written before that are "
            "dated by the new clock, so that retention does not take them for old",
            step,
            moved,
        )

    def _restamp_unset_clock(self, now: float) -> None:
        """A clip dated before any plausible date (written before the clock was set, in an
        earlier boot) has an unknown age: it counts from now, not from 1970."""
        if now < _CLOCK_FLOOR:
            return
        for clip in self.clips():
            if clip.mtime < _CLOCK_FLOOR and self._set_mtime(clip, now):
                log.warning(
                    "clip %s is dated %.0f, before the clock was set; its age counts from now",
                    clip.name,
                    clip.mtime,
                )

    @staticmethod
    def _set_mtime(clip: ClipInfo, mtime: float) -> bool:
        try:
            os.utime(clip.path, (mtime, mtime), follow_symlinks=False)
        except OSError as exc:
            log.warning("cannot re-date clip %s: %s", clip.name, exc)
            return False
        with contextlib.suppress(OSError):
            side = clip.path.with_suffix(".json")
            os.utime(side, (mtime, mtime), follow_symlinks=False)
        return True

    def _remove_leftovers(self, now: float) -> None:
        try:
            entries = list(os.scandir(self.folder))
        except FileNotFoundError:
            return
        for entry in entries:
            path = Path(entry.path)
            if entry.name.startswith(_TMP_PREFIX) and now - entry.stat().st_mtime > 3600:
                shutil.rmtree(path, ignore_errors=True)
            elif (
                entry.name.endswith(".json")
                and CLIP_NAME_RE.fullmatch(entry.name[:-5] + ".mp4")
                and not path.with_suffix(".mp4").exists()
                and now - entry.stat().st_mtime > 60
            ):
                path.unlink(missing_ok=True)


def _since_boot() -> float:
    """Seconds since boot, the time suspended included: waking from a suspend is no step of
    the wall clock (the monotonic clock stands still while suspended)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def _boot_id() -> str:
    try:
        return _BOOT_ID.read_text().strip() or "-"
    except OSError:
        return "-"


def _digest(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(_COPY_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        _fsync(path)
