"""Local command sockets: one JSON :class:`~edgecam.protocol.Command` a line in, one
:class:`~edgecam.protocol.CommandResult` a line out.

Every worker listens on ``<worker>[.<camera>].sock`` in the device's private runtime folder
(``runtime.dir``, mode 0700); the orchestrator listens on ``device.sock`` there. The
orchestrator, the CLI and the tests talk to running processes through these sockets.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import socketserver
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from edgecam.config import Settings
from edgecam.errors import EdgecamError, PipelineError
from edgecam.protocol import Command, CommandResult

__all__ = [
    "DEVICE",
    "MAX_LINE",
    "ControlServer",
    "Handler",
    "process_key",
    "send_command",
    "socket_path",
]

log = logging.getLogger(__name__)

MAX_LINE = 64 * 1024
DEVICE = "device"  # the orchestrator's name among the runtime folder's sockets and locks
Handler = Callable[[dict[str, Any]], dict[str, Any]]


def process_key(name: str, camera: str | None = None) -> str:
    """The file-name stem of a process in the runtime folder: ``recorder.main``, ``device``."""
    return name if camera is None else f"{name}.{camera}"


def socket_path(settings: Settings, name: str, camera: str | None = None) -> Path:
    """Where process ``name`` (of ``camera``, for a per-camera worker) takes commands."""
    return settings.runtime.dir / f"{process_key(name, camera)}.sock"


class _Handler(socketserver.StreamRequestHandler):
    server: _SocketServer

    def handle(self) -> None:
        with contextlib.suppress(ConnectionError):  # the client went away: nobody to answer
            self._serve()

    def _serve(self) -> None:
        while line := self.rfile.readline(MAX_LINE):
            if len(line) == MAX_LINE and not line.endswith(b"\n"):
                # The rest of the line would read as another command: answer once, hang up.
                self._answer(
                    CommandResult(
                        command_id="", ok=False, error=f"command too long: over {MAX_LINE} bytes"
                    )
                )
                return
            self._answer(self.server.owner.handle_line(line))

    def _answer(self, result: CommandResult) -> None:
        self.wfile.write(result.model_dump_json().encode() + b"\n")
        self.wfile.flush()


class _SocketServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    owner: ControlServer


class ControlServer:
    """A worker's command socket: ``handlers`` maps command names to functions of the
    command's ``args`` that return the result's ``data`` (or raise to answer an error)."""

    def __init__(self, path: Path, handlers: dict[str, Handler], name: str) -> None:
        self.path = path
        self.name = name
        self._handlers = handlers
        self._server: _SocketServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.path.exists():
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(str(self.path))
                except OSError:
                    self.path.unlink()  # left by a killed worker
                else:
                    raise PipelineError(f"another {self.name} already listens on {self.path}")
        # Not os.umask: it is the whole process's, and other threads create files. The
        # folder is private (0700), and the socket is 0600 before it accepts anyone.
        server = _SocketServer(str(self.path), _Handler, bind_and_activate=False)
        try:
            server.server_bind()
            os.chmod(self.path, 0o600)
            server.server_activate()
        except OSError as exc:
            server.server_close()
            raise PipelineError(f"cannot listen on {self.path}: {exc}") from exc
        server.owner = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, args=(0.2,), name=f"{self.name}-control", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self.path.unlink(missing_ok=True)

    def handle_line(self, line: bytes) -> CommandResult:
        try:
            cmd = Command.model_validate_json(line)
        except ValidationError as exc:
            return CommandResult(command_id="", ok=False, error=f"malformed command: {exc}")
        handler = self._handlers.get(cmd.name)
        if handler is None:
            return CommandResult(
                command_id=cmd.id,
                ok=False,
                error=f"unknown command {cmd.name!r}; known: {sorted(self._handlers)}",
            )
        try:
            data = handler(cmd.args)
        except (EdgecamError, ValidationError, ValueError, TypeError) as exc:
            return CommandResult(command_id=cmd.id, ok=False, error=str(exc))
        except Exception as exc:
            # A bug in one handler: answer it, log it, keep serving.
            log.exception("%s: command %s failed", self.name, cmd.name)
            return CommandResult(
                command_id=cmd.id, ok=False, error=f"internal error: {type(exc).__name__}"
            )
        return CommandResult(command_id=cmd.id, ok=True, data=data)


def send_command(path: Path, command: Command, timeout: float = 300.0) -> CommandResult:
    """Send one command to a worker's control socket and wait for its result."""
    worker = path.name.removesuffix(".sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError as exc:
            raise EdgecamError(
                f"no {worker} listens on {path} ({exc.strerror}): is the device "
                "(`edgecam run`) or that worker running with this configuration?"
            ) from exc
        sock.sendall(command.model_dump_json().encode() + b"\n")
        with sock.makefile("rb") as f:
            line = f.readline(MAX_LINE)
    if not line:
        raise EdgecamError(f"the {worker} on {path} closed the connection without an answer")
    return CommandResult.model_validate_json(line)
