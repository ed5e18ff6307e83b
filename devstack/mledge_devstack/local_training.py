"""The `local` training backend: the trainer in a subprocess on this machine.

A development tool of the local stack and the tests, so it lives here rather than in the
Lambda package: `register_local_backend()` adds it to chalicelib's backend registry in
the process that runs the handlers (the dispatcher). It lays out SageMaker's directory
contract with `trainer_batch.channels`, runs `python -m trainer.entrypoint`, uploads
`model.tar.gz` where SageMaker would and emits a SageMaker-shaped state-change event
with source `mledge.local-training`.
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
from typing import Any

from mledge_update.events import LOCAL_TRAINING_SOURCE, SAGEMAKER_DETAIL_TYPE
from trainer_batch import channels

from chalicelib.backends import BackendError, TrainingBackend, TrainingRequest, register_backend
from chalicelib.settings import Settings

_REPO = Path(__file__).resolve().parents[2]


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


def local_backend(clients: Any, settings: Settings) -> TrainingBackend:
    """The registry's factory: a `LocalBackend` on the shared clients."""
    return LocalBackend(clients.s3, clients.events, event_bus=settings.event_bus, region=settings.region)


def register_local_backend() -> None:
    """Make `training.backend = "local"` usable in this process."""
    register_backend("local", local_backend)
