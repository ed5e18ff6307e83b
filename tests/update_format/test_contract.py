"""The shared contract modules: one set of uplink defaults, names that read back, topics,
and the cloud's config taking its families and uplink defaults from them."""

from __future__ import annotations

import pytest
from mledge_update.families import FAMILIES, FAMILY_METRICS
from mledge_update.naming import (
    JOB_NAME_LIMIT,
    TAG_MODEL,
    TAG_VERSION,
    identify_job,
    iot_job_id,
    job_tags,
    make_job_name,
    parse_job_name,
)
from mledge_update.topics import (
    TELEMETRY_FILTER,
    jobs_topic_root,
    parse_telemetry_topic,
    telemetry_topic,
)
from mledge_update.uplink import UplinkPolicy

from chalicelib.config import ConfigError, parse_pipeline_config

MODEL_TOML = {
    "family": "kmeans_anomaly", "metric": "silhouette", "threshold": 0.3,
    "thing_group": "g", "schema": {"features": ["a", "b"]},
}


def test_every_family_reports_at_least_one_metric():
    assert tuple(FAMILY_METRICS) == FAMILIES
    assert all(FAMILY_METRICS[f] for f in FAMILIES)


def test_the_cloud_accepts_exactly_the_contract_families_and_their_metrics():
    for family, metrics in FAMILY_METRICS.items():
        for metric in metrics:
            model = {**MODEL_TOML, "family": family, "metric": metric}
            assert parse_pipeline_config({"models": {"m": model}}).model("m").metric == metric
    with pytest.raises(ConfigError, match="family"):
        parse_pipeline_config({"models": {"m": {**MODEL_TOML, "family": "forest"}}})


def test_cloud_and_device_fill_in_the_same_uplink_defaults():
    cloud = parse_pipeline_config({"models": {"m": MODEL_TOML}}).model("m").uplink
    device = UplinkPolicy.from_document({})
    assert cloud == device == UplinkPolicy()
    assert UplinkPolicy.from_document(cloud.to_document()) == cloud


@pytest.mark.parametrize("document, expected", [
    (None, UplinkPolicy()),
    ({"before_model": "sometimes"}, UplinkPolicy(before_model="all")),
    ({"before_model": "none"}, UplinkPolicy(before_model="none")),
    ({"sample_rate": -3}, UplinkPolicy(sample_rate=0.0)),
    ({"sample_rate": 7}, UplinkPolicy(sample_rate=1.0)),
    ({"summary_interval_seconds": 0}, UplinkPolicy(summary_interval_seconds=1.0)),
    ({"anomalies": 0, "unknown": "ignored"}, UplinkPolicy(anomalies=False)),
])
def test_a_device_reads_any_uplink_leniently(document, expected):
    assert UplinkPolicy.from_document(document) == expected


def test_job_names_read_back_and_fit_sagemaker():
    for model in ("m", "vibration-anomaly", "a-v2-b", "x" * 80):
        name = make_job_name(model, 12345)
        assert len(name) <= JOB_NAME_LIMIT
        parsed = parse_job_name(name)
        assert parsed is not None and parsed[1] == 12345
        assert model.startswith(parsed[0])
    assert parse_job_name("not-ours") is None
    assert parse_job_name("mledge-m-vx-abc") is None


def test_tags_win_over_the_name_and_a_configured_model_wins_a_split():
    tags = [{"Key": k, "Value": v} for k, v in job_tags("long-model", 3, "prod").items()]
    assert identify_job("mledge-long-v9-ab", tags, set()) == ("long-model", 3)
    assert identify_job("mledge-a-v2-b-v7-cd", None, {"a-v2-b"}) == ("a-v2-b", 7)
    assert identify_job("mledge-a-v2-b-v7-cd", None, set()) == ("a", 2)
    assert identify_job("other-job", {TAG_MODEL: "m"}, {"m"}) is None  # no version tag
    assert identify_job("x", {TAG_MODEL: "m", TAG_VERSION: "4"}, set()) == ("m", 4)


def test_iot_job_ids_fit_the_iot_limit():
    assert iot_job_id("m", 3) == "mledge-m-v00003"
    assert iot_job_id("m", 3, rollback=True, attempt="a1b2") == "mledge-m-v00003-rollback-a1b2"
    assert iot_job_id("m", 3, attempt="c3") == "mledge-m-v00003-retry-c3"
    long = iot_job_id("m" * 63, 99999, rollback=True, attempt="0123456789ab")
    assert len(long) == 64 and long.endswith("-v99999-rollback-0123456789ab")
    assert iot_job_id("m", 3, canary=True) == "mledge-m-v00003-canary"
    retry_canary = iot_job_id("m" * 63, 99999, attempt="0123456789ab", canary=True)
    assert len(retry_canary) == 64 and retry_canary.endswith("-v99999-retry-0123456789ab-canary")


def test_telemetry_topics_read_back_and_other_topics_do_not():
    topic = telemetry_topic("vibration-anomaly", "dev-1", "summary")
    assert parse_telemetry_topic(topic) == ("vibration-anomaly", "dev-1", "summary")
    assert TELEMETRY_FILTER.count("+") == 3
    for other in ("dt/mledge/m/t", "dt/mledge/m/t/k/extra", "dt/other/m/t/k",
                  f"{jobs_topic_root('t')}/notify-next", ""):
        assert parse_telemetry_topic(other) is None

