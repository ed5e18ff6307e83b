"""Job documents and release manifests from outside: parsed, or a JobDocumentError naming the
field; never any other exception (deep nesting, huge numbers, wrong types at every field)."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mledge_update.document import (
    UpdateJob,
    build_manifest,
    parse_job_document,
    parse_manifest,
)
from mledge_update.errors import JobDocumentError

from tests.fuzz_strategies import json_values, nasty_numbers, nasty_text
from tests.update_format.test_document import _job

DOCUMENT = _job().to_document()
MANIFEST = build_manifest(_job(), created_at="2026-01-01T00:00:00Z", metrics={"a": 1})

# Every field path of a valid document, so each one gets the wrong type.
_PATHS = [("operation",), ("format",), ("model",), ("version",), ("model_sha256",),
          ("model_size",), ("rollback",), ("full",), ("full", "encoding"), ("full", "size"),
          ("full", "sha256"), ("full", "url"), ("deltas",), ("deltas", 0),
          ("deltas", 0, "from_version"), ("deltas", 0, "codec"), ("deltas", 0, "size"),
          ("deltas", 0, "url"), ("smoke",), ("smoke", "input_name"), ("smoke", "inputs"),
          ("smoke", "inputs", 0), ("smoke", "inputs", 0, 0), ("smoke", "outputs"),
          ("smoke", "tolerance"), ("schema",), ("schema", "features"), ("uplink",)]


def _spoil(doc: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    target: Any = doc
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return doc


def _parsed_or_error(parse: Any, doc: Any) -> None:
    try:
        job = parse(doc)
    except JobDocumentError as exc:
        assert exc.field and str(exc)
        return
    assert isinstance(job, UpdateJob)
    assert type(job.version) is int and 1 <= job.version < 2**63
    assert all(isinstance(v, float) for row in job.smoke.inputs for v in row)


@pytest.mark.parametrize("doc", [
    "[" * 100_000 + "]" * 100_000,
    json.dumps(_spoil(DOCUMENT, ("smoke", "inputs", 0, 0), 10**400)),
    json.dumps(_spoil(DOCUMENT, ("smoke", "tolerance"), -(10**309))),
    json.dumps(_spoil(DOCUMENT, ("version",), 10**30)),
    b"\xff\xfe{}",
])
def test_inputs_that_used_to_raise_are_job_document_errors(doc: Any) -> None:
    with pytest.raises(JobDocumentError):
        parse_job_document(doc)


@given(path=st.sampled_from(_PATHS),
       value=st.one_of(json_values(), nasty_numbers(), nasty_text()))
def test_a_spoiled_job_document_parses_or_names_the_field(path: tuple[Any, ...],
                                                          value: Any) -> None:
    doc = _spoil(DOCUMENT, path, value)
    _parsed_or_error(parse_job_document, doc)
    try:
        text = json.dumps(doc)
    except ValueError:
        return  # not representable as JSON text (a lone surrogate is, NaN is)
    _parsed_or_error(parse_job_document, text)


@given(path=st.sampled_from([p for p in _PATHS if "url" not in p]),
       value=st.one_of(json_values(), nasty_numbers(), nasty_text()))
def test_a_spoiled_manifest_parses_or_names_the_field(path: tuple[Any, ...], value: Any) -> None:
    _parsed_or_error(parse_manifest, _spoil(MANIFEST, path, value))


@given(doc=st.one_of(json_values(), nasty_text(), st.binary(max_size=64)))
def test_any_value_is_a_job_document_or_an_error(doc: Any) -> None:
    _parsed_or_error(parse_job_document, doc)
    _parsed_or_error(parse_manifest, doc)
