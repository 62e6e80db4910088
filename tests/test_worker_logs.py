"""The workers' log files (``runtime.log_dir``) stay within ``runtime.log_max_bytes``: a
device left for months must not fill its disk with logs."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edgecam.config import Settings
from edgecam.device.supervisor import Supervisor, open_worker_log, trim_log

_APPEND = os.O_WRONLY | os.O_CREAT | os.O_APPEND


def _writer(path: Path) -> subprocess.Popen[bytes]:
    """A process writing numbered lines to ``path`` through an O_APPEND descriptor, as
    the supervisor gives each worker."""
    fd = os.open(path, _APPEND, 0o600)
    try:
        return subprocess.Popen(
            [
                sys.executable,
                "-u",
                "-c",
                "import itertools, time\n"
                "for i in itertools.count():\n"
                "    print(f'line {i:08d} ' + 'x' * 100)\n"
                "    time.sleep(0.0005)\n",
            ],
            stdout=fd,
        )
    finally:
        os.close(fd)


def _wait_size(path: Path, size: int) -> None:
    end = time.monotonic() + 20
    while path.stat().st_size < size:
        assert time.monotonic() < end, path.stat().st_size
        time.sleep(0.02)


def test_a_log_past_its_bound_is_moved_aside_and_the_worker_writes_on(tmp_path: Path) -> None:
    log = tmp_path / "inference.main.log"
    proc = _writer(log)
    try:
        _wait_size(log, 70_000)
        trim_log(log, 64 * 1024)
        _wait_size(log, 2_000)  # written on, after the emptying
    finally:
        proc.kill()
        proc.wait()
    old, new = (tmp_path / "inference.main.log.1").read_bytes(), log.read_bytes()
    assert len(old) > 64 * 1024
    assert old.startswith(b"line 00000000 ")
    # Written at the new end (O_APPEND): no hole of zeros where the old bytes were.
    assert b"\0" not in new and len(new) < len(old)
    first_new = int(new.split(b"\n")[1].split()[1])  # the first whole line
    last_old = int(old.rstrip(b"\n").rsplit(b"\n", 1)[1].split()[1])
    assert first_new > last_old
    assert oct(os.stat(tmp_path / "inference.main.log.1").st_mode & 0o777) == "0o600"
    assert not list(tmp_path.glob("*.part"))


def test_small_logs_are_left_alone(tmp_path: Path) -> None:
    log = tmp_path / "recorder.log"
    log.write_bytes(b"a" * 1000)
    trim_log(log, 1000)
    trim_log(tmp_path / "missing.log", 1000)
    assert log.read_bytes() == b"a" * 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recorder.log"]


def test_a_log_is_emptied_even_where_it_cannot_be_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = tmp_path / "recorder.log"
    log.write_bytes(b"a" * 5000)
    (tmp_path / "recorder.log.1.part").mkdir()  # the copy cannot be written
    with caplog.at_level(logging.INFO, logger="edgecam.device.supervisor"):
        trim_log(log, 1000)
    assert log.stat().st_size == 0
    assert "emptied without keeping it" in caplog.text
    assert "moved to" not in caplog.text  # it was said to be kept, too


def _plant_link(folder: Path, name: str, victim: Path) -> None:
    os.symlink(victim, folder / name)


def _plant_fifo(folder: Path, name: str, _victim: Path) -> None:
    os.mkfifo(folder / name)


def _plant_stale(folder: Path, name: str, _victim: Path) -> None:
    (folder / name).write_bytes(b"left by a crash")
    os.chmod(folder / name, 0o644)


@pytest.mark.parametrize(
    ("name", "plant"),
    [
        ("recorder.log", _plant_link),  # emptied the victim
        ("recorder.log", _plant_fifo),
        ("recorder.log.1.part", _plant_link),  # overwrote the victim with the log
        ("recorder.log.1.part", _plant_fifo),  # hung the supervisor, opening it to write
        ("recorder.log.1.part", _plant_stale),  # kept its mode: the log readable by others
    ],
)
def test_what_is_planted_in_log_dir_is_not_followed(
    tmp_path: Path, name: str, plant: Callable[[Path, str, Path], None]
) -> None:
    """Whoever can write in log_dir cannot have another file emptied or overwritten, nor
    the supervisor hang on a FIFO, nor the kept log readable by others."""
    logs, victim = tmp_path / "logs", tmp_path / "victim"
    logs.mkdir()
    victim.write_bytes(b"v" * 5000)
    if name != "recorder.log":
        (logs / "recorder.log").write_bytes(b"a" * 5000)
    plant(logs, name, victim)
    trimming = threading.Thread(target=trim_log, args=(logs / "recorder.log", 1000), daemon=True)
    trimming.start()
    trimming.join(timeout=5)
    if trimming.is_alive() and stat.S_ISFIFO(os.lstat(logs / name).st_mode):
        os.close(os.open(logs / name, os.O_RDONLY | os.O_NONBLOCK))  # let it go
    assert not trimming.is_alive(), "trim_log hangs"
    assert victim.read_bytes() == b"v" * 5000
    kept = logs / "recorder.log.1"
    if kept.exists():
        assert kept.read_bytes() == b"a" * 5000
        assert oct(kept.lstat().st_mode & 0o777) == "0o600"


def test_the_supervisor_keeps_every_workers_log_bounded(tmp_path: Path) -> None:
    settings = Settings(runtime={"log_dir": tmp_path, "log_max_bytes": 64 * 1024})
    supervisor = Supervisor(settings, None, tmp_path)
    big = tmp_path / "inference.log"
    big.write_bytes(b"b" * 100_000)
    (tmp_path / "recorder.main.log").write_bytes(b"c" * 1000)
    supervisor.poll()
    assert big.stat().st_size == 0
    assert (tmp_path / "inference.log.1").stat().st_size == 100_000
    assert (tmp_path / "recorder.main.log").stat().st_size == 1000
    big.write_bytes(b"d" * 100_000)
    supervisor.poll()  # measured every 10 s, not on every poll
    assert big.stat().st_size == 100_000


def test_log_max_bytes_is_checked_in_config() -> None:
    with pytest.raises(ValueError, match="log_max_bytes"):
        Settings(runtime={"log_max_bytes": 1000})


def test_a_link_planted_as_a_workers_log_is_not_followed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"kept")
    (tmp_path / "recorder.main.log").symlink_to(target)
    assert open_worker_log(tmp_path / "recorder.main.log") is None
    assert "logs to the device's output" in caplog.text
    fd = open_worker_log(tmp_path / "inference.log")
    assert fd is not None
    os.write(fd, b"line\n")
    os.close(fd)
    assert target.read_bytes() == b"kept"
    assert oct(os.stat(tmp_path / "inference.log").st_mode & 0o777) == "0o600"


_MODEST = "import time\ntime.sleep(60)\n"


def _supervising(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, streaming: str, **supervisor: object
) -> Supervisor:
    """A supervisor whose workers are Python scripts: ``streaming`` for the streaming worker,
    one that only sleeps for the others; started."""
    from edgecam.device import supervisor as module

    def command(name: str, camera: str | None, config: Path | None) -> list[str]:
        return [sys.executable, "-c", streaming if name == "streaming" else _MODEST]

    monkeypatch.setattr(module, "worker_command", command)
    settings = Settings.model_validate(
        {
            "cameras": [{"name": "main", "source": str(tmp_path / "a.mp4")}],
            "supervisor": {"max_worker_rss_mb": 150, **supervisor},
        }
    )
    sup = Supervisor(settings, None, None)
    sup.start_all()
    return sup


def _poll_until(sup: Supervisor, done: Callable[[], bool], end: float, why: str = "") -> None:
    """Run the supervisor's loop until ``done``; fail past ``end`` (monotonic)."""
    while not done():
        assert time.monotonic() < end, why
        sup.poll()
        time.sleep(0.02)


def test_a_worker_past_its_memory_bound_is_killed_and_restarted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker that grows (a leak, or a client feeding it: 32 MB of RTSP header lines
    took 44 MB of the streaming worker's) is restarted before it takes the machine."""
    hog = "x = bytearray(200 * 2**20)\nimport time\ntime.sleep(60)\n"
    caplog.set_level(logging.INFO, logger="edgecam.device.supervisor")
    sup = _supervising(tmp_path, monkeypatch, hog, restart_min_s=0.1)
    others = {k: c.pid for k, c in sup.children.items() if c.name != "streaming"}
    try:
        streaming = sup.children["streaming"]
        _poll_until(sup, lambda: streaming.restarts >= 1, time.monotonic() + 20, caplog.text)
        error = streaming.error or ""
        assert "over supervisor.max_worker_rss_mb (150)" in error and "SIGKILL" in error
        assert "worker streaming uses" in caplog.text
        # The others, well within the bound, were left alone.
        assert {k: c.pid for k, c in sup.children.items() if c.name != "streaming"} == others
    finally:
        sup.stop_all(force=True)


def test_why_a_worker_was_killed_is_said_of_that_death_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker killed for its memory that then fails on its own (exit 3, nothing reported)
    again and again. Before, each death was put in front of the kill's reason, which stayed:
    "exit 3; exit 3; ...; killed by SIGKILL; used 213 MiB, over ...", growing in every status
    the device sent for as long as the crash loop lasted (past the 64 KiB payload limit in
    days), and blaming the memory bound for deaths it had no part in."""
    ran = tmp_path / "ran"
    hog_once = (
        f"import pathlib, sys, time\nran = pathlib.Path({str(ran)!r})\n"
        "if ran.exists():\n    sys.exit(3)\n"
        "ran.touch()\nx = bytearray(200 * 2**20)\ntime.sleep(60)\n"
    )
    sup = _supervising(
        tmp_path,
        monkeypatch,
        hog_once,
        restart_min_s=0.05,
        restart_max_s=0.05,
        crash_loop_restarts=100,
    )
    streaming = sup.children["streaming"]
    try:
        end = time.monotonic() + 20
        _poll_until(sup, lambda: streaming.restarts >= 1, end)
        assert "over supervisor.max_worker_rss_mb (150)" in (streaming.error or "")
        _poll_until(sup, lambda: streaming.restarts >= 5, end)
        assert streaming.error == "exit 3"
    finally:
        sup.stop_all(force=True)
