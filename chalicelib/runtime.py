"""What a handler needs, made once per Lambda container and replaceable in tests.

`get_runtime()` builds the stage settings, the AWS clients, the validated pipeline
config, the registry and state stores and the training backends on first use (not at
import time: `chalice.test.Client` sets the stage's environment only while a handler
runs), then reuses them for every later invocation of the warm container. Tests call
`set_runtime(...)` with their own (moto) clients and `set_runtime(None)` to go back to the
lazy default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from chalicelib.aws import AwsClients
from chalicelib.backends import TrainingBackend, backend_for
from chalicelib.config import PipelineConfig, load_pipeline_config
from chalicelib.registry import Registry
from chalicelib.settings import Settings
from chalicelib.state import StateStore


@dataclass(frozen=True)
class Runtime:
    settings: Settings
    clients: AwsClients
    config: PipelineConfig
    _backends: dict[str, TrainingBackend] = field(default_factory=dict, repr=False, compare=False)

    @cached_property
    def registry(self) -> Registry:
        return Registry.for_settings(self.settings, self.clients)

    @cached_property
    def state(self) -> StateStore:
        return StateStore.for_settings(self.settings, self.clients)

    def backend(self, name: str) -> TrainingBackend:
        """The training backend `name`, built on first use and then reused."""
        if name not in self._backends:
            self._backends[name] = backend_for(name, self.clients, self.settings)
        return self._backends[name]

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
