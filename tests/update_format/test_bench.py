"""bench/delta.py runs end to end on a short sequence and prints a column per codec."""

from __future__ import annotations

import json
import subprocess
import sys

from mledge_update.codecs import SUPPORTED_CODECS

from tests.conftest import REPO, subprocess_env


def test_delta_bench_prints_every_codec_for_a_short_sequence(tmp_path) -> None:
    out = tmp_path / "delta.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "delta.py"), "--sequences", "kmeans-warm,digits-logistic-warm",
         "--steps", "2", "--json", str(out)],
        env=subprocess_env(), capture_output=True, text=True, timeout=240, check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    header = next(line for line in result.stdout.splitlines() if line.startswith("| sequence"))
    for codec in SUPPORTED_CODECS:
        assert codec in header
    rows = json.loads(out.read_text())
    assert [r["sequence"] for r in rows] == ["kmeans-warm", "digits-logistic-warm"]
    for row in rows:
        assert set(row["codecs"]) == set(SUPPORTED_CODECS)
        assert all(run["size"] > 0 for run in row["codecs"].values())
        assert row["zstd19"] < row["onnx"]
