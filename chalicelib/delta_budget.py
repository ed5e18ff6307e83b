"""Which deltas the packager builds for one release, inside a time and memory budget.

Making every codec for every base is what a small model can afford; a 20 MB model pays
bsdiff4's suffix sort (~0.5 MB/s, ~17x the old model in memory) once per base, and a
500 MB model cannot pay it at all inside a Lambda. So per base the packager tries the
codecs in order of expected gain (model-aware first, bsdiff4 last), estimates each one's
time and memory from the model sizes before starting it, and skips it, with a recorded
reason, when the release's time budget or the memory budget would be exceeded, when the
model is above the size where slow codecs run at all, or when bsdiff4 cannot win (a
cheaper codec's delta is already no smaller than the full artifact: bsdiff4's is never
smaller than zstd-patch's on ONNX models, bench/delta.py). Every delta that is built is
applied and compared by SHA-256 before it is offered.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mledge_update.codecs import SUPPORTED_CODECS, apply_delta, make_delta
from mledge_update.errors import PatchError

from chalicelib.config import PackagingConfig

MB = 1_000_000


@dataclass(frozen=True)
class CodecCost:
    """Cost of making one delta, per MB of (old + new) model; measured with bench/delta.py
    (docs/packaging.md has the figures these come from)."""

    seconds_per_mb: float
    memory_per_mb: float  # resident MB per MB of old + new, on top of both models
    memory_fixed_mb: float = 0.0
    slow: bool = False  # skipped above `slow_codec_max_mb`


# Ordered by expected gain: the first codecs give the smallest deltas on ONNX models.
CODEC_COSTS: dict[str, CodecCost] = {
    # 20 MB float model: 4.7 s for 40 MB of old + new (bench/apply_memory.py), x2 margin
    "onnx-delta-2": CodecCost(seconds_per_mb=0.25, memory_per_mb=2.0, memory_fixed_mb=60),
    # level 19 below 16 MB of old + new (~0.3 s/MB), prefix at level 9 above (~0.07 s/MB)
    "zstd-patch": CodecCost(seconds_per_mb=0.4, memory_per_mb=3.0, memory_fixed_mb=400),
    # level-19 byte planes: 71 s for the 20 MB pair
    "onnx-xor-planes": CodecCost(seconds_per_mb=2.0, memory_per_mb=6.0, memory_fixed_mb=20),
    # suffix sorting, ~17x the old model
    "bsdiff4": CodecCost(seconds_per_mb=1.5, memory_per_mb=9.0, slow=True),
}
UNKNOWN_COST = CodecCost(seconds_per_mb=2.0, memory_per_mb=17.0, slow=True)
BASELINE_CODEC = "bsdiff4"
# bsdiff4 is skipped when a cheaper delta is at least this fraction of the full artifact.
BSDIFF_CANNOT_WIN = 0.95


@dataclass
class BuiltDeltas:
    built: dict[str, bytes] = field(default_factory=dict)  # verified, smaller than full
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (codec, reason)
    seconds: dict[str, float] = field(default_factory=dict)


def ordered_codecs(codecs: Sequence[str] = SUPPORTED_CODECS) -> list[str]:
    rank = {name: i for i, name in enumerate(CODEC_COSTS)}
    return sorted(codecs, key=lambda c: rank.get(c, len(rank)))


def estimate(codec: str, old_size: int, new_size: int) -> tuple[float, float]:
    """(seconds, MB of memory) expected for making this delta."""
    cost = CODEC_COSTS.get(codec, UNKNOWN_COST)
    mb = (old_size + new_size) / MB
    return cost.seconds_per_mb * mb, cost.memory_per_mb * mb + cost.memory_fixed_mb + mb


def build_deltas(old: bytes, new: bytes, new_sha256: str, full_size: int, budget: PackagingConfig,
                 deadline: float, *, codecs: Sequence[str] = SUPPORTED_CODECS,
                 clock: Callable[[], float] = time.monotonic) -> BuiltDeltas:
    """Verified deltas old -> new that beat the full artifact, within the budget.
    `deadline` is a `clock()` time shared by all bases of the release."""
    result = BuiltDeltas()
    for codec in ordered_codecs(codecs):
        cost = CODEC_COSTS.get(codec, UNKNOWN_COST)
        seconds, memory = estimate(codec, len(old), len(new))
        smallest = min((len(b) for b in result.built.values()), default=None)
        reason = ""
        if cost.slow and len(new) / MB > budget.slow_codec_max_mb:
            reason = f"model is {len(new) / MB:.1f} MB, over slow_codec_max_mb {budget.slow_codec_max_mb:g}"
        if not reason and codec == BASELINE_CODEC:
            tried = [c for c in result.seconds if c != codec]
            if tried and (smallest is None or smallest >= BSDIFF_CANNOT_WIN * full_size):
                reason = "cannot win: cheaper deltas are already no smaller than the full artifact"
        if not reason and memory > budget.memory_budget_mb:
            reason = f"needs ~{memory:.0f} MB, over memory_budget_mb {budget.memory_budget_mb:g}"
        if not reason and clock() + seconds > deadline:
            reason = f"needs ~{seconds:.0f} s, past the release's time budget"
        if reason:
            result.skipped.append((codec, reason))
            continue
        started = clock()
        blob = make_delta(codec, old, new)
        try:
            apply_delta(codec, old, blob, expected_sha256=new_sha256)
        except PatchError as exc:
            result.skipped.append((codec, f"failed verification: {exc}"))
            continue
        finally:
            result.seconds[codec] = clock() - started
        if len(blob) < full_size:
            result.built[codec] = blob
    return result
