"""The packager's delta budget: codecs in order of expected gain, skipped with a reason
when over the time or memory budget, above the slow-codec size, or when bsdiff4 cannot
win; whatever is built is verified and smaller than the full artifact."""

from __future__ import annotations

import random

from mledge_update.codecs import SUPPORTED_CODECS, apply_delta, encode_full
from mledge_update.hashing import sha256_hex

from chalicelib.config import PackagingConfig
from chalicelib.delta_budget import build_deltas, estimate, ordered_codecs


def _pair(related: bool = True) -> tuple[bytes, bytes]:
    rng = random.Random(3)
    old = bytes(rng.getrandbits(8) for _ in range(40_000))
    if not related:
        return old, bytes(rng.getrandbits(8) for _ in range(40_000))
    return old, old[:10_000] + b"a few new bytes" + old[10_000:]


def test_every_codec_is_built_and_verified_within_a_generous_budget() -> None:
    old, new = _pair()
    full = len(encode_full("zstd", new))
    result = build_deltas(old, new, sha256_hex(new), full, PackagingConfig(), deadline=1e12)
    assert set(result.built) == set(SUPPORTED_CODECS) and result.skipped == []
    for codec, blob in result.built.items():
        assert len(blob) < full
        assert apply_delta(codec, old, blob) == new


def test_model_aware_codecs_come_first_and_bsdiff4_last() -> None:
    order = ordered_codecs(SUPPORTED_CODECS)
    assert order[0] == "onnx-delta-2" and order[-1] == "bsdiff4"


def test_slow_codec_is_skipped_above_its_size_limit() -> None:
    old, new = _pair()
    result = build_deltas(old, new, sha256_hex(new), len(new), PackagingConfig(slow_codec_max_mb=0.01),
                          deadline=1e12)
    assert "bsdiff4" not in result.built
    assert [c for c, _ in result.skipped] == ["bsdiff4"]
    assert "slow_codec_max_mb" in result.skipped[0][1]


def test_bsdiff4_is_skipped_when_it_cannot_beat_the_full_model() -> None:
    old, new = _pair(related=False)
    full = len(encode_full("zstd", new))
    result = build_deltas(old, new, sha256_hex(new), full, PackagingConfig(), deadline=1e12)
    assert result.built == {}
    assert ("bsdiff4", "cannot win: cheaper deltas are already no smaller than the full artifact") in result.skipped


def test_time_and_memory_budgets_skip_with_reasons() -> None:
    old, new = _pair()
    now = [100.0]
    result = build_deltas(old, new, sha256_hex(new), len(new), PackagingConfig(), deadline=100.0,
                          clock=lambda: now[0])
    assert result.built == {} and all("time budget" in reason for _, reason in result.skipped)
    seconds, memory = estimate("bsdiff4", 500_000_000, 500_000_000)
    assert seconds > 60 and memory > 1536  # a 500 MB model never starts bsdiff4 in a Lambda
    result = build_deltas(old, new, sha256_hex(new), len(new), PackagingConfig(memory_budget_mb=64),
                          deadline=1e12)
    assert "zstd-patch" in {c for c, r in result.skipped if "memory_budget_mb" in r}
