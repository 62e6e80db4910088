"""``edgecam process``: a file in, an annotated MP4 (and per-frame events) out, as fast as
the machine allows."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from pathlib import Path
from typing import IO

from edgecam.config import Settings
from edgecam.errors import SourceError
from edgecam.media.pipeline import Pipeline
from edgecam.vision.analytics import FrameMeta
from edgecam.vision.detections import Detector

__all__ = ["ProcessResult", "process_file"]

log = logging.getLogger(__name__)


class ProcessResult:
    """Figures of one offline run."""

    def __init__(self, frames: int, seconds: float, detections: int) -> None:
        self.frames = frames
        self.seconds = seconds
        self.detections = detections

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
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = path.open("w", encoding="utf-8")
        self._queue = pipeline.meta_bus.subscribe(maxsize=0)
        self._thread = threading.Thread(target=self._run, name="events-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            meta: FrameMeta | None = self._queue.get()
            if meta is None:
                break
            self._file.write(json.dumps(meta.to_event(), separators=(",", ":")) + "\n")

    def close(self) -> None:
        self._thread.join(timeout=30)
        self._file.close()


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


def process_file(
    settings: Settings,
    input_path: Path,
    out: Path,
    *,
    events: Path | None = None,
    progress: bool = True,
    detector: Detector | None = None,
) -> ProcessResult:
    """Run the pipeline on ``input_path`` as fast as possible; write ``out`` (and ``events``).

    Detection is deterministic here: exactly ``vision.detect_fps`` detections a second of
    video, so the same input and config give the same output on any machine.
    """
    if not input_path.is_file():
        raise SourceError(f"input file {input_path} does not exist")
    if out.suffix.lower() not in (".mp4", ".m4v", ".mov"):
        raise SourceError(f"--out {out}: the output is an MP4 file; name it *.mp4")
    cam = settings.cameras[0].model_copy(update={"source": str(input_path), "loop": False})
    settings = settings.model_copy(update={"cameras": [cam]})
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
        pipeline.stats.frames, time.monotonic() - start, pipeline.stats.detections
    )
    bar.finish(result)
    return result
