"""Training wall time and peak memory per family at 10k / 100k (/ 1M) records.

    python bench/train.py                 # 10k and 100k records, both families
    python bench/train.py --with-1m       # ... and 1M records (minutes; ~2 GB of temp files)
    python bench/train.py --sizes 5000 --families kmeans_anomaly
    python bench/train.py --sizes 10000 --families cnn   # the CNN; CUDA when the machine has one

Data: synthetic telemetry written the way ingest writes it (gzip JSON lines,
1000 records per object under dt=/hour= partitions). Each run is the real
entrypoint in a fresh child process (so peak RSS is that run's own), with the
pipeline.toml hyperparameters. Printed per run: seconds per phase (load, fit,
export, evaluate incl. parity and champion, write), total, peak RSS, and as the
baseline for load the time to merely gunzip the same files (the floor any
loader pays): load/gunzip says what parsing JSON and building arrays add, and
load/fit whether loading is the bottleneck.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "training_image"), str(REPO / "update_format")]

from trainer import synthetic  # noqa: E402

CHILD = """
import json, resource, sys
from trainer.entrypoint import train
from trainer.paths import TrainingPaths
timings = {}
metrics = train(TrainingPaths.resolve(sys.argv[1]), timings)
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("BENCH " + json.dumps({"timings": timings, "peak_mb": peak_mb, "metrics": metrics}))
"""

FAMILIES = {
    "kmeans_anomaly": (synthetic.vibration_records, synthetic.kmeans_hyperparameters),
    "classifier": (synthetic.digits_records, synthetic.classifier_hyperparameters),
    # PyTorch: on a GPU machine this is the CPU-vs-GPU comparison (`device=` column).
    "cnn": (synthetic.digits_records, synthetic.cnn_hyperparameters),
}
DEFAULT_FAMILIES = ("kmeans_anomaly", "classifier")


def gunzip_seconds(channel: Path) -> float:
    started = time.perf_counter()
    for path in sorted(channel.rglob("*.jsonl.gz")):
        with gzip.open(path, "rb") as fh:
            fh.read()
    return time.perf_counter() - started


def run_one(workdir: Path, family: str, size: int, per_file: int, threads: int | None) -> dict:
    records, hyperparameters = FAMILIES[family]
    base = workdir / f"{family}-{size}"
    shutil.rmtree(base, ignore_errors=True)
    channel = base / "input" / "data" / "train"
    kwargs = {"outlier_fraction": 0.005} if family == "kmeans_anomaly" else {}
    files = synthetic.write_channel(channel, records(size, seed=1, **kwargs), per_file=per_file)
    synthetic.write_hyperparameters(base, hyperparameters())
    data_mb = sum(p.stat().st_size for p in channel.rglob("*.jsonl.gz")) / 1e6
    gunzip = gunzip_seconds(channel)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO / "training_image"), str(REPO / "update_format")]))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, str(base)], env=env,
                          capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{family} {size}: training failed:\n{done.stderr[-2000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("BENCH "))
    result = json.loads(line[len("BENCH "):])
    shutil.rmtree(base, ignore_errors=True)
    return {"family": family, "size": size, "files": files, "data_mb": data_mb,
            "gunzip": gunzip, "wall": wall, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000",
                        help="comma-separated record counts (default 10000,100000)")
    parser.add_argument("--with-1m", action="store_true", help="also run 1,000,000 records")
    parser.add_argument("--families", default=",".join(DEFAULT_FAMILIES),
                        help=f"comma-separated, of: {', '.join(FAMILIES)} "
                             f"(default {','.join(DEFAULT_FAMILIES)})")
    parser.add_argument("--per-file", type=int, default=1000,
                        help="records per gzip object (default 1000)")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS for the training process (default: unset, all cores)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.with_1m and 1_000_000 not in sizes:
        sizes.append(1_000_000)
    families = [f for f in args.families.split(",") if f]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mledge-bench-train-"))
    print(f"cpus={os.cpu_count()} loadavg={os.getloadavg()[0]:.1f} "
          f"python={sys.version.split()[0]} OMP_NUM_THREADS={args.threads or 'unset'}")
    header = (f"{'family':<15}{'records':>9}{'MB gz':>7}{'gunzip':>8}{'load':>7}{'fit':>8}"
              f"{'export':>7}{'eval':>7}{'total':>8}{'wall':>8}{'peak MB':>9}"
              f"{'load/gunzip':>12}{'load/fit':>9}  metric")
    print(header)
    try:
        for family in families:
            for size in sizes:
                r = run_one(workdir, family, size, args.per_file, args.threads)
                t = r["timings"]
                total = sum(t.values())
                metrics = r["metrics"]
                metric = metrics["metric"]
                print(f"{family:<15}{size:>9}{r['data_mb']:>7.1f}{r['gunzip']:>8.2f}"
                      f"{t['load']:>7.2f}{t['fit']:>8.2f}{t['export']:>7.2f}{t['evaluate']:>7.2f}"
                      f"{total:>8.2f}{r['wall']:>8.2f}{r['peak_mb']:>9.0f}"
                      f"{t['load'] / max(r['gunzip'], 1e-9):>12.1f}"
                      f"{t['load'] / max(t['fit'], 1e-9):>9.2f}"
                      f"  {metric}={metrics['challenger'][metric]:.3f}"
                      f" parity={'ok' if metrics['parity']['passed'] else 'FAILED'}"
                      + (f" device={metrics['model']['device']}" if "device" in metrics["model"]
                         else ""), flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
