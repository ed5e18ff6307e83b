"""Training backends: one interface, three ways to run the training image.

`TrainingBackend.start(request) -> job name` starts a job and returns at once;
completion arrives later as an EventBridge event that the completion handler
(chalicelib's gate) takes:

- `SageMakerBackend`: `CreateTrainingJob`; SageMaker emits
  "SageMaker Training Job State Change" (source `aws.sagemaker`).
- `BatchBackend`: `SubmitJob` to a (GPU) job queue; the container runs
  `python -m trainer_batch.launcher`, which lays out SageMaker's directory
  contract itself; Batch emits "Batch Job State Change" (source `aws.batch`).
- `LocalBackend`: the trainer in a subprocess on this machine (local stack,
  tests); it emits a SageMaker-shaped event with source `mledge.local-training`.

All three train on the same inputs (the `train.manifest` snapshot and the
champion's ONNX) and leave `model.tar.gz` at the same key:
`s3://<bucket>/models/<model>/<job>/output/model.tar.gz`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from mledge_update.events import LOCAL_TRAINING_SOURCE, SAGEMAKER_DETAIL_TYPE
from mledge_update.naming import job_tags

from chalicelib import layout
from chalicelib.config import ModelConfig, TrainingConfig
from chalicelib.settings import Settings

_REPO = Path(__file__).resolve().parents[1]


class BackendError(Exception):
    """A training job could not be started; the message says why."""


class BackendConfigError(BackendError):
    """A stage setting the backend needs is missing (image, role, job queue...)."""


@dataclass(frozen=True)
class TrainingRequest:
    """Everything a backend needs to start one training job."""

    model: str
    version: int
    job_name: str
    bucket: str
    stage: str
    training: TrainingConfig
    hyperparameters: dict[str, str]
    manifest_key: str                # datasets/<model>/v<NNNNN>/train.manifest
    champion_key: str | None = None  # releases/<model>/v<NNNNN>/model.onnx

    @property
    def manifest_uri(self) -> str:
        return f"s3://{self.bucket}/{self.manifest_key}"

    @property
    def champion_uri(self) -> str | None:
        return f"s3://{self.bucket}/{self.champion_key}" if self.champion_key else None

    @property
    def output_path(self) -> str:
        """SageMaker's S3OutputPath; the job writes under <path><job>/output/."""
        return f"s3://{self.bucket}/{layout.training_output_prefix(self.model)}"

    @property
    def job_output_uri(self) -> str:
        return f"{self.output_path}{self.job_name}/output/"

    @property
    def artifact_uri(self) -> str:
        return f"{self.job_output_uri}model.tar.gz"

    @property
    def tags(self) -> dict[str, str]:
        return job_tags(self.model, self.version, self.stage)


class TrainingBackend(Protocol):
    name: str

    def start(self, request: TrainingRequest) -> str:
        """Start the job; returns its name. Raises BackendError when it did not start."""
        ...


def training_hyperparameters(model: ModelConfig, version: int) -> dict[str, str]:
    """The training container's hyperparameters (all strings; BRIEF.md's list + the model's)."""
    hp = {
        "family": model.family,
        "model_name": model.name,
        "model_version": str(version),
        "metric": model.metric,
        "features": json.dumps(list(model.schema.features), separators=(",", ":")),
        "label_mode": model.schema.label,
    }
    for key, value in model.hyperparameters.items():
        hp.setdefault(key, str(value))
    return hp


# ---------------------------------------------------------------------- SageMaker


class SageMakerBackend:
    name = "sagemaker"

    def __init__(self, sagemaker_client: Any, settings: Settings) -> None:
        self.sagemaker = sagemaker_client
        self.settings = settings

    def training_job_request(self, request: TrainingRequest) -> dict[str, Any]:
        """The CreateTrainingJob arguments (a function of the request and the settings)."""
        if not self.settings.training_image_uri:
            raise BackendConfigError("SageMaker training needs MLEDGE_TRAINING_IMAGE_URI")
        if not self.settings.training_role_arn:
            raise BackendConfigError("SageMaker training needs MLEDGE_TRAINING_ROLE_ARN")
        t = request.training
        channels: list[dict[str, Any]] = [{
            "ChannelName": "train",
            "DataSource": {"S3DataSource": {
                "S3DataType": "ManifestFile",
                "S3Uri": request.manifest_uri,
                "S3DataDistributionType": "FullyReplicated",
            }},
            "CompressionType": "None",  # the objects stay .jsonl.gz files; the trainer reads them
        }]
        if request.champion_uri:
            channels.append({
                "ChannelName": "champion",
                "DataSource": {"S3DataSource": {
                    "S3DataType": "S3Prefix",
                    "S3Uri": request.champion_uri,
                    "S3DataDistributionType": "FullyReplicated",
                }},
            })
        return {
            "TrainingJobName": request.job_name,
            "AlgorithmSpecification": {
                "TrainingImage": self.settings.training_image_uri,
                "TrainingInputMode": "File",
            },
            "RoleArn": self.settings.training_role_arn,
            "InputDataConfig": channels,
            "OutputDataConfig": {"S3OutputPath": request.output_path},
            "ResourceConfig": {
                "InstanceType": t.instance_type,
                "InstanceCount": t.instance_count,
                "VolumeSizeInGB": t.volume_size_gb,
            },
            "StoppingCondition": {"MaxRuntimeInSeconds": t.max_runtime_seconds},
            "HyperParameters": dict(request.hyperparameters),
            "Tags": [{"Key": k, "Value": v} for k, v in request.tags.items()],
        }

    def start(self, request: TrainingRequest) -> str:
        arguments = self.training_job_request(request)
        try:
            self.sagemaker.create_training_job(**arguments)
        except Exception as exc:
            raise BackendError(f"SageMaker CreateTrainingJob {request.job_name}: {exc}") from exc
        return request.job_name


# ---------------------------------------------------------------------- AWS Batch

BATCH_COMMAND = ["python", "-m", "trainer_batch.launcher"]


class BatchBackend:
    name = "batch"

    def __init__(self, batch_client: Any, settings: Settings) -> None:
        self.batch = batch_client
        self.settings = settings

    def submit_job_request(self, request: TrainingRequest) -> dict[str, Any]:
        """The SubmitJob arguments. The compute environment picks the instance type;
        the job asks for `gpu_count` GPUs, which places it on a GPU instance."""
        if not self.settings.batch_job_queue or not self.settings.batch_job_definition:
            raise BackendConfigError(
                "Batch training needs MLEDGE_BATCH_JOB_QUEUE and MLEDGE_BATCH_JOB_DEFINITION"
            )
        t = request.training
        environment = {
            "MLEDGE_JOB_NAME": request.job_name,
            "MLEDGE_MODEL": request.model,
            "MLEDGE_MODEL_VERSION": str(request.version),
            "MLEDGE_HYPERPARAMETERS": json.dumps(request.hyperparameters, sort_keys=True),
            "MLEDGE_TRAIN_MANIFEST": request.manifest_uri,
            "MLEDGE_CHAMPION_URI": request.champion_uri or "",
            "MLEDGE_OUTPUT_URI": request.job_output_uri,
            "MLEDGE_MAX_RUNTIME_SECONDS": str(t.max_runtime_seconds),
        }
        overrides: dict[str, Any] = {
            "command": list(BATCH_COMMAND),
            "environment": [{"name": k, "value": v} for k, v in environment.items()],
        }
        if t.gpu_count > 0:
            overrides["resourceRequirements"] = [{"type": "GPU", "value": str(t.gpu_count)}]
        return {
            "jobName": request.job_name,
            "jobQueue": self.settings.batch_job_queue,
            "jobDefinition": self.settings.batch_job_definition,
            "containerOverrides": overrides,
            # Batch kills the attempt after this; the launcher also stops the trainer.
            "timeout": {"attemptDurationSeconds": max(60, t.max_runtime_seconds)},
            "tags": request.tags,
            "propagateTags": True,
        }

    def start(self, request: TrainingRequest) -> str:
        arguments = self.submit_job_request(request)
        try:
            self.batch.submit_job(**arguments)
        except Exception as exc:
            raise BackendError(f"Batch SubmitJob {request.job_name}: {exc}") from exc
        return request.job_name


# ---------------------------------------------------------------------- local


@dataclass
class LocalJob:
    """A training running (or finished) in a subprocess of this process."""

    request: TrainingRequest
    base_dir: Path
    status: str = "InProgress"  # InProgress | Completed | Failed (SageMaker's words)
    failure_reason: str | None = None
    event: dict[str, Any] | None = None  # the PutEvents entry it emitted
    done: threading.Event = field(default_factory=threading.Event, repr=False)


_LOCAL_JOBS: dict[str, LocalJob] = {}
_LOCAL_JOBS_LOCK = threading.Lock()


def local_job(job_name: str) -> LocalJob:
    with _LOCAL_JOBS_LOCK:
        return _LOCAL_JOBS[job_name]


def wait_for_local_job(job_name: str, timeout: float) -> LocalJob:
    """Block until the local job finished (its event is emitted); raises TimeoutError."""
    job = local_job(job_name)
    if not job.done.wait(timeout):
        raise TimeoutError(f"local training job {job_name} still running after {timeout:.0f} s")
    return job


def wait_for_local_jobs(timeout: float) -> list[LocalJob]:
    """Wait for every local job started in this process (tests, the demo)."""
    with _LOCAL_JOBS_LOCK:
        jobs = list(_LOCAL_JOBS.values())
    deadline = datetime.now(UTC).timestamp() + timeout
    for job in jobs:
        left = max(0.0, deadline - datetime.now(UTC).timestamp())
        if not job.done.wait(left):
            raise TimeoutError(f"local training job {job.request.job_name} still running")
    return jobs


def default_trainer_env() -> dict[str, str]:
    """This environment, with the checkout's training_image/ and update_format/ importable.

    One OpenMP thread unless the caller chose: a local trainer shares the machine with
    the stack and the fleet's agents, and OpenMP threads spinning against them made a
    small PyTorch fit 30x slower (5 s vs 158 s for the digits CNN on 2 busy cores)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    paths = [str(_REPO / "training_image"), str(_REPO / "update_format"), str(_REPO)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


class LocalBackend:
    """The trainer in a subprocess under SageMaker's directory contract.

    `start` returns at once; a background thread downloads the inputs, runs
    `python -m trainer.entrypoint --base-dir DIR` (killed after the model's max
    runtime), uploads `model.tar.gz` where SageMaker would, and puts a
    SageMaker-shaped state-change event on the event bus. Only for a machine
    that stays up (the local stack, tests): a Lambda would freeze the thread.
    """

    name = "local"

    def __init__(self, s3_client: Any, events_client: Any, *, event_bus: str = "default",
                 python: str = sys.executable, trainer_module: str = "trainer.entrypoint",
                 env: Mapping[str, str] | None = None, work_root: Path | None = None,
                 keep_work_dirs: bool = False, region: str = "us-east-1") -> None:
        self.s3 = s3_client
        self.events = events_client
        self.event_bus = event_bus
        self.python = python
        self.trainer_module = trainer_module
        self.env = dict(env) if env is not None else default_trainer_env()
        self.work_root = work_root
        self.keep_work_dirs = keep_work_dirs
        self.region = region

    def start(self, request: TrainingRequest) -> str:
        try:
            from trainer_batch import channels  # noqa: F401  (fail here, not in the thread)
        except ImportError as exc:
            raise BackendError(
                "the local backend needs the training_image packages importable "
                f"(pip install -e training_image): {exc}"
            ) from exc
        if self.work_root is not None:
            self.work_root.mkdir(parents=True, exist_ok=True)
        base_dir = Path(tempfile.mkdtemp(prefix=f"{request.job_name}-", dir=self.work_root))
        job = LocalJob(request=request, base_dir=base_dir)
        with _LOCAL_JOBS_LOCK:
            _LOCAL_JOBS[request.job_name] = job
        thread = threading.Thread(target=self._run, args=(job,),
                                  name=f"local-training-{request.job_name}", daemon=True)
        thread.start()
        return request.job_name

    def _run(self, job: LocalJob) -> None:
        from trainer_batch import channels

        request = job.request
        started = datetime.now(UTC)
        try:
            channels.prepare_base_dir(
                self.s3, job.base_dir, manifest_uri=request.manifest_uri,
                champion_uri=request.champion_uri, hyperparameters=request.hyperparameters,
            )
            result = channels.run_trainer(
                job.base_dir, python=self.python, module=self.trainer_module, env=self.env,
                timeout=request.training.max_runtime_seconds,
            )
            if result.succeeded:
                channels.upload_file(self.s3, channels.package_model(job.base_dir),
                                     request.artifact_uri)
                job.status = "Completed"
            else:
                job.status, job.failure_reason = "Failed", result.failure
        except Exception as exc:  # any failure becomes a Failed event, like SageMaker's
            job.status, job.failure_reason = "Failed", f"local backend: {exc}"[:1024]
        try:
            job.event = self._emit(job, started, datetime.now(UTC))
        finally:
            job.done.set()
            if not self.keep_work_dirs and job.status == "Completed":
                shutil.rmtree(job.base_dir, ignore_errors=True)

    def _emit(self, job: LocalJob, started: datetime, ended: datetime) -> dict[str, Any]:
        entry = {
            "Source": LOCAL_TRAINING_SOURCE,
            "DetailType": SAGEMAKER_DETAIL_TYPE,
            "Resources": [self.job_arn(job.request.job_name)],
            "Detail": json.dumps(self.event_detail(job, started, ended)),
            "EventBusName": self.event_bus,
        }
        response = self.events.put_events(Entries=[entry])
        if response.get("FailedEntryCount"):
            raise BackendError(f"PutEvents refused the completion event: {response['Entries']}")
        return entry

    def job_arn(self, job_name: str) -> str:
        return f"arn:aws:sagemaker:{self.region}:000000000000:training-job/{job_name}"

    def event_detail(self, job: LocalJob, started: datetime, ended: datetime) -> dict[str, Any]:
        """The `detail` of SageMaker's Training Job State Change event (times in epoch ms)."""
        request = job.request
        detail: dict[str, Any] = {
            "TrainingJobName": request.job_name,
            "TrainingJobArn": self.job_arn(request.job_name),
            "TrainingJobStatus": job.status,
            "SecondaryStatus": job.status,
            "HyperParameters": dict(request.hyperparameters),
            "OutputDataConfig": {"S3OutputPath": request.output_path},
            "ResourceConfig": {"InstanceType": "local", "InstanceCount": 1,
                               "VolumeSizeInGB": request.training.volume_size_gb},
            "StoppingCondition": {"MaxRuntimeInSeconds": request.training.max_runtime_seconds},
            "CreationTime": int(started.timestamp() * 1000),
            "TrainingStartTime": int(started.timestamp() * 1000),
            "TrainingEndTime": int(ended.timestamp() * 1000),
            "LastModifiedTime": int(ended.timestamp() * 1000),
            "Tags": dict(request.tags),
        }
        if job.status == "Completed":
            detail["ModelArtifacts"] = {"S3ModelArtifacts": request.artifact_uri}
        if job.failure_reason:
            detail["FailureReason"] = job.failure_reason
        return detail


# ---------------------------------------------------------------------- choice


def backend_for(name: str, clients: Any, settings: Settings) -> TrainingBackend:
    """The backend a model's `training.backend` names, built from the shared clients."""
    if name == "sagemaker":
        return SageMakerBackend(clients.sagemaker, settings)
    if name == "batch":
        return BatchBackend(clients.batch, settings)
    if name == "local":
        return LocalBackend(clients.s3, clients.events, event_bus=settings.event_bus,
                            region=settings.region)
    raise BackendConfigError(f"unknown training backend {name!r} (sagemaker, batch, local)")
