"""Refreshes the workspace lock: `make lock`.

One resolution for the whole workspace (the five packages' declared dependencies plus the
development tools) is written to `requirements-dev.txt`; every other install target is
compiled against it as constraints, so a package has the same version on every path:

    requirements-dev.txt              development and CI (`make env`)
    requirements.txt                  the Lambda bundle (what `chalice package` bundles)
    training_image/requirements.txt   the training image (its Dockerfile)
    edge/requirements.txt             the device agent (docs/deploy.md)
    requirements/bootstrap.txt        uv itself, installed with pip before anything else

Each file pins every distribution, transitive ones included, with the SHA-256 of every
file PyPI holds for that version, so `--require-hashes` installs refuse anything else.
The declared dependencies live in each package's pyproject.toml; this script never
invents versions: uv resolves them, preferring the versions already locked (an
unchanged declaration gives an unchanged lock). `--upgrade` moves everything to the
newest versions the declarations allow; `--upgrade-package NAME` moves one.

The lock targets CPython 3.11 on x86_64 Linux (Lambda's and the image's runtime, and CI);
the hashes cover every wheel of each pinned version, so aarch64 devices install the same
pins.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The workspace: distribution name -> folder holding its pyproject.toml. These are
# installed from source (editable in development), never from an index.
WORKSPACE: dict[str, str] = {
    "mledgedeploy": ".",
    "mledge-update": "update_format",
    "mledge-edge": "edge",
    "mledge-trainer": "training_image",
    "mledge-devstack": "devstack",
}

# Development and CI run the trainer's `cnn` extra (PyTorch) on the CPU: the lock pins
# PyTorch's CPU build (a local version, `+cpu`), which PyPI does not carry. It comes from
# this machine kind's wheel folder when there is one, else from PyTorch's CPU index; the
# Makefile installs from the same source. The training image picks its own build
# (CPU or CUDA) per variant: training_image/Dockerfile.
CPU_TORCH = "requirements/cpu-torch.txt"
TORCH_WHEELS = Path("/opt/wheels")


def torch_source() -> list[str]:
    if any(TORCH_WHEELS.glob("torch-*.whl")):
        return ["--find-links", str(TORCH_WHEELS)]
    return ["--extra-index-url", "https://download.pytorch.org/whl/cpu",
            "--index-strategy", "unsafe-best-match"]


DEV_LOCK = "requirements-dev.txt"
BOOTSTRAP = "requirements/bootstrap.txt"
PYTHON_VERSION = "3.11"
PYTHON_PLATFORM = "x86_64-unknown-linux-gnu"


@dataclass(frozen=True)
class Target:
    """An install path that gets its own locked requirements file."""

    name: str  # its generated input: requirements/NAME.in
    output: str
    packages: tuple[str, ...]  # workspace packages whose dependencies it installs
    exclude: frozenset[str] = frozenset()  # provided by the platform, not installed
    extra: tuple[str, ...] = ()  # build-time needs of installing the packages themselves
    purpose: str = ""


TARGETS: tuple[Target, ...] = (
    Target(
        "lambda",
        "requirements.txt",
        ("mledgedeploy", "mledge-update"),
        # boto3/botocore are in every Python Lambda runtime; chalice packages its own
        # runtime module into the bundle.
        exclude=frozenset({"boto3", "botocore", "chalice"}),
        purpose="the Lambda bundle: what `chalice package` installs next to app.py",
    ),
    Target(
        "training-image",
        "training_image/requirements.txt",
        ("mledge-trainer",),
        extra=("setuptools",),  # the image installs the trainer package without isolation
        purpose="the training image (training_image/Dockerfile)",
    ),
    Target(
        "edge",
        "edge/requirements.txt",
        ("mledge-edge", "mledge-update"),
        purpose="the device agent (docs/deploy.md)",
    ),
)

NAME = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(package: str) -> list[str]:
    """The runtime dependencies a workspace package declares, workspace siblings dropped."""
    pyproject = ROOT / WORKSPACE[package] / "pyproject.toml"
    deps = tomllib.loads(pyproject.read_text())["project"].get("dependencies", [])
    out = []
    for dep in deps:
        match = NAME.match(dep)
        if not match:
            raise SystemExit(f"{pyproject}: cannot read dependency {dep!r}")
        if canonical(match.group(1)) not in WORKSPACE:
            out.append(dep)
    return out


def pins(path: Path) -> dict[str, str]:
    """name -> version of every `name==version` line of a compiled requirements file."""
    out = {}
    for line in path.read_text().splitlines():
        match = PIN.match(line)
        if match:
            out[canonical(match.group(1))] = match.group(2)
    return out


def uv(*args: str) -> None:
    command = [sys.executable, "-m", "uv", "pip", "compile", "--quiet", "--generate-hashes",
               "--python-version", PYTHON_VERSION, "--python-platform", PYTHON_PLATFORM,
               "--custom-compile-command", "make lock", *args]
    subprocess.run(command, cwd=ROOT, check=True)


def lock_workspace(upgrade: list[str]) -> None:
    no_emit = [arg for name in WORKSPACE for arg in ("--no-emit-package", name)]
    lines = [f"-e ./{folder}".rstrip("/.") if folder != "." else "-e ." for folder in WORKSPACE.values()]
    lines = [line + "[cnn]" if line == "-e ./training_image" else line for line in lines]
    source = write_input("workspace", lines)
    uv(source, "--group", "pyproject.toml:dev", "-c", CPU_TORCH, *torch_source(), *no_emit, *upgrade,
       "-o", DEV_LOCK)


def write_input(name: str, lines: list[str]) -> str:
    """Writes requirements/NAME.in (generated; its path shows in the lock's annotations)."""
    path = ROOT / "requirements" / f"{name}.in"
    path.parent.mkdir(exist_ok=True)
    path.write_text("# Generated by `make lock` from the pyproject files; do not edit.\n"
                    + "".join(f"{line}\n" for line in lines))
    return str(path.relative_to(ROOT))


def lock_target(target: Target) -> None:
    requirements = [dep for package in target.packages for dep in declared(package)]
    requirements = [dep for dep in requirements
                    if canonical(NAME.match(dep).group(1)) not in target.exclude]  # type: ignore[union-attr]
    requirements += target.extra
    source = write_input(target.name, sorted(set(requirements)))
    uv(source, "-c", DEV_LOCK, "-o", target.output)
    header = f"# Locked requirements for {target.purpose}.\n"
    path = ROOT / target.output
    path.write_text(header + path.read_text())


def check_consistent() -> None:
    """Every target pins exactly the development lock's versions."""
    workspace = pins(ROOT / DEV_LOCK)
    for target in TARGETS:
        for name, version in pins(ROOT / target.output).items():
            if workspace.get(name) != version:
                raise SystemExit(f"{target.output}: {name}=={version} but {DEV_LOCK} has "
                                 f"{workspace.get(name)}")


def write_bootstrap() -> None:
    """uv's own pinned, hashed entry, copied from the development lock."""
    lines = (ROOT / DEV_LOCK).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("uv=="))
    block = [lines[start]]
    for line in lines[start + 1:]:
        if not line.startswith("    --hash"):
            break
        block.append(line)
    block[-1] = block[-1].rstrip(" \\")
    out = ROOT / BOOTSTRAP
    out.parent.mkdir(exist_ok=True)
    out.write_text("# uv, the installer `make env` uses; generated by `make lock` from "
                   f"{DEV_LOCK}.\n" + "\n".join(block) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upgrade", action="store_true",
                        help="move every package to the newest version the declarations allow")
    parser.add_argument("--upgrade-package", action="append", default=[], metavar="NAME",
                        help="move one package (repeatable)")
    args = parser.parse_args(argv)
    upgrade = (["--upgrade"] if args.upgrade else []) + [
        arg for name in args.upgrade_package for arg in ("--upgrade-package", name)]
    lock_workspace(upgrade)
    for target in TARGETS:
        lock_target(target)
    check_consistent()
    write_bootstrap()
    print(f"locked: {DEV_LOCK}, {', '.join(t.output for t in TARGETS)}, {BOOTSTRAP}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
