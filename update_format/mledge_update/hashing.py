"""SHA-256 helpers: every artifact in the update format is identified by its SHA-256 hex."""

from __future__ import annotations

import hashlib
import os

_CHUNK = 1 << 20


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    """Lower-case hex SHA-256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Lower-case hex SHA-256 of a file, read in 1 MiB chunks (models can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def is_sha256_hex(value: object) -> bool:
    """True when `value` is 64 lower-case hex characters."""
    return (
        isinstance(value, str)
        and len(value) == 64
        and all(c in "0123456789abcdef" for c in value)
    )
