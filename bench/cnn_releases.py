"""The digits CNN over a sequence of releases: accuracy and bytes shipped, scratch vs warm start.

Each release trains the real trainer (`trainer.entrypoint.train`, the `cnn` family) on a
growing share of scikit-learn's digits (default 10 % -> 30 % -> 50 % -> 70 % of one seeded
shuffle), with the previous release of the same sequence as the champion. Sequences:

- `scratch`: `warm_start=false`, every release trained from new random weights (the baseline);
- `warm`: fine-tunes the previous release with the digits settings of chalicelib/pipeline.toml
  (only the 10 % largest weight changes kept, `update_fraction`);
- variants: every weight free to change, a smaller fine-tune LR, frozen layers.

Per release it prints the holdout accuracy (the gate's figure, on that release's holdout)
and the accuracy on one fixed holdout (the holdout of all records, the same for every
row), the model size, the bytes a device downloads with the best delta codec against the
previous release (every registered codec is tried and the delta applied and checked
bit-exact) and with zstd of the full model. A summary then compares each sequence's
releases 2.. with the baseline's: bytes (best codec) and accuracy.

    python bench/cnn_releases.py                              # ~3-4 min on 2 busy cores
    python bench/cnn_releases.py --shares 10,30,50,70,90 --sequences scratch,warm
    python bench/cnn_releases.py --json out.json --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "training_image"))
sys.path.insert(0, str(REPO / "update_format"))

from mledge_update.codecs import SUPPORTED_CODECS, apply_delta, encode_full, make_delta  # noqa: E402
from trainer import synthetic  # noqa: E402
from trainer.data import holdout_mask  # noqa: E402
from trainer.entrypoint import train  # noqa: E402
from trainer.paths import TrainingPaths  # noqa: E402

BASELINE = "scratch"
ORDER_SEED = 20240601
# The digits model's hyperparameters as chalicelib/pipeline.toml ships them.
PIPELINE_HP = {k: ("true" if v is True else "false" if v is False else str(v))
               for k, v in tomllib.loads((REPO / "chalicelib" / "pipeline.toml").read_text())
               ["models"]["digits"]["hyperparameters"].items()}
SEQUENCES: dict[str, dict[str, str]] = {
    "scratch": {"warm_start": "false"},
    "warm": {},  # pipeline.toml: fine-tune, keep the 10 % largest changes
    "warm-all-weights": {"update_fraction": "1"},
    "warm-sparse-20": {"update_fraction": "0.2"},
    "warm-small-lr": {"update_fraction": "1", "fine_tune_learning_rate": "0.0003",
                      "fine_tune_epochs": "15"},
    "warm-frozen-conv": {"update_fraction": "1", "frozen_layers": "conv1,conv2"},
    "warm-head-only": {"update_fraction": "1", "frozen_layers": "conv1,conv2,dense"},
}
DEFAULT_SEQUENCES = ("scratch", "warm", "warm-all-weights", "warm-small-lr", "warm-head-only")


@dataclass
class Release:
    share: int
    records: int
    accuracy: float
    fixed_accuracy: float
    champion_accuracy: float | None
    size: int
    zstd_full: int
    best_delta: int | None
    best_codec: str | None
    fit_seconds: float
    warm: bool

    @property
    def shipped(self) -> int:
        return min(self.zstd_full, self.best_delta or self.zstd_full)


def digits_in_order() -> list[dict[str, Any]]:
    records = list(synthetic.digits_records(1797))
    order = np.random.default_rng(ORDER_SEED).permutation(len(records))
    return [records[i] for i in order]


def best_delta(old: bytes, new: bytes) -> tuple[int, str]:
    sizes = {}
    for codec in SUPPORTED_CODECS:
        delta = make_delta(codec, old, new)
        if apply_delta(codec, old, delta) != new:
            raise SystemExit(f"{codec}: delta does not reproduce the model")
        sizes[codec] = len(delta)
    codec = min(sizes, key=lambda c: sizes[c])
    return sizes[codec], codec


def fixed_holdout_accuracy(model: bytes, records: list[dict[str, Any]]) -> float:
    import onnxruntime as ort

    ids = [r["id"] for r in records]
    mask = holdout_mask(ids, int(PIPELINE_HP["holdout_percent"]))
    x = np.array([r["features"] for r, m in zip(records, mask, strict=True) if m], np.float32)
    y = np.array([r["label"] for r, m in zip(records, mask, strict=True) if m])
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    label = sess.run(["label"], {"input": x})[0]
    return float(np.mean(label == y))


def run_sequence(name: str, overrides: dict[str, str], shares: list[int],
                 records: list[dict[str, Any]], workdir: Path) -> list[Release]:
    releases: list[Release] = []
    previous: bytes | None = None
    for version, share in enumerate(shares, start=1):
        base = workdir / f"{name}-v{version}"
        shutil.rmtree(base, ignore_errors=True)
        subset = records[: len(records) * share // 100]
        synthetic.write_channel(base / "input" / "data" / "train", subset, per_file=250)
        synthetic.write_hyperparameters(base, synthetic.cnn_hyperparameters(
            **{**PIPELINE_HP, **overrides, "model_version": str(version)}))
        if previous is not None:
            champion = base / "input" / "data" / "champion" / "model.onnx"
            champion.parent.mkdir(parents=True)
            champion.write_bytes(previous)
        timings: dict[str, float] = {}
        with contextlib.redirect_stdout(io.StringIO()):
            metrics = train(TrainingPaths.resolve(base), timings)
        model = (base / "model" / "model.onnx").read_bytes()
        if not metrics["parity"]["passed"]:
            raise SystemExit(f"{name} v{version}: parity failed {metrics['parity']}")
        delta, codec = best_delta(previous, model) if previous is not None else (None, None)
        releases.append(Release(
            share=share, records=len(subset), accuracy=metrics["challenger"]["accuracy"],
            fixed_accuracy=fixed_holdout_accuracy(model, records),
            champion_accuracy=(metrics["champion"] or {}).get("accuracy"),
            size=len(model), zstd_full=len(encode_full("zstd", model)), best_delta=delta,
            best_codec=codec, fit_seconds=timings["fit"],
            warm=bool(metrics["model"]["warm_start"]["used"])))
        previous = model
        shutil.rmtree(base, ignore_errors=True)
    return releases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shares", default="10,30,50,70",
                        help="percent of the digits per release (default 10,30,50,70)")
    parser.add_argument("--sequences", default=",".join(DEFAULT_SEQUENCES),
                        help=f"comma-separated, of: {', '.join(SEQUENCES)}")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: reproducible figures on a busy box)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    shares = [int(s) for s in args.shares.split(",") if s]
    names = [s for s in args.sequences.split(",") if s]
    unknown = [n for n in names if n not in SEQUENCES]
    if unknown:
        raise SystemExit(f"unknown sequence(s) {unknown}; known: {', '.join(SEQUENCES)}")
    if BASELINE not in names:
        names.insert(0, BASELINE)
    records = digits_in_order()
    print(f"cpus={os.cpu_count()} loadavg={os.getloadavg()[0]:.1f} torch={torch.__version__} "
          f"threads={args.threads} device={'cuda' if torch.cuda.is_available() else 'cpu'} "
          f"codecs={','.join(SUPPORTED_CODECS)}")
    results: dict[str, list[Release]] = {}
    with tempfile.TemporaryDirectory(prefix="mledge-bench-cnn-") as tmp:
        for name in names:
            started = time.perf_counter()
            results[name] = run_sequence(name, SEQUENCES[name], shares, records, Path(tmp))
            print(f"# {name}: {SEQUENCES[name] or 'pipeline.toml settings'} "
                  f"({time.perf_counter() - started:.0f}s)", flush=True)
    print(f"\n{'sequence':<18}{'rel':>4}{'data':>6}{'warm':>6}{'acc':>7}{'acc fix':>8}"
          f"{'champ':>7}{'onnx B':>8}{'zstd B':>8}{'delta B':>8}  {'codec':<16}{'fit s':>6}")
    for name, releases in results.items():
        for i, r in enumerate(releases, start=1):
            champ = f"{r.champion_accuracy:.3f}" if r.champion_accuracy is not None else "-"
            print(f"{name:<18}{i:>4}{r.share:>5}%{'yes' if r.warm else 'no':>6}{r.accuracy:>7.3f}"
                  f"{r.fixed_accuracy:>8.3f}{champ:>7}{r.size:>8}{r.zstd_full:>8}"
                  f"{r.best_delta if r.best_delta is not None else '-':>8}  "
                  f"{r.best_codec or '-':<16}{r.fit_seconds:>6.1f}")
    base = results[BASELINE]
    print(f"\nreleases 2..{len(shares)} vs {BASELINE} (per device; target: bytes <= 0.50x "
          "at equal or better accuracy)")
    print(f"{'sequence':<18}{'delta B':>9}{'x scratch':>10}{'zstd B':>9}{'x scratch':>10}"
          f"{'acc last':>9}{'scratch':>8}{'acc>= every rel':>16}")
    base_delta = sum(r.best_delta or 0 for r in base[1:])
    base_zstd = sum(r.zstd_full for r in base[1:])
    for name, releases in results.items():
        delta = sum(r.best_delta or 0 for r in releases[1:])
        zstd = sum(r.zstd_full for r in releases[1:])
        at_least = all(r.accuracy >= b.accuracy for r, b in zip(releases[1:], base[1:],
                                                                 strict=True))
        print(f"{name:<18}{delta:>9}{delta / base_delta:>10.2f}{zstd:>9}{zstd / base_zstd:>10.2f}"
              f"{releases[-1].accuracy:>9.3f}{base[-1].accuracy:>8.3f}"
              f"{'yes' if at_least else 'no':>16}")
    if args.json:
        args.json.write_text(json.dumps(
            {n: [r.__dict__ for r in rs] for n, rs in results.items()}, indent=2))


if __name__ == "__main__":
    main()
