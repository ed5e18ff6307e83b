"""Delta sizes and costs on sequences of real retrained ONNX models, per codec.

For each sequence (a model family retrained on growing data, from scratch or
warm-started) and each step it prints: the new ONNX size, zstd-19 of the whole model
(what a device without a usable base downloads), the bsdiff4 delta (the baseline) with its
diff time, diff peak memory and patch time, and one column per other registered codec
(delta bytes and ratio to bsdiff4). A summary per codec follows. Every delta is applied and
checked bit-exact before it is counted.

    python bench/delta.py                      # default, ~1-2 minutes on 2 busy cores
    python bench/delta.py --steps 6 --large-hidden 1024,512   # bigger
    python bench/delta.py --sequences kmeans-warm,digits-mlp-warm --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import tracemalloc
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "update_format"))

from mledge_update.codecs import (
    SUPPORTED_CODECS,
    apply_delta,
    decode_full,
    encode_full,
    make_delta,
)

BASELINE = "bsdiff4"
VIBRATION_FEATURES = ["rms", "peak", "crest_factor", "kurtosis", "band_low", "band_mid", "band_high", "temperature"]


# ------------------------------------------------------------------------------ memory


def _status_bytes(field_name: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field_name}:\s+(\d+)", text).group(1)) * 1024  # type: ignore[union-attr]


def _can_reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


RESET_PEAK = _can_reset_peak()


def measure(fn: Callable[[], bytes]) -> tuple[bytes, float, float]:
    """(result, seconds, peak extra memory in MB). Peak is the process's resident high-water
    mark above where it started (sees C allocations too: bsdiff4, zstd); where the kernel
    does not let us reset it, tracemalloc's peak (Python allocations only)."""
    if RESET_PEAK:
        Path("/proc/self/clear_refs").write_text("5")
        base = _status_bytes("VmRSS")
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
        return result, seconds, max(0, _status_bytes("VmHWM") - base) / 1e6
    tracemalloc.start()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, seconds, peak / 1e6


# ------------------------------------------------------------------------------ models


def _export(estimator, n_features: int, family: str, model: str, version: int, features: list[str],
            threshold: float | None = None) -> bytes:
    """ONNX following BRIEF.md's conventions: input `input`, outputs `label`, `scores`, metadata."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    options = None if family == "kmeans_anomaly" else {id(estimator): {"zipmap": False}}
    onnx_model = to_onnx(estimator, initial_types=[("input", FloatTensorType([None, n_features]))],
                         options=options, target_opset=17)
    graph = onnx_model.graph
    renames = {graph.output[0].name: "label", graph.output[1].name: "scores"}
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name in renames:
                node.output[i] = renames[name]
    for output in graph.output:
        output.name = renames.get(output.name, output.name)
    props = {"mledge.model": model, "mledge.version": str(version), "mledge.family": family,
             "mledge.features": json.dumps(features)}
    if threshold is not None:
        props["mledge.anomaly_threshold"] = repr(threshold)
    for key, value in props.items():
        entry = onnx_model.metadata_props.add()
        entry.key, entry.value = key, value
    return onnx_model.SerializeToString()


def _vibration(rows: int, seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, size=(4, 8))
    drift = np.linspace(0, 0.6, rows)[:, None]  # later data drifts: the model has to move
    return (centres[rng.integers(0, 4, rows)] + rng.normal(0, 0.6, (rows, 8)) + drift).astype(np.float32)


@dataclass
class Step:
    rows: int
    onnx: bytes


def kmeans_sequence(steps: int, warm: bool) -> Iterator[Step]:
    from sklearn.cluster import KMeans

    data = _vibration(2000 + 1000 * steps)
    centres = None
    for step in range(steps):
        rows = 2000 + 1000 * step
        x = data[:rows]
        if warm and centres is not None:
            km = KMeans(4, init=centres, n_init=1, random_state=7).fit(x)
        else:
            km = KMeans(4, n_init=3, random_state=7).fit(x)
        centres = km.cluster_centers_
        threshold = float(np.quantile(km.transform(x).min(axis=1), 0.995))
        yield Step(rows, _export(km, 8, "kmeans_anomaly", "vibration-anomaly", step + 1,
                                 VIBRATION_FEATURES, threshold))


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(7).permutation(len(x))
    return x[order].astype(np.float32), y[order]


def classifier_sequence(steps: int, warm: bool, estimator: str, hidden: tuple[int, ...] = (64,),
                        first: int = 600, grow: int = 300, max_iter: int = 40) -> Iterator[Step]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    x, y = _digits()
    features = [f"px{i}" for i in range(64)]
    model = None
    for step in range(steps):
        rows = min(len(x), first + grow * step)
        if estimator == "mlp":
            if model is None or not warm:
                model = MLPClassifier(hidden, max_iter=max_iter, random_state=7)
            else:
                model.set_params(warm_start=True, max_iter=max(5, max_iter // 4))
        elif model is None or not warm:
            model = LogisticRegression(max_iter=200)
        else:
            model.set_params(warm_start=True, max_iter=50)
        model.fit(x[:rows] / 16.0, y[:rows])
        yield Step(rows, _export(model, 64, "classifier", "digits", step + 1, features))


def sequences(args: argparse.Namespace) -> dict[str, Callable[[], Iterator[Step]]]:
    large = tuple(int(h) for h in args.large_hidden.split(","))
    return {
        "kmeans-scratch": lambda: kmeans_sequence(args.steps, warm=False),
        "kmeans-warm": lambda: kmeans_sequence(args.steps, warm=True),
        "digits-logistic-scratch": lambda: classifier_sequence(args.steps, False, "logistic"),
        "digits-logistic-warm": lambda: classifier_sequence(args.steps, True, "logistic"),
        "digits-mlp-scratch": lambda: classifier_sequence(args.steps, False, "mlp"),
        "digits-mlp-warm": lambda: classifier_sequence(args.steps, True, "mlp"),
        "large-mlp-scratch": lambda: classifier_sequence(args.large_steps, False, "mlp", large,
                                                         max_iter=args.large_iter),
        "large-mlp-warm": lambda: classifier_sequence(args.large_steps, True, "mlp", large, max_iter=args.large_iter),
    }


# ------------------------------------------------------------------------------ bench


@dataclass
class CodecRun:
    size: int
    make_s: float
    make_mb: float
    apply_s: float
    apply_mb: float


@dataclass
class Row:
    sequence: str
    step: int
    rows: int
    onnx: int
    zstd19: int
    codecs: dict[str, CodecRun] = field(default_factory=dict)


def run_codec(codec: str, old: bytes, new: bytes) -> CodecRun:
    delta, make_s, make_mb = measure(lambda: make_delta(codec, old, new))
    patched, apply_s, apply_mb = measure(lambda: apply_delta(codec, old, delta))
    if patched != new:
        raise AssertionError(f"{codec} did not round-trip")
    return CodecRun(len(delta), make_s, make_mb, apply_s, apply_mb)


def fmt_bytes(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e4 else f"{int(n)}"


def print_table(rows: list[Row], codecs: list[str]) -> None:
    others = [c for c in codecs if c != BASELINE]
    head = ["sequence", "step", "rows", "onnx", "zstd-19", "bsdiff4", "bsd/zstd", "diff s", "diff MB", "patch s",
            *(f"{c} (x bsdiff4)" for c in others)]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in rows:
        base = r.codecs[BASELINE]
        cells = [r.sequence, str(r.step), str(r.rows), fmt_bytes(r.onnx), fmt_bytes(r.zstd19), fmt_bytes(base.size),
                 f"{base.size / r.zstd19:.2f}", f"{base.make_s:.3f}", f"{base.make_mb:.1f}", f"{base.apply_s:.3f}"]
        cells += [f"{fmt_bytes(r.codecs[c].size)} ({r.codecs[c].size / base.size:.2f})" for c in others]
        print("| " + " | ".join(cells) + " |")


def print_summary(rows: list[Row], codecs: list[str]) -> None:
    print()
    head = ["codec", "total bytes", "x bsdiff4", "x zstd-19 full", "make s", "max make MB", "apply s", "max apply MB"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    base_total = sum(r.codecs[BASELINE].size for r in rows)
    zstd_total = sum(r.zstd19 for r in rows)
    print(f"| zstd-19 full model | {fmt_bytes(zstd_total)} | {zstd_total / base_total:.2f} | 1.00 | | | | |")
    for c in codecs:
        runs = [r.codecs[c] for r in rows]
        total = sum(x.size for x in runs)
        print(f"| {c} | {fmt_bytes(total)} | {total / base_total:.2f} | {total / zstd_total:.2f} | "
              f"{sum(x.make_s for x in runs):.2f} | {max(x.make_mb for x in runs):.1f} | "
              f"{sum(x.apply_s for x in runs):.2f} | {max(x.apply_mb for x in runs):.1f} |")


# glibc keeps freed memory resident and raises its mmap threshold after the first big
# free, so later peaks would hide inside memory already mapped. A fixed threshold makes
# every large buffer a fresh mapping, returned on free: each measurement starts clean.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _reexec_with_malloc_env() -> None:
    if sys.platform.startswith("linux") and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="models per small sequence (deltas = steps - 1)")
    parser.add_argument("--large-steps", type=int, default=4, help="models per large-MLP sequence")
    parser.add_argument("--large-hidden", default="512,512", help="hidden layers of the large MLP")
    parser.add_argument("--large-iter", type=int, default=12, help="training epochs of the large MLP")
    parser.add_argument("--sequences", default="", help="comma-separated subset (default: all)")
    parser.add_argument("--codecs", default=",".join(SUPPORTED_CODECS), help="codecs to compare")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    codecs = [c for c in args.codecs.split(",") if c]
    if BASELINE not in codecs:
        codecs.insert(0, BASELINE)
    available = sequences(args)
    chosen = [s for s in args.sequences.split(",") if s] or list(available)
    started = time.perf_counter()
    rows: list[Row] = []
    for name in chosen:
        previous: bytes | None = None
        for index, step in enumerate(available[name]()):
            if previous is not None:
                full = encode_full("zstd", step.onnx)
                assert decode_full("zstd", full) == step.onnx
                row = Row(name, index, step.rows, len(step.onnx), len(full))
                for codec in codecs:  # one column per registered codec, nothing else to add
                    row.codecs[codec] = run_codec(codec, previous, step.onnx)
                rows.append(row)
                print(f"# {name} step {index}: done", file=sys.stderr)
            previous = step.onnx
    print(f"codecs: {', '.join(codecs)}; peak memory: "
          f"{'resident high-water mark' if RESET_PEAK else 'tracemalloc'}; "
          f"cells in codec columns: delta bytes (ratio to bsdiff4)\n")
    print_table(rows, codecs)
    print_summary(rows, codecs)
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps([
            {"sequence": r.sequence, "step": r.step, "rows": r.rows, "onnx": r.onnx, "zstd19": r.zstd19,
             "codecs": {c: vars(x) for c, x in r.codecs.items()}} for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    _reexec_with_malloc_env()
    raise SystemExit(main())
