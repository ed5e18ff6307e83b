"""The pipeline config: one declarative TOML file, validated on load.

Every error names the file, the model and the field, e.g.
``pipeline.toml: models.digits.threshold: must be a number, got 'high'``.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mledge_update.families import FAMILIES, FAMILY_METRICS, GPU_FAMILIES
from mledge_update.naming import MODEL_NAME
from mledge_update.uplink import BEFORE_MODEL_CHOICES, UplinkPolicy

# SageMaker instance families with NVIDIA GPUs: ml.g4dn, ml.g5, ml.g6, ml.p3, ml.p4d, ml.p5 ...
SAGEMAKER_GPU_PREFIXES = ("ml.g", "ml.p")
BACKENDS = ("sagemaker", "batch", "local")
LABEL_MODES = ("none", "optional", "required")
DATASET_ENGINES = ("auto", "duckdb", "athena")
DATASET_STRATA = ("day", "thing", "reason", "label")
# Used with fullmatch (`$` would also match before a trailing newline).
FEATURE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


class ConfigError(Exception):
    """The pipeline config is invalid; the message names file, model and field."""


@dataclass(frozen=True)
class FeatureSchema:
    features: tuple[str, ...]
    label: str = "none"
    label_values: tuple[int, ...] | None = None
    min_value: float = -math.inf
    max_value: float = math.inf

    @property
    def feature_count(self) -> int:
        return len(self.features)

    def to_document(self) -> dict[str, Any]:
        """The schema as the job document carries it to devices."""
        doc: dict[str, Any] = {"features": list(self.features), "label": self.label}
        if self.label_values is not None:
            doc["label_values"] = list(self.label_values)
        if math.isfinite(self.min_value):
            doc["min_value"] = self.min_value
        if math.isfinite(self.max_value):
            doc["max_value"] = self.max_value
        return doc


@dataclass(frozen=True)
class TrainingConfig:
    backend: str = "sagemaker"
    instance_type: str = "ml.m5.large"
    instance_count: int = 1
    gpu_count: int = 0
    volume_size_gb: int = 30
    max_runtime_seconds: int = 3600
    schedule: str | None = None


@dataclass(frozen=True)
class RolloutConfig:
    base_rate_per_minute: int = 20
    increment_factor: float = 2.0
    rate_increase_after_succeeded: int = 10
    maximum_per_minute: int = 1000


ABORT_FAILURE_TYPES = ("ALL", "FAILED", "REJECTED", "TIMED_OUT")


@dataclass(frozen=True)
class AbortConfig:
    failure_percent: float = 10.0
    min_executed_things: int = 10
    # ALL: a model that fails on the device (REJECTED: smoke rows, load) aborts too.
    failure_type: str = "ALL"


@dataclass(frozen=True)
class CanaryConfig:
    """Health-gated rollout: a release goes to `thing_group` first; the rest of the fleet
    gets it only when the canary devices report it healthy (chalicelib/canary.py)."""

    thing_group: str = ""  # empty: no canary, a release goes to the whole fleet at once
    health_readings: int = 50  # readings each canary device runs through the new model
    min_reports: int = 3  # healthy canary devices needed before the fleet gets it
    max_failure_percent: float = 20.0  # canary executions FAILED/REJECTED/TIMED_OUT
    max_error_rate: float = 0.01  # inference failures per reading
    max_anomaly_rate: float = 0.2  # readings flagged (expected: about 1 - anomaly_quantile)
    max_latency_ms: float = 50.0  # p95 inference latency on the device
    max_wait_minutes: int = 30  # no verdict by then: treated as unhealthy

    @property
    def enabled(self) -> bool:
        return bool(self.thing_group)


@dataclass(frozen=True)
class TimeoutConfig:
    in_progress_minutes: int = 30


@dataclass(frozen=True)
class PackagingConfig:
    """Limits on building a release's deltas (chalicelib/delta_budget.py)."""

    time_budget_seconds: float = 60.0
    memory_budget_mb: float = 1536.0
    slow_codec_max_mb: float = 8.0


@dataclass(frozen=True)
class DatasetConfig:
    """What a version trains on, built by SQL over the compacted Parquet (chalicelib/datasets.py).

    The last `window_days` days; labelled records always (when `include_labelled`);
    the rest a sample stratified by `stratify_by`, each stratum's share of the budget
    proportional to its weight (`weights`: "column=value" -> factor, default 1);
    never more than `max_records` in all. DuckDB builds it in-process up to
    `athena_above_records` records in the window; Athena above (engine "auto").
    """

    window_days: int = 365
    max_records: int = 2_000_000
    stratify_by: tuple[str, ...] = ("day",)
    weights: dict[str, float] = field(default_factory=dict)
    include_labelled: bool = True
    engine: str = "auto"
    athena_above_records: int = 5_000_000


@dataclass(frozen=True)
class ModelConfig:
    name: str
    family: str
    metric: str
    threshold: float
    schema: FeatureSchema
    thing_group: str
    description: str = ""
    min_improvement: float = 0.0
    detection_tolerance: float = 0.05
    min_train_records: int = 0
    min_new_records: int = 1000
    delta_history: int = 3
    training: TrainingConfig = field(default_factory=TrainingConfig)
    hyperparameters: dict[str, str] = field(default_factory=dict)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    abort: AbortConfig = field(default_factory=AbortConfig)
    timeout: TimeoutConfig = field(default_factory=TimeoutConfig)
    uplink: UplinkPolicy = field(default_factory=UplinkPolicy)
    packaging: PackagingConfig = field(default_factory=PackagingConfig)
    dataset: DatasetConfig | None = None
    """None: train on every raw object (the snapshot of docs/retraining.md)."""
    canary: CanaryConfig = field(default_factory=CanaryConfig)


@dataclass(frozen=True)
class PipelineConfig:
    path: Path
    models: dict[str, ModelConfig]

    def model(self, name: str) -> ModelConfig:
        try:
            return self.models[name]
        except KeyError:
            known = ", ".join(sorted(self.models)) or "none"
            raise UnknownModelError(f"unknown model {name!r} (configured: {known})") from None


class UnknownModelError(KeyError):
    """A model name that the pipeline config does not define."""

    def __str__(self) -> str:
        return str(self.args[0])


class _Fields:
    """Reads one TOML table, naming `file: where.field` in every error."""

    def __init__(self, file: str, where: str, table: Any) -> None:
        self.file, self.where = file, where
        if not isinstance(table, dict):
            self.fail("", f"must be a table, got {_show(table)}")
        self.table: dict[str, Any] = table
        self.read: set[str] = set()

    def fail(self, name: str, message: str) -> None:
        place = f"{self.where}.{name}" if name else self.where
        raise ConfigError(f"{self.file}: {place}: {message}")

    def get(self, name: str, kind: str, default: Any = ..., *, choices: tuple[Any, ...] = (),
            minimum: float | None = None, maximum: float | None = None) -> Any:
        self.read.add(name)
        if name not in self.table:
            if default is ...:
                self.fail(name, "is required")
            return default
        value = self.table[name]
        if kind == "str" and not isinstance(value, str):
            self.fail(name, f"must be a string, got {_show(value)}")
        if kind == "bool" and not isinstance(value, bool):
            self.fail(name, f"must be true or false, got {_show(value)}")
        if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            self.fail(name, f"must be a whole number, got {_show(value)}")
        if kind == "float":
            if isinstance(value, bool) or not isinstance(value, int | float):
                self.fail(name, f"must be a number, got {_show(value)}")
            value = float(value)
            if math.isnan(value):
                self.fail(name, "must be a number, got nan")
        if choices and value not in choices:
            self.fail(name, f"must be one of {', '.join(map(str, choices))}; got {_show(value)}")
        if minimum is not None and value < minimum:
            self.fail(name, f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            self.fail(name, f"must be at most {maximum}, got {value}")
        return value

    def sub(self, name: str) -> _Fields:
        self.read.add(name)
        return _Fields(self.file, f"{self.where}.{name}", self.table.get(name, {}))

    def done(self) -> None:
        unknown = sorted(set(self.table) - self.read)
        if unknown:
            self.fail(unknown[0], "is not a known field (typo?)")


def _show(value: Any) -> str:
    return repr(value) if not isinstance(value, dict) else "a table"


def load_pipeline_config(path: Path | str) -> PipelineConfig:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: pipeline config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_pipeline_config(raw, file=str(path))


def parse_pipeline_config(raw: dict[str, Any], *, file: str = "pipeline.toml") -> PipelineConfig:
    top = _Fields(file, "pipeline", raw)
    models_table = top.get("models", "table", {})
    if not isinstance(models_table, dict) or not models_table:
        raise ConfigError(f"{file}: models: define at least one [models.<name>] table")
    top.done()
    models = {name: _parse_model(file, name, table) for name, table in models_table.items()}
    return PipelineConfig(path=Path(file), models=models)


def _parse_model(file: str, name: str, table: Any) -> ModelConfig:
    where = f"models.{name}"
    if not MODEL_NAME.fullmatch(name):
        raise ConfigError(
            f"{file}: {where}: model names use lowercase letters, digits and '-' (max 63)"
        )
    f = _Fields(file, where, table)
    family = f.get("family", "str", choices=FAMILIES)
    metric = f.get("metric", "str", choices=FAMILY_METRICS[family])
    model = ModelConfig(
        name=name,
        family=family,
        metric=metric,
        description=f.get("description", "str", ""),
        threshold=f.get("threshold", "float"),
        min_improvement=f.get("min_improvement", "float", 0.0, minimum=0.0),
        detection_tolerance=f.get("detection_tolerance", "float", 0.05, minimum=0.0,
                                  maximum=1.0),
        min_train_records=f.get("min_train_records", "int", 0, minimum=0),
        min_new_records=f.get("min_new_records", "int", 1000, minimum=1),
        thing_group=f.get("thing_group", "str"),
        delta_history=f.get("delta_history", "int", 3, minimum=0, maximum=10),
        schema=_parse_schema(f.sub("schema")),
        training=_parse_training(f.sub("training"), family),
        hyperparameters=_parse_hyperparameters(f.sub("hyperparameters")),
        rollout=_parse_rollout(f.sub("rollout")),
        abort=_parse_abort(f.sub("abort")),
        timeout=_parse_timeout(f.sub("timeout")),
        uplink=_parse_uplink(f.sub("uplink")),
        packaging=_parse_packaging(f.sub("packaging")),
        dataset=_parse_dataset(f.sub("dataset")) if "dataset" in f.table else None,
        canary=_parse_canary(f.sub("canary")),
    )
    f.done()
    if model.canary.enabled and model.canary.thing_group == model.thing_group:
        raise ConfigError(f"{file}: {where}.canary: thing_group must be a group of its own "
                          f"(a few of {model.thing_group}'s devices), not the whole fleet")
    return model


def _parse_schema(f: _Fields) -> FeatureSchema:
    features_raw = f.get("features", "any")
    if isinstance(features_raw, dict):
        sub = _Fields(f.file, f"{f.where}.features", features_raw)
        count = sub.get("count", "int", minimum=1, maximum=4096)
        prefix = sub.get("prefix", "str", "f")
        sub.done()
        features = tuple(f"{prefix}{i}" for i in range(count))
    elif isinstance(features_raw, list) and features_raw:
        if not all(isinstance(x, str) and FEATURE_NAME.fullmatch(x) for x in features_raw):
            f.fail("features", "must be a list of identifiers like 'rms' or 'band_low'")
        if len(set(features_raw)) != len(features_raw):
            f.fail("features", "names must be unique")
        features = tuple(features_raw)
    else:
        f.fail("features", "must be a non-empty list of names or {count = N, prefix = '...'}")
        raise AssertionError  # unreachable; fail raises
    label = f.get("label", "str", "none", choices=LABEL_MODES)
    label_values = f.get("label_values", "any", None)
    if label_values is not None:
        if not (isinstance(label_values, list) and label_values
                and all(isinstance(v, int) and not isinstance(v, bool) for v in label_values)):
            f.fail("label_values", "must be a non-empty list of whole numbers")
        label_values = tuple(label_values)
    if label == "none" and label_values is not None:
        f.fail("label_values", "is set but label = 'none'")
    min_value = f.get("min_value", "float", -math.inf)
    max_value = f.get("max_value", "float", math.inf)
    if min_value >= max_value:
        f.fail("max_value", f"must be greater than min_value ({min_value})")
    f.done()
    return FeatureSchema(features, label, label_values, min_value, max_value)


def is_gpu_instance(instance_type: str) -> bool:
    """A SageMaker instance type with an NVIDIA GPU (ml.g4dn.xlarge, ml.g5.2xlarge, ml.p3...)."""
    return instance_type.startswith(SAGEMAKER_GPU_PREFIXES)


def _parse_training(f: _Fields, family: str) -> TrainingConfig:
    t = TrainingConfig(
        backend=f.get("backend", "str", "sagemaker", choices=BACKENDS),
        instance_type=f.get("instance_type", "str", "ml.m5.large"),
        instance_count=f.get("instance_count", "int", 1, minimum=1, maximum=1),
        gpu_count=f.get("gpu_count", "int", 0, minimum=0, maximum=8),
        volume_size_gb=f.get("volume_size_gb", "int", 30, minimum=1, maximum=1024),
        max_runtime_seconds=f.get("max_runtime_seconds", "int", 3600, minimum=60,
                                  maximum=28 * 24 * 3600),
        schedule=f.get("schedule", "str", None),
    )
    if t.backend == "sagemaker" and not t.instance_type.startswith("ml."):
        f.fail("instance_type", f"SageMaker instance types start with 'ml.', got {t.instance_type!r}")
    if family not in GPU_FAMILIES:
        why = f"the {family} family never uses a GPU (GPU families: {', '.join(GPU_FAMILIES)})"
        if t.gpu_count > 0:
            f.fail("gpu_count", f"must be 0: {why}")
        if t.backend == "sagemaker" and is_gpu_instance(t.instance_type):
            f.fail("instance_type", f"{t.instance_type} is a GPU instance: {why}; "
                                    "use a CPU type such as ml.m5.large")
    if t.schedule is not None and not re.match(r"^(rate|cron)\(.+\)$", t.schedule):
        f.fail("schedule", "must be an EventBridge expression like 'rate(1 day)' or 'cron(...)'")
    f.done()
    return t


def _parse_hyperparameters(f: _Fields) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in f.table.items():
        f.read.add(key)
        if isinstance(value, bool):
            out[key] = "true" if value else "false"
        elif isinstance(value, int | float | str):
            out[key] = str(value)
        else:
            f.fail(key, f"must be a string, number or boolean, got {_show(value)}")
    return out


def _parse_rollout(f: _Fields) -> RolloutConfig:
    r = RolloutConfig(
        base_rate_per_minute=f.get("base_rate_per_minute", "int", 20, minimum=1, maximum=1000),
        increment_factor=f.get("increment_factor", "float", 2.0, minimum=1.1, maximum=5.0),
        rate_increase_after_succeeded=f.get("rate_increase_after_succeeded", "int", 10,
                                            minimum=1, maximum=1_000_000),
        maximum_per_minute=f.get("maximum_per_minute", "int", 1000, minimum=1, maximum=1000),
    )
    f.done()
    return r


def _parse_abort(f: _Fields) -> AbortConfig:
    a = AbortConfig(
        failure_percent=f.get("failure_percent", "float", 10.0, minimum=0.0, maximum=100.0),
        min_executed_things=f.get("min_executed_things", "int", 10, minimum=1),
        failure_type=f.get("failure_type", "str", "ALL", choices=ABORT_FAILURE_TYPES),
    )
    f.done()
    return a


def _parse_canary(f: _Fields) -> CanaryConfig:
    c = CanaryConfig(
        thing_group=f.get("thing_group", "str", ""),
        health_readings=f.get("health_readings", "int", 50, minimum=1, maximum=10_000),
        min_reports=f.get("min_reports", "int", 3, minimum=1),
        max_failure_percent=f.get("max_failure_percent", "float", 20.0, minimum=0.0,
                                  maximum=100.0),
        max_error_rate=f.get("max_error_rate", "float", 0.01, minimum=0.0, maximum=1.0),
        max_anomaly_rate=f.get("max_anomaly_rate", "float", 0.2, minimum=0.0, maximum=1.0),
        max_latency_ms=f.get("max_latency_ms", "float", 50.0, minimum=0.0),
        max_wait_minutes=f.get("max_wait_minutes", "int", 30, minimum=1, maximum=10080),
    )
    f.done()
    return c


def _parse_timeout(f: _Fields) -> TimeoutConfig:
    t = TimeoutConfig(
        in_progress_minutes=f.get("in_progress_minutes", "int", 30, minimum=1, maximum=10080)
    )
    f.done()
    return t


def _parse_packaging(f: _Fields) -> PackagingConfig:
    p = PackagingConfig(
        time_budget_seconds=f.get("time_budget_seconds", "float", 60.0, minimum=1.0, maximum=900.0),
        memory_budget_mb=f.get("memory_budget_mb", "float", 1536.0, minimum=64.0, maximum=10240.0),
        slow_codec_max_mb=f.get("slow_codec_max_mb", "float", 8.0, minimum=0.0, maximum=512.0),
    )
    f.done()
    return p


def _parse_uplink(f: _Fields) -> UplinkPolicy:
    d = UplinkPolicy()
    u = UplinkPolicy(
        before_model=f.get("before_model", "str", d.before_model, choices=BEFORE_MODEL_CHOICES),
        anomalies=f.get("anomalies", "bool", d.anomalies),
        sample_rate=f.get("sample_rate", "float", d.sample_rate, minimum=0.0, maximum=1.0),
        summary_interval_seconds=f.get("summary_interval_seconds", "int",
                                       int(d.summary_interval_seconds), minimum=1),
    )
    f.done()
    return u


def _parse_dataset(f: _Fields) -> DatasetConfig:
    strata = f.get("stratify_by", "any", ["day"])
    if not (isinstance(strata, list) and all(isinstance(x, str) for x in strata)
            and len(set(strata)) == len(strata)):
        f.fail("stratify_by", f"must be a list of distinct names from "
                              f"{', '.join(DATASET_STRATA)}; got {_show(strata)}")
    for name in strata:
        if name not in DATASET_STRATA:
            f.fail("stratify_by", f"unknown stratum {name!r} (one of {', '.join(DATASET_STRATA)})")
    weights_f = f.sub("weights")
    weights: dict[str, float] = {}
    for key in weights_f.table:
        column, sep, value = key.partition("=")
        if not sep or column not in strata or not value:
            weights_f.fail(key, f"must be 'column=value' with a column of stratify_by "
                                f"({', '.join(strata) or 'none'})")
        weights[key] = weights_f.get(key, "float", minimum=0.0)
    weights_f.done()
    d = DatasetConfig(
        window_days=f.get("window_days", "int", 365, minimum=1, maximum=3650),
        max_records=f.get("max_records", "int", 2_000_000, minimum=10, maximum=10**9),
        stratify_by=tuple(strata),
        weights=weights,
        include_labelled=f.get("include_labelled", "bool", True),
        engine=f.get("engine", "str", "auto", choices=DATASET_ENGINES),
        athena_above_records=f.get("athena_above_records", "int", 5_000_000, minimum=1),
    )
    f.done()
    return d
