"""Fixtures of the fleet server tests: a real Mosquitto, SQLite and PostgreSQL databases.

tests/conftest.py loads this module as a plugin, so its fixtures are everywhere.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgecam.ports import free_port

PG_ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def wait_until(check: Callable[[], object], timeout: float = 10.0, every: float = 0.05) -> None:
    """Poll ``check`` until it returns something true, or fail the test."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {check}")
        time.sleep(every)


def start_mosquitto(folder: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A Mosquitto of our own on a free loopback port (anonymous, loopback only)."""
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    conf = folder / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        "persistence false\n"
        "max_queued_messages 1000000\n"
        "max_inflight_messages 0\n"
        "log_type error\n"
    )
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("mosquitto did not start") from None
            time.sleep(0.05)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """Port of a real Mosquitto that lives for the whole session."""
    proc, port = start_mosquitto(tmp_path_factory.mktemp("mosquitto"))
    yield port
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def prefix() -> str:
    """A topic prefix of this test alone, so tests sharing the broker never meet."""
    return f"t{uuid.uuid4().hex[:10]}"


def _pg_available() -> str | None:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, connect_timeout=2):
            return None
    except Exception as exc:
        return f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc}"


def make_pg_database() -> tuple[str, Callable[[], None]]:
    """A fresh PostgreSQL database: its SQLAlchemy URL and a function that drops it."""
    import psycopg

    name = f"edgecam_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)

    def drop() -> None:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return f"{base}/{name}", drop


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A new empty database: a SQLite file, then a PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'server.db'}"
        return
    reason = _pg_available()
    if reason:
        pytest.skip(reason)
    url, drop = make_pg_database()
    yield url
    drop()


class FleetServer:
    """A running fleet server (the real :class:`Server` parts, uvicorn on a free port)."""

    def __init__(self, settings: Any, port: int | None = None) -> None:
        """``port``: where a server that was stopped came back (its user is there)."""
        from edgecam.server import auth
        from edgecam.server.app import BackgroundServer

        self.port = port or free_port()
        settings.server.port = self.port
        self.background = BackgroundServer(settings).start()
        self.ctx = self.background.ctx
        self.app = self.background.app
        self.url = self.background.url
        if port is None:
            auth.create_user(self.ctx.engine, "admin", "correct horse battery")
        self.token = auth.create_token(self.ctx.engine, "admin", "tests")[1]
        self.http = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=30
        )
        self.anon = httpx.Client(base_url=self.url, timeout=30)

    def close(self) -> None:
        self.http.close()
        self.anon.close()
        self.background.stop()


def server_settings(
    database_url: str,
    broker: int,
    prefix: str,
    folder: Path,
    mqtt: dict[str, Any] | None = None,
    **server: Any,
) -> Any:
    from edgecam.config import Settings

    return Settings.model_validate(
        {
            "mqtt": {"host": "127.0.0.1", "port": broker, "prefix": prefix, **(mqtt or {})},
            "server": {
                "database_url": database_url,
                "clips_dir": str(folder / "server-clips"),
                "batch_interval_s": 0.05,
                "secure_cookies": False,
                **server,
            },
        }
    )


@pytest.fixture
def fleet(database_url: str, broker: int, prefix: str, tmp_path: Path) -> Iterator[FleetServer]:
    """A fleet server on a fresh database, with user admin and an API token."""
    server = FleetServer(server_settings(database_url, broker, prefix, tmp_path))
    yield server
    server.close()
