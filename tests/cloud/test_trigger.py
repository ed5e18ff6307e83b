"""The retrain trigger: S3 events through the Chalice handler, thresholds, idempotency,
bursts, start failures, manual and scheduled starts, dataset snapshots (moto)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from chalice.test import Client
from mledge_update.naming import parse_job_name

from chalicelib import layout
from chalicelib.backends import BackendError
from chalicelib.config import UnknownModelError
from chalicelib.registry import Registry, Status
from chalicelib.schedule import cron_matches, schedule_due
from chalicelib.settings import Settings
from chalicelib.snapshot import write_snapshot
from chalicelib.state import LOCK_MARGIN_SECONDS, StateStore
from chalicelib.trigger import (
    NoDataError,
    TrainingInProgressError,
    TrainingStartError,
    Trigger,
)
from tests.cloud.trigger_helpers import (
    S3_TEST_EVENT,
    RecordingBackend,
    RecordingClient,
    put_raw,
    readings,
    s3_event,
    s3_record,
    small_pipeline_config,
    sqs_event,
)
from tests.fakes import FakeClock

HANDLER = "on_raw_objects_created"
SCHEDULED_EVENT = {
    "version": "0", "id": "5e1b0c6f", "detail-type": "Scheduled Event", "source": "aws.events",
    "account": "123456789012", "time": "2024-05-01T12:00:00Z", "region": "us-east-1",
    "resources": ["arn:aws:events:us-east-1:123456789012:rule/retrain"], "detail": {},
}


# A scheduled time (cron rules match it) as the fake clock's start.
NOON = datetime(2024, 5, 1, 12, tzinfo=UTC).timestamp()


@pytest.fixture
def config():
    return small_pipeline_config()


def trigger_with(aws, settings, config, backend=None, **kwargs) -> Trigger:
    factory = (lambda name: backend) if backend is not None else None
    return Trigger(clients=aws, settings=settings, config=config, backend_factory=factory,
                   **kwargs)


def training_jobs(aws) -> list[str]:
    return sorted(j["TrainingJobName"] for j in
                  aws.sagemaker.list_training_jobs()["TrainingJobSummaries"])


def deliver(client: Client, *bodies) -> None:
    client.lambda_.invoke(HANDLER, sqs_event(*bodies))


# ------------------------------------------------------------------ S3 events


def test_below_the_threshold_nothing_starts_then_crossing_it_starts_one_job(
        client, aws, settings, state_store, registry):
    key1 = put_raw(aws.s3, settings.bucket, "vib", "b1", readings("vib", 60))
    key2 = put_raw(aws.s3, settings.bucket, "vib", "b2", readings("vib", 39, start=60))
    deliver(client, s3_event(s3_record(settings.bucket, key1)),
            s3_event(s3_record(settings.bucket, key2)))
    assert state_store.new_records("vib") == 99
    assert training_jobs(aws) == []
    assert state_store.training_lock("vib") is None

    key3 = put_raw(aws.s3, settings.bucket, "vib", "b3", readings("vib", 1, start=99))
    deliver(client, s3_event(s3_record(settings.bucket, key3)))
    jobs = training_jobs(aws)
    assert len(jobs) == 1
    assert parse_job_name(jobs[0]) == ("vib", 1)
    record = registry.get("vib", 1)
    assert record.status == Status.TRAINING
    assert record.lineage["job_name"] == jobs[0]
    assert record.lineage["dataset_key"] == "datasets/vib/v00001/manifest.json"
    assert record.lineage["dataset"] == {"objects": 3, "records": 100,
                                         "bytes": record.lineage["dataset"]["bytes"]}
    assert record.lineage["code_version"] == settings.code_version
    assert record.lineage["backend"] == "sagemaker"
    assert record.lineage["trigger"] == "new-data"
    assert state_store.training_lock("vib").version == 1
    assert state_store.new_records("vib") == 0  # consumed at the start


def test_duplicate_events_count_once(client, aws, settings, state_store):
    key = put_raw(aws.s3, settings.bucket, "vib", "dup", readings("vib", 30))
    event = s3_event(s3_record(settings.bucket, key, sequencer="01"))
    deliver(client, event, event)                         # twice in one batch
    deliver(client, event)                                # S3 delivers it again later
    deliver(client, s3_event(s3_record(settings.bucket, key, sequencer="02")))  # ingest replay
    assert state_store.new_records("vib") == 30


def test_url_encoded_keys_test_events_and_junk_do_not_fail_the_batch(client, aws, settings, state_store):
    key = put_raw(aws.s3, settings.bucket, "vib", "batch 7+x=ü", readings("vib", 12))
    assert " " in key and "+" in key
    record = s3_record(settings.bucket, key)
    assert "batch+7%2Bx%3D%C3%BC" in record["s3"]["object"]["key"]
    deliver(client, S3_TEST_EVENT, "not json", s3_event(record),
            s3_event(s3_record(settings.bucket, "quarantine/vib/x.jsonl.gz")),
            s3_event(s3_record("another-bucket", key)),
            s3_event(s3_record(settings.bucket, "raw/unknown-model/x.jsonl.gz")))
    assert state_store.new_records("vib") == 1 * 12
    assert state_store.new_records("unknown-model") == 0


def test_direct_s3_event_shape_is_accepted(aws, settings, config, state_store):
    key = put_raw(aws.s3, settings.bucket, "dig", "d1", readings("dig", 5, n_features=4))
    report = trigger_with(aws, settings, config).handle_raw_events(
        s3_event(s3_record(settings.bucket, key)))
    assert report.counted == [{"key": key, "model": "dig", "records": 5}]
    assert state_store.new_records("dig") == 5


def test_records_are_counted_from_lines_when_metadata_is_missing(aws, settings, config, state_store):
    key = put_raw(aws.s3, settings.bucket, "vib", "nometa", readings("vib", 17),
                  with_metadata=False)
    trigger_with(aws, settings, config).handle_raw_events(
        s3_event(s3_record(settings.bucket, key)))
    assert state_store.new_records("vib") == 17


def test_a_burst_of_events_starts_exactly_one_job(client, aws, settings, state_store, registry):
    keys = [put_raw(aws.s3, settings.bucket, "vib", f"burst-{i}", readings("vib", 50, start=50 * i))
            for i in range(10)]
    # Half in one SQS batch, the rest one invocation each (other Lambda containers).
    deliver(client, *[s3_event(s3_record(settings.bucket, k)) for k in keys[:5]])
    for k in keys[5:]:
        deliver(client, s3_event(s3_record(settings.bucket, k)))
    assert len(training_jobs(aws)) == 1
    assert [r.version for r in registry.list_versions("vib")] == [1]
    # The start consumed what it had counted (all 250 of the first batch); the
    # 250 that arrived while it ran count toward the next training.
    assert state_store.new_records("vib") == 250
    snapshot = json.loads(aws.s3.get_object(
        Bucket=settings.bucket, Key=layout.dataset_key("vib", 1))["Body"].read())
    # The snapshot lists every raw object in S3 at the start, including the five
    # whose events were still in flight (they also count toward the next training).
    assert snapshot["total"]["objects"] == 10


def test_losing_the_lock_race_starts_nothing(aws, settings, config, state_store, registry):
    put_raw(aws.s3, settings.bucket, "vib", "race", readings("vib", 120))
    state_store.add_new_records("vib", 120)

    class RaceRegistry(Registry):
        def allocate_version(self, model: str) -> int:
            version = super().allocate_version(model)
            # Another Lambda takes the lock between our check and our conditional put.
            state_store.acquire_training_lock(model, 99, "mledge-vib-v99-other")
            return version

    backend = RecordingBackend()
    trigger = trigger_with(aws, settings, config, backend,
                           registry=RaceRegistry(settings.registry_table, aws.dynamodb))
    with pytest.raises(TrainingInProgressError) as err:
        trigger.start_training("vib", reason="new-data")
    assert err.value.version == 99
    assert backend.requests == []
    assert registry.list_versions("vib") == []  # the allocated number stays unused
    assert state_store.new_records("vib") == 120


# ------------------------------------------------------------------ failures


def test_a_backend_that_fails_to_start_releases_the_lock_and_records_failed(
        aws, settings, config, state_store, registry, capsys):
    key = put_raw(aws.s3, settings.bucket, "vib", "f1", readings("vib", 150))
    backend = RecordingBackend(fail=BackendError("ResourceLimitExceeded: no ml.g4dn.xlarge"))
    report = trigger_with(aws, settings, config, backend).handle_raw_events(
        s3_event(s3_record(settings.bucket, key)))
    assert report.started == []
    assert "ResourceLimitExceeded" in report.not_started["vib"]
    record = registry.get("vib", 1)
    assert record.status == Status.FAILED
    assert "ResourceLimitExceeded" in record.failure_reason
    assert state_store.training_lock("vib") is None
    assert state_store.new_records("vib") == 150  # still counted: the next event retries

    backend.fail = None
    started = trigger_with(aws, settings, config, backend).start_training("vib", reason="retry")
    assert started.version == 2
    assert state_store.new_records("vib") == 0
    # Each outcome is a metric of the model (and of the stage).
    blobs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"_aws"' in line]
    per_model = [b for b in blobs if b.get("model") == "vib"]
    assert [(b.get("TrainingsFailed"), b.get("TrainingsStarted"), b["version"])
            for b in per_model] == [([1.0], None, 1), (None, [1.0], 2)]
    assert "ResourceLimitExceeded" in per_model[0]["reason"]


def test_missing_stage_settings_fail_cleanly(aws, settings, config, state_store, registry):
    put_raw(aws.s3, settings.bucket, "vib", "s1", readings("vib", 150))
    state_store.add_new_records("vib", 150)
    bare = Settings(**{**settings.__dict__, "training_image_uri": ""})
    with pytest.raises(TrainingStartError, match="MLEDGE_TRAINING_IMAGE_URI"):
        Trigger(clients=aws, settings=bare, config=config).start_training("vib")
    assert registry.get("vib", 1).status == Status.FAILED
    assert state_store.training_lock("vib") is None
    assert training_jobs(aws) == []


def test_a_missing_champion_object_fails_before_the_job(aws, settings, config, state_store, registry):
    release_version(registry, "vib", 1)  # registry says v1 is released; S3 lacks its model
    put_raw(aws.s3, settings.bucket, "vib", "c1", readings("vib", 150))
    state_store.add_new_records("vib", 150)
    backend = RecordingBackend()
    with pytest.raises(TrainingStartError, match=r"HeadObject|404|Not Found"):
        trigger_with(aws, settings, config, backend).start_training("vib")
    assert backend.requests == []
    assert registry.get("vib", 2).status == Status.FAILED
    assert state_store.training_lock("vib") is None


def release_version(registry: Registry, model: str, version: int) -> None:
    assert registry.allocate_version(model) == version
    registry.create_training(model, version, {"job_name": f"mledge-{model}-v{version}-x"})
    registry.transition(model, version, Status.APPROVED, expected=[Status.TRAINING],
                        reason="test")
    registry.mark_released(model, version, {"job_id": "j"})


# ------------------------------------------------------------------ manual starts


def test_manual_start_errors(aws, settings, config, state_store):
    trigger = trigger_with(aws, settings, config, RecordingBackend())
    with pytest.raises(UnknownModelError):
        trigger.start_training("nope")
    with pytest.raises(NoDataError, match="no new records"):
        trigger.start_training("vib")
    with pytest.raises(NoDataError, match="no raw data"):
        trigger.start_training("vib", force=True)
    put_raw(aws.s3, settings.bucket, "vib", "m1", readings("vib", 3))
    first = trigger.start_training("vib", force=True)  # below min_new_records: manual wins
    assert (first.version, first.objects, first.records, first.reason) == (1, 1, 3, "manual")
    with pytest.raises(TrainingInProgressError, match="v1"):
        trigger.start_training("vib", force=True)


def test_a_stale_lock_is_taken_over_and_its_version_failed(aws, settings, config, registry):
    clock = FakeClock(NOON)
    state = StateStore(settings.state_table, aws.dynamodb, clock=clock)
    trigger = trigger_with(aws, settings, config, RecordingBackend(), state=state, clock=clock)
    put_raw(aws.s3, settings.bucket, "vib", "st", readings("vib", 5))
    trigger.start_training("vib", force=True)
    clock.now += config.models["vib"].training.max_runtime_seconds + LOCK_MARGIN_SECONDS
    second = trigger.start_training("vib", force=True)
    assert second.version == 2
    old = registry.get("vib", 1)
    assert old.status == Status.FAILED
    assert "taken over" in old.failure_reason
    assert state.training_lock("vib").version == 2


def test_operator_train_reaches_the_trigger(aws, settings, config, registry):
    from chalicelib.operator import Operator

    put_raw(aws.s3, settings.bucket, "vib", "op", readings("vib", 5))
    StateStore(settings.state_table, aws.dynamodb).add_new_records("vib", 5)
    started = Operator(clients=aws, settings=settings, config=config).train(
        "vib", reason="operator request")
    assert started.version == 1
    assert registry.get("vib", 1).lineage["trigger"] == "operator request"
    assert len(training_jobs(aws)) == 1


# ------------------------------------------------------------------ schedule


def test_rate_schedules():
    day = 86400.0
    assert schedule_due("rate(1 day)", 10 * day, None)
    assert not schedule_due("rate(1 day)", 10 * day, 10 * day - day / 2)
    assert schedule_due("rate(1 day)", 10 * day, 9 * day)
    assert schedule_due("rate(1 day)", 10 * day, 9 * day + 60)  # within half a tick
    assert not schedule_due("rate(2 hours)", 10 * day, 10 * day - 3600)


def test_cron_schedules():
    when = datetime(2024, 5, 1, 3, 0, tzinfo=UTC)  # a Wednesday
    assert cron_matches("cron(0 3 * * ? *)", when)
    assert cron_matches("cron(0 3 ? * WED *)", when)
    assert cron_matches("cron(0 3 ? * MON-FRI *)", when)
    assert not cron_matches("cron(0 3 ? * SAT-SUN *)", when)
    assert cron_matches("cron(0/15 */3 1 5 ? 2024)", when)
    assert not cron_matches("cron(0 4 * * ? *)", when)
    tick_end = when.timestamp() + 10 * 60  # the tick that covers 02:56..03:10
    assert schedule_due("cron(0 3 * * ? *)", tick_end, None)
    assert not schedule_due("cron(0 3 * * ? *)", tick_end + 3600, None)
    assert not schedule_due("cron(0 3 * * ? *)", tick_end, tick_end - 60)


def test_the_schedule_starts_due_models_with_new_records(client, aws, settings, registry,
                                                        state_store):
    put_raw(aws.s3, settings.bucket, "vib", "s1", readings("vib", 5))
    put_raw(aws.s3, settings.bucket, "dig", "s1", readings("dig", 5, n_features=4))
    state_store.add_new_records("dig", 5)  # no schedule: only data events start it
    client.lambda_.invoke("retrain_on_schedule", SCHEDULED_EVENT)
    assert training_jobs(aws) == []  # vib has no new records yet

    state_store.add_new_records("vib", 5)
    client.lambda_.invoke("retrain_on_schedule", SCHEDULED_EVENT)
    assert len(training_jobs(aws)) == 1
    assert registry.get("vib", 1).lineage["trigger"] == "schedule"
    assert registry.list_versions("dig") == []

    state_store.release_training_lock("vib", 1)
    state_store.add_new_records("vib", 5)
    client.lambda_.invoke("retrain_on_schedule", SCHEDULED_EVENT)  # not due again for a day
    assert len(training_jobs(aws)) == 1


# ------------------------------------------------------------------ snapshot


def test_snapshot_lists_all_raw_objects_and_reuses_known_counts(aws, settings):
    k1 = put_raw(aws.s3, settings.bucket, "vib", "a", readings("vib", 4))
    k2 = put_raw(aws.s3, settings.bucket, "vib", "b", readings("vib", 6), with_metadata=False)
    put_raw(aws.s3, settings.bucket, "vibx", "other-model", readings("vibx", 6))
    aws.s3.put_object(Bucket=settings.bucket, Key="raw/vib/readme.txt", Body=b"not data")
    first = write_snapshot(aws.s3, settings.bucket, "vib", 1)
    assert [(o.key, o.records) for o in first.objects] == [(k1, 4), (k2, 6)]
    train_manifest = json.loads(aws.s3.get_object(
        Bucket=settings.bucket, Key="datasets/vib/v00001/train.manifest")["Body"].read())
    assert train_manifest == [{"prefix": f"s3://{settings.bucket}/"}, k1, k2]
    doc = json.loads(aws.s3.get_object(
        Bucket=settings.bucket, Key="datasets/vib/v00001/manifest.json")["Body"].read())
    assert doc["total"]["records"] == 10 and doc["total"]["objects"] == 2
    assert doc["train_manifest"] == "datasets/vib/v00001/train.manifest"
    assert {o["key"] for o in doc["objects"]} == {k1, k2}

    k3 = put_raw(aws.s3, settings.bucket, "vib", "c", readings("vib", 3))
    recording = RecordingClient(aws.s3)
    second = write_snapshot(recording, settings.bucket, "vib", 3)
    assert second.records == 13
    heads = [kwargs["Key"] for name, kwargs in recording.calls if name == "head_object"]
    assert heads == [k3]  # only the new object
