"""Which queue feeds which handler: read from the Chalice app's own decorators.

A handler plugs into the local stack the way it plugs into AWS: by its
decorator. `on_sqs_message(queue=...)` -> that queue, Lambda's SQS event shape.
`on_cw_event(pattern)` -> an EventBridge rule (default bus) with that pattern
targeting a queue of its own; the SQS body is the EventBridge event, which the
handler receives as-is. `on_s3_event` -> an S3 notification to a queue of its
own; the handler receives the S3 notification. Schedules are not run (start
training explicitly in the local stack).

The local training backend emits the SageMaker state-change detail with
`source: mledge.local-training`; a handler whose pattern listens to
`aws.sagemaker` or `aws.batch` also gets those (one more rule), unless its
pattern already names that source.

`extra_routes` (queue name -> handler name) adds mappings the decorators do not
carry; a name that app.py does not define is logged and its queue left unpolled.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from mledge_update.events import BATCH_SOURCE, LOCAL_TRAINING_SOURCE, SAGEMAKER_SOURCE

log = logging.getLogger(__name__)

TRAINING_SOURCES = (SAGEMAKER_SOURCE, BATCH_SOURCE)

SQS, EVENTBRIDGE, S3 = "sqs", "eventbridge", "s3"


@dataclass(frozen=True)
class Route:
    """Messages of `queue` go to `handler`; `kind` says which event shape it gets."""

    queue: str
    handler: str
    kind: str = SQS
    batch_size: int = 1
    event_patterns: tuple[str, ...] = ()  # EVENTBRIDGE: JSON patterns of its rules
    s3_bucket: str = ""  # S3: the notification's bucket, events and filter
    s3_events: tuple[str, ...] = ()
    s3_prefix: str = ""
    s3_suffix: str = ""
    notes: tuple[str, ...] = field(default=(), compare=False)


def _queue_name(prefix: str, kind: str, handler: str) -> str:
    # SQS queue names: up to 80 of [A-Za-z0-9_-]; handler names are identifiers.
    return f"{prefix}-{kind}-{handler}".replace("_", "-")[:80]


def with_local_training(pattern: dict[str, Any]) -> list[dict[str, Any]]:
    """The pattern, plus a copy for the local training backend where it needs one."""
    sources = pattern.get("source")
    if not isinstance(sources, list) or LOCAL_TRAINING_SOURCE in sources:
        return [pattern]
    if not any(s in TRAINING_SOURCES for s in sources):
        return [pattern]
    local = copy.deepcopy(pattern)
    local["source"] = [LOCAL_TRAINING_SOURCE]
    return [pattern, local]


def routes_from_app(app: Any, *, queue_prefix: str,
                    extra_routes: dict[str, str] | None = None) -> list[Route]:
    from chalice.app import (
        CloudWatchEventConfig,
        S3EventConfig,
        ScheduledEventConfig,
        SQSEventConfig,
    )

    routes: list[Route] = []
    for source in app.event_sources:
        if isinstance(source, SQSEventConfig):
            queue = source.queue or (source.queue_arn or "").rsplit(":", 1)[-1]
            routes.append(Route(queue, source.name, SQS, batch_size=source.batch_size))
        elif isinstance(source, CloudWatchEventConfig):
            patterns = with_local_training(source.event_pattern)
            routes.append(Route(
                _queue_name(queue_prefix, "events", source.name), source.name, EVENTBRIDGE,
                event_patterns=tuple(json.dumps(p, sort_keys=True) for p in patterns)))
        elif isinstance(source, S3EventConfig):
            routes.append(Route(
                _queue_name(queue_prefix, "s3", source.name), source.name, S3,
                s3_bucket=source.bucket, s3_events=tuple(source.events),
                s3_prefix=source.prefix or "", s3_suffix=source.suffix or ""))
        elif isinstance(source, ScheduledEventConfig):
            log.info("handler %s runs on a schedule (%s): not scheduled in the local stack",
                     source.name, source.schedule_expression)
        else:
            log.warning("handler %s: event source %s is not supported by the local stack",
                        source.name, type(source).__name__)
    for queue, handler in (extra_routes or {}).items():
        if handler not in app.handler_map:
            log.warning("route %s -> %s: app.py has no handler %s yet; queue left unpolled",
                        queue, handler, handler)
            continue
        routes.append(Route(queue, handler, SQS))
    return routes


def unrouted_queues(routes: list[Route], queues: list[str]) -> list[str]:
    routed = {r.queue for r in routes}
    return [q for q in queues if q and q not in routed]


def provision_routes(routes: list[Route], *, sqs: Any, events: Any, s3: Any, region: str,
                     account_id: str = "123456789012", rule_prefix: str = "mledge-local") -> None:
    """Create what each route needs: its queue, EventBridge rules, S3 notifications."""
    s3_configs: dict[str, list[dict[str, Any]]] = {}
    for route in routes:
        url = sqs.create_queue(QueueName=route.queue)["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])[
            "Attributes"]["QueueArn"]
        if route.kind == EVENTBRIDGE:
            for index, pattern in enumerate(route.event_patterns):
                name = f"{rule_prefix}-{route.handler}-{index}".replace("_", "-")[:64]
                events.put_rule(Name=name, EventPattern=pattern, State="ENABLED",
                                EventBusName="default")
                events.put_targets(Rule=name, EventBusName="default",
                                   Targets=[{"Id": "dispatcher", "Arn": arn}])
        elif route.kind == S3:
            rules = []
            if route.s3_prefix:
                rules.append({"Name": "prefix", "Value": route.s3_prefix})
            if route.s3_suffix:
                rules.append({"Name": "suffix", "Value": route.s3_suffix})
            config: dict[str, Any] = {"Id": route.handler, "QueueArn": arn,
                                      "Events": list(route.s3_events)}
            if rules:
                config["Filter"] = {"Key": {"FilterRules": rules}}
            s3_configs.setdefault(route.s3_bucket, []).append(config)
    for bucket, configs in s3_configs.items():
        add_queue_notifications(s3, bucket, configs)


def add_queue_notifications(s3: Any, bucket: str, configs: list[dict[str, Any]]) -> None:
    """Add S3 -> SQS notifications to a bucket, keeping those it has (by Id)."""
    current = s3.get_bucket_notification_configuration(Bucket=bucket)
    current.pop("ResponseMetadata", None)
    ids = {c["Id"] for c in configs}
    queues = [c for c in current.get("QueueConfigurations", []) if c.get("Id") not in ids]
    current["QueueConfigurations"] = queues + configs
    s3.put_bucket_notification_configuration(Bucket=bucket,
                                             NotificationConfiguration=current)
