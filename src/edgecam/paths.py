"""Private folders: the one way edgecam creates a folder that holds sockets or video."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from edgecam.errors import EdgecamError

__all__ = ["secure_folder"]


def secure_folder(folder: Path, setting: str) -> None:
    """Create ``folder`` (0700), or take over one left by an earlier run: only a real
    folder of this user, and then private. ``setting`` names the config key to change."""
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = os.lstat(folder)
    except OSError as exc:
        raise EdgecamError(f"cannot create the folder {folder}: {exc}; check {setting}") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise EdgecamError(f"{folder} is a symlink or not a folder; remove it or change {setting}")
    if st.st_uid != os.getuid():
        raise EdgecamError(
            f"{folder} belongs to uid {st.st_uid}, not to this user (uid {os.getuid()}); "
            f"remove it or change {setting}"
        )
    os.chmod(folder, 0o700)
