"""The model registry on moto DynamoDB: counter, conditional transitions, transactional releases."""

from __future__ import annotations

import pytest

from chalicelib.registry import (
    AlreadyReleasedError,
    Registry,
    Status,
    TransitionError,
    UnknownVersionError,
    VersionExistsError,
)

MODEL = "vibration-anomaly"


def _approved(registry: Registry, model: str = MODEL) -> int:
    version = registry.allocate_version(model)
    registry.create_training(model, version, {"job_name": f"mledge-{model}-v{version}-x"})
    registry.transition(model, version, Status.APPROVED, expected=[Status.TRAINING])
    return version


def test_versions_are_numbered_per_model_from_one(registry):
    assert [registry.allocate_version(MODEL) for _ in range(3)] == [1, 2, 3]
    assert registry.allocate_version("digits") == 1
    assert registry.latest_version(MODEL) == 3


def test_create_training_records_lineage_and_refuses_a_second_create(registry):
    lineage = {"dataset_key": "datasets/m/v00001/manifest.json", "code_version": "abc123",
               "hyperparameters": {"k_min": "2"}, "job_name": "mledge-m-v1-x",
               "backend": "sagemaker", "records": 4000, "quantile": 0.995}
    record = registry.create_training(MODEL, 1, lineage)
    assert record.status is Status.TRAINING
    stored = registry.get(MODEL, 1)
    assert stored.lineage == lineage
    assert isinstance(stored.lineage["quantile"], float)
    assert isinstance(stored.lineage["records"], int)
    assert stored.job_name == "mledge-m-v1-x"
    assert stored.history[0]["to"] == "TRAINING"
    with pytest.raises(VersionExistsError, match="v1 already exists"):
        registry.create_training(MODEL, 1, lineage)


def test_get_unknown_version_names_model_and_version(registry):
    with pytest.raises(UnknownVersionError, match="vibration-anomaly has no version 7"):
        registry.get(MODEL, 7)
    with pytest.raises(UnknownVersionError):
        registry.get(MODEL, 0)  # the head item is not a version


def test_transition_stores_fields_with_floats_round_tripped_and_appends_history(registry):
    registry.create_training(MODEL, 1, {})
    metrics = {"challenger": {"silhouette": 0.4123456789}, "champion": None,
               "parity": {"passed": True, "max_abs_diff": 1.5e-7}, "data": {"train": 4000},
               "odd": float("nan")}
    record = registry.transition(MODEL, 1, Status.APPROVED, expected=[Status.TRAINING],
                                 reason="gate: approved", metrics=metrics)
    assert record.status is Status.APPROVED
    got = registry.get(MODEL, 1)
    assert got.metrics["challenger"]["silhouette"] == 0.4123456789
    assert got.metrics["parity"]["max_abs_diff"] == 1.5e-7
    assert got.metrics["data"]["train"] == 4000
    assert got.metrics["champion"] is None
    assert got.metrics["odd"] == "nan"  # DynamoDB cannot store NaN
    assert [(h["from"], h["to"], h["reason"]) for h in got.history] == [
        (None, "TRAINING", "training job started"), ("TRAINING", "APPROVED", "gate: approved")]


def test_a_repeated_transition_fails_and_changes_nothing(registry):
    registry.create_training(MODEL, 1, {})
    registry.transition(MODEL, 1, Status.REJECTED, expected=[Status.TRAINING], reason="first")
    with pytest.raises(TransitionError, match="is REJECTED, not TRAINING"):
        registry.transition(MODEL, 1, Status.APPROVED, expected=[Status.TRAINING],
                            reason="second")
    got = registry.get(MODEL, 1)
    assert got.status is Status.REJECTED
    assert len(got.history) == 2


def test_two_writers_from_the_same_read_exactly_one_wins(registry):
    # moto's in-process DynamoDB does not serialise concurrent requests (real DynamoDB
    # does, per item), so the race is replayed deterministically: both writers saw
    # TRAINING, then write one after the other; the conditional write decides.
    registry.create_training(MODEL, 1, {})
    writer_a = Registry(registry.table, registry.dynamodb)
    writer_b = Registry(registry.table, registry.dynamodb)
    assert writer_a.get(MODEL, 1).status is writer_b.get(MODEL, 1).status is Status.TRAINING
    writer_a.transition(MODEL, 1, Status.APPROVED, expected=[Status.TRAINING], reason="a")
    with pytest.raises(TransitionError, match="is APPROVED, not TRAINING"):
        writer_b.transition(MODEL, 1, Status.FAILED, expected=[Status.TRAINING], reason="b",
                            failure_reason="late")
    got = registry.get(MODEL, 1)
    assert got.status is Status.APPROVED
    assert got.failure_reason is None
    assert [h["reason"] for h in got.history] == ["training job started", "a"]


def test_transition_refuses_edges_outside_the_graph(registry):
    registry.create_training(MODEL, 1, {})
    with pytest.raises(TransitionError, match="not an allowed transition"):
        registry.transition(MODEL, 1, Status.TRAINING, expected=[Status.FAILED])
    with pytest.raises(ValueError, match="use mark_released"):
        registry.transition(MODEL, 1, Status.RELEASED, expected=[Status.APPROVED])
    registry.transition(MODEL, 1, Status.REJECTED, expected=[Status.TRAINING])
    with pytest.raises(TransitionError, match="manual override"):
        registry.transition(MODEL, 1, Status.APPROVED, expected=[Status.REJECTED])
    record = registry.transition(MODEL, 1, Status.APPROVED, expected=[Status.REJECTED],
                                 override={"by": "ana", "reason": "known-good"})
    assert record.override == {"by": "ana", "reason": "known-good"}


def test_transition_of_an_unknown_version_is_unknown(registry):
    with pytest.raises(UnknownVersionError):
        registry.transition(MODEL, 9, Status.FAILED, expected=[Status.TRAINING])


def test_releases_supersede_the_previous_one_in_one_step(registry):
    v1 = _approved(registry)
    assert registry.current_release(MODEL) is None
    registry.mark_released(MODEL, v1, {"job_id": "j1"})
    v2 = _approved(registry)
    registry.mark_released(MODEL, v2, {"job_id": "j2"})
    assert registry.current_release(MODEL).version == v2
    assert registry.get(MODEL, v1).status is Status.SUPERSEDED
    release = registry.get(MODEL, v2).release
    assert release["job_id"] == "j2" and release["replaced_version"] == v1
    assert release["rollback"] is False and release["released_at"]
    with pytest.raises(AlreadyReleasedError):
        registry.mark_released(MODEL, v2, {"job_id": "again"})


def test_only_an_approved_version_can_be_released(registry):
    registry.create_training(MODEL, 1, {})
    with pytest.raises(TransitionError, match="is TRAINING"):
        registry.mark_released(MODEL, 1, {})
    with pytest.raises(UnknownVersionError):
        registry.mark_released(MODEL, 5, {})


def test_rollback_release_marks_the_replaced_version_rolled_back(registry):
    v1 = _approved(registry)
    registry.mark_released(MODEL, v1, {"job_id": "j1"})
    v2 = _approved(registry)
    registry.mark_released(MODEL, v2, {"job_id": "j2"})
    registry.mark_released(MODEL, v1, {"job_id": "j3", "rollback": True, "reason": "v2 drifts"})
    assert registry.current_release(MODEL).version == v1
    assert registry.get(MODEL, v2).status is Status.ROLLED_BACK
    got = registry.get(MODEL, v1)
    assert got.status is Status.RELEASED and got.release["rollback"] is True
    assert got.history[-1]["reason"] == "v2 drifts"
    # a rollback target must have been released before
    v3 = _approved(registry)
    with pytest.raises(TransitionError, match="needs ROLLED_BACK or SUPERSEDED"):
        registry.mark_released(MODEL, v3, {"rollback": True})


def test_two_releases_racing_cannot_both_win(registry):
    v1 = _approved(registry)
    registry.mark_released(MODEL, v1, {"job_id": "j1"})
    v2, v3 = _approved(registry), _approved(registry)
    # Writer A read the head (v1 released) just before writer B released v2.
    stale = Registry(registry.table, registry.dynamodb)
    stale.released_version = lambda model: v1  # type: ignore[method-assign]
    registry.mark_released(MODEL, v2, {"job_id": "j2"})
    with pytest.raises(TransitionError, match="registry changed meanwhile"):
        stale.mark_released(MODEL, v3, {"job_id": "j3"})
    assert registry.current_release(MODEL).version == v2
    assert registry.get(MODEL, v3).status is Status.APPROVED
    assert registry.get(MODEL, v1).status is Status.SUPERSEDED
    assert [r.status for r in registry.list_versions(MODEL)].count(Status.RELEASED) == 1


def test_release_history_lists_released_versions_most_recently_released_first(registry):
    times = iter(f"2026-01-01T00:00:{s:02d}.000+00:00" for s in range(60))
    clocked = Registry(registry.table, registry.dynamodb, clock=lambda: next(times))
    versions = [_approved(clocked) for _ in range(4)]
    for v in versions[:3]:
        clocked.mark_released(MODEL, v, {})
    clocked.mark_released(MODEL, versions[0], {"rollback": True})  # v1 again, v3 rolled back
    history = clocked.release_history(MODEL, limit=10)
    assert [r.version for r in history] == [1, 3, 2]  # v4 (APPROVED) never released
    assert [r.status for r in history] == [Status.RELEASED, Status.ROLLED_BACK,
                                           Status.SUPERSEDED]
    assert [r.version for r in clocked.release_history(MODEL, limit=2)] == [1, 3]


def test_list_versions_is_oldest_first_and_excludes_the_head(registry):
    for _ in range(3):
        v = registry.allocate_version(MODEL)
        registry.create_training(MODEL, v, {})
    assert [r.version for r in registry.list_versions(MODEL)] == [1, 2, 3]
    assert registry.list_versions("digits") == []
