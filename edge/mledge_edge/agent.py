"""The device agent: MQTT link, IoT Jobs updates, telemetry with the uplink policy, stats.

A host application may run the agent and use `agent.handle.predict(...)` itself;
the handle always serves the newest installed model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

from mledge_update import JobDocumentError, SignatureError
from mledge_update.document import OPERATION, HealthProbe, parse_job_document
from mledge_update.signing import ReleaseVerifier
from mledge_update.topics import telemetry_topic
from mledge_update.uplink import INCLUSION_FIELD, REASON_FIELD, SUMMARY

from .config import AgentConfig, ConfigError
from .download import Downloader
from .jobs import IN_PROGRESS, JobCanceledError, JobExecution, JobsClient, JobsRequestTimeoutError
from .model import LoadedModel, ModelHandle, ModelLoadError, Prediction
from .mqtt import LinkSettings, MqttLink
from .sensors import DigitsSource, Reading, VibrationSensor, make_source
from .store import CrashHook, InstalledModel, ModelStore, atomic_write_json
from .updater import REJECTED, SUCCEEDED, UpdateError, Updater, status_details
from .uplink import UplinkCounter, UplinkDecider, UplinkPolicy

log = logging.getLogger(__name__)

CRASH_ENV = "MLEDGE_EDGE_CRASH_AT"
CRASH_EXIT_CODE = 86


def crash_hook_from_env() -> CrashHook:
    """Test hook: MLEDGE_EDGE_CRASH_AT=<step> kills the process (no cleanup, like a power cut)."""
    target = os.environ.get(CRASH_ENV, "")

    def hook(step: str) -> None:
        if step == target:
            log.error("crash injected at %s", step)
            logging.shutdown()
            os._exit(CRASH_EXIT_CODE)

    return hook


def release_verifier(config: AgentConfig) -> ReleaseVerifier | None:
    """The trusted release keys; None only when unsigned releases are explicitly allowed."""
    if not config.release_keys:
        log.warning("unsigned releases are accepted (allow_unsigned_releases): development only")
        return None
    try:
        return ReleaseVerifier.from_pem(Path(config.release_keys).read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read release_keys {config.release_keys}: {exc}") from exc
    except SignatureError as exc:
        raise ConfigError(f"release_keys {config.release_keys}: {exc}") from exc


def _health_probe(document: dict[str, Any]) -> HealthProbe | None:
    try:
        return parse_job_document(document).health
    except JobDocumentError:
        return None


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        *,
        source: VibrationSensor | DigitsSource | None = None,
        crash_hook: CrashHook | None = None,
    ) -> None:
        self.config = config.validate()
        self.thing = config.thing
        self.model_name = config.model
        self.store = ModelStore(config.state_dir, crash_hook or crash_hook_from_env())
        self.stats_path = self.store.root / "stats.json"
        self.handle = ModelHandle()
        if source is None and config.sensor != "none":
            source = make_source(config.sensor, config.effective_seed, config.fault_rate)
        self.source = source
        features = getattr(source, "feature_names", None)
        self.downloader = Downloader(
            self.store.downloads_dir, retries=config.download_retries, timeout_s=config.download_timeout
        )
        self.updater = Updater(
            self.store, self.handle, self.downloader,
            model_name=config.model, verifier=release_verifier(config),
            expected_features=features,
            session_threads=config.session_threads, on_installed=self._installed,
        )
        self.link = MqttLink(
            LinkSettings(
                endpoint=config.endpoint, port=config.port, client_id=config.thing,
                cert=config.cert, key=config.key, ca=config.ca, tls=not config.insecure_no_tls,
                timeout_s=config.request_timeout,
            ),
            on_resumed=self._resumed,
        )
        self.jobs = JobsClient(
            self.link, config.thing, self._handle_execution,
            request_timeout_s=config.request_timeout, before_start_next=self._report_pending,
            on_idle=self._idle,
        )
        self.counter = UplinkCounter()
        self._policy = UplinkPolicy()
        self._decider = UplinkDecider(self._policy, config.effective_seed)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._stats_lock = threading.Lock()
        self._started_at = time.time()
        self._seq = 0
        self._boot = f"{int(self._started_at * 1000) % 10**10:x}"
        self._totals = {"readings": 0, "predictions": 0, "anomalies": 0}
        # Microseconds the last reading's inference took (None without a model): what one
        # prediction costs on this device, for the host application and the demo.
        self.last_inference_us: int | None = None
        self._updates = {"succeeded": 0, "failed": 0, "rejected": 0}
        self._last_job: dict[str, Any] | None = None
        self._health: dict[str, dict[str, str]] = {}  # job id -> health figures to report
        self._window = self._new_window()
        self._next_summary = time.monotonic() + self._policy.summary_interval_seconds

    # -- lifecycle ---------------------------------------------------------------
    def load_installed(self) -> InstalledModel | None:
        """Serve the installed model (hash-verified; falls back to the previous one)."""
        while True:
            record = self.store.recover()
            if record is None:
                return None
            try:
                self.handle.swap(LoadedModel(self.store.path_of(record), record.sha256,
                                             threads=self.config.session_threads))
            except ModelLoadError as exc:
                log.error("installed model v%s does not load (%s); removing it", record.version, exc)
                with contextlib.suppress(FileNotFoundError):
                    self.store.path_of(record).unlink()
                continue  # recover() now falls back to the previous model
            self._installed(record)
            log.info("serving %s v%s (%s)", record.model, record.version, record.sha256[:12])
            return record

    def start(self) -> None:
        self.load_installed()
        self.link.connect()
        self.jobs.start()
        self._spawn(self._stats_loop, "stats")
        if self.source is not None and self.config.rate > 0:
            self._spawn(self._telemetry_loop, "telemetry")
        log.info("agent %s started (model %s, state %s)", self.thing, self.model_name, self.store.root)

    def stop(self) -> None:
        self._stop.set()
        self.jobs.stop()
        for thread in self._threads:
            thread.join(timeout=10)
        self.write_stats()
        self.link.disconnect()
        log.info("agent stopped: %s", json.dumps(self.stats()["uplink"]))

    def run(self, duration: float | None = None) -> None:
        self.start()
        try:
            self._stop.wait(duration)
        finally:
            self.stop()

    def _spawn(self, target, name: str) -> None:
        thread = threading.Thread(target=target, name=f"{name}-{self.thing}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _resumed(self, session_present: bool) -> None:
        self.jobs.connection_resumed(session_present)  # queues work; returns at once

    def _installed(self, record: InstalledModel) -> None:
        policy = UplinkPolicy.from_document(record.uplink)
        with self._stats_lock:
            self._policy = policy
            self._decider = UplinkDecider(policy, self.config.effective_seed + record.version)
            self._next_summary = time.monotonic() + policy.summary_interval_seconds
            self._window = self._new_window()  # summaries describe one model's readings

    # -- jobs --------------------------------------------------------------------
    def _report_pending(self, jobs: JobsClient) -> None:
        pending = self.store.state.pending_report
        if pending is None:
            return
        details = {**pending.details, **self._health.get(pending.job_id, {})}
        try:
            reply = jobs.update(pending.job_id, SUCCEEDED, details)
        except JobCanceledError as exc:
            log.warning("pending report for %s dropped: %s", pending.job_id, exc)
            self.store.clear_pending(pending.job_id)
            return
        if reply.accepted:
            log.info("reported job %s SUCCEEDED (installed before a restart)", pending.job_id)
            self.store.clear_pending(pending.job_id)
            self._health.pop(pending.job_id, None)
            self.store.crash_hook("after_report")

    def _idle(self) -> None:
        """No job is pending: nothing will resume a partial download (its job was canceled)."""
        self.downloader.discard_others()

    def _handle_execution(self, jobs: JobsClient, execution: JobExecution) -> None:
        job_id = execution.job_id
        document = execution.document
        version = document.get("version")
        if document.get("operation") != OPERATION:
            self._finish(jobs, job_id, REJECTED, status_details(
                stage="check", reason=f"unsupported operation {document.get('operation')!r}"))
            return
        pending = self.store.state.pending_report
        if pending is not None and pending.job_id == job_id:
            self._report_pending(jobs)
            return

        def report(details: dict[str, str]) -> None:
            try:
                jobs.update(job_id, IN_PROGRESS, details)
            except JobsRequestTimeoutError as exc:  # progress is best effort
                log.warning("progress report for %s: %s", job_id, exc)

        def refresh_document() -> dict[str, Any] | None:
            fresh = jobs.get(job_id)
            return fresh.document if fresh is not None else None

        log.info("job %s: update %s to v%s", job_id, document.get("model"), version)
        try:
            report(status_details(stage="accepted", version=version))
            result = self.updater.run(job_id, document, report, refresh_document)
        except JobCanceledError as exc:
            log.warning("job %s canceled while running: %s", job_id, exc)
            self._record_job(job_id, "CANCELED", str(exc))
            return
        except UpdateError as exc:
            log.warning("job %s %s: %s", job_id, exc.status, exc)
            self._finish(jobs, job_id, exc.status,
                         status_details(stage=exc.stage, version=version, reason=exc.reason))
            return
        except Exception as exc:  # an agent bug must not kill the jobs worker
            log.exception("job %s: unexpected error", job_id)
            self._finish(jobs, job_id, "FAILED",
                         status_details(stage="internal", version=version, reason=repr(exc)))
            return
        self._record_job(job_id, SUCCEEDED, result.codec)
        probe = _health_probe(document)
        if probe is not None and result.codec != "already-installed":
            report(status_details(stage="health", version=version))
            self._health[job_id] = self.measure_health(probe)
        pending = self.store.state.pending_report
        if pending is None or pending.job_id != job_id:
            # Nothing was installed (another job brought this model already, e.g. a canary
            # job before the fleet's): there is no pending report, so report now.
            try:
                jobs.update(job_id, SUCCEEDED, result.details)
            except JobCanceledError as exc:
                log.warning("could not report SUCCEEDED for %s: %s", job_id, exc)
            return
        self._report_pending(jobs)  # SUCCEEDED only now: installed, swapped, persisted

    def _finish(self, jobs: JobsClient, job_id: str, status: str, details: dict[str, str]) -> None:
        self._record_job(job_id, status, details.get("reason", ""))
        try:
            reply = jobs.update(job_id, status, details)
        except JobCanceledError as exc:
            log.warning("could not report %s for %s: %s", status, job_id, exc)
            return
        if not reply.accepted:
            # update() already retried with sanitized and with no statusDetails; the job's
            # step and in-progress timeouts end the execution if IoT Jobs never takes it.
            log.error("IoT Jobs refused %s for %s: %s %s", status, job_id, reply.code,
                      reply.message)

    def _record_job(self, job_id: str, status: str, detail: str) -> None:
        with self._stats_lock:
            key = {"SUCCEEDED": "succeeded", "FAILED": "failed", "REJECTED": "rejected"}.get(status)
            if key:
                self._updates[key] += 1
            self._last_job = {"job_id": job_id, "status": status, "detail": detail[:300],
                              "at": time.time()}

    def measure_health(self, probe: HealthProbe) -> dict[str, str]:
        """Run `probe.readings` fresh sensor readings through the serving model: the
        share that fail (an exception or a non-finite score), the share flagged as
        anomalies and the p95 latency. A canary release goes on only when these are
        within the model's limits (chalicelib/canary.py)."""
        model = self.handle.current
        if model is None or self.config.sensor == "none":
            return status_details(health_readings=0)
        info = self.handle.info
        source = make_source(self.config.sensor, self.config.effective_seed + 7919
                             * (info.version if info else 0), self.config.fault_rate)
        errors = anomalies = 0
        latencies: list[float] = []
        for _ in range(probe.readings):
            reading = source.read()
            started = time.perf_counter()
            try:
                prediction = model.predict(reading.features)
            except Exception as exc:  # what the canary must catch, whatever it is
                errors += 1
                log.debug("health probe: inference failed: %s", exc)
                continue
            finally:
                latencies.append(time.perf_counter() - started)
            if not math.isfinite(prediction.score):
                errors += 1
            elif prediction.anomaly:
                anomalies += 1
        latencies.sort()
        p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] if latencies else 0.0
        figures = status_details(
            health_readings=probe.readings,
            health_error_rate=f"{errors / probe.readings:.4f}",
            health_anomaly_rate=f"{anomalies / probe.readings:.4f}",
            health_latency_p95_ms=f"{p95 * 1000:.3f}",
        )
        log.info("health of v%s over %d readings: %s", info.version if info else "?",
                 probe.readings, figures)
        return figures

    # -- telemetry ---------------------------------------------------------------
    def _new_window(self) -> dict[str, Any]:
        return {"start": time.time(), "readings": 0, "anomalies": 0, "sent": 0,
                "score_sum": 0.0, "labels": {}}

    def _telemetry_loop(self) -> None:
        assert self.source is not None
        period = 1.0 / self.config.rate
        next_at = time.monotonic()
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            next_at += period
            if time.monotonic() - next_at > 1.0:
                next_at = time.monotonic()  # fell behind: do not burst to catch up
            try:
                self.process(self.source.read())
                self._maybe_summary()
            except Exception:
                log.exception("telemetry step failed")

    def process(self, reading: Reading) -> Prediction | None:
        """Infer on one reading (when a model is installed), apply the uplink policy,
        publish what it says. Returns the prediction."""
        prediction: Prediction | None = None
        model = self.handle.current
        self.last_inference_us = None
        if model is not None:
            started = time.perf_counter()
            try:
                prediction = model.predict(reading.features)
            except ValueError as exc:  # the sensor and model disagree on feature count
                log.error("inference failed: %s", exc)
            else:
                self.last_inference_us = round((time.perf_counter() - started) * 1e6)
        has_model = prediction is not None
        with self._stats_lock:
            decider = self._decider
            self._totals["readings"] += 1
            window = self._window
            window["readings"] += 1
            if prediction is not None:
                self._totals["predictions"] += 1
                window["score_sum"] += prediction.score
                if prediction.anomaly:
                    self._totals["anomalies"] += 1
                    window["anomalies"] += 1
                labels = window["labels"]
                labels[str(prediction.label)] = labels.get(str(prediction.label), 0) + 1
        self.counter.reading(has_model)
        send, reason, inclusion_p = decider.should_send(
            has_model, bool(prediction and prediction.anomaly))
        if send:
            self._seq += 1
            record: dict[str, Any] = {
                "id": f"{self.thing}-{self._boot}-{self._seq}",
                "ts": round(time.time(), 3),
                "features": reading.features,
                # Why it was sent and how likely: the trainer weighs it by 1 / inclusion_p.
                REASON_FIELD: reason,
                INCLUSION_FIELD: inclusion_p,
            }
            if reading.label is not None:
                record["label"] = reading.label
            if prediction is not None:
                record.update(model_version=prediction.model_version, score=round(prediction.score, 6),
                              anomaly=prediction.anomaly)
            self._publish(telemetry_topic(self.model_name, self.thing), record, has_model, "telemetry")
            with self._stats_lock:
                window["sent"] += 1
        return prediction

    def _maybe_summary(self, force: bool = False) -> None:
        if self.handle.current is None:
            return
        now = time.monotonic()
        with self._stats_lock:
            if not force and now < self._next_summary:
                return
            self._next_summary = now + self._policy.summary_interval_seconds
            window, self._window = self._window, self._new_window()
        info = self.handle.info
        summary = {
            "thing": self.thing,
            "model": self.model_name,
            "model_version": info.version if info else None,
            "window_start": round(window["start"], 3),
            "window_end": round(time.time(), 3),
            "readings": window["readings"],
            "anomalies": window["anomalies"],
            "sent": window["sent"],
            "mean_score": round(window["score_sum"] / window["readings"], 6) if window["readings"] else None,
            "labels": window["labels"],
            REASON_FIELD: SUMMARY,
        }
        self._publish(telemetry_topic(self.model_name, self.thing, "summary"), summary, True, "summary")

    def _publish(self, topic: str, body: dict[str, Any], has_model: bool, kind: str) -> None:
        payload = json.dumps(body, separators=(",", ":")).encode()
        self.link.publish(topic, payload)
        self.counter.sent(has_model, topic, payload, kind)

    # -- stats -------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        current = self.store.state.current
        previous = self.store.state.previous
        with self._stats_lock:
            totals = dict(self._totals)
            updates = dict(self._updates)
            last_job = dict(self._last_job) if self._last_job else None
            policy = self._policy
        return {
            "thing": self.thing,
            "model": self.model_name,
            "pid": os.getpid(),
            "started_at": self._started_at,
            "updated_at": time.time(),
            "connected": self.link.connected.is_set(),
            "installed": None if current is None else {
                "version": current.version, "sha256": current.sha256,
                "installed_at": current.installed_at, "job_id": current.job_id},
            "previous_version": previous.version if previous else None,
            "serving_version": self.handle.info.version if self.handle.info else None,
            "swaps": self.handle.swaps,
            "pending_report": self.store.state.pending_report.job_id if self.store.state.pending_report else None,
            "uplink_policy": {"before_model": policy.before_model, "anomalies": policy.anomalies,
                              "sample_rate": policy.sample_rate,
                              "summary_interval_seconds": policy.summary_interval_seconds},
            "uplink": self.counter.snapshot(),
            **totals,
            "updates": updates,
            "last_job": last_job,
        }

    def write_stats(self) -> dict[str, Any]:
        stats = self.stats()
        atomic_write_json(self.stats_path, stats)
        return stats

    def _stats_loop(self) -> None:
        last_log = 0.0
        while not self._stop.wait(self.config.stats_interval):
            try:
                stats = self.write_stats()
            except Exception:
                log.exception("writing stats failed")
                continue
            if time.monotonic() - last_log >= 30:
                last_log = time.monotonic()
                up = stats["uplink"]
                log.info(
                    "stats: v%s readings=%d anomalies=%d sent before model %d msgs/%d B, with model %d msgs/%d B",
                    stats["serving_version"], stats["readings"], stats["anomalies"],
                    up["before_model"]["messages"], up["before_model"]["bytes"],
                    up["with_model"]["messages"], up["with_model"]["bytes"],
                )
