"""Training backends: one interface, three ways to run the training image.

`TrainingBackend.start(request) -> job name` starts a job and returns at once;
completion arrives later as an EventBridge event that the completion handler
(chalicelib's gate) takes:

- `SageMakerBackend`: `CreateTrainingJob`; SageMaker emits
  "SageMaker Training Job State Change" (source `aws.sagemaker`).
- `BatchBackend`: `SubmitJob` to a (GPU) job queue; the container runs
  `python -m trainer_batch.launcher`, which lays out SageMaker's directory
  contract itself; Batch emits "Batch Job State Change" (source `aws.batch`).
- `local`: the trainer in a subprocess on this machine, a development tool that
  lives in the local stack (`mledge_devstack.local_training`) and is registered here
  with `register_backend`; it emits a SageMaker-shaped event with source
  `mledge.local-training`. The Lambda package never imports the training image.

All three train on the same inputs (the `train.manifest` snapshot and the
champion's ONNX) and leave `model.tar.gz` at the same key:
`s3://<bucket>/models/<model>/<job>/output/model.tar.gz`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from mledge_update.naming import job_tags

from chalicelib import layout
from chalicelib.artifacts import s3_uri
from chalicelib.config import ModelConfig, TrainingConfig
from chalicelib.settings import Settings


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
        return s3_uri(self.bucket, self.manifest_key)

    @property
    def champion_uri(self) -> str | None:
        return s3_uri(self.bucket, self.champion_key) if self.champion_key else None

    @property
    def output_path(self) -> str:
        """SageMaker's S3OutputPath; the job writes under <path><job>/output/."""
        return s3_uri(self.bucket, layout.training_output_prefix(self.model))

    @property
    def job_output_uri(self) -> str:
        return s3_uri(self.bucket, layout.training_job_output_prefix(self.model, self.job_name))

    @property
    def artifact_uri(self) -> str:
        return s3_uri(self.bucket, layout.training_artifact_key(self.model, self.job_name))

    @property
    def tags(self) -> dict[str, str]:
        return job_tags(self.model, self.version, self.stage)


class TrainingBackend(Protocol):
    name: str

    def start(self, request: TrainingRequest) -> str:
        """Start the job; returns its name. Raises BackendError when it did not start."""
        ...


def training_hyperparameters(model: ModelConfig, version: int) -> dict[str, str]:
    """The training container's hyperparameters (all strings; the shared ones + the model's)."""
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


# ---------------------------------------------------------------------- choice


BackendFactory = Callable[[Any, Settings], TrainingBackend]
"""Builds a backend from the shared clients and the stage settings."""

_FACTORIES: dict[str, BackendFactory] = {
    "sagemaker": lambda clients, settings: SageMakerBackend(clients.sagemaker, settings),
    "batch": lambda clients, settings: BatchBackend(clients.batch, settings),
}


def register_backend(name: str, factory: BackendFactory) -> None:
    """Make `training.backend = name` usable in this process (the local stack registers
    `local`; the deployed Lambda has only SageMaker and Batch)."""
    _FACTORIES[name] = factory


def backend_for(name: str, clients: Any, settings: Settings) -> TrainingBackend:
    """The backend a model's `training.backend` names, built from the shared clients."""
    factory = _FACTORIES.get(name)
    if factory is None:
        if name == "local":
            raise BackendConfigError(
                "training backend 'local' is a development tool: only the local stack "
                "provides it (mledge_devstack.local_training.register_local_backend)")
        raise BackendConfigError(
            f"unknown training backend {name!r} ({', '.join(sorted(_FACTORIES))})")
    return factory(clients, settings)
