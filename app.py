"""MLEdgeDeploy's Lambda handlers: wiring only. Each handler calls one chalicelib function."""

from __future__ import annotations

import os

from chalice import Chalice, IAMAuthorizer, Rate
from chalice.app import CloudWatchEvent, Request, SQSEvent
from mledge_update.events import MODEL_APPROVED, PIPELINE_SOURCE

from chalicelib import canary, compaction, completion, ingest, operator_api, packaging, rollouts, schedule, trigger
from chalicelib.operator import Operator
from chalicelib.runtime import get_runtime

app = Chalice(app_name="mledgedeploy")

# Read at import time: the decorator needs the queue name when chalice packages the app
# (tests/conftest.py sets it before importing app; .chalice/config.json per stage).
TELEMETRY_QUEUE = os.environ.get("MLEDGE_TELEMETRY_QUEUE", "mledge-dev-telemetry")
RAW_EVENTS_QUEUE = os.environ.get("MLEDGE_RAW_EVENTS_QUEUE", "mledge-dev-raw-events")


@app.on_sqs_message(queue=TELEMETRY_QUEUE, batch_size=ingest.INGEST_BATCH_SIZE,
                    maximum_batching_window_in_seconds=ingest.INGEST_BATCHING_WINDOW_SECONDS)
def ingest_telemetry(event: SQSEvent) -> None:
    rt = get_runtime()
    ingest.ingest_sqs_event(event.to_dict(), clients=rt.clients, settings=rt.settings,
                            config=rt.config)


# --- retrain trigger (chalicelib/trigger.py): S3 raw/ events via SQS, and a schedule tick ---
# S3 -> SQS -> on_sqs_message, because `chalice package` refuses on_s3_event; the
# handler also takes a direct S3 event, so @app.on_s3_event works with `chalice deploy`.

@app.on_sqs_message(queue=RAW_EVENTS_QUEUE, batch_size=10)
def on_raw_objects_created(event: SQSEvent) -> None:
    rt = get_runtime()
    trigger.handle_raw_events(event.to_dict(), clients=rt.clients, settings=rt.settings,
                              config=rt.config, registry=rt.registry, state=rt.state,
                              backend_factory=rt.backend)


@app.schedule(Rate(schedule.SCHEDULE_TICK_MINUTES, unit=Rate.MINUTES))
def retrain_on_schedule(event: CloudWatchEvent) -> None:
    rt = get_runtime()
    trigger.run_scheduled_trainings(clients=rt.clients, settings=rt.settings, config=rt.config,
                                    registry=rt.registry, state=rt.state, backend_factory=rt.backend)


# --- compaction: raw/ JSON lines -> Parquet by model and day (chalicelib/compaction.py) ---

@app.schedule(Rate(compaction.COMPACTION_TICK_MINUTES, unit=Rate.MINUTES))
def compact_on_schedule(event: CloudWatchEvent) -> None:
    rt = get_runtime()
    compaction.run_scheduled_compaction(clients=rt.clients, settings=rt.settings,
                                        config=rt.config)


# --- training completion -> registry + gate (chalicelib/completion.py) ---------------

@app.on_cw_event(completion.SAGEMAKER_PATTERN)
def on_sagemaker_training_state(event: CloudWatchEvent) -> None:
    rt = get_runtime()
    completion.handle_sagemaker_event(event.to_dict(), clients=rt.clients, settings=rt.settings,
                                      config=rt.config, registry=rt.registry, state=rt.state)


@app.on_cw_event(completion.BATCH_PATTERN)
def on_batch_training_state(event: CloudWatchEvent) -> None:
    rt = get_runtime()
    completion.handle_batch_event(event.to_dict(), clients=rt.clients, settings=rt.settings,
                                  config=rt.config, registry=rt.registry, state=rt.state)


@app.on_cw_event(completion.LOCAL_PATTERN)
def on_local_training_state(event: CloudWatchEvent) -> None:
    rt = get_runtime()
    completion.handle_local_training_event(event.to_dict(), clients=rt.clients,
                                           settings=rt.settings, config=rt.config,
                                           registry=rt.registry, state=rt.state)


# --- operator API (chalicelib/operator_api.py), IAM-authorized -------------------------

_iam = IAMAuthorizer()


def _operator() -> Operator:
    rt = get_runtime()
    return Operator(clients=rt.clients, settings=rt.settings, config=rt.config,
                    registry=rt.registry, state=rt.state, backend_factory=rt.backend)


def _request() -> Request:
    # Chalice sets current_request for every route invocation; None only outside one.
    request = app.current_request
    if request is None:
        raise RuntimeError("no current request: called outside a route")
    return request


@app.route("/models", methods=["GET"], authorizer=_iam)
def http_list_models() -> dict:
    return operator_api.list_models(_operator())


@app.route("/models/{model}/versions", methods=["GET"], authorizer=_iam)
def http_list_versions(model: str) -> dict:
    return operator_api.list_versions(_operator(), model)


@app.route("/models/{model}/versions/{version}", methods=["GET"], authorizer=_iam)
def http_show_version(model: str, version: str) -> dict:
    return operator_api.show_version(_operator(), model, version)


@app.route("/models/{model}/fleet", methods=["GET"], authorizer=_iam)
def http_fleet(model: str) -> dict:
    return operator_api.fleet(_operator(), model)


@app.route("/models/{model}/trainings", methods=["POST"], authorizer=_iam)
def http_start_training(model: str) -> dict:
    return operator_api.start_training(_operator(), model, _request().json_body)


@app.route("/models/{model}/versions/{version}/promote", methods=["POST"], authorizer=_iam)
def http_promote(model: str, version: str) -> dict:
    request = _request()
    return operator_api.promote(_operator(), model, version, request.json_body,
                                operator_api.actor_of(request.context))


@app.route("/models/{model}/versions/{version}/release", methods=["POST"], authorizer=_iam)
def http_release(model: str, version: str) -> dict:
    request = _request()
    return operator_api.release(_operator(), model, version, request.json_body,
                                operator_api.actor_of(request.context))


@app.route("/models/{model}/labels", methods=["POST"], authorizer=_iam)
def http_label(model: str) -> dict:
    request = _request()
    return operator_api.label(_operator(), model, request.json_body,
                              operator_api.actor_of(request.context))


@app.route("/models/{model}/rollback", methods=["POST"], authorizer=_iam)
def http_rollback(model: str) -> dict:
    request = _request()
    return operator_api.rollback(_operator(), model, request.json_body,
                                 operator_api.actor_of(request.context))


# --- packaging: ModelApproved -> release + IoT Job (chalicelib/packaging.py) ----------

EVENT_SOURCE = os.environ.get("MLEDGE_EVENT_SOURCE", PIPELINE_SOURCE)


@app.on_cw_event({"source": [EVENT_SOURCE], "detail-type": [MODEL_APPROVED]})
def release_approved_model(event: CloudWatchEvent) -> dict:
    rt = get_runtime()
    return packaging.handle_model_approved(event.detail, clients=rt.clients, settings=rt.settings,
                                           config=rt.config, registry=rt.registry).to_dict()


# --- observability: rollout progress of each current release (chalicelib/rollouts.py) --

@app.schedule(Rate(rollouts.REPORT_MINUTES, unit=Rate.MINUTES))
def report_rollouts(event: CloudWatchEvent) -> None:
    rt = get_runtime()
    rollouts.report_rollouts(clients=rt.clients, settings=rt.settings, config=rt.config)


# --- health-gated rollout (chalicelib/canary.py): promote a healthy canary, roll back a bad one ---

@app.schedule(Rate(canary.TICK_MINUTES, unit=Rate.MINUTES))
def canary_tick(event: CloudWatchEvent) -> None:
    rt = get_runtime()
    canary.tick(clients=rt.clients, settings=rt.settings, config=rt.config)
