"""The local "cloud" process: moto server for the AWS APIs + the IoT Core bridge.

`python -m mledge_devstack.cloud --port P --mqtt-port M --certs DIR --ready-file F`

Why moto and the bridge share one process: the bridge's Jobs engine works on
moto's IoT backend objects directly, so job executions it creates (thing-group
expansion) and updates (device reports) are what the IoT API returns to every
client (`list_job_executions_for_job`, `describe_job`, cancel calls). moto runs
as a `ThreadedMotoServer` in this process; the process, not the stack owner,
holds moto's global state, so tests that use moto in-process (`mock_aws`,
which resets every backend) cannot disturb it, and stopping the process
frees everything.
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import signal
import threading
import time
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from mledge_devstack.certs import ClientCredentials
from mledge_devstack.jobs import REQUEST_FILTERS, JobsEngine, Outgoing
from mledge_devstack.mqtt import MqttClient, MqttError
from mledge_devstack.topic_rule import RULE_FILTER, TelemetryForwarder

log = logging.getLogger("mledge_devstack.cloud")

ACCOUNT_ID = "123456789012"
SYNC_INTERVAL = 1.0


class JobsPump:
    """Feeds device requests and a 1 s sync tick to the engine; publishes what it returns."""

    def __init__(self, engine: JobsEngine, mqtt: MqttClient) -> None:
        self.engine = engine
        self.mqtt = mqtt
        self.requests: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="jobs", daemon=True)

    def start(self) -> JobsPump:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.requests.put(None)
        self._thread.join(5)

    def on_request(self, topic: str, payload: bytes) -> None:
        self.requests.put((topic, payload))  # never block awscrt's event-loop thread

    def _publish(self, messages: list[Outgoing]) -> None:
        for message in messages:
            try:
                self.mqtt.publish(message.topic, message.payload)
            except MqttError as exc:
                log.error("jobs: cannot publish %s: %s", message.topic, exc)

    def _run(self) -> None:
        next_sync = 0.0
        item: tuple[str, bytes] | tuple[()] | None
        while True:
            try:
                item = self.requests.get(timeout=max(0.0, next_sync - time.monotonic()))
            except queue.Empty:
                item = ()
            if item is None:
                return
            try:
                if item:
                    topic, payload = item
                    self._publish(self.engine.handle(topic, payload))
                if time.monotonic() >= next_sync:
                    self._publish(self.engine.sync())
                    next_sync = time.monotonic() + SYNC_INTERVAL
            except Exception:  # one bad request must not stop the Jobs API
                log.exception("jobs: failed on %s", item[0] if item else "sync")


def _connect_bridge(credentials: ClientCredentials, port: int, timeout: float) -> MqttClient:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return MqttClient(credentials, port=port).connect(timeout=5)
        except MqttError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def run(args: argparse.Namespace) -> None:
    from moto.iot.models import iot_backends
    from moto.server import ThreadedMotoServer

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=args.port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{args.port}"
    log.info("moto server on %s", endpoint)

    session = boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing",
                                    region_name=args.region)
    s3 = session.client("s3", endpoint_url=endpoint,
                        config=Config(s3={"addressing_style": "path"}, signature_version="s3v4"))
    sqs = session.client("sqs", endpoint_url=endpoint)

    def presign(bucket: str, key: str, expires_in: int) -> str:
        return str(s3.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires_in))

    certs = Path(args.certs)
    credentials = ClientCredentials(args.client_name, certs / "clients" / f"{args.client_name}.pem",
                                    certs / "clients" / f"{args.client_name}.key",
                                    certs / "ca.pem")
    mqtt = _connect_bridge(credentials, args.mqtt_port, timeout=30)
    engine = JobsEngine(iot_backends[ACCOUNT_ID][args.region], presign)
    pump = JobsPump(engine, mqtt).start()
    forwarder = TelemetryForwarder(sqs, args.telemetry_queue).start()
    mqtt.subscribe(RULE_FILTER, forwarder.on_message)
    for topic_filter in REQUEST_FILTERS:
        mqtt.subscribe(topic_filter, pump.on_request)
    log.info("bridge connected to mosquitto on port %d", args.mqtt_port)

    ready: dict[str, Any] = {"endpoint": endpoint, "pid_started": time.time()}
    Path(args.ready_file).write_text(json.dumps(ready))
    stop.wait()
    log.info("stopping")
    mqtt.disconnect()
    pump.stop()
    forwarder.stop()
    server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="moto server port (127.0.0.1)")
    parser.add_argument("--mqtt-port", type=int, required=True, help="mosquitto TLS port")
    parser.add_argument("--certs", required=True, help="the local CA's directory")
    parser.add_argument("--client-name", default="mledge-bridge")
    parser.add_argument("--region", default="us-east-1")
    parser.add_argument("--telemetry-queue", required=True)
    parser.add_argument("--ready-file", required=True)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    run(args)


if __name__ == "__main__":
    main()
