"""What the release Lambda spends on one release, by model size: the full artifact plus
the deltas from `--bases` earlier versions within the default packaging budget
(`[models.<name>.packaging]`, chalicelib/delta_budget.py). Printed per size: seconds for
the full artifact, per codec (built / skipped and why), total, and the process's peak
resident memory.

    python bench/packaging.py                 # 20 and 55 MB, 3 bases
    python bench/packaging.py --sizes 100 --bases 1 --time-budget 600
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "update_format"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from apply_memory import model_pair  # noqa: E402
from mledge_update.codecs import encode_full  # noqa: E402
from mledge_update.hashing import sha256_hex  # noqa: E402

from chalicelib.config import PackagingConfig  # noqa: E402
from chalicelib.delta_budget import build_deltas  # noqa: E402


def _hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1e3
    return 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="20,55")
    parser.add_argument("--bases", type=int, default=3)
    parser.add_argument("--time-budget", type=float, default=PackagingConfig().time_budget_seconds)
    args = parser.parse_args(argv)
    budget = PackagingConfig(time_budget_seconds=args.time_budget)
    print(f"budget: {budget}")
    print("| model MB | full s | base | built (bytes, s) | skipped | total s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for size in (int(s) for s in args.sizes.split(",") if s):
        started = time.monotonic()
        olds = [model_pair(size, seed=seed)[0] for seed in range(args.bases)]
        _, new = model_pair(size, seed=0)
        new_sha = sha256_hex(new)
        began = time.monotonic()
        full = encode_full("zstd", new)
        full_s = time.monotonic() - began
        deadline = time.monotonic() + budget.time_budget_seconds
        for index, old in enumerate(olds):
            result = build_deltas(old, new, new_sha, len(full), budget, deadline)
            built = ", ".join(f"{c} {len(b) / 1e6:.2f} MB {result.seconds[c]:.1f} s" for c, b in result.built.items())
            skipped = "; ".join(f"{c}: {r}" for c, r in result.skipped)
            print(f"| {len(new) / 1e6:.1f} | {full_s:.1f} | {index + 1} | {built or '-'} | {skipped or '-'} | "
                  f"{time.monotonic() - began:.1f} | {_hwm_mb():.0f} |", flush=True)
        del olds, new, full
        print(f"# {size} MB: {time.monotonic() - started:.0f} s with model generation", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
