"""Zones, lines and privacy through the whole device: ``edgecam run`` with real workers, a
real Mosquitto, the RTSP stream and a saved clip."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from edgecam.device.broker import LocalBroker
from edgecam.device.demo_live import demo_config
from edgecam.device.harness import Device

pytestmark = pytest.mark.timeout(300)

MASK = [[0.0, 0.0], [0.3, 0.0], [0.3, 0.25], [0.0, 0.25]]  # top-left: the buildings
MASK_RGB = (255, 0, 255)
WALKWAY = {"start": [0.45, 0.26], "end": [0.45, 0.69]}  # see tests/test_zones.py


def _mask_pixels(rgb: np.ndarray) -> np.ndarray:
    """The inside of MASK, 4 px in from its edges (chroma is shared by 2x2 pixels)."""
    h, w = rgb.shape[:2]
    return rgb[4 : int(0.25 * h) - 4, 4 : int(0.3 * w) - 4].reshape(-1, 3).astype(np.int64)


def _assert_masked(rgb: np.ndarray, where: str) -> None:
    inside = _mask_pixels(rgb)
    # The colour goes through RGB -> YUV -> RGB with whichever matrix each end picks.
    assert np.abs(inside - MASK_RGB).max() <= 32, f"{where}: mask not the mask colour"
    assert inside.std(axis=0).max() < 2.0, f"{where}: mask not uniform"


def _rtsp_rgb(url: str, count: int, timeout: float = 20.0) -> list[np.ndarray]:
    """``count`` decoded RGB frames of an RTSP stream."""
    import time

    from edgecam.media.gst import Gst, init

    init()
    pipe = Gst.parse_launch(
        "rtspsrc name=src latency=100 protocols=tcp ! rtph264depay ! h264parse ! avdec_h264 "
        "! videoconvert ! video/x-raw,format=RGB ! appsink name=sink sync=false"
    )
    pipe.get_by_name("src").set_property("location", url)
    sink = pipe.get_by_name("sink")
    pipe.set_state(Gst.State.PLAYING)
    frames: list[np.ndarray] = []
    end = time.monotonic() + timeout
    try:
        while len(frames) < count and time.monotonic() < end:
            sample = sink.try_pull_sample(Gst.SECOND)
            if sample is None:
                continue
            s = sample.get_caps().get_structure(0)
            w, h = s.get_value("width"), s.get_value("height")
            buf = sample.get_buffer()
            ok, info = buf.map(Gst.MapFlags.READ)
            assert ok
            try:
                stride = len(info.data) // h
                data = np.frombuffer(info.data, dtype=np.uint8).reshape(h, stride)
                frames.append(data[:, : w * 3].reshape(h, w, 3).copy())
            finally:
                buf.unmap(info)
    finally:
        pipe.set_state(Gst.State.NULL)
    return frames


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = tmp_path_factory.mktemp("zones-device")
    with LocalBroker(folder / "broker", ["zonecam"]) as broker:
        config = demo_config(folder, broker, token="zones-test-token", device="zonecam")
        config["cameras"][0].update(
            privacy={"masks": [MASK], "colour": list(MASK_RGB)},
            zones={"plaza": [[0.3, 0.3], [0.7, 0.3], [0.75, 0.95], [0.25, 0.95]]},
            lines={"walkway": WALKWAY},
        )
        config["stats"] = {"interval_s": 3}
        config["alerts"] = {
            "occupancy": {"enabled": False},
            "line_crossing": {"forbidden": {"walkway": "out"}, "clear_s": 2},
        }
        dev = Device(folder, config, broker)
        dev.start()
        try:
            dev.wait_running()
            yield dev
        finally:
            code = dev.stop()
            dev.listener.close()
            assert code == 0, dev.log()[-3000:]


def test_stats_carry_zones_and_lines(device: Device) -> None:
    stats = device.listener.wait(
        "stats with a line crossing",
        lambda k, d: k == "stats" and sum(d.get("lines", {}).get("walkway", {}).values()) > 0,
        60,
    )
    assert set(stats["lines"]["walkway"]) == {"in", "out"}
    zone = stats["zones"]["plaza"]
    assert set(zone) == {"occupancy_peak", "entries", "exits", "dwell_median_s", "dwell_max_s"}


def test_a_crossing_in_the_forbidden_direction_raises_an_alert(device: Device) -> None:
    alert = device.listener.wait(
        "a line_crossing alert",
        lambda k, d: k == "alerts" and d["rule"] == "line_crossing" and d["state"] == "raised",
        60,
    )
    assert "walkway" in alert["message"] and "(out)" in alert["message"]


def test_rtsp_and_clip_frames_are_masked(device: Device) -> None:
    port = device.config["streaming"]["port"]
    frames = _rtsp_rgb(f"rtsp://127.0.0.1:{port}/main", count=20)
    assert len(frames) == 20
    for k, rgb in enumerate(frames):
        _assert_masked(rgb, f"RTSP frame {k}")
    mark = device.listener.mark()
    result = device.command("save_clip", camera="main", reason="privacy", pre=2, post=1)
    assert result["ok"]
    job = result["data"]["job"]
    # An alert's clip being recorded may take this request in: match the request, not a reason.
    clip = device.listener.wait(
        "the clip", lambda k, d: k == "clips" and job in d["request_ids"], 60, after=mark
    )
    capture = cv2.VideoCapture(clip["path"])
    count = 0
    while True:
        ok, bgr = capture.read()
        if not ok:
            break
        _assert_masked(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), f"clip frame {count}")
        count += 1
    assert count >= 20
    assert Path(clip["path"]).is_file()
