"""Releases under real event delivery: late, replayed and concurrent ModelApproved events,
rollbacks back and forth, a failed release retried, the training lock across a release.

Interleavings are replayed deterministically: one packaging is paused at a point inside
the code (a wrapped function) while the other runs to the end, then resumed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from chalicelib import packaging
from chalicelib.model_events import new_attempt
from chalicelib.operator import Operator
from chalicelib.registry import Status
from chalicelib.state import StateStore
from tests.cloud.test_packaging import MODEL, approve, artifact, kmeans_onnx, publish

LIVE = ("IN_PROGRESS", "SCHEDULED", "QUEUED")  # moto starts jobs QUEUED



def job_statuses(env: dict[str, Any]) -> dict[str, str]:
    iot = env["aws"].iot
    return {j["jobId"]: iot.describe_job(jobId=j["jobId"])["job"]["status"]
            for j in iot.list_jobs()["jobs"]}


def live_jobs(env: dict[str, Any]) -> list[str]:
    return sorted(j for j, status in job_statuses(env).items() if status in LIVE)


def released(env: dict[str, Any]) -> int | None:
    return env["registry"].released_version(MODEL)


def test_a_late_approval_never_replaces_a_newer_release(env) -> None:
    v1 = approve(env, artifact(kmeans_onnx(1)))
    v2 = approve(env, artifact(kmeans_onnx(2)))
    assert publish(env, v2)["outcome"] == "released"
    late = publish(env, v1)  # v1's ModelApproved arrives after v2 was released
    assert late["outcome"] == "skipped"
    assert "older than the current release v2" in late["reason"]
    assert released(env) == v2
    assert live_jobs(env) == ["mledge-vibration-anomaly-v00002"]
    history = env["registry"].get(MODEL, v1).history
    assert "release skipped: v1 is older than the current release v2" in history[-1]["reason"]


def _pause(monkeypatch, target: str, when: Callable[[Any], bool], other: Callable[[], Any],
           *, after: bool) -> list[Any]:
    """Wrap packaging.<target>: on the first call matching `when`, run `other()` to the end
    (before or after the wrapped call), then go on."""
    original = getattr(packaging, target)
    ran: list[Any] = []
    paused: list[bool] = []

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        hit = not paused and when((args, kwargs))
        if hit:
            paused.append(True)  # the other invocation runs through unpaused
        if hit and not after:
            ran.append(other())
        result = original(*args, **kwargs)
        if hit and after:
            ran.append(other())
        return result

    monkeypatch.setattr(packaging, target, wrapped)
    return ran


def _version_of(call: Any) -> int:
    args, kwargs = call
    if "version" in kwargs:
        return int(kwargs["version"])
    return int(args[0].version)  # _mark_released(event, ...)


# Pause points: after reading the registry and building deltas (before the job exists),
# after the job was created (before the registry moves), just before the registry write.
PAUSES = [("_build_deltas", False), ("ota_create", True), ("_mark_released", False)]


@pytest.mark.parametrize("paused_first", ["older", "newer"])
@pytest.mark.parametrize("pause", PAUSES, ids=[p[0] for p in PAUSES])
def test_two_packagings_in_any_interleaving_leave_one_live_job_for_the_newest(
        env, monkeypatch, paused_first: str, pause: tuple[str, bool]) -> None:
    v1 = approve(env, artifact(kmeans_onnx(1)))
    publish(env, v1)
    v2 = approve(env, artifact(kmeans_onnx(2)))
    v3 = approve(env, artifact(kmeans_onnx(3)))
    first, second = (v2, v3) if paused_first == "older" else (v3, v2)
    target, after = pause
    if target == "ota_create":
        original = packaging.ota.ensure_update_job
        ran: list[Any] = []

        def ensure(iot: Any, **kwargs: Any) -> bool:
            created = original(iot, **kwargs)
            if not ran and kwargs["version"] == first:  # `second` never matches: no nesting
                ran.append(publish(env, second))
            return created

        monkeypatch.setattr(packaging.ota, "ensure_update_job", ensure)
    else:
        def is_first(call: Any) -> bool:
            if target == "_build_deltas":
                return True  # only the first packaging reaches it before the pause
            return _version_of(call) == first

        ran = _pause(monkeypatch, target, is_first, lambda: publish(env, second), after=after)
    result = publish(env, first)
    assert ran, "the second packaging ran inside the first"
    assert released(env) == v3
    assert live_jobs(env) == ["mledge-vibration-anomaly-v00003"]
    outcomes = {first: result["outcome"], second: ran[0]["outcome"]}
    assert outcomes[v3] == "released"
    assert outcomes[v2] in ("released", "skipped")  # skipped when v3 was released first
    registry = env["registry"]
    assert registry.get(MODEL, v3).status is Status.RELEASED
    assert registry.get(MODEL, v1).status is Status.SUPERSEDED


def test_rollbacks_back_and_forth_each_get_their_own_live_job(env) -> None:
    v1 = approve(env, artifact(kmeans_onnx(1)))
    publish(env, v1)
    v2 = approve(env, artifact(kmeans_onnx(2, n=600)))
    publish(env, v2)
    jobs = []
    for step in range(6):
        to, current = (v1, v2) if step % 2 == 0 else (v2, v1)
        result = publish(env, to, rollback=True, manual=True, replaces=current,
                         attempt=new_attempt())
        assert result["outcome"] == "released", result
        jobs.append(result["job_id"])
        # the new job is live (a device connecting now gets it); every other one is not
        assert live_jobs(env) == [result["job_id"]]
        assert released(env) == to
        # and `mledge fleet` reports that job, not a cancelled one reused
        fleet = Operator(clients=env["aws"], settings=env["settings"],
                         config=packaging_config()).fleet(MODEL)
        assert (fleet.released_version, fleet.job_id) == (to, result["job_id"])
        assert fleet.job_status not in ("CANCELED", "COMPLETED")
    assert len(set(jobs)) == len(jobs)


def test_a_rollback_event_that_arrives_after_a_newer_release_is_skipped(env) -> None:
    v1 = approve(env, artifact(kmeans_onnx(1)))
    publish(env, v1)
    v2 = approve(env, artifact(kmeans_onnx(2)))
    publish(env, v2)
    v3 = approve(env, artifact(kmeans_onnx(3)))
    publish(env, v3)
    late = publish(env, v1, rollback=True, manual=True, replaces=v2, attempt="late")
    assert late["outcome"] == "skipped" and "now runs v3" in late["reason"]
    assert released(env) == v3


def test_a_failed_release_is_retried_with_mledge_release(env) -> None:
    v1 = approve(env, b"not a tar.gz")
    failed = publish(env, v1)
    assert failed["outcome"] == "failed"
    registry, aws, settings = env["registry"], env["aws"], env["settings"]
    assert registry.get(MODEL, v1).status is Status.APPROVED
    # the artifact is fixed (re-uploaded), then the operator asks for the release again
    key = registry.get(MODEL, v1).artifact.split("/", 3)[3]
    aws.s3.put_object(Bucket=settings.bucket, Key=key, Body=artifact(kmeans_onnx(1)))
    op = Operator(clients=aws, settings=settings, config=packaging_config())
    request = op.release(MODEL, v1, reason="artifact fixed", actor="ana")
    result = publish(env, v1, attempt=request.attempt, manual=False)
    assert result["outcome"] == "released", result
    assert result["job_id"] == f"mledge-vibration-anomaly-v00001-retry-{request.attempt}"
    assert live_jobs(env) == [result["job_id"]]
    assert registry.get(MODEL, v1).status is Status.RELEASED
    # a released version cannot be "released again"; neither can an older approval
    with pytest.raises(packaging_conflict()):
        op.release(MODEL, v1)


def test_the_approved_version_keeps_the_training_lock_until_its_release_is_done(env) -> None:
    state = StateStore(env["settings"].state_table, env["aws"].dynamodb)
    v1 = approve(env, artifact(kmeans_onnx(1)))
    assert state.acquire_training_lock(MODEL, v1, "job")  # what completion leaves behind
    assert not state.acquire_training_lock(MODEL, 99, "other")  # no training meanwhile
    publish(env, v1)
    assert state.training_lock(MODEL) is None
    v2 = approve(env, b"broken")
    assert state.acquire_training_lock(MODEL, v2, "job")
    assert publish(env, v2)["outcome"] == "failed"
    assert state.training_lock(MODEL) is None  # a failed release frees it too


def packaging_config() -> Any:
    from chalicelib.runtime import get_runtime

    return get_runtime().config


def packaging_conflict() -> type[Exception]:
    from chalicelib.registry import ConflictError

    return ConflictError
