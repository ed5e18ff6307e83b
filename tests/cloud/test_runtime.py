"""The runtime builds the stores and the training backends once per container."""

from __future__ import annotations

import pytest

from chalicelib.backends import BackendConfigError, SageMakerBackend


def test_the_runtime_builds_each_store_and_backend_once(runtime):
    assert runtime.registry is runtime.registry
    assert runtime.state is runtime.state
    assert runtime.registry.table == runtime.settings.registry_table
    assert runtime.state.table_name == runtime.settings.state_table
    backend = runtime.backend("sagemaker")
    assert isinstance(backend, SageMakerBackend)
    assert runtime.backend("sagemaker") is backend


def test_an_unknown_backend_is_refused_and_not_cached(runtime):
    with pytest.raises(BackendConfigError, match="unknown training backend 'nope'"):
        runtime.backend("nope")
    with pytest.raises(BackendConfigError):
        runtime.backend("nope")
