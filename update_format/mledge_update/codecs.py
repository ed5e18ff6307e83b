"""Delta codecs and full-model encodings, looked up by the name carried in job documents.

A codec turns (old model bytes, new model bytes) into a delta and back:
`make_delta(name, old, new)` on the cloud, `apply_delta(name, old, delta)` on the device.
`bsdiff4` is the baseline every device understands; newer codecs are registered under new
names, and a device that does not know a name simply never picks that delta (the job
document always carries the full model as well), so adding a codec never breaks old devices.

Full-model encodings (`identity`, `zstd`) are how the whole new model is shipped.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import bsdiff4
import zstandard

from . import onnx_xor, zstd_patch
from ._wire import MAX_OUTPUT_BYTES, zstd_decompress_checked
from .errors import PatchError, UnknownCodecError
from .hashing import sha256_file, sha256_hex

# Larger outputs are refused rather than allocated: a corrupt length field must not
# make a device try to allocate gigabytes.
MAX_MODEL_BYTES = MAX_OUTPUT_BYTES


@dataclass(frozen=True)
class Codec:
    """A named delta codec. `make` and `apply` must round-trip bit-exactly."""

    name: str
    make: Callable[[bytes, bytes], bytes]
    apply: Callable[[bytes, bytes], bytes]
    description: str = ""
    # (old file, delta file, output file): applies without holding the models in memory.
    # Codecs without one are applied in memory by `apply_delta_file`.
    apply_stream: Callable[[BinaryIO, BinaryIO, BinaryIO], None] | None = None


_REGISTRY: dict[str, Codec] = {}


def register_codec(codec: Codec) -> Codec:
    """Add a codec under a new name. Names are part of the wire format: never reuse one."""
    if codec.name in _REGISTRY:
        raise ValueError(f"codec {codec.name!r} is already registered")
    _REGISTRY[codec.name] = codec
    return codec


def get_codec(name: str) -> Codec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownCodecError(
            f"unknown delta codec {name!r}; this build knows {sorted(_REGISTRY)}"
        ) from None


def registered_codecs() -> tuple[str, ...]:
    """Every codec this build can make and apply, baseline first."""
    return tuple(_REGISTRY)


def make_delta(codec: str, old: bytes, new: bytes) -> bytes:
    """Delta that turns `old` into `new` with the named codec."""
    return get_codec(codec).make(bytes(old), bytes(new))


def apply_delta(
    codec: str, old: bytes, delta: bytes, *, expected_sha256: str | None = None
) -> bytes:
    """Apply a delta; raises PatchError on a corrupt/truncated delta or, when
    `expected_sha256` is given, on a result with another hash (e.g. a wrong base)."""
    implementation = get_codec(codec)
    try:
        result = implementation.apply(bytes(old), bytes(delta))
    except PatchError:
        raise
    except Exception as exc:
        # Codecs sit on bz2, zstd and struct, each with its own exceptions (OSError,
        # EOFError, ValueError, ZstdError...); all mean "this delta cannot be applied".
        raise PatchError(f"{codec}: cannot apply delta: {exc}") from exc
    if expected_sha256 is not None and sha256_hex(result) != expected_sha256:
        raise PatchError(
            f"{codec}: patched model has sha256 {sha256_hex(result)}, expected {expected_sha256}"
        )
    return result


def apply_delta_file(
    codec: str,
    old_path: str | os.PathLike[str],
    delta_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    expected_sha256: str | None = None,
) -> None:
    """Apply a delta from file to file. Codecs with a streaming apply (`onnx-delta-2`)
    read the old model by offset and write the new one front to back, so the process holds
    a chunk, not the model; the others are applied in memory. The result is written to a
    temporary file beside `out_path` and renamed into place only when it is verified:
    on PatchError nothing is left at `out_path`."""
    implementation = get_codec(codec)
    out = Path(out_path)
    partial = out.with_name(out.name + ".partial")
    try:
        if implementation.apply_stream is None:
            result = apply_delta(codec, Path(old_path).read_bytes(), Path(delta_path).read_bytes(),
                                 expected_sha256=expected_sha256)
            partial.write_bytes(result)
        else:
            with open(old_path, "rb") as old, open(delta_path, "rb") as delta, \
                    open(partial, "wb") as sink:
                try:
                    implementation.apply_stream(old, delta, sink)
                except PatchError:
                    raise
                except Exception as exc:
                    raise PatchError(f"{codec}: cannot apply delta: {exc}") from exc
            if expected_sha256 is not None:
                actual = sha256_file(partial)
                if actual != expected_sha256:
                    raise PatchError(f"{codec}: patched model has sha256 {actual}, "
                                     f"expected {expected_sha256}")
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)


# --- bsdiff4: the baseline (plain BSDIFF40 format, readable by any bsdiff4 tool) ---------

_BSDIFF_MAGIC = b"BSDIFF40"
_BSDIFF_HEADER = struct.Struct("<8sqqq")  # magic, control length, diff length, new size


def _bsdiff4_make(old: bytes, new: bytes) -> bytes:
    return bsdiff4.diff(old, new)


def _bsdiff4_apply(old: bytes, delta: bytes) -> bytes:
    if len(delta) < _BSDIFF_HEADER.size:
        raise PatchError(f"bsdiff4: truncated delta ({len(delta)} bytes, header needs 32)")
    magic, control_len, diff_len, new_size = _BSDIFF_HEADER.unpack_from(delta)
    if magic != _BSDIFF_MAGIC:
        raise PatchError("bsdiff4: not a BSDIFF40 delta (bad magic)")
    if min(control_len, diff_len, new_size) < 0 or new_size > MAX_MODEL_BYTES:
        raise PatchError("bsdiff4: corrupt header (negative or oversized length)")
    if _BSDIFF_HEADER.size + control_len + diff_len > len(delta):
        raise PatchError("bsdiff4: truncated delta (blocks end past the data)")
    # The three blocks are bz2 streams with CRCs, so corruption and truncation inside
    # them raise; a wrong base is not detectable here (check from_sha256 / expected_sha256).
    return bsdiff4.patch(old, delta)


register_codec(
    Codec(
        name="bsdiff4",
        make=_bsdiff4_make,
        apply=_bsdiff4_apply,
        description="bsdiff 4.x (BSDIFF40, bz2 blocks): the baseline every device knows",
    )
)


# --- full-model encodings --------------------------------------------------------------

FULL_ENCODINGS: tuple[str, ...] = ("identity", "zstd")
ZSTD_FULL_LEVEL = 19
# Level 19 runs at ~1 MB/s; above this size the packager would spend minutes of its Lambda
# on it for a percent or two (weights are near-random bytes that only entropy coding
# shrinks, which every level does), so larger models use ZSTD_FULL_LARGE_LEVEL. Decoding
# does not depend on the level.
ZSTD_FULL_LEVEL_MAX_BYTES = 16 << 20
ZSTD_FULL_LARGE_LEVEL = 9


def encode_full(encoding: str, data: bytes) -> bytes:
    """Encode a whole model for download."""
    if encoding == "identity":
        return bytes(data)
    if encoding == "zstd":
        level = ZSTD_FULL_LEVEL if len(data) <= ZSTD_FULL_LEVEL_MAX_BYTES else ZSTD_FULL_LARGE_LEVEL
        compressor = zstandard.ZstdCompressor(
            level=level, write_checksum=True, write_content_size=True
        )
        return compressor.compress(data)
    raise UnknownCodecError(f"unknown full-model encoding {encoding!r}; known: {list(FULL_ENCODINGS)}")


def decode_full(encoding: str, blob: bytes, *, max_size: int = MAX_MODEL_BYTES) -> bytes:
    """Decode a downloaded full model; raises PatchError when it is corrupt or truncated."""
    if encoding == "identity":
        return bytes(blob)
    if encoding == "zstd":
        return zstd_decompress_checked(blob, max_size=max_size, what="zstd")
    raise UnknownCodecError(f"unknown full-model encoding {encoding!r}; known: {list(FULL_ENCODINGS)}")



# Registration order is the order SUPPORTED_CODECS lists (baseline first). A new codec
# gets a new name and a new registration here; never change what an existing name means.
register_codec(
    Codec(zstd_patch.NAME, zstd_patch.make, zstd_patch.apply,
          "zstd level 19 with the old model as dictionary (patch-from), long window")
)
register_codec(
    Codec(onnx_xor.NAME, onnx_xor.make, onnx_xor.apply,
          "XOR of paired ONNX numeric arrays split into byte planes + zstd; rest by zstd-patch")
)
try:  # needs numpy (devices have it for onnxruntime; the Lambda bundle ships it)
    from . import onnx_delta
except ImportError:  # pragma: no cover - a build without numpy just does not offer it
    onnx_delta = None  # type: ignore[assignment]
if onnx_delta is not None:
    register_codec(Codec(onnx_delta.NAME, onnx_delta.make, onnx_delta.apply,
                         "model-aware: arrays paired by name (resized too), ULP/arithmetic/XOR/"
                         "scaled/dictionary residual per array, tree arrays; streams on apply",
                         apply_stream=onnx_delta.apply_stream))

SUPPORTED_CODECS: tuple[str, ...] = registered_codecs()
