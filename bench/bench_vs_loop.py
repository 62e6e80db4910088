"""Offline speed: edgecam's pipeline vs the one Python loop a user would write instead.

The loop (``user_loop`` below, written as a user would, without edgecam's pipeline):
PyAV decodes each frame to BGR; on every Nth frame (N = 30 fps / 10 detections a second) the
frame is ``cv2.resize``d to the detector's input size, converted to RGB and given to the
same models as edgecam's default ``mask`` profile (``edgecam.vision.detectors``: CenterFace +
mask classifier, same ONNX Runtime threads); Norfair (IoU, same parameters as edgecam's
config) runs on every frame; OpenCV draws the boxes and labels on the full frame; PyAV
encodes with libx264 (ultrafast, zerolatency, 2500 kbit/s, a keyframe a second) into MP4.

edgecam: ``process_file`` with the default config (mask profile, detect-fps 10), the same
clip. Both run the same number of detections. Rounds alternate between the two (the order
flips each round); each side keeps its best and median time.

    .venv/bin/python bench/bench_vs_loop.py [CLIP] [--rounds 2] [--seconds S]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c
import av
import cv2
import norfair
import numpy as np

from edgecam.config import Settings, load_settings
from edgecam.media.offline import process_file
from edgecam.vision.detectors import build_detector

TARGET = 1.5
COLOURS = {"mask": (0, 200, 0), "no_mask": (30, 30, 230), "undecided": (0, 200, 240)}


def user_loop(settings: Settings, clip: Path, out: Path) -> tuple[int, int]:
    """The single-loop program; returns (frames, detections)."""
    detector = build_detector(settings.vision)
    in_w, in_h = detector.input_size
    t = settings.tracker
    tracker = norfair.Tracker(
        distance_function="iou",
        distance_threshold=t.distance_threshold,
        hit_counter_max=t.hit_counter_max,
        initialization_delay=t.initialization_delay,
    )
    source = av.open(str(clip))
    vin = source.streams.video[0]
    vin.thread_type = "AUTO"
    fps = vin.average_rate or Fraction(30)
    every = max(1, round(float(fps) / settings.vision.detect_fps))
    sink = av.open(str(out), "w")
    vout = sink.add_stream("libx264", rate=fps)
    vout.width, vout.height, vout.pix_fmt = vin.width, vin.height, "yuv420p"
    vout.bit_rate = settings.encoder.bitrate_kbps * 1000
    vout.options = {"preset": "ultrafast", "tune": "zerolatency", "g": str(round(fps))}
    frames = detections = 0
    try:
        for frame in source.decode(vin):
            image = frame.to_ndarray(format="bgr24")
            if frames % every == 0:
                small = cv2.cvtColor(cv2.resize(image, (in_w, in_h)), cv2.COLOR_BGR2RGB)
                dets = detector.detect(small)
                detections += 1
                sx, sy = vin.width / in_w, vin.height / in_h
                boxes = dets.xyxy * np.array([sx, sy, sx, sy], np.float32)
                objects = tracker.update(
                    [
                        norfair.Detection(
                            points=boxes[i].reshape(2, 2).astype(np.float64),
                            scores=np.repeat(float(dets.confidence[i]), 2),
                            data=float(dets.attribute[i]),
                        )
                        for i in range(len(dets))
                    ],
                    period=every,
                )
            else:
                objects = tracker.update()
            for obj in objects:
                (x1, y1), (x2, y2) = obj.estimate.astype(int)
                p_mask = obj.last_detection.data if obj.last_detection is not None else None
                label = (
                    "undecided"
                    if p_mask is None or p_mask != p_mask
                    else "mask"
                    if p_mask > 0.5
                    else "no_mask"
                )
                colour = COLOURS[label]
                cv2.rectangle(image, (x1, y1), (x2, y2), colour, 3)
                cv2.putText(
                    image,
                    f"{obj.id} {label}",
                    (x1, max(12, y1 - 6)),
                    cv2.FONT_HERSHEY_SIMPLEX,
                    0.6,
                    colour,
                    2,
                )
            out_frame = av.VideoFrame.from_ndarray(image, format="bgr24")
            out_frame.pts = frames
            out_frame.time_base = 1 / fps
            for packet in vout.encode(out_frame):
                sink.mux(packet)
            frames += 1
        for packet in vout.encode(None):
            sink.mux(packet)
    finally:
        sink.close()
        source.close()
        detector.close()
    return frames, detections


def run_loop(settings: Settings, clip: Path, out: Path) -> tuple[float, int, int]:
    t0 = time.perf_counter()
    frames, dets = user_loop(settings, clip, out)
    return time.perf_counter() - t0, frames, dets


def run_edgecam(settings: Settings, clip: Path, out: Path) -> tuple[float, int, int]:
    t0 = time.perf_counter()
    result = process_file(settings, clip, out, progress=False)
    return time.perf_counter() - t0, result.frames, result.detections


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("clip", nargs="?", type=Path, default=c.default_clip())
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds")
    parser.add_argument("--seconds", type=float, help="use only the clip's first S seconds")
    parser.add_argument("--profile", default="mask", choices=["mask", "people"])
    parser.add_argument("--detect-fps", type=float, default=10)
    args = parser.parse_args()

    settings = load_settings(
        **{"vision.profile": args.profile, "vision.detect_fps": args.detect_fps}
    )
    runners = {
        "python loop (PyAV + ORT + Norfair + OpenCV)": run_loop,
        "edgecam process": run_edgecam,
    }
    names = list(runners)
    times: dict[str, list[float]] = {n: [] for n in names}
    counts: dict[str, tuple[int, int, int]] = {}
    with tempfile.TemporaryDirectory(prefix="edgecam-bench-") as tmp:
        clip = c.trim(args.clip, args.seconds, Path(tmp))
        frames = c.count_frames(clip)
        print(
            f"clip {clip} ({frames} frames); profile {args.profile}, "
            f"{args.detect_fps:g} detections/s; {c.machine_note()}"
        )
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                out = Path(tmp) / f"out_{names.index(name)}.mp4"
                seconds, n, dets = runners[name](settings, clip, out)
                times[name].append(seconds)
                counts[name] = (n, dets, c.count_frames(out))
                print(
                    f"  round {r + 1}: {name}: {seconds:.2f} s ({frames / seconds:.1f} fps), "
                    f"{dets} detections"
                )

    loop_best = frames / min(times[names[0]])
    loop_median = frames / c.median(times[names[0]])
    rows = []
    for name in names:
        best, med = frames / min(times[name]), frames / c.median(times[name])
        n, dets, written = counts[name]
        rows.append([name, written, dets, best, med, best / loop_best, med / loop_median])
    print()
    print(
        c.table(
            [
                "program",
                "frames out",
                "detections",
                "fps (best)",
                "fps (median)",
                "x loop (best)",
                "x loop (median)",
            ],
            rows,
        )
    )
    ratio = rows[1][5]
    print(
        f"\ntarget: edgecam >= {TARGET}x the loop: {ratio:.2f}x -> {c.verdict(ratio >= TARGET)}"
        f" (best of {args.rounds})"
    )
    print(f"finished {c.machine_note()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
