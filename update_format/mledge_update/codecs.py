"""Delta codecs and full-model encodings, looked up by the name carried in job documents.

A codec turns (old model bytes, new model bytes) into a delta and back:
`make_delta(name, old, new)` on the cloud, `apply_delta(name, old, delta)` on the device.
`bsdiff4` is the baseline every device understands; newer codecs are registered under new
names, and a device that does not know a name simply never picks that delta (the job
document always carries the full model as well), so adding a codec never breaks old devices.

Full-model encodings (`identity`, `zstd`) are how the whole new model is shipped.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

import bsdiff4
import zstandard

from . import onnx_xor, zstd_patch
from ._wire import MAX_OUTPUT_BYTES, zstd_decompress_checked
from .errors import PatchError, UnknownCodecError
from .hashing import sha256_hex

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


def encode_full(encoding: str, data: bytes) -> bytes:
    """Encode a whole model for download."""
    if encoding == "identity":
        return bytes(data)
    if encoding == "zstd":
        compressor = zstandard.ZstdCompressor(
            level=ZSTD_FULL_LEVEL, write_checksum=True, write_content_size=True
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

SUPPORTED_CODECS: tuple[str, ...] = registered_codecs()
