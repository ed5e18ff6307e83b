"""Fixtures of the cloud tests: moto in-process with the stage's resources, the stage
settings, the registry and state stores, and the handlers' runtime and test client.

A module that needs another pipeline config overrides `config`; `runtime`
and `client` then use it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from chalice.test import Client

from chalicelib.config import PipelineConfig, load_pipeline_config
from chalicelib.registry import Registry
from chalicelib.runtime import Runtime, set_runtime
from chalicelib.settings import DEFAULT_PIPELINE_CONFIG, Settings
from chalicelib.state import StateStore
from tests.cloud.support import approved_events_queue


@pytest.fixture
def settings() -> Settings:
    return Settings.from_env()


@pytest.fixture
def aws(settings: Settings) -> Iterator:
    """moto in-process with the stage's bucket, tables, queues and release signing key;
    yields AwsClients."""
    from moto import mock_aws

    from chalicelib.aws import AwsClients
    from chalicelib.signing import create_signing_key
    from chalicelib.tables import create_tables

    with mock_aws():
        clients = AwsClients.for_settings(settings)
        clients.s3.create_bucket(Bucket=settings.bucket)
        create_tables(clients.dynamodb, settings.registry_table, settings.state_table)
        clients.sqs.create_queue(QueueName=settings.telemetry_queue)
        clients.sqs.create_queue(QueueName=settings.raw_events_queue)
        create_signing_key(clients.kms, settings.signing_key_id)
        yield clients


@pytest.fixture
def config() -> PipelineConfig:
    return load_pipeline_config(DEFAULT_PIPELINE_CONFIG)


@pytest.fixture
def registry(aws, settings: Settings) -> Registry:
    return Registry(settings.registry_table, aws.dynamodb)


@pytest.fixture
def state_store(aws, settings: Settings) -> StateStore:
    return StateStore(settings.state_table, aws.dynamodb)


@pytest.fixture
def runtime(aws, settings: Settings, config: PipelineConfig) -> Iterator[Runtime]:
    """The handlers' runtime on moto, injected for the test and removed after it."""
    rt = Runtime(settings=settings, clients=aws, config=config)
    set_runtime(rt)
    yield rt
    set_runtime(None)


@pytest.fixture
def client(runtime: Runtime) -> Iterator[Client]:
    """Chalice's test client on app.py, its handlers running on `runtime`."""
    from app import app

    with Client(app) as test_client:
        yield test_client


@pytest.fixture
def approved_queue(aws, settings: Settings) -> str:
    """A queue that receives every ModelApproved event."""
    return approved_events_queue(aws, settings)


@pytest.fixture
def env(aws, settings, client, registry) -> dict[str, Any]:
    """Packaging on moto: the thing group, the app's runtime, a Chalice test client."""
    aws.iot.create_thing_group(thingGroupName="mledge-vibration")
    return {"aws": aws, "settings": settings, "client": client, "registry": registry}
