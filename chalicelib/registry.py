"""The model registry: one DynamoDB item per (model, version) and a head item per model.

Statuses move along one graph (``ALLOWED_TRANSITIONS``)::

    TRAINING -> FAILED | REJECTED | APPROVED
    REJECTED -> APPROVED            (only by a manual promote, recorded as an override)
    APPROVED -> RELEASED            (mark_released)
    RELEASED -> SUPERSEDED | ROLLED_BACK   (mark_released of the next release)
    SUPERSEDED | ROLLED_BACK -> RELEASED   (mark_released with rollback: an older model again)

Every write is conditional on the status it expects, so a repeated or concurrent
event cannot move a version twice. The head item (``version = 0``) holds the
per-model version counter (``last_version``) and the version the fleet should run
(``released_version``); ``mark_released`` updates it in the same transaction as
both version items, conditional on its previous value, so two versions can never
be released at once.

DynamoDB has no floats: numbers are stored as ``Decimal`` and come back as ``int``
when whole, else ``float``. Non-finite floats (NaN, inf), which DynamoDB cannot
store, are kept as the strings ``"nan"``, ``"inf"``, ``"-inf"``.
"""

from __future__ import annotations

import decimal
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

from boto3.dynamodb.types import DYNAMODB_CONTEXT, TypeDeserializer, TypeSerializer
from botocore.exceptions import ClientError

from chalicelib.aws import error_code
from chalicelib.settings import Settings

HEAD_VERSION = 0


class Status(StrEnum):
    TRAINING = "TRAINING"
    FAILED = "FAILED"
    REJECTED = "REJECTED"
    APPROVED = "APPROVED"
    RELEASED = "RELEASED"
    SUPERSEDED = "SUPERSEDED"
    ROLLED_BACK = "ROLLED_BACK"


#: Every edge of the status graph; `transition` refuses anything else.
ALLOWED_TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.TRAINING: frozenset({Status.FAILED, Status.REJECTED, Status.APPROVED}),
    Status.REJECTED: frozenset({Status.APPROVED}),
    Status.APPROVED: frozenset({Status.RELEASED}),
    Status.RELEASED: frozenset({Status.SUPERSEDED, Status.ROLLED_BACK}),
    Status.SUPERSEDED: frozenset({Status.RELEASED}),
    Status.ROLLED_BACK: frozenset({Status.RELEASED}),
    Status.FAILED: frozenset(),
}
#: Statuses of versions that were released at some point (delta bases, rollback targets).
RELEASED_AT_SOME_POINT = frozenset({Status.RELEASED, Status.SUPERSEDED, Status.ROLLED_BACK})
#: Only mark_released may write these, because the head item must change with them.
_RELEASE_STATUSES = RELEASED_AT_SOME_POINT


class RegistryError(Exception):
    """Base class of registry errors."""


class UnknownVersionError(RegistryError, LookupError):
    """No such model version in the registry."""


class ConflictError(RegistryError):
    """The registry is not in the state the caller expected (HTTP 409)."""


class TransitionError(ConflictError):
    """A status change that the version's current status does not allow."""


class AlreadyReleasedError(TransitionError):
    """mark_released of the version that is already the model's current release."""


class VersionExistsError(ConflictError):
    """create_training for a version that already has a registry item."""


class UnstorableValueError(RegistryError, ValueError):
    """A value DynamoDB (or boto3's serializer) cannot store; the message names where."""


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass
class VersionRecord:
    model: str
    version: int
    status: Status
    created_at: str
    updated_at: str
    metrics: dict[str, Any] | None = None
    gate: dict[str, Any] | None = None
    lineage: dict[str, Any] = field(default_factory=dict)
    release: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    artifact: str | None = None
    failure_reason: str | None = None
    override: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def job_name(self) -> str | None:
        job = self.lineage.get("job_name")
        return str(job) if job else None

    @property
    def released_at(self) -> str | None:
        return (self.release or {}).get("released_at")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (CLI --json, HTTP responses)."""
        out: dict[str, Any] = {
            "model": self.model,
            "version": self.version,
            "status": str(self.status),
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "metrics": self.metrics,
            "gate": self.gate,
            "lineage": self.lineage,
            "release": self.release,
            "artifact": self.artifact,
            "failure_reason": self.failure_reason,
            "override": self.override,
            "history": self.history,
        }
        out.update(self.extra)
        return out


_KNOWN_ATTRIBUTES = {
    "model", "version", "status", "created_at", "updated_at", "metrics", "gate", "lineage",
    "release", "history", "artifact", "failure_reason", "override",
}


# ---------------------------------------------------------------- number conversion


def to_dynamo(value: Any) -> Any:
    """Python value -> something TypeSerializer accepts (floats as Decimal)."""
    if isinstance(value, bool) or value is None or isinstance(value, str | int | Decimal):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return Decimal(repr(value))
    if isinstance(value, Mapping):
        return {str(k): to_dynamo(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_dynamo(v) for v in value]
    if isinstance(value, StrEnum):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in the registry: {value!r}")


def from_dynamo(value: Any) -> Any:
    """Deserialized DynamoDB value -> plain Python (Decimal -> int or float)."""
    if isinstance(value, Decimal):
        exponent = value.as_tuple().exponent
        whole = isinstance(exponent, int) and exponent >= 0
        return int(value) if whole else float(value)
    if isinstance(value, dict):
        return {k: from_dynamo(v) for k, v in value.items()}
    if isinstance(value, list | set):
        return [from_dynamo(v) for v in value]
    return value


_NUMBER_CONTEXT = DYNAMODB_CONTEXT
"""boto3's decimal context for DynamoDB numbers: what it refuses, its serializer refuses."""
MAX_NESTING = 32
"""DynamoDB stores lists and maps nested at most 32 levels deep."""
MAX_STORED_JSON_BYTES = 100 * 1024
"""Largest value (as compact JSON) stored beside a status: an item is at most 400 KB, and the
history and the other fields need room."""


def check_storable(value: Any, what: str) -> None:
    """Raise UnstorableValueError naming the first part of `value` the registry cannot store.

    Outside input (a training job's metrics.json) reaches the registry; DynamoDB refuses
    numbers beyond 38 significant digits or outside 1e-130 .. 1e126 in magnitude (boto3
    checks with its DYNAMODB_CONTEXT), nesting deeper than 32 levels, empty map keys,
    strings that are not valid Unicode (lone surrogates) and items over 400 KB.
    NaN and infinities are fine: `to_dynamo` stores them as strings.
    """
    stack: list[tuple[Any, str, int]] = [(value, what, 0)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, bool) or item is None:
            continue
        if isinstance(item, str):
            _check_text(item, path)
        elif isinstance(item, int | float | Decimal):
            _check_number(item, path)
        elif isinstance(item, Mapping | list | tuple):
            if depth >= MAX_NESTING:
                raise UnstorableValueError(f"{path}: nested deeper than {MAX_NESTING} levels")
            if isinstance(item, Mapping):
                for key, child in item.items():
                    if not isinstance(key, str) or not key:
                        raise UnstorableValueError(f"{path}: empty or non-string key {key!r}")
                    _check_text(key, f"{path} key")
                    stack.append((child, f"{path}.{key}", depth + 1))
            else:
                stack.extend((child, f"{path}[{i}]", depth + 1) for i, child in enumerate(item))
        elif not isinstance(item, StrEnum):
            raise UnstorableValueError(f"{path}: a {type(item).__name__} is not storable")
    size = len(json.dumps(to_dynamo(value), default=str, ensure_ascii=False)
               .encode("utf-8", "surrogatepass"))
    if size > MAX_STORED_JSON_BYTES:
        raise UnstorableValueError(f"{what}: {size:,} bytes as JSON, over the "
                                   f"{MAX_STORED_JSON_BYTES:,} the registry keeps")


def _check_text(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UnstorableValueError(f"{path}: not valid Unicode (lone surrogate "
                                   f"U+{ord(text[exc.start]):04X})") from None


def _check_number(number: float | Decimal, path: str) -> None:
    if isinstance(number, float) and not math.isfinite(number):
        return
    try:
        _NUMBER_CONTEXT.create_decimal(
            Decimal(repr(number)) if isinstance(number, float) else number)
    except decimal.DecimalException:
        shown = repr(number) if not isinstance(number, int) or abs(number) < 10**40 else (
            f"an integer of about {int(number.bit_length() * math.log10(2)) + 1} digits")
        raise UnstorableValueError(
            f"{path}: {shown} is outside what DynamoDB stores (38 significant digits, "
            f"magnitude 1e-130 to 1e126)") from None


_SERIALIZER = TypeSerializer()
_DESERIALIZER = TypeDeserializer()


def _ser(value: Any) -> dict[str, Any]:
    return _SERIALIZER.serialize(to_dynamo(value))


def _item_to_python(item: Mapping[str, Any]) -> dict[str, Any]:
    return {k: from_dynamo(_DESERIALIZER.deserialize(v)) for k, v in item.items()}


def _record_from_item(item: Mapping[str, Any]) -> VersionRecord:
    data = _item_to_python(item)
    return VersionRecord(
        model=data["model"],
        version=int(data["version"]),
        status=Status(data["status"]),
        created_at=data.get("created_at", ""),
        updated_at=data.get("updated_at", ""),
        metrics=data.get("metrics"),
        gate=data.get("gate"),
        lineage=data.get("lineage") or {},
        release=data.get("release"),
        history=data.get("history") or [],
        artifact=data.get("artifact"),
        failure_reason=data.get("failure_reason"),
        override=data.get("override"),
        extra={k: v for k, v in data.items() if k not in _KNOWN_ATTRIBUTES},
    )


def _is_conditional_failure(exc: ClientError) -> bool:
    return error_code(exc) in (
        "ConditionalCheckFailedException",
        "TransactionCanceledException",
    )


# ---------------------------------------------------------------- the registry


class Registry:
    """The registry table (key `model` S + `version` N) through a low-level DynamoDB client."""

    def __init__(self, table_name: str, dynamodb_client: Any, *,
                 clock: Callable[[], str] = now_iso) -> None:
        self.table = table_name
        self.dynamodb = dynamodb_client
        self.clock = clock

    @classmethod
    def for_settings(cls, settings: Settings, clients: Any) -> Registry:
        """The stage's registry table on the shared DynamoDB client."""
        return cls(settings.registry_table, clients.dynamodb)

    # -- keys and reads

    @staticmethod
    def _key(model: str, version: int) -> dict[str, Any]:
        return {"model": {"S": model}, "version": {"N": str(int(version))}}

    def _get_item(self, model: str, version: int) -> dict[str, Any] | None:
        resp = self.dynamodb.get_item(
            TableName=self.table, Key=self._key(model, version), ConsistentRead=True
        )
        return resp.get("Item")

    def _head(self, model: str) -> dict[str, Any]:
        item = self._get_item(model, HEAD_VERSION)
        return _item_to_python(item) if item else {}

    def get(self, model: str, version: int) -> VersionRecord:
        if int(version) <= HEAD_VERSION:
            raise UnknownVersionError(f"{model} has no version {version} (versions start at 1)")
        item = self._get_item(model, version)
        if item is None:
            raise UnknownVersionError(f"{model} has no version {version} in the registry")
        return _record_from_item(item)

    def list_versions(self, model: str) -> list[VersionRecord]:
        """All versions of a model, oldest first."""
        records: list[VersionRecord] = []
        kwargs: dict[str, Any] = {
            "TableName": self.table,
            "KeyConditionExpression": "#m = :m AND #v > :head",
            "ExpressionAttributeNames": {"#m": "model", "#v": "version"},
            "ExpressionAttributeValues": {":m": {"S": model}, ":head": {"N": str(HEAD_VERSION)}},
            "ConsistentRead": True,
        }
        while True:
            resp = self.dynamodb.query(**kwargs)
            records.extend(_record_from_item(item) for item in resp.get("Items", []))
            if "LastEvaluatedKey" not in resp:
                break
            kwargs["ExclusiveStartKey"] = resp["LastEvaluatedKey"]
        records.sort(key=lambda r: r.version)
        return records

    def latest_version(self, model: str) -> int:
        """The last version number allocated (0 when none)."""
        return int(self._head(model).get("last_version", 0))

    def released_version(self, model: str) -> int | None:
        value = self._head(model).get("released_version")
        return int(value) if value else None

    def current_release(self, model: str) -> VersionRecord | None:
        version = self.released_version(model)
        return self.get(model, version) if version else None

    def release_history(self, model: str, limit: int) -> list[VersionRecord]:
        """Versions that were released at some point, most recently released first.

        Ordered by the time each was last released (a rolled-back-to older version
        is "newer" than the version it replaced), ties by version number; these are
        the versions devices may be running, i.e. the delta bases.
        """
        released = [r for r in self.list_versions(model) if r.status in RELEASED_AT_SOME_POINT]
        released.sort(key=lambda r: (r.released_at or "", r.version), reverse=True)
        return released[: max(0, limit)]

    # -- writes

    def allocate_version(self, model: str) -> int:
        """The next version number of `model` (1, 2, ...), from an atomic counter."""
        now = self.clock()
        resp = self.dynamodb.update_item(
            TableName=self.table,
            Key=self._key(model, HEAD_VERSION),
            UpdateExpression="ADD last_version :one SET updated_at = :now, "
                             "created_at = if_not_exists(created_at, :now)",
            ExpressionAttributeValues={":one": {"N": "1"}, ":now": {"S": now}},
            ReturnValues="UPDATED_NEW",
        )
        return int(resp["Attributes"]["last_version"]["N"])

    def create_training(self, model: str, version: int, lineage: dict[str, Any]) -> VersionRecord:
        """Record a version whose training job is starting (status TRAINING)."""
        if int(version) <= HEAD_VERSION:
            raise ValueError(f"versions start at 1, got {version}")
        now = self.clock()
        record = VersionRecord(
            model=model, version=int(version), status=Status.TRAINING, created_at=now,
            updated_at=now, lineage=dict(lineage),
            history=[{"at": now, "from": None, "to": str(Status.TRAINING),
                      "reason": "training job started"}],
        )
        item = {
            "model": {"S": model},
            "version": {"N": str(int(version))},
            "status": {"S": str(Status.TRAINING)},
            "created_at": {"S": now},
            "updated_at": {"S": now},
            "lineage": _ser(record.lineage),
            "history": _ser(record.history),
        }
        try:
            self.dynamodb.put_item(
                TableName=self.table, Item=item,
                ConditionExpression="attribute_not_exists(#v)",
                ExpressionAttributeNames={"#v": "version"},
            )
        except ClientError as exc:
            if _is_conditional_failure(exc):
                raise VersionExistsError(f"{model} v{version} already exists in the registry") \
                    from None
            raise
        return record

    def transition(self, model: str, version: int, to: Status, *, expected: Iterable[Status],
                   reason: str = "", **fields: Any) -> VersionRecord:
        """Move a version from one of `expected` to `to`, storing `fields` beside the status.

        One conditional update: it fails with TransitionError (and changes nothing)
        when the version's status is not in `expected` at the time of the write,
        so of two concurrent or repeated callers exactly one succeeds. Appends
        ``{"at", "from", "to", "reason"}`` to the version's history.
        """
        to = Status(to)
        expected_set = [Status(s) for s in expected]
        if not expected_set:
            raise ValueError("expected must name at least one status")
        if to in _RELEASE_STATUSES:
            raise ValueError(f"use mark_released to move a version to {to}")
        for source in expected_set:
            if to not in ALLOWED_TRANSITIONS[source]:
                raise TransitionError(f"{source} -> {to} is not an allowed transition")
            if source is Status.REJECTED and to is Status.APPROVED and not fields.get("override"):
                raise TransitionError(
                    "REJECTED -> APPROVED needs a manual override (operator promote)"
                )
        for name in fields:
            if name in ("model", "version", "status", "history", "created_at", "updated_at"):
                raise ValueError(f"transition cannot set {name!r}")

        now = self.clock()
        names = {"#status": "status", "#v": "version", "#history": "history"}
        values: dict[str, Any] = {
            ":to": {"S": str(to)},
            ":now": {"S": now},
            ":empty": {"L": []},
        }
        status_placeholders = []
        for i, source in enumerate(expected_set):
            values[f":e{i}"] = {"S": str(source)}
            status_placeholders.append(f":e{i}")
        sets = ["#status = :to", "updated_at = :now"]
        for i, (name, value) in enumerate(sorted(fields.items())):
            names[f"#f{i}"] = name
            values[f":f{i}"] = _ser(value)
            sets.append(f"#f{i} = :f{i}")
        # The history entry names the status it came from; with several expected
        # statuses we cannot know which one matched, so the entry lists them.
        source_label = str(expected_set[0]) if len(expected_set) == 1 else "|".join(
            str(s) for s in expected_set)
        entry = {"at": now, "from": source_label, "to": str(to), "reason": reason}
        values[":entry"] = _ser([entry])
        sets.append("#history = list_append(if_not_exists(#history, :empty), :entry)")
        try:
            resp = self.dynamodb.update_item(
                TableName=self.table,
                Key=self._key(model, version),
                UpdateExpression="SET " + ", ".join(sets),
                ConditionExpression=f"attribute_exists(#v) AND #status IN "
                                    f"({', '.join(status_placeholders)})",
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
                ReturnValues="ALL_NEW",
            )
        except ClientError as exc:
            if not _is_conditional_failure(exc):
                raise
            current = self.get(model, version)  # UnknownVersionError when missing
            wanted = ", ".join(str(s) for s in expected_set)
            raise TransitionError(
                f"{model} v{version} is {current.status}, not {wanted}: cannot move it to {to}"
            ) from None
        return _record_from_item(resp["Attributes"])

    def note(self, model: str, version: int, reason: str) -> None:
        """Append a history entry without changing the status (e.g. a rollback request)."""
        now = self.clock()
        entry = {"at": now, "from": None, "to": None, "reason": reason}
        try:
            self.dynamodb.update_item(
                TableName=self.table,
                Key=self._key(model, version),
                UpdateExpression="SET #history = list_append(if_not_exists(#history, :empty), "
                                 ":entry), updated_at = :now",
                ConditionExpression="attribute_exists(#v)",
                ExpressionAttributeNames={"#history": "history", "#v": "version"},
                ExpressionAttributeValues={":entry": _ser([entry]), ":empty": {"L": []},
                                           ":now": {"S": now}},
            )
        except ClientError as exc:
            if _is_conditional_failure(exc):
                raise UnknownVersionError(f"{model} has no version {version} in the registry") \
                    from None
            raise

    def update_release(self, model: str, version: int, changes: dict[str, Any],
                       reason: str) -> None:
        """Merge `changes` into the RELEASED version's `release` map (a canary promoted to
        the fleet: its phase and job id) and append `reason` to its history. Raises
        TransitionError when the version is not RELEASED."""
        record = self.get(model, version)
        if record.status is not Status.RELEASED:
            raise TransitionError(f"{model} v{version} is {record.status}, not RELEASED")
        now = self.clock()
        entry = {"at": now, "from": None, "to": None, "reason": reason}
        try:
            self.dynamodb.update_item(
                TableName=self.table,
                Key=self._key(model, version),
                UpdateExpression="SET #release = :release, updated_at = :now, "
                                 "#history = list_append(if_not_exists(#history, :empty), :entry)",
                ConditionExpression="#status = :released",
                ExpressionAttributeNames={"#release": "release", "#history": "history",
                                          "#status": "status"},
                ExpressionAttributeValues={
                    ":release": _ser({**(record.release or {}), **changes}),
                    ":released": {"S": str(Status.RELEASED)}, ":now": {"S": now},
                    ":entry": _ser([entry]), ":empty": {"L": []}},
            )
        except ClientError as exc:
            if _is_conditional_failure(exc):
                raise TransitionError(f"{model} v{version} is no longer RELEASED") from None
            raise

    def mark_released(self, model: str, version: int, release: dict[str, Any]) -> None:
        """Record that `version` is now what the fleet runs, in one transaction.

        - the version: APPROVED -> RELEASED (with `release.rollback` true: an older,
          once-released version, SUPERSEDED | ROLLED_BACK -> RELEASED);
        - the previous release: RELEASED -> SUPERSEDED, or ROLLED_BACK when
          `release["rollback"]` is true;
        - the head item: `released_version` from the previous value to `version`,
          conditional on the previous value, so two releases cannot both win.

        `release` (job id, manifest key, ...) is stored on the version with
        `released_at` added. Raises AlreadyReleasedError when `version` is the
        current release, TransitionError when its status does not allow a release
        or another release won the race, UnknownVersionError when it does not exist.
        """
        rollback = bool(release.get("rollback"))
        target = self.get(model, version)
        previous = self.released_version(model)
        if previous == int(version):
            raise AlreadyReleasedError(f"{model} v{version} is already the current release")
        allowed = ({Status.SUPERSEDED, Status.ROLLED_BACK} if rollback else {Status.APPROVED})
        if target.status not in allowed:
            kind = "a rollback to a previously released version" if rollback else "a release"
            raise TransitionError(
                f"{model} v{version} is {target.status}: {kind} needs "
                f"{' or '.join(sorted(str(s) for s in allowed))}"
            )
        now = self.clock()
        release_doc = {**release, "rollback": rollback, "released_at": now}
        if previous is not None:
            release_doc.setdefault("replaced_version", previous)
        replaced_status = Status.ROLLED_BACK if rollback else Status.SUPERSEDED
        why = (f"rolled back from v{previous}" if rollback and previous
               else f"released (replaces v{previous})" if previous else "first release")
        target_entry = {"at": now, "from": str(target.status), "to": str(Status.RELEASED),
                        "reason": release.get("reason") or why}
        items: list[dict[str, Any]] = [
            {"Update": {
                "TableName": self.table,
                "Key": self._key(model, version),
                "UpdateExpression": "SET #status = :released, updated_at = :now, "
                                    "#release = :release, "
                                    "#history = list_append(if_not_exists(#history, :empty), "
                                    ":entry)",
                "ConditionExpression": "#status = :from",
                "ExpressionAttributeNames": {"#status": "status", "#release": "release",
                                             "#history": "history"},
                "ExpressionAttributeValues": {
                    ":released": {"S": str(Status.RELEASED)},
                    ":from": {"S": str(target.status)},
                    ":now": {"S": now},
                    ":release": _ser(release_doc),
                    ":entry": _ser([target_entry]),
                    ":empty": {"L": []},
                },
            }},
        ]
        head_update: dict[str, Any] = {
            "TableName": self.table,
            "Key": self._key(model, HEAD_VERSION),
            "UpdateExpression": "SET released_version = :new, updated_at = :now",
            "ExpressionAttributeValues": {":new": {"N": str(int(version))}, ":now": {"S": now}},
        }
        if previous is None:
            head_update["ConditionExpression"] = \
                "attribute_not_exists(released_version) OR released_version = :zero"
            head_update["ExpressionAttributeValues"][":zero"] = {"N": "0"}
        else:
            head_update["ConditionExpression"] = "released_version = :previous"
            head_update["ExpressionAttributeValues"][":previous"] = {"N": str(previous)}
            replaced_entry = {"at": now, "from": str(Status.RELEASED),
                              "to": str(replaced_status),
                              "reason": f"{'rolled back to' if rollback else 'replaced by'} "
                                        f"v{version}"}
            items.append({"Update": {
                "TableName": self.table,
                "Key": self._key(model, previous),
                "UpdateExpression": "SET #status = :replaced, updated_at = :now, "
                                    "#history = list_append(if_not_exists(#history, :empty), "
                                    ":entry)",
                "ConditionExpression": "#status = :released",
                "ExpressionAttributeNames": {"#status": "status", "#history": "history"},
                "ExpressionAttributeValues": {
                    ":replaced": {"S": str(replaced_status)},
                    ":released": {"S": str(Status.RELEASED)},
                    ":now": {"S": now},
                    ":entry": _ser([replaced_entry]),
                    ":empty": {"L": []},
                },
            }})
        items.append({"Update": head_update})
        try:
            self.dynamodb.transact_write_items(TransactItems=items)
        except ClientError as exc:
            if not _is_conditional_failure(exc):
                raise
            raise TransitionError(
                f"{model} v{version} was not released: the registry changed meanwhile "
                f"(another release of {model} or a concurrent event); current release is "
                f"v{self.released_version(model)}"
            ) from None
