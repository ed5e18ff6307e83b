"""DynamoDB table shapes, in one place for infra docs, tests and the local stack.

- Registry table: one item per model version, key (`model` S, `version` N).
- State table: small items keyed by `pk` (S): counters (`counter#<model>`),
  locks (`lock#training#<model>`), processed-event markers (`event#<id>`, with
  a TTL attribute `expires_at`).
"""

from __future__ import annotations

from typing import Any

REGISTRY_KEY = {"partition": "model", "sort": "version"}
STATE_KEY = "pk"
STATE_TTL_ATTRIBUTE = "expires_at"


def registry_table_definition(name: str) -> dict[str, Any]:
    return {
        "TableName": name,
        "KeySchema": [
            {"AttributeName": "model", "KeyType": "HASH"},
            {"AttributeName": "version", "KeyType": "RANGE"},
        ],
        "AttributeDefinitions": [
            {"AttributeName": "model", "AttributeType": "S"},
            {"AttributeName": "version", "AttributeType": "N"},
        ],
        "BillingMode": "PAY_PER_REQUEST",
    }


def state_table_definition(name: str) -> dict[str, Any]:
    return {
        "TableName": name,
        "KeySchema": [{"AttributeName": STATE_KEY, "KeyType": "HASH"}],
        "AttributeDefinitions": [{"AttributeName": STATE_KEY, "AttributeType": "S"}],
        "BillingMode": "PAY_PER_REQUEST",
    }


def create_tables(dynamodb: Any, registry_table: str, state_table: str) -> None:
    """Create both tables (tests and the local stack; infra/ creates them in AWS)."""
    dynamodb.create_table(**registry_table_definition(registry_table))
    dynamodb.create_table(**state_table_definition(state_table))
