"""The `ModelApproved` event (EventBridge) that starts packaging, and announcing it once.

Detail (the event contract, docs/registry.md): ``{"model", "version", "artifact",
"manual"}`` plus, for an operator rollback, ``"rollback": true`` and ``"replaces"`` (the
version it replaces), ``"attempt"`` (a unique id per operator action: rollback or
release retry, part of its job id), and ``"reason"`` when an operator gave one.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from mledge_update.events import MODEL_APPROVED

from chalicelib.artifacts import s3_uri
from chalicelib.layout import training_artifact_key
from chalicelib.settings import Settings
from chalicelib.state import StateStore


class EventEmitError(Exception):
    """EventBridge did not accept an event."""


def training_artifact_uri(bucket: str, model: str, job_name: str) -> str:
    """Where SageMaker (and the Batch and local backends) put a job's `model.tar.gz`."""
    return s3_uri(bucket, training_artifact_key(model, job_name))


def model_approved_detail(model: str, version: int, artifact: str, *, manual: bool,
                          rollback: bool = False, replaces: int | None = None,
                          reason: str | None = None, attempt: str | None = None
                          ) -> dict[str, Any]:
    detail: dict[str, Any] = {
        "model": model, "version": int(version), "artifact": artifact, "manual": bool(manual),
    }
    if attempt:
        detail["attempt"] = attempt
    if rollback:
        detail["rollback"] = True
    if replaces is not None:
        detail["replaces"] = int(replaces)
    if reason:
        detail["reason"] = reason
    return detail


def emit_model_approved(events_client: Any, settings: Settings, detail: dict[str, Any]) -> str:
    """PutEvents one ModelApproved; returns the event id; raises EventEmitError if refused."""
    response = events_client.put_events(Entries=[{
        "Source": settings.event_source,
        "DetailType": MODEL_APPROVED,
        "Detail": json.dumps(detail),
        "EventBusName": settings.event_bus,
        "Resources": [],
    }])
    entry = (response.get("Entries") or [{}])[0]
    if response.get("FailedEntryCount") or "EventId" not in entry:
        raise EventEmitError(
            f"EventBridge refused ModelApproved for {detail.get('model')} "
            f"v{detail.get('version')}: {entry.get('ErrorCode')} {entry.get('ErrorMessage')}"
        )
    return str(entry["EventId"])


def approval_marker(model: str, version: int) -> str:
    return f"model-approved#{model}#v{int(version)}"


def announce_approval_once(state: StateStore, events_client: Any, settings: Settings,
                           detail: dict[str, Any]) -> bool:
    """Emit ModelApproved for an approval unless it was already announced.

    The marker is claimed (conditional put) before the event is sent, so of two
    concurrent announcers only one sends; if sending fails the marker is removed
    again and the error propagates, so a retry sends it. Returns False when the
    approval had already been announced.
    """
    marker = approval_marker(detail["model"], detail["version"])
    if not state.mark_event_once(marker, ttl_days=365):
        return False
    try:
        emit_model_approved(events_client, settings, detail)
    except Exception:
        state.forget_event(marker)
        raise
    return True


def approval_announced(state: StateStore, model: str, version: int) -> bool:
    return state.event_seen(approval_marker(model, version))


def new_attempt() -> str:
    """A unique id for one operator action (its IoT job id ends with it)."""
    return uuid.uuid4().hex[:12]
