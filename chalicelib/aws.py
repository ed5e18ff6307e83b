"""The one place that makes AWS clients.

Every client honours `AWS_ENDPOINT_URL` (boto3 does so natively; we pass the
settings' value explicitly so a Settings object fully describes the target) and
the configured region, so the same code runs against AWS, moto in-process and a
moto server. Handlers receive an `AwsClients`; tests inject their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import boto3
from botocore.config import Config

from chalicelib.settings import Settings

_RETRIES = Config(retries={"max_attempts": 5, "mode": "standard"})


@dataclass
class AwsClients:
    """Lazily created boto3 clients for one Settings (region + endpoint)."""

    region: str = "us-east-1"
    endpoint_url: str | None = None
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def for_settings(cls, settings: Settings) -> AwsClients:
        return cls(region=settings.region, endpoint_url=settings.endpoint_url)

    def client(self, service: str) -> Any:
        if service not in self._cache:
            kwargs: dict[str, Any] = {"region_name": self.region, "config": _RETRIES}
            if self.endpoint_url:
                kwargs["endpoint_url"] = self.endpoint_url
            self._cache[service] = boto3.client(service, **kwargs)
        return self._cache[service]

    @property
    def s3(self) -> Any:
        return self.client("s3")

    @property
    def dynamodb(self) -> Any:
        return self.client("dynamodb")

    @property
    def sqs(self) -> Any:
        return self.client("sqs")

    @property
    def events(self) -> Any:
        return self.client("events")

    @property
    def iot(self) -> Any:
        return self.client("iot")

    @property
    def sagemaker(self) -> Any:
        return self.client("sagemaker")

    @property
    def batch(self) -> Any:
        return self.client("batch")

    @property
    def kms(self) -> Any:
        return self.client("kms")

    @property
    def cloudwatch(self) -> Any:
        return self.client("cloudwatch")
    def athena(self) -> Any:
        return self.client("athena")


def error_code(exc: BaseException) -> str:
    """The AWS error code of a botocore ClientError ('' for anything else)."""
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))
