"""Hashing, the bsdiff4 baseline codec, full-model encodings and the codec registry."""

from __future__ import annotations

import hashlib
import random

import pytest
from mledge_update.codecs import (
    FULL_ENCODINGS,
    SUPPORTED_CODECS,
    apply_delta,
    decode_full,
    encode_full,
    get_codec,
    make_delta,
)
from mledge_update.errors import PatchError, UnknownCodecError
from mledge_update.hashing import is_sha256_hex, sha256_file, sha256_hex


def _model_like(seed: int, size: int = 20_000) -> bytes:
    rng = random.Random(seed)
    return bytes(rng.getrandbits(8) for _ in range(size))


@pytest.fixture(scope="module")
def old_new() -> tuple[bytes, bytes]:
    old = _model_like(1)
    # A "retrained" model: mostly the same bytes, a changed region, a grown tail.
    new = old[:5000] + _model_like(2, 700) + old[5700:18_000] + _model_like(3, 3000)
    return old, new


def test_sha256_of_bytes_and_file(tmp_path) -> None:
    data = b"model bytes" * 300_000  # > one read chunk
    path = tmp_path / "m.onnx"
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert sha256_hex(data) == expected
    assert sha256_file(path) == expected
    assert is_sha256_hex(expected)
    assert not is_sha256_hex(expected.upper())
    assert not is_sha256_hex(expected[:-1])
    assert not is_sha256_hex(None)


def test_bsdiff4_is_the_baseline_and_always_supported() -> None:
    assert SUPPORTED_CODECS[0] == "bsdiff4"
    assert get_codec("bsdiff4").name == "bsdiff4"


def test_bsdiff4_round_trip_and_smaller_than_new(old_new) -> None:
    old, new = old_new
    delta = make_delta("bsdiff4", old, new)
    assert delta.startswith(b"BSDIFF40")
    assert len(delta) < len(new) // 3
    assert apply_delta("bsdiff4", old, delta, expected_sha256=sha256_hex(new)) == new


@pytest.mark.parametrize(
    ("old", "new"),
    [(b"", b""), (b"", b"abc"), (b"abc", b""), (b"same" * 100, b"same" * 100), (b"\x00", b"\xff" * 5000)],
    ids=["empty", "from-empty", "to-empty", "identical", "different-sizes"],
)
def test_bsdiff4_edge_cases(old: bytes, new: bytes) -> None:
    assert apply_delta("bsdiff4", old, make_delta("bsdiff4", old, new)) == new


def test_truncated_delta_raises_patch_error_at_every_length(old_new) -> None:
    old, new = old_new
    delta = make_delta("bsdiff4", old, new)
    for cut in sorted({0, 1, 8, 31, 32, 33, len(delta) // 2, len(delta) - 1}):
        with pytest.raises(PatchError):
            apply_delta("bsdiff4", old, delta[:cut])


def test_flipped_bits_never_yield_silent_garbage(old_new) -> None:
    old, new = old_new
    delta = make_delta("bsdiff4", old, new)
    rng = random.Random(7)
    for _ in range(150):
        corrupt = bytearray(delta)
        corrupt[rng.randrange(len(corrupt))] ^= 1 << rng.randrange(8)
        try:
            result = apply_delta("bsdiff4", old, bytes(corrupt))
        except PatchError:
            continue
        # bz2's CRCs catch corruption inside blocks; a flip that still decodes must be harmless.
        assert result == new


def test_bad_magic_and_absurd_length_raise_patch_error(old_new) -> None:
    old, new = old_new
    delta = bytearray(make_delta("bsdiff4", old, new))
    with pytest.raises(PatchError, match="magic"):
        apply_delta("bsdiff4", old, b"NOTBSDIF" + bytes(delta[8:]))
    delta[24:32] = (2**40).to_bytes(8, "little")  # claims a 1 TiB new model
    with pytest.raises(PatchError, match="oversized"):
        apply_delta("bsdiff4", old, bytes(delta))


def test_wrong_base_is_caught_by_expected_sha256(old_new) -> None:
    old, new = old_new
    delta = make_delta("bsdiff4", old, new)
    other_base = _model_like(9)
    with pytest.raises(PatchError, match="expected"):
        apply_delta("bsdiff4", other_base, delta, expected_sha256=sha256_hex(new))


def test_unknown_codec_and_encoding() -> None:
    with pytest.raises(UnknownCodecError, match="no-such-codec"):
        get_codec("no-such-codec")
    with pytest.raises(UnknownCodecError):
        make_delta("no-such-codec", b"a", b"b")
    with pytest.raises(UnknownCodecError):
        apply_delta("no-such-codec", b"a", b"b")
    with pytest.raises(UnknownCodecError):
        encode_full("brotli", b"a")
    with pytest.raises(UnknownCodecError):
        decode_full("brotli", b"a")


@pytest.mark.parametrize("encoding", FULL_ENCODINGS)
@pytest.mark.parametrize("data", [b"", b"x", bytes(range(256)) * 400], ids=["empty", "one", "repetitive"])
def test_full_encodings_round_trip(encoding: str, data: bytes) -> None:
    assert decode_full(encoding, encode_full(encoding, data)) == data


def test_zstd_full_model_is_compressed_and_corruption_detected(old_new) -> None:
    data = bytes(range(256)) * 400 + old_new[0]
    blob = encode_full("zstd", data)
    assert len(blob) < len(data)
    for cut in (0, 3, 10, len(blob) // 2, len(blob) - 1):
        with pytest.raises(PatchError):
            decode_full("zstd", blob[:cut])
    with pytest.raises(PatchError, match="after the frame"):
        decode_full("zstd", blob + b"junk")
    corrupt = bytearray(blob)
    corrupt[len(corrupt) // 2] ^= 0x10
    with pytest.raises(PatchError):
        decode_full("zstd", bytes(corrupt))
    with pytest.raises(PatchError, match="exceeds"):
        decode_full("zstd", blob, max_size=100)
