"""The training image's build files: locked, non-root by default, the SageMaker entrypoint."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO

IMAGE = REPO / "training_image"
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([0-9][0-9A-Za-z.\-+]*)$")


def pins(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = PIN.match(line)
        assert match, f"{path.name}: {raw!r} is not pinned with =="
        out[match.group(1)] = match.group(2)
    return out


@pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                    reason="PyTorch (the cnn extra) is not installed")
def test_cnn_pins_are_what_the_tests_run():
    for name, version in pins(IMAGE / "requirements-cnn.txt").items():
        # The image adds the local variant itself (torch 2.13.0+cpu / +cu128).
        assert importlib.metadata.version(name).split("+")[0] == version, name


def test_cnn_extra_and_its_pins_name_the_same_packages():
    project = tomllib.loads((IMAGE / "pyproject.toml").read_text())
    extra = {re.split(r"[<>=]", r)[0] for r in project["project"]["optional-dependencies"]["cnn"]}
    assert extra == {"torch", "onnxscript"}
    assert extra <= set(pins(IMAGE / "requirements-cnn.txt"))


def test_dockerfile_builds_cpu_by_default_and_cuda_on_request():
    text = (IMAGE / "Dockerfile").read_text()
    assert re.search(r"^ARG TORCH_VARIANT=cpu$", text, re.M)
    # torch by exact local version from PyTorch's index: never PyPI's CUDA-bundling wheel
    assert '"${torch_pin}+${TORCH_VARIANT}"' in text
    assert '--extra-index-url "$TORCH_INDEX_URL/$TORCH_VARIANT"' in text
    assert 'if [ "$TORCH_VARIANT" != "none" ]' in text
    assert "COPY requirements.txt requirements-cnn.txt ./" in text
    assert "--constraint requirements-cnn.txt" in text


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
