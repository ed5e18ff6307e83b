"""`zstd-patch`: the new model compressed by zstd with the old model as a raw-content
dictionary (what `zstd --patch-from` does), level 19, window spanning both files.

Fast to make (about 1% of bsdiff4's time where regions are unchanged), small where
bytes repeat, and decoding needs only old + new in memory.
"""

from __future__ import annotations

from ._wire import (
    apply_envelope,
    write_envelope,
    zstd_compress,
    zstd_decompress_checked,
    zstd_decompressor,
)

NAME = "zstd-patch"
MAGIC = b"MZP1"
LEVEL = 19


def make(old: bytes, new: bytes) -> bytes:
    body = zstd_compress(new, level=LEVEL, dictionary=old, long_window=True)
    return write_envelope(MAGIC, old, new, body)


def _apply_body(old: bytes, body: bytes, new_size: int) -> bytes:
    return zstd_decompress_checked(
        body, max_size=new_size, what=NAME, decompressor=zstd_decompressor(old)
    )


def apply(old: bytes, delta: bytes) -> bytes:
    return apply_envelope(MAGIC, NAME, old, delta, _apply_body)
