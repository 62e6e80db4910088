"""Writes edgecam's media-backend probes and launch lines, as its code builds them, for
gst-launch-1.0 on the GPU benchmark machine (see pack.sh): one file each in DIR.

The launch lines are those of ``edgecam process CLIP --out OUT`` with the mask profile's
detector branch, made runnable without Python: decodebin linked in the line (the pipeline
links its pad when it appears), the detector's appsink replaced by a fakesink (nothing
pulls from it there) and the drawing element left as its ``identity`` placeholder.
"""

from __future__ import annotations

import sys
from pathlib import Path

from edgecam.config import load_settings
from edgecam.media.backends import BACKENDS, ENCODERS
from edgecam.media.launch import describe

CLIP = "media/faces_720p30_15s.mp4"


def runnable(description: str, out: str) -> str:
    line = description.replace("decodebin name=dec ", "decodebin name=dec ! ")
    line = line.replace("filesrc name=src", f"filesrc name=src location={CLIP}")
    line = line.replace("filesink name=file_sink", f"filesink name=file_sink location={out}")
    head, _, tail = line.partition("appsink name=infer_sink ")
    if tail:
        line = (
            head + "fakesink name=infer_sink sync=false async=false" + tail[tail.index(" t. !") :]
        )
    return line


def main() -> None:
    out = Path(sys.argv[1])
    for name in ("nvidia", "nvdec"):
        (out / f"probe_{name}.txt").write_text(BACKENDS[name].probe or "")
    (out / "probe_nvh264enc.txt").write_text(ENCODERS["nvh264"].probe or "")
    settings = load_settings(**{"cameras": [{"name": "cam", "source": CLIP}]})
    for name in ("nvidia", "nvdec", "cpu"):
        for encoder in ("x264", "nvh264") if name == "nvidia" else ("x264",):
            s = settings.model_copy(
                update={"encoder": settings.encoder.model_copy(update={"element": encoder})}
            )
            layout = describe(
                s, 0, "offline", infer_size=(640, 352), analytics=True,
                out_file=Path("/tmp/out.mp4"), backend=BACKENDS[name],
            )  # fmt: skip
            path = out / f"line_{name}_{encoder}.txt"
            path.write_text(runnable(layout.description, f"/tmp/out_{name}_{encoder}.mp4"))


if __name__ == "__main__":
    main()
