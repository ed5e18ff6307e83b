"""End to end: `python -m mledge_devstack.demo --scenario digits`, the digits CNN for real.

One run serves the module: the local stack, three device agents, the local training
backend running the real trainer's `cnn` family (PyTorch, on this machine's CPU). The
tests read the summary it wrote: accuracy per version, bytes per release and the
devices' inference time per prediction.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import pytest

from tests.conftest import subprocess_env

pytest.importorskip("torch")

DEVICES = 3
RUN_LIMIT_S = 600  # a bound on a stuck run, not a speed assertion
pytestmark = [pytest.mark.slow, pytest.mark.stack, pytest.mark.timeout(RUN_LIMIT_S + 60)]


@pytest.fixture(scope="module")
def summary(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("e2e-digits")
    output, workdir = base / "out", base / "work"
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "mledge_devstack.demo", "--scenario", "digits",
         "--devices", str(DEVICES), "--plain", "--output", str(output), "--workdir", str(workdir)],
        env=subprocess_env(), capture_output=True, text=True, timeout=RUN_LIMIT_S,
    )
    print(f"digits demo: {time.monotonic() - started:.1f} s, exit {proc.returncode}")
    path = output / "summary.json"
    assert path.exists(), f"no summary.json; stdout:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(path.read_text())
    assert proc.returncode == 0 and result["outcome"] == "passed", proc.stdout[-6000:]
    return result


def test_the_cnn_is_rejected_on_10_percent_and_released_on_70(summary):
    first, second = summary["trainings"][:2]
    assert first["status"] == "REJECTED" and second["status"] == "RELEASED"
    assert second["model"]["device"] in ("cpu", "cuda")  # the cnn family's metrics.json
    assert "family cnn" in " ".join(second["gate"]["reasons"])
    assert second["challenger"] >= summary["config"]["threshold"]


def test_release_bytes_and_every_device_serving_it(summary):
    (release,) = summary["releases"]
    assert release["devices_updated"] == DEVICES
    assert release["full"]["encoding"] == "zstd" and release["full"]["size"] > 0
    assert release["bytes_shipped"]["total"] == release["full"]["size"] * DEVICES


def test_devices_classify_with_the_cnn_and_report_latency(summary):
    (classify,) = [p for p in summary["phases"] if p["phase"] == "classify"]
    digits = classify["kinds"]["digit"]
    assert digits["predicted"] == digits["readings"] > 0
    assert digits["accuracy"] >= 0.9
    assert digits["us_per_prediction"] > 0
