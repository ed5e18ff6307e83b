"""bench/delta.py runs end to end on small pairs and prints a column per codec and tool."""

from __future__ import annotations

import json
import subprocess
import sys

from mledge_update.codecs import SUPPORTED_CODECS

from tests.conftest import REPO, subprocess_env


def test_delta_bench_prints_every_codec_beside_the_floor(tmp_path) -> None:
    out = tmp_path / "delta.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "delta.py"), "--pairs", "kmeans,gb-warm+10",
         "--tools", "bsdiff4", "--json", str(out)],
        env=subprocess_env(), capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    header = next(line for line in result.stdout.splitlines() if line.startswith("| pair"))
    for codec in SUPPORTED_CODECS:
        assert codec in header
    assert "worst pair vs best external tool" in result.stdout
    rows = json.loads(out.read_text())
    assert [r["pair"] for r in rows] == ["kmeans", "gb-warm+10"]
    for row in rows:
        assert set(row["runs"]) == set(SUPPORTED_CODECS)
        assert all(run["size"] > 0 for run in row["runs"].values())
        assert 0 < row["floor"] < row["zstd19"] < row["new"]
