"""What a handler needs, made once per Lambda container and replaceable in tests.

`get_runtime()` builds the stage settings, the AWS clients and the validated pipeline
config on first use (not at import time: `chalice.test.Client` sets the stage's
environment only while a handler runs), then reuses them for every later invocation
of the warm container. Tests call `set_runtime(...)` with their own (moto) clients and
`set_runtime(None)` to go back to the lazy default.
"""

from __future__ import annotations

from dataclasses import dataclass

from chalicelib.aws import AwsClients
from chalicelib.config import PipelineConfig, load_pipeline_config
from chalicelib.settings import Settings


@dataclass(frozen=True)
class Runtime:
    settings: Settings
    clients: AwsClients
    config: PipelineConfig

    @classmethod
    def from_settings(cls, settings: Settings, clients: AwsClients | None = None) -> Runtime:
        return cls(
            settings=settings,
            clients=clients or AwsClients.for_settings(settings),
            config=load_pipeline_config(settings.pipeline_config),
        )


_current: Runtime | None = None


def get_runtime() -> Runtime:
    """The container's runtime, built from the environment on first use."""
    global _current
    if _current is None:
        _current = Runtime.from_settings(Settings.from_env())
    return _current


def set_runtime(runtime: Runtime | None) -> None:
    """Inject a runtime (tests, local stack); None makes the next call build one again."""
    global _current
    _current = runtime
