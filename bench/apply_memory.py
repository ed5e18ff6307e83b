"""Peak memory of applying a delta on the device, by model size.

For each size, a float model of that many MB (a few large tensors, like a CNN or MLP) and
a fine-tuned version (every weight drifted, one layer frozen) are built; each codec's
delta is made here, then applied in a fresh process from files to a file
(`apply_delta_file`, as the agent does). Printed: the applying process's peak resident
memory above what it held before applying (Python + numpy + zstandard), beside the model
size; the target is at most model size + 32 MB.

    python bench/apply_memory.py                    # 20, 55 and 100 MB
    python bench/apply_memory.py --sizes 20 --codecs onnx-delta-2
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "update_format"))

from mledge_update.codecs import make_delta  # noqa: E402

_APPLY = """
import sys, time
sys.path.insert(0, {root!r})
from mledge_update.codecs import apply_delta_file
def status(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
before = status('VmRSS')
started = time.perf_counter()
apply_delta_file({codec!r}, {old!r}, {delta!r}, {out!r})
print(before, status('VmHWM'), time.perf_counter() - started)
"""


def model_pair(megabytes: int, seed: int = 0) -> tuple[bytes, bytes]:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    layers = 4
    per = int(megabytes * 1e6 / 4 / layers)
    width = 1024
    rows = max(1, per // width)
    old_w = [rng.normal(0, 0.05, (rows, width)).astype(np.float32) for _ in range(layers)]
    new_w = [w if i == 0 else (w + rng.normal(0, 5e-5, w.shape).astype(np.float32)) for i, w in enumerate(old_w)]

    def build(weights: list[np.ndarray]) -> bytes:
        nodes = [helper.make_node("Identity", ["input"], ["scores"])]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1])],
                                  initializer=[numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)])
        return helper.make_model(graph).SerializeToString()

    return build(old_w), build(new_w)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="20,55,100", help="model sizes in MB")
    parser.add_argument("--codecs", default="onnx-delta-2,onnx-xor-planes,zstd-patch")
    args = parser.parse_args(argv)
    codecs = [c for c in args.codecs.split(",") if c]
    print("| model MB | codec | delta MB | make s | apply s | peak MB above start | process peak MB "
          "| target (model + 32) |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="mledge-apply-mem-") as tmp:
        work = Path(tmp)
        for size in (int(s) for s in args.sizes.split(",") if s):
            old, new = model_pair(size)
            (work / "old").write_bytes(old)
            for codec in codecs:
                started = time.perf_counter()
                delta = make_delta(codec, old, new)
                make_s = time.perf_counter() - started
                (work / "delta").write_bytes(delta)
                del delta
                script = _APPLY.format(root=str(ROOT / "update_format"), codec=codec, old=str(work / "old"),
                                       delta=str(work / "delta"), out=str(work / "out"))
                result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                        check=True, timeout=1800)
                before, peak, apply_s = (float(v) for v in result.stdout.split())
                if (work / "out").read_bytes() != new:
                    raise AssertionError(f"{codec} did not round-trip at {size} MB")
                print(f"| {len(new) / 1e6:.1f} | {codec} | {(work / 'delta').stat().st_size / 1e6:.2f} | "
                      f"{make_s:.1f} | {apply_s:.1f} | {(peak - before) / 1e6:.1f} | {peak / 1e6:.1f} | "
                      f"{len(new) / 1e6 + 32:.0f} |",
                      flush=True)
            del old, new
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
