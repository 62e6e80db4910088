"""One frame's analytics: tracker step, label votes, counts; and the typed frame message."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np

from edgecam.config import Settings
from edgecam.vision.detections import PRIVACY_FACE, Detections
from edgecam.vision.privacy import FaceHold, Rect
from edgecam.vision.settled import SettledTracks
from edgecam.vision.tracking import TRACKERS, Tracker
from edgecam.vision.votes import PERSON, LabelVoter
from edgecam.vision.zones import LineState, ZoneCounter, ZoneState

__all__ = ["Analytics", "FollowsSettled", "FrameMeta", "MetaBus", "TrackInfo"]

log = logging.getLogger(__name__)


class TrackInfo(NamedTuple):
    """One tracked object on one frame, in source pixels (a named tuple: a frame makes one
    a track, and a frozen dataclass costs several times as much to make)."""

    id: int
    box: tuple[float, float, float, float]
    label: str
    score: float
    counted: bool
    seen: bool = True  # a detection matched it on this frame (False: the tracker's estimate)


@dataclass(frozen=True, slots=True)
class FrameMeta:
    """Everything the pipeline knows about one frame; what subscribers receive."""

    camera: str
    frame: int
    pts: float
    wall_time: float
    tracks: tuple[TrackInfo, ...]
    counts: dict[str, int]
    fps: float
    detected: bool
    zones: tuple[ZoneState, ...] = ()
    lines: tuple[LineState, ...] = ()
    hidden: tuple[Rect, ...] = ()  # face regions no output may show (source pixels)
    blind: bool = False  # faces are hidden but unknown: no output may show this frame

    def to_event(self) -> dict[str, Any]:
        """The ``--events`` JSON object for this frame (``zones`` and ``lines`` only for a
        camera that has some)."""
        event: dict[str, Any] = {
            "frame": self.frame,
            "pts": round(self.pts, 6),
            "tracks": [
                {
                    "id": t.id,
                    "box": [round(v, 1) for v in t.box],
                    "label": t.label,
                    "score": round(t.score, 4),
                }
                for t in self.tracks
            ],
            "counts": self.counts,
        }
        if self.zones:
            event["zones"] = {
                z.name: {
                    "occupancy": z.occupancy,
                    "ids": list(z.ids),
                    "entered": list(z.entered),
                    "exited": [{"id": t, "dwell_s": round(d, 3)} for t, d in z.exited],
                    "longest_s": round(z.longest_s, 3),
                }
                for z in self.zones
            }
        if self.lines:
            event["lines"] = {
                ln.name: {
                    "in": ln.total_in,
                    "out": ln.total_out,
                    "crossed": [{"id": t, "dir": d} for t, d in ln.crossings],
                }
                for ln in self.lines
            }
        return event


class MetaBus:
    """In-process publish/subscribe of :class:`FrameMeta`.

    ``publish`` never blocks the video: a bounded subscriber that falls behind loses its
    oldest messages (and the loss is counted); an unbounded one (maxsize 0) loses nothing.
    """

    def __init__(self) -> None:
        self._subscribers: list[queue.Queue[FrameMeta | None]] = []
        self._lock = threading.Lock()
        self.dropped = 0

    def subscribe(self, maxsize: int = 256) -> queue.Queue[FrameMeta | None]:
        q: queue.Queue[FrameMeta | None] = queue.Queue(maxsize=maxsize)
        with self._lock:
            self._subscribers.append(q)
        return q

    def unsubscribe(self, q: queue.Queue[FrameMeta | None]) -> None:
        with self._lock:
            if q in self._subscribers:
                self._subscribers.remove(q)

    def publish(self, meta: FrameMeta | None) -> None:
        """Send ``meta`` to every subscriber; None tells them the stream ended."""
        for q in self._subscribers:
            while True:
                try:
                    q.put_nowait(meta)
                    break
                except queue.Full:
                    try:
                        q.get_nowait()
                        self.dropped += 1
                    except queue.Empty:
                        pass

    @property
    def active(self) -> bool:
        return bool(self._subscribers)


@runtime_checkable
class FollowsSettled(Protocol):
    """A detector that can skip work for tracks whose label is settled."""

    def follow(self, settled: SettledTracks) -> None: ...


class Analytics:
    """Turns each frame's (optional) detections into tracks with labels and counts.

    With a classifying profile, :attr:`settled` holds the boxes of the tracks whose label is
    settled after each frame, for the detector, once one follows it (:meth:`share_settled`;
    until then they are not worked out).
    """

    def __init__(self, settings: Settings, camera: str, tracker: Tracker | None = None) -> None:
        self._camera = camera
        cam = settings.camera(camera)[1]
        self._min_age = settings.tracker.min_age_frames
        self._tracker: Tracker = tracker or TRACKERS[settings.tracker.backend](settings.tracker)
        classify = settings.vision.profile == "mask"
        self._zones = ZoneCounter(
            cam.zones, cam.lines, zone_anchor=cam.zone_anchor, zone_band=cam.zone_band
        )
        self._zone_band = cam.zone_band
        self._zones_checked: set[tuple[int, int]] = set()  # frame sizes
        hide_faces = cam.privacy.faces != "off"
        self._faces = FaceHold(cam.privacy) if hide_faces else None
        # The mask profile tracks faces already; any other tracks faces for privacy apart.
        self._face_tracker: Tracker | None = (
            TRACKERS[settings.tracker.backend](settings.tracker)
            if hide_faces and not classify
            else None
        )
        self._voter = LabelVoter(settings.voting, classify=classify, label=PERSON)
        self._can_settle = classify and settings.voting.settle_votes > 0
        self._publish_settled = False  # only once a detector follows :attr:`settled`
        self.settled = SettledTracks()
        self._frame = -1
        self._last_detection_frame = -1
        self._fps = 0.0
        self._last_wall = 0.0
        self._bounds_size: tuple[int, int] | None = None
        self._bounds_array = np.zeros(4, dtype=np.float32)

    @property
    def labels(self) -> tuple[str, ...]:
        return self._voter.labels

    def _bounds(self, frame_size: tuple[int, int]) -> np.ndarray:
        """The picture's (w, h, w, h), to clip boxes to (np.clip's own checks and the array
        made from a tuple cost more than the clipping, on every frame)."""
        if frame_size != self._bounds_size:
            w, h = frame_size
            self._bounds_array = np.array([w, h, w, h], dtype=np.float32)
            self._bounds_size = frame_size
        return self._bounds_array

    def _check_zones(self, frame_size: tuple[int, int]) -> None:
        """Say once for each frame size which zones can never hold anyone at that size (how
        thin a zone may be depends on the frame's shape: the config check refuses those too
        thin on any frame)."""
        self._zones_checked.add(frame_size)
        w, h = frame_size
        for name in self._zones.unreachable_zones(frame_size):
            log.warning(
                "camera %r: zone %r can never hold anyone at %dx%d: a track enters a zone when "
                "zone_band (%g of the frame height, %.1f px) inside its edges, and no point of "
                "%r is that far inside them at this frame size. Make the zone wider or taller, "
                "or lower zone_band",
                self._camera,
                name,
                w,
                h,
                self._zone_band,
                self._zones.zone_band_pixels,
                name,
            )

    def share_settled(self, detectors: Iterable[object]) -> int:
        """Let every detector that can skip settled tracks follow :attr:`settled`; how many do.

        Live only: which faces skip then depends on how far the analytics are behind the
        detector, which offline runs must not (their output is the same on every run).
        """
        if not self._can_settle:
            return 0
        n = 0
        for detector in detectors:
            if isinstance(detector, FollowsSettled):
                detector.follow(self.settled)
                n += 1
        self._publish_settled = self._publish_settled or n > 0
        return n

    def step(
        self,
        pts: float,
        detections: Detections | None,
        frame_size: tuple[int, int] | None = None,
    ) -> FrameMeta:
        """Advance one frame. ``detections`` (source pixels) is None where none ran.

        With ``frame_size`` (width, height), boxes are clipped to the picture and tracks the
        filter has carried out of it are left out.
        """
        self._frame += 1
        frame = self._frame
        faces: Detections | None = None
        if self._face_tracker is not None:
            if detections is not None:
                is_face = detections.class_id == PRIVACY_FACE
                faces, detections = detections[is_face], detections[~is_face]
        elif detections is not None and self._faces is not None:
            faces = detections
        period = 1
        if detections is not None:
            period = frame - self._last_detection_frame if self._last_detection_frame >= 0 else 1
            self._last_detection_frame = frame
            update = self._tracker.update(detections, period=max(1, period))
        else:
            update = self._tracker.update(None)
        tracks = update.tracks
        states = self._voter.update_states(
            frame, tracks.tracker_id, tracks.attribute, update.matched
        )
        counts = dict.fromkeys(self._voter.labels, 0)
        publish, voter, min_age = self._publish_settled, self._voter, self._min_age
        infos = []
        settled: list[int] = []
        # Plain Python values, converted once for all tracks: numpy scalars a track each
        # would cost more than the rest of this loop.
        xyxy = tracks.xyxy
        if frame_size is not None:
            xyxy = np.minimum(np.maximum(xyxy, 0.0), self._bounds(frame_size))
        for k, (tid, box, state, conf, hit) in enumerate(
            zip(
                tracks.tracker_id.tolist(),
                xyxy.tolist(),
                states,
                tracks.confidence.tolist(),
                update.matched.tolist(),
                strict=True,
            )
        ):
            x1, y1, x2, y2 = box
            if frame_size is not None and (x2 - x1 < 1 or y2 - y1 < 1):
                continue  # carried out of the picture: neither drawn nor counted
            if publish and voter.settled(state, frame):
                settled.append(k)
            label = state.label
            counted = frame - state.first_frame >= min_age
            if counted:
                counts[label] = counts.get(label, 0) + 1
            infos.append(TrackInfo(tid, (x1, y1, x2, y2), label, conf, counted, hit))
        if self._publish_settled and frame_size is not None:
            self.settled.publish(tracks.xyxy[np.asarray(settled, dtype=np.int64)], frame_size)
        now = time.monotonic()
        if self._last_wall:
            dt = now - self._last_wall
            if dt > 0:
                inst = 1.0 / dt
                self._fps = inst if self._fps == 0 else 0.95 * self._fps + 0.05 * inst
        self._last_wall = now
        zones: tuple[ZoneState, ...] = ()
        lines: tuple[LineState, ...] = ()
        hidden: tuple[Rect, ...] = ()
        blind = False
        if frame_size is not None and not self._zones.empty:
            if frame_size not in self._zones_checked:
                self._check_zones(frame_size)
            # Every shown track, counted or not yet: one that is still young when it
            # crosses (just out of a group, say) must not be missed.
            zones, lines = self._zones.update(
                pts,
                [t.id for t in infos],
                [t.box for t in infos],
                frame_size,
                seen=[t.seen for t in infos],
            )
        face_tracks = tracks
        if self._face_tracker is not None:
            face_tracks = self._face_tracker.update(faces, period=max(1, period)).tracks
        if frame_size is not None and self._faces is not None:
            hidden = self._faces.update(
                pts,
                face_tracks.tracker_id,
                face_tracks.xyxy,
                faces.xyxy if faces is not None else None,
                frame_size,
            )
            blind = self._faces.blind
        return FrameMeta(
            camera=self._camera,
            frame=frame,
            pts=pts,
            wall_time=time.time(),
            tracks=tuple(infos),
            counts=counts,
            fps=self._fps,
            detected=detections is not None,
            zones=zones,
            lines=lines,
            hidden=hidden,
            blind=blind,
        )
