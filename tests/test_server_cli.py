"""`edgecam server`, `create-user` and `create-token` as a user runs them."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from server_support import wait_until

from edgecam.cli import main
from edgecam.ports import free_port
from edgecam.server.simulate import SimDevice

SRC = Path(__file__).resolve().parents[1] / "src"


def test_server_command_users_tokens_and_api(
    tmp_path: Path,
    broker: int,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def edgecam(*args: str, config: Path, stdin: str = "") -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code = main([*args, "--config", str(config)])
        out = capsys.readouterr()
        return code, out.out, out.err

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
                    "ingest_processes": 2,  # two processes on one shared subscription
                },
            }
        )
    )
    code, _, err = edgecam("server", "create-user", "ops", config=config, stdin="a long password\n")
    assert code == 0, err
    code, _, err = edgecam("server", "create-user", "ops2", config=config, stdin="short\n")
    assert code == 1 and "at least 8" in err
    code, out, err = edgecam("server", "create-token", "ops", config=config)
    assert code == 0, err
    secret = out.strip()
    assert secret.startswith("ect_")
    assert edgecam("server", "create-token", "nobody", config=config)[0] == 1

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
        for seq in range(20):
            device.send_stats(1000.0 + seq)

        def ingested() -> bool:
            metrics = httpx.get(f"{url}/metrics", headers=auth).text
            return "edgecam_messages_ingested_total 21" in metrics  # status + 20 stats

        wait_until(ingested, timeout=15)

        # A password changed ends the user's sessions; a user deleted is cut off at once.
        with httpx.Client(base_url=url) as browser:
            page = browser.get("/login")
            csrf = page.cookies.get("edgecam_login_csrf") or ""
            form = {"username": "ops", "password": "a long password", "csrf": csrf}
            assert browser.post("/login", data=form).status_code in (200, 303)
            assert browser.get("/api/devices").status_code == 200
            code, _, err = edgecam(
                "server", "create-user", "ops", config=config, stdin="another long password\n"
            )
            assert code == 0, err
            assert browser.get("/api/devices").status_code == 401
        assert httpx.get(f"{url}/api/devices", headers=auth).status_code == 200
        code, _, err = edgecam("server", "delete-user", "ops", config=config)
        assert code == 0 and "deleted" in err, err
        assert httpx.get(f"{url}/api/devices", headers=auth).status_code == 401
        assert edgecam("server", "delete-user", "ops", config=config)[0] == 1
    finally:
        if device is not None:
            device.stop()
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert f"http://127.0.0.1:{port}/" in out
