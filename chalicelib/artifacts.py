"""The one seam for training artifacts in S3: URI parsing, size-checked reads and a
streaming tar reader, with one error (`ArtifactError`).

Completion reads `metrics.json` (and hashes `model.onnx`) from a job's `model.tar.gz`;
packaging reads `model.onnx`, `golden.json` and `metrics.json` from it. Both stream the
archive from S3 through `tar_members` (nothing but the members asked for is kept, each
under its own size limit), so a huge or hostile artifact cannot fill the Lambda's memory.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator, Mapping
from typing import IO, Any
from urllib.parse import urlparse

from botocore.exceptions import ClientError

from chalicelib.aws import error_code

# The training artifact is small (a model plus two JSON files); refuse anything that
# would make the Lambda read gigabytes into memory.
MAX_ARTIFACT_BYTES = 512 * 1024 * 1024
MAX_MEMBER_BYTES = 256 * 1024 * 1024

_MISSING = ("NoSuchKey", "404", "NotFound", "NoSuchBucket")


class ArtifactError(Exception):
    """The training artifact is missing, unreadable, corrupt or incomplete."""


def s3_uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def parse_s3_uri(uri: str, default_bucket: str | None = None) -> tuple[str, str]:
    """(bucket, key) of `s3://bucket/key`; a bare key is taken in `default_bucket` when given."""
    if uri.startswith("s3://"):
        parsed = urlparse(uri)
        key = parsed.path.lstrip("/")
        if parsed.netloc and key:
            return parsed.netloc, key
    elif default_bucket is not None and uri.strip("/"):
        return default_bucket, uri.lstrip("/")
    raise ArtifactError(f"model artifact location {uri!r} is not an s3:// URI")


def open_object(s3: Any, bucket: str, key: str, *, max_bytes: int = MAX_ARTIFACT_BYTES) -> IO[bytes]:
    """The object's streaming body, after checking its size.

    A missing or oversized object is an ArtifactError; any other S3 error (throttling,
    access) propagates, so the caller decides whether it is worth a retry.
    """
    uri = s3_uri(bucket, key)
    try:
        head = s3.head_object(Bucket=bucket, Key=key)
        if head.get("ContentLength", 0) > max_bytes:
            raise ArtifactError(f"{uri} is larger than {max_bytes} bytes")
        body: IO[bytes] = s3.get_object(Bucket=bucket, Key=key)["Body"]
        return body
    except ClientError as exc:
        if error_code(exc) in _MISSING:
            raise ArtifactError(f"model artifact {uri} not found") from None
        raise


def read_object(s3: Any, bucket: str, key: str, *, max_bytes: int = MAX_ARTIFACT_BYTES) -> bytes:
    """The whole object (size-checked first)."""
    return open_object(s3, bucket, key, max_bytes=max_bytes).read()


def tar_members(stream: IO[bytes], uri: str, limits: Mapping[str, int]) -> Iterator[tuple[str, IO[bytes]]]:
    """(name, reader) for each regular-file member named in `limits`, read as a stream.

    `limits` maps a member name (a leading `./` is ignored) to its largest allowed size;
    a bigger member is an ArtifactError. The reader is valid until the next member.
    A stream that is not a (compressed) tar archive is an ArtifactError.
    """
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as archive:
            for member in archive:
                name = member.name.removeprefix("./")
                if name not in limits or not member.isfile():
                    continue
                if member.size > limits[name]:
                    raise ArtifactError(f"{name} in {uri} is {member.size} bytes, over the limit of "
                                        f"{limits[name]}")
                handle = archive.extractfile(member)
                if handle is not None:
                    yield name, handle
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise ArtifactError(f"model artifact {uri} is not a readable tar.gz: {exc}") from None
