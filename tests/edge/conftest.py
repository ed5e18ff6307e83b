"""Fixtures of the edge tests: a real mosquitto (plain and mutual TLS), an artifact
HTTP server, and IoT Jobs on the broker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.edge.support import (
    ArtifactServer,
    Broker,
    IotJobsOnBroker,
    free_port,
    make_tls_files,
    run_mosquitto,
)


@pytest.fixture
def mosquitto_tls(tmp_path: Path) -> Iterator[Broker]:
    """mosquitto with a plain listener and a mutual-TLS listener (client certs required)."""
    tls = make_tls_files(tmp_path / "tls")
    tls_port = free_port()
    extra = (f"listener {tls_port} 127.0.0.1\ncafile {tls.ca}\ncertfile {tls.server_cert}\n"
             f"keyfile {tls.server_key}\nrequire_certificate true\nuse_identity_as_username true\n")
    with run_mosquitto(tmp_path, extra) as port:
        yield Broker(port, tls_port, tls)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[int]:
    """A real mosquitto on a free loopback port (plain TCP, anonymous); yields the port."""
    with run_mosquitto(tmp_path, "") as port:
        yield port


@pytest.fixture
def artifacts() -> Iterator[ArtifactServer]:
    with ArtifactServer() as server:
        yield server


@pytest.fixture
def iot(mosquitto: int, artifacts: ArtifactServer) -> Iterator[IotJobsOnBroker]:
    fake = IotJobsOnBroker(mosquitto, artifacts)
    try:
        yield fake
    finally:
        fake.close()
