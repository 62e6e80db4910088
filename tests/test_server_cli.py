"""`edgecam server`, `create-user` and `create-token` as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import yaml
from server_support import wait_until

from edgecam.ports import free_port
from edgecam.server.simulate import SimDevice

SRC = Path(__file__).resolve().parents[1] / "src"


def _edgecam(*args: str, config: Path, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run(
        [sys.executable, "-m", "edgecam.cli", *args, "--config", str(config)],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_server_command_users_tokens_and_api(tmp_path: Path, broker: int, prefix: str) -> None:
    port = free_port()
    config = tmp_path / "server.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "mqtt": {"host": "127.0.0.1", "port": broker, "prefix": prefix},
                "server": {
                    "port": port,
                    "database_url": f"sqlite:///{tmp_path / 'fleet.db'}",
                    "clips_dir": str(tmp_path / "clips"),
                },
            }
        )
    )
    made = _edgecam("server", "create-user", "ops", config=config, stdin="a long password\n")
    assert made.returncode == 0, made.stderr
    short = _edgecam("server", "create-user", "ops2", config=config, stdin="short\n")
    assert short.returncode == 1 and "at least 8" in short.stderr
    token = _edgecam("server", "create-token", "ops", config=config)
    assert token.returncode == 0, token.stderr
    secret = token.stdout.strip()
    assert secret.startswith("ect_")
    assert _edgecam("server", "create-token", "nobody", config=config).returncode == 1

    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgecam.cli", "server", "--config", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    device = None
    try:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(f"{url}/health").status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, timeout=30)
        assert httpx.get(f"{url}/api/devices").status_code == 401
        device = SimDevice("gate", "127.0.0.1", broker, prefix).start()
        auth = {"Authorization": f"Bearer {secret}"}
        wait_until(lambda: httpx.get(f"{url}/api/devices", headers=auth).json(), timeout=15)
        assert httpx.get(f"{url}/api/devices", headers=auth).json()[0]["online"] is True
    finally:
        if device is not None:
            device.stop()
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert f"http://127.0.0.1:{port}/" in out
