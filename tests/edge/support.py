"""Test helpers for the device agent: a real mosquitto broker, the local stack's IoT Jobs
engine speaking the AWS Jobs MQTT API over it, an HTTP artifact server with Range and
expiring URLs, and small ONNX models made with skl2onnx with the contract's metadata."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from mledge_edge.sensors import VIBRATION_FEATURES, VibrationSensor
from mledge_update import onnx_metadata as meta_keys
from mledge_update.codecs import encode_full, make_delta
from mledge_update.document import Delta, FullModel, Smoke, UpdateJob
from mledge_update.hashing import sha256_hex
from mledge_update.signing import ReleaseVerifier, Signature, release_statement

MODEL = "vibration-anomaly"


# ---------------------------------------------------------------------------- release keys

def new_release_key() -> Any:
    """A fresh ECDSA P-256 private key (the key type KMS ECC_NIST_P256 holds)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


# The test fleet's release key: devices trust its public half, releases are signed with it.
RELEASE_KEY = new_release_key()


def sign_job(job: UpdateJob, key: Any = RELEASE_KEY, key_id: str = "test-release-key") -> UpdateJob:
    """`job` signed the way packaging signs with KMS (ECDSA_SHA_256 over the statement)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    value = key.sign(release_statement(job), ec.ECDSA(hashes.SHA256()))
    return replace(job, signature=Signature(key_id=key_id, value=value))


def release_verifier(*keys: Any) -> ReleaseVerifier:
    return ReleaseVerifier([k.public_key() for k in (keys or (RELEASE_KEY,))])


def release_keys_pem(*keys: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return b"".join(k.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        for k in (keys or (RELEASE_KEY,)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


# ---------------------------------------------------------------------------- broker

@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path  # device certificate, CN = dev-1
    key: Path
    server_cert: Path
    server_key: Path


def make_tls_files(folder: Path, thing: str = "dev-1") -> TlsFiles:
    """A throwaway CA, a server certificate for localhost/127.0.0.1 and a device certificate."""
    folder.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=30)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "2", "-subj", "/CN=mledge-test-ca")
    (folder / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name, subject, ext in (("server", "/CN=localhost", ["-extfile", "san.ext"]),
                               ("device", f"/CN={thing}", [])):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", subject)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", *ext)
    return TlsFiles(folder / "ca.pem", folder / "device.pem", folder / "device.key",
                    folder / "server.pem", folder / "server.key")


@dataclass(frozen=True)
class Broker:
    port: int  # plain TCP (the IoT Core stand-in connects here)
    tls_port: int  # TLS with client certificates
    tls: TlsFiles


@contextlib.contextmanager
def run_mosquitto(tmp_path: Path, extra_conf: str, port: int | None = None) -> Iterator[int]:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).exists():
        pytest.skip("mosquitto is not installed (scripts/ensure-system-deps.sh)")
    port = port or free_port()
    tmp_path.mkdir(parents=True, exist_ok=True)
    conf = tmp_path / "mosquitto.conf"
    # `user`: mosquitto started as root would otherwise drop to "mosquitto" and could not
    # read the certificates under the test's private temp dir.
    user = pwd.getpwuid(os.getuid()).pw_name
    conf.write_text(f"user {user}\nallow_anonymous true\npersistence false\n"
                    f"listener {port} 127.0.0.1\n{extra_conf}")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def accepting() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"mosquitto exited: {proc.stderr.read().decode() if proc.stderr else ''}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
            return False

        wait_until(accepting, timeout=10)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


# ---------------------------------------------------------------------------- models

def training_rows(n: int = 300, seed: int = 3) -> np.ndarray:
    sensor = VibrationSensor(seed=seed, fault_rate=0.0, mode_dwell=50)
    return np.asarray([sensor.read().features for _ in range(n)], dtype=np.float32)


def make_kmeans_model(version: int, *, seed: int = 0, k: int = 3, features=VIBRATION_FEATURES,
                      model: str = MODEL, threshold: float | None = None,
                      rows: np.ndarray | None = None) -> bytes:
    """A k-means anomaly model in the trainer's ONNX conventions (small: < 1 KB)."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.cluster import KMeans

    x = training_rows() if rows is None else rows
    x = x[:, : len(features)] if x.shape[1] >= len(features) else np.resize(x, (x.shape[0], len(features)))
    kmeans = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(x)
    if threshold is None:
        threshold = float(np.quantile(kmeans.transform(x).min(axis=1), 0.99)) * 1.5
    onx = convert_sklearn(kmeans, initial_types=[("input", FloatTensorType([None, len(features)]))],
                          target_opset=17)
    _set_metadata(onx, model, version, "kmeans_anomaly", list(features),
                  {"mledge.anomaly_threshold": repr(threshold)})
    return onx.SerializeToString()


def make_classifier_model(version: int, n_features: int = 64, seed: int = 0, model: str = "digits") -> bytes:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    data = load_digits()
    clf = LogisticRegression(max_iter=300, random_state=seed).fit(data.data[:600], data.target[:600])
    onx = convert_sklearn(clf, initial_types=[("input", FloatTensorType([None, n_features]))],
                          options={id(clf): {"zipmap": False}}, target_opset=17)
    for node in onx.graph.node:
        node.output[:] = ["scores" if o == "probabilities" else o for o in node.output]
    for output in onx.graph.output:
        if output.name == "probabilities":
            output.name = "scores"
    _set_metadata(onx, model, version, "classifier", [f"px{i}" for i in range(n_features)], {})
    return onx.SerializeToString()


def _set_metadata(onx: onnx.ModelProto, model: str, version: int, family: str,
                  features: list[str], extra: dict[str, str]) -> None:
    props = {meta_keys.MODEL: model, meta_keys.VERSION: str(version), meta_keys.FAMILY: family,
             meta_keys.FEATURES: json.dumps(features), **extra}
    del onx.metadata_props[:]
    for key, value in props.items():
        entry = onx.metadata_props.add()
        entry.key, entry.value = key, value


def golden(model_bytes: bytes, rows: np.ndarray, tolerance: float = 1e-4) -> Smoke:
    import onnxruntime as ort

    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    label, scores = session.run(["label", "scores"], {"input": rows.astype(np.float32)})
    return Smoke(input_name="input", inputs=rows.astype(float).tolist(),
                 outputs={"label": label.tolist(), "scores": scores.tolist()}, tolerance=tolerance)


# ---------------------------------------------------------------------------- artifacts over HTTP

class ArtifactServer:
    """Serves blobs on loopback with Range support. URLs carry an expiry (`?exp=`); an
    expired one gets 403 like an expired presigned S3 URL. `throttle` slows responses."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.requests: list[dict[str, Any]] = []
        self.fail_next: dict[str, int] = {}  # name -> number of requests to cut off mid-body
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                return None

            def do_GET(self) -> None:
                parsed = urllib.parse.urlparse(self.path)
                name = parsed.path.lstrip("/")
                query = urllib.parse.parse_qs(parsed.query)
                expires = float(query.get("exp", ["inf"])[0])
                range_header = self.headers.get("Range")
                with server.lock:
                    server.requests.append({"name": name, "range": range_header, "expired": time.time() > expires})
                    cut = server.fail_next.get(name, 0) if time.time() <= expires else 0
                    if cut:
                        server.fail_next[name] = cut - 1
                if time.time() > expires:
                    self.send_error(403, "Request has expired")
                    return
                blob = server.blobs.get(name)
                if blob is None:
                    self.send_error(404)
                    return
                start = 0
                if range_header and range_header.startswith("bytes="):
                    start = int(range_header[6:].split("-")[0])
                    if start >= len(blob):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(blob) - 1}/{len(blob)}")
                else:
                    self.send_response(200)
                body = blob[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if cut:  # send half, then drop the connection
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ArtifactServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def add(self, name: str, data: bytes) -> None:
        self.blobs[name] = data

    def url(self, name: str, ttl: float = 3600.0) -> str:
        return f"http://127.0.0.1:{self.port}/{name}?exp={time.time() + ttl:.3f}"

    def requests_for(self, name: str) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.requests if r["name"] == name]


# ---------------------------------------------------------------------------- releases

@dataclass
class Release:
    version: int
    model: bytes
    job: UpdateJob  # urls filled per delivery by `document()`
    names: dict[str, str] = field(default_factory=dict)  # artifact sha256 -> served name


def make_release(server: ArtifactServer, version: int, model_bytes: bytes,
                 bases: list[tuple[int, bytes]] = (), *, encoding: str = "zstd",
                 smoke: Smoke | None = None, rollback: bool = False,
                 uplink: dict[str, Any] | None = None, corrupt_delta: bool = False,
                 schema_features=VIBRATION_FEATURES, model: str = MODEL,
                 codec: str = "bsdiff4", rollback_from: int | None = None) -> Release:
    """Put a release's artifacts on the server and return its UpdateJob."""
    names: dict[str, str] = {}
    full_blob = encode_full(encoding, model_bytes)
    full_name = f"v{version}/model.onnx.{encoding}"
    server.add(full_name, full_blob)
    names[sha256_hex(full_blob)] = full_name
    deltas = []
    for base_version, base_bytes in bases:
        delta = make_delta(codec, base_bytes, model_bytes)
        digest = sha256_hex(delta)  # the document's hash of the intended delta
        if corrupt_delta:
            # A delta the server diffed against another base: hash matches the bytes,
            # but patching yields a model with the wrong hash (the Mender failure mode).
            delta = make_delta(codec, base_bytes + b"\0", model_bytes + b"garbage")
            digest = sha256_hex(delta)
        name = f"v{version}/from-v{base_version}.{codec}"
        server.add(name, delta)
        names[digest] = name
        deltas.append(Delta(from_version=base_version, from_sha256=sha256_hex(base_bytes),
                            codec=codec, size=len(delta), sha256=digest, url="placeholder"))
    if smoke is None:
        smoke = golden(model_bytes, training_rows(5, seed=11))
    job = UpdateJob(
        model=model, version=version, model_sha256=sha256_hex(model_bytes), model_size=len(model_bytes),
        full=FullModel(encoding=encoding, size=len(full_blob), sha256=sha256_hex(full_blob), url="placeholder"),
        deltas=tuple(deltas), smoke=smoke,
        schema={"features": list(schema_features), "label": "none"},
        uplink=uplink or {"before_model": "all", "anomalies": True, "sample_rate": 0.0,
                          "summary_interval_seconds": 3600},
        rollback=rollback, rollback_from=rollback_from,
    )
    return Release(version, model_bytes, job, names)


def document_for(server: ArtifactServer, release: Release, ttl: float = 3600.0,
                 *, signed_with: Any = RELEASE_KEY) -> dict[str, Any]:
    """The job document with freshly 'presigned' URLs (what IoT does per delivery),
    signed with `signed_with` (None: unsigned)."""
    job = release.job if signed_with is None else sign_job(release.job, signed_with)
    doc = job.to_document()
    doc["full"]["url"] = server.url(release.names[doc["full"]["sha256"]], ttl)
    for delta in doc["deltas"]:
        delta["url"] = server.url(release.names[delta["sha256"]], ttl)
    return doc


# ---------------------------------------------------------------------------- IoT Jobs

ARTIFACT_BUCKET = "artifacts"


def presigned_placeholder(name: str) -> str:
    """What packaging puts in a job document: IoT presigns the object at each delivery."""
    return f"${{aws:iot:s3-presigned-url:https://{ARTIFACT_BUCKET}.s3.us-east-1.amazonaws.com/{name}}}"


def job_template(release: Release) -> dict[str, Any]:
    """The job document as stored in the IoT Job: URLs as presigned-URL placeholders,
    signed with the test fleet's release key (as packaging signs with KMS)."""
    doc = sign_job(release.job).to_document()
    doc["full"]["url"] = presigned_placeholder(release.names[doc["full"]["sha256"]])
    for delta in doc["deltas"]:
        delta["url"] = presigned_placeholder(release.names[delta["sha256"]])
    return doc


@dataclass(frozen=True)
class ExecutionView:
    """One execution as the test sees it, with the updates the service accepted."""

    status: str
    status_details: dict[str, str]
    history: list[tuple[str, dict[str, str]]]


class IotJobsOnBroker:
    """IoT Core's side of the Jobs MQTT API over the broker: the local stack's `JobsEngine`
    on an in-process moto IoT backend (the one IoT Jobs fake), presigning into the
    artifact server; it also records what the device published."""

    def __init__(self, port: int, artifacts: ArtifactServer) -> None:
        from awscrt import io, mqtt
        from mledge_devstack.jobs import REQUEST_FILTERS, JobsEngine
        from mledge_update.topics import TELEMETRY_FILTER
        from moto.iot.models import IoTBackend

        self.mqtt = mqtt
        self.backend = IoTBackend("us-east-1", "123456789012")
        self.engine = JobsEngine(self.backend,
                                 lambda bucket, key, expires: artifacts.url(key, expires))
        self.telemetry: list[tuple[str, dict[str, Any]]] = []
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self._history: dict[tuple[str, str], list[tuple[str, dict[str, str]]]] = {}
        self.lock = threading.Lock()
        self.connection = mqtt.Connection(
            client=mqtt.Client(io.ClientBootstrap.get_or_create_static_default(), None),
            host_name="127.0.0.1", port=port, client_id=f"iot-core-{port}", clean_session=True,
        )
        self.connection.connect().result(timeout=10)
        for topic in (*REQUEST_FILTERS, TELEMETRY_FILTER):
            future, _ = self.connection.subscribe(topic, mqtt.QoS.AT_LEAST_ONCE, self._on_message)
            future.result(timeout=10)

    def close(self) -> None:
        self.connection.disconnect().result(timeout=10)

    def add_job(self, thing: str, job_id: str, release: Release,
                extra: dict[str, Any] | None = None) -> None:
        """Create an IoT Job for one thing releasing `release` (notify-next if it is next);
        `extra` adds document fields (e.g. a canary's `health`)."""
        if thing not in {t.thing_name for t in self.backend.things.values()}:
            self.backend.create_thing(thing, None, {})
        self.backend.create_job(
            job_id=job_id, targets=[self.backend.describe_thing(thing).arn], document_source="",
            document=json.dumps({**job_template(release), **(extra or {})}), description="",
            presigned_url_config={"expiresInSec": 3600}, target_selection="SNAPSHOT",
            job_executions_rollout_config={}, document_parameters={}, abort_config={},
            job_execution_retry_config={}, scheduling_config={}, timeout_config={})
        self._publish_all(self.engine.sync())

    def execution(self, thing: str, job_id: str) -> ExecutionView:
        ex = self.backend.job_executions[(job_id, thing)]
        with self.lock:
            history = list(self._history.get((thing, job_id), []))
        return ExecutionView(ex.status, dict(ex.status_details_map), history)

    def wait_for_terminal(self, thing: str, job_id: str, timeout: float = 20.0) -> ExecutionView:
        from mledge_devstack.jobs import TERMINAL

        return wait_until(lambda: (e := self.execution(thing, job_id)).status in TERMINAL and e,
                          timeout)

    def _publish_all(self, messages: list[Any]) -> None:
        for message in messages:
            self.connection.publish(message.topic, json.dumps(message.payload).encode(),
                                    self.mqtt.QoS.AT_LEAST_ONCE)

    def _on_message(self, topic: str, payload: bytes, **kwargs: Any) -> None:
        from mledge_update.topics import parse_telemetry_topic

        body = json.loads(payload or b"{}")
        if parse_telemetry_topic(topic) is not None:
            with self.lock:
                self.telemetry.append((topic, body))
            return
        with self.lock:
            self.requests.append((topic, body))
        replies = self.engine.handle(topic, payload)
        accepted = any(r.topic == f"{topic}/accepted" for r in replies)
        parts = topic.split("/")
        if accepted and parts[-1] == "update":
            with self.lock:
                self._history.setdefault((parts[2], parts[4]), []).append(
                    (body["status"], dict(body.get("statusDetails") or {})))
        self._publish_all(replies)
