"""No training is lost to a release in flight (real trigger, completion and packaging
handlers on moto).

Before: completion released the training lock at approval, so the next training could
start while the approval was still being packaged; it was scored against the old
champion (or none at all) and its gate then failed "champion scored was v1, but the fleet
now runs v2" / "a model is in production but metrics.json has no champion score". Now
the approved version keeps the lock until packaging is done: the next training starts
against the model the fleet runs, and the gate compares with that same model.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from chalicelib import layout
from chalicelib.registry import Status
from chalicelib.runtime import get_runtime
from chalicelib.state import StateStore
from chalicelib.trigger import TrainingInProgressError, Trigger
from tests.cloud.support import metrics_doc, sagemaker_event_detail
from tests.cloud.test_packaging import MODEL, artifact, kmeans_onnx
from tests.cloud.trigger_helpers import RecordingBackend, put_raw


def vib_readings(n: int, start: int) -> list[dict[str, Any]]:
    return [{"id": f"r-{i}", "thing": "t1", "model": MODEL, "ts": 1.0 * i,
             "received_at": 1000 * i, "features": [float(i % 3)] * 8}
            for i in range(start, start + n)]


# The model trains on a dataset built over the compacted raw objects; put_raw writes
# them on this day, so the trigger's dataset window must end just after it.
RAW_DAY = datetime(2024, 5, 1, 12, tzinfo=UTC).timestamp()


def _trigger(env: dict[str, Any], backend: RecordingBackend) -> Trigger:
    return Trigger(clients=env["aws"], settings=env["settings"], config=get_runtime().config,
                   backend_factory=lambda name: backend, clock=lambda: RAW_DAY)


def _complete(env: dict[str, Any], job: str, version: int, champion: float | None) -> None:
    onnx = kmeans_onnx(version)
    key = f"models/{MODEL}/{job}/output/model.tar.gz"
    env["aws"].s3.put_object(Bucket=env["settings"].bucket, Key=key, Body=artifact(
        onnx, metrics=metrics_doc(challenger=0.6 + version / 100, champion=champion,
                                  onnx_bytes=onnx)))
    client = env["client"]
    event = client.events.generate_cw_event(
        source="aws.sagemaker", detail_type="SageMaker Training Job State Change",
        detail=sagemaker_event_detail(job, "Completed",
                                      artifact=f"s3://{env['settings'].bucket}/{key}"),
        resources=[], region="us-east-1")
    client.lambda_.invoke("on_sagemaker_training_state", event)


def _package(env: dict[str, Any], version: int) -> dict[str, Any]:
    client = env["client"]
    event = client.events.generate_cw_event(
        source="mledge.pipeline", detail_type="ModelApproved",
        detail={"model": MODEL, "version": version}, resources=[])
    return client.lambda_.invoke("release_approved_model", event).payload


def test_the_next_training_waits_for_the_release_and_is_judged_against_it(env) -> None:
    aws, settings, registry = env["aws"], env["settings"], env["registry"]
    state = StateStore(settings.state_table, aws.dynamodb)
    backend = RecordingBackend()
    put_raw(aws.s3, settings.bucket, MODEL, "b1", vib_readings(2000, 0))
    state.add_new_records(MODEL, 2000)
    v1 = _trigger(env, backend).start_training(MODEL, reason="test")
    _complete(env, v1.job_name, v1.version, champion=None)
    assert registry.get(MODEL, v1.version).status is Status.APPROVED

    # new data arrives while v1's release is in flight: no training against a stale champion
    put_raw(aws.s3, settings.bucket, MODEL, "b2", vib_readings(2000, 2000))
    state.add_new_records(MODEL, 2000)
    with pytest.raises(TrainingInProgressError):
        _trigger(env, backend).start_training(MODEL, reason="test")

    assert _package(env, v1.version)["outcome"] == "released"
    v2 = _trigger(env, backend).start_training(MODEL, reason="test")
    assert v2.champion_version == v1.version
    assert backend.requests[-1].champion_key == layout.champion_key(MODEL, v1.version)

    _complete(env, v2.job_name, v2.version, champion=0.61)
    record = registry.get(MODEL, v2.version)
    assert record.status is Status.APPROVED, record.gate["reasons"]
    assert not any("fleet now runs" in r or "no champion score" in r
                   for r in record.gate["reasons"])
