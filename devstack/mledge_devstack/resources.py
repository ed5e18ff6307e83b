"""The stage's AWS resources in moto: what infra/ creates in AWS, made through the same APIs."""

from __future__ import annotations

import logging
from typing import Any

from chalicelib.aws import AwsClients
from chalicelib.config import load_pipeline_config
from chalicelib.layout import RAW
from chalicelib.settings import Settings
from chalicelib.signing import create_signing_key, release_public_key_pem
from chalicelib.tables import create_tables
from mledge_devstack.routes import add_queue_notifications

log = logging.getLogger(__name__)

RAW_NOTIFICATION_ID = "raw-object-created"


def queue_arn(sqs: Any, name: str) -> str:
    url = sqs.get_queue_url(QueueName=name)["QueueUrl"]
    return str(sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])[
        "Attributes"]["QueueArn"])


def provision_stage(clients: AwsClients, settings: Settings) -> dict[str, Any]:
    """Bucket, tables, queues, the `raw/` notification, the release signing key (its
    PEM public key under "release_keys_pem") and one thing group per model."""
    clients.s3.create_bucket(Bucket=settings.bucket)
    create_tables(clients.dynamodb, settings.registry_table, settings.state_table)
    queues = [q for q in (settings.telemetry_queue, settings.raw_events_queue) if q]
    for name in queues:
        clients.sqs.create_queue(QueueName=name)
    if settings.raw_events_queue:
        add_queue_notifications(clients.s3, settings.bucket, [{
            "Id": RAW_NOTIFICATION_ID,
            "QueueArn": queue_arn(clients.sqs, settings.raw_events_queue),
            "Events": ["s3:ObjectCreated:*"],
            "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": f"{RAW}/"}]}},
        }])
        # S3 sends an `s3:TestEvent` when a notification is configured; drop it so the
        # trigger handler sees only object events (it must still tolerate one in AWS).
        url = clients.sqs.get_queue_url(QueueName=settings.raw_events_queue)["QueueUrl"]
        clients.sqs.purge_queue(QueueUrl=url)
    release_keys_pem = b""
    if settings.signing_key_id:
        create_signing_key(clients.kms, settings.signing_key_id)
        release_keys_pem = release_public_key_pem(clients.kms, settings.signing_key_id)
    groups = {}
    for model in load_pipeline_config(settings.pipeline_config).models.values():
        response = clients.iot.create_thing_group(thingGroupName=model.thing_group)
        groups[model.name] = {"thing_group": model.thing_group,
                              "thing_group_arn": response["thingGroupArn"]}
        if model.canary.enabled:  # the canary devices: also members of the model's group
            clients.iot.create_thing_group(thingGroupName=model.canary.thing_group)
    return {"queues": queues, "thing_groups": groups, "release_keys_pem": release_keys_pem}


def provision_thing(clients: AwsClients, thing_name: str, thing_group: str | None) -> str:
    """Register a thing (and put it in its model's group); returns its ARN."""
    try:
        arn = clients.iot.create_thing(thingName=thing_name)["thingArn"]
    except clients.iot.exceptions.ResourceAlreadyExistsException:
        arn = clients.iot.describe_thing(thingName=thing_name)["thingArn"]
    if thing_group:
        clients.iot.add_thing_to_thing_group(thingGroupName=thing_group, thingName=thing_name)
    return str(arn)
