"""An Athena client that moto (5.2.x) can serve in-process.

botocore >= 1.44 describes Athena with the rest-json protocol; moto still routes
Athena's JSON protocol (`X-Amz-Target: AmazonAthena.<Operation>`). The client below
is built from the same service model with only the wire protocol switched back, so
the operations, parameters and response shapes the code uses are botocore's own.
"""

from __future__ import annotations

import copy
from typing import Any

import boto3
import botocore.session


def moto_athena_client(region: str = "us-east-1") -> Any:
    session = botocore.session.get_session()
    loader = session.get_component("data_loader")
    original = loader.load_service_model

    def load(service_name: str, type_name: str, api_version: str | None = None) -> Any:
        model = original(service_name, type_name, api_version)
        if service_name == "athena" and type_name == "service-2":
            model = copy.deepcopy(model)
            model["metadata"].update(protocol="json", protocols=["json"], jsonVersion="1.1",
                                     targetPrefix="AmazonAthena")
        return model

    loader.load_service_model = load
    return boto3.Session(botocore_session=session, region_name=region).client("athena")
