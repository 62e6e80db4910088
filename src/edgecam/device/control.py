"""Local command sockets of the workers: one JSON :class:`~edgecam.protocol.Command` a line
in, one :class:`~edgecam.protocol.CommandResult` a line out.

Each camera's workers share a private runtime folder (``recorder.ring_dir/<camera>``, mode
0700, owned by the user running them); each worker listens there on ``<name>.sock`` (0600).
The orchestrator, the CLI and the tests talk to running workers through these sockets.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import socketserver
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from edgecam.config import Settings
from edgecam.errors import EdgecamError, PipelineError
from edgecam.protocol import Command, CommandResult

__all__ = [
    "MAX_LINE",
    "ControlServer",
    "Handler",
    "runtime_folder",
    "secure_folder",
    "send_command",
    "socket_path",
]

log = logging.getLogger(__name__)

MAX_LINE = 64 * 1024
Handler = Callable[[dict[str, Any]], dict[str, Any]]

# Worker name -> socket file name in the camera's runtime folder.
_SOCKETS = {"recorder": "control.sock", "streaming": "streaming.sock"}


def runtime_folder(settings: Settings, camera: str | None = None) -> Path:
    """The private folder of ``camera``'s workers (its RAM ring and control sockets)."""
    _, cam = settings.camera(camera)
    return settings.recorder.ring_dir / cam.name


def socket_path(settings: Settings, worker: str, camera: str | None = None) -> Path:
    """Where ``worker`` of ``camera`` listens for commands."""
    return runtime_folder(settings, camera) / _SOCKETS[worker]


def secure_folder(folder: Path) -> None:
    """Create ``folder``, or take over one left by an earlier run: only a real folder of
    this user, and then private (control sockets and recent video live there)."""
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = os.lstat(folder)
    except OSError as exc:
        raise PipelineError(
            f"cannot create the ring folder {folder}: {exc}; check recorder.ring_dir"
        ) from exc
    if not stat.S_ISDIR(st.st_mode):
        raise PipelineError(
            f"the ring folder {folder} is a symlink or not a folder; remove it or "
            "change recorder.ring_dir"
        )
    if st.st_uid != os.getuid():
        raise PipelineError(
            f"the ring folder {folder} belongs to uid {st.st_uid}, not to this user "
            f"(uid {os.getuid()}); remove it or change recorder.ring_dir"
        )
    os.chmod(folder, 0o700)


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
        except (EdgecamError, ValidationError, ValueError) as exc:
            return CommandResult(command_id=cmd.id, ok=False, error=str(exc))
        return CommandResult(command_id=cmd.id, ok=True, data=data)


def send_command(path: Path, command: Command, timeout: float = 300.0) -> CommandResult:
    """Send one command to a worker's control socket and wait for its result."""
    worker = next((w for w, f in _SOCKETS.items() if f == path.name), "worker")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError as exc:
            raise EdgecamError(
                f"no {worker} listens on {path} ({exc.strerror}): start it with "
                f"`edgecam worker {worker}`"
            ) from exc
        sock.sendall(command.model_dump_json().encode() + b"\n")
        with sock.makefile("rb") as f:
            line = f.readline(MAX_LINE)
    if not line:
        raise EdgecamError(f"the {worker} on {path} closed the connection without an answer")
    return CommandResult.model_validate_json(line)
