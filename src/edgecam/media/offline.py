"""``edgecam process``: a file in, an annotated MP4 (and per-frame events) out, as fast as
the machine allows."""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar

from edgecam.config import Settings
from edgecam.errors import EdgecamError, SourceError, UsageError
from edgecam.media.backends import resolve_backend
from edgecam.media.pipeline import Pipeline
from edgecam.media.probe import VideoFileInfo, probe_video
from edgecam.vision.analytics import FrameMeta
from edgecam.vision.detections import Detector

__all__ = ["FileJob", "ProcessResult", "process_file", "process_files"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_R = TypeVar("_R")

_OUT_SUFFIXES = (".mp4", ".m4v", ".mov")
# A video that stops short of its container's duration by more than this is truncated (a
# container's duration may run a little past the video's when another track is longer).
_END_TOLERANCE_S = 0.5
_END_TOLERANCE = 0.05
_PROGRESS_EVERY_S = 5.0  # several files: a log line of each one's frames this often


class ProcessResult:
    """Figures of one offline run."""

    def __init__(
        self, frames: int, seconds: float, detections: int, video_end_s: float = 0.0
    ) -> None:
        self.frames = frames
        self.seconds = seconds
        self.detections = detections
        self.video_end_s = video_end_s  # stream time where the last frame ends

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def __repr__(self) -> str:
        return (
            f"ProcessResult(frames={self.frames}, seconds={self.seconds:.2f}, "
            f"fps={self.fps:.1f}, detections={self.detections})"
        )


class _EventsWriter:
    """Writes one JSON line a frame from the pipeline's metadata, on its own thread."""

    def __init__(self, pipeline: Pipeline, path: Path) -> None:
        self._path = path
        try:
            self._file: IO[str] = path.open("w", encoding="utf-8")
        except OSError as exc:
            raise EdgecamError(f"cannot write --events {path}: {exc.strerror}") from exc
        self._error: OSError | None = None
        self._queue = pipeline.meta_bus.subscribe(maxsize=0)
        self._thread = threading.Thread(target=self._run, name="events-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            meta: FrameMeta | None = self._queue.get()
            if meta is None:
                break
            if self._error is None:
                try:
                    self._file.write(json.dumps(meta.to_event(), separators=(",", ":")) + "\n")
                except OSError as exc:  # a full disk: said at close, the run goes on
                    self._error = exc

    def close(self) -> None:
        """Flush and close; raise if a line could not be written."""
        self._thread.join(timeout=30)
        try:
            self._file.close()
        except OSError as exc:
            self._error = self._error or exc
        if self._error is not None:
            raise EdgecamError(f"cannot write the events file: {self._error.strerror}")


class _Progress:
    """A one-line progress display: frames, fps, ETA (a log line a few seconds when not a TTY)."""

    def __init__(self, enabled: bool) -> None:
        self._enabled = enabled
        self._tty = sys.stderr.isatty()
        self._start = time.monotonic()
        self._last = self._start  # the first line after one interval: something to show

    def __call__(self, pipeline: Pipeline) -> None:
        if not self._enabled:
            return
        now = time.monotonic()
        if now - self._last < (0.5 if self._tty else 5.0):
            return
        self._last = now
        pos, dur = pipeline.position()
        elapsed = now - self._start
        fraction = pos / dur if pos is not None and dur else 0.0
        speed = pos / elapsed if pos is not None and elapsed > 0 else 0.0
        frames = pipeline.stats.frames
        fps = frames / elapsed if elapsed > 0 else 0.0
        eta = elapsed * (1 - fraction) / fraction if fraction > 0 else float("nan")
        bar = "#" * int(fraction * 30)
        eta_text = f"{eta:5.1f} s" if eta == eta else "?"  # NaN until the duration is known
        line = (
            f"[{bar:<30}] {fraction * 100:5.1f}%  {frames} frames  {fps:6.1f} fps  "
            f"{speed:4.1f}x real time  ETA {eta_text}"
        )
        if self._tty:
            sys.stderr.write("\r" + line)
            sys.stderr.flush()
        else:
            log.info("%s", line)

    def finish(self, result: ProcessResult) -> None:
        if self._enabled and self._tty:
            sys.stderr.write("\n")
        if self._enabled:
            log.info(
                "done: %d frames in %.1f s (%.1f fps), %d detections",
                result.frames,
                result.seconds,
                result.fps,
                result.detections,
            )


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # b does not exist yet: it cannot be a
        return False


def _check_outputs(input_path: Path, out: Path, events: Path | None) -> None:
    """Refuse outputs that would destroy the input or each other, before anything is opened."""
    if out.suffix.lower() not in _OUT_SUFFIXES:
        raise UsageError(f"--out {out}: the output is an MP4 file; name it *.mp4")
    named = [("--out", out)] + ([("--events", events)] if events is not None else [])
    for option, path in named:
        if path.is_dir():
            raise UsageError(f"{option} {path} is a folder; give a file name")
        if _same_file(input_path, path):
            raise UsageError(f"{option} {path} is the input file; it would be overwritten")
    if events is not None and (events.resolve() == out.resolve() or _same_file(out, events)):
        raise UsageError(f"--events {events} is the --out file; give two different files")


class _Output:
    """One output file of a run: written beside its target and renamed into place on
    success. A target that exists and is not a regular file (``/dev/stdout``, a FIFO) is
    written directly: renaming onto it would replace the device or pipe. A symlink is
    followed: the file it points to is replaced, not the link."""

    def __init__(self, target: Path, option: str) -> None:
        self.option = option
        self.direct = target.exists() and not target.is_file()
        self.target = target.resolve() if target.is_symlink() and not self.direct else target
        self.writing = self.target
        self._temp: Path | None = None

    def open(self) -> None:
        if not self.direct:
            self._temp = self.writing = _temp_beside(self.target, self.option)

    def commit(self) -> None:
        if self._temp is not None:
            os.replace(self._temp, self.target)
            self._temp = None

    def discard(self) -> None:
        if self._temp is not None:
            self._temp.unlink(missing_ok=True)
            self._temp = None


def _temp_beside(target: Path, option: str) -> Path:
    """An empty temporary file in ``target``'s folder (so the final rename is atomic)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        # 0o666 and the umask, as the file itself would have been created.
        os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666))
    except OSError as exc:
        raise EdgecamError(f"cannot write {option} {target}: {exc.strerror}") from exc
    return temp


def process_file(
    settings: Settings,
    input_path: Path,
    out: Path,
    *,
    events: Path | None = None,
    progress: bool = True,
    detector: Detector | None = None,
    before_commit: Callable[[], None] | None = None,
) -> ProcessResult:
    """Run the pipeline on ``input_path`` as fast as possible; write ``out`` (and ``events``).

    ``before_commit`` is called after the run, before the outputs replace their targets; what
    it raises leaves the targets as they were (the CLI raises there for a stop signal that
    arrived while the run could not be interrupted).

    Detection is deterministic here: exactly ``vision.detect_fps`` detections a second of
    video, so the same input and config give the same output on any machine.

    Outputs are written beside their targets and renamed into place only when the run
    succeeds: a failed run leaves an existing ``out`` as it was and no partial files. An
    input that ends before the frames its header promised still gives its outputs, then
    raises :class:`SourceError` saying so.
    """
    _check_outputs(input_path, out, events)
    info = probe_video(input_path)
    cam = settings.cameras[0].model_copy(update={"source": str(input_path), "loop": False})
    settings = settings.model_copy(update={"cameras": [cam]})
    outputs = [_Output(out, "--out")] + ([_Output(events, "--events")] if events else [])
    try:
        for output in outputs:
            output.open()
        result = _run(
            settings,
            outputs[0].writing,
            outputs[1].writing if events else None,
            progress,
            detector,
        )
        if before_commit is not None:
            before_commit()
        for output in outputs:
            output.commit()
    finally:
        for output in outputs:
            output.discard()
    _check_whole(input_path, out, info, result)
    return result


def _check_whole(input_path: Path, out: Path, info: VideoFileInfo, result: ProcessResult) -> None:
    if info.duration_s is not None and result.video_end_s < info.duration_s - max(
        _END_TOLERANCE_S, _END_TOLERANCE * info.duration_s
    ):
        # By time, not by frames: a variable-frame-rate file has fewer frames than its
        # duration times its nominal rate, and is still whole.
        promised = info.frames_promised
        about = f"{promised} ({info.duration_s:.1f} s)" if promised else f"{info.duration_s:.1f} s"
        raise SourceError(
            f"{input_path} ended early: decoded {result.frames} frames "
            f"({result.video_end_s:.1f} s), the header promised {about} (the file is truncated "
            f"or damaged); {out} holds the {result.frames} frames"
        )


def _run(
    settings: Settings,
    out: Path,
    events: Path | None,
    progress: bool,
    detector: Detector | None,
) -> ProcessResult:
    pipeline = Pipeline(
        settings,
        mode="offline",
        out_file=out,
        rtp=False,
        detector=detector,
        analytics=True if events is not None else None,
    )
    writer = _EventsWriter(pipeline, events) if events is not None else None
    bar = _Progress(progress)
    start = time.monotonic()
    try:
        pipeline.start()
        pipeline.run(on_tick=bar)
    finally:
        pipeline.close()
        if writer is not None:
            writer.close()
    result = ProcessResult(
        pipeline.stats.frames,
        time.monotonic() - start,
        pipeline.stats.detections,
        pipeline.stats.video_end_s,
    )
    bar.finish(result)
    return result


# -- several files through one detector ----------------------------------------------------


@dataclass(frozen=True)
class FileJob:
    """One input of :func:`process_files` and where its outputs go."""

    input: Path
    out: Path
    events: Path | None = None


def _camera_names(jobs: Sequence[FileJob]) -> list[str]:
    """A camera name per job (from the file name: what logs and the detector call it)."""
    names: list[str] = []
    for job in jobs:
        base = re.sub(r"[^A-Za-z0-9_-]", "-", job.input.stem)[:28] or "file"
        name, k = base, 1
        while name in names:
            k += 1
            name = f"{base}-{k}"
        names.append(name)
    return names


def process_files(
    settings: Settings, jobs: Sequence[FileJob], *, progress: bool = True
) -> list[ProcessResult]:
    """Several files side by side, each through its own pipeline, tracker and analytics,
    with one detector for all of them that takes frames of every file in one call.

    Each file gets the same detections, tracks and events as :func:`process_file` gives it
    alone: every due frame is detected whatever else runs. Outputs are written as
    :func:`process_file` writes them; the first file that fails fails the run (after every
    pipeline has stopped), and no file's outputs are left half written.
    """
    from edgecam.vision.batching import DetectorBatcher
    from edgecam.vision.detectors import build_detector

    if not jobs:
        raise UsageError("give at least one input file")
    targets = [p for job in jobs for p in (job.out, job.events) if p is not None]
    _check_distinct_targets(jobs)
    for job in jobs:
        _check_outputs(job.input, job.out, job.events)
        if any(_same_file(job.input, t) for t in targets):
            raise UsageError(f"{job.input} is also an output; it would be overwritten")
    infos = _each(lambda job: probe_video(job.input), jobs)  # every bad input named
    resolve_backend(settings)  # one that cannot run here fails before the model is loaded
    names = _camera_names(jobs)
    cams = [
        settings.cameras[0].model_copy(update={"name": n, "source": str(j.input), "loop": False})
        for n, j in zip(names, jobs, strict=True)
    ]
    vision = settings.vision
    faces = any(c.privacy.faces != "off" for c in cams)
    batcher = None
    if vision.detect_fps > 0:  # the rate every file's pipeline runs at
        # As one file's own detectors: offline_workers calls at once, sharing the threads.
        workers = vision.offline_workers
        shared = vision.model_copy(update={"threads": max(1, vision.threads // workers)})
        batcher = DetectorBatcher(
            build_detector(shared, privacy_faces=faces),
            max_batch=vision.max_batch,
            deadline_s=vision.batch_deadline_ms / 1000,
            workers=workers,
        )
    outputs = [
        [_Output(j.out, "--out")] + ([_Output(j.events, "--events")] if j.events else [])
        for j in jobs
    ]
    runs: list[_FileRun] = []
    try:
        if batcher is not None:
            batcher.start()
        for group in outputs:
            for output in group:
                output.open()
        for cam, job, group in zip(cams, jobs, outputs, strict=True):
            detectors: list[Detector] | None = None
            if batcher is not None:
                detectors = [batcher.attach(cam.name) for _ in range(vision.offline_workers)]
            runs.append(
                _FileRun(
                    settings.model_copy(update={"cameras": [cam]}),
                    group[0].writing,
                    group[1].writing if job.events else None,
                    detectors,
                )
            )
        results = _run_side_by_side(runs, progress)
        for group in outputs:
            for output in group:
                output.commit()
    finally:
        for run in runs:
            if not run.thread.ident:  # never started: a later pipeline could not be built
                run.close()
        for group in outputs:
            for output in group:
                output.discard()
        if batcher is not None:
            if batcher.stats.batches:
                log.info(
                    "shared detector: %d frames in %d calls (%.2f a call)",
                    batcher.stats.frames,
                    batcher.stats.batches,
                    batcher.stats.mean_batch,
                )
            batcher.stop()
    ends = zip(jobs, infos, results, strict=True)
    _each(lambda end: _check_whole(end[0].input, end[0].out, end[1], end[2]), ends)
    return results


def _each(check: Callable[[_T], _R], items: Iterable[_T]) -> list[_R]:
    """``check`` of every item; the :class:`SourceError` of each item that fails, raised
    together, a line each (the first alone would hide the others until it is mended)."""
    results: list[_R] = []
    errors: list[str] = []
    for item in items:
        try:
            results.append(check(item))
        except SourceError as exc:
            errors.append(str(exc))
    if errors:
        raise SourceError("\n".join(errors))
    return results


def _check_distinct_targets(jobs: Sequence[FileJob]) -> None:
    """Refuse two inputs that would write one file, naming both (with ``--out-dir`` the
    file name comes from the input's: ``a/x.mp4`` and ``b/x.mp4`` both write ``x.mp4``)."""
    writers: dict[Path, FileJob] = {}
    for job in jobs:
        for target in (job.out, job.events):
            if target is None:
                continue
            other = writers.setdefault(target.resolve(), job)
            if other is job:
                continue
            if other.input.resolve() == job.input.resolve() or _same_file(other.input, job.input):
                raise UsageError(f"{job.input} is given twice; give each input once")
            raise UsageError(
                f"{other.input} and {job.input} would both write {target}; "
                "process them apart or rename one"
            )


class _FileRun:
    """One file's pipeline in :func:`process_files`, run on a thread of its own."""

    def __init__(
        self,
        settings: Settings,
        out: Path,
        events: Path | None,
        detectors: list[Detector] | None,
    ) -> None:
        self.pipeline = Pipeline(
            settings,
            mode="offline",
            out_file=out,
            rtp=False,
            detectors=detectors,
            analytics=True if events is not None else None,
        )
        self.detectors = detectors or []
        self.writer = _EventsWriter(self.pipeline, events) if events is not None else None
        self.error: BaseException | None = None
        self.seconds = 0.0
        # Set when the run has ended and closed. Not ``thread.is_alive()``: a ``join`` that a
        # signal interrupts leaves a running thread looking finished (Python < 3.13).
        self.done = threading.Event()
        self._stopped = threading.Event()
        self.thread = threading.Thread(
            target=self._run, name=f"process-{self.pipeline.camera.name}", daemon=True
        )

    def _run(self) -> None:
        start = time.monotonic()
        try:
            self.pipeline.start()
            if self._stopped.is_set():  # asked before: starting made the pipeline forget it
                self.pipeline.stop()
            self.pipeline.run()
        except BaseException as exc:  # re-raised in the caller's thread
            self.error = exc
        finally:
            self.seconds = time.monotonic() - start
            self.close()
            self.done.set()

    def stop(self) -> None:
        """Ask the run to finish (from the caller's thread), whether or not its thread has
        started the pipeline yet."""
        self._stopped.set()
        self.pipeline.stop()

    def close(self) -> None:
        self.pipeline.close()
        for detector in self.detectors:
            detector.close()  # detaches from the shared detector
        if self.writer is not None:
            writer, self.writer = self.writer, None
            try:
                writer.close()
            except EdgecamError as exc:
                self.error = self.error or exc

    def result(self) -> ProcessResult:
        stats = self.pipeline.stats
        return ProcessResult(stats.frames, self.seconds, stats.detections, stats.video_end_s)


def _run_side_by_side(runs: list[_FileRun], progress: bool) -> list[ProcessResult]:
    stopped = False
    try:
        for run in runs:
            run.thread.start()
        last = time.monotonic()
        while not all(r.done.is_set() for r in runs):
            for r in runs:
                r.done.wait(timeout=0.2)
            if not stopped and any(r.error is not None for r in runs):
                stopped = True  # one file fails the run: the others stop too
                for r in runs:
                    r.stop()
            if progress and time.monotonic() - last >= _PROGRESS_EVERY_S:
                last = time.monotonic()
                log.info(
                    "%s",
                    "  ".join(f"{r.pipeline.camera.name}: {r.pipeline.stats.frames}" for r in runs),
                )
    finally:
        started = [r for r in runs if r.thread.ident]
        for r in started:
            if not r.done.is_set():
                r.stop()
        for r in started:
            r.done.wait(timeout=30)
    for r in runs:
        if r.error is not None:
            raise r.error
    results = [r.result() for r in runs]
    if progress:
        for r, res in zip(runs, results, strict=True):
            log.info("%s: %r", r.pipeline.camera.name, res)
    return results
