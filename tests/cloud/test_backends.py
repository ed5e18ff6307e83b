"""Training backends: the SageMaker and Batch requests (moto), the local backend with a
fake and with the real trainer, the Batch launcher, job names and hyperparameters."""

from __future__ import annotations

import io
import json
import re
import tarfile
from dataclasses import replace
from typing import Any

import pytest
from mledge_devstack.local_training import LocalBackend, wait_for_local_job
from mledge_update.events import LOCAL_TRAINING_SOURCE, SAGEMAKER_DETAIL_TYPE
from mledge_update.naming import make_job_name, parse_job_name

from chalicelib import layout
from chalicelib.backends import (
    BackendConfigError,
    BatchBackend,
    SageMakerBackend,
    TrainingRequest,
    training_hyperparameters,
)
from chalicelib.config import TrainingConfig
from chalicelib.registry import Registry, Status
from chalicelib.state import StateStore
from chalicelib.trigger import Trigger
from tests.cloud.trigger_helpers import (
    RecordingClient,
    put_raw,
    readings,
    small_pipeline_config,
)
from tests.conftest import subprocess_env

SAGEMAKER_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")


@pytest.fixture
def config():
    return small_pipeline_config()


def start_via_trigger(aws, settings, config, model: str, backend=None, records: int = 30,
                      n_features: int = 2):
    put_raw(aws.s3, settings.bucket, model, "b1",
            readings(model, records, n_features=n_features))
    factory = (lambda name: backend) if backend is not None else None
    trigger = Trigger(clients=aws, settings=settings, config=config, backend_factory=factory)
    return trigger.start_training(model, force=True)


def release_with_champion(aws, settings, model: str) -> None:
    registry = Registry(settings.registry_table, aws.dynamodb)
    version = registry.allocate_version(model)
    registry.create_training(model, version, {"job_name": "mledge-x"})
    registry.transition(model, version, Status.APPROVED, expected=[Status.TRAINING], reason="t")
    registry.mark_released(model, version, {"job_id": "j"})
    aws.s3.put_object(Bucket=settings.bucket, Key=layout.champion_key(model, version),
                      Body=b"champion-onnx")
    StateStore(settings.state_table, aws.dynamodb).release_training_lock(model, version)


# ------------------------------------------------------------------ names, hyperparameters


def test_job_names_fit_sagemaker_and_parse_back():
    name = make_job_name("vibration-anomaly", 12)
    assert SAGEMAKER_NAME.match(name) and len(name) <= 63
    assert parse_job_name(name) == ("vibration-anomaly", 12)
    assert make_job_name("m", 1) != make_job_name("m", 1)  # retries get distinct names
    long = make_job_name("a" * 40 + "-" + "b" * 22, 99999, suffix="abc123")
    assert len(long) <= 63 and SAGEMAKER_NAME.match(long)


def test_hyperparameters_follow_the_container_contract(config):
    hp = training_hyperparameters(config.models["dig"], 7)
    assert all(isinstance(v, str) for v in hp.values())
    assert hp["family"] == "cnn" and hp["model_name"] == "dig"
    assert hp["model_version"] == "7" and hp["metric"] == "accuracy"
    assert json.loads(hp["features"]) == ["px0", "px1", "px2", "px3"]
    assert hp["label_mode"] == "required"
    assert hp["image_shape"] == "2,2" and hp["epochs"] == "50"


# ------------------------------------------------------------------ SageMaker


def test_sagemaker_job_carries_the_configured_fields(aws, settings, config):
    release_with_champion(aws, settings, "vib")
    started = start_via_trigger(aws, settings, config, "vib")
    assert started.version == 2 and started.champion_version == 1
    job = aws.sagemaker.describe_training_job(TrainingJobName=started.job_name)
    assert job["AlgorithmSpecification"]["TrainingImage"] == settings.training_image_uri
    assert job["AlgorithmSpecification"]["TrainingInputMode"] == "File"
    assert job["RoleArn"] == settings.training_role_arn
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"] for c in job["InputDataConfig"]}
    assert channels["train"]["S3DataType"] == "ManifestFile"
    assert channels["train"]["S3Uri"] == \
        f"s3://{settings.bucket}/datasets/vib/v00002/train.manifest"
    assert channels["champion"]["S3DataType"] == "S3Prefix"
    assert channels["champion"]["S3Uri"] == \
        f"s3://{settings.bucket}/releases/vib/v00001/model.onnx"
    assert job["OutputDataConfig"]["S3OutputPath"] == f"s3://{settings.bucket}/models/vib/"
    assert job["ResourceConfig"]["InstanceType"] == "ml.m5.xlarge"
    assert job["ResourceConfig"]["InstanceCount"] == 1
    assert job["ResourceConfig"]["VolumeSizeInGB"] == 40
    assert job["StoppingCondition"]["MaxRuntimeInSeconds"] == 1800
    assert job["HyperParameters"] == training_hyperparameters(config.models["vib"], 2)
    tags = {t["Key"]: t["Value"] for t in
            aws.sagemaker.list_tags(ResourceArn=job["TrainingJobArn"])["Tags"]}
    assert tags == {"mledge:model": "vib", "mledge:version": "2", "mledge:stage": "test"}


def test_sagemaker_job_without_a_champion_has_only_the_train_channel(aws, settings, config):
    started = start_via_trigger(aws, settings, config, "vib")
    job = aws.sagemaker.describe_training_job(TrainingJobName=started.job_name)
    assert [c["ChannelName"] for c in job["InputDataConfig"]] == ["train"]


def test_sagemaker_needs_image_and_role(settings, config):
    request = TrainingRequest(model="vib", version=1, job_name="mledge-vib-v1-a", bucket="b",
                              stage="t", training=TrainingConfig(), hyperparameters={},
                              manifest_key="k")
    with pytest.raises(BackendConfigError, match="ROLE"):
        SageMakerBackend(None, replace(settings, training_role_arn="")).start(request)


# ------------------------------------------------------------------ Batch


@pytest.fixture
def batch_env(aws, settings, monkeypatch):
    """moto's Batch without Docker, with a compute environment, the job queue and definition."""
    import boto3
    from moto.core.config import default_user_config

    monkeypatch.setitem(default_user_config["batch"], "use_docker", False)
    iam = boto3.client("iam", region_name=settings.region)
    role = iam.create_role(RoleName="batch-service", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    ce = aws.batch.create_compute_environment(
        computeEnvironmentName="gpu", type="UNMANAGED", state="ENABLED", serviceRole=role)
    aws.batch.create_job_queue(
        jobQueueName=settings.batch_job_queue, state="ENABLED", priority=1,
        computeEnvironmentOrder=[{"order": 1, "computeEnvironment": ce["computeEnvironmentArn"]}])
    aws.batch.register_job_definition(
        jobDefinitionName=settings.batch_job_definition, type="container",
        containerProperties={"image": settings.training_image_uri, "vcpus": 4, "memory": 15000})
    return aws


def test_batch_job_carries_the_configured_fields(batch_env, aws, settings, config):
    # moto's describe_jobs drops resourceRequirements overrides, so the SubmitJob
    # arguments are also recorded on their way to moto.
    recording = RecordingClient(aws.batch)
    backend = BatchBackend(recording, settings)
    started = start_via_trigger(aws, settings, config, "dig", backend, n_features=4)
    [(_call, submitted)] = [c for c in recording.calls if c[0] == "submit_job"]
    assert submitted["containerOverrides"]["resourceRequirements"] == [
        {"type": "GPU", "value": "1"}]
    jobs = aws.batch.list_jobs(jobQueue=settings.batch_job_queue, jobStatus="SUCCEEDED")
    [summary] = jobs["jobSummaryList"]
    assert summary["jobName"] == started.job_name
    [job] = aws.batch.describe_jobs(jobs=[summary["jobId"]])["jobs"]
    env = {e["name"]: e["value"] for e in job["container"]["environment"]}
    assert json.loads(env["MLEDGE_HYPERPARAMETERS"]) == \
        training_hyperparameters(config.models["dig"], started.version)
    assert env["MLEDGE_TRAIN_MANIFEST"] == \
        f"s3://{settings.bucket}/datasets/dig/v00001/train.manifest"
    assert env["MLEDGE_CHAMPION_URI"] == ""
    assert env["MLEDGE_OUTPUT_URI"] == \
        f"s3://{settings.bucket}/models/dig/{started.job_name}/output/"
    assert job["container"]["command"] == ["python", "-m", "trainer_batch.launcher"]
    assert job["timeout"] == {"attemptDurationSeconds": 900}
    assert job["tags"] == {"mledge:model": "dig", "mledge:version": "1", "mledge:stage": "test"}
    assert job["jobQueue"].endswith(f"job-queue/{settings.batch_job_queue}")


def test_batch_without_gpus_asks_for_none(settings, config):
    request = TrainingRequest(model="dig", version=1, job_name="mledge-dig-v1-a", bucket="b",
                              stage="t", training=TrainingConfig(gpu_count=0),
                              hyperparameters={}, manifest_key="k")
    submitted = BatchBackend(None, settings).submit_job_request(request)
    assert "resourceRequirements" not in submitted["containerOverrides"]


# ------------------------------------------------------------------ local


@pytest.fixture
def local_events(aws):
    """An EventBridge rule on the default bus sending local-training events to a queue."""
    url = aws.sqs.create_queue(QueueName="local-training-events")["QueueUrl"]
    arn = aws.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])[
        "Attributes"]["QueueArn"]
    aws.events.put_rule(Name="local-training", EventPattern=json.dumps(
        {"source": [LOCAL_TRAINING_SOURCE], "detail-type": [SAGEMAKER_DETAIL_TYPE]}))
    aws.events.put_targets(Rule="local-training", Targets=[{"Id": "q", "Arn": arn}])

    def receive() -> list[dict[str, Any]]:
        messages = aws.sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                                           WaitTimeSeconds=0).get("Messages", [])
        return [json.loads(m["Body"]) for m in messages]

    return receive


def fake_local_backend(aws, tmp_path) -> LocalBackend:
    return LocalBackend(aws.s3, aws.events, trainer_module="tests.cloud.fake_trainer",
                        env=subprocess_env(), work_root=tmp_path / "jobs", keep_work_dirs=True)


def artifact_members(aws, uri: str) -> dict[str, bytes]:
    bucket, key = uri[len("s3://"):].split("/", 1)
    body = aws.s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_local_backend_lays_out_the_contract_and_emits_a_sagemaker_shaped_event(
        aws, settings, config, tmp_path, local_events):
    release_with_champion(aws, settings, "loc")
    backend = fake_local_backend(aws, tmp_path)
    started = start_via_trigger(aws, settings, config, "loc", backend)
    job = wait_for_local_job(started.job_name, timeout=60)
    assert job.status == "Completed", job.failure_reason
    artifact = f"s3://{settings.bucket}/models/loc/{started.job_name}/output/model.tar.gz"
    members = artifact_members(aws, artifact)
    assert members["model.onnx"] == b"fake-onnx"
    seen = json.loads(members["seen.json"])
    assert seen["champion"] == "champion-onnx"
    assert seen["hyperparameters"] == training_hyperparameters(config.models["loc"], 2)
    [raw_key] = [o["Key"] for o in aws.s3.list_objects_v2(
        Bucket=settings.bucket, Prefix="raw/loc/")["Contents"]]
    assert seen["train_files"] == [raw_key]  # SageMaker keeps the key below the prefix

    [event] = local_events()
    assert event["source"] == LOCAL_TRAINING_SOURCE
    assert event["detail-type"] == "SageMaker Training Job State Change"
    detail = event["detail"]
    assert detail["TrainingJobName"] == started.job_name
    assert detail["TrainingJobStatus"] == "Completed"
    assert detail["ModelArtifacts"] == {"S3ModelArtifacts": artifact}
    assert detail["Tags"] == {"mledge:model": "loc", "mledge:version": "2",
                              "mledge:stage": "test"}
    assert detail["HyperParameters"]["model_version"] == "2"


def test_local_backend_reports_the_trainers_failure_reason(aws, settings, config, tmp_path,
                                                           local_events):
    model = replace(config.models["loc"], hyperparameters={"fake_mode": "fail"})
    config.models["loc"] = model
    started = start_via_trigger(aws, settings, config, "loc", fake_local_backend(aws, tmp_path))
    job = wait_for_local_job(started.job_name, timeout=60)
    assert job.status == "Failed"
    [event] = local_events()
    assert event["detail"]["TrainingJobStatus"] == "Failed"
    assert event["detail"]["FailureReason"] == "not enough records: 3 < 100"
    assert "ModelArtifacts" not in event["detail"]


def test_local_backend_stops_a_trainer_that_outlives_its_max_runtime(aws, settings, config,
                                                                     tmp_path, local_events):
    model = replace(config.models["loc"], hyperparameters={"fake_mode": "sleep"},
                    training=replace(config.models["loc"].training, max_runtime_seconds=1))
    config.models["loc"] = model
    started = start_via_trigger(aws, settings, config, "loc", fake_local_backend(aws, tmp_path))
    job = wait_for_local_job(started.job_name, timeout=60)
    assert job.status == "Failed"
    assert job.failure_reason.startswith("MaxRuntimeExceeded")
    assert local_events()[0]["detail"]["TrainingJobStatus"] == "Failed"


def _trainer_available() -> bool:
    try:
        import trainer.entrypoint  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _trainer_available(), reason="the trainer package is not importable")
def test_local_backend_runs_the_real_trainer_and_completion_takes_its_event(
        aws, settings, config, tmp_path, local_events):
    from chalicelib.completion import handle_local_training_event

    backend = LocalBackend(aws.s3, aws.events, env=subprocess_env(), work_root=tmp_path / "jobs")
    started = start_via_trigger(aws, settings, config, "loc", backend, records=300)
    job = wait_for_local_job(started.job_name, timeout=240)
    assert job.status == "Completed", job.failure_reason
    [event] = local_events()
    members = artifact_members(aws, event["detail"]["ModelArtifacts"]["S3ModelArtifacts"])
    assert {"model.onnx", "metrics.json", "golden.json"} <= set(members)
    metrics = json.loads(members["metrics.json"])
    assert metrics["data"]["records"] == 300

    state = StateStore(settings.state_table, aws.dynamodb)
    assert state.training_lock("loc").version == started.version
    handle_local_training_event(event, clients=aws, settings=settings, config=config)
    record = Registry(settings.registry_table, aws.dynamodb).get("loc", started.version)
    assert record.status in (Status.APPROVED, Status.REJECTED)
    # a rejection frees the lock; an approval keeps it until packaging is done
    lock = state.training_lock("loc")
    assert (lock is None) if record.status is Status.REJECTED else (lock.version == record.version)


@pytest.mark.slow
@pytest.mark.skipif(not _trainer_available(), reason="the trainer package is not importable")
def test_a_dataset_model_trains_on_parquet_end_to_end(aws, settings, tmp_path, local_events):
    """Compaction, the DuckDB dataset, the local backend, the real trainer on Parquet."""
    import tomllib

    from chalicelib.config import parse_pipeline_config
    from tests.cloud.trigger_helpers import TEST_PIPELINE

    config = parse_pipeline_config(tomllib.loads(
        TEST_PIPELINE + "\n[models.loc.dataset]\nwindow_days = 3650\nmax_records = 200\n"))
    backend = LocalBackend(aws.s3, aws.events, env=subprocess_env(), work_root=tmp_path / "jobs")
    started = start_via_trigger(aws, settings, config, "loc", backend, records=300)
    assert started.records <= 200
    job = wait_for_local_job(started.job_name, timeout=240)
    assert job.status == "Completed", job.failure_reason
    [event] = local_events()
    members = artifact_members(aws, event["detail"]["ModelArtifacts"]["S3ModelArtifacts"])
    metrics = json.loads(members["metrics.json"])
    assert metrics["data"]["records"] == started.records
    assert metrics["data"]["files"] == 1  # datasets/loc/v00001/data/part-00000.parquet


# ------------------------------------------------------------------ Batch launcher


def test_batch_launcher_runs_the_contract_and_uploads_where_sagemaker_would(aws, settings,
                                                                            config, tmp_path):
    from trainer_batch import launcher

    put_raw(aws.s3, settings.bucket, "dig", "b1", readings("dig", 5, n_features=4))
    snapshot_key = "datasets/dig/v00001/train.manifest"
    raw_key = aws.s3.list_objects_v2(Bucket=settings.bucket, Prefix="raw/dig/")["Contents"][0]["Key"]
    aws.s3.put_object(Bucket=settings.bucket, Key=snapshot_key, Body=json.dumps(
        [{"prefix": f"s3://{settings.bucket}/"}, raw_key]).encode())
    output = f"s3://{settings.bucket}/models/dig/mledge-dig-v1-abc/output/"
    env = {**subprocess_env(), "MLEDGE_OUTPUT_URI": output,
           "MLEDGE_HYPERPARAMETERS": json.dumps({"family": "classifier"}),
           "MLEDGE_TRAIN_MANIFEST": f"s3://{settings.bucket}/{snapshot_key}",
           "MLEDGE_CHAMPION_URI": "", "MLEDGE_TRAINING_BASE_DIR": str(tmp_path / "ok")}
    assert launcher.run(env, aws.s3, module="tests.cloud.fake_trainer") == 0
    members = artifact_members(aws, output + "model.tar.gz")
    assert json.loads(members["seen.json"])["train_files"] == [raw_key]

    failing = {**env, "MLEDGE_HYPERPARAMETERS": json.dumps({"fake_mode": "fail"}),
               "MLEDGE_TRAINING_BASE_DIR": str(tmp_path / "fail")}
    assert launcher.run(failing, aws.s3, module="tests.cloud.fake_trainer") == 1
    reason = aws.s3.get_object(Bucket=settings.bucket, Key=output[len(f"s3://{settings.bucket}/"):]
                               + "failure")["Body"].read().decode()
    assert reason == "not enough records: 3 < 100"

    unsafe = {**env, "MLEDGE_TRAINING_BASE_DIR": str(tmp_path / "unsafe")}
    aws.s3.put_object(Bucket=settings.bucket, Key=snapshot_key, Body=json.dumps(
        [{"prefix": f"s3://{settings.bucket}/"}, "../../etc/passwd"]).encode())
    assert launcher.run(unsafe, aws.s3, module="tests.cloud.fake_trainer") == 1


def test_the_lambda_package_has_no_local_backend_until_the_local_stack_registers_it(settings, monkeypatch):
    from mledge_devstack.local_training import register_local_backend

    from chalicelib import backends

    monkeypatch.setattr(backends, "_FACTORIES", dict(backends._FACTORIES))
    backends._FACTORIES.pop("local", None)
    with pytest.raises(BackendConfigError, match="only the local stack provides it"):
        backends.backend_for("local", object(), settings)
    with pytest.raises(BackendConfigError, match="unknown training backend 'gpu-farm'"):
        backends.backend_for("gpu-farm", object(), settings)

    class Clients:
        s3, events = object(), object()

    register_local_backend()
    assert isinstance(backends.backend_for("local", Clients(), settings), LocalBackend)
