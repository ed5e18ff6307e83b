"""`zstd-patch`: the new model compressed by zstd with the old model as a raw-content
dictionary (what `zstd --patch-from` does), level 19, window spanning both files; above
16 MB of old + new the old model is referenced as a prefix at level 9 with long-distance
matching (see `_wire.zstd_compress_patch`). The frame format, and so decoding, is the same.

Fast to make (about 1% of bsdiff4's time where regions are unchanged), small where
bytes repeat, and decoding needs only old + new in memory.
"""

from __future__ import annotations

from ._wire import (
    apply_envelope,
    write_envelope,
    zstd_compress_patch,
    zstd_decompress_checked,
    zstd_decompressor,
)

NAME = "zstd-patch"
MAGIC = b"MZP1"
LEVEL = 19


def make(old: bytes, new: bytes) -> bytes:
    body = zstd_compress_patch(new, old, level=LEVEL)
    return write_envelope(MAGIC, old, new, body)


def _apply_body(old: bytes, body: bytes, new_size: int) -> bytes:
    return zstd_decompress_checked(
        body, max_size=new_size, what=NAME, decompressor=zstd_decompressor(old)
    )


def apply(old: bytes, delta: bytes) -> bytes:
    return apply_envelope(MAGIC, NAME, old, delta, _apply_body)
