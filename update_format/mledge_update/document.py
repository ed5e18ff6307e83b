"""The IoT Jobs job document and the release manifest: build, parse, validate, fit.

The job document (what a device receives) and the release manifest
(`releases/<model>/v<version:05d>/manifest.json`, what the cloud keeps) carry the same
content; the manifest names artifacts by S3 `key`, the job document by `url`.

Compatibility rules (docs/update-format.md):
- `format` is the document's major version; a device refuses (REJECTED) a higher one.
- Unknown top-level and per-artifact fields are ignored.
- Deltas whose codec a device does not know are ignored; the full model is always there.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from .codecs import FULL_ENCODINGS, SUPPORTED_CODECS
from .errors import JobDocumentError, JobDocumentTooLargeError, UnsupportedFormatError
from .hashing import is_sha256_hex
from .naming import MODEL_NAME
from .signature import SIGNATURE_FIELD_MAX_CHARS, Signature

OPERATION = "mledge.model-update"
FORMAT_VERSION = 1
# AWS IoT Jobs: a job document holds at most 32,768 characters.
JOB_DOCUMENT_MAX_CHARS = 32_768

Location = Literal["url", "key"]


@dataclass(frozen=True)
class FullModel:
    """The whole new model, encoded (`identity` or `zstd`); size/sha256 are of the
    downloaded bytes."""

    encoding: str
    size: int
    sha256: str
    url: str | None = None
    key: str | None = None

    kind: str = field(default="full", init=False, repr=False, compare=False)


@dataclass(frozen=True)
class Delta:
    """A delta from an earlier released version; size/sha256 are of the delta bytes."""

    from_version: int
    from_sha256: str
    codec: str
    size: int
    sha256: str
    url: str | None = None
    key: str | None = None

    kind: str = field(default="delta", init=False, repr=False, compare=False)


Artifact = FullModel | Delta


@dataclass(frozen=True)
class Smoke:
    """Golden rows the device runs on the new model before it swaps it in."""

    input_name: str
    inputs: list[list[float]]
    outputs: dict[str, Any]
    tolerance: float = 1e-4


MAX_HEALTH_READINGS = 10_000


@dataclass(frozen=True)
class HealthProbe:
    """Asks the device to measure the new model after installing it (a canary release):
    run `readings` sensor readings through it and report, in the job execution's
    statusDetails, the error rate, the anomaly rate and the p95 latency
    (`HEALTH_DETAIL_KEYS`). The cloud compares them with the model's canary limits."""

    readings: int = 50


#: statusDetails keys of a health report (string values, as statusDetails must be).
HEALTH_DETAIL_KEYS = ("health_readings", "health_error_rate", "health_anomaly_rate",
                      "health_latency_p95_ms")


@dataclass(frozen=True)
class UpdateJob:
    model: str
    version: int
    model_sha256: str
    model_size: int
    full: FullModel
    smoke: Smoke
    schema: dict[str, Any]
    deltas: tuple[Delta, ...] = ()
    uplink: dict[str, Any] = field(default_factory=dict)
    rollback: bool = False
    format: int = FORMAT_VERSION
    # The release the fleet leaves on a rollback (signed: a device refuses a replayed
    # rollback from a release older than the one it runs).
    rollback_from: int | None = None
    signature: Signature | None = None
    health: HealthProbe | None = None

    def candidates(
        self,
        installed_sha256: str | None,
        supported: Iterable[str] = SUPPORTED_CODECS,
        supported_encodings: Iterable[str] = FULL_ENCODINGS,
    ) -> list[Artifact]:
        """Artifacts in the order a device should try them: deltas whose base is the
        installed model and whose codec it supports, smallest first, then the full model
        (when its encoding is supported). Unknown codecs are skipped, never an error."""
        codecs = set(supported)
        deltas: list[Artifact] = []
        if installed_sha256:
            wanted = installed_sha256.lower()
            matching = sorted(
                (d for d in self.deltas if d.from_sha256 == wanted and d.codec in codecs),
                key=lambda d: (d.size, -d.from_version, d.codec),
            )
            deltas.extend(matching)
        if self.full.encoding in set(supported_encodings):
            deltas.append(self.full)
        return deltas

    def to_document(self) -> dict[str, Any]:
        """The job document (artifacts by `url`); raises JobDocumentError if one has none."""
        return _to_dict(self, "url")


# ---------------------------------------------------------------------------- serialising


def serialize_job_document(document: Mapping[str, Any]) -> str:
    """The compact JSON text whose length IoT Jobs counts against its limit."""
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def fit_job(job: UpdateJob, max_chars: int = JOB_DOCUMENT_MAX_CHARS,
            *, reserve_signature: bool = True) -> UpdateJob:
    """`job` without its oldest deltas (lowest `from_version`) until its job document
    serialises to at most `max_chars`, keeping room for the signature packaging adds
    afterwards (a signature covers the deltas, so fitting comes first); raises
    JobDocumentTooLargeError when even the document without deltas is too large."""
    budget = max_chars - (SIGNATURE_FIELD_MAX_CHARS
                          if reserve_signature and job.signature is None else 0)
    # Oldest base first: a device on an old version can still take the full model.
    by_age = sorted(range(len(job.deltas)), key=lambda i: job.deltas[i].from_version)
    for dropped in range(len(by_age) + 1):
        gone = set(by_age[:dropped])
        kept = replace(job, deltas=tuple(d for i, d in enumerate(job.deltas) if i not in gone))
        if len(serialize_job_document(kept.to_document())) <= budget:
            return kept
    size = len(serialize_job_document(replace(job, deltas=()).to_document()))
    raise JobDocumentTooLargeError(
        f"job document for {job.model} v{job.version} is {size} characters without any "
        f"delta; the limit is {max_chars}"
        + (f" less {max_chars - budget} kept for the signature" if budget < max_chars else "")
        + " (shrink the smoke rows or the schema)"
    )


def fit_job_document(job: UpdateJob, max_chars: int = JOB_DOCUMENT_MAX_CHARS) -> dict[str, Any]:
    """The job document of `fit_job(job, max_chars)` with no signature room reserved."""
    return fit_job(job, max_chars, reserve_signature=False).to_document()


def _artifact_location(artifact: Artifact, location: Location, path: str) -> str:
    value = artifact.url if location == "url" else artifact.key
    if not value:
        raise JobDocumentError(f"{path}.{location}", "missing")
    return value


def _to_dict(job: UpdateJob, location: Location) -> dict[str, Any]:
    full = {
        "encoding": job.full.encoding,
        location: _artifact_location(job.full, location, "full"),
        "size": job.full.size,
        "sha256": job.full.sha256,
    }
    deltas = [
        {
            "from_version": d.from_version,
            "from_sha256": d.from_sha256,
            "codec": d.codec,
            location: _artifact_location(d, location, f"deltas[{i}]"),
            "size": d.size,
            "sha256": d.sha256,
        }
        for i, d in enumerate(job.deltas)
    ]
    document: dict[str, Any] = {
        "operation": OPERATION,
        "format": job.format,
        "model": job.model,
        "version": job.version,
        "rollback": job.rollback,
        "model_sha256": job.model_sha256,
        "model_size": job.model_size,
        "full": full,
        "deltas": deltas,
        "smoke": {
            "input_name": job.smoke.input_name,
            "inputs": job.smoke.inputs,
            "outputs": job.smoke.outputs,
            "tolerance": job.smoke.tolerance,
        },
        "schema": job.schema,
        "uplink": job.uplink,
        **({"health": {"readings": job.health.readings}} if job.health else {}),
    }
    if job.rollback_from is not None:
        document["rollback_from"] = job.rollback_from
    if job.signature is not None:
        document["signature"] = job.signature.to_document()
    return document


# ---------------------------------------------------------------------------- parsing


_INT64_MAX = 2**63 - 1


def _require(doc: Mapping[str, Any], key: str, path: str) -> Any:
    if key not in doc:
        raise JobDocumentError(path, "missing")
    return doc[key]


def _str(doc: Mapping[str, Any], key: str, path: str) -> str:
    value = _require(doc, key, path)
    if not isinstance(value, str) or not value:
        raise JobDocumentError(path, f"expected a non-empty string, got {_shown(value)}")
    return value


def _int(doc: Mapping[str, Any], key: str, path: str, minimum: int) -> int:
    value = _require(doc, key, path)
    if isinstance(value, bool) or not isinstance(value, int):
        raise JobDocumentError(path, f"expected an integer, got {_shown(value)}")
    if value < minimum:
        raise JobDocumentError(path, f"must be >= {minimum}, got {value}")
    if value > _INT64_MAX:  # versions and sizes are int64 everywhere else (DynamoDB, files)
        raise JobDocumentError(path, f"must be at most {_INT64_MAX}, got {_shown(value)}")
    return value


def _sha(doc: Mapping[str, Any], key: str, path: str) -> str:
    value = _require(doc, key, path)
    if not is_sha256_hex(value):
        raise JobDocumentError(path, f"expected 64 lower-case hex characters, got {_shown(value)}")
    return value


def _object(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise JobDocumentError(path, f"expected an object, got {type(value).__name__}")
    return value


def _number(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise JobDocumentError(path, f"expected a finite number, got {_shown(value)}")
    try:
        number = float(value)  # an integer past the float range raises OverflowError
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise JobDocumentError(path, f"expected a finite number, got {_shown(value)}")
    return number


def _shown(value: Any) -> str:
    """At most 80 characters of repr(value); never raises (deep nesting, huge integers)."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):
        text = f"<{type(value).__name__}>"
    return text[:80]


def _location(doc: Mapping[str, Any], location: Location, path: str) -> dict[str, str]:
    return {location: _str(doc, location, f"{path}.{location}")}


def _parse_full(value: Any, location: Location) -> FullModel:
    doc = _object(value, "full")
    return FullModel(
        encoding=_str(doc, "encoding", "full.encoding"),
        size=_int(doc, "size", "full.size", 0),
        sha256=_sha(doc, "sha256", "full.sha256"),
        **_location(doc, location, "full"),
    )


def _parse_deltas(value: Any, location: Location) -> tuple[Delta, ...]:
    if not isinstance(value, list):
        raise JobDocumentError("deltas", f"expected a list, got {type(value).__name__}")
    deltas = []
    for i, item in enumerate(value):
        path = f"deltas[{i}]"
        doc = _object(item, path)
        deltas.append(
            Delta(
                from_version=_int(doc, "from_version", f"{path}.from_version", 1),
                from_sha256=_sha(doc, "from_sha256", f"{path}.from_sha256"),
                # Any name parses; candidates() decides whether this device can use it.
                codec=_str(doc, "codec", f"{path}.codec"),
                size=_int(doc, "size", f"{path}.size", 0),
                sha256=_sha(doc, "sha256", f"{path}.sha256"),
                **_location(doc, location, path),
            )
        )
    return tuple(deltas)


def _parse_smoke(value: Any) -> Smoke:
    doc = _object(value, "smoke")
    input_name = _str(doc, "input_name", "smoke.input_name")
    inputs = _require(doc, "inputs", "smoke.inputs")
    if not isinstance(inputs, list) or not inputs:
        raise JobDocumentError("smoke.inputs", "expected a non-empty list of rows")
    rows: list[list[float]] = []
    width: int | None = None
    for i, row in enumerate(inputs):
        if not isinstance(row, list) or not row:
            raise JobDocumentError(f"smoke.inputs[{i}]", "expected a non-empty list of numbers")
        if width is not None and len(row) != width:
            raise JobDocumentError(f"smoke.inputs[{i}]", f"has {len(row)} values, row 0 has {width}")
        width = len(row)
        rows.append([_number(x, f"smoke.inputs[{i}][{j}]") for j, x in enumerate(row)])
    outputs = dict(_object(_require(doc, "outputs", "smoke.outputs"), "smoke.outputs"))
    if not outputs:
        raise JobDocumentError("smoke.outputs", "expected at least one output")
    tolerance = _number(doc.get("tolerance", 1e-4), "smoke.tolerance")
    if tolerance < 0:
        raise JobDocumentError("smoke.tolerance", f"must be >= 0, got {tolerance}")
    return Smoke(input_name=input_name, inputs=rows, outputs=outputs, tolerance=tolerance)


def _parse_schema(value: Any) -> dict[str, Any]:
    doc = _object(value, "schema")
    features = _require(doc, "features", "schema.features")
    if (
        not isinstance(features, list)
        or not features
        or not all(isinstance(f, str) and f for f in features)
    ):
        raise JobDocumentError("schema.features", "expected a non-empty list of feature names")
    return dict(doc)


def _parse(doc: Any, location: Location, kind: str) -> UpdateJob:
    if isinstance(doc, str | bytes):
        try:
            doc = json.loads(doc)
        except ValueError as exc:
            raise JobDocumentError(kind, f"not valid JSON: {exc}") from exc
        except RecursionError:
            raise JobDocumentError(kind, "JSON nested too deeply to parse") from None
    doc = _object(doc, kind)
    operation = _require(doc, "operation", "operation")
    if operation != OPERATION:
        raise JobDocumentError("operation", f"expected {OPERATION!r}, got {_shown(operation)}")
    fmt = _int(doc, "format", "format", 1)
    if fmt > FORMAT_VERSION:
        raise UnsupportedFormatError(
            "format", f"document format {fmt} is newer than this device supports ({FORMAT_VERSION})"
        )
    rollback = doc.get("rollback", False)
    if not isinstance(rollback, bool):
        raise JobDocumentError("rollback", f"expected true or false, got {_shown(rollback)}")
    uplink = doc.get("uplink", {})
    rollback_from = None
    if doc.get("rollback_from") is not None:
        rollback_from = _int(doc, "rollback_from", "rollback_from", 1)
    signature = (Signature.from_document(doc["signature"])
                 if doc.get("signature") is not None else None)
    health = None
    if doc.get("health") is not None:
        probe = _object(doc["health"], "health")
        readings = _int(probe, "readings", "health.readings", 1)
        if readings > MAX_HEALTH_READINGS:
            raise JobDocumentError("health.readings",
                                   f"at most {MAX_HEALTH_READINGS}, got {readings}")
        health = HealthProbe(readings=readings)
    return UpdateJob(
        model=_str(doc, "model", "model"),
        version=_int(doc, "version", "version", 1),
        model_sha256=_sha(doc, "model_sha256", "model_sha256"),
        model_size=_int(doc, "model_size", "model_size", 0),
        full=_parse_full(_require(doc, "full", "full"), location),
        deltas=_parse_deltas(doc.get("deltas", []), location),
        smoke=_parse_smoke(_require(doc, "smoke", "smoke")),
        schema=_parse_schema(_require(doc, "schema", "schema")),
        uplink=dict(_object(uplink, "uplink")),
        rollback=rollback,
        format=fmt,
        rollback_from=rollback_from,
        signature=signature,
        health=health,
    )


def parse_job_document(doc: Mapping[str, Any] | str | bytes) -> UpdateJob:
    """Validate a job document (dict or JSON text); JobDocumentError names the bad field,
    UnsupportedFormatError (a JobDocumentError) means `format` is too new."""
    return _parse(doc, "url", "job document")


# ---------------------------------------------------------------------------- manifest


def build_manifest(
    job: UpdateJob, *, created_at: str, metrics: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The release manifest: the job's content with artifacts by S3 `key`, plus
    `created_at` (ISO 8601 text) and the training `metrics`."""
    manifest = _to_dict(job, "key")
    manifest["created_at"] = created_at
    manifest["metrics"] = dict(metrics or {})
    return manifest


def parse_manifest(manifest: Mapping[str, Any] | str | bytes) -> UpdateJob:
    """Validate a release manifest; artifacts carry `key` (and no url)."""
    return _parse(manifest, "key", "manifest")


def job_from_manifest(
    manifest: Mapping[str, Any] | str | bytes, url_for_key: Callable[[str], str]
) -> UpdateJob:
    """The update job for a released manifest, with each artifact's url made from its key
    (in AWS: `presigned_url_placeholder(region, bucket, key)`)."""
    job = parse_manifest(manifest)
    full = replace(job.full, url=url_for_key(_artifact_location(job.full, "key", "full")))
    deltas = tuple(
        replace(d, url=url_for_key(_artifact_location(d, "key", f"deltas[{i}]")))
        for i, d in enumerate(job.deltas)
    )
    return replace(job, full=full, deltas=deltas)


def presigned_url_placeholder(region: str, bucket: str, key: str) -> str:
    """The IoT Jobs placeholder that IoT replaces with a presigned S3 GET URL."""
    return f"${{aws:iot:s3-presigned-url:https://s3.{region}.amazonaws.com/{bucket}/{key}}}"


def smoke_from_golden(golden: Mapping[str, Any]) -> Smoke:
    """The smoke section from the trainer's golden.json (same fields)."""
    return _parse_smoke(golden)


__all__: Sequence[str] = (
    "FORMAT_VERSION",
    "HEALTH_DETAIL_KEYS",
    "JOB_DOCUMENT_MAX_CHARS",
    "MODEL_NAME",
    "OPERATION",
    "Artifact",
    "Delta",
    "FullModel",
    "HealthProbe",
    "Smoke",
    "UpdateJob",
    "build_manifest",
    "fit_job",
    "fit_job_document",
    "job_from_manifest",
    "parse_job_document",
    "parse_manifest",
    "presigned_url_placeholder",
    "serialize_job_document",
    "smoke_from_golden",
)
