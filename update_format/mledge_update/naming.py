"""Names and tags of training jobs and IoT Jobs, made by the cloud and read back from events.

A training job is `mledge-<model>-v<version>-<suffix>` (SageMaker's limit: 63 of
[a-zA-Z0-9-]) and tagged with the full model name, version and stage; the release
IoT Job of a version is `mledge-<model>-v<NNNNN>` (plus an attempt suffix for an
operator's rollback or release retry).
"""

from __future__ import annotations

import re
import secrets
from typing import Any

JOB_PREFIX = "mledge-"
TAG_MODEL = "mledge:model"
TAG_VERSION = "mledge:version"
TAG_STAGE = "mledge:stage"
JOB_NAME_LIMIT = 63  # SageMaker: [a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}
IOT_JOB_ID_LIMIT = 64
_JOB_NAME = re.compile(
    r"^mledge-(?P<model>[a-z0-9][a-z0-9-]*)-v(?P<version>\d+)-(?P<suffix>[a-z0-9]+)$")
MODEL_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
"""Model names (fullmatch: `$` would also match before a trailing newline): a segment of
MQTT topics, S3 keys and job names, and the job document's `model`."""
_ANY_JOB_NAME = re.compile(r"mledge-(?P<rest>.+)", re.DOTALL)
# ASCII digits only (`\d` also matches other scripts' digits), at most 18: a DynamoDB key.
_VERSION_PART = re.compile(r"-v(?P<version>[0-9]{1,18})-")
_VERSION_TAG = re.compile(r"[0-9]{1,18}")


def make_job_name(model: str, version: int, suffix: str | None = None) -> str:
    """`mledge-<model>-v<version>-<suffix>`, at most 63 characters of [a-z0-9-].

    The suffix keeps names unique when a version is retried. A very long model
    name is shortened to fit; the job's tags always carry the full name.
    """
    suffix = suffix or secrets.token_hex(3)
    tail = f"-v{version}-{suffix}"
    room = JOB_NAME_LIMIT - len(JOB_PREFIX) - len(tail)
    short_model = model[:room].rstrip("-")
    return f"{JOB_PREFIX}{short_model}{tail}"


def parse_job_name(job_name: str) -> tuple[str, int] | None:
    """(model, version) from a job name made by make_job_name (None if it is not one)."""
    match = _JOB_NAME.match(job_name)
    if not match:
        return None
    return match["model"], int(match["version"])


def job_tags(model: str, version: int, stage: str) -> dict[str, str]:
    return {TAG_MODEL: model, TAG_VERSION: str(version), TAG_STAGE: stage}


def iot_job_id(model: str, version: int, *, rollback: bool = False,
               attempt: str | None = None, canary: bool = False) -> str:
    """The IoT Job that releases a version: `mledge-<model>-v<NNNNN>`, plus
    `-rollback-<attempt>` for a rollback or `-retry-<attempt>` for a release retry, plus
    `-canary` for the job of its canary group.

    Each operator action (and each automatic rollback) carries its own attempt id, so it
    gets a job of its own: IoT Jobs never runs a cancelled job again, and rolling back and
    forth between two versions must not reuse one. The version, attempt and canary
    suffix survive truncation of a long model name.
    """
    suffix = f"-v{version:05d}"
    if rollback or attempt:
        suffix += f"-{'rollback' if rollback else 'retry'}-{attempt or 'x'}"
    if canary:
        suffix += "-canary"
    return f"{JOB_PREFIX}{model}"[: IOT_JOB_ID_LIMIT - len(suffix)] + suffix


def identify_job(job_name: str, tags: Any, known_models: set[str]) -> tuple[str, int] | None:
    """(model, version) of a job: its `mledge:model`/`mledge:version` tags, else its name.

    Names are ``mledge-<model>-v<version>-<suffix>``; model names may contain
    ``-v<digits>-`` themselves, so each split point is tried and a configured model
    wins. Events come from outside: a model that is not a model name, a version that
    is not 1-18 ASCII digits (>= 1), or a name or tags of the wrong type identify nothing.
    """
    tag_map = _tag_map(tags)
    tag_model, tag_version = tag_map.get(TAG_MODEL, ""), tag_map.get(TAG_VERSION, "")
    if MODEL_NAME.fullmatch(tag_model) and _VERSION_TAG.fullmatch(tag_version) \
            and int(tag_version) >= 1:
        return tag_model, int(tag_version)
    match = _ANY_JOB_NAME.fullmatch(job_name) if isinstance(job_name, str) else None
    if not match:
        return None
    rest = match.group("rest")
    candidates: list[tuple[str, int]] = []
    for i in range(1, len(rest)):
        m = _VERSION_PART.match(rest, i)
        if m and MODEL_NAME.fullmatch(rest[:i]) and int(m.group("version")) >= 1:
            candidates.append((rest[:i], int(m.group("version"))))
    for model, version in candidates:
        if model in known_models:
            return model, version
    return candidates[0] if candidates else None


def _tag_map(tags: Any) -> dict[str, str]:
    """Tags as a dict (SageMaker: a list of Key/Value; Batch: a map); non-strings dropped."""
    if isinstance(tags, dict):
        pairs = list(tags.items())
    elif isinstance(tags, list):
        pairs = [(t.get("Key") or t.get("key"), t.get("Value") or t.get("value"))
                 for t in tags if isinstance(t, dict)]
    else:
        return {}
    return {k: v for k, v in pairs if isinstance(k, str) and isinstance(v, str)}


# ------------------------------------------------- a provisioned device's files
# Written by `mledge provision-device` (mledge_ops) and by the local stack's
# `provision` (mledge_devstack), which share no code: the contract lives here.
AGENT_CONFIG_FILE = "agent.json"
# The agent's simulated sensors (mledge_edge.config.AgentConfig.sensor) by model.
SIMULATED_SENSOR = {"vibration-anomaly": "vibration", "digits": "digits"}
