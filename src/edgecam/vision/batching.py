"""One detector shared by several cameras: frames from every camera in one model call.

Each camera gets a :class:`BatchedDetector`, a proxy with the :class:`Detector` shape, so
its pipeline uses it as it would its own detector; ``detect()`` hands the frame to the
shared :class:`DetectorBatcher` and waits for that frame's detections. A worker thread (or
``workers`` of them, each with a batch of its own: ONNX Runtime sessions take concurrent
calls) takes the waiting frames, up to ``max_batch`` of them, and runs them through the
detector's ``detect_batch`` in one call. A batch closes when it is full or ``deadline_s`` after its
first frame arrived, so a camera that is slow or gone never holds the others' frames back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from edgecam.errors import EdgecamError
from edgecam.vision.detections import Detections, Detector
from edgecam.vision.detectors import detect_batch
from edgecam.vision.settled import SettledTracks

__all__ = [
    "BatchFailed",
    "BatchStats",
    "BatchedDetector",
    "BatcherStopped",
    "DetectorBatcher",
]

log = logging.getLogger(__name__)

Frame = npt.NDArray[np.uint8]

# How long the worker sleeps at most between looks at its stop flag when idle.
_IDLE_WAIT_S = 0.5


class BatcherStopped(EdgecamError):
    """The shared detector was stopped while a frame waited for it."""


class BatchFailed(EdgecamError):
    """The shared detector raised on the batch a frame was in (the cause is chained)."""


@dataclass
class BatchStats:
    """What the shared detector did, for the benchmark and the worker's figures."""

    batches: int = 0
    frames: int = 0
    seconds: float = 0.0  # in detect_batch
    sizes: dict[int, int] = field(default_factory=dict)  # batch size -> batches of that size
    errors: int = 0

    @property
    def mean_batch(self) -> float:
        return self.frames / self.batches if self.batches else 0.0


class _Request:
    __slots__ = ("camera", "done", "error", "frame", "result", "settled")

    def __init__(self, camera: str, frame: Frame, settled: SettledTracks | None) -> None:
        self.camera = camera
        self.frame = frame
        self.settled = settled
        self.done = threading.Event()
        self.result: Detections | None = None
        self.error: BaseException | None = None


class DetectorBatcher:
    """Runs ``detector`` for every camera attached to it, in batches across cameras.

    The batcher owns ``detector`` and closes it in :meth:`stop`. Frames must all be of the
    detector's ``input_size``: cameras of another profile need a batcher of their own.
    """

    def __init__(
        self,
        detector: Detector,
        *,
        max_batch: int = 8,
        deadline_s: float = 0.015,
        workers: int = 1,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if not 0.0 <= deadline_s <= 1.0:
            raise ValueError(f"deadline_s must be in [0, 1] seconds, got {deadline_s}")
        self.detector = detector
        self.max_batch = max_batch
        self.deadline_s = deadline_s
        self.workers = workers
        self.stats = BatchStats()
        self._cond = threading.Condition()
        self._queue: deque[_Request] = deque()
        self._running = False
        self._threads: list[threading.Thread] = []
        self._cameras: dict[str, int] = {}  # camera -> attached proxies
        self._closed = False

    @property
    def input_size(self) -> tuple[int, int]:
        return self.detector.input_size

    # -- life ---------------------------------------------------------------------------------

    def start(self) -> None:
        with self._cond:
            if self._closed:
                raise BatcherStopped("this shared detector was stopped; make a new one")
            if self._running:
                return
            self._running = True
        self._threads = [
            threading.Thread(target=self._work, name=f"batched-detector-{i}", daemon=True)
            for i in range(self.workers)
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop the worker, fail every frame still waiting with :class:`BatcherStopped`, and
        close the detector (idempotent)."""
        with self._cond:
            self._running = False
            waiting = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for request in waiting:
            self._finish(request, error=BatcherStopped("the shared detector was stopped"))
        for thread in self._threads:
            thread.join(timeout=30)
        self._threads = []
        if not self._closed:
            self._closed = True
            self.detector.close()

    def __enter__(self) -> DetectorBatcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- cameras ------------------------------------------------------------------------------

    def attach(self, camera: str) -> BatchedDetector:
        """A detector for ``camera``'s pipeline (one per detector thread of that pipeline);
        its ``close()`` only detaches it."""
        with self._cond:
            self._cameras[camera] = self._cameras.get(camera, 0) + 1
        return BatchedDetector(self, camera)

    def detach(self, camera: str) -> None:
        with self._cond:
            left = self._cameras.get(camera, 0) - 1
            if left > 0:
                self._cameras[camera] = left
            else:
                self._cameras.pop(camera, None)

    @property
    def cameras(self) -> frozenset[str]:
        with self._cond:
            return frozenset(self._cameras)

    # -- frames -------------------------------------------------------------------------------

    def submit(self, camera: str, frame: Frame, settled: SettledTracks | None = None) -> Detections:
        """Detections of ``frame`` (blocks until its batch has run); the detector's error
        when the batch failed, :class:`BatcherStopped` when the batcher stopped first.
        ``settled``: the camera's settled tracks, whose faces the mask profile need not
        classify again."""
        w, h = self.input_size
        if frame.shape != (h, w, 3):  # refused here, so it never fails the others' batch
            raise ValueError(
                f"camera {camera!r}: frame must be (H, W, 3) = ({h}, {w}, 3), got {frame.shape}"
            )
        request = _Request(camera, frame, settled)
        with self._cond:
            if not self._running:
                raise BatcherStopped("the shared detector is not running")
            self._queue.append(request)
            self._cond.notify_all()
        request.done.wait()
        if isinstance(request.error, BatcherStopped):
            raise BatcherStopped(str(request.error))
        if request.error is not None:
            raise BatchFailed(f"the shared detector failed: {request.error}") from request.error
        assert request.result is not None
        return request.result

    def _next_batch(self) -> list[_Request] | None:
        """Wait for a first frame, then for the batch to fill or its deadline to pass."""
        with self._cond:
            while self._running and not self._queue:
                self._cond.wait(_IDLE_WAIT_S)
            if not self._running:
                return None
            closes_at = time.monotonic() + self.deadline_s
            while self._running and len(self._queue) < self.max_batch:
                left = closes_at - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            if not self._running:
                return None
            n = min(self.max_batch, len(self._queue))
            return [self._queue.popleft() for _ in range(n)]

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _run(self, batch: Sequence[_Request]) -> None:
        t0 = time.perf_counter()
        try:
            settled = [r.settled for r in batch]
            results = detect_batch(
                self.detector,
                [r.frame for r in batch],
                settled if any(s is not None for s in settled) else None,
            )
            if len(results) != len(batch):
                raise EdgecamError(
                    f"the detector returned {len(results)} results for {len(batch)} frames"
                )
        except Exception as exc:  # delivered to the cameras of this batch, which fail loudly
            log.warning(
                "shared detector failed on a batch of %d (%s): %s",
                len(batch),
                ", ".join(sorted({r.camera for r in batch})),
                exc,
            )
            with self._cond:
                self.stats.errors += 1
            for request in batch:
                self._finish(request, error=exc)
            return
        seconds = time.perf_counter() - t0
        with self._cond:
            stats = self.stats
            stats.batches += 1
            stats.frames += len(batch)
            stats.seconds += seconds
            stats.sizes[len(batch)] = stats.sizes.get(len(batch), 0) + 1
        for request, dets in zip(batch, results, strict=True):
            self._finish(request, result=dets)

    @staticmethod
    def _finish(
        request: _Request, result: Detections | None = None, error: BaseException | None = None
    ) -> None:
        request.result = result
        request.error = error
        request.done.set()


class BatchedDetector:
    """One camera's view of a :class:`DetectorBatcher`, in the :class:`Detector` shape."""

    def __init__(self, batcher: DetectorBatcher, camera: str) -> None:
        self.batcher = batcher
        self.camera = camera
        self._attached = True
        self._settled: SettledTracks | None = None

    @property
    def input_size(self) -> tuple[int, int]:
        return self.batcher.input_size

    def detect(self, frame: Frame) -> Detections:
        if not self._attached:
            raise BatcherStopped(f"camera {self.camera!r} was detached from its detector")
        return self.batcher.submit(self.camera, frame, self._settled)

    def follow(self, settled: SettledTracks) -> None:
        """Hand this camera's settled tracks along with each of its frames, so that a
        shared mask detector skips their faces for this camera alone."""
        self._settled = settled

    def close(self) -> None:
        """Detach this camera; the shared detector goes on for the others."""
        if self._attached:
            self._attached = False
            self.batcher.detach(self.camera)
