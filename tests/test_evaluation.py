"""The accuracy maths on hand-made cases, the labelled set against its clips, and tiling."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgecam.config import MODELS_DIR, VisionConfig
from edgecam.errors import ModelError
from edgecam.vision.detections import Detections
from edgecam.vision.detectors import NanoDetDetector, build_detector
from edgecam.vision.evaluation import (
    EvalSetError,
    average_precision,
    bucket_of,
    from_letterbox,
    iou_matrix,
    letterbox,
    load_scene,
    load_scenes,
    match_frame,
    pr_curve,
    read_frames,
)
from edgecam.vision.person_detectors import TiledDetector, build_person_detector

ROOT = Path(__file__).parents[1]
EVAL = ROOT / "media" / "eval"


def _boxes(*rows: tuple[float, float, float, float]) -> np.ndarray:
    return np.asarray(rows, dtype=np.float32).reshape(-1, 4)


def test_iou_matrix_values() -> None:
    a = _boxes((0, 0, 10, 10), (0, 0, 10, 20))
    b = _boxes((5, 0, 15, 10), (20, 20, 30, 30))
    iou = iou_matrix(a, b)
    # 50 / (100 + 100 - 50); 50 / (200 + 100 - 50); disjoint boxes: 0
    np.testing.assert_allclose(iou, [[1 / 3, 0], [0.2, 0]], rtol=1e-6)
    assert iou_matrix(a, _boxes()).shape == (2, 0)


def test_match_takes_best_score_first_and_counts_a_duplicate_as_false() -> None:
    truth = _boxes((0, 0, 10, 20))
    # Both overlap the one person; the higher score takes it, the other is a false positive.
    dets = _boxes((0, 0, 10, 18), (1, 0, 11, 20))
    m = match_frame(dets, np.array([0.4, 0.9], np.float32), truth, _boxes())
    assert m.tp.tolist() == [False, True]
    assert m.gt_hit.tolist() == [1]
    assert m.ignored.tolist() == [False, False]


def test_match_needs_iou_one_half() -> None:
    truth = _boxes((0, 0, 10, 20))
    # The upper half: IoU 100 / 200 = 0.5 matches; a row less (IoU 0.495) does not.
    hit = match_frame(_boxes((0, 0, 10, 10)), np.array([0.9], np.float32), truth, _boxes())
    miss = match_frame(_boxes((0, 0, 10, 9.9)), np.array([0.9], np.float32), truth, _boxes())
    assert hit.tp.tolist() == [True]
    assert miss.tp.tolist() == [False] and miss.gt_hit.tolist() == [-1]


def test_ignore_region_excuses_only_unmatched_detections_inside_it() -> None:
    truth = _boxes((0, 0, 10, 20))
    crowd = _boxes((100, 0, 200, 50))
    dets = _boxes((0, 0, 10, 20), (110, 5, 120, 25), (190, 5, 230, 25), (300, 0, 310, 20))
    m = match_frame(dets, np.array([0.9, 0.8, 0.7, 0.6], np.float32), truth, crowd)
    assert m.tp.tolist() == [True, False, False, False]
    # Inside the crowd; a quarter inside (10 of 40 px wide): not excused; far away: not.
    assert m.ignored.tolist() == [False, True, False, False]


def test_pr_curve_and_ap_by_hand() -> None:
    scores = np.array([0.7, 0.9, 0.8], np.float32)
    tp = np.array([True, True, False])
    thresholds, precision, recall = pr_curve(scores, tp, n_truth=3)
    np.testing.assert_allclose(thresholds, [0.9, 0.8, 0.7])
    np.testing.assert_allclose(precision, [1.0, 0.5, 2 / 3], rtol=1e-6)
    np.testing.assert_allclose(recall, [1 / 3, 1 / 3, 2 / 3], rtol=1e-6)
    # Envelope: precision 1 up to recall 1/3, then 2/3 up to recall 2/3; nothing after.
    assert average_precision(precision, recall) == pytest.approx(1 / 3 + (1 / 3) * (2 / 3))
    assert average_precision(np.zeros(0, np.float32), np.zeros(0, np.float32)) == 0.0


def test_size_buckets_by_height() -> None:
    boxes = _boxes((0, 0, 100, 63.9), (0, 0, 5, 64), (0, 10, 5, 169.9), (0, 0, 5, 160))
    assert bucket_of(boxes) == ["small", "medium", "medium", "large"]


def _frame_count(clip: Path) -> int:
    capture = cv2.VideoCapture(str(clip))
    n = 0
    while capture.grab():
        n += 1
    capture.release()
    return n


def test_eval_set_labels_load_and_match_their_clips() -> None:
    scenes = {s.name: s for s in load_scenes(EVAL, ROOT)}
    assert {"plaza", "plaza_dark", "market_a", "market_b", "photos"} <= set(scenes)
    assert sum(len(s.frames) for s in scenes.values() if not s.condition) >= 150
    for scene in scenes.values():
        assert scene.frames[-1].index < _frame_count(scene.clip), scene.name
        assert all(len(f.persons) == len(f.ids) for f in scene.frames)
        w, h = scene.size
        for f in scene.frames:
            assert (f.persons[:, [0, 2]] <= w).all() and (f.persons[:, [1, 3]] <= h).all()
    # The market clips are labelled frame by frame, the darkened plaza reuses the plaza labels.
    assert _frame_count(scenes["market_a"].clip) == len(scenes["market_a"].frames) == 35
    assert scenes["plaza_dark"].frames is scenes["plaza"].frames or all(
        np.array_equal(a.persons, b.persons)
        for a, b in zip(scenes["plaza_dark"].frames, scenes["plaza"].frames, strict=True)
    )
    assert scenes["plaza_dark"].condition and not scenes["plaza"].condition
    assert (
        scenes["photos"].faces_labelled
        and sum(len(f.faces) for f in scenes["photos"].frames if f.faces is not None) >= 90
    )


def test_read_frames_decodes_the_labelled_frames_and_darkens_the_derived_scene() -> None:
    scenes = {s.name: s for s in load_scenes(EVAL, ROOT)}
    day = [img for _, img in read_frames(scenes["plaza"])]
    night = [img for _, img in read_frames(scenes["plaza_dark"])]
    assert len(day) == len(night) == len(scenes["plaza"].frames)
    assert day[0].shape == (576, 768, 3)
    assert night[0].mean() < 0.5 * day[0].mean()


def test_a_bad_scene_file_names_itself(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"name": "bad", "clip": "x.mp4", "size": [10, 10], "frames": []}))
    with pytest.raises(EvalSetError, match=r"bad\.json"):
        load_scene(path, ROOT)
    path.write_text(
        json.dumps(
            {
                "name": "bad",
                "clip": "x.mp4",
                "size": [10, 10],
                "fps": 10,
                "step": 1,
                "frames": [{"i": 0, "persons": [[5, 5, 2, 8, 1]]}],
            }
        )
    )
    with pytest.raises(EvalSetError, match="x2 <= x1"):
        load_scene(path, ROOT)


def test_tiles_cover_the_frame_and_find_people_in_a_real_frame() -> None:
    inner = NanoDetDetector(MODELS_DIR / "nanodet_g.onnx", (416, 416), 0.4, threads=1)
    tiled = TiledDetector(inner, (736, 416), 2, 1)
    assert tiled.tiles == ((0, 0), (320, 0))
    capture = cv2.VideoCapture(str(ROOT / "media" / "pedestrians_30s.mp4"))
    ok, bgr = capture.read()
    capture.release()
    assert ok
    frame = np.ascontiguousarray(cv2.resize(bgr[:, :, ::-1], (736, 416)))
    found = tiled.detect(frame)
    # vtest frame 0 shows three people (see test_detectors); tiles must not split or lose them.
    assert len(found) == 3
    assert (found.xyxy[:, 2] <= 736).all() and (found.xyxy[:, 0] >= 0).all()
    with pytest.raises(ValueError, match="without gaps"):
        TiledDetector(inner, (900, 416), 2, 1)
    tiled.close()


def test_config_builds_tiled_nanodet_at_the_tiled_frame_size() -> None:
    v = VisionConfig(profile="people", person_tiles=(2, 1), threads=1)
    assert v.person_frame == (736, 416)
    detector = build_detector(v)
    assert isinstance(detector, TiledDetector)
    assert detector.input_size == (736, 416)
    detector.close()


def test_missing_candidate_says_how_to_build_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("edgecam.vision.person_detectors.CANDIDATES_DIR", tmp_path)
    with pytest.raises(ModelError, match=r"scripts/candidate_models\.sh"):
        build_person_detector(VisionConfig(profile="people", person_detector="ssdlite"))


def test_centernet_input_must_be_512(tmp_path: Path) -> None:
    v = VisionConfig(
        profile="people",
        person_detector="centernet",
        person_model=MODELS_DIR / "nanodet_g.onnx",
        person_input=(416, 416),
    )
    with pytest.raises(ValueError, match=r"person_input must be \(512, 512\)"):
        build_person_detector(v)


def test_a_piece_cut_off_by_a_tile_edge_is_dropped_but_a_neighbour_is_kept() -> None:
    from edgecam.vision.person_detectors import _uncontained

    boxes = _boxes(
        (0, 0, 40, 100),  # a person, best score first
        (20, 0, 40, 50),  # the upper right quarter of the same person: fully inside
        (30, 0, 70, 100),  # the neighbour, overlapping a quarter of the first
    )
    assert _uncontained(boxes, 0.8).tolist() == [True, False, True]
    assert _uncontained(boxes, 1.0).tolist() == [True, True, True]


def test_whole_frame_run_adds_a_person_too_large_for_one_tile() -> None:
    inner = NanoDetDetector(MODELS_DIR / "nanodet_g.onnx", (416, 416), 0.4, threads=1)
    photo = cv2.imread(str(ROOT / "tests" / "data" / "astronaut.jpg"))
    # One person filling the frame: each 416 tile sees only part of her.
    frame = np.ascontiguousarray(cv2.resize(photo[:, :, ::-1], (736, 416)))
    tiles_only = TiledDetector(inner, (736, 416), 2, 1).detect(frame)
    with_whole = TiledDetector(inner, (736, 416), 2, 1, whole=True).detect(frame)
    tallest = float((with_whole.xyxy[:, 3] - with_whole.xyxy[:, 1]).max())
    assert tallest > 300
    assert len(tiles_only) == 0 or (tiles_only.xyxy[:, 3] - tiles_only.xyxy[:, 1]).max() <= tallest
    inner.close()


def test_letterbox_fits_and_centres_as_videoscale_add_borders() -> None:
    wide = np.full((720, 1280, 3), 200, np.uint8)
    frame, (scale, dx, dy) = letterbox(wide, (640, 352))
    assert frame.shape == (352, 640, 3)
    assert (scale, dx, dy) == (352 / 720, 7, 0)  # 626 px of picture, 7 px each side
    assert (frame[:, :7] == 0).all() and (frame[:, 633:] == 0).all()
    assert (frame[:, 7:633] == 200).all()
    tall = np.full((144, 176, 3), 50, np.uint8)
    frame, (scale, dx, dy) = letterbox(tall, (640, 352), area=True)
    assert (dx, dy) == (105, 0) and (frame[:, 105:535] == 50).all()


def test_boxes_found_in_a_letterboxed_frame_map_back_to_the_source() -> None:
    source = np.zeros((144, 176, 3), np.uint8)  # pillarboxed into 640x352
    _frame, fit = letterbox(source, (640, 352))
    scale, dx, dy = fit
    in_source = np.array([[10, 20, 60, 100], [0, 0, 176, 144]], np.float32)
    in_frame = in_source * scale + np.array([dx, dy, dx, dy], np.float32)
    back = from_letterbox(Detections(in_frame, np.array([0.9, 0.8], np.float32)), fit)
    np.testing.assert_allclose(back.xyxy, in_source, atol=1e-3)
    np.testing.assert_array_equal(back.confidence, np.array([0.9, 0.8], np.float32))
