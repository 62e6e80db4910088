"""Glass-to-decoded latency through the streaming worker, and the worker's CPU cost.

Chain (all on loopback, one machine):

    Python frame source -> appsrc -> x264enc tune=zerolatency -> rtph264pay -> udpsink
      -> `edgecam worker streaming` (a subprocess: the real StreamingServer)
      -> rtspsrc latency=L -> rtph264depay -> avdec_h264 -> appsink sync=false

Every raw frame carries its send time (CLOCK_MONOTONIC, microseconds, 40 bits) as a barcode
of 16x16 black/white luma blocks, written just before the frame is pushed into appsrc, with
the inverted bits in a second row as a check. The measuring client reads the barcode from
the decoded frame the moment appsink hands it over: latency = receive time - stamp. The
appsink does not sync to the clock, so this is time to decoded frame, not to display.

The worker's CPU is its process CPU time (utime + stime from /proc/PID/stat) over the
measuring window, as a share of one core. With N clients, one decodes and measures and the
others only receive (rtspsrc -> fakesink), so the bench process's own decoding does not grow
with N.

With ``--camera-to-viewer`` the chain is the whole device instead:

    Python frame source -> appsrc -> x264enc -> an RTSP camera (GstRtspServer, in the bench)
      -> `edgecam worker inference` (a subprocess: rtspsrc with the camera's configured
         jitter buffer, decode, detector, tracker, overlay, x264, RTP)
      -> `edgecam worker streaming` -> rtspsrc latency=L -> avdec_h264 -> appsink

with the stamp in the bottom rows (the overlay writes the counts in the top-left corner).

    .venv/bin/python bench/bench_latency.py [--seconds 15] [--clients 1,4]
    .venv/bin/python bench/bench_latency.py --camera-to-viewer [--camera-latency 200]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import gi

from edgecam.media.gst import RTP_CAPS, GLib, Gst, GstVideo, init

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stamps import BITS, BLOCK, STAMP_MASK, read_stamp, stamped_frames

gi.require_version("GstRtspServer", "1.0")
from gi.repository import GstRtspServer

RUNTIME = Path(tempfile.gettempdir()) / f"edgecam-bench-latency-{os.getpid()}"


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _now_us() -> int:
    return time.monotonic_ns() // 1000


class Sender:
    """Raw frames from Python, stamped at push time, x264 zerolatency, RTP over UDP."""

    def __init__(self, port: int, width: int, height: int, fps: int, sync: bool) -> None:
        self.width, self.height, self.fps = width, height, fps
        self.pipeline = Gst.parse_launch(
            # A live camera reports one frame of latency; with sync=true udpsink waits it.
            "appsrc name=src is-live=true format=time do-timestamp=true "
            f"min-latency={Gst.SECOND // fps} "
            f"caps=video/x-raw,format=I420,width={width},height={height},framerate={fps}/1 "
            f"! x264enc tune=zerolatency speed-preset=ultrafast key-int-max={fps} "
            "bitrate=2500 ! rtph264pay config-interval=-1 pt=96 "
            f"! udpsink host=127.0.0.1 port={port} sync={str(sync).lower()}"
        )
        self.src = self.pipeline.get_by_name("src")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sender", daemon=True)
        self.sent = 0

    def start(self) -> None:
        self.pipeline.set_state(Gst.State.PLAYING)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.pipeline.set_state(Gst.State.NULL)

    def _run(self) -> None:
        for data in stamped_frames(self.width, self.height, self.fps, self._stop, _now_us):
            self.src.emit("push-buffer", Gst.Buffer.new_wrapped(data))
            self.sent += 1


class RtspCamera:
    """A stand-in IP camera: stamped raw frames (stamp in the bottom rows), x264, served by
    an RTSP server in this process at rtsp://127.0.0.1:PORT/cam."""

    def __init__(self, port: int, width: int, height: int, fps: int) -> None:
        self.width, self.height, self.fps = width, height, fps
        self.server = GstRtspServer.RTSPServer()
        self.server.set_address("127.0.0.1")
        self.server.set_service(str(port))
        factory = GstRtspServer.RTSPMediaFactory()
        factory.set_launch(
            "( appsrc name=src is-live=true format=time do-timestamp=true "
            f"min-latency={Gst.SECOND // fps} "
            f"caps=video/x-raw,format=I420,width={width},height={height},framerate={fps}/1 "
            f"! x264enc tune=zerolatency speed-preset=ultrafast key-int-max={fps} "
            "bitrate=2500 ! rtph264pay name=pay0 pt=96 config-interval=-1 )"
        )
        factory.set_shared(True)
        factory.connect("media-configure", self._on_media)
        self.server.get_mount_points().add_factory("/cam", factory)
        self._src: Gst.Element | None = None
        self._loop = GLib.MainLoop()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop.run, name="camera-loop", daemon=True),
            threading.Thread(target=self._push, name="camera", daemon=True),
        ]

    def _on_media(self, _factory: object, media: GstRtspServer.RTSPMedia) -> None:
        self._src = media.get_element().get_by_name("src")

    def start(self) -> None:
        if self.server.attach(None) == 0:
            raise SystemExit("the RTSP camera cannot listen")
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        self._loop.quit()

    def _push(self) -> None:
        frames = stamped_frames(self.width, self.height, self.fps, self._stop, _now_us, bottom=True)
        for data in frames:
            src = self._src
            if src is not None:  # no client yet: the camera's media is not made
                src.emit("push-buffer", Gst.Buffer.new_wrapped(data))


@dataclass
class Receiver:
    """A client: decodes and reads the stamp (measure=True), or only receives.

    ``source`` is a launch fragment that yields RTP: an rtspsrc, or for the baseline a
    udpsrc taking the sender's packets directly.
    """

    source: str
    measure: bool
    bottom: bool = False  # the stamp is in the bottom rows of the picture
    latencies_ms: list[float] = field(default_factory=list)
    unreadable: int = 0
    recording: bool = False

    def __post_init__(self) -> None:
        tail = (
            "rtph264depay ! avdec_h264 ! appsink name=sink sync=false emit-signals=true "
            "max-buffers=2 drop=true"
            if self.measure
            else "fakesink sync=false"
        )
        self.pipeline = Gst.parse_launch(f"{self.source} ! {tail}")
        if self.measure:
            self.pipeline.get_by_name("sink").connect("new-sample", self._on_sample)

    def _on_sample(self, sink: Gst.Element) -> Gst.FlowReturn:
        now = _now_us()
        sample = sink.emit("pull-sample")
        if not self.recording:
            return Gst.FlowReturn.OK
        info = GstVideo.VideoInfo.new_from_caps(sample.get_caps())
        buf = sample.get_buffer()
        ok, mapinfo = buf.map(Gst.MapFlags.READ)
        if not ok:
            return Gst.FlowReturn.ERROR
        try:
            stride = info.stride[0]
            rows = 2 * BLOCK
            first = info.height - rows if self.bottom else 0
            y = np.frombuffer(
                mapinfo.data, dtype=np.uint8, count=stride * rows, offset=stride * first
            )
            stamp = read_stamp(y.reshape(rows, stride))
        finally:
            buf.unmap(mapinfo)
        if stamp is None:
            self.unreadable += 1
        else:
            self.latencies_ms.append(((now & STAMP_MASK) - stamp) % (1 << BITS) / 1000.0)
        return Gst.FlowReturn.OK

    def start(self) -> None:
        self.pipeline.set_state(Gst.State.PLAYING)

    def stop(self) -> None:
        self.pipeline.set_state(Gst.State.NULL)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def _worker_env(rtsp_port: int, camera: dict[str, object]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGECAM_")}
    env |= {
        "EDGECAM_STREAMING__HOST": "127.0.0.1",
        "EDGECAM_STREAMING__PORT": str(rtsp_port),
        "EDGECAM_CAMERAS": json.dumps([{"name": "main", **camera}]),
        "EDGECAM_RECORDER__RING_DIR": str(RUNTIME),
        "PYTHONPATH": str(ROOT / "src"),
    }
    return env


def _start_worker(
    rtsp_port: int, rtp_port: int, camera: dict[str, object] | None = None
) -> subprocess.Popen[bytes]:
    env = _worker_env(rtsp_port, {"rtp_port": rtp_port, **(camera or {})})
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgecam.cli", "worker", "streaming"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", rtsp_port), timeout=1).close()
            return proc
        except ConnectionRefusedError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the streaming worker did not start") from None
            time.sleep(0.1)


def _rtsp(url: str, protocols: str, latency_ms: int) -> str:
    return f"rtspsrc location={url} latency={latency_ms} protocols={protocols}"


def _phase(sources: list[str], pid: int, seconds: float, bottom: bool = False) -> dict[str, float]:
    clients = [Receiver(src, measure=(i == 0), bottom=bottom) for i, src in enumerate(sources)]
    for c in clients:
        c.start()
    time.sleep(3.0)  # connect, first keyframe, settle
    probe = clients[0]
    probe.recording = True
    cpu0, t0 = _cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    cpu1, t1 = _cpu_seconds(pid), time.monotonic()
    probe.recording = False
    for c in clients:
        c.stop()
    lat = np.array(probe.latencies_ms)
    if lat.size == 0:
        raise SystemExit(f"no stamped frame decoded ({probe.unreadable} unreadable)")
    return {
        "frames": float(lat.size),
        "unreadable": float(probe.unreadable),
        "p50": float(np.percentile(lat, 50)),
        "p95": float(np.percentile(lat, 95)),
        "max": float(lat.max()),
        "cpu": 100.0 * (cpu1 - cpu0) / (t1 - t0),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="measuring window a phase")
    parser.add_argument("--clients", default="1,4", help="client counts, comma-separated")
    parser.add_argument("--protocols", default="tcp,udp", help="RTSP transports to try")
    parser.add_argument("--client-latency", type=int, default=0, help="rtspsrc latency (ms)")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument(
        "--sender-sync",
        choices=["true", "false", "both"],
        default="both",
        help="udpsink sync of the sending pipeline",
    )
    parser.add_argument(
        "--camera-to-viewer",
        action="store_true",
        help="the whole device: an RTSP camera, the inference worker, the streaming worker",
    )
    parser.add_argument(
        "--camera-latency",
        type=int,
        default=200,
        help="the inference worker's rtspsrc jitter buffer (cameras[].rtsp_latency_ms)",
    )
    args = parser.parse_args()
    init()
    if args.camera_to_viewer:
        try:
            return camera_to_viewer(args)
        finally:
            shutil.rmtree(RUNTIME, ignore_errors=True)

    counts = [int(n) for n in args.clients.split(",")]
    protocols = args.protocols.split(",")
    syncs = [True, False] if args.sender_sync == "both" else [args.sender_sync == "true"]
    print(
        f"{args.width}x{args.height}@{args.fps} x264 ultrafast zerolatency 2.5 Mbit/s, "
        f"rtspsrc latency={args.client_latency}, {args.seconds:.0f} s a phase, "
        f"{os.cpu_count()} CPUs"
    )
    print(
        f"{'sender sync':>11} {'transport':>9} {'clients':>7} {'frames':>6} {'bad':>4} "
        f"{'p50 ms':>7} {'p95 ms':>7} {'max ms':>7} {'worker CPU':>10}"
    )
    for sync in syncs:
        rtp_port, rtsp_port = _free_port(socket.SOCK_DGRAM), _free_port(socket.SOCK_STREAM)
        worker = _start_worker(rtsp_port, rtp_port)
        sender = Sender(rtp_port, args.width, args.height, args.fps, sync)
        sender.start()
        try:
            idle0, ti = _cpu_seconds(worker.pid), time.monotonic()
            time.sleep(3.0)
            idle = 100.0 * (_cpu_seconds(worker.pid) - idle0) / (time.monotonic() - ti)
            print(
                f"{sync!s:>11} {'-':>9} {0:>7} {'':>6} {'':>4} {'':>7} {'':>7} {'':>7} "
                f"{idle:>9.1f}%"
            )
            # Baseline without the worker: the client takes the sender's UDP directly (the
            # worker binds the port only while it has clients).
            direct = f'udpsrc address=127.0.0.1 port={rtp_port} caps="{RTP_CAPS}"'
            phases = [("direct", [direct])]
            url = f"rtsp://127.0.0.1:{rtsp_port}/main"
            for proto in protocols:
                for n in counts:
                    phases.append((proto, [_rtsp(url, proto, args.client_latency)] * n))
            for transport, sources in phases:
                r = _phase(sources, worker.pid, args.seconds)
                print(
                    f"{sync!s:>11} {transport:>9} {len(sources):>7} {r['frames']:>6.0f} "
                    f"{r['unreadable']:>4.0f} {r['p50']:>7.1f} {r['p95']:>7.1f} "
                    f"{r['max']:>7.1f} {r['cpu']:>9.1f}%",
                    flush=True,
                )
        finally:
            sender.stop()
            worker.send_signal(signal.SIGTERM)
            worker.wait(10)
    print("worker CPU: share of one core, process utime+stime over the window")
    return 0


def camera_to_viewer(args: argparse.Namespace) -> int:
    """Camera -> inference worker -> streaming worker -> client, stamps end to end."""
    camera_port, rtsp_port = _free_port(socket.SOCK_STREAM), _free_port(socket.SOCK_STREAM)
    rtp_port = _free_port(socket.SOCK_DGRAM)
    cam = {
        "source": f"rtsp://127.0.0.1:{camera_port}/cam",
        "rtp_port": rtp_port,
        "rtsp_latency_ms": args.camera_latency,
    }
    print(
        f"camera {args.width}x{args.height}@{args.fps} -> inference worker (profile mask, "
        f"rtspsrc latency={args.camera_latency}) -> streaming worker -> client rtspsrc "
        f"latency={args.client_latency}; {args.seconds:.0f} s a phase, {os.cpu_count()} CPUs"
    )
    camera = RtspCamera(camera_port, args.width, args.height, args.fps)
    camera.start()
    env = _worker_env(rtsp_port, cam)
    inference = subprocess.Popen(
        [sys.executable, "-m", "edgecam.cli", "worker", "inference"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    streaming = _start_worker(rtsp_port, rtp_port, cam)
    try:
        time.sleep(5.0)  # models loaded, the camera connected, frames flowing
        if inference.poll() is not None:
            raise SystemExit("the inference worker exited")
        print(
            f"{'transport':>9} {'clients':>7} {'frames':>6} {'bad':>4} {'p50 ms':>7} "
            f"{'p95 ms':>7} {'max ms':>7} {'inference CPU':>13}"
        )
        url = f"rtsp://127.0.0.1:{rtsp_port}/main"
        for proto in args.protocols.split(","):
            for n in (int(c) for c in args.clients.split(",")):
                sources = [_rtsp(url, proto, args.client_latency)] * n
                r = _phase(sources, inference.pid, args.seconds, bottom=True)
                print(
                    f"{proto:>9} {n:>7} {r['frames']:>6.0f} {r['unreadable']:>4.0f} "
                    f"{r['p50']:>7.1f} {r['p95']:>7.1f} {r['max']:>7.1f} {r['cpu']:>12.1f}%",
                    flush=True,
                )
    finally:
        for proc in (streaming, inference):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        camera.stop()
    print("inference CPU: share of one core, process utime+stime over the window")
    return 0


if __name__ == "__main__":
    sys.exit(main())
