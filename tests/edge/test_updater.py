"""The updater without MQTT: artifact choice, verification, failure classes, crash safety."""


from __future__ import annotations

import dataclasses

import pytest
from mledge_edge.download import Downloader
from mledge_edge.model import LoadedModel, ModelHandle
from mledge_edge.sensors import VIBRATION_FEATURES
from mledge_edge.store import INSTALL_STEPS, ModelStore
from mledge_edge.updater import UpdateFailedError, Updater, UpdateRejectedError
from mledge_update.hashing import sha256_hex
from mledge_update.signing import ReleaseVerifier

from tests.edge.support import (
    ArtifactServer,
    document_for,
    golden,
    make_kmeans_model,
    make_release,
    new_release_key,
    release_keys_pem,
    release_verifier,
    training_rows,
)


class SimulatedCrashError(BaseException):
    """Raised by the crash hook; nothing in the agent catches BaseException."""


@pytest.fixture(scope="module")
def models() -> dict[int, bytes]:
    return {v: make_kmeans_model(v, seed=v) for v in (1, 2, 3)}


def make_updater(tmp_path, crash_at: str | None = None, handle: ModelHandle | None = None) -> Updater:
    def hook(step: str) -> None:
        if step == crash_at:
            raise SimulatedCrashError(step)

    store = ModelStore(tmp_path / "state", hook)
    return Updater(store, handle or ModelHandle(), Downloader(store.downloads_dir, retries=2, backoff_s=0.01),
                   model_name="vibration-anomaly", verifier=release_verifier(),
                   expected_features=VIBRATION_FEATURES)


def run(updater: Updater, server: ArtifactServer, release, reports=None, **kwargs):
    reports = reports if reports is not None else []
    return updater.run("job-1", document_for(server, release, **kwargs), reports.append,
                       refresh_document=lambda: document_for(server, release))


def install(updater, server, version_bytes: dict[int, bytes], *versions: int):
    for v in versions:
        base = updater.store.state.current
        bases = [(base.version, version_bytes[base.version])] if base else []
        run(updater, server, make_release(server, v, version_bytes[v], bases))


def test_first_install_uses_the_full_model_and_reports_progress(tmp_path, artifacts, models):
    updater = make_updater(tmp_path)
    reports: list[dict[str, str]] = []
    result = run(updater, artifacts, make_release(artifacts, 1, models[1]), reports)
    assert result.codec == "full:zstd" and result.version == 1
    assert updater.handle.info.version == 1 and updater.handle.info.sha256 == sha256_hex(models[1])
    assert [r["stage"] for r in reports] == ["downloading", "verifying"]
    assert all(len(r) <= 10 and all(isinstance(v, str) for v in r.values()) for r in reports)
    state = updater.store.state
    assert state.current.version == 1 and state.pending_report.job_id == "job-1"
    assert updater.store.verify(state.current)


def test_update_uses_the_delta_and_keeps_the_previous_model(tmp_path, artifacts, models):
    updater = make_updater(tmp_path)
    install(updater, artifacts, models, 1)
    release = make_release(artifacts, 2, models[2], [(1, models[1])])
    result = run(updater, artifacts, release)
    delta_size = release.job.deltas[0].size
    assert result.codec == "delta:bsdiff4:v1" and result.bytes_downloaded == delta_size
    assert updater.store.state.previous.version == 1 and updater.store.verify(updater.store.state.previous)
    assert updater.handle.info.version == 2
    assert artifacts.requests_for("v2/model.onnx.zstd") == []


@pytest.mark.parametrize("corrupt", [False, True])
def test_streaming_codec_patches_from_file_to_file(tmp_path, artifacts, models, corrupt):
    updater = make_updater(tmp_path)
    install(updater, artifacts, models, 1)
    release = make_release(artifacts, 2, models[2], [(1, models[1])], codec="onnx-delta-2",
                           corrupt_delta=corrupt)
    result = run(updater, artifacts, release)
    assert result.codec == ("full:zstd" if corrupt else "delta:onnx-delta-2:v1")
    assert updater.handle.info.version == 2
    assert list(updater.store.incoming_dir.iterdir()) == []  # no partial files left behind


def test_corrupt_delta_falls_back_to_the_full_model(tmp_path, artifacts, models):
    updater = make_updater(tmp_path)
    install(updater, artifacts, models, 1)
    result = run(updater, artifacts, make_release(artifacts, 2, models[2], [(1, models[1])], corrupt_delta=True))
    assert result.codec == "full:zstd"
    assert updater.handle.info.version == 2


def test_full_model_with_wrong_hash_is_rejected_and_old_model_serves(tmp_path, artifacts, models):
    updater = make_updater(tmp_path)
    install(updater, artifacts, models, 1)
    release = make_release(artifacts, 2, models[2])
    name = release.names[release.job.full.sha256]
    artifacts.add(name, bytes(reversed(artifacts.blobs[name])))  # same size, other bytes
    with pytest.raises(UpdateRejectedError, match="sha256") as info:
        run(updater, artifacts, release)
    assert info.value.status == "REJECTED"
    assert len(artifacts.requests_for("v2/model.onnx.zstd")) == 2  # downloaded again once
    assert updater.handle.info.version == 1 and updater.store.state.current.version == 1


def test_failing_smoke_rows_reject_the_model(tmp_path, artifacts, models):
    updater = make_updater(tmp_path)
    install(updater, artifacts, models, 1)
    # Golden rows of another model: labels/scores will not match v2.
    smoke = golden(models[3], training_rows(5, seed=11))
    with pytest.raises(UpdateRejectedError, match="smoke"):
        run(updater, artifacts, make_release(artifacts, 2, models[2], smoke=smoke))
    assert updater.handle.info.version == 1
    assert list((updater.store.root / "incoming").iterdir()) == []


def test_downgrade_is_refused_unless_rollback_and_rollback_uses_the_kept_model(tmp_path, artifacts, models):
    updater = make_updater(tmp_path)
    install(updater, artifacts, models, 1, 2)
    with pytest.raises(UpdateRejectedError, match="downgrade"):
        run(updater, artifacts, make_release(artifacts, 1, models[1]))
    assert updater.handle.info.version == 2
    before = len(artifacts.requests)
    result = run(updater, artifacts, make_release(artifacts, 1, models[1], rollback=True))
    assert result.codec == "local" and len(artifacts.requests) == before
    assert updater.handle.info.version == 1 and updater.store.state.previous.version == 2


def test_incompatible_jobs_are_rejected(tmp_path, artifacts, models):
    updater = make_updater(tmp_path)
    wrong_schema = make_release(artifacts, 1, models[1], schema_features=[f"f{i}" for i in range(6)])
    with pytest.raises(UpdateRejectedError, match="schema has 6 features"):
        run(updater, artifacts, wrong_schema)
    release = make_release(artifacts, 1, models[1])
    doc = document_for(artifacts, release)
    with pytest.raises(UpdateRejectedError, match="newer"):
        updater.run("job-1", {**doc, "format": 2}, lambda d: None)
    with pytest.raises(UpdateRejectedError, match="other-model"):
        updater.run("job-1", {**doc, "model": "other-model"}, lambda d: None)
    mislabelled = dataclasses.replace(release, job=dataclasses.replace(release.job, version=4))
    with pytest.raises(UpdateRejectedError, match="metadata says v1"):
        run(updater, artifacts, mislabelled)
    assert updater.handle.current is None


def test_unreachable_artifacts_fail_retryably(tmp_path, artifacts, models):
    updater = make_updater(tmp_path)
    release = make_release(artifacts, 1, models[1])
    artifacts.blobs.clear()
    with pytest.raises(UpdateFailedError, match="download failed") as info:
        run(updater, artifacts, release)
    assert info.value.status == "FAILED"


def test_interrupted_download_resumes_with_range_and_expired_url_is_refreshed(tmp_path, artifacts):
    big = make_kmeans_model(1, k=250)  # a few tens of KB, so a cut leaves a partial file
    updater = make_updater(tmp_path)
    release = make_release(artifacts, 1, big, encoding="identity")
    name = release.names[release.job.full.sha256]
    artifacts.fail_next[name] = 1
    result = run(updater, artifacts, release, ttl=-1)  # first URL already expired
    requests = artifacts.requests_for(name)
    assert requests[0]["expired"] and not requests[1]["expired"]
    assert requests[1]["range"] is None and requests[2]["range"].startswith("bytes=")
    assert int(requests[2]["range"][6:].rstrip("-")) > 0
    assert result.version == 1 and updater.handle.info.sha256 == sha256_hex(big)


@pytest.mark.parametrize("step", INSTALL_STEPS[:5])
def test_crash_at_any_install_step_leaves_a_loadable_model(tmp_path, artifacts, models, step):
    updater = make_updater(tmp_path)
    install(updater, artifacts, models, 1)
    updater.store.clear_pending("job-1")
    crashing = make_updater(tmp_path, crash_at=step)
    with pytest.raises(SimulatedCrashError):
        run(crashing, artifacts, make_release(artifacts, 2, models[2], [(1, models[1])]))

    restarted = ModelStore(tmp_path / "state")  # a fresh process reading the disk
    record = restarted.recover()
    model = LoadedModel(restarted.path_of(record), record.sha256)
    assert model.info.version == record.version
    installed = step in ("after_state_write", "after_swap")
    assert record.version == (2 if installed else 1)
    pending = restarted.state.pending_report
    assert (pending is not None and pending.job_id == "job-1" and pending.version == 2) == installed
    assert sorted(p.name for p in (tmp_path / "state" / "models").iterdir()) == sorted(
        {restarted.path_of(r).name for r in (restarted.state.current, restarted.state.previous) if r})


def test_corrupted_current_model_falls_back_to_previous(tmp_path, artifacts, models):
    updater = make_updater(tmp_path)
    install(updater, artifacts, models, 1, 2)
    path = updater.store.path_of(updater.store.state.current)
    path.write_bytes(path.read_bytes()[:-10])
    restarted = ModelStore(tmp_path / "state")
    record = restarted.recover()
    assert record.version == 1 and restarted.state.previous is None
    assert restarted.state.pending_report is None


# ---------------------------------------------------------------------------- signed releases

def _refused_before_download(updater, artifacts, document, stage: str, match: str) -> None:
    """The release is REJECTED at `stage`, nothing is fetched, the old model serves on."""
    before = (updater.handle.info.version, updater.store.state.current)
    requests = len(artifacts.requests)
    with pytest.raises(UpdateRejectedError, match=match) as info:
        updater.run("job-x", document, lambda details: None)
    assert info.value.stage == stage and info.value.status == "REJECTED"
    assert len(artifacts.requests) == requests  # refused before downloading anything
    assert (updater.handle.info.version, updater.store.state.current) == before
    assert updater.handle.current.predict([0.1] * len(VIBRATION_FEATURES)) is not None


def test_unsigned_release_is_refused_and_the_device_keeps_serving(tmp_path, artifacts, models):
    updater = make_updater(tmp_path)
    install(updater, artifacts, models, 1)
    release = make_release(artifacts, 2, models[2], [(1, models[1])])
    _refused_before_download(updater, artifacts, document_for(artifacts, release, signed_with=None),
                             "signature", "is not signed")


def test_release_signed_with_another_key_is_refused(tmp_path, artifacts, models):
    updater = make_updater(tmp_path)
    install(updater, artifacts, models, 1)
    release = make_release(artifacts, 2, models[2], [(1, models[1])])
    document = document_for(artifacts, release, signed_with=new_release_key())
    _refused_before_download(updater, artifacts, document, "signature", "does not verify")


@pytest.mark.parametrize("tamper", [
    lambda d: d.update(model_sha256="0" * 64),                      # another model
    lambda d: d["full"].update(sha256="1" * 64, size=d["full"]["size"] + 1),  # another artifact
    lambda d: d["deltas"][0].update(from_sha256="2" * 64),          # another base
    lambda d: d["smoke"]["inputs"][0].__setitem__(0, 99.0),         # smoke rows that pass anything
    lambda d: d["uplink"].update(sample_rate=1.0),                  # uplink policy
    lambda d: d.update(version=d["version"] + 7),                   # version bump
    lambda d: d.update(rollback=True, rollback_from=9),             # turned into a rollback
    lambda d: d["signature"].update(value=d["signature"]["value"][:-8] + "AAAAAAA="),
], ids=["model_sha256", "full", "delta_base", "smoke", "uplink", "version", "rollback",
        "signature_bytes"])
def test_tampered_signed_document_is_refused(tmp_path, artifacts, models, tamper):
    updater = make_updater(tmp_path)
    install(updater, artifacts, models, 1)
    document = document_for(artifacts, make_release(artifacts, 2, models[2], [(1, models[1])]))
    tamper(document)
    _refused_before_download(updater, artifacts, document, "signature", "does not verify")


def test_urls_are_not_signed_so_each_delivery_may_presign_afresh(tmp_path, artifacts, models):
    updater = make_updater(tmp_path)
    release = make_release(artifacts, 1, models[1])
    document = document_for(artifacts, release, ttl=60)
    again = document_for(artifacts, release, ttl=120)
    assert document["full"]["url"] != again["full"]["url"]
    again["signature"] = document["signature"]  # the signature of the first delivery
    assert updater.run("job-1", again, lambda details: None).version == 1


def test_replayed_older_release_is_refused_even_after_the_newer_model_is_gone(tmp_path, artifacts,
                                                                             models):
    updater = make_updater(tmp_path)
    old = document_for(artifacts, make_release(artifacts, 1, models[1]))  # validly signed
    install(updater, artifacts, models, 1, 2, 3)
    _refused_before_download(updater, artifacts, old, "check", "downgrade to v1 refused")
    # The highest accepted version survives a restart and a state without v3's file.
    state = (tmp_path / "state" / "state.json")
    assert '"highest_version": 3' in state.read_text()
    fresh = make_updater(tmp_path)
    assert fresh.store.state.highest_version == 3
    with pytest.raises(UpdateRejectedError, match="downgrade to v1 refused"):
        fresh.run("job-y", old, lambda details: None)


def test_signed_rollback_is_taken_but_a_replayed_older_rollback_is_not(tmp_path, artifacts, models):
    updater = make_updater(tmp_path)
    install(updater, artifacts, models, 1, 2)
    back = make_release(artifacts, 1, models[1], rollback=True, rollback_from=2)
    stale_rollback = document_for(artifacts, back)
    assert updater.run("job-rb", stale_rollback, lambda details: None).codec == "local"
    assert updater.handle.info.version == 1 and updater.store.state.highest_version == 2
    # The fleet moves on to v3; replaying the signed "roll back from v2" must not move it back.
    run(updater, artifacts, make_release(artifacts, 3, models[3], [(1, models[1])]))
    _refused_before_download(updater, artifacts, stale_rollback, "check", "replayed older rollback")


def test_rotation_trusts_every_key_in_the_file(tmp_path, artifacts, models):
    old_key, new_key = new_release_key(), new_release_key()
    verifier = ReleaseVerifier.from_pem(release_keys_pem(old_key, new_key))
    updater = make_updater(tmp_path)
    updater.verifier = verifier
    run(updater, artifacts, make_release(artifacts, 1, models[1]), signed_with=old_key)
    run(updater, artifacts, make_release(artifacts, 2, models[2], [(1, models[1])]),
        signed_with=new_key)
    assert updater.handle.info.version == 2
    # After the rotation the file holds only the new key: the old one is refused.
    updater.verifier = ReleaseVerifier.from_pem(release_keys_pem(new_key))
    third = document_for(artifacts, make_release(artifacts, 3, models[3]), signed_with=old_key)
    _refused_before_download(updater, artifacts, third, "signature", "does not verify")
def test_an_update_deletes_partial_downloads_of_other_jobs(tmp_path, artifacts, models):
    updater = make_updater(tmp_path)
    folder = updater.downloader.folder
    stale = "ab" * 32  # a job canceled mid-download while the device was off
    (folder / f"{stale}.part").write_bytes(b"x" * 1000)
    (folder / f"{stale}.json").write_text('{"offset": 1000}')
    release = make_release(artifacts, 1, models[1])
    run(updater, artifacts, release)
    assert sorted(folder.iterdir()) == []


def test_discard_others_keeps_only_what_is_asked(tmp_path):
    downloader = Downloader(tmp_path / "dl")
    for sha in ("aa" * 32, "bb" * 32):
        (downloader.folder / f"{sha}.part").write_bytes(b"x")
        (downloader.folder / f"{sha}.json").write_text("{}")
    assert downloader.discard_others({"bb" * 32}) == ["aa" * 32]
    assert downloader.partials() == {"bb" * 32}
    assert downloader.discard_others() == ["bb" * 32]
    assert list(downloader.folder.iterdir()) == []
