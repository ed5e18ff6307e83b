"""AWS IoT Jobs for releases: one job per release, targeting the model's thing group.

The job id is deterministic per release attempt (`mledge-<model>-v<version>` for an
approval, plus `-rollback-<attempt>` for a rollback or `-retry-<attempt>` for an
operator's release retry), so a repeated `ModelApproved` event finds the job it
already created instead of creating a second one, while every new action gets a job
of its own: IoT Jobs never runs a cancelled job again, so reusing the id of one would
reach no device. Rollout (exponential
rate), abort (failure percentage after a minimum of executed things), timeout and
retries come from the model's config, within IoT Jobs' limits (rollout base 1-1,000 per
minute and increment factor 1.1-5, in-progress timeout 1 minute to 7 days, 0-10 retries
per failure type; abort cancels only QUEUED executions).
"""

from __future__ import annotations

import json
from typing import Any

from botocore.exceptions import ClientError
from mledge_update.naming import job_tags

from chalicelib.aws import error_code
from chalicelib.config import ModelConfig

PRESIGNED_URL_EXPIRY_SECONDS = 3600
# Network trouble is worth retrying; REJECTED means the device cannot take this
# release at all, so it is never retried.
RETRIES = [
    {"failureType": "FAILED", "numberOfRetries": 2},
    {"failureType": "TIMED_OUT", "numberOfRetries": 1},
]


class OtaError(Exception):
    """The IoT Job for a release could not be created."""


def job_request(*, job_id: str, document: dict[str, Any], model_config: ModelConfig,
                target_arn: str, presign_role_arn: str, stage: str,
                version: int) -> dict[str, Any]:
    """The `CreateJob` request for one release (a pure function: easy to test and read)."""
    rollout, abort = model_config.rollout, model_config.abort
    return {
        "jobId": job_id,
        "targets": [target_arn],
        "document": json.dumps(document, separators=(",", ":")),
        "description": f"MLEdgeDeploy {model_config.name} v{version}"
                       + (" (rollback)" if document.get("rollback") else ""),
        # CONTINUOUS: a device added to the group later still gets the release.
        "targetSelection": "CONTINUOUS",
        "presignedUrlConfig": {"roleArn": presign_role_arn,
                               "expiresInSec": PRESIGNED_URL_EXPIRY_SECONDS},
        "jobExecutionsRolloutConfig": {
            "maximumPerMinute": rollout.maximum_per_minute,
            "exponentialRate": {
                "baseRatePerMinute": rollout.base_rate_per_minute,
                "incrementFactor": rollout.increment_factor,
                "rateIncreaseCriteria": {
                    "numberOfSucceededThings": rollout.rate_increase_after_succeeded,
                },
            },
        },
        "abortConfig": {"criteriaList": [{
            "failureType": abort.failure_type,
            "action": "CANCEL",
            "thresholdPercentage": abort.failure_percent,
            "minNumberOfExecutedThings": abort.min_executed_things,
        }]},
        "timeoutConfig": {"inProgressTimeoutInMinutes": model_config.timeout.in_progress_minutes},
        "jobExecutionsRetryConfig": {"criteriaList": RETRIES},
        "tags": [{"Key": key, "Value": value}
                 for key, value in job_tags(model_config.name, version, stage).items()],
    }


def ensure_thing_group(iot: Any, group: str, *, model: str, stage: str) -> str:
    """The ARN of the model's thing group, created on first use.

    Thing groups are per model and live in code, not in infra/: a model added to
    pipeline.toml gets its group from its first release (or from `mledge
    provision-device`), so adding a model never edits a template.
    """
    try:
        return str(iot.describe_thing_group(thingGroupName=group)["thingGroupArn"])
    except ClientError as exc:
        if error_code(exc) != "ResourceNotFoundException":
            raise
    try:
        created = iot.create_thing_group(
            thingGroupName=group,
            thingGroupProperties={
                "thingGroupDescription": f"Devices running model {model}",
                "attributePayload": {"attributes": {"model": model, "stage": stage}},
            },
            tags=[{"Key": "mledge:stage", "Value": stage}, {"Key": "mledge:model", "Value": model}],
        )
    except ClientError as exc:
        if error_code(exc) != "ResourceAlreadyExistsException":  # made meanwhile: fine
            raise OtaError(f"CreateThingGroup {group} failed: {error_code(exc) or exc}") from None
        return str(iot.describe_thing_group(thingGroupName=group)["thingGroupArn"])
    return str(created["thingGroupArn"])


def ensure_update_job(iot: Any, *, job_id: str, document: dict[str, Any],
                      model_config: ModelConfig, presign_role_arn: str, stage: str,
                      version: int, thing_group: str | None = None) -> bool:
    """Create the release's job unless it exists; True when created now.

    An existing job that was cancelled is an error, not a success: no device would get it.
    """
    try:
        status = iot.describe_job(jobId=job_id)["job"].get("status")
        if status in ("CANCELED", "DELETION_IN_PROGRESS"):
            raise OtaError(f"job {job_id} exists but is {status}: no device would get it "
                           "(release it again with `mledge release`, a new attempt)")
        return False
    except ClientError as exc:
        if error_code(exc) != "ResourceNotFoundException":
            raise
    if not presign_role_arn:
        raise OtaError("MLEDGE_IOT_PRESIGN_ROLE_ARN is not set: IoT Jobs needs a role to "
                       "presign the download URLs")
    request = job_request(
        job_id=job_id, document=document, model_config=model_config,
        target_arn=ensure_thing_group(iot, thing_group or model_config.thing_group,
                                      model=model_config.name, stage=stage),
        presign_role_arn=presign_role_arn, stage=stage, version=version,
    )
    try:
        iot.create_job(**request)
    except ClientError as exc:
        code = error_code(exc)
        if code == "ResourceAlreadyExistsException":
            return False
        raise OtaError(f"CreateJob {job_id} failed: {code or exc}") from None
    return True


def cancel_queued(iot: Any, job_id: str, comment: str) -> bool:
    """Cancel a replaced release's job: its QUEUED executions stop (force=False leaves
    executions already IN_PROGRESS to finish, as IoT Jobs does). False if it was done."""
    try:
        iot.cancel_job(jobId=job_id, reasonCode="SUPERSEDED", comment=comment[:2028],
                       force=False)
        return True
    except ClientError as exc:
        code = error_code(exc)
        if code in ("ResourceNotFoundException", "InvalidStateTransitionException",
                    "InvalidRequestException"):
            return False
        raise


def cancel_job(iot: Any, job_id: str, comment: str) -> bool:
    """Cancel a job this packaging created but must not release, in-progress executions
    included (nothing was released, so no device may start it). False if it was done."""
    try:
        iot.cancel_job(jobId=job_id, reasonCode="NOT_RELEASED", comment=comment[:2028],
                       force=True)
        return True
    except ClientError as exc:
        if error_code(exc) in ("ResourceNotFoundException", "InvalidStateTransitionException",
                               "InvalidRequestException"):
            return False
        raise
