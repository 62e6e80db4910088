"""Framework overhead: edgecam's offline pipeline vs bare GStreamer on the same clip.

Every configuration decodes the 720p30 clip and encodes it with x264 (ultrafast, zerolatency,
2500 kbit/s, a keyframe a second) into MP4 as fast as the machine allows:

* ``bare``: ``filesrc ! decodebin ! videoconvert ! x264enc ! h264parse ! mp4mux ! filesink``
  through ``Gst.parse_launch`` in this process;
* ``bare + queue``: the same with ``queue`` after decodebin (decode and encode on two
  threads, as in edgecam's ``tee ! queue``), to show where a ratio above 1 comes from;
* ``detect-fps 0``: ``process_file`` (what ``edgecam process --detect-fps 0`` runs);
* ``synthetic 20, <element>``: ``process_file`` with ``SyntheticDetector(20)`` at 10
  detections a second, so the tracker carries and the overlay draws 20 tracked boxes a frame,
  with each overlay element: direct (the default), overlaycomposition, cairooverlay, and
  with the overlay off (``nothing drawn``: detection, tracker and votes only), so that the
  drawing's own cost is the difference.

Rounds are interleaved (the order rotates each round) and each configuration keeps its best
and median time, because the 2-core machine is shared. Ratios are fps / bare fps.

    .venv/bin/python bench/bench_overhead.py [CLIP] [--rounds 3] [--seconds S] [--cli]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c

from edgecam.config import load_settings
from edgecam.media.gst import Gst, init
from edgecam.media.offline import process_file
from edgecam.vision.synthetic import SyntheticDetector

X264 = "x264enc speed-preset=ultrafast tune=zerolatency bitrate=2500 key-int-max=30"
BARE = (
    f"filesrc name=src ! decodebin ! videoconvert ! {X264} ! h264parse ! mp4mux ! "
    "filesink name=sink"
)
# The same with a queue between decoding and encoding, as edgecam's ``tee ! queue`` has:
# decoding and encoding then run on two threads (on 2 cores, that is most of the difference).
BARE_QUEUE = BARE.replace("decodebin ! videoconvert", "decodebin ! queue ! videoconvert")
TARGET = 0.8
TARGET_DRAWN = 0.9  # drawing 20 tracked boxes keeps 90 % of the speed with nothing drawn


def run_bare(clip: Path, out: Path, description: str = BARE) -> float:
    """Seconds for a bare pipeline, from building it to EOS."""
    init()
    t0 = time.perf_counter()
    pipeline = Gst.parse_launch(description)
    pipeline.get_by_name("src").set_property("location", str(clip))
    pipeline.get_by_name("sink").set_property("location", str(out))
    pipeline.set_state(Gst.State.PLAYING)
    msg = pipeline.get_bus().timed_pop_filtered(
        Gst.CLOCK_TIME_NONE, Gst.MessageType.EOS | Gst.MessageType.ERROR
    )
    pipeline.set_state(Gst.State.NULL)
    seconds = time.perf_counter() - t0
    if msg.type == Gst.MessageType.ERROR:
        raise SystemExit(f"bare pipeline failed: {msg.parse_error()[0].message}")
    return seconds


def run_edgecam(clip: Path, out: Path, detect_fps: float, element: str | None) -> float:
    """``element`` None: the default; "off": nothing drawn (the tracker still runs)."""
    overrides: dict[str, object] = {"vision.detect_fps": detect_fps}
    if element == "off":
        overrides["overlay.enabled"] = False
    elif element is not None:
        overrides["overlay.element"] = element
    settings = load_settings(**overrides)
    detector = SyntheticDetector(20) if detect_fps > 0 else None
    t0 = time.perf_counter()
    process_file(settings, clip, out, progress=False, detector=detector)
    return time.perf_counter() - t0


def run_subprocess(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("clip", nargs="?", type=Path, default=c.default_clip())
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (best of N)")
    parser.add_argument("--seconds", type=float, help="use only the clip's first S seconds")
    parser.add_argument(
        "--cli",
        action="store_true",
        help="also time gst-launch-1.0 and the `edgecam process` command (with startup)",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="edgecam-bench-") as tmp:
        work = Path(tmp)
        clip = c.trim(args.clip, args.seconds, work)
        frames = c.count_frames(clip)
        print(f"clip {clip} ({frames} frames); {c.machine_note()}")
        configs: dict[str, Callable[[Path], float]] = {
            "bare GStreamer (parse_launch)": lambda o: run_bare(clip, o),
            "bare + queue after decodebin": lambda o: run_bare(clip, o, BARE_QUEUE),
            "edgecam process --detect-fps 0": lambda o: run_edgecam(clip, o, 0, None),
            "synthetic 20 boxes, direct (default)": lambda o: run_edgecam(clip, o, 10, "direct"),
            "synthetic 20 boxes, nothing drawn": lambda o: run_edgecam(clip, o, 10, "off"),
            "synthetic 20 boxes, overlaycomposition": lambda o: run_edgecam(
                clip, o, 10, "overlaycomposition"
            ),
            "synthetic 20 boxes, cairooverlay": lambda o: run_edgecam(clip, o, 10, "cairooverlay"),
        }
        if args.cli:
            edgecam = str(Path(sys.executable).with_name("edgecam"))
            configs["bare gst-launch-1.0 (subprocess)"] = lambda o: run_subprocess(
                [
                    "gst-launch-1.0",
                    "-q",
                    *BARE.replace("name=src", f"location={clip}")
                    .replace("name=sink", f"location={o}")
                    .split(),
                ]
            )
            configs["`edgecam process --detect-fps 0` (subprocess)"] = lambda o: run_subprocess(
                [edgecam, "process", str(clip), "--out", str(o), "--detect-fps", "0", "--quiet"]
            )
        names = list(configs)
        times: dict[str, list[float]] = {n: [] for n in names}
        out_frames: dict[str, int] = {}
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                out = work / f"out_{names.index(name)}.mp4"
                seconds = configs[name](out)
                times[name].append(seconds)
                out_frames[name] = c.count_frames(out)
                print(f"  round {r + 1}: {name}: {seconds:.2f} s ({frames / seconds:.1f} fps)")

    bare_best = frames / min(times[names[0]])
    bare_median = frames / c.median(times[names[0]])
    rows = []
    for name in names:
        best, med = frames / min(times[name]), frames / c.median(times[name])
        rows.append([name, out_frames[name], best, med, best / bare_best, med / bare_median])
    print()
    print(
        c.table(
            [
                "configuration",
                "frames out",
                "fps (best)",
                "fps (median)",
                "ratio (best)",
                "ratio (median)",
            ],
            rows,
        )
    )
    ratio = rows[2][4]
    print(
        f"\ntarget: detect-fps 0 / bare >= {TARGET}: {ratio:.2f} -> {c.verdict(ratio >= TARGET)}"
        f" (best of {args.rounds}; bare {bare_best:.1f} fps)"
    )
    for row in (rows[3], rows[5], rows[6]):
        drawn = row[4] / ratio
        extra_ms = 1000 / row[2] - 1000 / rows[2][2]
        print(
            f"target: {row[0]} / detect-fps 0 >= {TARGET_DRAWN}: {drawn:.2f} -> "
            f"{c.verdict(drawn >= TARGET_DRAWN)} ({extra_ms:.2f} ms a frame more, best of "
            f"{args.rounds}; median ratio {row[5] / rows[2][5]:.2f})"
        )
    drawing_ms = 1000 / rows[3][2] - 1000 / rows[4][2]
    print(
        f"drawing alone (direct minus nothing drawn, same detections and tracks): "
        f"{drawing_ms:.2f} ms a frame (best of {args.rounds})"
    )
    print(f"finished {c.machine_note()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
