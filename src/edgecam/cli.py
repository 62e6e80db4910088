"""The ``edgecam`` command line: parses arguments, loads the config once, dispatches."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from edgecam.config import CONFIG_ENV, Settings, load_settings, redact_url, settings_to_yaml

# The workers import GStreamer and ONNX Runtime only when one is built, so that
# `edgecam config show` needs neither.
from edgecam.device.workers import WORKERS
from edgecam.errors import EdgecamError, UsageError

log = logging.getLogger("edgecam")

BENCHES: dict[str, str] = {
    "overhead": "bench/bench_overhead.py",
    "python-cost": "bench/bench_python_cost.py",
    "detectors": "bench/bench_detectors.py",
    "live": "bench/bench_live.py",
    "loop": "bench/bench_vs_loop.py",
    "latency": "bench/bench_latency.py",
    "crops": "bench/bench_crops.py",
    "device": "bench/bench_device.py",
    "fleet": "bench/bench_fleet.py",
    "fleet-memory": "bench/bench_fleet_memory.py",
    "liveview": "bench/bench_liveview.py",
    "zones": "bench/bench_zones.py",
    "gpu": "bench/bench_gpu.py",
    "cameras": "bench/bench_cameras.py",
    "faces": "bench/bench_faces.py",
    "accuracy": "bench/bench_accuracy.py",
}


# Exit statuses: a runtime failure, a usage error (as argparse's own).
EXIT_RUNTIME = 1
EXIT_USAGE = 2
MAX_CLIP_SECONDS = 3600.0  # as the save_clip command's own bounds
MAX_REASON_CHARS = 200


def _bounded_float(low: float, high: float, *, low_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in [low, high] (or (low, high])."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
            bracket = "(" if low_open else "["
            raise argparse.ArgumentTypeError(
                f"{text!r} is out of range: give a number in {bracket}{low:g}, {high:g}]"
            )
        return value

    return parse


def _reason(text: str) -> str:
    if not text.strip() or len(text) > MAX_REASON_CHARS:
        raise argparse.ArgumentTypeError(f"give 1 to {MAX_REASON_CHARS} characters")
    return text


def _settings(args: argparse.Namespace, **overrides: object) -> Settings:
    return load_settings(args.config, **{k: v for k, v in overrides.items() if v is not None})


def _cmd_config(args: argparse.Namespace) -> int:
    if args.action == "check":
        settings = load_settings(args.file)
        print(
            f"{args.file}: OK ({len(settings.cameras)} camera(s), profile "
            f"{settings.vision.profile})"
        )
    else:
        sys.stdout.write(settings_to_yaml(_settings(args)))
    return 0


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that ``finally`` blocks clean up."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


# The stop signals a run received. Raising from a signal handler can be lost when the
# handler runs inside a GObject callback (the exception is printed and dropped there), so
# the run also looks here before it keeps its outputs.
_stop_signals: list[int] = []


def _on_stop_signal(signum: int, _frame: FrameType | None) -> None:
    _stop_signals.append(signum)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise _Terminated(signum)


def _no_stop_signal() -> None:
    """Raise for a stop signal received earlier whose exception was lost."""
    if _stop_signals:
        _on_stop_signal(_stop_signals[0], None)


def _cmd_process(args: argparse.Namespace) -> int:
    from edgecam.media.offline import FileJob, process_file, process_files

    inputs = [Path(i) for i in args.input]
    if (args.out is None) == (args.out_dir is None):
        raise UsageError("give --out OUT.mp4 (one input) or --out-dir DIR (any inputs)")
    if args.out is not None and len(inputs) > 1:
        raise UsageError("several inputs write into a folder: give --out-dir DIR, not --out")
    if args.out_dir is not None and args.events:
        raise UsageError("with --out-dir each input's events go to DIR/NAME.jsonl; drop --events")
    settings = _settings(
        args, **{"vision.profile": args.profile, "vision.detect_fps": args.detect_fps}
    )
    # A terminated run leaves no temporary output behind, as an interrupted one.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _on_stop_signal)
    if args.out is not None:
        process_file(
            settings,
            inputs[0],
            Path(args.out),
            events=Path(args.events) if args.events else None,
            progress=not args.quiet,
            before_commit=_no_stop_signal,
        )
        return 0
    folder = Path(args.out_dir)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out-dir {folder} is a file; give a folder")
    jobs = [FileJob(i, folder / f"{i.stem}.mp4", folder / f"{i.stem}.jsonl") for i in inputs]
    process_files(settings, jobs, progress=not args.quiet)
    return 0


def _config_path(args: argparse.Namespace) -> Path | None:
    path = args.config or os.environ.get(CONFIG_ENV)
    return Path(path) if path else None


def _cmd_run(args: argparse.Namespace) -> int:
    from edgecam.device.orchestrator import run_device

    return run_device(_settings(args), _config_path(args))


def _cmd_worker(args: argparse.Namespace) -> int:
    from edgecam.device.runner import run_worker

    return run_worker(WORKERS[args.name], _settings(args), args.camera)


def _ask(
    settings: Settings,
    process: str,
    name: str,
    camera: str | None = None,
    args: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Send one command to a running process of the device; its result's data."""
    from edgecam.device.control import send_command, socket_path
    from edgecam.protocol import Command

    result = send_command(
        socket_path(settings, process, camera), Command(name=name, args=args or {}), timeout=30
    )
    if not result.ok:
        raise EdgecamError(result.error or f"{process} refused {name}")
    return result.data


def _cmd_clip(args: argparse.Namespace) -> int:
    from edgecam.protocol import SaveClipArgs

    settings = _settings(args)
    _, cam = settings.camera(args.camera)
    request = SaveClipArgs(camera=cam.name, reason=args.reason, pre=args.pre, post=args.post)
    job = _ask(settings, "recorder", "save_clip", cam.name, request.model_dump(exclude_none=True))
    post = args.post if args.post is not None else settings.recorder.post_s
    deadline = time.monotonic() + post + settings.recorder.max_clip_s + 60
    print(f"clip job {job['job']} accepted; waiting for the clip ...", file=sys.stderr)
    while time.monotonic() < deadline:
        state = _ask(settings, "recorder", "clip_status", cam.name, {"job": job["job"]})
        if state["state"] == "ready":
            print(json.dumps(state["clip"], indent=2))
            return 0
        if state["state"] == "failed":
            raise EdgecamError(f"the clip could not be saved: {state.get('error')}")
        time.sleep(0.5)
    raise EdgecamError("the clip was not ready in time")


def _cmd_status(args: argparse.Namespace) -> int:
    settings = _settings(args)
    status = _ask(settings, "device", "status")
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(_format_status(status))
    return 0


def _format_status(status: dict[str, Any]) -> str:
    lines = [
        f"device {status['device']}: {status['state']}, edgecam {status.get('version')}, "
        f"profile {status.get('profile')}, cameras {', '.join(status.get('cameras', []))}",
    ]
    broker = status.get("broker")
    lines.append(
        "MQTT: no broker configured"
        if broker is None
        else f"MQTT: {broker}, {status.get('outbox')} message(s) waiting in the outbox, "
        f"{status.get('outbox_dropped')} dropped when it was full"
    )
    lines.append(f"{'worker':<24} {'state':<11} {'pid':>7} {'restarts':>8} {'cpu':>6} {'MB':>7}")
    for w in status.get("workers", []):
        key = w["name"] if w.get("camera") is None else f"{w['name']}/{w['camera']}"
        cpu = "" if w.get("cpu") is None else f"{w['cpu']:.2f}"
        rss = "" if w.get("rss_mb") is None else f"{w['rss_mb']:.0f}"
        pid = "" if w.get("pid") is None else str(w["pid"])
        lines.append(f"{key:<24} {w['state']:<11} {pid:>7} {w['restarts']:>8} {cpu:>6} {rss:>7}")
        if w.get("error") and w["state"] != "running":
            lines.append(f"{'':<24} last error: {w['error']}")
    return "\n".join(lines)


def _cmd_demo(args: argparse.Namespace) -> int:
    from edgecam.demo import run_demo

    return run_demo(args.config, Path(args.out), args.live_seconds)


def _cmd_streaming(args: argparse.Namespace) -> int:
    name = "status" if args.action == "status" else f"streaming_{args.action}"
    print(json.dumps(_ask(_settings(args), "streaming", name), indent=2))
    return 0


def _cmd_broker_config(args: argparse.Namespace) -> int:
    from edgecam.device.broker import write_broker_config

    devices = [d for d in args.devices.split(",") if d]
    written = write_broker_config(
        Path(args.out),
        devices=devices,
        server_user=args.server_user,
        prefix=args.prefix,
        port=args.port,
        host=args.host,
    )
    for path in written:
        print(path)
    return 0


def _cmd_server(args: argparse.Namespace) -> int:
    from edgecam.server.app import server_cli

    return server_cli(_settings(args), args.action, args.name, args.device)


def _cmd_live_url(args: argparse.Namespace) -> int:
    from edgecam.device.liveview_http import live_url

    settings = _settings(args)
    # A link to a page nobody serves would only answer 404.
    if not settings.live.enabled:
        raise EdgecamError("the live view is off (live.enabled: false): there is no page")
    if not settings.fileserver.enabled:
        raise EdgecamError(
            "the live view is served by the file server, which is off (fileserver.enabled)"
        )
    print(live_url(settings, args.camera))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import runpy

    script = Path(__file__).resolve().parents[2] / BENCHES[args.name]
    if not script.is_file():
        raise EdgecamError(f"benchmark script {script} not found (benchmarks run from a clone)")
    sys.argv = [str(script), *args.rest]
    sys.path.insert(0, str(script.parent))  # as `python SCRIPT` does: the benches import _common
    runpy.run_path(str(script), run_name="__main__")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgecam", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="YAML config file (default $EDGECAM_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", parents=[common], help="run the device: every worker, supervised")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("status", parents=[common], help="the running device's state")
    p.add_argument("--json", action="store_true", help="the raw status message")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser(
        "process", parents=[common], help="process video files offline (several: side by side)"
    )
    p.add_argument("input", nargs="+", help="input video file(s)")
    p.add_argument("--out", help="annotated MP4 to write (one input)")
    p.add_argument(
        "--out-dir",
        help="folder for NAME.mp4 and NAME.jsonl (events) of each input; several inputs run "
        "side by side through one shared detector",
    )
    p.add_argument("--events", help="JSON lines file, one object a frame (with --out)")
    p.add_argument("--profile", choices=["mask", "people"])
    p.add_argument(
        "--detect-fps",
        type=_bounded_float(0, 240),
        help="detections a second of video (0 = off)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_process)

    p = sub.add_parser("worker", parents=[common], help="run one worker alone")
    p.add_argument("name", choices=sorted(WORKERS))
    p.add_argument("--camera", help="camera name (default: the first)")
    p.set_defaults(func=_cmd_worker)

    p = sub.add_parser("clip", parents=[common], help="ask a running recorder to save a clip")
    p.add_argument("--camera", help="camera name (default: the first)")
    p.add_argument("--reason", type=_reason, default="manual", help="why the clip is saved")
    seconds = _bounded_float(0, MAX_CLIP_SECONDS)
    p.add_argument("--pre", type=seconds, help="seconds before now (default from config)")
    p.add_argument("--post", type=seconds, help="seconds after now (default from config)")
    p.set_defaults(func=_cmd_clip)

    p = sub.add_parser("streaming", parents=[common], help="start/stop a running RTSP worker")
    p.add_argument("action", choices=["start", "stop", "status"])
    p.set_defaults(func=_cmd_streaming)

    p = sub.add_parser(
        "broker-config", help="write a Mosquitto config, passwords and ACL for a fleet"
    )
    p.add_argument("--devices", required=True, help="comma-separated device names")
    p.add_argument("--out", required=True, help="folder to write into (created, 0700)")
    p.add_argument("--server-user", default="fleet", help="the fleet server's MQTT user")
    p.add_argument("--prefix", default="edgecam", help="topic prefix")
    p.add_argument("--port", type=int, default=1883, help="listener port")
    p.add_argument("--host", default="0.0.0.0", help="listener address")
    p.set_defaults(func=_cmd_broker_config)

    p = sub.add_parser("demo", parents=[common], help="the whole system on the bundled clips")
    p.add_argument("--out", default="out/demo", help="folder for the demo's outputs")
    p.add_argument(
        "--live-seconds",
        type=_bounded_float(0, 86400, low_open=True),
        default=30,
        help="length of the live part",
    )
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("server", parents=[common], help="the fleet server (HTTP API, dashboard)")
    p.add_argument(
        "action",
        nargs="?",
        default="run",
        choices=["run", "create-user", "delete-user", "create-token", "revoke-token"],
    )
    p.add_argument("name", nargs="?", help="user name (token number for revoke-token)")
    p.add_argument("--device", help="create-token: limit the token to this device's clip uploads")
    p.set_defaults(func=_cmd_server)

    p = sub.add_parser("bench", help="run a benchmark and print its figures")
    p.add_argument("name", choices=sorted(BENCHES))
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("live-url", parents=[common], help="print a signed live-page URL")
    p.add_argument("--camera", help="camera name (default: the first)")
    p.set_defaults(func=_cmd_live_url)

    p = sub.add_parser("config", parents=[common], help="check or show the configuration")
    p.add_argument("action", choices=["check", "show"])
    p.add_argument("file", nargs="?", help="file to check")
    p.set_defaults(func=_cmd_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_RedactFilter())
    if args.command == "config" and args.action == "check" and not args.file:
        print("edgecam config check: give the FILE to check", file=sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"edgecam {args.command}: error: {redact_url(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except EdgecamError as exc:
        for line in redact_url(str(exc)).splitlines():  # several inputs: a line each
            print(f"edgecam: error: {line}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except _Terminated as exc:
        return 128 + exc.signum
    except Exception as exc:  # a bug: one line for the user, the traceback with -v
        log.debug("unexpected error", exc_info=True)
        text = redact_url(" ".join(str(exc).split())) or type(exc).__name__
        print(
            f"edgecam: internal error: {type(exc).__name__}: {text} "
            "(run with -v for the traceback, and please report it)",
            file=sys.stderr,
        )
        return EXIT_RUNTIME


class _RedactFilter(logging.Filter):
    """Masks URL passwords and tokens in every log line, whoever logs it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_url(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


if __name__ == "__main__":
    sys.exit(main())
