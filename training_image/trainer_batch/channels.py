"""SageMaker's training directory contract, built from S3 without SageMaker.

Layout under a base dir (SageMaker's is /opt/ml):

    input/config/hyperparameters.json   all values strings
    input/data/train/<relative key>     every object the ManifestFile lists
    input/data/champion/model.onnx      when a model is in production
    model/                              the trainer's artifacts -> model.tar.gz
    output/failure                      the trainer's short failure reason

`model.tar.gz` holds `model/`'s files at the archive root, as SageMaker's does.
Only the standard library and an injected boto3 S3 client are used, so the same
code runs in the Batch container and in the local backend (against moto).
"""

from __future__ import annotations

import json
import subprocess
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

TRAIN_CHANNEL = "train"
CHAMPION_CHANNEL = "champion"
FAILURE_LIMIT = 1024  # SageMaker's FailureReason is at most 1,024 characters


class ChannelError(Exception):
    """A channel could not be materialised (bad manifest, unsafe key, bad URI)."""


@dataclass(frozen=True)
class TrainerRun:
    exit_code: int | None  # None when it was killed for running too long
    timed_out: bool
    failure: str | None    # output/failure, or a reason we made up when it wrote none

    @property
    def succeeded(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


def parse_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise ChannelError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise ChannelError(f"no bucket in {uri!r}")
    return bucket, key


def _safe_relative(path: str) -> PurePosixPath:
    rel = PurePosixPath(path)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise ChannelError(f"unsafe or empty path in manifest: {path!r}")
    return rel


def read_train_manifest(s3: Any, manifest_uri: str) -> list[tuple[str, str, str]]:
    """(bucket, key, relative path) per entry of a SageMaker ManifestFile."""
    bucket, key = parse_s3_uri(manifest_uri)
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    try:
        entries = json.loads(body)
    except json.JSONDecodeError as exc:
        raise ChannelError(f"{manifest_uri}: not JSON: {exc}") from None
    if not isinstance(entries, list) or not entries or not isinstance(entries[0], dict) \
            or "prefix" not in entries[0]:
        raise ChannelError(f"{manifest_uri}: expected [{{\"prefix\": \"s3://...\"}}, key, ...]")
    prefix_bucket, prefix = parse_s3_uri(str(entries[0]["prefix"]))
    out = []
    for entry in entries[1:]:
        if not isinstance(entry, str):
            raise ChannelError(f"{manifest_uri}: entries after the prefix must be strings")
        rel = _safe_relative(entry)
        out.append((prefix_bucket, prefix + entry, str(rel)))
    return out


def download_train_channel(s3: Any, manifest_uri: str, base_dir: Path) -> int:
    """Download every listed object to input/data/train/<relative key>; returns the count."""
    channel = base_dir / "input" / "data" / TRAIN_CHANNEL
    channel.mkdir(parents=True, exist_ok=True)
    entries = read_train_manifest(s3, manifest_uri)
    for bucket, key, rel in entries:
        dest = channel / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, key, str(dest))
    return len(entries)


def download_champion(s3: Any, champion_uri: str | None, base_dir: Path) -> bool:
    """Download the production model to input/data/champion/model.onnx (if there is one)."""
    if not champion_uri:
        return False
    bucket, key = parse_s3_uri(champion_uri)
    channel = base_dir / "input" / "data" / CHAMPION_CHANNEL
    channel.mkdir(parents=True, exist_ok=True)
    s3.download_file(bucket, key, str(channel / "model.onnx"))
    return True


def write_hyperparameters(base_dir: Path, hyperparameters: Mapping[str, Any]) -> Path:
    config = base_dir / "input" / "config"
    config.mkdir(parents=True, exist_ok=True)
    path = config / "hyperparameters.json"
    path.write_text(json.dumps({k: str(v) for k, v in hyperparameters.items()}, indent=2),
                    encoding="utf-8")
    return path


def prepare_base_dir(s3: Any, base_dir: Path, *, manifest_uri: str, champion_uri: str | None,
                     hyperparameters: Mapping[str, Any]) -> int:
    """Lay out the whole input side of the contract; returns the train object count."""
    for sub in ("model", "output"):
        (base_dir / sub).mkdir(parents=True, exist_ok=True)
    write_hyperparameters(base_dir, hyperparameters)
    count = download_train_channel(s3, manifest_uri, base_dir)
    download_champion(s3, champion_uri, base_dir)
    return count


def run_trainer(base_dir: Path, *, python: str, module: str = "trainer.entrypoint",
                env: Mapping[str, str] | None = None, timeout: float | None = None,
                log_path: Path | None = None) -> TrainerRun:
    """Run `python -m <module> --base-dir <base_dir>` and wait at most `timeout` seconds."""
    log_path = log_path or base_dir / "trainer.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [python, "-m", module, "--base-dir", str(base_dir)],
            stdout=log, stderr=subprocess.STDOUT, env=dict(env) if env is not None else None,
        )
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
            return TrainerRun(None, True, f"MaxRuntimeExceeded: the trainer ran longer than "
                                          f"{timeout:.0f} s and was stopped")
    failure = read_failure(base_dir)
    if code != 0 and not failure:
        failure = f"trainer exited with code {code} and wrote no output/failure; " \
                  f"log tail: {_tail(log_path)}"
    if code == 0 and not (base_dir / "model" / "model.onnx").is_file():
        return TrainerRun(code, False, failure or "trainer exited 0 but wrote no model/model.onnx")
    return TrainerRun(code, False, failure if code != 0 else None)


def read_failure(base_dir: Path) -> str | None:
    path = base_dir / "output" / "failure"
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8", errors="replace").strip()
    return text[:FAILURE_LIMIT] or None


def _tail(path: Path, limit: int = 400) -> str:
    try:
        data = path.read_bytes()[-limit:]
    except OSError:
        return ""
    return data.decode("utf-8", errors="replace").strip().replace("\n", " | ")


def package_model(base_dir: Path, dest: Path | None = None) -> Path:
    """tar.gz of model/'s files at the archive root (SageMaker's model.tar.gz)."""
    model_dir = base_dir / "model"
    dest = dest or base_dir / "output" / "model.tar.gz"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest, "w:gz") as tar:
        for path in sorted(model_dir.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=path.relative_to(model_dir).as_posix())
    return dest


def upload_file(s3: Any, path: Path, uri: str) -> None:
    bucket, key = parse_s3_uri(uri)
    s3.upload_file(str(path), bucket, key)
