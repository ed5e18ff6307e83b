"""The install phase of a fresh-clone `make test`: the locked install beside the old one.

Clones this repository twice into a temporary folder, one clone at the baseline commit
(before the lock: pip installing top-level pins, transitive dependencies floating) and
one at HEAD (the lock: `uv pip sync --require-hashes`), and times `make env` in each,
the step `make test` runs before anything else. Both start from empty pip and uv caches
so that they download what a fresh machine downloads. Run them in the same session:
machines are noisy, the ratio is the figure.

    python bench/install.py [--baseline c2aba86] [--runs 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINE = "c2aba86"  # the last commit before the lock


def timed_env(commit: str, work: Path, label: str) -> float:
    clone = work / label
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "checkout", "-q", commit], check=True)
    env = dict(os.environ)
    env["PIP_CACHE_DIR"] = str(work / f"{label}-pip-cache")
    env["UV_CACHE_DIR"] = str(work / f"{label}-uv-cache")
    env.pop("VIRTUAL_ENV", None)
    started = time.monotonic()
    done = subprocess.run(["make", "env"], cwd=clone, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        sys.exit(f"{label}: make env failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    shutil.rmtree(clone, ignore_errors=True)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default=BASELINE, help="commit of the pre-lock install")
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                          check=True, capture_output=True, text=True).stdout.strip()
    rows = []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="mledge-install-") as tmp:
            work = Path(tmp)
            before = timed_env(args.baseline, work, f"before-{run}")
            after = timed_env(head, work, f"after-{run}")
            rows.append((before, after))
            print(f"run {run + 1}: baseline {args.baseline} (pip, floating transitive deps) "
                  f"{before:6.1f} s | locked {head} (uv pip sync --require-hashes) {after:6.1f} s | "
                  f"ratio {after / before:.2f}", flush=True)
    best_before = min(r[0] for r in rows)
    best_after = min(r[1] for r in rows)
    print(f"fresh-clone `make env`, empty caches: before {best_before:.1f} s, after {best_after:.1f} s "
          f"({best_after / best_before:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
