"""The metric gate: each rule passes and fails with a readable reason."""

from __future__ import annotations

import dataclasses

import pytest

from chalicelib.config import PipelineConfig
from chalicelib.gate import evaluate
from tests.cloud.support import metrics_doc


@pytest.fixture
def vib(config: PipelineConfig):  # threshold 0.30, min_improvement 0.0, min_train 1500
    return config.model("vibration-anomaly")


@pytest.fixture
def digits(config: PipelineConfig):  # threshold 0.93, min_improvement 0.005, min_train 100
    return config.model("digits")


def _check(decision, rule: str):
    return next(c for c in decision.checks if c.rule == rule)


def test_first_model_needs_only_threshold_parity_and_records(vib):
    decision = evaluate(vib, metrics_doc(challenger=0.41))
    assert decision.approved
    assert decision.first_model
    assert decision.reasons == [
        "metrics.json has challenger silhouette for family kmeans_anomaly: pass",
        "silhouette 0.4100 ≥ threshold 0.3000: pass",
        "no champion scored (first model of this model): threshold only: pass",
        "ONNX parity passed (max_abs_diff 2e-06, label_agreement 1.0000, 200 rows): pass",
        "trained on 4000 records ≥ min_train_records 1500: pass",
        "no confirmed faults labelled yet (mledge label, fault_rules): nothing to compare: pass",
    ]


def test_below_threshold_is_rejected(vib):
    decision = evaluate(vib, metrics_doc(challenger=0.21))
    assert not decision.approved
    assert _check(decision, "threshold").reason == "silhouette 0.2100 < threshold 0.3000: FAIL"
    assert decision.summary() == "rejected: silhouette 0.2100 < threshold 0.3000: FAIL"


def test_threshold_is_inclusive(vib):
    assert evaluate(vib, metrics_doc(challenger=0.30)).approved


def test_challenger_must_beat_the_champion_by_min_improvement(digits):
    m = {"family": "cnn", "metric": "accuracy"}
    worse = evaluate(digits, metrics_doc(**m, challenger=0.953, champion=0.95, train=1000))
    assert not worse.approved
    assert _check(worse, "improvement").reason == (
        "accuracy 0.9530 < champion 0.9500 + min_improvement 0.0050 = 0.9550 (same holdout): FAIL")
    assert _check(worse, "threshold").passed
    better = evaluate(digits, metrics_doc(**m, challenger=0.96, champion=0.95, train=1000))
    assert better.approved
    assert not better.first_model
    assert better.champion == 0.95 and better.challenger == 0.96
    assert _check(better, "improvement").reason.endswith("= 0.9550 (same holdout): pass")


def test_equal_to_champion_passes_when_min_improvement_is_zero(vib):
    assert evaluate(vib, metrics_doc(challenger=0.5, champion=0.5)).approved


def test_parity_failure_rejects(vib):
    decision = evaluate(vib, metrics_doc(challenger=0.9, parity=False))
    assert not decision.approved
    assert _check(decision, "parity").reason.startswith("ONNX parity failed (max_abs_diff 0.3")
    missing = metrics_doc(challenger=0.9)
    del missing["parity"]
    assert _check(evaluate(vib, missing), "parity").reason == \
        "metrics.json has no parity result: FAIL"


def test_too_few_training_records_rejects(vib):
    decision = evaluate(vib, metrics_doc(challenger=0.9, train=1499))
    assert not decision.approved
    assert _check(decision, "min_train_records").reason == \
        "trained on 1499 records < min_train_records 1500: FAIL"


def test_missing_or_non_finite_challenger_metric_rejects(vib):
    missing = evaluate(vib, metrics_doc(challenger=None))
    assert not missing.approved
    assert _check(missing, "metrics").reason == \
        "challenger silhouette is missing in metrics.json: FAIL"
    nan = evaluate(vib, metrics_doc(challenger=float("nan")))
    assert not nan.approved
    assert "not a finite number" in _check(nan, "metrics").reason


def test_metrics_of_another_family_reject(vib):
    decision = evaluate(vib, metrics_doc(family="classifier", challenger=0.99))
    assert not decision.approved
    assert "family 'classifier'" in _check(decision, "metrics").reason


def test_unscored_champion_rejects_when_a_model_is_in_production(vib):
    decision = evaluate(vib, metrics_doc(challenger=0.9), champion_in_production=True)
    assert not decision.approved
    assert "never compared" in _check(decision, "improvement").reason


def test_champion_the_fleet_no_longer_runs_rejects(vib):
    # Scored against v2 while v4 (approved during this training) was released meanwhile.
    decision = evaluate(vib, metrics_doc(challenger=0.9, champion=0.4),
                        champion_in_production=True, champion_version=2, released_version=4)
    assert not decision.approved
    assert _check(decision, "improvement").reason == (
        "champion scored was v2, but the fleet now runs v4: the challenger was never "
        "compared to it: FAIL")
    same = evaluate(vib, metrics_doc(challenger=0.9, champion=0.4),
                    champion_in_production=True, champion_version=4, released_version=4)
    assert same.approved


def test_every_failing_rule_is_reported_not_just_the_first(digits):
    decision = evaluate(digits, metrics_doc(family="cnn", metric="accuracy",
                                            challenger=0.5, champion=0.9, parity=False,
                                            train=10))
    failed = [c.rule for c in decision.checks if not c.passed]
    assert failed == ["threshold", "improvement", "parity", "min_train_records"]
    assert len(decision.reasons) == 5


def test_min_improvement_comes_from_the_config(vib):
    strict = dataclasses.replace(vib, min_improvement=0.05)
    assert not evaluate(strict, metrics_doc(challenger=0.54, champion=0.5)).approved
    assert evaluate(strict, metrics_doc(challenger=0.55, champion=0.5)).approved


def test_decision_serialises_for_the_registry(vib):
    doc = evaluate(vib, metrics_doc(challenger=0.41)).to_dict()
    assert doc["decision"] == "APPROVED" and doc["approved"] is True
    assert doc["metric"] == "silhouette" and doc["threshold"] == 0.30
    assert [c["rule"] for c in doc["checks"]] == [
        "metrics", "threshold", "improvement", "parity", "min_train_records", "detection"]


def test_float_rounding_does_not_fail_an_exact_improvement(vib):
    gate = dataclasses.replace(vib, min_improvement=0.2)
    assert 0.1 + 0.2 > 0.3  # the rounding the gate must absorb
    decision = evaluate(gate, metrics_doc(challenger=0.3, champion=0.1))
    assert decision.approved, decision.reasons


def _detection(challenger: float | None, champion: float | None, faults: int = 40
               ) -> dict:
    return {"labelled_faults": faults, "labelled_normal": 5, "faults_kept_out_of_training": faults,
            "challenger": {"fault_detection": challenger, "false_alarms": 0.0},
            "champion": None if champion is None else {"fault_detection": champion,
                                                       "false_alarms": 0.0}}


def test_a_better_silhouette_blind_to_confirmed_faults_is_rejected(vib):
    """The issue's v5: silhouette 0.838 vs 0.633, flagging 21 % of what v4 flagged at 100 %."""
    decision = evaluate(vib, metrics_doc(challenger=0.838, champion=0.633,
                                         detection=_detection(0.21, 1.0)))
    assert not decision.approved
    check = next(c for c in decision.checks if c.rule == "detection")
    assert check.reason == ("flags 21.0% of 40 confirmed faults < champion 100.0% - "
                            "detection_tolerance 5.0%: FAIL")


def test_detection_within_tolerance_passes(vib):
    assert evaluate(vib, metrics_doc(challenger=0.5, champion=0.4,
                                     detection=_detection(0.96, 1.0))).approved
    assert not evaluate(vib, metrics_doc(challenger=0.5, champion=0.4,
                                         detection=_detection(0.94, 1.0))).approved


def test_an_anomaly_model_without_a_detection_result_is_never_approved(vib):
    metrics = metrics_doc(challenger=0.9)
    metrics.pop("detection")
    decision = evaluate(vib, metrics)
    assert not decision.approved
    assert "no detection result" in decision.summary()


def test_classifiers_are_not_judged_on_detection(digits):
    decision = evaluate(digits, metrics_doc(family="classifier", metric="accuracy",
                                            challenger=0.95, train=2000))
    assert all(c.rule != "detection" for c in decision.checks)
