"""docs/configuration.md documents every field chalicelib/config.py accepts, and its example loads."""

from __future__ import annotations

import dataclasses
import re
import tomllib

from chalicelib.config import (
    AbortConfig,
    CanaryConfig,
    DatasetConfig,
    FeatureSchema,
    ModelConfig,
    PackagingConfig,
    RolloutConfig,
    TimeoutConfig,
    TrainingConfig,
    UplinkPolicy,
    parse_pipeline_config,
)
from tests.conftest import REPO

DOC = (REPO / "docs" / "configuration.md").read_text()
NOT_TOML_FIELDS = {"name"}  # the table's key, not a field inside it
SUB_TABLES = {"schema", "training", "hyperparameters", "rollout", "abort", "timeout", "uplink", "packaging",
              "dataset", "canary"}


def test_every_config_field_is_documented() -> None:
    for cls in (ModelConfig, FeatureSchema, TrainingConfig, RolloutConfig, AbortConfig,
                TimeoutConfig, UplinkPolicy, PackagingConfig, DatasetConfig, CanaryConfig):
        for f in dataclasses.fields(cls):
            if f.name in NOT_TOML_FIELDS:
                continue
            if cls is ModelConfig and f.name in SUB_TABLES:
                assert f"`[models.<name>.{f.name}]`" in DOC, f"no section for {f.name}"
                continue
            assert f"`{f.name}`" in DOC, f"docs/configuration.md lacks {cls.__name__}.{f.name}"


def test_add_a_model_example_is_valid() -> None:
    example = re.search(r"```toml\n(.*?)```", DOC, re.S)
    assert example is not None
    text = "\n".join(line[3:] if line.startswith("   ") else line
                     for line in example.group(1).splitlines())
    config = parse_pipeline_config(tomllib.loads(text))
    assert config.model("bearing-temp").schema.feature_count == 4
