"""Job document and release manifest: build, parse, validate, fit, candidates."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
from mledge_update.document import (
    FORMAT_VERSION,
    JOB_DOCUMENT_MAX_CHARS,
    OPERATION,
    Delta,
    FullModel,
    Smoke,
    UpdateJob,
    build_manifest,
    fit_job_document,
    job_from_manifest,
    parse_job_document,
    parse_manifest,
    presigned_url_placeholder,
    serialize_job_document,
    smoke_from_golden,
)
from mledge_update.errors import (
    JobDocumentError,
    JobDocumentTooLargeError,
    UnsupportedFormatError,
)
from mledge_update.hashing import sha256_hex

INSTALLED = sha256_hex(b"v2")
OLDER = sha256_hex(b"v1")


def _url(key: str) -> str:
    return presigned_url_placeholder("us-east-1", "mledge-test-data", key)


def _job(**changes) -> UpdateJob:
    prefix = "releases/vibration-anomaly/v00003/"
    job = UpdateJob(
        model="vibration-anomaly",
        version=3,
        model_sha256=sha256_hex(b"v3"),
        model_size=1234,
        full=FullModel(encoding="zstd", size=900, sha256=sha256_hex(b"full"),
                       url=_url(prefix + "model.onnx.zst"), key=prefix + "model.onnx.zst"),
        deltas=(
            Delta(1, OLDER, "bsdiff4", 500, sha256_hex(b"d1"), _url(prefix + "from-v1.bsdiff4"),
                  prefix + "from-v1.bsdiff4"),
            Delta(2, INSTALLED, "bsdiff4", 300, sha256_hex(b"d2"), _url(prefix + "from-v2.bsdiff4"),
                  prefix + "from-v2.bsdiff4"),
            Delta(2, INSTALLED, "codec-from-the-future", 10, sha256_hex(b"d3"), _url(prefix + "from-v2.future"),
                  prefix + "from-v2.future"),
        ),
        smoke=Smoke("input", [[0.1] * 8, [0.2] * 8], {"label": [0, 1], "scores": [[0.5, 1.5], [1.0, 0.2]]}, 1e-4),
        schema={"features": [f"f{i}" for i in range(8)], "label": "none"},
        uplink={"before_model": "all", "anomalies": True, "sample_rate": 0.02, "summary_interval_seconds": 60},
    )
    return replace(job, **changes)


def test_document_has_the_contract_fields_and_round_trips() -> None:
    job = _job()
    doc = job.to_document()
    assert doc["operation"] == OPERATION == "mledge.model-update"
    assert doc["format"] == FORMAT_VERSION == 1
    assert doc["full"] == {"encoding": "zstd", "url": job.full.url, "size": 900, "sha256": job.full.sha256}
    assert set(doc["deltas"][0]) == {"from_version", "from_sha256", "codec", "url", "size", "sha256"}
    assert doc["full"]["url"].startswith("${aws:iot:s3-presigned-url:https://s3.us-east-1.amazonaws.com/mledge-test-data/")
    # JSON text (as a device receives it) parses to the same job, without the S3 keys.
    parsed = parse_job_document(serialize_job_document(doc))
    assert parsed == replace(job, full=replace(job.full, key=None),
                             deltas=tuple(replace(d, key=None) for d in job.deltas))


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    doc = _job().to_document()
    doc["provenance"] = "added in a later version"
    doc["full"]["mirror"] = "https://example.invalid"
    doc["deltas"][0]["window_log"] = 27
    assert parse_job_document(doc).version == 3


def test_newer_format_is_unsupported_and_names_the_field() -> None:
    doc = _job().to_document()
    doc["format"] = FORMAT_VERSION + 1
    with pytest.raises(UnsupportedFormatError) as info:
        parse_job_document(doc)
    assert info.value.field == "format"
    assert isinstance(info.value, JobDocumentError)


def _delete(doc, path):
    *parents, last = path
    for p in parents:
        doc = doc[p]
    del doc[last]


def _set(doc, path, value):
    *parents, last = path
    for p in parents:
        doc = doc[p]
    doc[last] = value


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("operation",), "something-else", "operation"),
        (("format",), "1", "format"),
        (("format",), 0, "format"),
        (("model",), "", "model"),
        (("version",), True, "version"),
        (("version",), 0, "version"),
        (("version",), 2.5, "version"),
        (("rollback",), "no", "rollback"),
        (("model_sha256",), "ABC", "model_sha256"),
        (("model_size",), -1, "model_size"),
        (("full",), [], "full"),
        (("full", "sha256"), "0" * 63, "full.sha256"),
        (("full", "size"), "900", "full.size"),
        (("full", "url"), 5, "full.url"),
        (("deltas",), {}, "deltas"),
        (("deltas", 1), "not an object", "deltas[1]"),
        (("deltas", 1, "from_sha256"), "x", "deltas[1].from_sha256"),
        (("deltas", 0, "from_version"), 0, "deltas[0].from_version"),
        (("deltas", 2, "codec"), "", "deltas[2].codec"),
        (("smoke", "inputs"), [], "smoke.inputs"),
        (("smoke", "inputs", 1), [0.1] * 7, "smoke.inputs[1]"),
        (("smoke", "inputs", 0, 3), "0.1", "smoke.inputs[0][3]"),
        (("smoke", "outputs"), {}, "smoke.outputs"),
        (("smoke", "tolerance"), -1, "smoke.tolerance"),
        (("schema", "features"), [], "schema.features"),
        (("uplink",), "all", "uplink"),
    ],
)
def test_invalid_field_raises_error_naming_it(path, value, field) -> None:
    doc = _job().to_document()
    _set(doc, path, value)
    with pytest.raises(JobDocumentError) as info:
        parse_job_document(doc)
    assert info.value.field == field
    assert str(info.value).startswith(field)


@pytest.mark.parametrize(
    ("path", "field"),
    [
        (("operation",), "operation"),
        (("model_sha256",), "model_sha256"),
        (("full",), "full"),
        (("full", "url"), "full.url"),
        (("deltas", 0, "url"), "deltas[0].url"),
        (("smoke",), "smoke"),
        (("smoke", "input_name"), "smoke.input_name"),
        (("schema",), "schema"),
    ],
)
def test_missing_field_is_named(path, field) -> None:
    doc = _job().to_document()
    _delete(doc, path)
    with pytest.raises(JobDocumentError, match="missing") as info:
        parse_job_document(doc)
    assert info.value.field == field


def test_optional_fields_default() -> None:
    doc = _job().to_document()
    for key in ("deltas", "uplink", "rollback"):
        del doc[key]
    del doc["smoke"]["tolerance"]
    job = parse_job_document(doc)
    assert (job.deltas, job.uplink, job.rollback, job.smoke.tolerance) == ((), {}, False, 1e-4)


def test_not_json_and_not_an_object() -> None:
    with pytest.raises(JobDocumentError, match="not valid JSON"):
        parse_job_document("{oops")
    with pytest.raises(JobDocumentError, match="expected an object"):
        parse_job_document("[1, 2]")


def test_candidates_matching_supported_deltas_smallest_first_then_full() -> None:
    job = _job()
    bigger_alternative = Delta(2, INSTALLED, "zstd", 450, sha256_hex(b"d4"), "u4")
    job = replace(job, deltas=(*job.deltas, bigger_alternative))
    got = job.candidates(INSTALLED, supported=("bsdiff4", "zstd"))
    assert [(a.kind, getattr(a, "codec", None), a.size) for a in got] == [
        ("delta", "bsdiff4", 300), ("delta", "zstd", 450), ("full", None, 900)
    ]


def test_candidates_ignore_unknown_codec_and_other_bases() -> None:
    job = _job()
    # The 10-byte delta uses a codec this device does not know: never offered, no error.
    assert [a.size for a in job.candidates(INSTALLED, supported=("bsdiff4",))] == [300, 900]
    assert [a.size for a in job.candidates(INSTALLED, supported=("bsdiff4", "codec-from-the-future"))] == [10, 300, 900]
    assert [a.size for a in job.candidates(OLDER)] == [500, 900]
    assert job.candidates(INSTALLED.upper())[0].size == 300
    assert [a.kind for a in job.candidates(None)] == ["full"]
    assert [a.kind for a in job.candidates(sha256_hex(b"unknown base"))] == ["full"]


def test_candidates_skip_a_full_model_in_an_unknown_encoding() -> None:
    job = _job(full=replace(_job().full, encoding="brotli"))
    assert [a.size for a in job.candidates(INSTALLED)] == [300]


def _big_smoke(rows: int) -> Smoke:
    return Smoke("input", [[float(i) + 0.123456789] * 64 for i in range(rows)], {"label": list(range(rows))})


def test_fit_keeps_everything_when_it_fits() -> None:
    job = _job()
    assert fit_job_document(job) == job.to_document()


def test_fit_drops_oldest_deltas_first() -> None:
    job = _job()
    full_text = len(serialize_job_document(job.to_document()))
    # Room for all but one delta: the v1 delta (oldest base) goes.
    doc = fit_job_document(job, max_chars=full_text - 1)
    assert [d["from_version"] for d in doc["deltas"]] == [2, 2]
    assert len(serialize_job_document(doc)) <= full_text - 1


def test_fit_against_the_real_limit_with_large_smoke_rows() -> None:
    many = tuple(
        Delta(v, sha256_hex(str(v).encode()), "bsdiff4", 100 + v, sha256_hex(b"d%d" % v),
              _url(f"releases/digits/v00099/from-v{v:05d}.bsdiff4" + "x" * 400))
        for v in range(1, 40)
    )
    job = _job(deltas=many, smoke=_big_smoke(16))
    assert len(serialize_job_document(job.to_document())) > JOB_DOCUMENT_MAX_CHARS
    doc = fit_job_document(job)
    text = serialize_job_document(doc)
    assert len(text) <= JOB_DOCUMENT_MAX_CHARS
    kept = [d["from_version"] for d in doc["deltas"]]
    assert kept and kept == list(range(40 - len(kept), 40))  # the newest bases survive
    assert parse_job_document(text).version == 3


def test_fit_raises_when_even_without_deltas_it_is_too_large() -> None:
    job = _job(smoke=_big_smoke(200))
    with pytest.raises(JobDocumentTooLargeError, match="32768"):
        fit_job_document(job)


def test_to_document_needs_urls() -> None:
    job = _job(full=replace(_job().full, url=None))
    with pytest.raises(JobDocumentError, match=r"full\.url"):
        job.to_document()


def test_manifest_uses_keys_and_job_from_manifest_makes_urls() -> None:
    job = _job()
    manifest = build_manifest(job, created_at="2025-01-02T03:04:05Z", metrics={"challenger": {"silhouette": 0.6}})
    assert manifest["created_at"] == "2025-01-02T03:04:05Z"
    assert manifest["metrics"] == {"challenger": {"silhouette": 0.6}}
    assert "url" not in manifest["full"] and manifest["full"]["key"] == job.full.key
    assert all("url" not in d and d["key"] for d in manifest["deltas"])
    text = json.dumps(manifest)
    assert parse_manifest(text).full.key == job.full.key
    rebuilt = job_from_manifest(text, _url)
    assert rebuilt.to_document() == job.to_document()
    missing_key = copy.deepcopy(manifest)
    del missing_key["deltas"][1]["key"]
    with pytest.raises(JobDocumentError) as info:
        job_from_manifest(missing_key, _url)
    assert info.value.field == "deltas[1].key"


def test_smoke_from_trainer_golden() -> None:
    golden = {"input_name": "input", "inputs": [[1, 2.5]],
              "outputs": {"label": [1], "scores": [[0.1, 0.9]]}, "tolerance": 1e-4}
    smoke = smoke_from_golden(golden)
    assert smoke == Smoke("input", [[1.0, 2.5]], {"label": [1], "scores": [[0.1, 0.9]]}, 1e-4)


def test_health_probe_round_trips_and_bad_values_are_named():
    from mledge_update.document import HealthProbe

    job = parse_job_document(_job().to_document())
    assert job.health is None and "health" not in _job().to_document()
    probed = parse_job_document({**_job().to_document(), "health": {"readings": 25}})
    assert probed.health == HealthProbe(readings=25)
    assert replace(_job(), health=HealthProbe(25)).to_document()["health"] == {"readings": 25}
    for bad, path in (({"readings": 0}, "health.readings"), ({"readings": "5"}, "health.readings"),
                      ({"readings": 10_001}, "health.readings"), ([], "health")):
        with pytest.raises(JobDocumentError) as info:
            parse_job_document({**_job().to_document(), "health": bad})
        assert info.value.field == path
