"""What a video file holds, asked before a pipeline is built, so that a bad input gets a
sentence about the input (empty, not a video, no video stream) instead of an element's
error."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgecam.errors import SourceError
from edgecam.media.gst import GLib, Gst, GstPbutils, init

__all__ = ["VideoFileInfo", "probe_video"]

# Long enough for a large file on a slow disk; the probe reads only the headers.
_PROBE_TIMEOUT_S = 20


@dataclass(frozen=True)
class VideoFileInfo:
    """The first video stream of a file, as its container describes it."""

    width: int
    height: int
    fps: float | None  # None: variable or unknown
    duration_s: float | None  # None: unknown (a stream without an index)

    @property
    def frames_promised(self) -> int | None:
        """Frames the header promises, where both its duration and frame rate are known."""
        if self.fps is None or self.duration_s is None:
            return None
        return round(self.duration_s * self.fps)


def probe_video(path: Path) -> VideoFileInfo:
    """Describe the video in ``path``; raise :class:`SourceError` saying what is wrong."""
    if not path.exists():
        raise SourceError(f"input file {path} does not exist")
    if not path.is_file():
        raise SourceError(f"input {path} is not a file")
    if path.stat().st_size == 0:
        raise SourceError(f"{path} is empty (0 bytes), not a video file")
    init()
    discoverer = GstPbutils.Discoverer.new(_PROBE_TIMEOUT_S * Gst.SECOND)
    try:
        info = discoverer.discover_uri(Gst.filename_to_uri(str(path.resolve())))
    except GLib.Error as exc:
        if exc.matches(Gst.ResourceError.quark(), exc.code):
            raise SourceError(f"cannot read {path}: {exc.message}") from exc
        raise SourceError(
            f"{path} is not a video file (GStreamer says: {exc.message.rstrip('.')})"
        ) from exc
    result = info.get_result()
    if result == GstPbutils.DiscovererResult.TIMEOUT:
        raise SourceError(f"{path}: no answer from the demuxer within {_PROBE_TIMEOUT_S} s")
    if result == GstPbutils.DiscovererResult.MISSING_PLUGINS:
        details = ", ".join(info.get_missing_elements_installer_details() or []) or "?"
        raise SourceError(f"{path}: no GStreamer decoder for its video ({details})")
    videos = [v for v in info.get_video_streams() if not v.is_image()]
    if not videos:
        kinds = sorted({s.get_stream_type_nick() for s in info.get_stream_list()})
        holds = f" (it holds {', '.join(kinds)} only)" if kinds else ""
        raise SourceError(f"no video stream in {path}{holds}")
    video = videos[0]
    num, den = video.get_framerate_num(), video.get_framerate_denom()
    duration = info.get_duration()
    return VideoFileInfo(
        width=video.get_width(),
        height=video.get_height(),
        fps=num / den if num > 0 and den > 0 else None,
        duration_s=duration / Gst.SECOND if 0 < duration != Gst.CLOCK_TIME_NONE else None,
    )
