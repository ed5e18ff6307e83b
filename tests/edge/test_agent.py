"""The agent end to end over a real mosquitto: IoT Jobs protocol, updates, uplink, restarts."""


from __future__ import annotations

import json
import subprocess
import sys

import pytest
from mledge_edge.agent import CRASH_ENV, CRASH_EXIT_CODE, Agent
from mledge_edge.config import AgentConfig

from tests.conftest import subprocess_env
from tests.edge.support import (
    MODEL,
    IotJobsOnBroker,
    free_port,
    make_kmeans_model,
    make_release,
    release_keys_pem,
    run_mosquitto,
    wait_until,
)


@pytest.fixture(scope="module")
def models() -> dict[int, bytes]:
    return {v: make_kmeans_model(v, seed=v) for v in (1, 2)}


def agent_config(tmp_path, port: int, **overrides) -> AgentConfig:
    keys = tmp_path / "release-keys.pem"
    keys.write_bytes(release_keys_pem())
    values = dict(release_keys=str(keys), thing="dev-1", model=MODEL, endpoint="127.0.0.1",
                  port=port, insecure_no_tls=True,
                  state_dir=str(tmp_path / "state"), sensor="vibration", rate=0, seed=5,
                  stats_interval=0.2, request_timeout=5.0)
    values.update(overrides)
    return AgentConfig(**values)


def test_agent_updates_over_iot_jobs_and_cuts_uplink(tmp_path, mosquitto, iot, artifacts, models):
    agent = Agent(agent_config(tmp_path, mosquitto, fault_rate=0.1))
    agent.start()
    try:
        # No model yet: every reading goes up, and nothing is predicted.
        for _ in range(30):
            agent.process(agent.source.read())
        telemetry = wait_until(lambda: len(iot.telemetry) >= 30 and iot.telemetry)
        topic, record = telemetry[0]
        assert topic == f"dt/mledge/{MODEL}/dev-1/telemetry"
        assert set(record) == {"id", "ts", "features", "reason", "inclusion_p"}
        assert (record["reason"], record["inclusion_p"]) == ("no-model", 1.0)
        assert len(record["features"]) == 8

        v1 = make_release(artifacts, 1, models[1])
        iot.add_job("dev-1", "job-v1", v1)
        done = iot.wait_for_terminal("dev-1", "job-v1")
        assert done.status == "SUCCEEDED", done.status_details
        assert done.status_details["codec"] == "full:zstd" and done.status_details["version"] == "1"
        stages = [details.get("stage") for status, details in done.history]
        assert stages[:2] == ["accepted", "downloading"] and stages[-1] == "installed"
        assert agent.handle.info.version == 1

        # With a model: only anomalies go up (sample_rate 0 in this release's uplink policy).
        sent_before = len(iot.telemetry)
        predictions = [agent.process(agent.source.read()) for _ in range(200)]
        anomalies = sum(p.anomaly for p in predictions)
        assert 0 < anomalies < 200
        wait_until(lambda: len(iot.telemetry) >= sent_before + anomalies)
        flagged = [r for _, r in iot.telemetry[sent_before:]]
        assert len(flagged) == anomalies and all(r["anomaly"] and r["model_version"] == 1 for r in flagged)
        assert all((r["reason"], r["inclusion_p"]) == ("flagged", 1.0) for r in flagged)
        agent._maybe_summary(force=True)
        summary = wait_until(lambda: [r for t, r in iot.telemetry if t.endswith("/summary")])
        assert summary[0]["readings"] == 200 and summary[0]["anomalies"] == anomalies
        assert summary[0]["reason"] == "summary"

        v2 = make_release(artifacts, 2, models[2], [(1, models[1])])
        iot.add_job("dev-1", "job-v2", v2)
        done = iot.wait_for_terminal("dev-1", "job-v2")
        assert done.status == "SUCCEEDED" and done.status_details["codec"] == "delta:bsdiff4:v1"
        assert agent.handle.info.version == 2

        old = make_release(artifacts, 1, models[1])
        iot.add_job("dev-1", "job-old", old)
        done = iot.wait_for_terminal("dev-1", "job-old")
        assert done.status == "REJECTED" and "downgrade" in done.status_details["reason"]
        assert agent.handle.info.version == 2

        stats = wait_until(lambda: (s := json.loads(agent.stats_path.read_text()))["updates"]["rejected"] and s)
        assert stats["installed"]["version"] == 2 and stats["updates"]["succeeded"] == 2
        up = stats["uplink"]
        assert up["before_model"]["messages"] == up["before_model"]["readings"] == 30
        assert up["with_model"]["readings"] == 200 and up["with_model"]["messages"] == anomalies + 1
        assert up["with_model"]["bytes"] < up["before_model"]["bytes"] * 200 / 30
        # Every update carried expectedVersion and at most 10 string details.
        updates = [body for topic, body in iot.requests if topic.endswith("/update")]
        assert all("expectedVersion" in b and len(b.get("statusDetails", {})) <= 10 for b in updates)
    finally:
        agent.stop()


def test_killed_during_install_restarts_with_a_model_and_reports_the_job(tmp_path, mosquitto, iot,
                                                                          artifacts, models):
    v1 = make_release(artifacts, 1, models[1])
    iot.add_job("dev-1", "job-v1", v1)  # queued while offline
    config = agent_config(tmp_path, mosquitto)
    argv = [sys.executable, "-m", "mledge_edge", "--thing", "dev-1", "--model", MODEL,
            "--endpoint", "127.0.0.1", "--port", str(mosquitto), "--insecure-no-tls",
            "--state-dir", config.state_dir, "--sensor", "none", "--duration", "30",
            "--release-keys", config.release_keys]
    proc = subprocess.run(argv, env=subprocess_env(**{CRASH_ENV: "after_state_write"}),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == CRASH_EXIT_CODE, proc.stderr[-2000:]
    assert iot.execution("dev-1", "job-v1").status == "IN_PROGRESS"  # killed before reporting

    agent = Agent(config)
    agent.start()
    try:
        done = iot.wait_for_terminal("dev-1", "job-v1")
        assert done.status == "SUCCEEDED" and done.status_details["version"] == "1"
        assert agent.handle.info.version == 1
        wait_until(lambda: agent.store.state.pending_report is None)
        assert len(artifacts.requests) == 1  # nothing downloaded again after the restart
    finally:
        agent.stop()


def test_agent_over_mutual_tls(tmp_path, mosquitto_tls, artifacts, models):
    broker = mosquitto_tls
    fake = IotJobsOnBroker(broker.port, artifacts)
    config = agent_config(tmp_path, broker.tls_port, insecure_no_tls=False, endpoint="localhost",
                          cert=str(broker.tls.cert), key=str(broker.tls.key), ca=str(broker.tls.ca))
    agent = Agent(config)
    try:
        v1 = make_release(artifacts, 1, models[1])
        fake.add_job("dev-1", "job-v1", v1)
        agent.start()
        assert fake.wait_for_terminal("dev-1", "job-v1").status == "SUCCEEDED"
    finally:
        agent.stop()
        fake.close()


def test_agent_catches_up_after_the_broker_restarts(tmp_path, artifacts, models):
    port = free_port()
    with run_mosquitto(tmp_path / "a", "", port):
        agent = Agent(agent_config(tmp_path, port))
        agent.start()
    # The broker came back without our session: the agent must reconnect, resubscribe
    # and call start-next by itself (the notify-next below is published before it is back).
    try:
        with run_mosquitto(tmp_path / "b", "", port):
            fake = IotJobsOnBroker(port, artifacts)
            try:
                v1 = make_release(artifacts, 1, models[1])
                fake.add_job("dev-1", "job-v1", v1)
                assert fake.wait_for_terminal("dev-1", "job-v1", timeout=30).status == "SUCCEEDED"
                assert agent.handle.info.version == 1
                v2 = make_release(artifacts, 2, models[2], [(1, models[1])])
                fake.add_job("dev-1", "job-v2", v2)  # via notify-next
                assert fake.wait_for_terminal("dev-1", "job-v2").status == "SUCCEEDED"
            finally:
                fake.close()
    finally:
        agent.stop()


def test_partial_download_of_a_job_canceled_while_off_is_deleted(tmp_path, mosquitto, iot):
    # A download cut by a power loss; meanwhile the job was canceled, so nothing is pending.
    downloads = tmp_path / "state" / "downloads"
    downloads.mkdir(parents=True)
    stale = "cd" * 32
    (downloads / f"{stale}.part").write_bytes(b"x" * 4096)
    (downloads / f"{stale}.json").write_text('{"offset": 4096}')
    agent = Agent(agent_config(tmp_path, mosquitto))
    agent.start()
    try:
        wait_until(lambda: not any(downloads.iterdir()))
    finally:
        agent.stop()


def test_a_canary_job_reports_the_new_models_health_with_succeeded(tmp_path, mosquitto, iot,
                                                                   artifacts, models):
    agent = Agent(agent_config(tmp_path, mosquitto))
    agent.start()
    try:
        v1 = make_release(artifacts, 1, models[1])
        iot.add_job("dev-1", "job-v1", v1, extra={"health": {"readings": 40}})
        done = iot.wait_for_terminal("dev-1", "job-v1")
        assert done.status == "SUCCEEDED", done.status_details
        details = done.status_details
        assert details["health_readings"] == "40" and details["codec"] == "full:zstd"
        assert 0.0 <= float(details["health_anomaly_rate"]) < 0.5
        assert float(details["health_error_rate"]) == 0.0
        assert float(details["health_latency_p95_ms"]) > 0.0
        assert [d.get("stage") for _, d in done.history][-2] == "health"
    finally:
        agent.stop()


def test_a_second_job_for_the_installed_model_succeeds_at_once(tmp_path, mosquitto, iot,
                                                               artifacts, models):
    # A canary job, then the fleet's job for the same model: nothing to install the second time.
    agent = Agent(agent_config(tmp_path, mosquitto))
    agent.start()
    try:
        v1 = make_release(artifacts, 1, models[1])
        iot.add_job("dev-1", "job-canary", v1)
        assert iot.wait_for_terminal("dev-1", "job-canary").status == "SUCCEEDED"
        iot.add_job("dev-1", "job-fleet", v1)
        done = iot.wait_for_terminal("dev-1", "job-fleet")
        assert done.status == "SUCCEEDED" and done.status_details["codec"] == "already-installed"
        assert agent.handle.swaps == 1
    finally:
        agent.stop()
