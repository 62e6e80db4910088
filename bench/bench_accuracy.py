"""Accuracy of the person detectors (and CenterFace) on the labelled set in ``media/eval/``.

Per person detector and input size: precision, recall and AP50 over all labelled persons and
per size bucket (box height in source pixels: small < 64, medium 64-160, large >= 160), the
detector call time, and, with the real tracker and analytics (``vision.analytics``) fed as
live would feed them, the counting error per frame (|labelled persons - counted tracks|),
the share of frames with people in view but no counted track, and ID churn (counted track
ids per labelled identity). Then the precision/recall curve of the default, a sweep of the
tracker's confirmation settings on the same detections, and CenterFace on faces made small.

Candidates other than NanoDet-g are built by ``scripts/candidate_models.sh`` (not vendored);
the run says which it found and which it skipped, and why.

    .venv/bin/python bench/bench_accuracy.py [--models a,b,...] [--all] [--no-faces]
        [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c

from edgecam.config import MODELS_DIR, Settings, TrackerConfig, VisionConfig
from edgecam.errors import ModelError
from edgecam.vision.analytics import Analytics
from edgecam.vision.detections import Detections, Detector
from edgecam.vision.detectors import CenterFaceDetector
from edgecam.vision.evaluation import (
    SIZE_BUCKETS,
    Scene,
    average_precision,
    bucket_of,
    load_scenes,
    match_frame,
    pr_curve,
    read_frames,
)
from edgecam.vision.person_detectors import build_person_detector

EVAL_DIR = c.ROOT / "media" / "eval"
FLOOR = 0.05  # every detector runs at this score; thresholds are applied afterwards
BASELINE = "nanodet-416"
BASELINE_THRESHOLD = 0.5
WARMUP_S = 1.0  # counting is judged after the tracker had this long to confirm tracks
_MAX_VIDEO_STEP = 5  # scenes labelled sparser than this are stills, not video to track
THRESHOLDS = tuple(round(0.25 + 0.05 * k, 2) for k in range(10))  # 0.25 .. 0.70
_TABLE_KEYS = (
    "input",
    "threshold",
    "precision",
    "recall",
    "recall_small",
    "ap50",
    "ap50_small",
    "ap50_medium",
    "ap50_large",
    "count_mae",
    "covered",
    "churn",
    "false_tracks",
    "ms",
)
_COUNT_HEADERS = ("count err", "found", "churn", "false trk")
_TABLE_HEADERS = (
    "input",
    "thr",
    "P",
    "R",
    "R small",
    "AP50",
    "AP50 S",
    "AP50 M",
    "AP50 L",
    *_COUNT_HEADERS,
    "ms/call",
)
FACE_BUCKETS = {"small": (0.0, 24.0), "medium": (24.0, 64.0), "large": (64.0, float("inf"))}
FACE_MODELS = {"fp32": "centerface.onnx", "int8": "centerface_int8.onnx"}
# The default (480x256 int8, chosen for the face-rich budget of issue 12), the same input in
# fp32, the earlier default 640x352, and two larger inputs.
FACE_CHOICES = (
    ("int8", (480, 256)),
    ("fp32", (480, 256)),
    ("int8", (640, 352)),
    ("fp32", (640, 352)),
    ("fp32", (960, 544)),
    ("fp32", (1280, 704)),
)

Frame = npt.NDArray[np.uint8]
Factory = Callable[[], Detector]


def _candidate(**vision: object) -> Factory:
    """A detector built from config exactly as the camera builds it, at the floor score.

    Everything about the person detector is given here, so the candidates stay the same
    whatever the configured default is.
    """
    cfg = VisionConfig.model_validate(
        {
            "profile": "people",
            "person_detector": "nanodet",
            "person_tiles": (1, 1),
            "person_tile_whole": False,
            **vision,
            "person_threshold": FLOOR,
        }
    )
    return lambda: build_person_detector(cfg)


# name -> (vision config of the candidate, in the default run)
CANDIDATES: dict[str, tuple[Factory, bool]] = {
    "nanodet-416": (_candidate(person_input=(416, 416)), True),
    "nanodet-2x416": (_candidate(person_input=(416, 416), person_tiles=(2, 1)), True),
    "nanodet-2x416+full": (
        _candidate(person_input=(416, 416), person_tiles=(2, 1), person_tile_whole=True),
        True,
    ),
    "nanodet-6x416": (_candidate(person_input=(416, 416), person_tiles=(3, 2)), False),
    "centernet-512": (_candidate(person_detector="centernet", person_input=(512, 512)), True),
    "centernet-2x512": (
        _candidate(person_detector="centernet", person_input=(512, 512), person_tiles=(2, 1)),
        False,
    ),
    "movenet-256": (_candidate(person_detector="movenet", person_input=(256, 256)), True),
    "movenet-448x256": (_candidate(person_detector="movenet", person_input=(448, 256)), True),
    "ssdlite-320": (_candidate(person_detector="ssdlite", person_input=(320, 320)), True),
    "ssdlite-2x320": (
        _candidate(person_detector="ssdlite", person_input=(320, 320), person_tiles=(2, 1)),
        True,
    ),
}


@dataclass
class Run:
    """One detector's raw detections (source pixels, score >= FLOOR) on every scene."""

    name: str
    input_size: tuple[int, int]
    boxes: dict[str, list[Detections]] = field(default_factory=dict)
    call_ms: list[float] = field(default_factory=list)


def _fit(frame: Frame, size: tuple[int, int]) -> Frame:
    interp = cv2.INTER_AREA if size[0] < frame.shape[1] else cv2.INTER_LINEAR
    return np.ascontiguousarray(cv2.resize(frame, size, interpolation=interp))


def detect_all(
    scenes: Sequence[Scene], frames: dict[str, list[Frame]], name: str, make: Factory
) -> Run:
    detector = make()
    try:
        run = Run(name, detector.input_size)
        for scene in scenes:
            w, h = scene.size
            iw, ih = detector.input_size
            out = []
            for frame in frames[scene.name]:
                x = _fit(frame, detector.input_size)
                t0 = time.perf_counter()
                found = detector.detect(x)
                run.call_ms.append((time.perf_counter() - t0) * 1000)
                out.append(found.scaled(w / iw, h / ih))
            run.boxes[scene.name] = out
        return run
    finally:
        detector.close()


@dataclass
class Pooled:
    """Detections of all frames judged against the labels, pooled."""

    scores: npt.NDArray[np.float32]
    tp: npt.NDArray[np.bool_]
    det_bucket: list[str]  # the bucket each detection counts in (its match's, else its own)
    truth_buckets: dict[str, int]


def pool(run: Run, scenes: Sequence[Scene]) -> Pooled:
    scores, tps, buckets = [], [], []
    truth = dict.fromkeys(SIZE_BUCKETS, 0)
    for scene in scenes:
        for labels, found in zip(scene.frames, run.boxes[scene.name], strict=True):
            m = match_frame(found.xyxy, found.confidence, labels.persons, labels.ignore)
            gt_b = bucket_of(labels.persons)
            for b in gt_b:
                truth[b] += 1
            own = bucket_of(found.xyxy)
            matched = {int(d): g for g, d in enumerate(m.gt_hit) if d >= 0}
            keep = ~m.ignored
            for d in np.nonzero(keep)[0]:
                scores.append(float(found.confidence[d]))
                tps.append(bool(m.tp[d]))
                buckets.append(gt_b[matched[int(d)]] if int(d) in matched else own[d])
    return Pooled(np.asarray(scores, dtype=np.float32), np.asarray(tps, dtype=bool), buckets, truth)


def pr_at(p: Pooled, threshold: float, bucket: str | None = None) -> tuple[float, float]:
    sel = p.scores >= threshold
    n_truth = sum(p.truth_buckets.values())
    if bucket is not None:
        sel &= np.asarray([b == bucket for b in p.det_bucket], dtype=bool)
        n_truth = p.truth_buckets[bucket]
    tp = int(np.sum(p.tp & sel))
    fp = int(np.sum(~p.tp & sel))
    return tp / max(tp + fp, 1), tp / max(n_truth, 1)


def ap(p: Pooled, bucket: str | None = None) -> float:
    if bucket is None:
        _, prec, rec = pr_curve(p.scores, p.tp, sum(p.truth_buckets.values()))
        return average_precision(prec, rec)
    sel = np.asarray([b == bucket for b in p.det_bucket], dtype=bool)
    _, prec, rec = pr_curve(p.scores[sel], p.tp[sel], p.truth_buckets[bucket])
    return average_precision(prec, rec)


def best_f1(p: Pooled) -> float:
    """The threshold (of THRESHOLDS) with the highest F1."""
    best, best_t = -1.0, THRESHOLDS[0]
    for t in THRESHOLDS:
        prec, rec = pr_at(p, t)
        f1 = 2 * prec * rec / max(prec + rec, 1e-9)
        if f1 > best:
            best, best_t = f1, t
    return best_t


@dataclass
class Counting:
    mae: float  # mean |labelled - counted| per frame after the warm-up
    empty: float  # share of frames with people in view but nothing counted
    churn: float  # counted track ids per labelled identity that a counted track found
    covered: float  # share of labelled identities that a counted track found
    false_tracks: int  # counted track ids that never matched a labelled person
    frames: int


def counting(
    run: Run, scenes: Sequence[Scene], threshold: float, tracker: TrackerConfig
) -> Counting:
    """The real analytics (tracker, min age) fed as live feeds it; video scenes only."""
    errors: list[float] = []
    empty = 0
    found_ids: dict[tuple[str, int], set[int]] = {}
    identities = 0
    false_tracks = 0
    for scene in scenes:
        if scene.step > _MAX_VIDEO_STEP:
            continue  # a slideshow of stills, not a video to track
        settings = Settings(vision=VisionConfig(profile="people"), tracker=tracker)
        analytics = Analytics(settings, settings.cameras[0].name)
        matched_tracks: set[int] = set()
        all_tracks: set[int] = set()
        for n, (labels, found) in enumerate(zip(scene.frames, run.boxes[scene.name], strict=True)):
            for k in range(scene.step - 1):  # camera frames the detector did not see
                analytics.step((n * scene.step + k) / scene.fps, None, scene.size)
            dets = found[found.confidence >= threshold]
            meta = analytics.step((n * scene.step + scene.step - 1) / scene.fps, dets, scene.size)
            shown = [t for t in meta.tracks if t.counted]
            all_tracks.update(t.id for t in shown)
            boxes = np.asarray([t.box for t in shown], dtype=np.float32).reshape(-1, 4)
            m = match_frame(boxes, np.ones(len(shown), np.float32), labels.persons, labels.ignore)
            for g, d in enumerate(m.gt_hit):
                if d >= 0:
                    found_ids.setdefault((scene.name, int(labels.ids[g])), set()).add(shown[d].id)
                    matched_tracks.add(shown[d].id)
            if (n + 1) * scene.step / scene.fps < WARMUP_S:
                continue
            truth = len(labels.persons)
            errors.append(abs(truth - len(shown)))
            empty += int(truth > 0 and not shown)
        identities += scene.persons
        false_tracks += len(all_tracks - matched_tracks)
    churn = float(np.mean([len(v) for v in found_ids.values()])) if found_ids else float("nan")
    return Counting(
        float(np.mean(errors)) if errors else float("nan"),
        empty / max(len(errors), 1),
        churn,
        len(found_ids) / max(identities, 1),
        false_tracks,
        len(errors),
    )


def faces(scenes: Sequence[Scene], frames: dict[str, list[Frame]]) -> list[list[object]]:
    """CenterFace recall per face size on the photos shrunk into a mosaic (faces made small)."""
    rows: list[list[object]] = []
    labelled = [s for s in scenes if s.faces_labelled and not s.condition]
    if not labelled:
        return rows
    scene = labelled[0]
    w, h = scene.size
    for precision, size in FACE_CHOICES:
        d = CenterFaceDetector(MODELS_DIR / FACE_MODELS[precision], size, 0.05, threads=2)
        try:
            for shrink in (1, 2, 3):
                scores, tps, fb = [], [], []
                truth = dict.fromkeys(FACE_BUCKETS, 0)
                ms = []
                for labels, frame in zip(scene.frames, frames[scene.name], strict=True):
                    assert labels.faces is not None
                    small = cv2.resize(
                        frame, (w // shrink, h // shrink), interpolation=cv2.INTER_AREA
                    )
                    canvas = np.tile(small, (shrink, shrink, 1))[:h, :w]
                    canvas = np.ascontiguousarray(
                        np.pad(canvas, ((0, h - canvas.shape[0]), (0, w - canvas.shape[1]), (0, 0)))
                    )
                    boxes = []
                    sw, sh = (w // shrink) / w, (h // shrink) / h
                    for i in range(shrink):
                        for j in range(shrink):
                            boxes.append(
                                labels.faces * [sw, sh, sw, sh]
                                + [j * (w // shrink), i * (h // shrink)] * 2
                            )
                    truth_boxes = np.concatenate(boxes).astype(np.float32)
                    ign = labels.ignore * [sw, sh, sw, sh]
                    t0 = time.perf_counter()
                    found = d.detect(_fit(canvas, size)).scaled(w / size[0], h / size[1])
                    ms.append((time.perf_counter() - t0) * 1000)
                    m = match_frame(
                        found.xyxy, found.confidence, truth_boxes, ign.astype(np.float32)
                    )
                    heights = truth_boxes[:, 3] - truth_boxes[:, 1]
                    tb = [_face_bucket(x) for x in heights]
                    for b in tb:
                        truth[b] += 1
                    matched = {int(dd): g for g, dd in enumerate(m.gt_hit) if dd >= 0}
                    for k in np.nonzero(~m.ignored)[0]:
                        scores.append(float(found.confidence[k]))
                        tps.append(bool(m.tp[k]))
                        own = float(found.xyxy[k, 3] - found.xyxy[k, 1])
                        fb.append(tb[matched[int(k)]] if int(k) in matched else _face_bucket(own))
                p = Pooled(np.asarray(scores, np.float32), np.asarray(tps, bool), fb, truth)
                prec, rec = pr_at(p, 0.5)
                row: list[object] = [
                    f"{size[0]}x{size[1]} {precision}",
                    f"1/{shrink}",
                    sum(truth.values()),
                ]
                row += [prec, rec]
                for b in FACE_BUCKETS:
                    row.append(f"{pr_at(p, 0.5, b)[1]:.2f} ({truth[b]})" if truth[b] else "-")
                row += [ap(p), c.median(ms)]
                rows.append(row)
        finally:
            d.close()
    return rows


def _face_bucket(height: float) -> str:
    for name, (lo, hi) in FACE_BUCKETS.items():
        if lo <= height < hi:
            return name
    return "large"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated candidate names (default: the quick set)")
    parser.add_argument("--all", action="store_true", help="also the slow candidates")
    parser.add_argument("--no-faces", action="store_true", help="skip the face section")
    parser.add_argument("--out", type=Path, help="write all figures as JSON here")
    args = parser.parse_args()

    names = (
        args.models.split(",")
        if args.models
        else [n for n, (_, quick) in CANDIDATES.items() if quick or args.all]
    )
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        raise SystemExit(f"unknown candidates {unknown}; known: {list(CANDIDATES)}")
    if BASELINE not in names:
        names.insert(0, BASELINE)

    print(f"# accuracy on {EVAL_DIR.relative_to(c.ROOT)} ({c.machine_note()})")
    scenes = load_scenes(EVAL_DIR, c.ROOT)
    frames = {s.name: [img for _, img in read_frames(s)] for s in scenes}
    total = sum(len(s.frames) for s in scenes)
    print(
        f"{total} labelled frames in {len(scenes)} scenes: "
        + ", ".join(
            f"{s.name} {len(s.frames)} ({sum(len(f.persons) for f in s.frames)} persons)"
            for s in scenes
        )
    )

    runs: dict[str, Run] = {}
    for name in names:
        t0 = time.perf_counter()
        try:
            runs[name] = detect_all(scenes, frames, name, CANDIDATES[name][0])
        except ModelError as exc:
            print(f"skipped {name}: {exc}")
            continue
        print(f"ran {name} in {time.perf_counter() - t0:.0f} s")

    pooled = {n: pool(r, scenes) for n, r in runs.items()}
    base_p, base_r = pr_at(pooled[BASELINE], BASELINE_THRESHOLD)
    base_small = pr_at(pooled[BASELINE], BASELINE_THRESHOLD, "small")[1]
    default = VisionConfig()
    tracker = TrackerConfig()
    results: dict[str, dict[str, object]] = {}
    rows: list[list[object]] = []
    key = _config_candidate(default)
    entries = [(n, n, BASELINE_THRESHOLD if n == BASELINE else None) for n in runs]
    if key in runs and (key != BASELINE or default.person_threshold != BASELINE_THRESHOLD):
        entries.append((f"{key} (default)", key, default.person_threshold))
    for label, name, fixed in entries:
        run, p = runs[name], pooled[name]
        t = fixed if fixed is not None else best_f1(p)
        prec, rec = pr_at(p, t)
        cnt = counting(run, scenes, t, tracker)
        r: dict[str, object] = {
            "input": f"{run.input_size[0]}x{run.input_size[1]}",
            "threshold": t,
            "precision": prec,
            "recall": rec,
            "recall_small": pr_at(p, t, "small")[1],
            "ap50": ap(p),
            **{f"ap50_{b}": ap(p, b) for b in SIZE_BUCKETS},
            "count_mae": cnt.mae,
            "empty": cnt.empty,
            "covered": cnt.covered,
            "churn": cnt.churn,
            "false_tracks": cnt.false_tracks,
            "ms": c.median(run.call_ms),
        }
        results[label] = r
        rows.append([label, *(r[k] for k in _TABLE_KEYS)])
    print(
        f"\n## Person detectors (baseline {BASELINE} at {BASELINE_THRESHOLD}: P {base_p:.3f}, "
        f"R {base_r:.3f}, R small {base_small:.3f}; the configured default "
        f"{_config_candidate(default)} at {default.person_threshold}; others at their "
        "best-F1 threshold)\n"
    )
    print(c.table(["model", *_TABLE_HEADERS], rows))

    print(f"\n## Recall at precision >= the baseline's ({base_p:.3f})\n")
    matched = []
    for name in runs:
        ok = [t for t in THRESHOLDS if pr_at(pooled[name], t)[0] >= base_p]
        if ok:
            t = min(ok)
            prec, rec = pr_at(pooled[name], t)
            small = pr_at(pooled[name], t, "small")[1]
            matched.append([name, t, prec, rec, small, small / max(base_small, 1e-9)])
        else:
            matched.append([name, "-", "-", "-", "-", "-"])
    print(c.table(["model", "thr", "P", "R", "R small", "R small / baseline"], matched))

    print("\n## AP50 per scene\n")
    scene_rows = [[n, *(ap(pool(r, [s])) for s in scenes)] for n, r in runs.items()]
    print(c.table(["model", *(s.name for s in scenes)], scene_rows))

    print("\n## Threshold curve\n")
    curve_rows = []
    for name in runs:
        if name != BASELINE and results[name]["ap50"] < results[BASELINE]["ap50"]:  # type: ignore[operator]
            continue
        for t in THRESHOLDS:
            prec, rec = pr_at(pooled[name], t)
            cnt = counting(runs[name], scenes, t, tracker)
            small = pr_at(pooled[name], t, "small")[1]
            curve_rows.append(
                [name, t, prec, rec, small, cnt.mae, cnt.covered, cnt.churn, cnt.false_tracks]
            )
    print(c.table(["model", "thr", "P", "R", "R small", *_COUNT_HEADERS], curve_rows))

    print(
        f"\n## Tracker confirmation on the configured default ({key} at "
        f"{default.person_threshold})\n"
    )
    sweep = []
    if key in runs:
        for delay in (0, 1, 2, 3):
            for dist in (0.7, 0.8, 0.9):
                for age in (3, 5):
                    cfg = TrackerConfig(
                        initialization_delay=delay, distance_threshold=dist, min_age_frames=age
                    )
                    cnt = counting(runs[key], scenes, default.person_threshold, cfg)
                    sweep.append(
                        [delay, dist, age, cnt.mae, cnt.covered, cnt.churn, cnt.false_tracks]
                    )
        print(c.table(["init delay", "distance", "min age", *_COUNT_HEADERS], sweep))
    else:
        print(f"(candidate {key} not in this run)")

    face_rows: list[list[object]] = []
    if not args.no_faces:
        print("\n## CenterFace on the photos, faces shrunk into a mosaic (threshold 0.5)\n")
        face_rows = faces(scenes, frames)
        print(
            c.table(
                [
                    "input",
                    "scale",
                    "faces",
                    "P",
                    "R",
                    "R small",
                    "R medium",
                    "R large",
                    "AP50",
                    "ms/call",
                ],
                face_rows,
            )
        )
    if args.out:
        args.out.write_text(
            json.dumps({"persons": results, "tracker": sweep, "faces": face_rows}, indent=1)
        )
    return 0


def _config_candidate(v: VisionConfig) -> str:
    """The benchmark's name for the detector a VisionConfig builds."""
    w, h = v.person_input
    cols, rows = v.person_tiles
    tiles = f"{cols * rows}x" if (cols, rows) != (1, 1) else ""
    size = f"{w}" if w == h else f"{w}x{h}"
    full = "+full" if tiles and v.person_tile_whole else ""
    return f"{v.person_detector}-{tiles}{size}{full}"


if __name__ == "__main__":
    sys.exit(main())
