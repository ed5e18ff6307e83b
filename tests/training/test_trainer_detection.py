"""The gate guards what the model is for: the issue's v5, end to end with the real trainer.

v1 (trained before faults) flags them; faults start; v2 trains on what devices sent.
Without verdicts the faults form a cluster of their own and raise the silhouette: the
clustering score alone would approve a model blind to them. With some flagged faults
labelled by an operator, the trainer scores both models on them and the gate rejects
v2; with a fault rule in the pipeline config every flagged fault is kept out of
training and v2 keeps flagging them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from threadpoolctl import threadpool_limits

from chalicelib.config import load_pipeline_config
from chalicelib.gate import evaluate
from chalicelib.settings import DEFAULT_PIPELINE_CONFIG
from tests import uplink_stream as us

KURTOSIS_RULE = json.dumps([{"feature": "kurtosis", "above": 9.0}])


@pytest.fixture(scope="module")
def vib():
    return load_pipeline_config(DEFAULT_PIPELINE_CONFIG).model("vibration-anomaly")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with threadpool_limits(limits=1):
        yield


def test_a_retrain_blind_to_labelled_faults_is_rejected(tmp_path: Path, vib) -> None:
    run = us.retrain_after_faults(tmp_path, labelled_share=0.3)
    detection = run["metrics"]["detection"]
    assert detection["labelled_faults"] > 20
    assert detection["faults_kept_out_of_training"] == detection["labelled_faults"]
    assert detection["champion"]["fault_detection"] == pytest.approx(1.0)
    assert detection["challenger"]["fault_detection"] < 0.5  # it learned the faults
    assert run["v2_detection"] < 0.5 < run["v1_detection"]
    decision = evaluate(vib, run["metrics"], champion_in_production=True)
    failed = [c.rule for c in decision.checks if not c.passed]
    assert failed == ["detection"], decision.reasons  # silhouette alone would approve it


def test_a_fault_rule_keeps_every_flagged_fault_out_of_training(tmp_path: Path, vib) -> None:
    run = us.retrain_after_faults(tmp_path, labelled_share=0.0, fault_rules=KURTOSIS_RULE)
    detection = run["metrics"]["detection"]
    # every fault sent is caught by the rule (and a few flagged normal readings beyond it)
    assert run["sent_faults"] <= detection["labelled_faults"] <= 1.02 * run["sent_faults"]
    assert detection["challenger"]["fault_detection"] >= 0.95
    assert run["v2_detection"] >= 0.95
    check = next(c for c in evaluate(vib, run["metrics"], champion_in_production=True).checks
                 if c.rule == "detection")
    assert check.passed, check.reason
