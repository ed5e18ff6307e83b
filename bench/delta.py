"""Delta sizes, make time and apply memory per model family: every registered codec beside
the external tools (bsdiff4, zstd --patch-from, HDiffPatch, xdelta3, detools) and beside
an estimated entropy floor.

Each pair is (model, retrained model) of one family: tree ensembles warm-started with more
trees or retrained (RandomForest, GradientBoosting, IsolationForest), a scaler+PCA+logistic
pipeline, k-means, MLPs from 1 to 20 MB, a CNN in fp32 and int8 (QDQ, per-channel scales),
fp16 weights, a model whose embedding gained rows and whose head gained a class, and one
model of 50 MB or more. Small models are trained with scikit-learn; the large float ones
are built with onnx.helper and "fine-tuned" by a relative drift of their weights (with
some layers frozen), which is what a retrain does to their bytes.

Every delta is applied and compared bit for bit before it is counted. "apply MB" is the
peak resident memory of a fresh process that applies the delta from files to a file
(`apply_delta_file`, or the tool's own patcher), minus that process's resident size
before it starts (Python and imports); "make s" is wall time to make the delta.

The floor: per numeric array, the order-0 entropy of the best residual against the
paired old array (ULP/arithmetic difference or XOR; per element where the alphabet is
well sampled, else per byte plane), plus zstd-19 of the bytes around the arrays with the
old file as dictionary. It is an estimate of what an order-0 coder of the residuals can
reach, not a theorem: context models can beat it.

    python bench/delta.py                          # all pairs, ~30 minutes on 2 busy cores
    python bench/delta.py --pairs kmeans,rf-warm+8 --json out.json
    python bench/delta.py --large-mb 100           # the large pair at 100 MB

External tools: bsdiff4, detools and hdiffpatch are Python packages (requirements-dev.txt);
`zstd` and `xdelta3` are command-line tools (`apt-get install zstd xdelta3`); a tool that
is not installed is reported as such.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "update_format"))

from mledge_update import onnx_delta
from mledge_update._wire import zstd_compress
from mledge_update.codecs import SUPPORTED_CODECS, encode_full, make_delta

VIBRATION_FEATURES = ["rms", "peak", "crest_factor", "kurtosis", "band_low", "band_mid", "band_high", "temperature"]
EXTERNAL = ("bsdiff4", "zstd-cli", "hdiffpatch", "xdelta3", "detools")


# ------------------------------------------------------------------------------ models


def _export(estimator, n_features: int, family: str, version: int, zipmap: bool = False) -> bytes:
    """ONNX in the project's conventions (docs/training.md): input `input`, outputs `label`/`scores`, metadata."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    options = {id(estimator): {"zipmap": False}} if zipmap is False and hasattr(estimator, "predict_proba") else None
    model = to_onnx(estimator, initial_types=[("input", FloatTensorType([None, n_features]))],
                    options=options, target_opset={"": 17, "ai.onnx.ml": 3})
    for key, value in {"mledge.family": family, "mledge.version": str(version)}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return model.SerializeToString()


def _vibration(rows: int, seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, size=(4, 8))
    drift = np.linspace(0, 0.6, rows)[:, None]
    return (centres[rng.integers(0, 4, rows)] + rng.normal(0, 0.6, (rows, 8)) + drift).astype(np.float32)


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(7).permutation(len(x))
    return x[order].astype(np.float32) / 16.0, y[order]


def pair_kmeans() -> tuple[bytes, bytes]:
    from sklearn.cluster import KMeans

    x = _vibration(6000)
    old = KMeans(4, n_init=3, random_state=7).fit(x[:4000])
    new = KMeans(4, init=old.cluster_centers_, n_init=1).fit(x)
    return _export(old, 8, "kmeans", 1), _export(new, 8, "kmeans", 2)


def pair_pipeline() -> tuple[bytes, bytes]:
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = _digits()
    def fit(rows: int):
        pipeline = make_pipeline(StandardScaler(), PCA(32, random_state=0), LogisticRegression(max_iter=300))
        return pipeline.fit(x[:rows], y[:rows])
    return _export(fit(1000), 64, "pipeline", 1), _export(fit(1500), 64, "pipeline", 2)


def _forest_pair(kind: str) -> tuple[bytes, bytes]:
    from sklearn.ensemble import GradientBoostingClassifier, IsolationForest, RandomForestClassifier

    x, y = _digits()
    if kind == "rf":  # warm start: 8 more trees on the same data (the RF +8 trees)
        model = RandomForestClassifier(30, max_depth=8, random_state=0, warm_start=True).fit(x[:1200], y[:1200])
        old = _export(model, 64, "rf", 1)
        model.set_params(n_estimators=38)
        return old, _export(model.fit(x[:1200], y[:1200]), 64, "rf", 2)
    if kind == "gb":  # warm start: 10 more boosting rounds on grown data
        model = GradientBoostingClassifier(n_estimators=20, max_depth=3, random_state=0, warm_start=True)
        old = _export(model.fit(x[:1000], y[:1000]), 64, "gb", 1)
        model.set_params(n_estimators=30)
        return old, _export(model.fit(x[:1000], y[:1000]), 64, "gb", 2)
    vib = _vibration(6000)  # IsolationForest retrained from scratch on grown data
    old_if = IsolationForest(n_estimators=60, random_state=0).fit(vib[:4000])
    new_if = IsolationForest(n_estimators=60, random_state=0).fit(vib)
    return _export(old_if, 8, "iforest", 1), _export(new_if, 8, "iforest", 2)


def pair_mlp_sklearn() -> tuple[bytes, bytes]:
    from sklearn.neural_network import MLPClassifier

    x, y = _digits()
    model = MLPClassifier((512, 512), max_iter=12, random_state=7).fit(x[:900], y[:900])
    old = _export(model, 64, "mlp", 1)
    model.set_params(warm_start=True, max_iter=3)
    return old, _export(model.fit(x[:1500], y[:1500]), 64, "mlp", 2)


def _graph_model(weights: dict[str, np.ndarray], nodes: list, out_dim: int, in_dim: int | list[int]) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    shape = [None, in_dim] if isinstance(in_dim, int) else [None, *in_dim]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None, out_dim])],
        initializer=[numpy_helper.from_array(w, name) for name, w in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _drift(w: np.ndarray, rng: np.random.Generator, rel: float) -> np.ndarray:
    """A fine-tune step: every weight moves by about `rel` of the layer's scale."""
    scale = float(np.std(w.astype(np.float32))) or 1.0
    return (w.astype(np.float32) + rng.normal(0, rel * scale, w.shape).astype(np.float32)).astype(w.dtype)


def _mlp_weights(sizes: list[int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    weights = {}
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        weights[f"w{i}"] = (rng.normal(0, 1 / np.sqrt(a), (a, b))).astype(np.float32)
        weights[f"b{i}"] = rng.normal(0, 0.01, b).astype(np.float32)
    return weights


def _mlp_nodes(layers: int) -> list:
    from onnx import helper

    nodes, prev = [], "input"
    for i in range(layers):
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [f"h{i}"], name=f"fc{i}"))
        prev = f"h{i}"
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"], name=f"relu{i}"))
            prev = f"r{i}"
    nodes[-1].output[0] = "scores"
    return nodes


def pair_mlp_mb(megabytes: float, frozen: int = 0, dtype=np.float32) -> tuple[bytes, bytes]:
    """A float MLP of about `megabytes` fine-tuned: the first `frozen` layers unchanged."""
    rng = np.random.default_rng(1)
    width = int(np.sqrt(megabytes * 1e6 / np.dtype(dtype).itemsize / 4))
    sizes = [256, width, width, width, width, 10]
    old = {k: v.astype(dtype) for k, v in _mlp_weights(sizes, rng).items()}
    new = {k: (v if int(k[1:]) < frozen else _drift(v, rng, 1e-3)) for k, v in old.items()}
    nodes = _mlp_nodes(len(sizes) - 1)
    return _graph_model(old, nodes, 10, 256), _graph_model(new, nodes, 10, 256)


def _cnn(rng: np.random.Generator) -> dict[str, np.ndarray]:
    shapes = {"c0": (32, 3, 3, 3), "c1": (64, 32, 3, 3), "c2": (128, 64, 3, 3), "c3": (256, 128, 3, 3),
              "c4": (512, 256, 3, 3), "fc": (512, 10)}
    return {k: rng.normal(0, 1 / np.sqrt(np.prod(s[1:])), s).astype(np.float32) for k, s in shapes.items()}


def _cnn_model(weights: dict[str, np.ndarray], quantized: bool) -> bytes:
    from onnx import helper

    nodes, prev, init = [], "input", {}
    for name in ["c0", "c1", "c2", "c3", "c4"]:
        w = weights[name]
        wname = name
        if quantized:  # int8 per-output-channel weights behind DequantizeLinear (QDQ)
            scale = (np.abs(w).reshape(w.shape[0], -1).max(axis=1) / 127).astype(np.float32)
            init[f"{name}_q"] = np.clip(np.round(w / scale[:, None, None, None]), -127, 127).astype(np.int8)
            init[f"{name}_s"] = scale
            init[f"{name}_z"] = np.zeros(w.shape[0], np.int8)
            nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"],
                                          [f"{name}_w"], axis=0))
            wname = f"{name}_w"
        else:
            init[name] = w
        nodes.append(helper.make_node("Conv", [prev, wname], [f"{name}_o"], pads=[1, 1, 1, 1], strides=[2, 2]))
        nodes.append(helper.make_node("Relu", [f"{name}_o"], [f"{name}_r"]))
        prev = f"{name}_r"
    nodes.append(helper.make_node("GlobalAveragePool", [prev], ["pooled"]))
    nodes.append(helper.make_node("Flatten", ["pooled"], ["flat"]))
    init["fc"] = weights["fc"]
    nodes.append(helper.make_node("MatMul", ["flat", "fc"], ["scores"]))
    return _graph_model(init, nodes, 10, [3, 32, 32])


def pair_cnn(quantized: bool) -> tuple[bytes, bytes]:
    rng = np.random.default_rng(2)
    old = _cnn(rng)
    # fine-tune: the stem is frozen, later layers move by 1e-2 of their scale
    new = {k: (v if k == "c0" else _drift(v, rng, 1e-2)) for k, v in old.items()}
    return _cnn_model(old, quantized), _cnn_model(new, quantized)


def pair_resized() -> tuple[bytes, bytes]:
    """Embedding gains 500 rows (vocabulary) and the head a class; shared weights drift."""
    from onnx import helper

    rng = np.random.default_rng(3)
    emb, head = rng.normal(0, 1, (20000, 64)).astype(np.float32), rng.normal(0, 0.1, (64, 20)).astype(np.float32)
    new_emb = np.vstack([_drift(emb, rng, 1e-4), rng.normal(0, 1, (500, 64)).astype(np.float32)])
    new_head = np.hstack([_drift(head, rng, 1e-4), rng.normal(0, 0.1, (64, 1)).astype(np.float32)])

    def model(e: np.ndarray, h: np.ndarray) -> bytes:
        nodes = [helper.make_node("Gather", ["emb", "input"], ["x"]),
                 helper.make_node("MatMul", ["x", "head"], ["scores"])]
        return _graph_model({"emb": e, "head": h}, nodes, h.shape[1], 1)
    return model(emb, head), model(new_emb, new_head)


def pairs(args: argparse.Namespace) -> dict[str, Callable[[], tuple[bytes, bytes]]]:
    return {
        "kmeans": pair_kmeans,
        "pca-pipeline": pair_pipeline,
        "rf-warm+8": lambda: _forest_pair("rf"),
        "gb-warm+10": lambda: _forest_pair("gb"),
        "iforest-retrain": lambda: _forest_pair("if"),
        "mlp-1mb-sklearn": pair_mlp_sklearn,
        "mlp-20mb-frozen2": lambda: pair_mlp_mb(20, frozen=2),
        "cnn-fp32": lambda: pair_cnn(False),
        "cnn-int8": lambda: pair_cnn(True),
        "mlp-fp16": lambda: pair_mlp_mb(4, dtype=np.float16),
        "resized": pair_resized,
        f"mlp-{args.large_mb}mb": lambda: pair_mlp_mb(args.large_mb, frozen=1),
    }


# ------------------------------------------------------------------------------ the floor


def _h0(symbols: np.ndarray) -> float:
    """Order-0 entropy in bytes of a sequence of symbols."""
    if symbols.size == 0:
        return 0.0
    _, counts = np.unique(symbols, return_counts=True)
    p = counts / symbols.size
    return float(-(counts * np.log2(p)).sum() / 8)


def _residual_floor(res: np.ndarray, width: int) -> float:
    planes = res.view(np.uint8).reshape(-1, width)
    by_plane = sum(_h0(planes[:, k]) for k in range(width))
    distinct = np.unique(res).size
    # per element only where the alphabet is well sampled: with mostly unique values the
    # empirical entropy is log2(n), far below what any coder of those values reaches
    return min(by_plane, _h0(res)) if distinct * 16 <= res.size else by_plane


def entropy_floor(old: bytes, new: bytes) -> float:
    old_arrays = {a.key: a for a in onnx_delta.find_arrays(old)}
    total = 0.0
    rest, used, pos = [], [], 0
    for array in onnx_delta.find_arrays(new):
        assert array.values is not None
        base = old_arrays.get(array.key)
        width, cls = array.layout.width, array.layout.cls
        candidates = [array.values]
        if array.layout.cls == onnx_delta.CLS_INT:
            candidates.append(onnx_delta.residual(onnx_delta.T_PREV, array.values, array.values, width, cls))
        if base is not None and base.layout == array.layout and len(base.dims) == len(array.dims):
            assert base.values is not None
            have = min(array.dims[0], base.dims[0])
            old_rows = base.values[: have * onnx_delta._row(base.dims)]
            pred = onnx_delta.predict_rows(old_rows, array.dims, base.dims, array.dims[0], width)
            candidates.append(onnx_delta.residual(onnx_delta.T_SUB, array.values, pred, width, cls))
            candidates.append(onnx_delta.residual(onnx_delta.T_XOR, array.values, pred, width, cls))
            used.append((base.offset, base.length))
        total += min(_residual_floor(c, width) for c in candidates)
        rest.append(new[pos : array.offset])
        pos = array.offset + array.length
    rest.append(new[pos:])
    dictionary = onnx_delta._without(old, used)
    total += len(zstd_compress(b"".join(rest), level=19, dictionary=dictionary, long_window=True))
    return total


# ------------------------------------------------------------------------------ running tools


@dataclass
class Run:
    size: int = 0
    make_s: float = 0.0
    apply_mb: float = 0.0
    note: str = ""


@dataclass
class Row:
    pair: str
    old: int
    new: int
    zstd19: int
    floor: float
    runs: dict[str, Run] = field(default_factory=dict)


_APPLY_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
{imports}
def status(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
before = status('VmRSS')
{apply}
print(before, status('VmHWM'))
"""

_APPLIERS = {
    "mledge": ("from mledge_update.codecs import apply_delta_file",
               "apply_delta_file({codec!r}, {old!r}, {delta!r}, {out!r})"),
    "hdiffpatch": ("import hdiffpatch",
                   "open({out!r}, 'wb').write(hdiffpatch.apply(open({old!r}, 'rb').read(), "
                   "open({delta!r}, 'rb').read()))"),
    "detools": ("import detools",
                "detools.apply_patch_filenames({old!r}, {delta!r}, {out!r})"),
}


def _python_apply(kind: str, codec: str, old: Path, delta: Path, out: Path, timeout: float) -> float:
    imports, call = _APPLIERS[kind]
    script = _APPLY_SCRIPT.format(root=str(Path(__file__).resolve().parents[1] / "update_format"), imports=imports,
                                  apply=call.format(codec=codec, old=str(old), delta=str(delta), out=str(out)))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, check=True)
    before, peak = (int(v) for v in result.stdout.split())
    return max(0, peak - before) / 1e6


def _cli(argv: list[str], timeout: float) -> float:
    """Run a command; the peak resident memory of that process in MB. GNU time reports
    it (a child's own high-water mark: measuring from here would count this process too)."""
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss.name, *argv], check=True, timeout=timeout,
                       capture_output=True)
        return int(rss.read().split()[-1]) * 1024 / 1e6


def _make_external(tool: str, old: Path, new: Path, delta: Path, timeout: float) -> None:
    if tool == "zstd-cli":
        _cli(["zstd", "-q", "-f", "-19", "--long=31", f"--patch-from={old}", str(new), "-o", str(delta)], timeout)
    elif tool == "xdelta3":
        _cli(["xdelta3", "-e", "-f", "-9", "-S", "lzma", "-B", str(max(old.stat().st_size, 1 << 20)),
              "-s", str(old), str(new), str(delta)], timeout)
    else:
        code = {"hdiffpatch": "import hdiffpatch; open(d,'wb').write(hdiffpatch.diff(open(o,'rb').read(), "
                              "open(n,'rb').read(), "
                              "hdiffpatch.COMPRESSION_LZMA2, validate=False))",
                "detools": "import detools; detools.create_patch_filenames(o, n, d, compression='lzma')"}[tool]
        subprocess.run([sys.executable, "-c", f"o, n, d = {str(old)!r}, {str(new)!r}, {str(delta)!r}; {code}"],
                       check=True, timeout=timeout, capture_output=True)


def _apply_external(tool: str, old: Path, delta: Path, out: Path, timeout: float) -> float:
    if tool == "zstd-cli":
        return _cli(["zstd", "-q", "-f", "-d", "--long=31", "-M2047MB", f"--patch-from={old}", str(delta),
                     "-o", str(out)], timeout)
    if tool == "xdelta3":
        window = str(max(old.stat().st_size, 1 << 20))
        return _cli(["xdelta3", "-d", "-f", "-B", window, "-s", str(old), str(delta), str(out)], timeout)
    return _python_apply(tool, "", old, delta, out, timeout)


def run_pair(name: str, old: bytes, new: bytes, codecs: list[str], tools: list[str], work: Path,
             timeout: float, skip_over_mb: dict[str, float]) -> Row:
    old_path, new_path, delta_path, out_path = (work / n for n in ("old", "new", "delta", "out"))
    old_path.write_bytes(old)
    new_path.write_bytes(new)
    row = Row(name, len(old), len(new), len(encode_full("zstd", new)), entropy_floor(old, new))
    for column in [*codecs, *tools]:
        run = Run()
        if len(new) / 1e6 > skip_over_mb.get(column, float("inf")):
            run.note = f"skipped > {skip_over_mb[column]:.0f} MB"
            row.runs[column] = run
            continue
        try:
            out_path.unlink(missing_ok=True)
            started = time.perf_counter()
            if column in codecs or column in SUPPORTED_CODECS:
                delta_path.write_bytes(make_delta(column, old, new))
                run.make_s = time.perf_counter() - started
                run.apply_mb = _python_apply("mledge", column, old_path, delta_path, out_path, timeout)
            else:
                _make_external(column, old_path, new_path, delta_path, timeout)
                run.make_s = time.perf_counter() - started
                run.apply_mb = _apply_external(column, old_path, delta_path, out_path, timeout)
            if out_path.read_bytes() != new:
                raise AssertionError(f"{column} did not round-trip on {name}")
            run.size = delta_path.stat().st_size
        except subprocess.TimeoutExpired:
            run.note = f"timeout {timeout:.0f} s"
        except subprocess.CalledProcessError as exc:
            run.note = f"failed: {(exc.stderr or b'')[-200:]!r}"
        except (FileNotFoundError, ModuleNotFoundError) as exc:
            run.note = f"not installed ({exc})"
        row.runs[column] = run
        print(f"# {name}: {column} {run.size or run.note}", file=sys.stderr, flush=True)
    return row


# ------------------------------------------------------------------------------ output


def fmt_bytes(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e4 else f"{int(n)}"


def best_of(row: Row, columns: list[str]) -> tuple[str, int]:
    sized = [(c, row.runs[c].size) for c in columns if c in row.runs and row.runs[c].size]
    return min(sized, key=lambda x: x[1]) if sized else ("-", 0)


def print_tables(rows: list[Row], codecs: list[str], tools: list[str], ours: str) -> None:
    columns = [*codecs, *[t for t in tools if t not in codecs]]
    head = ["pair", "new", "zstd-19", "floor", *columns, f"{ours} / best external", f"{ours} / floor"]
    print("Delta bytes (make s, apply MB above the applying process's start)\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    worst = (0.0, "", 0.0, "")
    for r in rows:
        cells = [r.pair, fmt_bytes(r.new), fmt_bytes(r.zstd19), fmt_bytes(r.floor)]
        for c in columns:
            run = r.runs[c]
            cells.append(f"{fmt_bytes(run.size)} ({run.make_s:.1f} s, {run.apply_mb:.0f} MB)" if run.size else run.note)
        ext_name, ext = best_of(r, tools)
        mine = r.runs[ours].size if ours in r.runs else 0
        vs_ext = mine / ext if ext and mine else float("nan")
        vs_floor = mine / r.floor if r.floor and mine else float("nan")
        cells += [f"{vs_ext:.2f} ({ext_name})", f"{vs_floor:.2f}"]
        print("| " + " | ".join(cells) + " |")
        if vs_ext > worst[0]:
            worst = (vs_ext, r.pair, vs_floor, ext_name)
    worst_floor = max(((r.runs[ours].size / r.floor, r.pair) for r in rows if r.runs[ours].size and r.floor),
                      default=(float("nan"), "-"))
    print(f"\nworst pair vs best external tool: {worst[1]} at {worst[0]:.2f}x ({worst[3]}); "
          f"worst vs floor: {worst_floor[1]} at {worst_floor[0]:.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", default="", help="comma-separated subset (default: all)")
    parser.add_argument("--codecs", default=",".join(c for c in SUPPORTED_CODECS if c != "bsdiff4"),
                        help="registered codecs to measure (bsdiff4 is in the external tools)")
    parser.add_argument("--tools", default=",".join(EXTERNAL), help="external tools to compare")
    parser.add_argument("--large-mb", type=int, default=55, help="size of the large float pair")
    parser.add_argument("--timeout", type=float, default=600, help="per tool and pair, seconds")
    parser.add_argument("--skip-slow-over-mb", type=float, default=float("inf"),
                        help="skip bsdiff4 and detools (suffix sorting, ~0.5 MB/s) above this size")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    codecs = [c for c in args.codecs.split(",") if c]
    tools = [t for t in args.tools.split(",") if t]
    ours = onnx_delta.NAME if onnx_delta.NAME in codecs else codecs[-1]
    available = pairs(args)
    chosen = [p for p in args.pairs.split(",") if p] or list(available)
    skip = {"bsdiff4": args.skip_slow_over_mb, "detools": args.skip_slow_over_mb}
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="mledge-delta-bench-") as tmp:
        for name in chosen:
            old, new = available[name]()
            rows.append(run_pair(name, old, new, codecs, tools, Path(tmp), args.timeout, skip))
    print_tables(rows, codecs, tools, ours)
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps([
            {"pair": r.pair, "old": r.old, "new": r.new, "zstd19": r.zstd19, "floor": r.floor,
             "runs": {c: vars(x) for c, x in r.runs.items()}} for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
