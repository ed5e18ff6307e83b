"""The workspace lock: what every install path installs, and what the tests run with.

`make lock` (scripts/lock.py) writes one resolution for the whole workspace to
requirements-dev.txt and compiles each install target against it. These tests fail when
the environment running them differs from the lock in any distribution, when a target
disagrees with the workspace lock, when a pyproject's declarations changed without
`make lock`, or when an install path stops installing from its lock.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest
from packaging.requirements import Requirement

from tests.conftest import REPO

HASH_LINE = re.compile(r"^\s+--hash=sha256:[0-9a-f]{64}( \\)?$")


def _lock_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mledge_lock", REPO / "scripts" / "lock.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


lock = _lock_module()
TARGET_FILES = [target.output for target in lock.TARGETS]
ALL_LOCKS = [lock.DEV_LOCK, *TARGET_FILES, lock.BOOTSTRAP]


def entries(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) of a compiled requirements file; rejects anything unpinned."""
    out: dict[str, tuple[str, list[str]]] = {}
    current: str | None = None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if HASH_LINE.match(line):
            assert current, f"{path.name}:{number}: a hash before any requirement"
            out[current][1].append(line.split("sha256:")[1].split()[0])
            continue
        match = lock.PIN.match(line)
        assert match, f"{path.name}:{number}: {line!r} is not a `name==version` pin"
        current = lock.canonical(match.group(1))
        assert current not in out, f"{path.name}: {current} pinned twice"
        out[current] = (match.group(2), [])
    return out


@pytest.mark.parametrize("name", ALL_LOCKS)
def test_every_lock_pins_every_distribution_with_hashes(name: str) -> None:
    pinned = entries(REPO / name)
    assert pinned, f"{name} pins nothing"
    for dist, (_, hashes) in pinned.items():
        assert hashes, f"{name}: {dist} has no --hash (pip --require-hashes would refuse it)"


def test_installed_distributions_are_exactly_the_lock() -> None:
    """The environment running the tests holds the locked versions and nothing else
    (the five workspace packages aside, which are installed from this checkout)."""
    locked = {name: version for name, (version, _) in entries(REPO / lock.DEV_LOCK).items()}
    installed = {lock.canonical(d.metadata["Name"]): d.version
                 for d in importlib.metadata.distributions()}
    workspace = set(lock.WORKSPACE)
    missing = sorted(set(locked) - set(installed))
    extra = sorted(set(installed) - set(locked) - workspace)
    differ = sorted(f"{name}: installed {installed[name]}, locked {locked[name]}"
                    for name in set(locked) & set(installed) if installed[name] != locked[name])
    assert not missing, f"locked but not installed (run `make env`): {missing}"
    assert not extra, f"installed but not in the lock: {extra}"
    assert not differ, "installed versions differ from the lock (run `make env`): " + "; ".join(differ)
    assert workspace <= set(installed), f"workspace packages not installed: {workspace - set(installed)}"


@pytest.mark.parametrize("name", [*TARGET_FILES, lock.BOOTSTRAP])
def test_targets_pin_the_workspace_versions_and_hashes(name: str) -> None:
    workspace = entries(REPO / lock.DEV_LOCK)
    for dist, (version, hashes) in entries(REPO / name).items():
        assert dist in workspace, f"{name}: {dist} is not in {lock.DEV_LOCK}"
        assert version == workspace[dist][0], f"{name}: {dist}=={version}, workspace {workspace[dist][0]}"
        assert sorted(hashes) == sorted(workspace[dist][1]), f"{name}: {dist} hashes differ"


@pytest.mark.parametrize("target", lock.TARGETS, ids=lambda t: t.name)
def test_lock_inputs_match_the_pyproject_declarations(target) -> None:
    """A pyproject dependency edited without `make lock` fails here, not on a device."""
    expected = {dep for package in target.packages for dep in lock.declared(package)
                if lock.canonical(Requirement(dep).name) not in target.exclude} | set(target.extra)
    source = REPO / "requirements" / f"{target.name}.in"
    written = {line for line in source.read_text().splitlines() if line and not line.startswith("#")}
    assert written == expected, f"{source.name} is stale: run `make lock`"


def test_every_declared_dependency_is_satisfied_by_its_locked_version() -> None:
    locked = {name: version for name, (version, _) in entries(REPO / lock.DEV_LOCK).items()}
    groups = tomllib.loads((REPO / "pyproject.toml").read_text())["dependency-groups"]
    for package in lock.WORKSPACE:
        for dep in [*lock.declared(package), *(groups["dev"] if package == "mledgedeploy" else [])]:
            requirement = Requirement(dep)
            name = lock.canonical(requirement.name)
            assert name in locked, f"{package} declares {dep} but the lock has no {name}: run `make lock`"
            assert requirement.specifier.contains(locked[name], prereleases=True), (
                f"{package} declares {dep}; the lock has {locked[name]}: run `make lock`")


def test_every_workspace_package_declares_its_imports_and_licence() -> None:
    """`pip install` of a package alone gets what it imports: the cross-package imports
    are declared (a missing one showed as ModuleNotFoundError on `mledge --help`)."""
    imports = {"mledgedeploy": {"boto3", "chalice", "aws-lambda-powertools", "mledge-update"},
               "mledge-update": {"bsdiff4", "zstandard"},
               "mledge-edge": {"awsiotsdk", "onnxruntime", "numpy", "mledge-update"},
               "mledge-trainer": {"numpy", "scikit-learn", "skl2onnx", "onnx", "onnxruntime", "boto3"}}
    for package, folder in lock.WORKSPACE.items():
        project = tomllib.loads((REPO / folder / "pyproject.toml").read_text())["project"]
        assert project.get("license") == "Apache-2.0", package
        declared = {lock.canonical(Requirement(d).name) for d in project.get("dependencies", [])}
        missing = {lock.canonical(n) for n in imports.get(package, set())} - declared
        assert not missing, f"{package} imports but does not declare {missing}"
    assert (REPO / "LICENSE").read_text().lstrip().startswith("Apache License")


def _commands(path: Path) -> str:
    """A Makefile's or Dockerfile's text with continuation lines joined, spaces collapsed."""
    return " ".join(path.read_text().replace("\\\n", " ").split())


def test_install_paths_install_from_the_lock() -> None:
    makefile = _commands(REPO / "Makefile")
    assert "--require-hashes -r requirements/bootstrap.txt" in makefile
    assert "pip sync -q --python $(PY) --require-hashes $(TORCH_SOURCE) requirements-dev.txt" in makefile
    assert "--no-deps --no-build-isolation $(WORKSPACE)" in makefile
    dockerfile = _commands(REPO / "training_image" / "Dockerfile")
    assert "pip install --no-cache-dir --require-hashes --no-deps -r requirements.txt" in dockerfile
    assert "--no-deps --no-build-isolation /opt/contract ." in dockerfile
    deploy = (REPO / "docs" / "deploy.md").read_text()
    assert "--require-hashes --no-deps -r edge/requirements.txt" in deploy
    assert (REPO / ".ci" / "run").read_text().rstrip().endswith("make test")


def test_cnn_image_pins_the_workspace_versions() -> None:
    """training_image/requirements-cnn.txt (PyTorch per image variant, constraints only)
    names the versions the tests run; torch's local build tag (+cpu, +cu128) aside."""
    locked = {name: version for name, (version, _) in entries(REPO / lock.DEV_LOCK).items()}
    for line in (REPO / "training_image" / "requirements-cnn.txt").read_text().splitlines():
        match = lock.PIN.match(line)
        if match:
            name = lock.canonical(match.group(1))
            assert locked.get(name, "").split("+")[0] == match.group(2), f"{name}=={match.group(2)}"
