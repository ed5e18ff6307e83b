"""The MQTT link: awscrt/awsiotsdk connections with bounded waits.

- AWS IoT Core (and a TLS broker with client certs): `mqtt_connection_builder.mtls_from_path`.
- A broker with server-only TLS: the same builder path with a CA and no client cert.
- A local broker without TLS (`insecure_no_tls`): a plain-TCP awscrt connection.

The client id is always the thing name. SDK callbacks run on awscrt's event-loop
thread: the handlers registered here must only hand work off (queue, Event).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from awscrt import io, mqtt
from awsiot import mqtt_connection_builder

log = logging.getLogger(__name__)

MessageCallback = Callable[[str, bytes], None]


class MqttError(Exception):
    """Connecting, subscribing or disconnecting failed or timed out."""


@dataclass(frozen=True)
class LinkSettings:
    endpoint: str
    port: int
    client_id: str
    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    tls: bool = True
    keep_alive_s: int = 30
    timeout_s: float = 10.0
    reconnect_min_s: int = 1
    reconnect_max_s: int = 30


class MqttLink:
    def __init__(
        self,
        settings: LinkSettings,
        on_resumed: Callable[[bool], None] | None = None,
        on_interrupted: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self._on_resumed = on_resumed
        self._on_interrupted = on_interrupted
        self.connected = threading.Event()
        self.connection = self._build()

    def _build(self) -> mqtt.Connection:
        s = self.settings
        common = dict(
            client_id=s.client_id,
            clean_session=False,  # keep subscriptions and queued QoS1 messages across drops
            keep_alive_secs=s.keep_alive_s,
            on_connection_interrupted=self._interrupted,
            on_connection_resumed=self._resumed,
            reconnect_min_timeout_secs=s.reconnect_min_s,
            reconnect_max_timeout_secs=s.reconnect_max_s,
        )
        if s.tls and s.cert and s.key:
            return mqtt_connection_builder.mtls_from_path(
                endpoint=s.endpoint, port=s.port, cert_filepath=s.cert, pri_key_filepath=s.key,
                ca_filepath=s.ca, **common,
            )
        bootstrap = io.ClientBootstrap.get_or_create_static_default()
        tls_ctx = None
        if s.tls:
            options = io.TlsContextOptions()
            if s.ca:
                options.override_default_trust_store_from_path(None, s.ca)
            tls_ctx = io.ClientTlsContext(options)
        socket_options = io.SocketOptions()
        socket_options.connect_timeout_ms = int(s.timeout_s * 1000)
        return mqtt.Connection(
            client=mqtt.Client(bootstrap, tls_ctx),
            host_name=s.endpoint,
            port=s.port,
            socket_options=socket_options,
            **common,
        )

    # SDK callbacks: no blocking work here.
    def _interrupted(self, connection, error, **kwargs) -> None:
        self.connected.clear()
        log.warning("MQTT connection interrupted: %s", error)
        if self._on_interrupted:
            self._on_interrupted(str(error))

    def _resumed(self, connection, return_code, session_present, **kwargs) -> None:
        self.connected.set()
        log.info("MQTT connection resumed (session present: %s)", session_present)
        if self._on_resumed:
            self._on_resumed(bool(session_present))

    def connect(self) -> bool:
        """Connect; returns whether the broker kept our session."""
        try:
            result = self.connection.connect().result(timeout=self.settings.timeout_s)
        except FutureTimeout as exc:
            raise MqttError(f"connect to {self.settings.endpoint}:{self.settings.port} timed out") from exc
        except Exception as exc:
            raise MqttError(f"connect to {self.settings.endpoint}:{self.settings.port} failed: {exc}") from exc
        self.connected.set()
        return bool(result.get("session_present", False))

    def subscribe(self, topic: str, callback: MessageCallback) -> None:
        def on_message(topic: str, payload: bytes, **kwargs) -> None:
            callback(topic, payload)

        future, _ = self.connection.subscribe(topic, mqtt.QoS.AT_LEAST_ONCE, on_message)
        try:
            result = future.result(timeout=self.settings.timeout_s)
        except FutureTimeout as exc:
            raise MqttError(f"subscribe {topic} timed out") from exc
        if result.get("qos") is None:
            raise MqttError(f"subscribe {topic} was refused by the broker")

    def resubscribe(self) -> None:
        future, _ = self.connection.resubscribe_existing_topics()
        if future is not None:
            try:
                future.result(timeout=self.settings.timeout_s)
            except FutureTimeout as exc:
                raise MqttError("resubscribe timed out") from exc

    def publish(self, topic: str, payload: bytes, qos: mqtt.QoS = mqtt.QoS.AT_LEAST_ONCE) -> None:
        """Queue a message (never waits: QoS1 messages are retried by the SDK)."""
        self.connection.publish(topic, payload, qos)

    def disconnect(self) -> None:
        try:
            self.connection.disconnect().result(timeout=self.settings.timeout_s)
        except Exception as exc:  # shutting down: report, do not raise
            log.warning("MQTT disconnect: %s", exc)
        self.connected.clear()
