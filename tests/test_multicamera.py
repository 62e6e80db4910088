"""Several cameras through one inference process and one shared detector, on real clips."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import MEDIA, free_port, free_udp_pair

from edgecam.config import Settings, load_settings
from edgecam.device.events import EventReceiver, EventSender, FrameSummary
from edgecam.device.runner import WorkerContext
from edgecam.device.workers import InferenceWorker
from edgecam.errors import MissingPluginError, UsageError
from edgecam.media.offline import FileJob, process_file, process_files

CLIPS = [MEDIA / "faces.mp4", MEDIA / "motion_720p30_4s.mp4", MEDIA / "faces_720p30_15s.mp4"]
EDGECAM = [sys.executable, "-m", "edgecam.cli"]


def _events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_file_beside_others_gives_its_solo_events(tmp_path: Path) -> None:
    settings = load_settings(**{"vision.detect_fps": 5})
    solo = tmp_path / "solo"
    for clip in CLIPS:
        process_file(
            settings,
            clip,
            solo / f"{clip.stem}.mp4",
            events=solo / f"{clip.stem}.jsonl",
            progress=False,
        )
    together = tmp_path / "together"
    jobs = [FileJob(c, together / f"{c.stem}.mp4", together / f"{c.stem}.jsonl") for c in CLIPS]
    results = process_files(settings, jobs, progress=False)

    assert [r.frames for r in results] == [120, 122, 450]
    assert [r.detections for r in results] == [20, 21, 75]  # every due frame: 5 a second
    tracked = 0
    for clip in CLIPS:
        alone = _events(solo / f"{clip.stem}.jsonl")
        beside = _events(together / f"{clip.stem}.jsonl")
        assert beside == alone, f"{clip.name}: events differ beside other files"
        assert (together / f"{clip.stem}.mp4").stat().st_size > 10_000
        tracked += sum(len(e["tracks"]) for e in alone)
    assert tracked > 1000  # faces were found and tracked: the comparison has content


def test_process_files_refuses_two_inputs_writing_one_output(tmp_path: Path) -> None:
    jobs = [FileJob(CLIPS[0], tmp_path / "o.mp4"), FileJob(CLIPS[1], tmp_path / "o.mp4")]
    with pytest.raises(UsageError, match="would both write"):
        process_files(load_settings(), jobs, progress=False)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["a.mp4", "b.mp4", "--out", "o.mp4"], "--out-dir"),
        (["a.mp4"], "--out OUT.mp4"),
        (["a.mp4", "--out-dir", "d", "--events", "e.jsonl"], "drop --events"),
    ],
)
def test_process_command_options_for_several_inputs(
    tmp_path: Path, args: list[str], message: str
) -> None:
    res = subprocess.run(
        [*EDGECAM, "process", *[str(tmp_path / a) if a.endswith(".mp4") else a for a in args]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode != 0
    assert message in res.stderr


def test_process_command_runs_several_files_into_a_folder(tmp_path: Path) -> None:
    res = subprocess.run(
        [
            *EDGECAM,
            "process",
            str(CLIPS[0]),
            str(CLIPS[1]),
            "--out-dir",
            str(tmp_path / "out"),
            "--detect-fps",
            "2",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    for clip, frames in ((CLIPS[0], 120), (CLIPS[1], 122)):
        assert len(_events(tmp_path / "out" / f"{clip.stem}.jsonl")) == frames
        assert (tmp_path / "out" / f"{clip.stem}.mp4").stat().st_size > 10_000


# -- live: one inference process, three remote cameras ------------------------------------------

SHARED_MOTION = Path("/work/shared/media/motion_720p30.mp4")
LIVE_CLIPS = {  # camera -> (clip, its frame rate)
    "street": (MEDIA / "pedestrians_30s.mp4", 10.0),
    "hall": (SHARED_MOTION if SHARED_MOTION.is_file() else MEDIA / "motion_720p30_4s.mp4", 30.0),
    "door": (MEDIA / "faces_720p30_15s.mp4", 30.0),
}


class _RemoteCamera:
    """A real clip served over RTSP by tests/rtsp_camera.py, in a process that can die."""

    def __init__(self, clip: Path) -> None:
        self.port = free_port()
        self.clip = clip
        self.url = f"rtsp://127.0.0.1:{self.port}/cam"
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).parent / "rtsp_camera.py"), str(self.port),
             str(self.clip)],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.proc = None


class _Frames:
    """The inference worker's frame summaries, as the orchestrator receives them."""

    def __init__(self, path: Path) -> None:
        self.receiver = EventReceiver(path)
        self.frames: list[FrameSummary] = []
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set():
            event = self.receiver.receive(0.2)
            if isinstance(event, FrameSummary):
                with self._lock:
                    self.frames.append(event)

    def count(self, camera: str, since: float, until: float = float("inf")) -> int:
        with self._lock:
            return sum(
                1 for f in self.frames if f.camera == camera and since <= f.wall_time < until
            )

    def close(self) -> None:
        self._done.set()
        self._thread.join(timeout=5)
        self.receiver.close()


def _wait_for(pred: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.1)
    return False


@contextlib.contextmanager
def _serving(settings: Settings, sock: Path) -> Iterator[tuple[InferenceWorker, threading.Thread]]:
    """An inference worker sending its events to ``sock``, and the thread to serve it on:
    both for the test to start; stopped and closed after it, in that order."""
    sender = EventSender(sock)
    worker = InferenceWorker(WorkerContext(settings, None, sender))
    stop = threading.Event()
    server = threading.Thread(target=worker.serve, args=(stop,), daemon=True)
    try:
        yield worker, server
    finally:
        stop.set()
        if server.is_alive():
            server.join(timeout=30)
        worker.close()
        sender.close()


def test_three_cameras_in_one_process_and_one_lost_camera_disturbs_no_other(
    tmp_path: Path,
) -> None:
    remotes = {name: _RemoteCamera(clip) for name, (clip, _fps) in LIVE_CLIPS.items()}
    cameras = [
        {
            "name": name,
            "source": cam.url,
            "rtsp_latency_ms": 100,
            "reconnect_min_s": 0.5,
            "reconnect_max_s": 1,
            "stall_timeout_s": 3,
            "rtp_port": free_udp_pair(),
            "detect_fps": 2 if name == "door" else None,  # per camera; the others: vision's
        }
        for name, cam in remotes.items()
    ]
    settings = Settings.model_validate(
        {"cameras": cameras, "vision": {"profile": "mask", "detect_fps": 3}}
    )
    frames = _Frames(tmp_path / "events.sock")
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(frames.close)
        for remote in remotes.values():
            cleanup.callback(remote.kill)
        worker, server = cleanup.enter_context(_serving(settings, tmp_path / "events.sock"))
        for remote in remotes.values():
            remote.start()
        worker.start()
        server.start()
        assert _wait_for(lambda: all(frames.count(c, 0) > 30 for c in remotes), 30), {
            c: frames.count(c, 0) for c in remotes
        }
        window = 4.0
        t0 = time.time()
        time.sleep(window)
        before = {c: frames.count(c, t0, t0 + window) / window for c in remotes}

        remotes["door"].kill()  # one camera's source is lost
        time.sleep(1.0)
        t1 = time.time()
        time.sleep(window)
        during = {c: frames.count(c, t1, t1 + window) / window for c in remotes}
        assert during["door"] < 1.0, during  # nothing comes from a lost camera
        for cam in ("street", "hall"):
            fps = LIVE_CLIPS[cam][1]
            # The others go on at the rate they had, the rate of their source.
            assert during[cam] >= 0.8 * before[cam] and during[cam] >= 0.6 * fps, (
                before,
                during,
            )
        assert worker.healthy()
        status = worker.status()
        assert status["cameras"]["door"]["waiting_for_source"] == 1.0
        assert status["cameras"]["door"]["detect_fps"] == 2 and status["mean_batch"] >= 1

        remotes["door"].start()  # ...and comes back on its own
        t2 = time.time()
        assert _wait_for(lambda: frames.count("door", t2) > 30, 20), "door did not come back"
        figures = worker.figures()
        assert figures["door/source_restarts"] >= 1 and figures["street/source_restarts"] == 0
        for cam in remotes:
            assert figures[f"{cam}/detections"] > 0
        assert {f.camera for f in frames.frames} == set(remotes)
        # The faces clip is tracked under its own camera's name only.
        assert any(f.tracks for f in frames.frames if f.camera == "door")
        assert worker.batcher is not None and worker.batcher.stats.frames > 0
    assert not server.is_alive()


# -- config and the orchestrator's side ----------------------------------------------------------


def test_a_camera_has_its_own_detection_rate() -> None:
    settings = Settings(
        cameras=[{"name": "a"}, {"name": "b", "detect_fps": 2}, {"name": "c", "detect_fps": 0}],
        vision={"detect_fps": 7},
    )
    rates = [settings.for_camera(n).vision.detect_fps for n in ("a", "b", "c")]
    assert rates == [7, 2, 0]
    assert settings.vision.detect_fps == 7  # the device's settings stay as they are
    with pytest.raises(ValueError, match=r"camera c: privacy.faces needs the detector"):
        Settings(cameras=[{"name": "c", "detect_fps": 0, "privacy": {"faces": "blur"}}])
    with pytest.raises(ValueError, match=r"cameras\.0\.detect_fps"):
        Settings(cameras=[{"name": "a", "detect_fps": -1}])


def test_the_orchestrator_reads_each_cameras_figures_from_one_heartbeat() -> None:
    from edgecam.device.events import Heartbeat
    from edgecam.device.orchestrator import Orchestrator

    orchestrator = Orchestrator(Settings(cameras=[{"name": "a"}, {"name": "b"}]))
    figures = {"a/frames_in": 30.0, "a/frames_out": 29.0, "a/detections": 5.0}
    figures |= {"b/frames_in": 10.0, "b/frames_out": 10.0, "b/detections": 2.0}
    orchestrator._on_event(Heartbeat(worker="inference", camera=None, figures=figures))
    assert (orchestrator._figures["a"].frames_out, orchestrator._figures["a"].detections) == (
        29.0,
        5.0,
    )
    assert orchestrator._figures["b"].frames_in == 10.0


def test_commands_name_the_one_inference_worker_without_a_camera() -> None:
    from edgecam.device.supervisor import Supervisor

    supervisor = Supervisor(Settings(cameras=[{"name": "a"}, {"name": "b"}]), None, None)
    assert [c.key for c in supervisor.select("inference", None)] == ["inference"]
    with pytest.raises(ValueError, match="serves every camera: name no camera"):
        supervisor.select("inference", "a")
    assert [c.key for c in supervisor.select("recorder", "b")] == ["recorder/b"]


def test_worker_inference_takes_one_camera_or_every_camera(tmp_path: Path) -> None:
    """``edgecam worker inference --camera C`` runs C alone under its own lock, beside a
    worker for every camera; a camera that does not exist is named in the error."""
    settings = Settings(
        cameras=[{"name": "a", "source": str(CLIPS[0])}, {"name": "b", "source": str(CLIPS[1])}],
        runtime={"dir": tmp_path / "run"},
    )
    sender = EventSender(tmp_path / "x.sock")
    try:
        alone = InferenceWorker(WorkerContext(settings, "b", sender))
        every = InferenceWorker(WorkerContext(settings, None, sender))
        assert [b.camera for b in alone._branches] == ["b"]
        assert [b.camera for b in every._branches] == ["a", "b"]
    finally:
        sender.close()
    res = subprocess.run(
        [*EDGECAM, "worker", "inference", "--camera", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode != 0 and "no camera named 'nope'" in res.stderr


@pytest.mark.parametrize(
    ("cameras", "vision", "calls"),
    [
        (1, {}, 1),
        (2, {}, 2),  # two face-rich cameras held 10 detections/s each only with two calls
        (3, {}, 2),  # at most vision.threads
        (2, {"detector_workers": 1}, 1),
        (2, {"detect_fps": 0}, 1),
    ],
)
def test_live_cameras_get_one_detector_call_each_up_to_the_threads(
    tmp_path: Path, cameras: int, vision: dict[str, object], calls: int
) -> None:
    settings = Settings(
        cameras=[{"name": f"c{k}", "source": str(CLIPS[k % len(CLIPS)])} for k in range(cameras)],
        vision={"threads": 2, **vision},
        runtime={"dir": tmp_path / "run"},
    )
    sender = EventSender(tmp_path / "x.sock")
    worker = InferenceWorker(WorkerContext(settings, None, sender))
    try:
        worker.start()
        batcher = worker.batcher
        assert (batcher.workers if batcher is not None else 1) == calls
        assert batcher is None or len(batcher._threads) == calls
    finally:
        worker.close()
        sender.close()


def test_a_media_backend_that_cannot_run_fails_the_worker_before_the_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a camera retrying for ever in the same process (its probe's answer is kept for
    the process's life): the worker fails, saying why, and its supervisor restarts it."""
    import edgecam.vision.detectors as detectors

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(detectors, "build_detector", refuse)
    settings = Settings(
        cameras=[{"name": "c0", "source": str(CLIPS[0])}],
        media={"backend": "nvdec"},
        runtime={"dir": tmp_path / "run"},
    )
    sender = EventSender(tmp_path / "x.sock")
    worker = InferenceWorker(WorkerContext(settings, None, sender))
    try:
        with pytest.raises(MissingPluginError, match=r"media backend nvdec .* nvh264dec"):
            worker.start()
    finally:
        worker.close()
        sender.close()


def test_cameras_the_detector_cannot_keep_up_with_are_said_to_be_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Three cameras asking for a detection every frame of a 30 fps clip, on a CPU that
    makes a fraction of that: each is said to be behind (in the log and its status), not
    left to fall short unsaid; a camera that asks for none never is."""
    import edgecam.device.workers as workers

    monkeypatch.setattr(workers, "_RATE_WINDOW_S", 2.0)
    clip = str(MEDIA / "faces.mp4")  # small frames: decoding keeps up, detection cannot
    cameras = [{"name": f"c{k}", "source": clip, "loop": True} for k in range(3)]
    settings = Settings(
        cameras=[*cameras, {"name": "off", "source": clip, "loop": True, "detect_fps": 0}],
        vision={"profile": "mask", "detect_fps": 30},
        runtime={"dir": tmp_path / "run"},
    )
    with _serving(settings, tmp_path / "x.sock") as (worker, server):
        worker.start()
        server.start()
        cams = ("c0", "c1", "c2")
        assert _wait_for(lambda: all(worker.status()["cameras"][c]["behind"] for c in cams), 15)
        assert not worker.status()["cameras"]["off"]["behind"]
        assert worker.healthy()  # behind is said, not a fault to restart for
    said = [r.getMessage() for r in caplog.records if "cannot keep up" in r.getMessage()]
    assert sorted(m.split(":")[0] for m in said) == ["camera c0", "camera c1", "camera c2"]


def test_a_window_the_video_did_not_fill_does_not_say_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A window in which a camera's video did not flow throughout says nothing of the
    detector: the detections asked for while the video was away were never asked. Here a
    2 s file ends and an RTSP camera comes up 2.5 s late within one 4 s window (both were
    said to be behind: 4 or 5 detections of the 12 asked for)."""
    import edgecam.device.workers as workers

    monkeypatch.setattr(workers, "_RATE_WINDOW_S", 4.0)
    short = tmp_path / "short.mp4"
    subprocess.run(
        ["gst-launch-1.0", "-q", "videotestsrc", "num-buffers=60", "!",
         "video/x-raw,width=320,height=240,framerate=30/1", "!", "x264enc", "!", "mp4mux",
         "!", "filesink", f"location={short}"],
        check=True,
        timeout=30,
    )  # fmt: skip
    door = _RemoteCamera(MEDIA / "faces_720p30_15s.mp4")
    cameras = [
        {"name": "short", "source": str(short)},
        {"name": "door", "source": door.url, "reconnect_min_s": 0.2, "reconnect_max_s": 0.5},
    ]
    settings = Settings.model_validate(
        {"cameras": cameras, "vision": {"profile": "mask", "detect_fps": 3}}
    )
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(door.kill)
        worker, server = cleanup.enter_context(_serving(settings, tmp_path / "x.sock"))
        worker.start()
        started = time.monotonic()
        server.start()
        time.sleep(2.5)
        door.start()
        time.sleep(max(0.0, started + 4.0 + 1.0 - time.monotonic()))  # the window ended
        cams = worker.status()["cameras"]
        assert cams["short"]["finished"] and worker.figures()["door/frames_out"] > 0
        assert not cams["short"]["behind"] and not cams["door"]["behind"]
    assert "cannot keep up" not in caplog.text
