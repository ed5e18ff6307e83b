"""End to end: `python -m mledge_devstack.demo` with 3 devices, the whole loop for real.

One run serves the module: the local stack (moto server + IoT bridge, mosquitto with
TLS client certificates and per-thing ACLs, the dispatcher running app.py's handlers),
three device agents as subprocesses, the local training backend running the real
trainer. The tests read what the run wrote (summary.json, report.html) and check that
nothing it started is still running.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import psutil
import pytest

from tests.conftest import subprocess_env

DEVICES = 3
RUN_LIMIT_S = 540  # a bound on a stuck run, not a speed assertion
pytestmark = [pytest.mark.slow, pytest.mark.stack, pytest.mark.timeout(RUN_LIMIT_S + 60)]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("e2e-demo")
    output, workdir = base / "out", base / "work"
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "mledge_devstack.demo", "--scenario", "anomaly",
         "--devices", str(DEVICES), "--plain", "--output", str(output), "--workdir", str(workdir)],
        env=subprocess_env(), capture_output=True, text=True, timeout=RUN_LIMIT_S,
    )
    seconds = time.monotonic() - started
    print(f"demo run: {seconds:.1f} s, exit {proc.returncode}")  # visible with -s / on failure
    summary_path = output / "summary.json"
    assert summary_path.exists(), f"no summary.json; stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return {"proc": proc, "summary": json.loads(summary_path.read_text()), "output": output,
            "workdir": workdir, "seconds": seconds}


def _explain(run: dict[str, Any]) -> str:
    return f"stdout:\n{run['proc'].stdout[-6000:]}\nstderr:\n{run['proc'].stderr[-3000:]}"


def test_demo_story_passes(demo_run):
    summary = demo_run["summary"]
    assert demo_run["proc"].returncode == 0, _explain(demo_run)
    assert summary["outcome"] == "passed", _explain(demo_run)
    failed = [c for c in summary["checks"] if not c["passed"]]
    assert not failed, failed


def test_first_training_is_rejected_for_too_little_data(demo_run):
    first = demo_run["summary"]["trainings"][0]
    assert first["status"] == "REJECTED"
    assert first["train"] < demo_run["summary"]["config"]["min_train_records"]
    assert any("min_train_records" in r and "FAIL" in r for r in first["gate"]["reasons"])


def test_second_release_is_a_delta_on_every_device(demo_run):
    summary = demo_run["summary"]
    releases = summary["releases"]
    assert len(releases) >= 2, releases
    first, last = releases[0], releases[-1]
    assert set(first["updated_via"]) == {"full:zstd"}  # nothing to patch on a fresh device
    assert last["devices_updated"] == DEVICES
    for thing, info in last["per_device"].items():
        assert info["status"] == "SUCCEEDED", (thing, info)
        assert info["codec"].startswith("delta:"), (thing, info)
        assert info["bytes_downloaded"] < last["full"]["size"], (thing, info)
    # The approved challenger beat the champion by min_improvement on the same holdout.
    assert last["champion"] is not None
    assert last["challenger"] >= last["champion"] + summary["config"]["min_improvement"]
    assert {d["serving_version"] for d in summary["uplink"]["per_device"].values()} == {
        last["version"]}


def test_uplink_is_lower_with_the_model(demo_run):
    per_device = demo_run["summary"]["uplink"]["per_device"]
    assert len(per_device) == DEVICES
    for thing, usage in per_device.items():
        assert usage["before"]["readings"] > 0 and usage["after"]["readings"] > 0, thing
        assert usage["after"]["bytes_per_reading"] < usage["before"]["bytes_per_reading"], thing


def test_devices_flag_the_new_regime_until_the_retrain_learns_it(demo_run):
    phases = demo_run["summary"]["phases"]
    last = demo_run["summary"]["releases"][-1]["version"]
    # The model serving when the line changed had never seen the new mode: it flags it.
    before_retrain = max((p for p in phases if p["phase"] == "shift" and p["version"] not in (0, last)),
                         key=lambda p: p["readings"])
    assert before_retrain["kinds"]["new_regime"]["flagged_rate"] > 0.9
    assert before_retrain["kinds"]["new_regime"]["sent_rate"] > 0.9
    after = next(p for p in phases if p["phase"] == "faults" and p["version"] == last)["kinds"]
    assert after["new_regime"]["flagged_rate"] < 0.1  # learnt: no longer an anomaly
    assert after["normal"]["flagged_rate"] < 0.1


def test_report_has_the_charts(demo_run):
    report = (demo_run["output"] / "report.html").read_text()
    assert report.count("<svg") >= 5
    for version in (r["version"] for r in demo_run["summary"]["releases"]):
        assert f"v{version}" in report


def test_nothing_the_demo_started_is_left_running(demo_run):
    workdir = str(demo_run["workdir"])
    left = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            env_dir = proc.environ().get("MLEDGE_DEVSTACK_DIR", "")
        except (psutil.Error, OSError):
            continue
        if workdir in cmdline or env_dir.startswith(workdir):
            left.append((proc.pid, cmdline))
    assert not left, left
