"""Device-side figures: inference latency (steady vs during a model swap) and the cost of
applying an update (patch/decode time, peak memory) for 1, 10 and 100 MB models.

    python bench/agent.py [--sizes 1,10,100] [--predictions 3000]

Baselines printed beside each figure: steady-state latency for the swap case, and
decoding the zstd full model for each delta codec (what the device pays without a delta).
Patching runs in a child process per case so peak memory (VmHWM) is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
for part in ("", "update_format", "edge"):
    sys.path.insert(0, str(ROOT / part))

from mledge_edge.model import LoadedModel, ModelHandle  # noqa: E402
from mledge_update.codecs import registered_codecs  # noqa: E402
from mledge_update.hashing import sha256_hex  # noqa: E402

N_FEATURES = 64
N_CLASSES = 10


def mlp_model(size_mb: float, version: int, seed: int, base: list[np.ndarray] | None = None,
              changed_fraction: float = 0.1) -> tuple[bytes, list[np.ndarray]]:
    """A 64 -> H -> H -> 10 MLP classifier in the project's ONNX conventions (docs/training.md), ~size_mb MB.
    With `base`, a fine-tune: `changed_fraction` of each tensor's weights move slightly."""
    rng = np.random.default_rng(seed)
    floats = size_mb * 1e6 / 4
    hidden = int((-(N_FEATURES + N_CLASSES) + np.sqrt((N_FEATURES + N_CLASSES) ** 2 + 4 * floats)) / 2)
    shapes = [(N_FEATURES, hidden), (hidden,), (hidden, hidden), (hidden,), (hidden, N_CLASSES), (N_CLASSES,)]
    if base is None:
        weights = [(rng.standard_normal(s) * 0.05).astype(np.float32) for s in shapes]
    else:
        weights = []
        for w in base:
            w = w.copy()
            mask = rng.random(w.shape) < changed_fraction
            w[mask] += (rng.standard_normal(int(mask.sum())) * 1e-3).astype(np.float32)
            weights.append(w)
    names = ["w1", "b1", "w2", "b2", "w3", "b3"]
    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["h1m"]), helper.make_node("Add", ["h1m", "b1"], ["h1a"]),
        helper.make_node("Relu", ["h1a"], ["h1"]),
        helper.make_node("MatMul", ["h1", "w2"], ["h2m"]), helper.make_node("Add", ["h2m", "b2"], ["h2a"]),
        helper.make_node("Relu", ["h2a"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w3"], ["lm"]), helper.make_node("Add", ["lm", "b3"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["scores"], axis=1),
        helper.make_node("ArgMax", ["scores"], ["label_k"], axis=1, keepdims=0),
        helper.make_node("Cast", ["label_k"], ["label"], to=TensorProto.INT64),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, N_FEATURES])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None, N_CLASSES])],
        [numpy_helper.from_array(w, n) for w, n in zip(weights, names, strict=True)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in {"mledge.model": "bench", "mledge.version": str(version), "mledge.family": "classifier",
                       "mledge.features": json.dumps([f"px{i}" for i in range(N_FEATURES)])}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return model.SerializeToString(), weights


def percentiles(samples: list[float]) -> tuple[float, float]:
    arr = np.asarray(samples) * 1e6
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99))


def bench_latency(folder: Path, size_mb: float, predictions: int) -> None:
    old_bytes, weights = mlp_model(size_mb, 1, seed=1)
    new_bytes, _ = mlp_model(size_mb, 2, seed=2, base=weights)
    (folder / "a.onnx").write_bytes(old_bytes)
    (folder / "b.onnx").write_bytes(new_bytes)
    handle = ModelHandle(LoadedModel(folder / "a.onnx", sha256_hex(old_bytes)))
    row = np.random.default_rng(0).random(N_FEATURES).astype(np.float32)
    for _ in range(200):
        handle.predict(row)

    def measure(n: int) -> list[float]:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            handle.predict(row)
            out.append(time.perf_counter() - t0)
        return out

    steady = measure(predictions)
    stop = threading.Event()
    swaps = [0]

    def swapper() -> None:  # what an update does beside the serving model: load, smoke, swap
        paths = [(folder / "b.onnx", new_bytes), (folder / "a.onnx", old_bytes)]
        while not stop.is_set():
            path, data = paths[swaps[0] % 2]
            model = LoadedModel(path, sha256_hex(data))
            model.predict_batch(np.tile(row, (5, 1)))
            handle.swap(model)
            swaps[0] += 1

    thread = threading.Thread(target=swapper)
    thread.start()
    during = measure(predictions)
    stop.set()
    thread.join()
    s50, s99 = percentiles(steady)
    d50, d99 = percentiles(during)
    print(f"  {size_mb:>6.1f} MB model  steady p50 {s50:8.1f} us  p99 {s99:8.1f} us   |  during swaps "
          f"({swaps[0]} swaps) p50 {d50:8.1f} us  p99 {d99:8.1f} us")


CHILD = r"""
import json, sys, time
sys.path[:0] = sys.argv[4].split(":")
from mledge_update.codecs import apply_delta, decode_full
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
kind, old_path, blob_path = sys.argv[1], sys.argv[2], sys.argv[3]
old = open(old_path, "rb").read()
blob = open(blob_path, "rb").read()
before = hwm()
t0 = time.perf_counter()
new = decode_full("zstd", blob) if kind == "full:zstd" else apply_delta(kind, old, blob)
elapsed = time.perf_counter() - t0
print(json.dumps({"seconds": elapsed, "peak_extra": hwm() - before, "size": len(new)}))
"""


def aligned_bsdiff4(old: bytes, new: bytes) -> bytes:
    """A valid BSDIFF40 patch for same-layout models (one control tuple, bytewise diff):
    what bsdiff produces when it aligns the whole file, made in O(n) instead of its
    O(n log n) suffix sort (minutes for 100 MB on these machines)."""
    import io

    import bsdiff4.core
    import bsdiff4.format

    diff = (np.frombuffer(new, np.uint8) - np.frombuffer(old, np.uint8)).astype(np.uint8).tobytes()
    out = io.BytesIO()
    control = b"".join(bsdiff4.core.encode_int64(n) for n in (len(new), 0, 0))
    bsdiff4.format.write_patch(out, len(new), control, diff, b"")
    return out.getvalue()


def bench_patch(folder: Path, size_mb: float) -> None:
    import zstandard
    from mledge_update.codecs import make_delta

    old, weights = mlp_model(size_mb, 1, seed=1)
    new, _ = mlp_model(size_mb, 2, seed=2, base=weights)
    assert len(old) == len(new)
    (folder / "old").write_bytes(old)
    blobs = {"full:zstd": zstandard.ZstdCompressor(level=3, write_checksum=True).compress(new)}
    notes = {"full:zstd": "zstd-3 full model (baseline)"}
    for codec in registered_codecs():
        if codec == "bsdiff4":
            if size_mb <= 1:
                blobs[codec], notes[codec] = make_delta(codec, old, new), "bsdiff4.diff"
            else:
                blobs[codec], notes[codec] = aligned_bsdiff4(old, new), "aligned BSDIFF40 (diff too slow here)"
        else:
            t0 = time.perf_counter()
            blobs[codec] = make_delta(codec, old, new)
            notes[codec] = f"made in {time.perf_counter() - t0:.1f}s"
    base = None
    for kind, blob in blobs.items():
        (folder / "blob").write_bytes(blob)
        paths = ":".join(str(ROOT / p) for p in ("update_format", "edge"))
        out = subprocess.run([sys.executable, "-c", CHILD, kind, str(folder / "old"), str(folder / "blob"), paths],
                             capture_output=True, text=True, timeout=900, check=True)
        result = json.loads(out.stdout)
        assert result["size"] == len(new)
        if base is None:
            base = result
        print(f"  {size_mb:>6.1f} MB  {kind:<10} download {len(blob) / 1e6:9.3f} MB  apply {result['seconds']:7.3f} s"
              f"  peak +{result['peak_extra'] / 1e6:8.1f} MB   (baseline full: {base['seconds']:.3f} s, "
              f"+{base['peak_extra'] / 1e6:.1f} MB, {len(blobs['full:zstd']) / 1e6:.3f} MB)  [{notes[kind]}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,10,100")
    parser.add_argument("--predictions", type=int, default=3000)
    args = parser.parse_args()
    sizes = [float(s) for s in args.sizes.split(",")]
    print(f"host: {os.cpu_count()} cores, python {sys.version.split()[0]}, codecs {registered_codecs()}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print("inference latency, one row, ModelHandle.predict (baseline: steady state)")
        for size in sizes:
            if size <= 10:
                bench_latency(folder, size, args.predictions)
        print("applying an update (10% of weights fine-tuned): time and peak extra memory")
        for size in sizes:
            bench_patch(folder, size)


if __name__ == "__main__":
    main()
