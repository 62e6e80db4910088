"""The fleet server on a disk that fills up: run by tests/test_server_storage.py inside a
user and mount namespace of its own (``unshare -rm``), where it mounts two small tmpfs.

    unshare -rm python tests/full_disk_server.py FOLDER CLIP

The database (SQLite) is on one, the clips folder on the other. With both full, it tries a
login, a clip upload, a command and a read; again with room for clips only; then with both
freed. It prints one JSON object: what each answered, and what was left on the disk.
"""

from __future__ import annotations

import errno
import hashlib
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

MOUNT_SIZE = "4m"


def fill(folder: Path) -> Path:
    """Write a file until the disk is full; return it."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


def main() -> None:
    folder, clip = Path(sys.argv[1]), Path(sys.argv[2])
    # Two disks: the database's and the clips', to fill one without the other.
    for disk in ("db", "clips"):
        (folder / disk).mkdir()
        mount = ["mount", "-t", "tmpfs", "-o", f"size={MOUNT_SIZE}", "tmpfs"]
        subprocess.run([*mount, str(folder / disk)], check=True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

    from sqlalchemy.orm import Session

    from edgecam.config import Settings
    from edgecam.server import auth, db
    from edgecam.server.app import Server, create_app

    settings = Settings.model_validate(
        {
            "server": {
                "database_url": f"sqlite:///{folder / 'db' / 'fleet.db'}",
                "clips_dir": str(folder / "clips" / "server"),
                "secure_cookies": False,
            }
        }
    )
    server = Server(settings)
    server.start()
    auth.create_user(server.engine, "admin", "correct horse battery")
    token = auth.create_token(server.engine, "admin", "full disk", device="cam-1")[1]
    reader = auth.create_token(server.engine, "admin", "reads")[1]
    with Session(server.engine) as s, s.begin():
        s.add(db.Device(name="cam-1"))
    data = clip.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    results: dict[str, Any] = {}

    def attempt(client: TestClient, tag: str) -> None:
        client.cookies.clear()
        form = client.get("/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
        assert csrf is not None, form.text
        login = client.post(
            "/login",
            data={"username": "admin", "password": "correct horse battery", "csrf": csrf.group(1)},
            follow_redirects=False,
        )
        upload = client.put(
            "/api/devices/cam-1/clips/main-20260101-000000.mp4",
            content=data,
            headers={"Authorization": f"Bearer {token}", "X-Content-SHA256": sha},
        )
        read = client.get("/api/clips", headers={"Authorization": f"Bearer {reader}"})
        command = client.post(
            "/api/devices/cam-1/commands",
            json={"name": "status"},
            headers={"Authorization": f"Bearer {reader}"},
        )
        results[tag] = {
            "login": [login.status_code, login.headers.get("content-type", "")],
            "login_error": re.findall(r'class="error"[^>]*>([^<]*)<', login.text),
            "upload": [upload.status_code, upload.json().get("detail", "")],
            "read": read.status_code,
            "command": [command.status_code, command.json().get("detail", "")],
            "files": sorted(
                p.name for p in (folder / "clips").rglob("*") if p.is_file() and p.suffix == ".mp4"
            ),
        }

    try:
        with TestClient(create_app(server.ctx), base_url="http://127.0.0.1") as client:
            fillers = [fill(folder / "db"), fill(folder / "clips")]
            attempt(client, "full")
            fillers.pop().unlink()  # room for clips, none for the database
            attempt(client, "database_full")
            fillers.pop().unlink()
            attempt(client, "freed")
    finally:
        server.stop()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
