"""Small binary helpers shared by the mledge delta codecs: varints, a reader that turns
every out-of-bounds read into PatchError, and the envelope every mledge codec writes.

Envelope (all mledge codecs except the plain-format `bsdiff4`):
    magic (4 bytes, one per codec), old size (varint), old sha256 (32 bytes),
    new size (varint), new sha256 (32 bytes), codec body.
It lets `apply` refuse a delta for another base and verify its own output, so a delta
never silently yields garbage.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import zstandard

from .errors import PatchError

MAX_OUTPUT_BYTES = 2**31


def put_varint(out: bytearray, value: int) -> None:
    if value < 0:
        raise ValueError("varints are unsigned")
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return


class Reader:
    """Sequential reader over a delta; every malformed read raises PatchError."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def fail(self, problem: str) -> PatchError:
        return PatchError(f"{self.what}: {problem} (at byte {self.pos})")

    def varint(self, limit: int = 2**63) -> int:
        shift = value = 0
        while True:
            if self.pos >= len(self.data):
                raise self.fail("truncated delta")
            byte = self.data[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
            if shift > 63:
                raise self.fail("varint too long")
        if value > limit:
            raise self.fail(f"value {value} exceeds {limit}")
        return value

    def take(self, length: int) -> bytes:
        if length < 0 or self.pos + length > len(self.data):
            raise self.fail("truncated delta")
        chunk = self.data[self.pos : self.pos + length]
        self.pos += length
        return chunk

    def done(self) -> None:
        if self.pos != len(self.data):
            raise self.fail(f"{len(self.data) - self.pos} unexpected trailing bytes")


def write_envelope(magic: bytes, old: bytes, new: bytes, body: bytes) -> bytes:
    out = bytearray(magic)
    put_varint(out, len(old))
    out += hashlib.sha256(old).digest()
    put_varint(out, len(new))
    out += hashlib.sha256(new).digest()
    return bytes(out) + body


def apply_envelope(
    magic: bytes, what: str, old: bytes, delta: bytes, body_apply: Callable[[bytes, bytes, int], bytes]
) -> bytes:
    """Check the envelope against `old`, run `body_apply(old, body, new_size)`, verify the result."""
    reader = Reader(delta, what)
    if reader.take(len(magic)) != magic:
        raise PatchError(f"{what}: not a {what} delta (bad magic)")
    old_size = reader.varint(MAX_OUTPUT_BYTES)
    old_digest = reader.take(32)
    new_size = reader.varint(MAX_OUTPUT_BYTES)
    new_digest = reader.take(32)
    if len(old) != old_size or hashlib.sha256(old).digest() != old_digest:
        raise PatchError(f"{what}: delta was made for a different base model")
    new = body_apply(old, delta[reader.pos :], new_size)
    if len(new) != new_size or hashlib.sha256(new).digest() != new_digest:
        raise PatchError(f"{what}: patched result does not match the delta's sha256")
    return new


def window_log_for(*sizes: int) -> int:
    """A zstd window that spans the dictionary (old model) and the new data."""
    return max(10, min(31, math.ceil(math.log2(sum(sizes) + 1))))


def zstd_compress(data: bytes, *, level: int, dictionary: bytes = b"", long_window: bool = False) -> bytes:
    """One zstd frame with checksum and content size; `dictionary` is raw content
    (zstd's patch-from: matches may point anywhere in it)."""
    params = zstandard.ZstdCompressionParameters.from_level(
        level,
        source_size=len(data),
        window_log=window_log_for(len(dictionary), len(data)) if long_window else 0,
        enable_ldm=long_window,
        write_checksum=1,
        write_content_size=1,
    )
    dict_data = (
        zstandard.ZstdCompressionDict(dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        if dictionary
        else None
    )
    return zstandard.ZstdCompressor(compression_params=params, dict_data=dict_data).compress(data)


# Above this much old + new data, level 19 (binary-tree optimal parser) with the old
# model as a loaded dictionary stops finding matches more than a few tens of MB back:
# a 55 MB pair that `zstd --patch-from` codes in 1.6 MB came out at 21.8 MB. Referencing
# the old model as a prefix (what the CLI does) with long-distance matching at a
# mid level finds them, in about a second.
PATCH_PREFIX_ABOVE = 16 << 20
PATCH_PREFIX_LEVEL = 9


def zstd_compress_patch(data: bytes, old: bytes, *, level: int) -> bytes:
    """One standard zstd frame of `data` that decodes with `old` as raw-content dictionary
    (`zstd_decompressor(old)`), like `zstd --patch-from`: window spanning old + new."""
    if len(old) + len(data) > PATCH_PREFIX_ABOVE and _prefix_api() is not None:
        return _compress_with_prefix(data, old, min(level, PATCH_PREFIX_LEVEL))
    return zstd_compress(data, level=level, dictionary=old, long_window=True)


def _prefix_api():
    try:
        from zstandard import _cffi  # type: ignore[attr-defined]  # cffi backend, in every wheel
    except ImportError:  # pragma: no cover - then the dictionary path is used
        return None
    return _cffi if hasattr(_cffi.lib, "ZSTD_CCtx_refPrefix") else None


def _compress_with_prefix(data: bytes, prefix: bytes, level: int) -> bytes:
    api = _prefix_api()
    ffi, lib = api.ffi, api.lib
    cctx = lib.ZSTD_createCCtx()
    if cctx == ffi.NULL:
        raise MemoryError("zstd: cannot create a compression context")

    def check(code: int) -> int:
        if lib.ZSTD_isError(code):
            raise ValueError(f"zstd: {ffi.string(lib.ZSTD_getErrorName(code)).decode()}")
        return code

    try:
        for parameter, value in (
            (lib.ZSTD_c_compressionLevel, level),
            (lib.ZSTD_c_windowLog, window_log_for(len(prefix), len(data))),
            (lib.ZSTD_c_enableLongDistanceMatching, 1),
            (lib.ZSTD_c_checksumFlag, 1),
            (lib.ZSTD_c_contentSizeFlag, 1),
        ):
            check(lib.ZSTD_CCtx_setParameter(cctx, parameter, value))
        check(lib.ZSTD_CCtx_setPledgedSrcSize(cctx, len(data)))
        prefix_buffer = ffi.from_buffer(prefix)
        check(lib.ZSTD_CCtx_refPrefix(cctx, prefix_buffer, len(prefix)))
        bound = lib.ZSTD_compressBound(len(data))
        out = ffi.new("char[]", bound)
        size = check(lib.ZSTD_compress2(cctx, out, bound, ffi.from_buffer(data), len(data)))
        return ffi.buffer(out, size)[:]
    finally:
        lib.ZSTD_freeCCtx(cctx)


def zstd_decompressor(dictionary: bytes = b"") -> zstandard.ZstdDecompressor:
    dict_data = (
        zstandard.ZstdCompressionDict(dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        if dictionary
        else None
    )
    return zstandard.ZstdDecompressor(dict_data=dict_data, max_window_size=2**31)


def zstd_decompress_checked(
    blob: bytes,
    *,
    max_size: int = MAX_OUTPUT_BYTES,
    what: str = "zstd",
    decompressor: zstandard.ZstdDecompressor | None = None,
) -> bytes:
    """Decompress exactly one zstd frame that records its content size; anything
    else (truncation, trailing bytes, corruption caught by the frame checksum) is a PatchError."""
    try:
        params = zstandard.get_frame_parameters(blob)
    except zstandard.ZstdError as exc:
        raise PatchError(f"{what}: not a zstd frame: {exc}") from exc
    if params.content_size in (zstandard.CONTENTSIZE_UNKNOWN, zstandard.CONTENTSIZE_ERROR):
        raise PatchError(f"{what}: frame does not record its content size")
    if params.content_size > max_size:
        raise PatchError(f"{what}: content size {params.content_size} exceeds {max_size}")
    if not params.has_checksum:
        raise PatchError(f"{what}: frame carries no checksum")
    decompressor = decompressor or zstandard.ZstdDecompressor()
    try:
        reader = decompressor.decompressobj()
        out = reader.decompress(blob)
        if not reader.eof:
            raise PatchError(f"{what}: truncated frame")
        if reader.unused_data:
            raise PatchError(f"{what}: {len(reader.unused_data)} unexpected bytes after the frame")
    except zstandard.ZstdError as exc:
        raise PatchError(f"{what}: corrupt frame: {exc}") from exc
    if len(out) != params.content_size:
        raise PatchError(f"{what}: decoded {len(out)} bytes, frame says {params.content_size}")
    return out
