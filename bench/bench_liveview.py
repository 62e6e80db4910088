"""Glass-to-glass latency of the live view in headless Chromium, and the device CPU a viewer.

Chain (all on loopback, one machine):

    Python frame source -> appsrc -> x264enc tune=zerolatency (constrained baseline)
      -> rtph264pay -> udpsink
      -> device subprocess (this script with --serve): the real LiveView + live_routes under
         uvicorn
      -> Debian's chromium, headless, the real /live/CAMERA page (WebRTC or MSE forced)

Every raw frame carries the wall-clock time (milliseconds, 40 bits) it is pushed into appsrc,
as a barcode of 16x16 black/white luma blocks with the inverted bits in a second row as a
check. In the page, a requestVideoFrameCallback draws each presented frame onto a canvas,
reads the barcode and takes latency = Date.now() - stamp (same machine, same clock).

Device CPU is the device subprocess's utime + stime over the window, as a share of one core:
once with no viewer (the base cost of a started live view: RTP in, depayload, parse), then
with N viewers; a viewer's cost is (with N - base) / N. The browser's decoding is not in it.

    .venv/bin/python bench/bench_liveview.py [--seconds 10] [--viewers 1,4] [--modes webrtc,mse]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine_note, percentile, table, verdict
from _stamps import BITS, BLOCK, stamped_frames

from edgecam.media.gst import Gst, init

TOKEN = "bench-token"
TARGET_MS = {"webrtc": 200.0, "mse": 1000.0}
TARGET_CPU_PER_VIEWER = 2.0
HEADERS = (
    "mode", "viewers", "frames", "bad", "p50 ms", "p95 ms", "max ms", "device CPU", "per viewer"
)  # fmt: skip

# Runs in the page for every presented frame: the barcode's bits, checked against the
# inverted row (arithmetic, not bit operators: the stamp has 40 bits).
_MEASURE_JS = """
([bits, block]) => {
  const video = document.getElementById('video');
  const canvas = document.createElement('canvas');
  canvas.width = bits * block; canvas.height = 2 * block;
  const ctx = canvas.getContext('2d', { willReadFrequently: true });
  window.latencies = []; window.unreadable = 0;
  window.edgecamLive.onFrame = () => {
    const now = Date.now();
    ctx.drawImage(video, 0, 0, canvas.width, canvas.height,
                  0, 0, canvas.width, canvas.height);
    const px = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
    const c = block / 2;
    let stamp = 0;
    for (let i = 0; i < bits; i++) {
      const x = i * block + c;
      const bit = px[(c * canvas.width + x) * 4] > 128;
      const inv = px[((block + c) * canvas.width + x) * 4] > 128;
      if (bit === inv) { window.unreadable += 1; return; }
      if (bit) stamp += 2 ** i;
    }
    const latency = (now % 2 ** bits) - stamp;
    if (window.recording) window.latencies.push(latency);
  };
}
"""


class Sender:
    """Raw frames from Python, stamped at push time, x264 zerolatency, RTP over UDP."""

    def __init__(self, port: int, width: int, height: int, fps: int) -> None:
        self.width, self.height, self.fps = width, height, fps
        self.pipeline = Gst.parse_launch(
            "appsrc name=src is-live=true format=time do-timestamp=true "
            f"caps=video/x-raw,format=I420,width={width},height={height},framerate={fps}/1 "
            f"! x264enc tune=zerolatency speed-preset=ultrafast key-int-max={fps} bitrate=2500 "
            "! video/x-h264,profile=constrained-baseline ! h264parse config-interval=-1 "
            f"! rtph264pay config-interval=0 pt=96 ! udpsink host=127.0.0.1 port={port} "
            "sync=false"
        )
        self.src = self.pipeline.get_by_name("src")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sender", daemon=True)

    def start(self) -> None:
        self.pipeline.set_state(Gst.State.PLAYING)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.pipeline.set_state(Gst.State.NULL)

    def _run(self) -> None:
        # Wall-clock milliseconds: the page compares them with the browser's Date.now().
        def now_ms() -> int:
            return time.time_ns() // 1_000_000

        for data in stamped_frames(self.width, self.height, self.fps, self._stop, now_ms):
            self.src.emit("push-buffer", Gst.Buffer.new_wrapped(data))


def serve(http_port: int, rtp_port: int) -> int:
    """The device side: a LiveView and its routes under uvicorn, until SIGTERM."""
    import uvicorn
    from starlette.applications import Starlette

    from edgecam.config import Settings
    from edgecam.device.liveview_http import live_routes
    from edgecam.media.liveview import LiveView

    settings = Settings(
        fileserver={"token": TOKEN}, live={"max_viewers": 32, "max_viewers_per_client": 32}
    )
    view = LiveView(settings.live, camera="main", rtp_port=rtp_port)
    app = Starlette(routes=live_routes(settings, {"main": view}))
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=http_port, log_config=None, access_log=False)
    )
    with view:
        server.run()
    return 0


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_share(pid: int, seconds: float) -> float:
    cpu0, t0 = _cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return 100.0 * (_cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)


def _phase(browser: object, url: str, mode: str, viewers: int, pid: int, seconds: float) -> dict:
    pages = []
    for _ in range(viewers):
        page = browser.new_page()  # type: ignore[attr-defined]
        page.goto(f"{url}&mode={mode}")
        pages.append(page)
    probe = pages[0]
    try:
        for page in pages:
            page.wait_for_function("() => window.edgecamLive.frames > 30", timeout=30000)
        probe.evaluate(_MEASURE_JS, [BITS, BLOCK])
        time.sleep(2.0)  # settle at the live edge
        probe.evaluate("() => { window.recording = true; }")
        cpu = _cpu_share(pid, seconds)
        probe.evaluate("() => { window.recording = false; }")
        lat = probe.evaluate("() => window.latencies")
        bad = probe.evaluate("() => window.unreadable")
        modes = {p.evaluate("() => window.edgecamLive.mode") for p in pages}
    finally:
        for page in pages:
            page.close()
    if modes != {mode}:
        raise SystemExit(f"pages ended up in {modes}, not {mode}")
    return {
        "frames": len(lat),
        "bad": bad,
        "p50": percentile(lat, 50),
        "p95": percentile(lat, 95),
        "max": max(lat) if lat else float("nan"),
        "cpu": cpu,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring window a phase")
    parser.add_argument("--viewers", default="1,4", help="viewer counts, comma-separated")
    parser.add_argument("--modes", default="webrtc,mse", help="webrtc and/or mse")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument(
        "--serve", nargs=2, type=int, metavar=("HTTP", "RTP"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.serve:
        return serve(*args.serve)
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("Debian's chromium is needed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    from edgecam.config import Settings
    from edgecam.device.liveview_http import live_path

    init()
    http_port, rtp_port = _free_port(socket.SOCK_STREAM), _free_port(socket.SOCK_DGRAM)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *sys.path])}
    env.pop("EDGECAM_CONFIG", None)
    device = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(http_port), str(rtp_port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", http_port), timeout=1).close()
            break
        except ConnectionRefusedError:
            if device.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the device side did not start") from None
            time.sleep(0.1)
    settings = Settings(fileserver={"token": TOKEN})
    url = f"http://127.0.0.1:{http_port}{live_path(settings, 'main')}"
    sender = Sender(rtp_port, args.width, args.height, args.fps)
    sender.start()
    print(
        f"{machine_note()}\n{args.width}x{args.height}@{args.fps} x264 ultrafast zerolatency "
        f"constrained baseline 2.5 Mbit/s, sender udpsink sync=false, {args.seconds:.0f} s a "
        "phase, headless chromium"
    )
    rows: list[list[object]] = []
    checks: list[tuple[str, bool]] = []
    try:
        time.sleep(2.0)
        base = _cpu_share(device.pid, args.seconds)
        rows.append(["-", 0, "", "", "", "", "", f"{base:.1f}%", ""])
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=chromium,
                headless=True,
                args=["--autoplay-policy=no-user-gesture-required"],
            )
            for mode in args.modes.split(","):
                for n in (int(v) for v in args.viewers.split(",")):
                    r = _phase(browser, url, mode, n, device.pid, args.seconds)
                    per = (r["cpu"] - base) / n
                    rows.append(
                        [mode, n, r["frames"], r["bad"], r["p50"], r["p95"], r["max"],
                         f"{r['cpu']:.1f}%", f"{per:.2f}%"]
                    )  # fmt: skip
                    print(table(HEADERS, rows[-1:]), flush=True)
                    if n == 1:
                        checks.append(
                            (f"{mode} p50 < {TARGET_MS[mode]:.0f} ms", r["p50"] < TARGET_MS[mode])
                        )
                    checks.append(
                        (f"{mode} x{n} CPU/viewer < {TARGET_CPU_PER_VIEWER}% of a core",
                         per < TARGET_CPU_PER_VIEWER)
                    )  # fmt: skip
            browser.close()
    finally:
        sender.stop()
        device.send_signal(signal.SIGTERM)
        try:
            device.wait(10)
        except subprocess.TimeoutExpired:
            device.kill()
    print()
    print(table(HEADERS, rows))
    print("device CPU: share of one core, process utime+stime; per viewer: (CPU - idle) / N")
    for name, ok in checks:
        print(f"  {name}: {verdict(ok)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
