"""What every part's tests share: the stage environment (set before any test imports
app.py), the repository root, and the environment of a child Python process."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

# Property tests (tests/*/test_fuzz_*.py) run a moderate number of examples so the suite
# stays fast; `HYPOTHESIS_PROFILE=fuzz` runs many more when hunting for new failures.
# deadline=None: timing varies on a shared machine and is not what these tests check.
hypothesis_settings.register_profile(
    "default", max_examples=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
hypothesis_settings.register_profile(
    "fuzz", max_examples=2000, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

REPO = Path(__file__).resolve().parents[1]
PART_PATHS = [REPO, REPO / "update_format", REPO / "edge", REPO / "training_image", REPO / "devstack"]

# Stage variables that app.py reads at import time (queue names in decorators)
# must exist before any test imports app.
TEST_ENV = {
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "MLEDGE_STAGE": "test",
    "MLEDGE_BUCKET": "mledge-test-data",
    "MLEDGE_REGISTRY_TABLE": "mledge-test-registry",
    "MLEDGE_STATE_TABLE": "mledge-test-state",
    "MLEDGE_TELEMETRY_QUEUE": "mledge-test-telemetry",
    "MLEDGE_RAW_EVENTS_QUEUE": "mledge-test-raw-events",
    "MLEDGE_TRAINING_ROLE_ARN": "arn:aws:iam::123456789012:role/mledge-test-training",
    "MLEDGE_TRAINING_IMAGE_URI": "123456789012.dkr.ecr.us-east-1.amazonaws.com/mledge-training:test",
    "MLEDGE_BATCH_JOB_QUEUE": "mledge-test-gpu",
    "MLEDGE_BATCH_JOB_DEFINITION": "mledge-test-training",
    "MLEDGE_IOT_PRESIGN_ROLE_ARN": "arn:aws:iam::123456789012:role/mledge-test-presign",
    "MLEDGE_SIGNING_KEY_ID": "alias/mledge-test-release-signing",
    "POWERTOOLS_METRICS_NAMESPACE": "MLEdgeDeployTest",
    "POWERTOOLS_SERVICE_NAME": "mledgedeploy",
    "POWERTOOLS_DEV": "false",
}
os.environ.update(TEST_ENV)
os.environ.pop("AWS_ENDPOINT_URL", None)


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a child Python process that imports this checkout's parts."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in PART_PATHS)
    env.update(extra)
    return env
