"""Stage settings: resource names and endpoints, read from the environment.

`.chalice/config.json` sets these per stage; the local stack and tests set them
directly. Nothing else in chalicelib reads the environment.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mledge_update.events import PIPELINE_SOURCE

DEFAULT_PIPELINE_CONFIG = Path(__file__).with_name("pipeline.toml")


class SettingsError(Exception):
    """A required stage setting is missing."""


@dataclass(frozen=True)
class Settings:
    stage: str
    bucket: str
    registry_table: str
    state_table: str
    telemetry_queue: str
    raw_events_queue: str
    event_source: str = PIPELINE_SOURCE
    event_bus: str = "default"
    training_role_arn: str = ""
    training_image_uri: str = ""
    batch_job_queue: str = ""
    batch_job_definition: str = ""
    iot_presign_role_arn: str = ""
    signing_key_id: str = ""  # KMS key (alias or ARN) that signs releases
    pipeline_config: Path = DEFAULT_PIPELINE_CONFIG
    region: str = "us-east-1"
    endpoint_url: str | None = None
    code_version: str = "dev"
    athena_database: str = "mledge_dev_data"
    """Glue database of the compacted table (infra/pipeline.yaml); DuckDB mirrors the name."""
    athena_workgroup: str = "mledge-dev-datasets"
    """Athena workgroup (its result location holds query results and UNLOAD manifests)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env

        def required(name: str) -> str:
            value = env.get(name, "").strip()
            if not value:
                raise SettingsError(
                    f"environment variable {name} is not set (set it in .chalice/config.json "
                    "for the stage, or in the local stack)"
                )
            return value

        return cls(
            stage=env.get("MLEDGE_STAGE", "dev"),
            bucket=required("MLEDGE_BUCKET"),
            registry_table=required("MLEDGE_REGISTRY_TABLE"),
            state_table=required("MLEDGE_STATE_TABLE"),
            telemetry_queue=env.get("MLEDGE_TELEMETRY_QUEUE", ""),
            raw_events_queue=env.get("MLEDGE_RAW_EVENTS_QUEUE", ""),
            event_source=env.get("MLEDGE_EVENT_SOURCE", PIPELINE_SOURCE),
            event_bus=env.get("MLEDGE_EVENT_BUS", "default"),
            training_role_arn=env.get("MLEDGE_TRAINING_ROLE_ARN", ""),
            training_image_uri=env.get("MLEDGE_TRAINING_IMAGE_URI", ""),
            batch_job_queue=env.get("MLEDGE_BATCH_JOB_QUEUE", ""),
            batch_job_definition=env.get("MLEDGE_BATCH_JOB_DEFINITION", ""),
            iot_presign_role_arn=env.get("MLEDGE_IOT_PRESIGN_ROLE_ARN", ""),
            signing_key_id=env.get("MLEDGE_SIGNING_KEY_ID", ""),
            pipeline_config=Path(env.get("MLEDGE_PIPELINE_CONFIG") or DEFAULT_PIPELINE_CONFIG),
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
            endpoint_url=env.get("AWS_ENDPOINT_URL") or None,
            code_version=env.get("MLEDGE_CODE_VERSION", "dev"),
            athena_database=env.get("MLEDGE_ATHENA_DATABASE")
            or f"mledge_{env.get('MLEDGE_STAGE', 'dev')}_data".replace("-", "_"),
            athena_workgroup=env.get("MLEDGE_ATHENA_WORKGROUP")
            or f"mledge-{env.get('MLEDGE_STAGE', 'dev')}-datasets",
        )


def chalice_stage_environment(chalice_config: Path, stage: str) -> dict[str, str]:
    """A stage's environment variables from `.chalice/config.json` (global, then stage),
    as `chalice deploy --stage` gives them to every function."""
    try:
        config = json.loads(Path(chalice_config).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SettingsError(f"{chalice_config} not found (run from the project directory or "
                            "pass --chalice-config)") from None
    except ValueError as exc:
        raise SettingsError(f"{chalice_config} is not valid JSON: {exc}") from None
    stages = config.get("stages", {})
    if stage not in stages:
        raise SettingsError(f"{chalice_config}: no stage {stage!r} "
                            f"(stages: {', '.join(sorted(stages)) or 'none'})")
    env = dict(config.get("environment_variables", {}))
    env.update(stages[stage].get("environment_variables", {}))
    return {k: str(v) for k, v in env.items()}
