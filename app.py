"""MLEdgeDeploy's Lambda handlers: wiring only. Each handler calls one chalicelib function."""

from __future__ import annotations

import os

from chalice import Chalice
from chalice.app import CloudWatchEvent, SQSEvent

from chalicelib import ingest, packaging
from chalicelib.runtime import get_runtime

app = Chalice(app_name="mledgedeploy")

# Read at import time: the decorator needs the queue name when chalice packages the app
# (tests/conftest.py sets it before importing app; .chalice/config.json per stage).
TELEMETRY_QUEUE = os.environ.get("MLEDGE_TELEMETRY_QUEUE", "mledge-dev-telemetry")


@app.on_sqs_message(queue=TELEMETRY_QUEUE, batch_size=ingest.INGEST_BATCH_SIZE,
                    maximum_batching_window_in_seconds=ingest.INGEST_BATCHING_WINDOW_SECONDS)
def ingest_telemetry(event: SQSEvent) -> None:
    rt = get_runtime()
    ingest.ingest_sqs_event(event.to_dict(), clients=rt.clients, settings=rt.settings,
                            config=rt.config)


EVENT_SOURCE = os.environ.get("MLEDGE_EVENT_SOURCE", "mledge.pipeline")


@app.on_cw_event({"source": [EVENT_SOURCE], "detail-type": ["ModelApproved"]})
def release_approved_model(event: CloudWatchEvent) -> dict:
    rt = get_runtime()
    return packaging.handle_model_approved(event.detail, clients=rt.clients,
                                           settings=rt.settings, config=rt.config).to_dict()
