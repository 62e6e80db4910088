"""Uploading a saved clip to the fleet server: the device side (standard library only).

``PUT {base_url}/api/devices/{device}/clips/{name}`` with the device's token, the file as
the body and its SHA-256 in ``X-Content-SHA256``; the server checks the hash and keeps the
clip. Retried with backoff on network errors and 5xx answers; an upload of a clip the server
already has succeeds at once (idempotent).
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import time
import urllib.parse
from pathlib import Path

from edgecam.errors import EdgecamError
from edgecam.protocol import ClipReady

__all__ = ["UploadError", "sha256_file", "upload_clip"]

log = logging.getLogger(__name__)
CHUNK = 1024 * 1024


class UploadError(EdgecamError):
    """A clip could not be uploaded to the fleet server."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def upload_clip(
    base_url: str,
    device: str,
    token: str,
    mp4_path: str | Path,
    clip_ready: ClipReady | None = None,
    *,
    attempts: int = 5,
    backoff_s: float = 1.0,
    timeout_s: float = 60.0,
) -> None:
    """Upload one clip; raises :class:`UploadError` when every attempt failed or the server
    refused it (bad token, bad hash, too large: not retried)."""
    path = Path(mp4_path)
    sha = clip_ready.sha256 if clip_ready is not None else sha256_file(path)
    name = clip_ready.name if clip_ready is not None else path.name
    url = urllib.parse.urlsplit(base_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise UploadError(f"server URL {base_url!r}: use http(s)://HOST[:PORT]")
    target = (
        f"{url.path.rstrip('/')}/api/devices/{urllib.parse.quote(device, safe='')}"
        f"/clips/{urllib.parse.quote(name, safe='')}"
    )
    headers = {
        "Authorization": f"Bearer {token}",
        "Content-Type": "video/mp4",
        "Content-Length": str(path.stat().st_size),
        "X-Content-SHA256": sha,
    }
    last = ""
    for attempt in range(1, attempts + 1):
        try:
            status, text = _put(url, target, headers, path, timeout_s)
        except (OSError, http.client.HTTPException) as exc:
            status, text = 0, str(exc)
        if 200 <= status < 300:
            log.info("uploaded clip %s to %s", name, base_url)
            return
        last = f"HTTP {status}: {text}" if status else text
        if 400 <= status < 500 and status != 429:
            raise UploadError(f"the server refused clip {name}: {last}")
        if attempt < attempts:
            delay = backoff_s * 2 ** (attempt - 1)
            log.warning("upload of %s failed (%s); again in %.0f s", name, last, delay)
            time.sleep(delay)
    raise UploadError(f"clip {name} not uploaded after {attempts} attempts: {last}")


def _put(
    url: urllib.parse.SplitResult, target: str, headers: dict[str, str], path: Path, timeout: float
) -> tuple[int, str]:
    """One PUT; the answer is read even when the server refused before taking the body."""
    kind = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    conn = kind(url.hostname or "", url.port, timeout=timeout)
    try:
        conn.putrequest("PUT", target)
        for key, value in headers.items():
            conn.putheader(key, value)
        conn.endheaders()
        try:
            with path.open("rb") as f:
                while chunk := f.read(CHUNK):
                    conn.send(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered early (a refusal): read why below
        response = conn.getresponse()
        return response.status, response.read(500).decode(errors="replace")
    finally:
        conn.close()
