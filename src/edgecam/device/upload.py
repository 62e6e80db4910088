"""Uploading a saved clip to the fleet server: the device side (standard library only).

``PUT {base_url}/api/devices/{device}/clips/{name}`` with the device's token, the file as
the body and its SHA-256 in ``X-Content-SHA256``; the server checks the hash and keeps the
clip. Retried with backoff on network errors and 5xx answers; an upload of a clip the server
already has succeeds at once (idempotent).

:class:`Uploads` keeps the clips still to upload on disk, a file each, so that a fleet server
away for hours, or a device restart, loses none of them: they go when it is back.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import threading
import time
import urllib.parse
from pathlib import Path

from pydantic import ValidationError

from edgecam.errors import EdgecamError
from edgecam.paths import secure_folder
from edgecam.protocol import CLIP_NAME, ClipReady

__all__ = [
    "ClipUnreadable",
    "UploadError",
    "UploadRefused",
    "Uploads",
    "sha256_file",
    "upload_clip",
]

log = logging.getLogger(__name__)
CHUNK = 1024 * 1024
# The fleet server answers an upload with the clip as it keeps it (a few hundred bytes).
_ANSWER_MAX_BYTES = 64 * 1024


class UploadError(EdgecamError):
    """A clip could not be uploaded to the fleet server."""


class UploadRefused(UploadError):
    """The fleet server refused a clip (a 4xx answer): trying again now would not help."""


class ClipUnreadable(UploadRefused):
    """The clip itself cannot be read here (a failing card, its permissions)."""

    def __init__(self, path: Path, exc: OSError) -> None:
        super().__init__(f"clip {path.name} cannot be read: {exc}")


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
    try:
        sha = clip_ready.sha256 if clip_ready is not None else sha256_file(path)
        size = path.stat().st_size
    except OSError as exc:
        raise ClipUnreadable(path, exc) from exc
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
        "Content-Length": str(size),
        "X-Content-SHA256": sha,
    }
    last = ""
    for attempt in range(1, attempts + 1):
        try:
            status, text = _put(url, target, headers, path, timeout_s)
        except (OSError, http.client.HTTPException) as exc:
            status, text = 0, str(exc)
        if 200 <= status < 300 and _stored(text, name, sha):
            log.info("uploaded clip %s to %s", name, base_url)
            return
        if 200 <= status < 300:
            # A proxy, a captive portal or another service at that address: the clip must
            # stay queued until the fleet server itself says it has it.
            last = (
                f"HTTP {status} without the fleet server's word that it stored the clip "
                f"(check upload.url: {base_url}): {text[:200]}"
            )
        else:
            last = f"HTTP {status}: {text[:500]}" if status else text
        if 400 <= status < 500 and status not in (408, 429):
            raise UploadRefused(f"the server refused clip {name}: {last}")
        if attempt < attempts:
            delay = backoff_s * 2 ** (attempt - 1)
            log.warning("upload of %s failed (%s); again in %.0f s", name, last, delay)
            time.sleep(delay)
    raise UploadError(f"clip {name} not uploaded after {attempts} attempts: {last}")


def _put(
    url: urllib.parse.SplitResult, target: str, headers: dict[str, str], path: Path, timeout: float
) -> tuple[int, str]:
    """One PUT; the answer is read even when the server refused before taking the body."""
    try:
        f = path.open("rb")
    except OSError as exc:
        raise ClipUnreadable(path, exc) from exc
    kind = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    conn = kind(url.hostname or "", url.port, timeout=timeout)
    try:
        with f:
            conn.putrequest("PUT", target)
            for key, value in headers.items():
                conn.putheader(key, value)
            conn.endheaders()
            while True:
                try:
                    chunk = f.read(CHUNK)
                except OSError as exc:  # the clip's own storage, not the network
                    raise ClipUnreadable(path, exc) from exc
                if not chunk:
                    break
                try:
                    conn.send(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    break  # the server answered early (a refusal): read why below
        response = conn.getresponse()
        return response.status, response.read(_ANSWER_MAX_BYTES).decode(errors="replace")
    finally:
        conn.close()


def _stored(answer: str, name: str, sha: str) -> bool:
    """Whether ``answer`` is the fleet server's record of clip ``name`` stored, with hash
    ``sha`` (or none: a row from before the server kept hashes)."""
    try:
        clip = json.loads(answer)
    except ValueError:
        return False
    return (
        isinstance(clip, dict)
        and clip.get("name") == name
        and clip.get("sha256") in (sha, None)
        and clip.get("stored") is True
    )


# After a round in which the server could not be reached, the next waits this long, doubling
# up to MAX_PAUSE_S: a server away for a day is asked about a hundred times, not thousands.
PAUSE_S = 30.0
MAX_PAUSE_S = 900.0
# A clip the server refused, or that cannot be read here, is tried again after this long (or
# at the device's next start): the cause may have been put right meanwhile.
REFUSED_RETRY_S = 3600.0
# A queued clip's file holds its ClipReady message: a few kB. A larger one is not ours.
_ENTRY_MAX_BYTES = 64 * 1024


class Uploads:
    """The clips still to upload to the fleet server, and the thread that uploads them.

    Each waits in ``folder`` as ``NAME.json`` (its :class:`ClipReady`) until the server has
    it, so neither an outage nor a restart loses one. Oldest first. The clip is read from
    ``clips_dir`` under its name, never from a path the file gives. A clip that retention
    removed meanwhile is dropped from the queue; one the server refused (a wrong token, too
    large) or that cannot be read here waits an hour, or for the device's next start, and
    the others go on meanwhile.
    """

    def __init__(
        self,
        folder: Path,
        clips_dir: Path,
        url: str,
        device: str,
        token: str,
        *,
        attempts: int = 5,
        backoff_s: float = 1.0,
        pause_s: float = PAUSE_S,
        max_pause_s: float = MAX_PAUSE_S,
        timeout_s: float = 60.0,
    ) -> None:
        secure_folder(folder, "upload.queue")
        self.folder, self.clips_dir = folder, clips_dir
        self._url, self._device, self._token = url, device, token
        self._attempts, self._backoff_s, self._timeout_s = attempts, backoff_s, timeout_s
        self._pause_s, self._max_pause_s = pause_s, max_pause_s
        self._lock = threading.Lock()
        self._unwritten: dict[str, ClipReady] = {}  # a clip whose file could not be written
        self._waiting: set[str] = set()
        self.pending()  # counts them
        self._refused: dict[str, float] = {}  # name: when (monotonic)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, clip: ClipReady) -> None:
        """Queue ``clip`` (on disk first); the uploading thread takes it at once."""
        target = self.folder / f"{clip.name}.json"
        tmp = self.folder / f".{clip.name}.tmp"
        try:
            tmp.write_text(clip.model_dump_json(), encoding="utf-8")
            os.replace(tmp, target)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.warning(
                "cannot queue clip %s in %s (%s): it is uploaded only if the device runs "
                "until then",
                clip.name,
                self.folder,
                exc.strerror or exc,
            )
            with self._lock:
                self._unwritten[clip.name] = clip
        with self._lock:
            self._waiting.add(clip.name)
        self._wake.set()

    def waiting(self) -> int:
        """How many clips wait to be uploaded."""
        with self._lock:
            return len(self._waiting)

    def pending(self) -> list[tuple[str, ClipReady | None]]:
        """The queued clips, oldest first: (name, message; None where its file is damaged,
        and then the clip's hash is worked out again from the clip)."""
        found: dict[str, ClipReady | None] = {}
        try:
            entries = [e for e in os.scandir(self.folder) if e.name.endswith(".json")]
        except OSError as exc:
            log.warning("cannot read the upload queue %s: %s", self.folder, exc)
            entries = []
        for entry in entries:
            name = entry.name.removesuffix(".json")
            if re.fullmatch(CLIP_NAME, name):  # fullmatch: "$" would take a final newline
                found[name] = self._read(Path(entry.path), name)
        with self._lock:
            found.update(self._unwritten)
            self._waiting = set(found)
        return sorted(found.items(), key=lambda item: (item[1].end if item[1] else 0.0, item[0]))

    def _read(self, path: Path, name: str) -> ClipReady | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as f:
                clip = ClipReady.model_validate_json(f.read(_ENTRY_MAX_BYTES + 1))
        except (OSError, ValidationError):
            return None
        return clip if clip.name == name else None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="uploads", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop taking clips; one being sent is left to the next start (the server takes a
        clip it has again as a success)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)

    def _forget(self, name: str) -> None:
        self._refused.pop(name, None)
        with self._lock:
            self._unwritten.pop(name, None)
            self._waiting.discard(name)
        try:
            (self.folder / f"{name}.json").unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot remove %s from the upload queue: %s", name, exc)

    def _run(self) -> None:
        pause = self._pause_s
        while not self._stop.is_set():
            self._wake.clear()
            if self._round():
                pause = self._pause_s
                self._wake.wait()
            elif not self._stop.wait(pause):
                pause = min(pause * 2, self._max_pause_s)

    def _round(self) -> bool:
        """Upload what is queued; False when the server could not be reached."""
        for name, clip in self.pending():
            if self._stop.is_set():
                return True
            refused = self._refused.get(name)
            if refused is not None and time.monotonic() - refused < REFUSED_RETRY_S:
                continue
            path = self.clips_dir / name
            if not path.is_file():
                log.warning("clip %s is no longer in %s: not uploaded", name, self.clips_dir)
                self._forget(name)
                continue
            try:
                upload_clip(
                    self._url,
                    self._device,
                    self._token,
                    path,
                    clip,
                    attempts=self._attempts,
                    backoff_s=self._backoff_s,
                    timeout_s=self._timeout_s,
                )
            except UploadRefused as exc:  # this clip's trouble: the others go on
                log.error("%s; it stays queued, tried again in an hour", exc)
                self._refused[name] = time.monotonic()
                continue
            except (UploadError, OSError) as exc:
                log.warning("%s; the queue (%s) is tried again later", exc, self.folder)
                return False
            self._forget(name)
        return True
