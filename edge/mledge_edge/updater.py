"""One model update, from job document to swapped-in model.

Order (docs/device.md, "update state machine"): parse -> verify the release
signature (before anything is downloaded) -> check model/version (anti-rollback) ->
for each candidate artifact (matching deltas, smallest first, then the full
model): download (resumable, verified) -> patch/decode -> check model_sha256 ->
write to incoming/ -> load beside the running model -> check schema -> smoke
rows -> install atomically (state file records "pending report") -> swap.
The caller reports SUCCEEDED only after `run` returns, then clears the pending
report. Any failure raises `UpdateFailedError` (FAILED: retryable) or
`UpdateRejectedError` (REJECTED: incompatible), and the running model is untouched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mledge_update import JobDocumentError, PatchError, SignatureError, UnknownCodecError
from mledge_update.codecs import (
    SUPPORTED_CODECS,
    apply_delta,
    apply_delta_file,
    decode_full,
    get_codec,
)
from mledge_update.document import Delta, FullModel, UpdateJob, parse_job_document
from mledge_update.hashing import sha256_hex
from mledge_update.iot_jobs import status_details
from mledge_update.signing import ReleaseVerifier

from .download import Downloader, DownloadError, DownloadStats, IntegrityError
from .model import LoadedModel, ModelHandle, ModelLoadError, SmokeTestError, run_smoke
from .store import InstalledModel, ModelStore, PendingReport

log = logging.getLogger(__name__)

FAILED = "FAILED"
REJECTED = "REJECTED"
SUCCEEDED = "SUCCEEDED"


class UpdateError(Exception):
    status = FAILED

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason


class UpdateFailedError(UpdateError):
    """Retryable (network, timeouts): IoT Jobs may retry the execution."""

    status = FAILED


class UpdateRejectedError(UpdateError):
    """Incompatible or untrustworthy: retrying the same job cannot succeed."""

    status = REJECTED


# Progress reporter: receives statusDetails (str -> str, at most 10 keys).
Reporter = Callable[[dict[str, str]], None]
# Re-reads the job execution and returns its (freshly resolved) document, or None.
DocumentRefresher = Callable[[], dict[str, Any] | None]


@dataclass
class UpdateResult:
    version: int
    sha256: str
    codec: str  # the delta codec, "full:<encoding>", "local" or "already-installed"
    bytes_downloaded: int
    details: dict[str, str] = field(default_factory=dict)


def _artifact_name(artifact: FullModel | Delta) -> str:
    if isinstance(artifact, Delta):
        return f"delta:{artifact.codec}:v{artifact.from_version}"
    return f"full:{artifact.encoding}"


class Updater:
    def __init__(
        self,
        store: ModelStore,
        handle: ModelHandle,
        downloader: Downloader,
        *,
        model_name: str,
        verifier: ReleaseVerifier | None,
        expected_features: Sequence[str] | None = None,
        supported_codecs: Sequence[str] = SUPPORTED_CODECS,
        session_threads: int = 1,
        progress_interval_s: float = 2.0,
        on_installed: Callable[[InstalledModel], None] | None = None,
    ) -> None:
        self.store = store
        self.handle = handle
        self.downloader = downloader
        self.model_name = model_name
        # None only when the operator explicitly allowed unsigned releases.
        self.verifier = verifier
        self.expected_features = tuple(expected_features) if expected_features else None
        self.supported_codecs = tuple(supported_codecs)
        self.session_threads = session_threads
        self.progress_interval_s = progress_interval_s
        self.on_installed = on_installed

    def run(
        self,
        job_id: str,
        document: dict[str, Any],
        report: Reporter,
        refresh_document: DocumentRefresher | None = None,
    ) -> UpdateResult:
        try:
            job = parse_job_document(document)
        except JobDocumentError as exc:
            raise UpdateRejectedError("parse", f"invalid job document: {exc}") from exc
        if self.verifier is not None:
            try:
                self.verifier.verify(job)
            except SignatureError as exc:
                raise UpdateRejectedError("signature", str(exc)) from exc
        self._check_target(job)
        installed = self.store.state.current
        if installed is not None and installed.sha256 == job.model_sha256:
            if self.handle.info is None or self.handle.info.sha256 != job.model_sha256:
                self._load_and_swap(self.store.path_of(installed), job)
            return UpdateResult(job.version, job.model_sha256, "already-installed", 0,
                                status_details(stage="installed", version=job.version,
                                               codec="already-installed"))

        # Partials of other (canceled, replaced) jobs would otherwise fill the disk.
        self.downloader.discard_others({job.full.sha256, *(d.sha256 for d in job.deltas)})
        report(status_details(stage="downloading", version=job.version))
        model_bytes, codec, downloaded = self._obtain(job_id, job, report, refresh_document)
        report(status_details(stage="verifying", version=job.version, codec=codec,
                              bytes_downloaded=downloaded))
        incoming = self.store.write_incoming(job.model_sha256, model_bytes)
        del model_bytes
        try:
            candidate = self._load_checked(incoming, job)
            record = InstalledModel(
                model=job.model,
                version=job.version,
                sha256=job.model_sha256,
                file=self.store.model_file_name(job.version, job.model_sha256),
                installed_at=time.time(),
                job_id=job_id,
                uplink=dict(job.uplink),
                schema=dict(job.schema),
            )
            details = status_details(stage="installed", version=job.version, codec=codec,
                                     bytes_downloaded=downloaded,
                                     previous_version=installed.version if installed else None)
            self.store.install(incoming, record, PendingReport(job_id, job.version, job.model_sha256, details))
        finally:
            with contextlib.suppress(FileNotFoundError):
                incoming.unlink()  # still there only when the model was not installed
        # The candidate session was loaded from incoming/; reload from its final
        # path is unnecessary (the session holds the model in memory).
        self.handle.swap(candidate)
        self.store.crash_hook("after_swap")
        if self.on_installed is not None:
            self.on_installed(record)
        log.info("model %s v%s installed via %s (%d bytes downloaded)",
                 job.model, job.version, codec, downloaded)
        return UpdateResult(job.version, job.model_sha256, codec, downloaded, details)

    # -- checks ---------------------------------------------------------------
    def _check_target(self, job: UpdateJob) -> None:
        if job.model != self.model_name:
            raise UpdateRejectedError("check", f"job is for model {job.model!r}, this device runs {self.model_name!r}")
        features = tuple(job.schema.get("features", ()))
        if self.expected_features is not None and features != self.expected_features:
            raise UpdateRejectedError(
                "check",
                f"schema has {len(features)} features {list(features)[:4]}..., "
                f"this device's sensor produces {len(self.expected_features)}",
            )
        installed = self.store.state.current
        highest = max(self.store.state.highest_version, installed.version if installed else 0)
        if job.version < highest:
            # Anti-rollback: an older release is taken only when the signed document
            # says it is a rollback away from a release at least as new as the one
            # running here (a replayed rollback from an older release is refused).
            if not job.rollback:
                raise UpdateRejectedError(
                    "check", f"downgrade to v{job.version} refused: v{highest} was accepted "
                    "before and this release is not a rollback")
            running = installed.version if installed else 0
            if job.rollback_from is not None and job.rollback_from < running:
                raise UpdateRejectedError(
                    "check", f"rollback from v{job.rollback_from} to v{job.version} refused: "
                    f"this device runs v{running} (a replayed older rollback)")
        if installed is None:
            return
        if job.version == installed.version and job.model_sha256 != installed.sha256:
            raise UpdateRejectedError(
                "check", f"v{job.version} is installed with another sha256 ({installed.sha256[:12]})"
            )

    def _load_checked(self, path, job: UpdateJob) -> LoadedModel:
        try:
            model = LoadedModel(path, job.model_sha256, threads=self.session_threads)
        except ModelLoadError as exc:
            raise UpdateRejectedError("load", str(exc)) from exc
        info = model.info
        features = list(job.schema.get("features", []))
        if info.n_features != len(features):
            raise UpdateRejectedError("schema", f"model takes {info.n_features} features, schema has {len(features)}")
        if info.features and list(info.features) != features:
            raise UpdateRejectedError("schema", "model's mledge.features differ from the job's schema")
        if info.name and info.name != job.model:
            raise UpdateRejectedError("schema", f"model metadata names {info.name!r}, job is for {job.model!r}")
        if info.version != job.version:
            raise UpdateRejectedError("schema", f"model metadata says v{info.version}, job says v{job.version}")
        if job.smoke.input_name != "input":
            raise UpdateRejectedError("smoke", f"smoke input {job.smoke.input_name!r} is not the model's input")
        try:
            run_smoke(model, job.smoke.inputs, job.smoke.outputs, job.smoke.tolerance)
        except SmokeTestError as exc:
            raise UpdateRejectedError("smoke", str(exc)) from exc
        return model

    def _load_and_swap(self, path, job: UpdateJob) -> None:
        self.handle.swap(self._load_checked(path, job))

    # -- artifacts --------------------------------------------------------------
    def _obtain(self, job_id: str, job: UpdateJob, report: Reporter,
                refresh_document: DocumentRefresher | None) -> tuple[bytes, str, int]:
        """The new model's bytes (sha256 checked), the artifact used, bytes downloaded."""
        local = self.store.find_local(job.model_sha256)
        if local is not None:  # a rollback to the kept previous model: nothing to fetch
            return local.read_bytes(), "local", 0
        installed = self.store.state.current
        base: Path | None = None
        if installed is not None and self.store.verify(installed):
            base = self.store.path_of(installed)
        candidates = job.candidates(installed.sha256 if base is not None and installed else None,
                                    self.supported_codecs)
        if not candidates:
            raise UpdateRejectedError("check", f"no artifact this device can use (full encoding {job.full.encoding!r})")
        downloaded = 0
        errors: list[str] = []
        full_network_failure = False
        for artifact in candidates:
            name = _artifact_name(artifact)
            stats = DownloadStats()
            try:
                blob = self.downloader.fetch(
                    artifact.sha256,
                    artifact.size,
                    self._url_provider(job, artifact, refresh_document),
                    self._progress(report, job, name),
                    stats,
                )
            except DownloadError as exc:
                downloaded += stats.bytes_fetched
                full_network_failure = full_network_failure or isinstance(artifact, FullModel)
                errors.append(f"{name}: {exc}")
                log.warning("%s", errors[-1])
                continue
            except IntegrityError as exc:
                downloaded += stats.bytes_fetched
                errors.append(f"{name}: {exc}")
                log.warning("%s", errors[-1])
                continue
            downloaded += stats.bytes_fetched
            try:
                if isinstance(artifact, Delta):
                    assert base is not None
                    new = self._apply_delta(artifact.codec, base, blob)
                else:
                    new = decode_full(artifact.encoding, blob)
            except (PatchError, UnknownCodecError) as exc:
                errors.append(f"{name}: {exc}")
                log.warning("%s", errors[-1])
                continue
            if sha256_hex(new) != job.model_sha256:
                errors.append(f"{name}: result's sha256 is not model_sha256")
                log.warning("%s", errors[-1])
                continue
            return new, name, downloaded
        reason = "; ".join(errors)
        if full_network_failure:  # the last resort could not be fetched: worth retrying
            raise UpdateFailedError("download", reason)
        raise UpdateRejectedError("verify", reason)

    def _apply_delta(self, codec: str, base: Path, blob: bytes) -> bytes:
        """Codecs that stream (onnx-delta-2) patch from file to file, so the installed
        model is never read whole beside the delta's working set; others run in memory."""
        if get_codec(codec).apply_stream is None:
            return apply_delta(codec, base.read_bytes(), blob)
        delta_path = self.store.incoming_dir / f"delta-{os.getpid()}.part"
        out_path = self.store.incoming_dir / f"patched-{os.getpid()}.part"
        try:
            delta_path.write_bytes(blob)
            apply_delta_file(codec, base, delta_path, out_path)
            return out_path.read_bytes()
        finally:
            delta_path.unlink(missing_ok=True)
            out_path.unlink(missing_ok=True)

    def _url_provider(self, job: UpdateJob, artifact: FullModel | Delta,
                      refresh_document: DocumentRefresher | None):
        current = {"url": artifact.url or ""}

        def url_for(refresh: bool) -> str:
            if refresh and refresh_document is not None:
                fresh = refresh_document()
                if fresh is not None:
                    with contextlib.suppress(JobDocumentError):
                        renewed = parse_job_document(fresh)
                        candidates: tuple[FullModel | Delta, ...] = (renewed.full, *renewed.deltas)
                        for candidate in candidates:
                            if candidate.sha256 == artifact.sha256 and candidate.url:
                                current["url"] = candidate.url
                                log.info("got a fresh URL for %s", _artifact_name(artifact))
            return current["url"]

        return url_for

    def _progress(self, report: Reporter, job: UpdateJob, name: str):
        last = [time.monotonic()]

        def progress(done: int, total: int) -> None:
            now = time.monotonic()
            if now - last[0] >= self.progress_interval_s:
                last[0] = now
                report(status_details(stage="downloading", version=job.version, codec=name,
                                      bytes_downloaded=done, bytes_total=total))

        return progress
