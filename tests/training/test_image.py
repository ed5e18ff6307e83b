"""The training image's build files: locked, non-root by default, the SageMaker entrypoint."""

from __future__ import annotations

import re
import tomllib

from tests.conftest import REPO

IMAGE = REPO / "training_image"


def test_dockerfile_pins_the_base_and_keeps_the_sagemaker_contract():
    text = (IMAGE / "Dockerfile").read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert base and re.fullmatch(r"python:3\.11\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base[1])
    assert 'CMD ["train"]' in text and not re.search(r"^ENTRYPOINT", text, re.M)  # Batch: own command
    assert "COPY trainer_batch ./trainer_batch" in text
    assert "COPY --from=contract mledge_update /opt/contract/mledge_update" in text  # families
    assert "MLEDGE_TRAINING_BASE_DIR=/opt/ml" in text
    # Installs the image's share of the workspace lock (tests/infra/test_lock.py checks the file).
    assert "pip install --no-cache-dir --require-hashes --no-deps -r requirements.txt" in text
    stages = re.findall(r"^FROM \S+ AS (\w+)$", text, re.M)
    assert stages == ["base", "sagemaker", "runtime"]
    # The default (last) stage runs unprivileged.
    assert text.rstrip().splitlines()[-1] == "USER trainer:trainer"


def test_console_script_is_the_entrypoint():
    project = tomllib.loads((IMAGE / "pyproject.toml").read_text())
    assert project["project"]["scripts"] == {"train": "trainer.entrypoint:main"}
