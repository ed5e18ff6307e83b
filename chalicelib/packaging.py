"""Packaging: turn an approved model into a release and start the fleet's update.

On `ModelApproved` (packaging, then the job document; docs/packaging.md):
1. take `model.onnx` and `golden.json` out of the training artifact (`model.tar.gz`);
2. upload the model (raw, the next training's champion and the base of later deltas)
   and the full artifact (zstd) under `releases/<model>/v<version>/`;
3. for each of the last K released versions build a delta per codec within the
   model's time and memory budget (delta_budget.py), verify it by
   applying it and comparing SHA-256, and drop it unless smaller than the full
   artifact (bsdiff4 is always offered when it wins, so devices that know only the
   baseline still get a delta; a newer codec is offered beside it when smaller);
4. write the manifest, create one IoT Job for the model's thing group (ota.py), mark
   the version RELEASED (the previous one SUPERSEDED, or ROLLED_BACK for a rollback),
   and cancel the queued executions of the replaced release's job.

Idempotent: a version that is already released is left alone, the job id is
deterministic per release attempt, and every upload writes the same bytes to the same
key. A corrupt or missing artifact is recorded on the version (history) and nothing is
released; `mledge release` retries it as a new attempt with its own job.

Releases move forward only: an approval older than the current release (a late or
replayed event) is skipped with a reason; of two packagings racing, the registry's
conditional release decides, the loser cancels the job it created and either retries
on top of the winner (it is newer) or is skipped (it is older), so exactly one job is
live, the newest's. A rollback is its own action (`replaces` must still be the current
release) with its own job. When the release ends, however it ends, the training lock
the approved version still holds is released (completion keeps it across the release,
so no training is scored against a champion that is about to be replaced).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import IO, Any

from aws_lambda_powertools import Logger
from botocore.exceptions import ClientError
from mledge_update.codecs import encode_full
from mledge_update.document import (
    JOB_DOCUMENT_MAX_CHARS,
    Delta,
    FullModel,
    HealthProbe,
    UpdateJob,
    build_manifest,
    fit_job,
    presigned_url_placeholder,
    serialize_job_document,
    smoke_from_golden,
)
from mledge_update.errors import JobDocumentTooLargeError, UpdateFormatError
from mledge_update.hashing import sha256_hex
from mledge_update.naming import iot_job_id

from chalicelib import layout, ota
from chalicelib.artifacts import MAX_MEMBER_BYTES, ArtifactError, open_object, parse_s3_uri, s3_uri, tar_members
from chalicelib.aws import AwsClients, error_code
from chalicelib.config import ModelConfig, PackagingConfig, PipelineConfig, UnknownModelError
from chalicelib.delta_budget import BASELINE_CODEC, build_deltas
from chalicelib.observability import PipelineMetrics, correlate, correlated
from chalicelib.records import INT64_MAX
from chalicelib.registry import (
    AlreadyReleasedError,
    Registry,
    Status,
    TransitionError,
    UnknownVersionError,
    VersionRecord,
    now_iso,
)
from chalicelib.settings import Settings
from chalicelib.signing import KmsReleaseSigner, SigningError
from chalicelib.state import StateStore
from chalicelib.untrusted import shown

logger = Logger(child=True)

FULL_ENCODING = "zstd"

class PackagingError(Exception):
    """The release could not be built; the reason is recorded on the version."""


@dataclass(frozen=True)
class ModelApproved:
    """The detail of a `ModelApproved` event."""

    model: str
    version: int
    artifact: str | None = None
    manual: bool = False
    rollback: bool = False
    replaces: int | None = None
    attempt: str | None = None
    """Set by an operator action (rollback, release retry) or an automatic rollback: part
    of the job id, so each action gets its own job and a cancelled job's id is never reused."""
    reason: str = ""  # why (a rollback's reason is recorded in the registry)

    @classmethod
    def from_detail(cls, detail: Any) -> ModelApproved:
        """Parse an event detail; PackagingError names the first field that is wrong."""
        if not isinstance(detail, dict):
            raise PackagingError(f"ModelApproved detail must be an object, got "
                                 f"{type(detail).__name__}")
        model, version = detail.get("model"), detail.get("version")
        if not isinstance(model, str) or not model:
            raise PackagingError(f"ModelApproved detail needs model (a non-empty string), "
                                 f"got {shown(model)}")
        if type(version) is not int or not 1 <= version <= INT64_MAX:
            raise PackagingError(f"ModelApproved detail needs version (a whole number >= 1), "
                                 f"got {shown(version)}")
        artifact = detail.get("artifact")
        if artifact is not None and not isinstance(artifact, str):
            raise PackagingError(f"ModelApproved artifact must be an s3:// URI, got "
                                 f"{shown(artifact)}")
        reason = detail.get("reason", "")
        if not isinstance(reason, str):
            raise PackagingError(f"ModelApproved reason must be a string, got {shown(reason)}")
        flags = {}
        for name in ("manual", "rollback"):
            value = detail.get(name, False)
            if not isinstance(value, bool):
                raise PackagingError(f"ModelApproved {name} must be true or false, got "
                                     f"{shown(value)}")
            flags[name] = value
        replaces = detail.get("replaces")
        if replaces is not None and type(replaces) is not int:
            raise PackagingError(f"ModelApproved replaces must be a version number, got "
                                 f"{shown(replaces)}")
        attempt = detail.get("attempt")
        if attempt is not None and (not isinstance(attempt, str) or not attempt
                                    or len(attempt) > 32 or not attempt.isalnum()
                                    or not attempt.isascii()):
            raise PackagingError(f"ModelApproved attempt must be 1-32 letters and digits, got "
                                 f"{shown(attempt)}")
        return cls(model=model, version=version, artifact=artifact or None,
                   replaces=replaces, attempt=attempt, reason=reason[:1000], **flags)


@dataclass
class ReleaseResult:
    model: str
    version: int
    outcome: str  # released | skipped | failed | invalid
    reason: str = ""
    job_id: str | None = None
    manifest_key: str | None = None
    model_size: int = 0
    full_size: int = 0
    deltas: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "version": self.version, "outcome": self.outcome,
            "reason": self.reason, "job_id": self.job_id, "manifest_key": self.manifest_key,
            "model_size": self.model_size, "full_size": self.full_size, "deltas": self.deltas,
        }


@dataclass(frozen=True)
class ModelFiles:
    onnx: bytes
    golden: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)


def handle_model_approved(
    detail: dict[str, Any],
    *,
    clients: AwsClients,
    settings: Settings,
    config: PipelineConfig,
    registry: Registry | None = None,
) -> ReleaseResult:
    """Release the approved version named in a `ModelApproved` event's detail.

    A malformed detail is logged with its reason and dropped (outcome `invalid`):
    EventBridge would only retry it unchanged.
    """
    try:
        event = ModelApproved.from_detail(detail)
    except PackagingError as exc:
        logger.error("invalid ModelApproved dropped", extra={
            "error": str(exc), "detail": shown(detail, 2000)})
        return ReleaseResult("", 0, "invalid", f"invalid ModelApproved detail: {exc}")
    with correlated(model=event.model, version=event.version):
        return _handle(event, clients=clients, settings=settings, config=config,
                       registry=registry)


def _handle(event: ModelApproved, *, clients: AwsClients, settings: Settings,
            config: PipelineConfig, registry: Registry | None) -> ReleaseResult:
    registry = registry or Registry.for_settings(settings, clients)
    try:
        model_config = config.model(event.model)
        record = registry.get(event.model, event.version)
    except (UnknownModelError, UnknownVersionError) as exc:
        logger.warning("ModelApproved for something we do not know", extra={"error": str(exc)})
        return ReleaseResult(event.model, event.version, "skipped", str(exc))

    state = StateStore(settings.state_table, clients.dynamodb)
    try:
        result = _release_or_skip(event, record, model_config, registry, clients, settings)
    finally:
        # The approved version kept its training lock across the release (completion):
        # whatever happened, the next training may start now, against the fleet's model.
        state.release_training_lock(event.model, event.version)
    return result


def _release_or_skip(event: ModelApproved, record: VersionRecord, model_config: ModelConfig,
                     registry: Registry, clients: AwsClients, settings: Settings
                     ) -> ReleaseResult:
    skip = why_not_releasable(event, record, registry.released_version(event.model))
    if skip:
        return _skipped(event, registry, skip)
    try:
        return _release(event, record, model_config, registry, clients, settings)
    except ReleaseOvertakenError as exc:
        return _skipped(event, registry, str(exc))
    except (PackagingError, ArtifactError) as exc:
        reason = f"release failed: {exc}"
        logger.error(reason, extra={"model": event.model, "version": event.version})
        registry.note(event.model, event.version, reason)
        return ReleaseResult(event.model, event.version, "failed", reason)


def _skipped(event: ModelApproved, registry: Registry, reason: str) -> ReleaseResult:
    logger.info("not releasing", extra={"model": event.model, "version": event.version,
                                        "reason": reason})
    # Recorded on the version (a replayed event for the current release is not news).
    if "already the current release" not in reason:
        registry.note(event.model, event.version, f"release skipped: {reason}")
    return ReleaseResult(event.model, event.version, "skipped", reason)


def why_not_releasable(event: ModelApproved, record: VersionRecord,
                       current: int | None) -> str | None:
    """Why this event must not release anything now (None: go ahead)."""
    if current == event.version:
        return f"v{event.version} is already the current release"
    if event.rollback:
        if record.status not in (Status.SUPERSEDED, Status.ROLLED_BACK):
            return (f"v{event.version} is {record.status}: a rollback goes to a version that "
                    "was released before")
        if event.replaces is not None and current != event.replaces:
            return (f"the rollback to v{event.version} was asked to replace v{event.replaces}, "
                    f"but the fleet now runs v{current}: a rollback never undoes a release it "
                    "did not see")
        return None
    if record.status is not Status.APPROVED:
        return f"v{event.version} is {record.status}, not APPROVED"
    if current is not None and current > event.version:
        return (f"v{event.version} is older than the current release v{current}: releases "
                "move forward only (a late or replayed approval)")
    return None


class ReleaseOvertakenError(PackagingError):
    """A newer release won the race while this one was being packaged."""


def _release(event: ModelApproved, record: VersionRecord, model_config: ModelConfig,
             registry: Registry, clients: AwsClients, settings: Settings) -> ReleaseResult:
    started = time.monotonic()
    s3 = clients.s3
    bucket = settings.bucket
    model, version = event.model, event.version

    if event.rollback:
        files = _load_released_files(s3, bucket, model, version)
    else:
        artifact = event.artifact or record.artifact
        if not artifact:
            raise ArtifactError(f"no training artifact is recorded for v{version}")
        files = read_training_artifact(s3, artifact, default_bucket=bucket)

    model_sha = sha256_hex(files.onnx)
    try:
        smoke = smoke_from_golden(files.golden)
    except UpdateFormatError as exc:
        raise ArtifactError(f"golden.json is not a valid smoke test: {exc}") from None

    full_blob = encode_full(FULL_ENCODING, files.onnx)
    full = FullModel(encoding=FULL_ENCODING, size=len(full_blob), sha256=sha256_hex(full_blob),
                     key=layout.release_full_key(model, version, FULL_ENCODING))
    if not event.rollback:
        _put(s3, bucket, layout.champion_key(model, version), files.onnx,
             {"sha256": model_sha})
        _put(s3, bucket, layout.release_golden_key(model, version), json.dumps(files.golden).encode())
        _put(s3, bucket, layout.release_metrics_key(model, version), json.dumps(files.metrics).encode())
    _put(s3, bucket, full.key or "", full_blob, {"sha256": full.sha256})

    bases = [r for r in registry.release_history(model, model_config.delta_history + 1)
             if r.version != version][: model_config.delta_history]
    skipped: list[dict[str, Any]] = []
    deltas = _build_deltas(s3, bucket, model, version, files.onnx, model_sha, full.size, bases,
                           model_config.packaging, skipped)

    rollback_from = registry.released_version(model) if event.rollback else None
    # A canary release goes to the canary group first, asking each device for a health
    # report; chalicelib/canary.py releases the same signed document to the fleet (or
    # rolls it back through a signed rollback release).
    canary = model_config.canary.enabled and not event.rollback
    job = UpdateJob(
        model=model, version=version, model_sha256=model_sha, model_size=len(files.onnx),
        full=full, smoke=smoke, schema=model_config.schema.to_document(),
        deltas=tuple(deltas), uplink=model_config.uplink.to_document(),
        rollback=event.rollback, rollback_from=rollback_from,
        health=HealthProbe(model_config.canary.health_readings) if canary else None,
    )
    # Fit first, sign second: the signature covers the deltas the document keeps. The
    # fit measures the document with its (longer) presign placeholders.
    def url_for(key: str) -> str:
        return presigned_url_placeholder(settings.region, bucket, key)

    try:
        fitted = fit_job(_with_urls(job, url_for))
        signed = KmsReleaseSigner(clients.kms, settings.signing_key_id).sign(fitted)
    except (JobDocumentTooLargeError, SigningError) as exc:
        raise PackagingError(str(exc)) from None
    document = signed.to_document()
    if len(serialize_job_document(document)) > JOB_DOCUMENT_MAX_CHARS:
        raise PackagingError(f"signed job document for {model} v{version} exceeds "
                             f"{JOB_DOCUMENT_MAX_CHARS} characters")
    kept = {(d.from_version, d.codec) for d in signed.deltas}
    dropped = [d for d in deltas if (d.from_version, d.codec) not in kept]
    if dropped:
        logger.warning("job document too large: oldest deltas dropped",
                       extra={"dropped": [(d.from_version, d.codec) for d in dropped]})
    manifest = build_manifest(signed, created_at=now_iso(), metrics=record.metrics or {})
    job_id = iot_job_id(model, version, rollback=event.rollback, attempt=event.attempt,
                        canary=canary)
    correlate(job=job_id)
    manifest_key = (layout.release_manifest_key(model, version) if not event.rollback
                    else layout.rollback_manifest_key(model, version, job_id))
    _put(s3, bucket, manifest_key, json.dumps(manifest, indent=1).encode())

    try:
        ota.ensure_update_job(
            clients.iot, job_id=job_id, document=document, model_config=model_config,
            presign_role_arn=settings.iot_presign_role_arn, stage=settings.stage,
            version=version, thing_group=model_config.canary.thing_group if canary else None,
        )
    except ota.OtaError as exc:
        raise PackagingError(str(exc)) from None

    released_deltas = [{"from_version": d.from_version, "codec": d.codec, "size": d.size}
                       for d in deltas if (d.from_version, d.codec) in kept]
    release_info = {
        "job_id": job_id,
        "manifest_key": manifest_key,
        "model_sha256": model_sha,
        "model_size": len(files.onnx),
        "full_size": full.size,
        "deltas": released_deltas,
        "rollback": event.rollback,
        "manual": event.manual,
        "signing_key": signed.signature.key_id if signed.signature else "",
        "deltas_skipped": skipped,
        "packaging_seconds": round(time.monotonic() - started, 3),
        "phase": "canary" if canary else "fleet",
    }
    if event.reason:
        release_info["reason"] = event.reason
    if event.attempt:
        # The canary's promotion names the fleet job after the same attempt.
        release_info["attempt"] = event.attempt
    previous = _mark_released(event, registry, clients, job_id, release_info)
    if previous is not None and previous.version != version:
        # The previous release's job keeps serving the fleet while a canary runs.
        old_jobs = sorted({str(j) for j in ((previous.release or {}).get("job_id"),
                                            (previous.release or {}).get("canary_job_id"))
                           if j and j != job_id})
        for old_job in old_jobs if not canary else []:
            ota.cancel_queued(clients.iot, old_job, f"replaced by v{version}")

    logger.info("released", extra=release_info)
    PipelineMetrics(settings.stage).release(
        model, version, full.size, [d.size for d in signed.deltas], event.rollback)
    return ReleaseResult(model, version, "released", job_id=job_id, manifest_key=manifest_key,
                         model_size=len(files.onnx), full_size=full.size,
                         deltas=released_deltas)


def _mark_released(event: ModelApproved, registry: Registry, clients: AwsClients, job_id: str,
                   release_info: dict[str, Any]) -> VersionRecord | None:
    """Make the registry say `event.version` is released; returns the release it replaced.

    The registry's write is conditional on the release it read. When another packaging
    wins in between, this one either goes again on top of the winner (it is still newer)
    or cancels the job it created and is skipped (the winner is newer): a lost race never
    leaves a second live job.
    """
    model, version = event.model, event.version
    for _ in range(5):
        previous = registry.current_release(model)
        if previous is not None and previous.version == version:
            return None  # a repeated event: the first delivery released it
        record = registry.get(model, version)
        skip = why_not_releasable(event, record, previous.version if previous else None)
        if skip:
            ota.cancel_job(clients.iot, job_id, f"not released: {skip}")
            raise ReleaseOvertakenError(skip)
        try:
            registry.mark_released(model, version, release_info)
            return previous
        except AlreadyReleasedError:
            return None
        except TransitionError as exc:
            logger.info("release race lost; checking again", extra={"error": str(exc)})
    ota.cancel_job(clients.iot, job_id, "registry kept changing")
    raise PackagingError("the registry kept changing under the release; try again")


def _build_deltas(s3: Any, bucket: str, model: str, version: int, new: bytes, new_sha: str,
                  full_size: int,
                  bases: list[VersionRecord], budget: PackagingConfig,
                  skipped: list[dict[str, Any]]) -> list[Delta]:
    """Verified deltas from each base that beat the full artifact, built within the
    model's packaging budget (delta_budget.py); what was skipped and why goes to `skipped`.

    Per base: the bsdiff4 delta when it beats the full artifact, plus the smallest
    delta of any other codec when it beats both (devices choose the smallest they know).
    """
    deltas: list[Delta] = []
    deadline = time.monotonic() + budget.time_budget_seconds
    for base in bases:
        base_sha = (base.release or {}).get("model_sha256")
        try:
            old = _get(s3, bucket, layout.champion_key(base.model, base.version))
        except ArtifactError as exc:
            logger.warning("delta base unavailable", extra={"base": base.version,
                                                            "error": str(exc)})
            continue
        if base_sha and sha256_hex(old) != base_sha:
            logger.warning("delta base changed since its release; skipped",
                           extra={"base": base.version})
            continue
        base_sha = sha256_hex(old)
        result = build_deltas(old, new, new_sha, full_size, budget, deadline)
        for codec, reason in result.skipped:
            logger.info("delta not built", extra={"base": base.version, "codec": codec, "reason": reason})
            skipped.append({"from_version": base.version, "codec": codec, "reason": reason})
        built = result.built
        chosen: list[str] = []
        if BASELINE_CODEC in built:
            chosen.append(BASELINE_CODEC)
        others = sorted((c for c in built if c != BASELINE_CODEC), key=lambda c: len(built[c]))
        if others and (not chosen or len(built[others[0]]) < len(built[BASELINE_CODEC])):
            chosen.append(others[0])
        for codec in chosen:
            blob = built[codec]
            key = layout.release_delta_key(model, version, base.version, codec)
            sha = sha256_hex(blob)
            _put(s3, bucket, key, blob, {"sha256": sha})
            deltas.append(Delta(from_version=base.version, from_sha256=base_sha, codec=codec,
                                size=len(blob), sha256=sha, key=key))
    return deltas


def _with_urls(job: UpdateJob, url_for_key: Callable[[str], str]) -> UpdateJob:
    """`job` with each artifact's url made from its key (IoT's presign placeholder)."""
    return replace(job, full=replace(job.full, url=url_for_key(job.full.key or "")),
                   deltas=tuple(replace(d, url=url_for_key(d.key or "")) for d in job.deltas))


# ---------------------------------------------------------------- artifacts


def read_training_artifact(s3: Any, uri: str, *, default_bucket: str) -> ModelFiles:
    """`model.onnx`, `golden.json` and `metrics.json` from a training artifact.

    SageMaker (and our Batch and local backends) write `model.tar.gz`; a bare
    `model.onnx` key is accepted too, with `golden.json` beside it.
    """
    bucket, key = parse_s3_uri(uri, default_bucket)
    if key.endswith(".onnx"):
        golden = _json_member(_get(s3, bucket, key.rsplit("/", 1)[0] + "/golden.json"),
                              "golden.json")
        return ModelFiles(onnx=_check_onnx(_get(s3, bucket, key)), golden=golden)
    limits = dict.fromkeys(("model.onnx", "golden.json", "metrics.json"), MAX_MEMBER_BYTES)
    members = {name: handle.read()
               for name, handle in tar_members(_open(s3, bucket, key), uri, limits)}
    if "model.onnx" not in members:
        raise ArtifactError(f"{uri} holds no model.onnx (found: {sorted(members) or 'nothing'})")
    if "golden.json" not in members:
        raise ArtifactError(f"{uri} holds no golden.json for the device smoke test")
    metrics = _json_member(members["metrics.json"], "metrics.json") \
        if "metrics.json" in members else {}
    return ModelFiles(onnx=_check_onnx(members["model.onnx"]),
                      golden=_json_member(members["golden.json"], "golden.json"),
                      metrics=metrics)


def _json_member(raw: bytes, name: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError as exc:  # not UTF-8, not JSON, an integer past Python's digit limit
        raise ArtifactError(f"{name} is not valid JSON: {exc}") from None
    except RecursionError:
        raise ArtifactError(f"{name} is nested too deeply to parse") from None
    if not isinstance(value, dict):
        raise ArtifactError(f"{name} must hold a JSON object")
    return value


def _check_onnx(blob: bytes) -> bytes:
    # An ONNX ModelProto starts with field 1 (ir_version, varint): tag byte 0x08.
    # Lambda carries no onnx package; the device's smoke test is the full check.
    if len(blob) < 16 or blob[0] != 0x08:
        raise ArtifactError(f"model.onnx is not an ONNX model ({len(blob)} bytes)")
    return blob


def _load_released_files(s3: Any, bucket: str, model: str, version: int) -> ModelFiles:
    onnx_bytes = _get(s3, bucket, layout.champion_key(model, version))
    golden = _json_member(_get(s3, bucket, layout.release_golden_key(model, version)), "golden.json")
    try:
        metrics = _json_member(_get(s3, bucket, layout.release_metrics_key(model, version)), "metrics.json")
    except ArtifactError:
        metrics = {}
    return ModelFiles(onnx=_check_onnx(onnx_bytes), golden=golden, metrics=metrics)


def _get(s3: Any, bucket: str, key: str) -> bytes:
    return _open(s3, bucket, key).read()


def _open(s3: Any, bucket: str, key: str) -> IO[bytes]:
    # Packaging records any S3 failure on the version (an operator re-approves); completion
    # lets transient ones propagate so the event is retried.
    try:
        return open_object(s3, bucket, key)
    except ClientError as exc:
        raise ArtifactError(f"cannot read {s3_uri(bucket, key)}: {error_code(exc) or exc}") from None


def _put(s3: Any, bucket: str, key: str, body: bytes,
         metadata: dict[str, str] | None = None) -> None:
    s3.put_object(Bucket=bucket, Key=key, Body=body, Metadata=metadata or {})

