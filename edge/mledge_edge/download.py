"""Resumable artifact downloads over HTTP(S) with retries and verification.

A partial download lives in `downloads/<sha256>.part`; after each fsynced chunk
group its offset is written to `downloads/<sha256>.json`, so a restarted agent
resumes with an HTTP Range request instead of starting over. Presigned URLs
expire: a 403 (or 400) asks the caller for a fresh URL (the agent re-reads the
job execution) and the download resumes from the persisted offset.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .store import atomic_write_json

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
PERSIST_EVERY = 1024 * 1024  # bytes between persisted offsets


class DownloadError(Exception):
    """The artifact could not be fetched (retryable: network, timeouts, server errors)."""


class IntegrityError(Exception):
    """The downloaded bytes do not have the size/SHA-256 the job document names."""


# (refresh: bool) -> url. refresh=True asks for a new URL (the old one expired/was refused).
UrlProvider = Callable[[bool], str]
Progress = Callable[[int, int], None]  # (bytes so far, total)


@dataclass
class DownloadStats:
    bytes_fetched: int = 0  # bytes actually transferred this call (not resumed ones)
    resumed_from: int = 0
    attempts: int = 0
    url_refreshes: int = 0


class Downloader:
    def __init__(
        self,
        folder: str | Path,
        *,
        retries: int = 4,
        timeout_s: float = 30.0,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.retries = retries
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.sleep = sleep

    def _paths(self, sha256: str) -> tuple[Path, Path]:
        return self.folder / f"{sha256}.part", self.folder / f"{sha256}.json"

    def discard(self, sha256: str) -> None:
        for path in self._paths(sha256):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def partials(self) -> set[str]:
        """SHA-256s of the artifacts with a partial download on disk."""
        return {path.name.split(".", 1)[0] for path in self.folder.iterdir()
                if path.suffix in (".part", ".json")}

    def discard_others(self, keep: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """Delete every partial download but `keep`'s (a job canceled while the device
        was off, or replaced, never comes back to finish them); returns what went."""
        gone = sorted(self.partials() - set(keep))
        for sha256 in gone:
            self.discard(sha256)
        if gone:
            log.info("deleted %d partial download(s) no pending job needs: %s", len(gone),
                     ", ".join(g[:12] for g in gone))
        return gone

    def _resume_offset(self, sha256: str, size: int) -> int:
        part, meta = self._paths(sha256)
        try:
            saved = json.loads(meta.read_text())
            offset = int(saved["offset"])
        except (FileNotFoundError, ValueError, KeyError):
            offset = 0
        if not part.exists() or offset > size or part.stat().st_size < offset:
            offset = 0
        # Bytes past the persisted offset may never have reached the disk: drop them.
        with open(part, "ab") as fh:
            fh.truncate(offset)
        return offset

    def _persist(self, sha256: str, offset: int, fh) -> None:
        fh.flush()
        os.fsync(fh.fileno())
        atomic_write_json(self._paths(sha256)[1], {"offset": offset, "sha256": sha256})

    def fetch(
        self,
        sha256: str,
        size: int,
        url_for: UrlProvider,
        progress: Progress | None = None,
        stats: DownloadStats | None = None,
    ) -> bytes:
        """Download, verify and return the artifact's bytes (deleting the partial file)."""
        stats = stats if stats is not None else DownloadStats()
        part, _ = self._paths(sha256)
        integrity_failures = 0
        failures = 0
        refresh = False
        last_error = "no attempt made"
        while True:
            offset = self._resume_offset(sha256, size)
            if stats.attempts == 0:
                stats.resumed_from = offset
            stats.attempts += 1
            try:
                if offset < size:
                    url = url_for(refresh)
                    if refresh:
                        stats.url_refreshes += 1
                    refresh = False
                    self._transfer(sha256, url, offset, size, progress, stats)
                data = part.read_bytes()
                if len(data) != size or hashlib.sha256(data).hexdigest() != sha256:
                    integrity_failures += 1
                    self.discard(sha256)
                    last_error = f"downloaded {len(data)} bytes whose sha256 is not {sha256[:12]}"
                    if integrity_failures > 1:
                        raise IntegrityError(last_error + " (twice)")
                    log.warning("%s; downloading again", last_error)
                    continue
                self.discard(sha256)
                return data
            except _SizeMismatchError as exc:
                integrity_failures += 1
                self.discard(sha256)
                last_error = str(exc)
                if integrity_failures > 1:
                    raise IntegrityError(last_error + " (twice)") from exc
                log.warning("%s; downloading again", last_error)
                continue
            except _UrlRefusedError as exc:
                last_error = str(exc)
                refresh = True
            except (urllib.error.URLError, http.client.HTTPException, OSError, _ServerError) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            failures += 1
            if failures > self.retries:
                raise DownloadError(f"download failed after {failures} attempts: {last_error}")
            delay = min(self.max_backoff_s, self.backoff_s * 2 ** (failures - 1))
            log.warning("download attempt %d failed (%s); retrying in %.1fs", failures, last_error, delay)
            self.sleep(delay)

    def _transfer(self, sha256: str, url: str, offset: int, size: int,
                  progress: Progress | None, stats: DownloadStats) -> None:
        part, _ = self._paths(sha256)
        request = urllib.request.Request(url)
        if offset:
            request.add_header("Range", f"bytes={offset}-")
        try:
            response = urllib.request.urlopen(request, timeout=self.timeout_s)
        except urllib.error.HTTPError as exc:
            if exc.code == 416:
                if offset >= size:
                    return  # already complete
                self.discard(sha256)  # the object is shorter than our partial: start over
                raise _ServerError(f"HTTP 416 at offset {offset}; restarting from 0") from exc
            if exc.code in (400, 401, 403):
                raise _UrlRefusedError(f"HTTP {exc.code} from artifact URL (expired?)") from exc
            if exc.code == 404:
                raise _UrlRefusedError("HTTP 404 from artifact URL") from exc
            raise _ServerError(f"HTTP {exc.code}") from exc
        with response:
            if offset and response.status != 206:
                offset = 0  # the server ignored the Range header: start over
            total = _total_size(response, offset)
            if total is not None and total != size:
                raise _SizeMismatchError(f"artifact is {total} bytes, the job document says {size}")
            with open(part, "r+b" if part.exists() else "wb") as fh:
                fh.truncate(offset)
                fh.seek(offset)
                unsynced = 0
                while True:
                    try:
                        chunk = response.read(CHUNK)
                    except (TimeoutError, http.client.HTTPException, OSError) as exc:
                        # Keep what arrived: the next attempt resumes from here.
                        self._persist(sha256, offset, fh)
                        raise _ServerError(f"transfer broke at {offset} bytes: {exc!r}") from exc
                    if not chunk:
                        break
                    fh.write(chunk)
                    offset += len(chunk)
                    unsynced += len(chunk)
                    stats.bytes_fetched += len(chunk)
                    if offset > size:
                        raise _ServerError(f"server sent more than the expected {size} bytes")
                    if unsynced >= PERSIST_EVERY:
                        self._persist(sha256, offset, fh)
                        unsynced = 0
                    if progress is not None:
                        progress(offset, size)
                self._persist(sha256, offset, fh)
        if offset < size:
            raise _ServerError(f"connection closed at {offset} of {size} bytes")


class _UrlRefusedError(Exception):
    pass


class _ServerError(Exception):
    pass


class _SizeMismatchError(Exception):
    pass


def _total_size(response, offset: int) -> int | None:
    """The whole object's size from Content-Range (206) or Content-Length (200)."""
    content_range = response.headers.get("Content-Range", "")
    if response.status == 206 and "/" in content_range:
        total = content_range.rsplit("/", 1)[1]
        return int(total) if total.isdigit() else None
    length = response.headers.get("Content-Length")
    if length is not None and length.isdigit():
        return int(length) + (offset if response.status == 206 else 0)
    return None
