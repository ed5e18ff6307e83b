"""Operator controls: promote, rollback, training start; HTTP routes and the `mledge` CLI."""

from __future__ import annotations

import gzip
import json
from datetime import UTC, datetime

import pytest

from chalicelib.operator import NothingToRollBackError, Operator
from chalicelib.registry import ConflictError, Status, TransitionError
from chalicelib.trigger import NoDataError, TrainingInProgressError
from mledge_ops.cli import main
from tests.cloud.support import (
    metrics_doc,
    put_artifact,
    received_details,
    released_version_with,
    start_version,
)

VIB = "vibration-anomaly"


@pytest.fixture
def op(runtime) -> Operator:
    return Operator(clients=runtime.clients, settings=runtime.settings, config=runtime.config)


pytestmark = pytest.mark.filterwarnings("ignore:IAMAuthorizer is not a supported")


def _rejected(registry, state_store, aws, bucket, score: float = 0.2) -> tuple[int, str]:
    version, name = start_version(registry, state_store, VIB)
    artifact = put_artifact(aws, bucket, VIB, name, metrics_doc(challenger=score))
    registry.transition(VIB, version, Status.REJECTED, expected=[Status.TRAINING],
                        reason="gate", artifact=artifact,
                        gate={"approved": False, "reasons": ["silhouette 0.2000 < threshold"]})
    state_store.release_training_lock(VIB, version)
    return version, artifact


def _fleet(registry, state_store, aws, bucket) -> list[int]:
    """v1 released then superseded by v2 (released), v3 rejected."""
    v1 = released_version_with(registry, state_store, VIB, aws, bucket, 0.40)
    v2 = released_version_with(registry, state_store, VIB, aws, bucket, 0.45)
    v3, _ = _rejected(registry, state_store, aws, bucket)
    return [v1, v2, v3]


# ---------------------------------------------------------------- operator functions


def test_promote_records_an_override_and_announces_a_manual_approval(
        op, aws, settings, registry, state_store, approved_queue):
    version, artifact = _rejected(registry, state_store, aws, settings.bucket)
    result = op.promote(VIB, version, reason="field test shows it is fine", actor="ana")
    assert result.announced
    record = registry.get(VIB, version)
    assert record.status is Status.APPROVED
    assert record.override["by"] == "ana"
    assert record.override["reason"] == "field test shows it is fine"
    assert record.override["gate_reasons"] == ["silhouette 0.2000 < threshold"]
    assert record.history[-1]["reason"] == "manual promote by ana: field test shows it is fine"
    assert received_details(aws, approved_queue) == [{
        "model": VIB, "version": version, "artifact": artifact, "manual": True,
        "reason": "field test shows it is fine"}]
    with pytest.raises(TransitionError, match="only a REJECTED version can be promoted"):
        op.promote(VIB, version, reason="again", actor="ana")
    assert received_details(aws, approved_queue) == []


def test_promote_refuses_failed_versions_and_needs_a_reason(op, registry, state_store, aws, settings):
    version, _ = _rejected(registry, state_store, aws, settings.bucket)
    with pytest.raises(ValueError, match="needs a reason"):
        op.promote(VIB, version, reason="  ", actor="ana")
    failed, _ = start_version(registry, state_store, VIB)
    registry.transition(VIB, failed, Status.FAILED, expected=[Status.TRAINING])
    with pytest.raises(TransitionError, match="is FAILED"):
        op.promote(VIB, failed, reason="x", actor="ana")


def test_rollback_announces_the_previous_release_with_rollback_true(
        op, aws, settings, registry, state_store, approved_queue):
    v1, v2, _ = _fleet(registry, state_store, aws, settings.bucket)
    request = op.rollback(VIB, reason="v2 drifts on line 3", actor="ana")
    assert (request.version, request.replaces) == (v1, v2)
    details = received_details(aws, approved_queue)
    attempt = details[0].pop("attempt")
    assert details == [{
        "model": VIB, "version": v1, "artifact": registry.get(VIB, v1).artifact, "manual": True,
        "rollback": True, "replaces": v2, "reason": "v2 drifts on line 3"}]
    # every rollback is its own action: a second one gets another attempt id (job id)
    op.rollback(VIB, reason="again", actor="ana")
    assert received_details(aws, approved_queue)[0]["attempt"] != attempt
    # packaging releases it; the registry side then marks v2 ROLLED_BACK
    registry.mark_released(VIB, v1, {"rollback": True, "job_id": "rb"})
    assert registry.get(VIB, v2).status is Status.ROLLED_BACK
    assert registry.current_release(VIB).version == v1
    assert "rollback to v1 (from v2) requested by ana" in registry.get(VIB, v1).history[-2][
        "reason"]


def test_rollback_to_a_named_version_and_its_refusals(op, aws, settings, registry, state_store,
                                                      approved_queue):
    with pytest.raises(NothingToRollBackError, match="has no release"):
        op.rollback(VIB)
    v1 = released_version_with(registry, state_store, VIB, aws, settings.bucket, 0.40)
    with pytest.raises(NothingToRollBackError, match="no earlier release than v1"):
        op.rollback(VIB)
    v2 = released_version_with(registry, state_store, VIB, aws, settings.bucket, 0.45)
    v3, _ = _rejected(registry, state_store, aws, settings.bucket)
    with pytest.raises(ConflictError, match="already the current release"):
        op.rollback(VIB, to=v2)
    with pytest.raises(ConflictError, match="only a version that was released before"):
        op.rollback(VIB, to=v3)
    assert op.rollback(VIB, to=v1).version == v1


def _seed_raw_data(aws, bucket: str, state_store, model: str = VIB,
                   records: int = 1200) -> None:
    """What ingest leaves behind: one raw object of today and the new-record count.

    Today, because a model with a dataset table trains on the last `window_days` only.
    """
    lines = "".join(
        f'{{"id": "t-{i}", "thing": "t", "ts": 1.0, "received_at": 1, '
        f'"features": [0, 0, 0, 0, 0, 0, 0, {i}]}}\n' for i in range(records))
    today = datetime.now(UTC)
    aws.s3.put_object(Bucket=bucket, Key=f"raw/{model}/dt={today:%Y-%m-%d}/hour=00/b1.jsonl.gz",
                      Body=gzip.compress(lines.encode()),
                      Metadata={"record-count": str(records)})
    state_store.add_new_records(model, records)


def test_train_starts_a_job_through_the_trigger(op, aws, settings, registry, state_store):
    _seed_raw_data(aws, settings.bucket, state_store)
    started = op.train(VIB, reason="new site")
    assert (started.model, started.version, started.backend) == (VIB, 1, "sagemaker")
    record = registry.get(VIB, 1)
    assert record.status is Status.TRAINING
    assert record.lineage["trigger"] == "new site"
    assert state_store.training_lock(VIB).version == 1
    with pytest.raises(TrainingInProgressError):
        op.train(VIB, reason="again")
    with pytest.raises(NoDataError):
        op.train("digits", reason="nothing ingested")


# ---------------------------------------------------------------- HTTP routes


def test_routes_read_models_versions_and_one_version(client, aws, settings, registry, state_store):
    v1, v2, v3 = _fleet(registry, state_store, aws, settings.bucket)
    models = client.http.get("/models")
    assert models.status_code == 200
    by_name = {m["model"]: m for m in models.json_body["models"]}
    assert by_name[VIB]["released_version"] == v2
    assert by_name[VIB]["released_score"] == 0.45
    assert by_name[VIB]["latest_version"] == v3 and by_name[VIB]["latest_status"] == "REJECTED"
    assert by_name["digits"]["released_version"] is None

    versions = client.http.get(f"/models/{VIB}/versions").json_body["versions"]
    assert [(v["version"], v["status"]) for v in versions] == [
        (v1, "SUPERSEDED"), (v2, "RELEASED"), (v3, "REJECTED")]
    one = client.http.get(f"/models/{VIB}/versions/{v3}")
    assert one.status_code == 200
    assert one.json_body["lineage"]["job_name"].startswith(f"mledge-{VIB}-v{v3}-")
    assert one.json_body["gate"]["reasons"] == ["silhouette 0.2000 < threshold"]


def test_routes_answer_404_for_unknown_models_and_versions(client):
    missing_model = client.http.get("/models/nope/versions")
    assert missing_model.status_code == 404
    assert "unknown model 'nope'" in missing_model.json_body["Message"]
    missing_version = client.http.get(f"/models/{VIB}/versions/42")
    assert missing_version.status_code == 404
    assert missing_version.json_body["Message"] == f"{VIB} has no version 42 in the registry"
    assert client.http.get(f"/models/{VIB}/versions/latest").status_code == 400


def test_promote_route_and_its_conflict(client, aws, settings, registry, state_store, approved_queue):
    version, _ = _rejected(registry, state_store, aws, settings.bucket)
    body = json.dumps({"reason": "ok after review"})
    headers = {"Content-Type": "application/json"}
    first = client.http.post(f"/models/{VIB}/versions/{version}/promote", body=body,
                           headers=headers)
    assert first.status_code == 200
    assert first.json_body["status"] == "APPROVED" and first.json_body["announced"] is True
    again = client.http.post(f"/models/{VIB}/versions/{version}/promote", body=body,
                           headers=headers)
    assert again.status_code == 409
    assert "only a REJECTED version can be promoted" in again.json_body["Message"]
    no_reason = client.http.post(f"/models/{VIB}/versions/{version}/promote", body="{}",
                               headers=headers)
    assert no_reason.status_code == 400
    assert len(received_details(aws, approved_queue)) == 1


def test_rollback_route_and_its_conflict(client, aws, settings, registry, state_store, approved_queue):
    headers = {"Content-Type": "application/json"}
    nothing = client.http.post(f"/models/{VIB}/rollback", body="{}", headers=headers)
    assert nothing.status_code == 409
    v1, v2, _ = _fleet(registry, state_store, aws, settings.bucket)
    done = client.http.post(f"/models/{VIB}/rollback", body=json.dumps({"to": v1}),
                          headers=headers)
    assert done.status_code == 200
    assert (done.json_body["version"], done.json_body["replaces"]) == (v1, v2)
    assert received_details(aws, approved_queue)[0]["rollback"] is True
    assert client.http.post("/models/nope/rollback", body="{}", headers=headers).status_code == 404


def test_training_route_starts_or_conflicts(client, aws, settings, state_store):
    headers = {"Content-Type": "application/json"}
    _seed_raw_data(aws, settings.bucket, state_store)
    ok = client.http.post(f"/models/{VIB}/trainings", body=json.dumps({"reason": "new sensor"}),
                        headers=headers)
    assert ok.status_code == 200
    assert (ok.json_body["version"], ok.json_body["reason"]) == (1, "new sensor")
    busy = client.http.post(f"/models/{VIB}/trainings", body="{}", headers=headers)
    assert busy.status_code == 409
    assert busy.json_body["Message"].startswith(f"{VIB}: v1 (mledge-{VIB}-v1-")
    no_data = client.http.post("/models/digits/trainings", body="{}", headers=headers)
    assert no_data.status_code == 409
    assert "no new records" in no_data.json_body["Message"]
    assert client.http.post("/models/nope/trainings", body="{}", headers=headers).status_code \
        == 404


# ---------------------------------------------------------------- the CLI


def test_cli_models_and_versions_tables(runtime, aws, settings, registry, state_store, capsys):
    v1, v2, v3 = _fleet(registry, state_store, aws, settings.bucket)
    assert main(["models"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["MODEL", "FAMILY", "METRIC", "THRESHOLD", "RELEASED", "SCORE",
                              "LATEST", "STATUS", "TRAINING"]
    vib_row = next(line for line in out if line.startswith(VIB)).split()
    assert vib_row == [VIB, "kmeans_anomaly", "silhouette", "0.3000", f"v{v2}", "0.4500",
                       f"v{v3}", "REJECTED", "-"]

    assert main(["versions", VIB]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [(r[0], r[1]) for r in rows] == [(f"v{v3}", "REJECTED"), (f"v{v2}", "RELEASED"),
                                           (f"v{v1}", "SUPERSEDED")]
    assert main(["versions", VIB, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["status"] for d in data] == ["SUPERSEDED", "RELEASED", "REJECTED"]


def test_cli_show_prints_lineage_gate_reasons_and_history(runtime, aws, settings, registry,
                                                          state_store, capsys):
    version, _ = _rejected(registry, state_store, aws, settings.bucket)
    assert main(["show", VIB, str(version)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{VIB} v{version}: REJECTED\n")
    assert "gate: rejected\n  - silhouette 0.2000 < threshold\n" in out
    assert f"  dataset_key: datasets/{VIB}/v{version:05d}/manifest.json" in out
    assert "TRAINING -> REJECTED  gate" in out


def test_cli_errors_are_one_line_and_non_zero(runtime, capsys):
    assert main(["versions", "nope"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mledge versions: error: unknown model 'nope'")
    assert main(["show", VIB, "3"]) == 1
    assert capsys.readouterr().err == f"mledge show: error: {VIB} has no version 3 in the " \
                                      "registry\n"
    assert main(["rollback", VIB]) == 1
    assert "has no release to roll back from" in capsys.readouterr().err


def test_cli_promote_and_rollback(runtime, aws, settings, registry, state_store, approved_queue,
                                  capsys):
    v1, v2, v3 = _fleet(registry, state_store, aws, settings.bucket)
    assert main(["promote", VIB, str(v3), "--reason", "known-good in the field"]) == 0
    assert capsys.readouterr().out.strip() == \
        f"{VIB} v{v3} is APPROVED (manual override); ModelApproved sent"
    assert main(["promote", VIB, str(v3), "--reason", "again"]) == 1
    assert "is APPROVED: only a REJECTED version" in capsys.readouterr().err
    assert main(["rollback", VIB, "--json"]) == 0
    request = json.loads(capsys.readouterr().out)
    assert (request["version"], request["replaces"]) == (v1, v2)
    details = received_details(aws, approved_queue)
    assert [(d["version"], d.get("rollback", False)) for d in details] == [(v3, False),
                                                                          (v1, True)]


def test_cli_train(runtime, aws, settings, state_store, capsys):
    _seed_raw_data(aws, settings.bucket, state_store)
    assert main(["train", VIB, "--reason", "new site"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"started training of {VIB} v1: sagemaker job mledge-{VIB}-v1-")
    assert out.endswith("on 1200 records (1 objects)")
    assert main(["train", VIB]) == 1
    assert "is still in progress" in capsys.readouterr().err
    assert main(["train", "digits", "--json"]) == 1
    assert "no new records since the last training" in capsys.readouterr().err


def test_cli_promote_requires_a_reason(runtime):
    with pytest.raises(SystemExit) as exit_info:
        main(["promote", VIB, "3"])
    assert exit_info.value.code == 2


# ---------------------------------------------------------------- the fleet's state


def test_fleet_shows_each_device_on_the_current_release(client, aws, settings, registry,
                                                        state_store, capsys):
    assert main(["fleet", VIB]) == 0
    assert "nothing released yet (thing group mledge-vibration)" in capsys.readouterr().out

    version = released_version_with(registry, state_store, VIB, aws, settings.bucket, 0.5)
    arns = [aws.iot.create_thing(thingName=name)["thingArn"] for name in ("dev-a", "dev-b")]
    aws.iot.create_job(jobId=f"{VIB}-v{version}", targets=arns, document="{}")
    aws.iot.cancel_job_execution(jobId=f"{VIB}-v{version}", thingName="dev-b")

    body = client.http.get(f"/models/{VIB}/fleet").json_body
    assert body["released_version"] == version
    assert body["job_id"] == f"{VIB}-v{version}"
    assert body["things"] == {"dev-a": "QUEUED", "dev-b": "CANCELED"}
    assert body["counts"] == {"CANCELED": 1, "QUEUED": 1}
    assert client.http.get("/models/nope/fleet").status_code == 404

    assert main(["fleet", VIB]) == 0
    out = capsys.readouterr().out
    assert f"{VIB} v{version}: job {VIB}-v{version}" in out
    assert "1 CANCELED, 1 QUEUED" in out
    assert "dev-b  CANCELED" in out


# ---- labels: an operator's verdicts on readings (mledge label, POST /models/{model}/labels)


def test_label_writes_verdicts_that_every_later_snapshot_carries(op, aws, settings) -> None:
    from chalicelib.snapshot import write_snapshot
    from tests.cloud.trigger_helpers import put_raw

    put_raw(aws.s3, settings.bucket, VIB, "b1", [{"id": "r1", "features": [0.0] * 8}])
    result = op.label(VIB, ["r1", "r2", "r1"], "fault", reason="bearing noise", actor="ana")
    assert result.records == 2 and result.key.startswith(f"labels/{VIB}/")
    body = aws.s3.get_object(Bucket=settings.bucket, Key=result.key)["Body"].read()
    lines = [json.loads(x) for x in gzip.decompress(body).decode().splitlines()]
    assert [(x["verdict_of"], x["verdict"], x["by"]) for x in lines] == [
        ("r1", "fault", "ana"), ("r2", "fault", "ana")]
    snapshot = write_snapshot(aws.s3, settings.bucket, VIB, 7)
    manifest = json.loads(aws.s3.get_object(Bucket=settings.bucket,
                                            Key=snapshot.manifest_key)["Body"].read())
    assert result.key in manifest and snapshot.records == 1  # verdicts are not records


@pytest.mark.parametrize(("ids", "verdict", "message"), [
    ([], "fault", "at least one record id"),
    (["r1"], "broken", "verdict must be one of fault, normal"),
    (["x" * 129], "fault", "at most 128 characters"),
    ([""], "normal", "non-empty strings"),
])
def test_label_refuses_bad_input_with_a_reason(op, ids, verdict, message) -> None:
    with pytest.raises(ValueError, match=message):
        op.label(VIB, ids, verdict)


def test_label_route_and_cli(client, aws, settings, capsys) -> None:
    headers = {"Content-Type": "application/json"}
    ok = client.http.post(f"/models/{VIB}/labels", headers=headers,
                        body=json.dumps({"record_ids": ["r9"], "verdict": "normal"}))
    assert ok.status_code == 200 and ok.json_body["records"] == 1
    bad = client.http.post(f"/models/{VIB}/labels", headers=headers,
                         body=json.dumps({"record_ids": "r9", "verdict": "normal"}))
    assert bad.status_code == 400
    assert client.http.post("/models/nope/labels", headers=headers, body=json.dumps(
        {"record_ids": ["r"], "verdict": "fault"})).status_code == 404
    assert main(["label", VIB, "fault", "r1", "r2", "--reason", "seen on site"]) == 0
    assert "2 readings of vibration-anomaly labelled fault" in capsys.readouterr().out


def test_release_route_retries_only_an_approved_version(client, registry, state_store, aws,
                                                        settings, approved_queue) -> None:
    version, name = start_version(registry, state_store, VIB)
    artifact = put_artifact(aws, settings.bucket, VIB, name, metrics_doc())
    registry.transition(VIB, version, Status.APPROVED, expected=[Status.TRAINING],
                        artifact=artifact)
    state_store.release_training_lock(VIB, version)  # its release failed (packaging frees it)
    headers = {"Content-Type": "application/json"}
    done = client.http.post(f"/models/{VIB}/versions/{version}/release", headers=headers,
                          body=json.dumps({"reason": "artifact fixed"}))
    assert done.status_code == 200, done.body
    detail = received_details(aws, approved_queue)[0]
    assert detail["attempt"] == done.json_body["attempt"] and detail["version"] == version
    _, v2, _ = _fleet(registry, state_store, aws, settings.bucket)
    released = client.http.post(f"/models/{VIB}/versions/{v2}/release", headers=headers,
                              body="{}")
    assert released.status_code == 409 and "only an APPROVED version" in released.json_body[
        "Message"]
    missing = client.http.post(f"/models/{VIB}/versions/99/release", headers=headers, body="{}")
    assert missing.status_code == 404
