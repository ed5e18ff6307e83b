"""AWS Batch entry: `python -m trainer_batch.launcher` (the job's command).

Batch has no channels, so this does what SageMaker does around the trainer:
download the `train` ManifestFile's objects and the champion into the base dir,
write hyperparameters.json, run `python -m trainer.entrypoint --base-dir DIR`,
then upload `model.tar.gz` to `<MLEDGE_OUTPUT_URI>model.tar.gz` — the same key
SageMaker uses (`s3://bucket/models/<model>/<job>/output/model.tar.gz`). On
failure it uploads the reason to `<MLEDGE_OUTPUT_URI>failure` (Batch's own
statusReason only says the container exited) and exits non-zero.

Environment (set by chalicelib.backends.BatchBackend through containerOverrides):
MLEDGE_JOB_NAME, MLEDGE_HYPERPARAMETERS (JSON object of strings),
MLEDGE_TRAIN_MANIFEST (s3:// URI), MLEDGE_CHAMPION_URI (s3:// URI or empty),
MLEDGE_OUTPUT_URI (s3:// prefix ending in '/'), MLEDGE_MAX_RUNTIME_SECONDS,
MLEDGE_TRAINING_BASE_DIR (default /opt/ml).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trainer_batch.channels import (
    ChannelError,
    package_model,
    prepare_base_dir,
    run_trainer,
    upload_file,
)


class LauncherError(Exception):
    """The job's environment is missing or malformed."""


def _required(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "").strip()
    if not value:
        raise LauncherError(f"environment variable {name} is not set")
    return value


def run(env: Mapping[str, str], s3: Any, *, python: str = sys.executable,
        module: str = "trainer.entrypoint") -> int:
    """Run one Batch training attempt; returns the process exit code."""
    output_uri = _required(env, "MLEDGE_OUTPUT_URI")
    if not output_uri.endswith("/"):
        output_uri += "/"
    base_dir = Path(env.get("MLEDGE_TRAINING_BASE_DIR") or "/opt/ml")
    try:
        hyperparameters = json.loads(_required(env, "MLEDGE_HYPERPARAMETERS"))
        if not isinstance(hyperparameters, dict):
            raise LauncherError("MLEDGE_HYPERPARAMETERS must be a JSON object")
        prepare_base_dir(
            s3, base_dir,
            manifest_uri=_required(env, "MLEDGE_TRAIN_MANIFEST"),
            champion_uri=env.get("MLEDGE_CHAMPION_URI") or None,
            hyperparameters=hyperparameters,
        )
        timeout = float(env.get("MLEDGE_MAX_RUNTIME_SECONDS") or 0) or None
        result = run_trainer(base_dir, python=python, module=module, env=dict(env),
                             timeout=timeout)
    except (LauncherError, ChannelError, json.JSONDecodeError, OSError) as exc:
        return _fail(s3, base_dir, output_uri, f"launcher: {exc}")
    if not result.succeeded:
        return _fail(s3, base_dir, output_uri, result.failure or "training failed")
    upload_file(s3, package_model(base_dir), output_uri + "model.tar.gz")
    return 0


def _fail(s3: Any, base_dir: Path, output_uri: str, reason: str) -> int:
    path = base_dir / "output" / "failure"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(reason, encoding="utf-8")
    try:
        upload_file(s3, path, output_uri + "failure")
    except Exception as exc:  # the exit code still reports the failure
        print(f"could not upload the failure reason: {exc}", file=sys.stderr)
    print(reason, file=sys.stderr)
    return 1


def main() -> int:
    import boto3

    return run(os.environ, boto3.client("s3"))


if __name__ == "__main__":
    sys.exit(main())
