"""Mask profile on a face-rich scene: the detector's time and memory, and what each cut buys.

Every figure is measured on the same frames in the same run as its baseline.

Frames: ``media/faces_720p30_15s.mp4`` (1280x720, 450 frames, 3.6-3.9 faces a frame),
letterboxed into the face input as the pipeline's ``videoscale add-borders`` does; a
detection on every 3rd frame (10 detections/s of 30 fps video). Parts (``--parts``):

* ``profile``: CenterFace at its input size, crop + resize, the classifier on a frame's
  crops and per batch size; RSS as each model loads and runs (ONNX Runtime arenas), the
  classifier one crop a run (``vision.mask_batch: 1``) vs a frame's crops in one run.
* ``skip``: the real analytics (tracker + votes) on every frame, classifying every face vs
  skipping the faces of settled tracks (``voting.settle_votes``), with the detector seeing
  the analytics' snapshot 1 and 8 frames late: faces classified, labels that differ per
  track and frame, final counts.
* ``input``: CenterFace at smaller inputs vs the configured one: faces a frame, boxes
  matched (IoU >= 0.5 in source pixels) both ways, time a call.
* ``live``: ``bench_live.py`` on the clip before (the configuration ``BEFORE``: 640x352
  fp32 CenterFace, a frame's crops in one run, no skipping) and after, back to back.
* ``int8``: the int8 models vs fp32 (``vision.mask_model_precision``,
  ``vision.face_model_precision``): classifier decision agreement and max P difference on
  every face crop of the clip, CenterFace matched boxes; time a call.

    .venv/bin/python bench/bench_faces.py [--parts profile,skip,input,int8,live] [--threads 2]
        [--seconds 40] [--detect-fps 10]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c

from edgecam.config import MODELS_DIR, VisionConfig, load_settings
from edgecam.device.workers import limit_malloc_arenas
from edgecam.vision import evaluation
from edgecam.vision.analytics import Analytics
from edgecam.vision.detectors import CenterFaceDetector, FaceMaskDetector, MaskClassifier
from edgecam.vision.settled import SettledTracks

CLIP = c.ROOT / "media" / "faces_720p30_15s.mp4"
EVERY = 3  # a detection on every 3rd frame: 10/s of 30 fps video
Image = npt.NDArray[np.uint8]
Boxes = npt.NDArray[np.float32]


def rss_mb() -> float:
    return c.proc_status_kb("VmRSS") / 1024


def decode(path: Path, every: int = EVERY) -> tuple[list[Image], int]:
    """Every ``every``-th frame of ``path`` (RGB), and how many frames it has."""
    import cv2  # here, not at the top: the live runs must not carry OpenCV's memory

    cap = cv2.VideoCapture(str(path))
    out = []
    n = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        if n % every == 0:
            out.append(np.asarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), dtype=np.uint8))
        n += 1
    cap.release()
    if not out:
        raise SystemExit(f"cannot decode {path}")
    return out, n


def letterbox(src: Image, size: tuple[int, int]) -> tuple[Image, tuple[float, int, int]]:
    """``src`` scaled to fit ``size`` with centred borders (area averaging); (frame, (scale,
    dx, dy))."""
    return evaluation.letterbox(src, size, area=True)


def with_masks(src: Image, boxes: Boxes) -> Image:
    """A flat light-blue mask drawn on each face (source pixels), nose to chin."""
    import cv2

    out = src.copy()
    for x1, y1, x2, y2 in boxes:
        top = y1 + 0.5 * (y2 - y1)
        inset = 0.08 * (x2 - x1)
        poly = np.array([[x1, top], [x2, top], [x2 - inset, y2], [x1 + inset, y2]])
        cv2.fillPoly(out, [poly.round().astype(np.int32)], (160, 205, 230))
    return out


def timed(fn: Callable[[], object], runs: int) -> float:
    """Median ms of ``runs`` calls after one warm-up."""
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * c.median(times)


def iou_matrix(a: Boxes, b: Boxes) -> Boxes:
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    result: Boxes = inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)
    return result


def matched(a: Boxes, b: Boxes, iou: float = 0.5) -> int:
    """Boxes of ``a`` with a partner in ``b`` (greedy one-to-one, IoU >= ``iou``)."""
    if not len(a) or not len(b):
        return 0
    m = iou_matrix(a, b)
    n = 0
    while m.size and m.max() >= iou:
        i, j = np.unravel_index(int(m.argmax()), m.shape)
        m[i, :] = -1
        m[:, j] = -1
        n += 1
    return n


# ---------------------------------------------------------------------------------------------


def part_profile(frames: list[Image], v: VisionConfig, threads: int) -> None:
    print("\n## Where the time and memory go (one detection = CenterFace + classifier)\n")
    model = [letterbox(f, v.face_input) for f in frames]
    r0 = rss_mb()
    face = CenterFaceDetector(v.face_model_path, v.face_input, v.face_threshold, threads=threads)
    r1 = rss_mb()
    found = [face.detect(m) for m, _ in model]
    r2 = rss_mb()
    rows: list[list[object]] = [
        ["CenterFace loaded", r1 - r0, ""],
        [f"CenterFace run on {len(model)} frames (arena)", r2 - r1, ""],
    ]
    # One crop a run first: a session's arena only grows, so the larger batch goes second.
    for batch in (1, 64):
        name = "one crop a run" if batch == 1 else "a frame's crops in one run"
        mask = MaskClassifier(v.mask_model, threads=threads, batch=batch)
        r3 = rss_mb()
        t0 = time.process_time()
        for (m, _), d in zip(model, found, strict=True):
            mask.classify(m, d.xyxy)
        cpu = time.process_time() - t0
        r4 = rss_mb()
        n = sum(len(d) for d in found)
        rows.append([f"classifier loaded ({name})", r3 - r2, ""])
        rows.append(
            [
                f"classifier run on every frame's crops ({name})",
                r4 - r3,
                f"{1000 * cpu / n:.1f} CPU ms a crop",
            ]
        )
        mask.close()
        r2 = rss_mb()
    print(c.table(["step", "RSS added (MB)", ""], rows))

    mask = MaskClassifier(v.mask_model, threads=threads)
    busy = [(m, d) for (m, _), d in zip(model, found, strict=True) if len(d)]
    t_face, t_crop, t_cls = [], [], []
    for m, d in busy:
        t0 = time.perf_counter()
        face.detect(m)
        t1 = time.perf_counter()
        crops = mask._crops(m, d.xyxy)
        t2 = time.perf_counter()
        mask._model.run(crops / np.float32(127.5) - np.float32(1.0))
        t3 = time.perf_counter()
        t_face.append(t1 - t0)
        t_crop.append(t2 - t1)
        t_cls.append(t3 - t2)
    faces = np.mean([len(d) for d in found])
    rows = [
        [f"CenterFace {v.face_input[0]}x{v.face_input[1]} detect()", 1000 * c.median(t_face)],
        [f"crops: cut + resize to 224 ({faces:.2f} faces)", 1000 * c.median(t_crop)],
        [f"classifier run on a frame's crops ({faces:.2f} faces)", 1000 * c.median(t_cls)],
    ]
    rng = np.random.default_rng(0)
    for n in (1, 2, 4, 8):
        x = rng.uniform(-1, 1, (n, 224, 224, 3)).astype(np.float32)
        ms = timed(lambda x=x: mask._model.run(x), 10)
        rows.append([f"classifier batch {n} (ms per crop {ms / n:.1f})", ms])
    print(c.table([f"median wall time, {threads} threads", "ms"], rows))
    face.close()
    mask.close()


def _run_analytics(
    frames: list[Image], total: int, v: VisionConfig, threads: int, lag: int | None
) -> tuple[list[list[tuple[int, str]]], dict[str, int], FaceMaskDetector, float]:
    """Every frame through the analytics, a detection on every EVERY-th; ``lag`` None: no
    skipping, else the detector sees the settled boxes published ``lag`` frames earlier."""
    settings = load_settings(cameras=[{"name": "bench", "source": str(CLIP)}])
    analytics = Analytics(settings, "bench")
    face = CenterFaceDetector(v.face_model_path, v.face_input, v.face_threshold, threads=threads)
    det = FaceMaskDetector(face, MaskClassifier(v.mask_model, threads=threads))
    seen = SettledTracks()
    if lag is not None:
        det.follow(seen)
    history: deque[tuple[Boxes, tuple[int, int]]] = deque(maxlen=max(lag or 1, 1))
    labels: list[list[tuple[int, str]]] = []
    size = (frames[0].shape[1], frames[0].shape[0])
    spent = 0.0
    meta = None
    for i in range(total):
        dets = None
        if i % EVERY == 0:
            if lag is not None and len(history) == history.maxlen:
                seen.publish(*history[0])
            m, fit = letterbox(frames[i // EVERY], v.face_input)
            t0 = time.perf_counter()
            dets = evaluation.from_letterbox(det.detect(m), fit)
            spent += time.perf_counter() - t0
        meta = analytics.step(i / 30, dets, size)
        history.append(analytics.settled.boxes())
        labels.append([(t.id, t.label) for t in meta.tracks])
    assert meta is not None
    det.close()
    return labels, meta.counts, det, 1000 * spent / len(frames)


def part_skip(frames: list[Image], total: int, v: VisionConfig, threads: int) -> None:
    print("\n## Classify a track only until its vote is settled\n")
    base, base_counts, base_det, base_ms = _run_analytics(frames, total, v, threads, None)
    rows: list[list[object]] = [
        [
            "classify every face",
            base_det.faces_classified,
            0,
            1.0,
            "-",
            str(base_counts),
            base_ms,
            1.0,
        ]
    ]
    for lag in (1, 8):
        labels, counts, det, ms = _run_analytics(frames, total, v, threads, lag)
        same = differ = 0
        for a, b in zip(base, labels, strict=True):
            da, db = dict(a), dict(b)
            if da.keys() != db.keys():
                raise SystemExit("tracks differ: skipping must not change the tracker's input")
            for tid, label in da.items():
                same += label == db[tid]
                differ += label != db[tid]
        rows.append(
            [
                f"skip settled tracks, snapshot {lag} frame(s) late",
                det.faces_classified,
                det.faces_skipped,
                det.faces_classified / max(base_det.faces_classified, 1),
                f"{differ} of {same + differ}",
                str(counts),
                ms,
                ms / base_ms,
            ]
        )
    print(
        c.table(
            [
                "run",
                "faces classified",
                "faces skipped",
                "x classify all",
                "track-frames whose label differs",
                "final counts",
                "ms a detection",
                "x classify all",
            ],
            rows,
        )
    )


REFERENCE = (640, 352)  # the face input before issue 12


def part_input(frames: list[Image], v: VisionConfig, threads: int, sizes: list[str]) -> None:
    print(f"\n## CenterFace input size and precision: recall against fp32 at {REFERENCE}\n")
    fp32 = MODELS_DIR / "centerface.onnx"
    runs: list[tuple[str, tuple[int, int], Path]] = [("fp32", REFERENCE, fp32)]
    for text in sizes:
        w, h = (int(x) for x in text.split("x"))
        runs.append(("fp32", (w, h), fp32))
    if v.face_model_path != fp32:
        runs.append((f"{v.face_model_precision} (configured)", v.face_input, v.face_model_path))
    results: dict[tuple[str, tuple[int, int]], tuple[list[Boxes], float]] = {}
    for precision, size, path in runs:
        face = CenterFaceDetector(path, size, v.face_threshold, threads=threads)
        boxes = []
        t = []
        for src in frames:
            m, fit = letterbox(src, size)
            t0 = time.perf_counter()
            d = face.detect(m)
            t.append(time.perf_counter() - t0)
            boxes.append(evaluation.from_letterbox(d, fit).xyxy)
        face.close()
        results[(precision, size)] = (boxes, 1000 * c.median(t))
    ref_boxes, ref_ms = results[("fp32", REFERENCE)]
    n_ref = sum(len(b) for b in ref_boxes)
    # The classifier's crops are cut from the model frame: a smaller one gives it fewer
    # pixels a face. Its calls on the reference faces, cut from each size's frame, plain
    # and with a mask drawn on every face, are compared with the reference size's.
    mask = MaskClassifier(v.mask_model, threads=threads)
    probs: dict[tuple[tuple[int, int], str], list[float]] = {}
    for src, boxes in zip(frames[::2], ref_boxes[::2], strict=True):
        if not len(boxes):
            continue
        for variant, image in (("plain", src), ("masked", with_masks(src, boxes))):
            for size in {size for _, size, _ in runs}:
                m, (scale, dx, dy) = letterbox(image, size)
                in_model = boxes * scale + np.array([dx, dy, dx, dy], dtype=np.float32)
                probs.setdefault((size, variant), []).extend(mask.classify(m, in_model).tolist())
    mask.close()
    rows = []
    for (precision, size), (boxes, ms) in results.items():
        n = sum(len(b) for b in boxes)
        hit = sum(matched(r, b) for r, b in zip(ref_boxes, boxes, strict=True))
        agree = []
        for variant in ("plain", "masked"):
            p_ref = np.array(probs[(REFERENCE, variant)])
            p = np.array(probs[(size, variant)])
            called = 100 * float(np.mean(p >= 0.5))
            same = 100 * float(np.mean((p >= 0.5) == (p_ref >= 0.5)))
            agree.append(f"{same:.0f} % ({called:.0f} % mask)")
        rows.append(
            [
                f"{size[0]}x{size[1]} {precision}",
                n / len(frames),
                f"{hit / max(n_ref, 1):.3f}",
                f"{hit / max(n, 1):.3f}",
                ms,
                ms / ref_ms,
                *agree,
            ]
        )
    print(
        c.table(
            [
                "CenterFace",
                "faces a frame",
                "recall",
                "precision",
                "ms a call",
                "x reference",
                "classifier same call, plain faces",
                "drawn masks",
            ],
            rows,
        )
    )


def part_int8(frames: list[Image], v: VisionConfig, threads: int, where: Path) -> None:
    print("\n## int8 models against fp32\n")
    sample = [letterbox(f, v.face_input)[0] for f in frames]
    rows: list[list[object]] = []
    fp32 = CenterFaceDetector(MODELS_DIR / "centerface.onnx", v.face_input, threads=threads)
    ref = [fp32.detect(m) for m in sample]
    ref_ms = timed(lambda: fp32.detect(sample[0]), 20)
    fp32.close()
    int8_path = where / "centerface_int8.onnx"
    if int8_path.is_file():
        q = CenterFaceDetector(int8_path, v.face_input, threads=threads)
        got = [q.detect(m) for m in sample]
        ms = timed(lambda: q.detect(sample[0]), 20)
        q.close()
        n_ref = sum(len(d) for d in ref)
        n = sum(len(d) for d in got)
        hit = sum(matched(a.xyxy, b.xyxy) for a, b in zip(ref, got, strict=True))
        rows.append(
            [
                "CenterFace",
                f"recall {hit / n_ref:.3f}, precision {hit / max(n, 1):.3f}",
                ref_ms,
                ms,
                ms / ref_ms,
            ]
        )
    boxes = [(m, d.xyxy) for m, d in zip(sample, ref, strict=True) if len(d)]
    mask32 = MaskClassifier(MODELS_DIR / "mask_classifier.onnx", threads=threads)
    p32 = np.concatenate([mask32.classify(m, b) for m, b in boxes])
    x4 = mask32._crops(*boxes[0])
    ref_ms = timed(lambda: mask32.classify(*boxes[0]), 20)
    mask32.close()
    int8_path = where / "mask_classifier_int8.onnx"
    if int8_path.is_file():
        mask8 = MaskClassifier(int8_path, threads=threads)
        p8 = np.concatenate([mask8.classify(m, b) for m, b in boxes])
        ms = timed(lambda: mask8.classify(*boxes[0]), 20)
        mask8.close()
        same = float(np.mean((p32 >= 0.5) == (p8 >= 0.5)))
        rows.append(
            [
                f"mask classifier ({len(p32)} crops, {len(x4)} a call)",
                f"same decision {100 * same:.1f} %, max |dP| {np.max(np.abs(p32 - p8)):.3f}",
                ref_ms,
                ms,
                ms / ref_ms,
            ]
        )
    print(c.table(["model", "agreement with fp32", "fp32 ms", "int8 ms", "x fp32"], rows))


# The configuration before issue 12's face-rich work, as environment variables.
BEFORE = {
    "EDGECAM_VISION__FACE_INPUT": "[640, 352]",
    "EDGECAM_VISION__FACE_MODEL_PRECISION": "fp32",
    "EDGECAM_VISION__MASK_BATCH": "64",
    "EDGECAM_VOTING__SETTLE_VOTES": "0",
}
LIVE_FIGURES = (
    "output fps",
    "frames short of real time",
    "frames sent late",
    "detections / s",
    "mean detector call",
    "CPU cores used",
    "RSS max sampled",
)


def live_run(clip: Path, seconds: float, detect_fps: float) -> int:
    """bench_live.py on ``clip`` in this process (the live pipeline lets the mask detector
    follow the analytics' settled tracks)."""
    import bench_live

    sys.argv = [
        "bench_live.py",
        str(clip),
        "--seconds",
        f"{seconds:g}",
        "--detect-fps",
        f"{detect_fps:g}",
    ]
    result: int = bench_live.main()
    return result


def part_live(clip: Path, seconds: float, detect_fps: float) -> None:
    """The live pipeline before (``BEFORE``) and after, back to back, each in its own
    process; the figures side by side."""
    import os
    import subprocess

    print(
        f"\n## Live, {clip.name} played in real time, up to {detect_fps:g} detections/s "
        f"(before: {BEFORE})\n"
    )
    figures: dict[str, dict[str, str]] = {}
    for name, env in (("before", BEFORE), ("after", {})):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                str(clip),
                "--live-run",
                "--seconds",
                f"{seconds:g}",
                "--detect-fps",
                f"{detect_fps:g}",
            ],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        print(f"### {name}\n{out}")
        figures[name] = {}
        for line in out.splitlines():
            cells = [x.strip() for x in line.strip("|").split("|")]
            for key in LIVE_FIGURES:
                if len(cells) >= 2 and cells[0].startswith(key):
                    figures[name][cells[0]] = cells[1]
    keys = list(figures["before"])
    print(
        c.table(
            ["live figure", "before", "after"],
            [[k, figures["before"][k], figures["after"].get(k, "-")] for k in keys],
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("clip", nargs="?", type=Path, default=CLIP)
    parser.add_argument("--parts", default="profile,skip,input,int8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--int8-dir", type=Path, default=MODELS_DIR, help="int8 models' folder")
    parser.add_argument("--sizes", default="480x256,416x224,320x192")
    parser.add_argument("--seconds", type=float, default=40, help="live: measuring window")
    parser.add_argument("--detect-fps", type=float, default=10, help="live: detections/s cap")
    parser.add_argument("--live-run", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.live_run:
        return live_run(args.clip, args.seconds, args.detect_fps)
    limit_malloc_arenas()  # as the live worker does
    print(f"clip {args.clip}; {c.machine_note()}")
    parts = args.parts.split(",")
    if "live" in parts:
        part_live(args.clip, args.seconds, args.detect_fps)
        if parts == ["live"]:
            return 0
    frames, total = decode(args.clip)
    v = VisionConfig()
    if "profile" in parts:
        part_profile(frames, v, args.threads)
    if "skip" in parts:
        part_skip(frames, total, v, args.threads)
    if "input" in parts:
        part_input(frames, v, args.threads, args.sizes.split(","))
    if "int8" in parts:
        part_int8(frames, v, args.threads, args.int8_dir)
    print(f"\nfinished {c.machine_note()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
