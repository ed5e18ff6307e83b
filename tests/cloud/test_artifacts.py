"""The artifacts seam: S3 URIs, size-checked reads, the streaming tar reader."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chalicelib.artifacts import ArtifactError, open_object, parse_s3_uri, s3_uri, tar_members

BUCKETS = st.from_regex(r"[a-z0-9][a-z0-9.-]{1,30}[a-z0-9]", fullmatch=True)
KEYS = st.from_regex(r"[A-Za-z0-9!_.*'()/-]{0,40}[A-Za-z0-9]", fullmatch=True)


@given(BUCKETS, KEYS)
def test_an_s3_uri_parses_back_to_its_bucket_and_key(bucket, key):
    assert parse_s3_uri(s3_uri(bucket, key.lstrip("/") or "k")) == (bucket, key.lstrip("/") or "k")


@pytest.mark.parametrize("uri", ["", "s3://", "s3://bucket", "s3://bucket/", "http://b/k", "models/x"])
def test_what_is_not_an_s3_object_uri_is_refused(uri):
    with pytest.raises(ArtifactError, match="is not an s3:// URI"):
        parse_s3_uri(uri)


def test_a_bare_key_is_taken_in_the_default_bucket():
    assert parse_s3_uri("/models/m/a.tar.gz", "b") == ("b", "models/m/a.tar.gz")


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_tar_members_yields_only_the_named_members_within_their_limits():
    blob = _tar({"./metrics.json": b"{}", "other.bin": b"x" * 100, "model.onnx": b"m" * 10})
    got = {name: h.read() for name, h in tar_members(io.BytesIO(blob), "s3://b/k", {"metrics.json": 2,
                                                                                   "model.onnx": 10})}
    assert got == {"metrics.json": b"{}", "model.onnx": b"m" * 10}


def test_an_oversized_member_is_refused_before_it_is_read():
    blob = _tar({"model.onnx": b"m" * 11})
    with pytest.raises(ArtifactError, match="over the limit of 10"):
        list(tar_members(io.BytesIO(blob), "s3://b/k", {"model.onnx": 10}))


@pytest.mark.parametrize("blob", [b"", b"not a tar", gzip.compress(b"not a tar either", mtime=0),
                                  _tar({"a": b"1"})[:40]], ids=["empty", "text", "gzip-not-tar", "truncated"])
def test_what_is_not_a_tar_archive_is_an_artifact_error(blob):
    with pytest.raises(ArtifactError, match=r"is not a readable tar\.gz"):
        list(tar_members(io.BytesIO(blob), "s3://b/k", {"model.onnx": 10}))


def test_missing_and_oversized_objects_are_artifact_errors(aws, settings):
    aws.s3.put_object(Bucket=settings.bucket, Key="big", Body=b"x" * 100)
    with pytest.raises(ArtifactError, match="not found"):
        open_object(aws.s3, settings.bucket, "absent")
    with pytest.raises(ArtifactError, match="larger than 99 bytes"):
        open_object(aws.s3, settings.bucket, "big", max_bytes=99)
    assert open_object(aws.s3, settings.bucket, "big").read() == b"x" * 100
