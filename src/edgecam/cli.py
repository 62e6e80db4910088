"""The ``edgecam`` command line: parses arguments, loads the config once, dispatches."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

from edgecam.config import Settings, load_settings, redact_url, settings_to_yaml
from edgecam.errors import EdgecamError, UsageError

log = logging.getLogger("edgecam")

# Worker name -> "module:function(settings, camera) -> exit code". Imported lazily so that
# `edgecam config show` needs neither GStreamer nor ONNX Runtime.
WORKERS: dict[str, str] = {
    "inference": "edgecam.media.live:run_worker",
    "streaming": "edgecam.media.streaming:run_worker",
    "recorder": "edgecam.media.recorder:run_worker",
    "fileserver": "edgecam.device.fileserver:run_worker",
}

BENCHES: dict[str, str] = {
    "overhead": "bench/bench_overhead.py",
    "python-cost": "bench/bench_python_cost.py",
    "detectors": "bench/bench_detectors.py",
    "live": "bench/bench_live.py",
    "loop": "bench/bench_vs_loop.py",
    "latency": "bench/bench_latency.py",
    "crops": "bench/bench_crops.py",
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


def _resolve(target: str) -> Callable[..., int]:
    module, _, name = target.partition(":")
    func: Callable[..., int] = getattr(importlib.import_module(module), name)
    return func


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


def _raise_terminated(signum: int, _frame: FrameType | None) -> None:
    raise _Terminated(signum)


def _cmd_process(args: argparse.Namespace) -> int:
    from edgecam.media.offline import process_file

    settings = _settings(
        args, **{"vision.profile": args.profile, "vision.detect_fps": args.detect_fps}
    )
    # A terminated run leaves no temporary output behind, as an interrupted one.
    signal.signal(signal.SIGTERM, _raise_terminated)
    process_file(
        settings,
        Path(args.input),
        Path(args.out),
        events=Path(args.events) if args.events else None,
        progress=not args.quiet,
    )
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    return _resolve(WORKERS["inference"])(_settings(args), args.camera)


def _cmd_worker(args: argparse.Namespace) -> int:
    return _resolve(WORKERS[args.name])(_settings(args), args.camera)


def _cmd_clip(args: argparse.Namespace) -> int:
    return _resolve("edgecam.media.recorder:request_clip_cli")(_settings(args), args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from edgecam.demo import run_demo

    return run_demo(args.config, Path(args.out), args.live_seconds)


def _cmd_streaming(args: argparse.Namespace) -> int:
    from edgecam.device.control import send_command, socket_path
    from edgecam.protocol import Command

    path = socket_path(_settings(args), "streaming", args.camera)
    name = "status" if args.action == "status" else f"streaming_{args.action}"
    result = send_command(path, Command(name=name), timeout=30)
    if not result.ok:
        raise EdgecamError(result.error or "the streaming worker refused the command")
    print(json.dumps(result.data, indent=2))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import runpy

    script = Path(__file__).resolve().parents[2] / BENCHES[args.name]
    if not script.is_file():
        raise EdgecamError(f"benchmark script {script} not found (benchmarks run from a clone)")
    sys.argv = [str(script), *args.rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgecam", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="YAML config file (default $EDGECAM_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", parents=[common], help="run the device pipeline live")
    p.add_argument("--camera", help="camera name (default: the first)")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("process", parents=[common], help="process a video file offline")
    p.add_argument("input", help="input video file")
    p.add_argument("--out", required=True, help="annotated MP4 to write")
    p.add_argument("--events", help="JSON lines file, one object a frame")
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
    p.add_argument("--camera", help="camera name (default: the first)")
    p.set_defaults(func=_cmd_streaming)

    p = sub.add_parser("demo", parents=[common], help="the whole system on the bundled clips")
    p.add_argument("--out", default="out/demo", help="folder for the demo's outputs")
    p.add_argument(
        "--live-seconds",
        type=_bounded_float(0, 86400, low_open=True),
        default=30,
        help="length of the live part",
    )
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("bench", help="run a benchmark and print its figures")
    p.add_argument("name", choices=sorted(BENCHES))
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    p.set_defaults(func=_cmd_bench)

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
        print(f"edgecam: error: {redact_url(str(exc))}", file=sys.stderr)
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
