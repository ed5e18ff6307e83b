"""Packaging: ModelApproved -> release files, verified deltas, one IoT Job, registry RELEASED."""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from mledge_update.codecs import apply_delta, decode_full
from mledge_update.document import parse_job_document, parse_manifest
from mledge_update.errors import SignatureError
from mledge_update.hashing import sha256_hex
from mledge_update.signing import ReleaseVerifier
from skl2onnx import to_onnx
from sklearn.cluster import KMeans

from chalicelib import layout
from chalicelib.registry import Registry, Status
from chalicelib.runtime import Runtime, set_runtime
from chalicelib.signing import release_public_key_pem

MODEL = "vibration-anomaly"


def kmeans_onnx(seed: int, n: int = 400) -> bytes:
    """A real retrained k-means ONNX model (data grows with `seed`)."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(c, 0.3, size=(n, 8)) for c in (0.0, 3.0, 6.0)])
    model = KMeans(n_clusters=3, n_init=2, random_state=0).fit(x.astype(np.float32))
    return to_onnx(model, x[:1].astype(np.float32), target_opset=17).SerializeToString()


GOLDEN = {"input_name": "X", "inputs": [[0.0] * 8], "outputs": {"label": [0]},
          "tolerance": 1e-4}


def artifact(onnx: bytes, golden: dict[str, Any] | None = None,
             metrics: dict[str, Any] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in (("model.onnx", onnx),
                           ("golden.json", json.dumps(golden or GOLDEN).encode()),
                           ("metrics.json", json.dumps(metrics or {"metric": "silhouette"})
                            .encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def approve(env: dict[str, Any], blob: bytes) -> int:
    """A version trained and approved, with its artifact in S3."""
    registry: Registry = env["registry"]
    version = registry.allocate_version(MODEL)
    registry.create_training(MODEL, version, {"job_name": f"mledge-{MODEL}-v{version}-x"})
    key = f"models/{MODEL}/mledge-{MODEL}-v{version}-x/output/model.tar.gz"
    env["aws"].s3.put_object(Bucket=env["settings"].bucket, Key=key, Body=blob)
    registry.transition(MODEL, version, Status.APPROVED, expected=[Status.TRAINING],
                        artifact=f"s3://{env['settings'].bucket}/{key}",
                        metrics={"challenger": {"silhouette": 0.7}})
    return version


def publish(env: dict[str, Any], version: int, **extra: Any) -> dict[str, Any]:
    client = env["client"]
    event = client.events.generate_cw_event(
        source="mledge.pipeline", detail_type="ModelApproved",
        detail={"model": MODEL, "version": version, **extra}, resources=[])
    return client.lambda_.invoke("release_approved_model", event).payload


def job_document(env: dict[str, Any], job_id: str) -> dict[str, Any]:
    return json.loads(env["aws"].iot.get_job_document(jobId=job_id)["document"])


def s3_get(env: dict[str, Any], key: str) -> bytes:
    return env["aws"].s3.get_object(Bucket=env["settings"].bucket, Key=key)["Body"].read()


def key_of(placeholder: str) -> str:
    # ${aws:iot:s3-presigned-url:https://s3.<region>.amazonaws.com/<bucket>/<key>}
    assert placeholder.startswith("${aws:iot:s3-presigned-url:https://s3.us-east-1.amazonaws")
    return placeholder.rstrip("}").split("/", 4)[4]


def test_first_release_creates_the_job_with_document_and_configs(env) -> None:
    onnx = kmeans_onnx(1)
    v1 = approve(env, artifact(onnx))
    result = publish(env, v1)
    assert result["outcome"] == "released", result
    job_id = result["job_id"]
    assert job_id == "mledge-vibration-anomaly-v00001"

    job = env["aws"].iot.describe_job(jobId=job_id)["job"]
    assert job["targets"][0].endswith(":thinggroup/mledge-vibration")
    assert job["targetSelection"] == "CONTINUOUS"
    assert job["presignedUrlConfig"] == {"roleArn": env["settings"].iot_presign_role_arn,
                                         "expiresInSec": 3600}
    rate = job["jobExecutionsRolloutConfig"]["exponentialRate"]
    assert rate == {"baseRatePerMinute": 20, "incrementFactor": 2.0,
                    "rateIncreaseCriteria": {"numberOfSucceededThings": 10}}
    assert job["jobExecutionsRolloutConfig"]["maximumPerMinute"] == 1000
    assert job["abortConfig"]["criteriaList"] == [{
        "failureType": "ALL", "action": "CANCEL", "thresholdPercentage": 10.0,
        "minNumberOfExecutedThings": 10}]
    assert job["timeoutConfig"] == {"inProgressTimeoutInMinutes": 30}

    doc = job_document(env, job_id)
    parsed = parse_job_document(doc)
    assert (parsed.model, parsed.version, parsed.rollback) == (MODEL, 1, False)
    assert parsed.model_sha256 == sha256_hex(onnx)
    assert parsed.deltas == ()
    assert parsed.schema["features"][0] == "rms"
    assert doc["uplink"]["sample_rate"] == 0.02
    full = s3_get(env, key_of(doc["full"]["url"]))
    assert sha256_hex(full) == doc["full"]["sha256"]
    assert decode_full(doc["full"]["encoding"], full) == onnx

    record = env["registry"].get(MODEL, v1)
    assert record.status is Status.RELEASED
    assert record.release["job_id"] == job_id
    manifest = json.loads(s3_get(env, f"{layout.release_prefix(MODEL, v1)}manifest.json"))
    assert manifest["model_sha256"] == sha256_hex(onnx)
    assert s3_get(env, layout.champion_key(MODEL, v1)) == onnx


def test_second_release_ships_verified_deltas_and_cancels_the_old_job(env) -> None:
    old, new = kmeans_onnx(1), kmeans_onnx(2, n=600)
    v1 = approve(env, artifact(old))
    publish(env, v1)
    v2 = approve(env, artifact(new))
    result = publish(env, v2)
    assert result["outcome"] == "released", result

    doc = job_document(env, result["job_id"])
    assert doc["deltas"], "a retrained model must ship at least one delta"
    codecs = {d["codec"] for d in doc["deltas"]}
    assert "bsdiff4" in codecs or all(d["size"] < doc["full"]["size"] for d in doc["deltas"])
    for delta in doc["deltas"]:
        assert delta["from_version"] == v1
        assert delta["from_sha256"] == sha256_hex(old)
        assert delta["size"] < doc["full"]["size"]
        blob = s3_get(env, key_of(delta["url"]))
        assert sha256_hex(blob) == delta["sha256"]
        assert apply_delta(delta["codec"], old, blob) == new  # bit for bit

    assert env["registry"].get(MODEL, v1).status is Status.SUPERSEDED
    assert env["registry"].get(MODEL, v2).status is Status.RELEASED
    old_job = env["aws"].iot.describe_job(jobId="mledge-vibration-anomaly-v00001")["job"]
    assert old_job["status"] == "CANCELED"


def test_repeated_event_does_nothing(env) -> None:
    v1 = approve(env, artifact(kmeans_onnx(1)))
    first = publish(env, v1)
    again = publish(env, v1)
    assert first["outcome"] == "released"
    assert again["outcome"] == "skipped"
    assert "already the current release" in again["reason"]
    jobs = env["aws"].iot.list_jobs()["jobs"]
    assert [j["jobId"] for j in jobs] == [first["job_id"]]
    history = env["registry"].get(MODEL, v1).history
    assert [h["to"] for h in history].count("RELEASED") == 1


@pytest.mark.parametrize(
    ("blob", "reason"),
    [
        (b"\x1f\x8b not really gzip", "not a readable tar.gz"),
        (None, "not found"),
    ],
)
def test_corrupt_or_missing_artifact_is_recorded_not_half_released(env, blob, reason) -> None:
    v1 = approve(env, artifact(kmeans_onnx(1)))
    key = f"models/{MODEL}/mledge-{MODEL}-v{v1}-x/output/model.tar.gz"
    if blob is None:
        env["aws"].s3.delete_object(Bucket=env["settings"].bucket, Key=key)
    else:
        env["aws"].s3.put_object(Bucket=env["settings"].bucket, Key=key, Body=blob)
    result = publish(env, v1)
    assert result["outcome"] == "failed"
    assert reason in result["reason"]
    record = env["registry"].get(MODEL, v1)
    assert record.status is Status.APPROVED  # can be released once the artifact is fixed
    assert reason in record.history[-1]["reason"]
    assert env["aws"].iot.list_jobs()["jobs"] == []
    listed = env["aws"].s3.list_objects_v2(Bucket=env["settings"].bucket, Prefix="releases/")
    assert listed.get("KeyCount", 0) == 0


def test_artifact_without_model_or_golden_is_refused(env) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("metrics.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    v1 = approve(env, buf.getvalue())
    result = publish(env, v1)
    assert result["outcome"] == "failed"
    assert "holds no model.onnx" in result["reason"]


def test_oversized_job_document_is_a_clear_error(env) -> None:
    huge = dict(GOLDEN, inputs=[[0.123456789] * 8] * 600, outputs={"label": [0] * 600})
    v1 = approve(env, artifact(kmeans_onnx(1), golden=huge))
    result = publish(env, v1)
    assert result["outcome"] == "failed"
    assert "limit is 32768" in result["reason"]
    assert env["aws"].iot.list_jobs()["jobs"] == []


def test_rollback_releases_the_older_model_again(env) -> None:
    old, new = kmeans_onnx(1), kmeans_onnx(2, n=600)
    v1 = approve(env, artifact(old))
    publish(env, v1)
    v2 = approve(env, artifact(new))
    publish(env, v2)

    result = publish(env, v1, rollback=True, manual=True, replaces=v2, attempt="a1")
    assert result["outcome"] == "released", result
    assert result["job_id"] == "mledge-vibration-anomaly-v00001-rollback-a1"
    doc = job_document(env, result["job_id"])
    assert doc["rollback"] is True and doc["version"] == v1
    assert doc["model_sha256"] == sha256_hex(old)
    # devices on v2 get a delta back to v1
    assert {d["from_version"] for d in doc["deltas"]} == {v2}
    for delta in doc["deltas"]:
        assert apply_delta(delta["codec"], new, s3_get(env, key_of(delta["url"]))) == old
    assert env["registry"].get(MODEL, v2).status is Status.ROLLED_BACK
    assert env["registry"].get(MODEL, v1).status is Status.RELEASED
    # the same rollback event again does nothing
    assert publish(env, v1, rollback=True, replaces=v2, attempt="a1")["outcome"] == "skipped"


def test_unknown_model_or_version_is_skipped_with_reason(env) -> None:
    assert "no version 9" in publish(env, 9)["reason"]


# ---------------------------------------------------------------------------- signing

def _stage_verifier(env: dict[str, Any]) -> ReleaseVerifier:
    pem = release_public_key_pem(env["aws"].kms, env["settings"].signing_key_id)
    return ReleaseVerifier.from_pem(pem)


def test_release_is_signed_with_the_stage_kms_key_and_verifies_as_a_device_would(env) -> None:
    v1 = approve(env, artifact(kmeans_onnx(1)))
    v2 = approve(env, artifact(kmeans_onnx(2)))
    publish(env, v1)
    result = publish(env, v2)
    document = job_document(env, result["job_id"])
    manifest = json.loads(s3_get(env, result["manifest_key"]))
    verifier = _stage_verifier(env)
    job = parse_job_document(document)
    verifier.verify(job)  # the delivered document (placeholder URLs)
    verifier.verify(parse_manifest(manifest))  # the kept manifest: same statement, same signature
    assert manifest["signature"] == document["signature"]
    key_arn = env["aws"].kms.describe_key(KeyId=env["settings"].signing_key_id)["KeyMetadata"]["Arn"]
    assert document["signature"]["key_id"] == key_arn
    assert env["registry"].get(MODEL, v2).release["signing_key"] == key_arn
    # The deltas the document ships are the ones the signature covers.
    assert [d["sha256"] for d in document["deltas"]] == [d["sha256"] for d in manifest["deltas"]]
    tampered = dict(document, model_sha256="0" * 64)
    with pytest.raises(SignatureError):
        verifier.verify(parse_job_document(tampered))


def test_signed_rollback_names_the_release_it_leaves(env) -> None:
    v1 = approve(env, artifact(kmeans_onnx(1)))
    v2 = approve(env, artifact(kmeans_onnx(2)))
    publish(env, v1)
    publish(env, v2)
    result = publish(env, v1, rollback=True, manual=True)
    document = job_document(env, result["job_id"])
    assert document["rollback"] is True and document["rollback_from"] == v2
    _stage_verifier(env).verify(parse_job_document(document))


def test_without_a_usable_signing_key_nothing_is_released(env, settings) -> None:
    v1 = approve(env, artifact(kmeans_onnx(1)))
    set_runtime(Runtime.from_settings(replace(settings, signing_key_id="alias/missing"),
                                      clients=env["aws"]))
    result = publish(env, v1)
    assert result["outcome"] == "failed" and "KMS Sign with alias/missing failed" in result["reason"]
    assert env["aws"].iot.list_jobs()["jobs"] == []
    assert env["registry"].get(MODEL, v1).status is Status.APPROVED
    set_runtime(Runtime.from_settings(replace(settings, signing_key_id=""), clients=env["aws"]))
    assert "MLEDGE_SIGNING_KEY_ID is not set" in publish(env, v1)["reason"]


# ---------------------------------------------------------------------------- observability

def test_release_emits_its_metrics(env, capsys) -> None:
    v1 = approve(env, artifact(kmeans_onnx(1)))
    v2 = approve(env, artifact(kmeans_onnx(2)))
    publish(env, v1)
    capsys.readouterr()
    result = publish(env, v2)
    blobs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"_aws"' in line]
    (per_model,) = [b for b in blobs if b.get("model") == MODEL]
    assert per_model["Releases"] == [1.0] and per_model["version"] == v2
    assert per_model["ReleaseFullBytes"] == [float(result["full_size"])]
    assert per_model["ReleaseSmallestDeltaBytes"] == [float(min(d["size"] for d in result["deltas"]))]
    assert len(blobs) == 2  # and the stage-wide copy the alarms read


def test_rollout_progress_is_reported_for_each_current_release(env, capsys) -> None:
    from chalicelib.rollouts import COUNT_FIELDS, execution_counts

    client = env["client"]
    tick = client.events.generate_cw_event(source="aws.events", detail_type="Scheduled Event",
                                           detail={}, resources=[])
    capsys.readouterr()
    client.lambda_.invoke("report_rollouts", tick)
    assert '"_aws"' not in capsys.readouterr().out  # nothing released: nothing to report
    v1 = approve(env, artifact(kmeans_onnx(1)))
    job_id = publish(env, v1)["job_id"]
    capsys.readouterr()
    client.lambda_.invoke("report_rollouts", tick)
    blobs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"_aws"' in line]
    (per_model,) = [b for b in blobs if b.get("model") == MODEL]
    assert per_model["job_id"] == job_id and per_model["version"] == v1
    assert {k for k in per_model if k.startswith("Rollout")} == {
        "RolloutQueued", "RolloutInProgress", "RolloutSucceeded", "RolloutFailed",
        "RolloutRejected", "RolloutTimedOut", "RolloutCanceled", "RolloutRemoved",
        "RolloutSucceededPercent"}
    assert per_model["RolloutQueued"] == [1.0] and per_model["RolloutSucceededPercent"] == [0.0]
    # The counts come from IoT's jobProcessDetails, whatever subset it reports.
    details = {name: i for i, name in enumerate(COUNT_FIELDS, start=1)}
    counts = execution_counts({"jobProcessDetails": details})
    assert counts["SUCCEEDED"] == details["numberOfSucceededThings"]
    assert execution_counts({}) == dict.fromkeys(COUNT_FIELDS.values(), 0)
