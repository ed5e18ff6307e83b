"""A small MQTT client over the device SDK (awscrt), used by the bridge, the tests and the demo.

Using awscrt here (not another MQTT library) means the broker, its TLS setup
and its certificates are exercised by the same client stack the devices use.
Callbacks run on awscrt's event-loop thread: keep them short (hand work to a
queue), never block them on another MQTT round trip.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from awscrt import io, mqtt
from awsiot import mqtt_connection_builder

from mledge_devstack.certs import ClientCredentials

log = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes], None]


class MqttError(Exception):
    """Connecting, subscribing or publishing failed."""


class MqttClient:
    """One MQTT 3.1.1 connection with a client certificate; client id = credentials.name.

    With clean sessions the broker forgets subscriptions when the connection
    drops (a broker restart): awscrt reconnects on its own, and on resume this
    client subscribes again to everything it had, and logs it.
    `client_id` other than the certificate's name exists only to test the
    broker's refusal of impersonation.
    """

    def __init__(self, credentials: ClientCredentials, *, host: str = "localhost", port: int,
                 keep_alive_secs: int = 30, client_id: str | None = None) -> None:
        self.credentials = credentials
        self.host, self.port = host, port
        self.connected = False
        self.resumed = 0  # reconnections after an interruption
        self._connection: mqtt.Connection = mqtt_connection_builder.mtls_from_path(
            endpoint=host, port=port,
            cert_filepath=str(credentials.cert_path),
            pri_key_filepath=str(credentials.key_path),
            ca_filepath=str(credentials.ca_path),
            client_id=client_id or credentials.name,
            clean_session=True,
            keep_alive_secs=keep_alive_secs,
            enable_metrics_collection=False,
            on_connection_interrupted=self._interrupted,
            on_connection_resumed=self._resumed,
            reconnect_min_timeout_secs=1,
            reconnect_max_timeout_secs=5,
            client_bootstrap=io.ClientBootstrap.get_or_create_static_default(),
        )

    @property
    def name(self) -> str:
        return self.credentials.name

    # awscrt event-loop callbacks: log and hand off, never wait on the connection here.
    def _interrupted(self, connection: mqtt.Connection, error: Exception, **_: Any) -> None:
        log.warning("%s: MQTT connection lost: %s", self.name, error)

    def _resumed(self, connection: mqtt.Connection, return_code: Any, session_present: bool,
                 **_: Any) -> None:
        self.resumed += 1
        if session_present:
            log.info("%s: MQTT connection resumed with its session", self.name)
            return
        future, _packet = connection.resubscribe_existing_topics()

        def done(result: Any) -> None:
            try:
                topics = result.result().get("topics", [])
                log.info("%s: MQTT connection resumed; resubscribed to %d topic filter(s)",
                         self.name, len(topics))
            except Exception as exc:
                log.error("%s: MQTT connection resumed but resubscribing failed: %s",
                          self.name, exc)

        if future is None:
            log.info("%s: MQTT connection resumed; resubscribed to 0 topic filter(s)", self.name)
        else:
            future.add_done_callback(done)

    def connect(self, timeout: float = 10.0) -> MqttClient:
        if self.connected:
            return self
        try:
            self._connection.connect().result(timeout)
        except (FutureTimeout, Exception) as exc:
            raise MqttError(f"{self.name}: cannot connect to {self.host}:{self.port}: {exc}") from exc
        self.connected = True
        return self

    def disconnect(self, timeout: float = 5.0) -> None:
        self.connected = False
        try:
            self._connection.disconnect().result(timeout)
        except Exception as exc:  # already gone: nothing to release
            log.debug("%s: disconnect: %s", self.name, exc)

    def subscribe(self, topic: str, handler: MessageHandler, *, qos: int = 1,
                  timeout: float = 10.0) -> bool:
        """Subscribe; False when the broker refused the subscription (SUBACK failure)."""

        def on_message(topic: str, payload: bytes, **_: Any) -> None:
            try:
                handler(topic, payload)
            except Exception:  # a handler bug must not kill the event loop thread
                log.exception("%s: handler for %s failed", self.name, topic)

        future, _packet = self._connection.subscribe(topic, mqtt.QoS(qos), on_message)
        try:
            result = future.result(timeout)
        except Exception as exc:
            raise MqttError(f"{self.name}: subscribe {topic}: {exc}") from exc
        return result.get("qos") is not None

    def publish(self, topic: str, payload: bytes | str | dict[str, Any], *, qos: int = 1,
                timeout: float = 10.0) -> None:
        if isinstance(payload, dict):
            payload = json.dumps(payload, separators=(",", ":"))
        if isinstance(payload, str):
            payload = payload.encode()
        future, _packet = self._connection.publish(topic, payload, mqtt.QoS(qos))
        try:
            future.result(timeout)
        except Exception as exc:
            raise MqttError(f"{self.name}: publish {topic}: {exc}") from exc

    def __enter__(self) -> MqttClient:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.disconnect()
