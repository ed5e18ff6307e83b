"""The state table: new-record counters, training locks and processed-event markers.

Items (key `pk`, see chalicelib/tables.py):

- `counter#<model>`: `new_records` (N), records counted since the last training
  started. Raised with an atomic ADD per raw object, lowered by exactly the
  number a training consumed when it started, so records that arrive while a
  training runs still count toward the next one.
- `lock#training#<model>`: at most one training per model. Holds `version`,
  `job_name`, `acquired_at` and `stale_at` (epoch seconds). A lock whose
  `stale_at` has passed (max runtime + margin: the completion event never
  came) may be taken over; the take-over is conditional on that timestamp, so
  two takers cannot both win.
- `lock#<name>`: a lease (holder, stale_at) that keeps two runs of a periodic job
  apart, e.g. `lock#compaction#<model>`; an expired lease may be taken over.
- `event#<id>`: an event already counted. `expires_at` is the table's TTL
  attribute, so markers clean themselves up.

Every write is a single conditional or atomic DynamoDB operation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from chalicelib.aws import error_code
from chalicelib.settings import Settings
from chalicelib.tables import STATE_KEY, STATE_TTL_ATTRIBUTE

# How long past a job's max runtime its lock still holds: SageMaker and Batch
# need time to provision, download, upload and report (minutes, not seconds).
LOCK_MARGIN_SECONDS = 30 * 60

_CONDITION_FAILED = "ConditionalCheckFailedException"
_TRANSACTION_CANCELED = "TransactionCanceledException"


class StateError(Exception):
    """The state table answered something unexpected."""


@dataclass(frozen=True)
class TrainingLock:
    model: str
    version: int
    job_name: str
    acquired_at: float
    stale_at: float

    def is_stale(self, now: float) -> bool:
        return now >= self.stale_at


def counter_key(model: str) -> str:
    return f"counter#{model}"


def lock_key(model: str) -> str:
    return f"lock#training#{model}"


def lease_key(name: str) -> str:
    return f"lock#{name}"


def event_key(event_id: str) -> str:
    return f"event#{event_id}"


class StateStore:
    """Counters, locks and event markers in the state table."""

    def __init__(self, table_name: str, dynamodb_client: Any,
                 *, clock: Callable[[], float] = time.time) -> None:
        self.table_name = table_name
        self.dynamodb = dynamodb_client
        self.clock = clock

    @classmethod
    def for_settings(cls, settings: Settings, clients: Any, *,
                     clock: Callable[[], float] = time.time) -> StateStore:
        """The stage's state table on the shared DynamoDB client."""
        return cls(settings.state_table, clients.dynamodb, clock=clock)

    # -- processed-event markers -------------------------------------------------

    def mark_event_once(self, event_id: str, ttl_days: int = 7) -> bool:
        """Record `event_id`; True the first time, False if it was already recorded."""
        try:
            self.dynamodb.put_item(
                TableName=self.table_name,
                Item=self._event_item(event_id, ttl_days),
                ConditionExpression="attribute_not_exists(#pk)",
                ExpressionAttributeNames={"#pk": STATE_KEY},
            )
        except Exception as exc:
            if error_code(exc) == _CONDITION_FAILED:
                return False
            raise
        return True

    def forget_event(self, event_id: str) -> None:
        """Remove a marker `mark_event_once` recorded (its work failed: a retry may redo it)."""
        self.dynamodb.delete_item(TableName=self.table_name, Key={STATE_KEY: {"S": event_key(event_id)}})

    def event_seen(self, event_id: str) -> bool:
        """Whether `mark_event_once` recorded `event_id` (a consistent read)."""
        return self._get(event_key(event_id)) is not None

    def count_event_records(self, event_id: str, model: str, count: int,
                            ttl_days: int = 7) -> int | None:
        """Mark the event and add its records in one transaction.

        Returns the model's new-record count afterwards, or None when the event
        was already counted. One transaction means a crash can neither count
        an event twice nor mark it without counting it.
        """
        try:
            self.dynamodb.transact_write_items(TransactItems=[
                {"Put": {
                    "TableName": self.table_name,
                    "Item": self._event_item(event_id, ttl_days),
                    "ConditionExpression": "attribute_not_exists(#pk)",
                    "ExpressionAttributeNames": {"#pk": STATE_KEY},
                }},
                {"Update": {
                    "TableName": self.table_name,
                    "Key": {STATE_KEY: {"S": counter_key(model)}},
                    "UpdateExpression": "ADD new_records :n SET model = :m, updated_at = :now",
                    "ExpressionAttributeValues": {
                        ":n": {"N": str(count)},
                        ":m": {"S": model},
                        ":now": {"N": str(int(self.clock()))},
                    },
                }},
            ])
        except Exception as exc:
            if error_code(exc) in (_TRANSACTION_CANCELED, _CONDITION_FAILED):
                reasons = getattr(exc, "response", {}).get("CancellationReasons") or []
                codes = [r.get("Code") for r in reasons]
                if not codes or codes[0] == "ConditionalCheckFailed":
                    return None
            raise
        return self.new_records(model)

    def _event_item(self, event_id: str, ttl_days: int) -> dict[str, Any]:
        now = int(self.clock())
        return {
            STATE_KEY: {"S": event_key(event_id)},
            "created_at": {"N": str(now)},
            STATE_TTL_ATTRIBUTE: {"N": str(now + ttl_days * 86400)},
        }

    # -- new-record counters -----------------------------------------------------

    def add_new_records(self, model: str, count: int) -> int:
        """Atomically add `count` records to the model's counter; returns the new total."""
        response = self.dynamodb.update_item(
            TableName=self.table_name,
            Key={STATE_KEY: {"S": counter_key(model)}},
            UpdateExpression="ADD new_records :n SET model = :m, updated_at = :now",
            ExpressionAttributeValues={
                ":n": {"N": str(count)},
                ":m": {"S": model},
                ":now": {"N": str(int(self.clock()))},
            },
            ReturnValues="UPDATED_NEW",
        )
        return int(response["Attributes"]["new_records"]["N"])

    def new_records(self, model: str) -> int:
        """Records counted for the model since its last training started."""
        item = self._get(counter_key(model))
        return int(item["new_records"]["N"]) if item and "new_records" in item else 0

    def consume_new_records(self, model: str, count: int, *, version: int | None = None) -> int:
        """Subtract the `count` records a training started with; returns what remains.

        Records counted after the training read its count stay for the next
        training. Never goes below zero. Also notes when (and for which
        version) the model's last training started, which the schedule reads.
        """
        now = int(self.clock())
        sets = "last_started_at = :now" + (", last_version = :v" if version is not None else "")
        values: dict[str, Any] = {":now": {"N": str(now)}}
        if version is not None:
            values[":v"] = {"N": str(version)}
        key = {STATE_KEY: {"S": counter_key(model)}}
        if count <= 0:
            self.dynamodb.update_item(TableName=self.table_name, Key=key,
                                      UpdateExpression=f"SET {sets}",
                                      ExpressionAttributeValues=values)
            return self.new_records(model)
        try:
            response = self.dynamodb.update_item(
                TableName=self.table_name,
                Key=key,
                UpdateExpression=f"ADD new_records :neg SET {sets}",
                ConditionExpression="new_records >= :n",
                ExpressionAttributeValues={
                    **values, ":neg": {"N": str(-count)}, ":n": {"N": str(count)},
                },
                ReturnValues="UPDATED_NEW",
            )
        except Exception as exc:
            if error_code(exc) != _CONDITION_FAILED:
                raise
            # Fewer than `count` left (only if someone reset the counter): clear it.
            self.dynamodb.update_item(
                TableName=self.table_name, Key=key,
                UpdateExpression=f"SET new_records = :zero, {sets}",
                ExpressionAttributeValues={**values, ":zero": {"N": "0"}},
            )
            return 0
        return int(response["Attributes"]["new_records"]["N"])

    def last_training_started_at(self, model: str) -> float | None:
        """When the model's last training started (epoch seconds), None if never."""
        item = self._get(counter_key(model))
        if not item or "last_started_at" not in item:
            return None
        return float(item["last_started_at"]["N"])

    # -- training locks ----------------------------------------------------------

    def acquire_training_lock(self, model: str, version: int, job_name: str = "",
                              *, max_runtime_seconds: int = 3600) -> bool:
        """Take the model's training lock for `version`; False if a live lock is held.

        A lock past its `stale_at` is taken over (the condition compares that
        timestamp, so a concurrent taker loses). Use `training_lock()` first to
        learn which version a stale lock belonged to.
        """
        now = self.clock()
        try:
            self.dynamodb.put_item(
                TableName=self.table_name,
                Item={
                    STATE_KEY: {"S": lock_key(model)},
                    "model": {"S": model},
                    "version": {"N": str(version)},
                    "job_name": {"S": job_name},
                    "acquired_at": {"N": repr(float(now))},
                    "stale_at": {"N": repr(float(now + max_runtime_seconds + LOCK_MARGIN_SECONDS))},
                },
                ConditionExpression="attribute_not_exists(#pk) OR stale_at <= :now",
                ExpressionAttributeNames={"#pk": STATE_KEY},
                ExpressionAttributeValues={":now": {"N": repr(float(now))}},
            )
        except Exception as exc:
            if error_code(exc) == _CONDITION_FAILED:
                return False
            raise
        return True

    def set_lock_job(self, model: str, version: int, job_name: str) -> bool:
        """Record the job name on the lock `version` holds; False if it does not hold it."""
        try:
            self.dynamodb.update_item(
                TableName=self.table_name,
                Key={STATE_KEY: {"S": lock_key(model)}},
                UpdateExpression="SET job_name = :job",
                ConditionExpression="attribute_exists(#pk) AND version = :v",
                ExpressionAttributeNames={"#pk": STATE_KEY},
                ExpressionAttributeValues={":job": {"S": job_name}, ":v": {"N": str(version)}},
            )
        except Exception as exc:
            if error_code(exc) == _CONDITION_FAILED:
                return False
            raise
        return True

    def release_training_lock(self, model: str, version: int) -> bool:
        """Release the lock if `version` holds it; False otherwise (already released or taken over)."""
        try:
            self.dynamodb.delete_item(
                TableName=self.table_name,
                Key={STATE_KEY: {"S": lock_key(model)}},
                ConditionExpression="version = :v",
                ExpressionAttributeValues={":v": {"N": str(version)}},
            )
        except Exception as exc:
            if error_code(exc) == _CONDITION_FAILED:
                return False
            raise
        return True

    def training_lock(self, model: str) -> TrainingLock | None:
        """The model's lock as stored (possibly stale), or None."""
        item = self._get(lock_key(model))
        if not item:
            return None
        return TrainingLock(
            model=model,
            version=int(item["version"]["N"]),
            job_name=item.get("job_name", {}).get("S", ""),
            acquired_at=float(item["acquired_at"]["N"]),
            stale_at=float(item["stale_at"]["N"]),
        )

    # -- leases (short locks for periodic work, e.g. compaction) -------------------

    def acquire_lease(self, name: str, holder: str, seconds: float) -> bool:
        """Hold `lock#<name>` for `seconds`; False while another holder's lease is live.

        Unlike the training lock a lease has no version: it only keeps two runs of the
        same periodic job apart. An expired lease is taken over (conditional on its
        expiry, so two takers cannot both win).
        """
        now = self.clock()
        try:
            self.dynamodb.put_item(
                TableName=self.table_name,
                Item={
                    STATE_KEY: {"S": lease_key(name)},
                    "holder": {"S": holder},
                    "acquired_at": {"N": repr(float(now))},
                    "stale_at": {"N": repr(float(now + seconds))},
                },
                ConditionExpression="attribute_not_exists(#pk) OR stale_at <= :now "
                                    "OR holder = :holder",
                ExpressionAttributeNames={"#pk": STATE_KEY},
                ExpressionAttributeValues={":now": {"N": repr(float(now))},
                                           ":holder": {"S": holder}},
            )
        except Exception as exc:
            if error_code(exc) == _CONDITION_FAILED:
                return False
            raise
        return True

    def release_lease(self, name: str, holder: str) -> bool:
        """Release the lease if `holder` still holds it."""
        try:
            self.dynamodb.delete_item(
                TableName=self.table_name,
                Key={STATE_KEY: {"S": lease_key(name)}},
                ConditionExpression="holder = :holder",
                ExpressionAttributeValues={":holder": {"S": holder}},
            )
        except Exception as exc:
            if error_code(exc) == _CONDITION_FAILED:
                return False
            raise
        return True

    def _get(self, pk: str) -> dict[str, Any] | None:
        response = self.dynamodb.get_item(
            TableName=self.table_name, Key={STATE_KEY: {"S": pk}}, ConsistentRead=True
        )
        return response.get("Item")
