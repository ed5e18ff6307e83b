"""The device's model store: installed model files and a small JSON state file.

Layout under the state directory:

    state.json            {"format", "current", "previous", "pending_report",
                           "highest_version"} (atomic)
    models/v<version>-<sha12>.onnx   the current and the previous model (verified)
    downloads/<sha256>.part / .json  partial downloads and their persisted offsets
    incoming/                        patched models waiting to be verified
    stats.json            agent statistics (written by the agent)

Every write is write-temp + fsync + os.replace (+ fsync of the directory), so a
crash at any instant leaves either the old or the new file, never a torn one.
The state file only ever names files that were fully written before it was
replaced; on load each file's SHA-256 is verified and a bad current model falls
back to the previous one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mledge_update.hashing import sha256_file

log = logging.getLogger(__name__)

STATE_FORMAT = 1

# Points at which tests inject a crash (see Updater/ModelStore.install).
INSTALL_STEPS = (
    "before_model_write",
    "before_model_rename",
    "before_state_write",
    "after_state_write",
    "after_swap",
    "after_report",
)

CrashHook = Callable[[str], None]


def _no_crash(step: str) -> None:
    return None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=1, sort_keys=True) + "\n").encode())


@dataclass(frozen=True)
class InstalledModel:
    """One model file the state file knows about."""

    model: str
    version: int
    sha256: str
    file: str  # relative to the state dir
    installed_at: float
    job_id: str | None = None
    uplink: dict[str, Any] = field(default_factory=dict)
    schema: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> InstalledModel:
        return cls(
            model=str(value["model"]),
            version=int(value["version"]),
            sha256=str(value["sha256"]),
            file=str(value["file"]),
            installed_at=float(value.get("installed_at", 0.0)),
            job_id=value.get("job_id"),
            uplink=dict(value.get("uplink") or {}),
            schema=dict(value.get("schema") or {}),
        )


@dataclass(frozen=True)
class PendingReport:
    """A job whose model was installed but whose SUCCEEDED was not yet accepted."""

    job_id: str
    version: int
    sha256: str
    details: dict[str, str]


@dataclass
class StoreState:
    current: InstalledModel | None = None
    previous: InstalledModel | None = None
    pending_report: PendingReport | None = None
    # The highest version this device ever accepted: anti-rollback survives a rollback
    # (current drops below it) and a lost previous model.
    highest_version: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "current": asdict(self.current) if self.current else None,
            "previous": asdict(self.previous) if self.previous else None,
            "pending_report": asdict(self.pending_report) if self.pending_report else None,
            "highest_version": self.highest_version,
        }


class StateFileError(Exception):
    """state.json exists but cannot be understood."""


class ModelStore:
    def __init__(self, root: str | Path, crash_hook: CrashHook = _no_crash) -> None:
        self.root = Path(root)
        self.models_dir = self.root / "models"
        self.downloads_dir = self.root / "downloads"
        self.incoming_dir = self.root / "incoming"
        for folder in (self.root, self.models_dir, self.downloads_dir, self.incoming_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.state_path = self.root / "state.json"
        self.crash_hook = crash_hook
        self.state = self._read_state()

    # -- state file ---------------------------------------------------------
    def _read_state(self) -> StoreState:
        if not self.state_path.exists():
            return StoreState()
        try:
            raw = json.loads(self.state_path.read_text())
            pending = raw.get("pending_report")
            current = InstalledModel.from_json(raw["current"]) if raw.get("current") else None
            return StoreState(
                current=current,
                previous=InstalledModel.from_json(raw["previous"]) if raw.get("previous") else None,
                pending_report=PendingReport(**pending) if pending else None,
                # A state file from before the field: what it runs is the floor.
                highest_version=int(raw.get("highest_version")
                                    or (current.version if current else 0)),
            )
        except (ValueError, KeyError, TypeError) as exc:
            # os.replace makes a torn state file impossible; this is outside damage.
            raise StateFileError(f"{self.state_path} is unreadable: {exc}") from exc

    def _write_state(self) -> None:
        atomic_write_json(self.state_path, self.state.to_json())

    def path_of(self, record: InstalledModel) -> Path:
        return self.root / record.file

    def verify(self, record: InstalledModel | None) -> bool:
        """True when the record's file exists and has the recorded SHA-256."""
        if record is None:
            return False
        path = self.path_of(record)
        return path.is_file() and sha256_file(path) == record.sha256

    def recover(self) -> InstalledModel | None:
        """Make `current` a verified file (falling back to `previous`) and return it."""
        state = self.state
        if state.current is not None and not self.verify(state.current):
            log.error("installed model %s failed verification", state.current.file)
            if self.verify(state.previous):
                log.warning("falling back to previous model v%s", state.previous.version)  # type: ignore[union-attr]
                state.current, state.previous = state.previous, None
            else:
                state.current = None
            if state.pending_report and (
                state.current is None or state.pending_report.sha256 != state.current.sha256
            ):
                state.pending_report = None  # the job's model is gone: it is re-done, not reported
            self._write_state()
        if state.previous is not None and not self.verify(state.previous):
            state.previous = None
            self._write_state()
        self._remove_unreferenced()
        return state.current

    def find_local(self, sha256: str) -> Path | None:
        """A kept, verified model file with this hash (used for rollbacks)."""
        for record in (self.state.current, self.state.previous):
            if record is not None and record.sha256 == sha256 and self.verify(record):
                return self.path_of(record)
        return None

    # -- install ------------------------------------------------------------
    def incoming_path(self, sha256: str) -> Path:
        return self.incoming_dir / f"{sha256}.onnx"

    def write_incoming(self, sha256: str, data: bytes) -> Path:
        """Write a patched/decoded model to incoming/ (fsynced), where it is loaded and tested."""
        path = self.incoming_path(sha256)
        self.crash_hook("before_model_write")
        atomic_write_bytes(path, data)
        return path

    def install(self, incoming: Path, record: InstalledModel, pending: PendingReport) -> InstalledModel:
        """Move a verified model into models/ and point the state file at it, keeping the
        current one as `previous`. The job is recorded as pending its report."""
        final = self.root / record.file
        self.crash_hook("before_model_rename")
        os.replace(incoming, final)
        fsync_dir(final.parent)
        self.crash_hook("before_state_write")
        old = self.state.current
        if old is not None and old.sha256 != record.sha256:
            self.state.previous = old
        self.state.current = record
        self.state.pending_report = pending
        self.state.highest_version = max(self.state.highest_version, record.version)
        self._write_state()
        self.crash_hook("after_state_write")
        self._remove_unreferenced()
        return record

    def clear_pending(self, job_id: str) -> None:
        if self.state.pending_report and self.state.pending_report.job_id == job_id:
            self.state.pending_report = None
            self._write_state()

    def model_file_name(self, version: int, sha256: str) -> str:
        return f"models/v{version:05d}-{sha256[:12]}.onnx"

    def _remove_unreferenced(self) -> None:
        keep = {self.path_of(r).name for r in (self.state.current, self.state.previous) if r}
        for path in self.models_dir.iterdir():
            if path.name not in keep:
                with contextlib.suppress(OSError):
                    path.unlink()
        cutoff = time.time() - 3600
        for path in self.incoming_dir.iterdir():
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()
