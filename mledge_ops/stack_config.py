"""`mledge stack-config`: copy CloudFormation stack outputs into a Chalice stage's variables.

The infra stacks (infra/pipeline.yaml, infra/training.yaml) name every resource;
this command writes those names into `stages.<stage>.environment_variables` of
`.chalice/config.json` so `chalice deploy --stage <stage>` wires the Lambdas to
them. Everything else in the file is left as it was.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chalicelib.aws import error_code
from mledge_ops.common import (
    STAGES,
    OpsError,
    aws_options,
    clients_from_args,
    pipeline_stack_name,
    training_stack_name,
)

# Environment variable (chalicelib/settings.py) -> stack output key.
OUTPUT_FOR_VARIABLE: dict[str, str] = {
    "MLEDGE_BUCKET": "BucketName",
    "MLEDGE_REGISTRY_TABLE": "RegistryTableName",
    "MLEDGE_STATE_TABLE": "StateTableName",
    "MLEDGE_TELEMETRY_QUEUE": "TelemetryQueueName",
    "MLEDGE_RAW_EVENTS_QUEUE": "RawEventsQueueName",
    "MLEDGE_IOT_PRESIGN_ROLE_ARN": "IotPresignRoleArn",
    "MLEDGE_SIGNING_KEY_ID": "ReleaseSigningKeyAlias",
    "MLEDGE_TRAINING_ROLE_ARN": "TrainingRoleArn",
    "MLEDGE_TRAINING_IMAGE_URI": "TrainingImageUri",
    "MLEDGE_BATCH_JOB_QUEUE": "BatchJobQueueName",
    "MLEDGE_BATCH_JOB_DEFINITION": "BatchJobDefinitionName",
    "MLEDGE_ATHENA_DATABASE": "AthenaDatabaseName",
    "MLEDGE_ATHENA_WORKGROUP": "AthenaWorkGroupName",
}
_COMPLETE = {"CREATE_COMPLETE", "UPDATE_COMPLETE", "UPDATE_ROLLBACK_COMPLETE", "IMPORT_COMPLETE"}


class StackConfigError(Exception):
    """The stack outputs cannot be copied (missing stack, outputs, stage or file)."""


@dataclass(frozen=True)
class Change:
    variable: str
    old: str | None
    new: str


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "stack-config",
        parents=[aws_options()],
        help="copy the infra stacks' outputs into .chalice/config.json for a stage",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--stage", choices=STAGES,
                        help="required here (before or after the command)")
    parser.add_argument(
        "--stack",
        action="append",
        dest="stacks",
        metavar="NAME",
        help="stack to read (repeatable; default: mledge-<stage>-pipeline and mledge-<stage>-training)",
    )
    parser.add_argument(
        "--chalice-config",
        type=Path,
        default=None,
        help="the Chalice config to update (default: the project's .chalice/config.json)",
    )
    parser.add_argument(
        "--partial",
        action="store_true",
        help="write what the stacks provide even if some variables have no output",
    )
    parser.add_argument("--dry-run", action="store_true", help="show the changes, write nothing")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.stage_given:
        raise OpsError("name the stage to write: --stage dev or --stage prod")
    if args.stage not in STAGES:
        raise OpsError(f"--stage must be one of {', '.join(STAGES)}")
    stacks = args.stacks or [pipeline_stack_name(args.stage), training_stack_name(args.stage)]
    cfn = clients_from_args(args).client("cloudformation")
    try:
        outputs = read_stack_outputs(cfn, stacks, stage=args.stage)
        values = variables_from_outputs(outputs, partial=args.partial, stacks=stacks)
        changes = update_chalice_config(
            args.chalice_config, args.stage, values, write=not args.dry_run
        )
    except StackConfigError as exc:
        raise OpsError(str(exc)) from None
    verb = "would set" if args.dry_run else "set"
    for change in changes:
        before = "(unset)" if change.old is None else change.old
        print(f"{verb} {change.variable}: {before} -> {change.new}")
    unchanged = len({"MLEDGE_STAGE", *values}) - len(changes)
    print(f"{args.chalice_config}: stage {args.stage}: {len(changes)} changed, {unchanged} unchanged")
    return 0


def read_stack_outputs(cfn: Any, stacks: Iterable[str], *, stage: str) -> dict[str, str]:
    """All outputs of the stacks, merged; each stack must be complete and of `stage`."""
    merged: dict[str, str] = {}
    for name in stacks:
        try:
            described = cfn.describe_stacks(StackName=name)["Stacks"][0]
        except Exception as exc:
            if error_code(exc) == "ValidationError":
                raise StackConfigError(
                    f"stack {name!r} not found in {cfn.meta.region_name}: deploy it first "
                    "(docs/deploy.md) or pass --stack"
                ) from None
            raise
        status = described.get("StackStatus", "")
        if status not in _COMPLETE:
            raise StackConfigError(f"stack {name!r} is {status}, not complete; wait or fix it first")
        outputs = {o["OutputKey"]: o["OutputValue"] for o in described.get("Outputs", [])}
        stack_stage = outputs.get("Stage") or _parameter(described, "Stage")
        if stack_stage is not None and stack_stage != stage:
            raise StackConfigError(
                f"stack {name!r} belongs to stage {stack_stage!r}, not {stage!r}"
            )
        merged.update(outputs)
    return merged


def _parameter(described: Mapping[str, Any], key: str) -> str | None:
    for parameter in described.get("Parameters", []):
        if parameter.get("ParameterKey") == key:
            return str(parameter.get("ParameterValue"))
    return None


def variables_from_outputs(
    outputs: Mapping[str, str], *, partial: bool = False, stacks: Iterable[str] = ()
) -> dict[str, str]:
    values = {var: outputs[key] for var, key in OUTPUT_FOR_VARIABLE.items() if outputs.get(key)}
    missing = [f"{var} (output {key})" for var, key in OUTPUT_FOR_VARIABLE.items()
               if var not in values]
    if missing and not partial:
        raise StackConfigError(
            f"stacks {', '.join(stacks)} lack outputs for: {', '.join(missing)} "
            "(deploy both infra templates, name their stacks with --stack, or pass --partial)"
        )
    return values


def update_chalice_config(
    path: Path, stage: str, values: Mapping[str, str], *, write: bool = True
) -> list[Change]:
    """Set the variables in the stage's environment_variables; returns what changed."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StackConfigError(f"{path}: not found (run from the repository root)") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StackConfigError(f"{path}: not valid JSON: {exc}") from None
    stages = config.get("stages")
    if not isinstance(stages, dict) or stage not in stages:
        known = ", ".join(sorted(stages)) if isinstance(stages, dict) else "none"
        raise StackConfigError(f"{path}: has no stage {stage!r} (stages: {known}); add it first")
    variables = stages[stage].setdefault("environment_variables", {})
    wanted = {"MLEDGE_STAGE": stage, **values}
    changes = [
        Change(var, variables.get(var), new)
        for var, new in wanted.items()
        if variables.get(var) != new
    ]
    if changes and write:
        variables.update(wanted)
        _write_atomically(path, json.dumps(config, indent=2) + "\n")
    return changes


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, path.stat().st_mode & 0o7777)  # mkstemp makes 0600; keep the file's mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
