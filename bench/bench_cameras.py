"""Several 720p30 cameras in one inference process: how many does one device hold in real time?

For each detection rate (``--rates``, detections a second per camera) and each number of
cameras (``--cameras``), one run of the inference worker (:class:`InferenceWorker`, as
``edgecam run`` starts it) in a fresh process, with every camera a live 720p30 source: the
clip played in real time (file source in live mode: the sinks follow the clock, so each
camera delivers 30 frames a second), the default mask profile (CenterFace + mask classifier),
tracker, overlay, x264 and RTP to loopback. Two ways of running the detector, same run:

* ``batched``: the shared detector takes frames of every camera in one call
  (``vision.batch_size`` 8, ``vision.batch_deadline_ms`` 15);
* ``per-call``: the same shared detector, one frame a call (``vision.batch_size`` 1);
* ``per-call-2``: one frame a call, two calls at once of one thread each
  (``vision.detector_workers`` 2), as two cameras' own detectors would run;
* ``default``: what config gives when neither is set: one frame a call on a CPU, and one
  call at a time per camera up to ``vision.threads`` (so ``per-call`` for one camera and
  ``per-call-2`` for more, on the default 2 threads).

After a warm-up, over a measuring window, each run reports per camera the output fps
(frames into the encoder / s) and the frames short of real time, detections a second per
camera, and for the process the CPU cores used (CPU time / wall) and the RSS (max sampled,
and VmHWM). A configuration holds in real time when every camera gives >= 29.4 fps, at most
one frame short per second of window, and >= 90 % of the detections a second asked.

    edgecam bench cameras [CLIP] [--cameras 1,2,3,4] [--rates 5,10] [--seconds 12]
        [--warmup 4] [--modes batched,per-call,per-call-2,default]
    edgecam bench cameras --batch-cost    # the detector alone: ms a frame by frames a call
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c

FPS = 30
REAL_TIME_FPS = 0.98 * FPS
DETECTION_SHARE = 0.9  # of the asked detections a second, to count as held
# mode -> (vision.batch_size, vision.detector_workers); None: config's default
MODES: dict[str, tuple[int | None, int | None]] = {
    "batched": (8, 1),
    "per-call": (1, 1),
    "per-call-2": (1, 2),
    "default": (None, None),
}


def _child(args: argparse.Namespace) -> int:
    """One run: the inference worker with ``args.n`` cameras; one JSON line on stdout."""
    from edgecam.config import load_settings
    from edgecam.device.events import EventSender
    from edgecam.device.runner import WorkerContext
    from edgecam.device.workers import InferenceWorker
    from edgecam.ports import free_udp_pair

    cameras = [
        {"name": f"cam{i}", "source": str(args.clip), "loop": True, "rtp_port": free_udp_pair()}
        for i in range(args.n)
    ]
    batch_size, workers = MODES[args.mode]
    overrides: dict[str, object] = {
        "cameras": cameras,
        "vision.profile": "mask",
        "vision.detect_fps": args.rate,
    }
    if batch_size is not None:
        overrides["vision.batch_size"] = batch_size
    if workers is not None:
        overrides["vision.detector_workers"] = workers
    settings = load_settings(**overrides)
    folder = Path(tempfile.mkdtemp(prefix="bench-cameras-"))
    sender = EventSender(folder / "nobody.sock")  # frame summaries go nowhere, cheaply
    worker = InferenceWorker(WorkerContext(settings, None, sender))
    stop = threading.Event()
    worker.start()
    server = threading.Thread(target=worker.serve, args=(stop,), daemon=True)
    server.start()
    rss: list[int] = []
    try:
        end_warmup = time.monotonic() + args.warmup
        while time.monotonic() < end_warmup:
            time.sleep(0.1)
        before = worker.figures()
        batcher = worker.batcher
        b0 = (batcher.stats.frames, batcher.stats.batches, batcher.stats.seconds) if batcher else 0
        t0, cpu0 = time.monotonic(), time.process_time()
        while time.monotonic() - t0 < args.seconds:
            time.sleep(0.1)
            rss.append(c.proc_status_kb("VmRSS"))
        wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
        after = worker.figures()
        b1 = (batcher.stats.frames, batcher.stats.batches, batcher.stats.seconds) if batcher else 0
    finally:
        stop.set()
        server.join(timeout=30)
        worker.close()
        sender.close()
    per_camera = []
    for cam in cameras:
        name = cam["name"]
        frames = after[f"{name}/frames_out"] - before[f"{name}/frames_out"]
        dets = after[f"{name}/detections"] - before[f"{name}/detections"]
        per_camera.append(
            {
                "fps": frames / wall,
                "short": max(0, round(wall * FPS) - int(frames)),
                "dets_s": dets / wall,
            }
        )
    frames_b, batches, seconds = (
        (b1[0] - b0[0], b1[1] - b0[1], b1[2] - b0[2]) if batcher else (0, 0, 0.0)
    )
    print(
        json.dumps(
            {
                "cameras": per_camera,
                "cores": cpu / wall,
                "rss_mb": max(rss) / 1024,
                "hwm_mb": c.proc_status_kb("VmHWM") / 1024,
                "mean_batch": frames_b / batches if batches else 0.0,
                "call_ms": 1000 * seconds / batches if batches else 0.0,
            }
        ),
        flush=True,
    )
    return 0


def _batch_cost(clip: Path, sizes: list[int], rounds: int) -> None:
    """The mask profile's detector alone on real frames of ``clip``: ms a frame at each batch
    size, the sizes interleaved round by round so that load from elsewhere hits them alike."""
    import cv2
    import numpy as np

    from edgecam.config import load_settings
    from edgecam.vision.detectors import build_detector, detect_batch

    detector = build_detector(load_settings().vision)
    w, h = detector.input_size
    capture = cv2.VideoCapture(str(clip))
    frames = []
    while len(frames) < max(sizes):
        ok, frame = capture.read()
        if not ok:
            raise SystemExit(f"cannot read {max(sizes)} frames of {clip}")
        small = cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA)
        rgb = cv2.cvtColor(small, cv2.COLOR_BGR2RGB)
        frames.append(np.ascontiguousarray(rgb))
    capture.release()
    for n in sizes:  # ONNX Runtime plans its memory for a new shape on the first call
        detect_batch(detector, frames[:n])
    ms: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(rounds):
        for n in sizes:
            t0 = time.perf_counter()
            detect_batch(detector, frames[:n])
            ms[n].append(1000 * (time.perf_counter() - t0) / n)
    detector.close()
    one = c.median(ms[sizes[0]])
    rows = [[n, c.median(ms[n]), min(ms[n]), c.median(ms[n]) / one] for n in sizes]
    print(f"mask profile detector ({w}x{h}), {rounds} rounds; {c.machine_note()}")
    print(c.table(["frames a call", "ms a frame, median", "min", f"vs {sizes[0]}"], rows))


def _run(args: argparse.Namespace, n: int, rate: float, mode: str) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        str(args.clip),
        "--child",
        "--n",
        str(n),
        "--rate",
        str(rate),
        "--mode",
        mode,
        "--seconds",
        str(args.seconds),
        "--warmup",
        str(args.warmup),
    ]
    env = {**os.environ, "PYTHONPATH": str(c.ROOT / "src")}
    done = subprocess.run(
        cmd, capture_output=True, text=True, env=env, timeout=args.warmup + args.seconds + 120
    )
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"run {n} cameras, {rate:g}/s, {mode} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _spread(values: list[float]) -> str:
    """'min / median' of the cameras' figures."""
    return f"{min(values):.1f} / {c.median(values):.1f}"


def _held(result: dict[str, Any], rate: float) -> bool:
    return all(
        cam["fps"] >= REAL_TIME_FPS
        and cam["short"] <= result["window"]  # at most one frame short a second
        and cam["dets_s"] >= DETECTION_SHARE * rate
        for cam in result["cameras"]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("clip", nargs="?", type=Path, default=c.default_clip())
    parser.add_argument("--cameras", default="1,2,3,4", help="numbers of cameras to try")
    parser.add_argument("--rates", default="5,10", help="detections a second per camera")
    parser.add_argument(
        "--modes",
        default="batched,per-call,default",
        help="of batched, per-call, per-call-2, default",
    )
    parser.add_argument("--seconds", type=float, default=12, help="measuring window")
    parser.add_argument("--warmup", type=float, default=4, help="seconds before measuring")
    parser.add_argument(
        "--batch-cost",
        action="store_true",
        help="only the detector's cost a frame at 1, 2, 4, 8 frames a call (no cameras)",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, default=5, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="batched", choices=list(MODES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args)
    if args.batch_cost:
        _batch_cost(args.clip, [1, 2, 4, 8], rounds=10)
        return 0

    counts = [int(x) for x in args.cameras.split(",")]
    rates = [float(x) for x in args.rates.split(",")]
    modes = args.modes.split(",")
    for mode in modes:
        if mode not in MODES:
            raise SystemExit(f"--modes: unknown mode {mode!r}; known: {', '.join(MODES)}")
    print(
        f"clip {args.clip}; window {args.seconds:g} s after {args.warmup:g} s; {c.machine_note()}"
    )
    rows = []
    held: dict[tuple[float, str], int] = {}
    results: dict[tuple[float, int, str], dict[str, Any]] = {}
    for rate in rates:
        for n in counts:
            for mode in modes:
                r = _run(args, n, rate, mode)
                r["window"] = args.seconds
                results[(rate, n, mode)] = r
                ok = _held(r, rate)
                if ok:
                    held[(rate, mode)] = max(held.get((rate, mode), 0), n)
                cams = r["cameras"]
                rows.append(
                    [
                        f"{rate:g}",
                        n,
                        mode,
                        _spread([x["fps"] for x in cams]),
                        sum(x["short"] for x in cams),
                        _spread([x["dets_s"] for x in cams]),
                        r["cores"],
                        f"{r['rss_mb']:.0f} / {r['hwm_mb']:.0f}",
                        f"{r['mean_batch']:.2f}",
                        f"{r['call_ms']:.0f}",
                        "yes" if ok else "no",
                    ]
                )
                print(f"  {rate:g}/s, {n} camera(s), {mode}: {json.dumps(r)}", flush=True)
    print()
    print(
        c.table(
            [
                "det/s asked",
                "cameras",
                "detector",
                "fps out min / median",
                "frames short (all)",
                "det/s per camera min / median",
                "cores",
                "RSS max / HWM (MB)",
                "frames a call",
                "ms a call",
                "real time",
            ],
            rows,
        )
    )
    print()
    for rate in rates:
        line = ", ".join(f"{mode}: {held.get((rate, mode), 0)}" for mode in modes)
        print(f"cameras held in real time at {rate:g} detections/s each: {line}")
        if set(modes) >= {"batched", "per-call"}:
            for n in counts:
                b, p = results[(rate, n, "batched")], results[(rate, n, "per-call")]
                det_b = sum(x["dets_s"] for x in b["cameras"])
                det_p = sum(x["dets_s"] for x in p["cameras"])
                print(
                    f"  {n} camera(s): detections/s batched / per-call "
                    f"{det_b:.1f} / {det_p:.1f} = {det_b / det_p if det_p else float('nan'):.2f}; "
                    f"cores {b['cores']:.2f} / {p['cores']:.2f}"
                )
    print(f"finished {c.machine_note()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
