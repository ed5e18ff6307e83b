"""`mledge provision-device`: register one device with AWS IoT and write its agent bundle.

Creates (or reuses) the thing, creates a certificate and key pair, attaches the
stage's device policy to the certificate and the certificate to the thing, adds
the thing to its model's thing group (from chalicelib/pipeline.toml; the group is
created when the model has none yet), and writes the bundle the agent reads:
cert.pem, private.key, release-keys.pem (the public key of the stage's release
signing key: the agent refuses releases it did not sign), agent.json (endpoint
from `describe_endpoint(endpointType='iot:Data-ATS')`, port 8883) and a note on
the Amazon root CA. Running it again for the same thing and --out reuses the
certificate already there if AWS IoT still has it active.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mledge_update.naming import AGENT_CONFIG_FILE, SIMULATED_SENSOR

from chalicelib.aws import error_code
from chalicelib.config import ConfigError, UnknownModelError, load_pipeline_config
from chalicelib.ota import OtaError, ensure_thing_group
from chalicelib.settings import DEFAULT_PIPELINE_CONFIG
from chalicelib.signing import SigningError, release_public_key_pem
from mledge_ops.common import (
    OpsError,
    aws_options,
    clients_from_args,
    device_policy_name,
    signing_key_alias,
)
from mledge_ops.stage import stage_environment, stage_options

THING_NAME = re.compile(r"^[a-zA-Z0-9:_-]{1,128}$")
MQTT_TLS_PORT = 8883
ROOT_CA_URL = "https://www.amazontrust.com/repository/AmazonRootCA1.pem"
CERT_FILE, KEY_FILE, CA_FILE = "cert.pem", "private.key", "AmazonRootCA1.pem"
RELEASE_KEYS_FILE = "release-keys.pem"
RECORD_FILE = "provision.json"
CA_NOTE_FILE = "AmazonRootCA1.README.txt"


class ProvisionError(Exception):
    """The device cannot be provisioned; the message says why and what to do."""


@dataclass(frozen=True)
class ProvisionedDevice:
    thing: str
    thing_arn: str
    model: str
    thing_group: str
    certificate_id: str
    certificate_arn: str
    endpoint: str
    out_dir: Path
    reused_certificate: bool


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "provision-device",
        parents=[aws_options(), stage_options()],
        help="create a thing + certificate for a device and write its agent bundle",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--thing", required=True, help="thing name (also the MQTT client id)")
    parser.add_argument("--model", required=True, help="model the device runs (pipeline.toml)")
    parser.add_argument("--out", required=True, type=Path, help="directory for the bundle")
    parser.add_argument(
        "--policy", help="IoT policy to attach (default: mledge-<stage>-device from infra/)"
    )
    parser.add_argument(
        "--pipeline-config", type=Path, default=DEFAULT_PIPELINE_CONFIG,
        help="pipeline config naming each model's thing group",
    )
    parser.add_argument(
        "--device-dir",
        help="where the bundle will live on the device; agent.json's paths use it "
        "(default: the absolute --out directory)",
    )
    parser.add_argument("--ca-file", type=Path, help="copy this root CA into the bundle")
    parser.add_argument(
        "--signing-key",
        help="KMS key (alias or ARN) that signs the stage's releases; its public key goes "
        "into the bundle (default: the stage's MLEDGE_SIGNING_KEY_ID, else "
        "alias/mledge-<stage>-release-signing)",
    )
    parser.add_argument(
        "--force", action="store_true",
        help="overwrite a bundle in --out that belongs to another thing",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    clients = clients_from_args(args)
    try:
        device = provision_device(
            clients.iot,
            kms=clients.kms,
            signing_key=args.signing_key or _stage_signing_key(args),
            thing=args.thing,
            model=args.model,
            out_dir=args.out,
            stage=args.stage,
            policy=args.policy or device_policy_name(args.stage),
            pipeline_config=args.pipeline_config,
            device_dir=args.device_dir,
            ca_file=args.ca_file,
            force=args.force,
        )
    except ProvisionError as exc:
        raise OpsError(str(exc)) from None
    how = "reused" if device.reused_certificate else "created"
    print(f"thing {device.thing} ({device.model}) in group {device.thing_group}")
    print(f"certificate {device.certificate_id} ({how}), endpoint {device.endpoint}:{MQTT_TLS_PORT}")
    print(f"bundle written to {device.out_dir}; run: mledge-agent --config "
          f"{device.out_dir / AGENT_CONFIG_FILE}")
    if not (device.out_dir / CA_FILE).exists():
        print(f"note: put the Amazon root CA in {device.out_dir / CA_FILE} ({ROOT_CA_URL})")
    return 0


def _stage_signing_key(args: argparse.Namespace) -> str:
    """The stage's MLEDGE_SIGNING_KEY_ID when its settings are readable, else the alias
    infra/pipeline.yaml makes."""
    try:
        configured = stage_environment(args).get("MLEDGE_SIGNING_KEY_ID", "")
    except OpsError:
        configured = ""
    return configured or signing_key_alias(args.stage)


def provision_device(
    iot: Any,
    *,
    kms: Any,
    signing_key: str,
    thing: str,
    model: str,
    out_dir: Path,
    stage: str = "dev",
    policy: str | None = None,
    pipeline_config: Path = DEFAULT_PIPELINE_CONFIG,
    device_dir: str | None = None,
    ca_file: Path | None = None,
    force: bool = False,
) -> ProvisionedDevice:
    if not THING_NAME.match(thing):
        raise ProvisionError(
            f"thing name {thing!r} is invalid: 1-128 of letters, digits, ':', '_' and '-'"
        )
    policy = policy or device_policy_name(stage)
    group = _thing_group_of(model, pipeline_config)
    out_dir = out_dir.resolve()
    previous = _read_previous_record(out_dir, thing, force=force)
    _require(iot.get_policy, "IoT policy", policy, policyName=policy)
    try:
        release_keys = release_public_key_pem(kms, signing_key)
    except SigningError as exc:
        raise ProvisionError(f"{exc}: deploy infra/pipeline.yaml for the stage first "
                             "(it creates the release signing key), or pass --signing-key") from None
    try:
        ensure_thing_group(iot, group, model=model, stage=stage)
    except OtaError as exc:
        raise ProvisionError(str(exc)) from None

    thing_arn = _ensure_thing(iot, thing, model, stage)
    reused = _reusable_certificate(iot, previous, out_dir)
    if reused:
        cert_id, cert_arn = reused
    else:
        created = iot.create_keys_and_certificate(setAsActive=True)
        cert_id, cert_arn = created["certificateId"], created["certificateArn"]
        out_dir.mkdir(parents=True, exist_ok=True)
        # Write the key first, private from the start: it exists nowhere else.
        _write(out_dir / KEY_FILE, created["keyPair"]["PrivateKey"], mode=0o600)
        _write(out_dir / CERT_FILE, created["certificatePem"], mode=0o644)
    # Attach calls are idempotent in AWS IoT: repeating them is safe.
    iot.attach_policy(policyName=policy, target=cert_arn)
    iot.attach_thing_principal(thingName=thing, principal=cert_arn)
    iot.add_thing_to_thing_group(thingGroupName=group, thingName=thing)
    endpoint = iot.describe_endpoint(endpointType="iot:Data-ATS")["endpointAddress"]

    out_dir.mkdir(parents=True, exist_ok=True)
    _write(out_dir / RELEASE_KEYS_FILE, release_keys.decode("ascii"), mode=0o644)
    if ca_file is not None:
        shutil.copyfile(ca_file, out_dir / CA_FILE)
    base = Path(device_dir) if device_dir else out_dir
    agent = {
        "thing": thing,
        "model": model,
        "endpoint": endpoint,
        "port": MQTT_TLS_PORT,
        "cert": str(base / CERT_FILE),
        "key": str(base / KEY_FILE),
        "ca": str(base / CA_FILE),
        "state_dir": str(base / "state"),
        "sensor": SIMULATED_SENSOR.get(model, "none"),
        "release_keys": str(base / RELEASE_KEYS_FILE),
    }
    _write(out_dir / AGENT_CONFIG_FILE, json.dumps(agent, indent=2) + "\n", mode=0o644)
    _write(out_dir / CA_NOTE_FILE, _ca_note(), mode=0o644)
    record = {
        "thing": thing,
        "thing_arn": thing_arn,
        "model": model,
        "stage": stage,
        "thing_group": group,
        "policy": policy,
        "certificate_id": cert_id,
        "certificate_arn": cert_arn,
        "endpoint": endpoint,
        "signing_key": signing_key,
        "provisioned_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    _write(out_dir / RECORD_FILE, json.dumps(record, indent=2) + "\n", mode=0o644)
    return ProvisionedDevice(
        thing=thing, thing_arn=thing_arn, model=model, thing_group=group,
        certificate_id=cert_id, certificate_arn=cert_arn, endpoint=endpoint,
        out_dir=out_dir, reused_certificate=bool(reused),
    )


def _thing_group_of(model: str, pipeline_config: Path) -> str:
    try:
        return load_pipeline_config(pipeline_config).model(model).thing_group
    except UnknownModelError as exc:
        raise ProvisionError(str(exc)) from None
    except ConfigError as exc:
        raise ProvisionError(f"cannot read the pipeline config: {exc}") from None


def _require(call: Any, what: str, name: str, **kwargs: str) -> None:
    try:
        call(**kwargs)
    except Exception as exc:
        if error_code(exc) == "ResourceNotFoundException":
            raise ProvisionError(
                f"{what} {name!r} does not exist: deploy infra/pipeline.yaml for the stage "
                "first (docs/deploy.md)"
            ) from None
        raise


def _ensure_thing(iot: Any, thing: str, model: str, stage: str) -> str:
    try:
        described = iot.describe_thing(thingName=thing)
    except Exception as exc:
        if error_code(exc) != "ResourceNotFoundException":
            raise
    else:
        attributes = described.get("attributes", {})
        if attributes.get("model", model) != model:
            raise ProvisionError(
                f"thing {thing!r} already exists for model {attributes['model']!r}, not {model!r}"
            )
        if attributes.get("model") != model or attributes.get("stage") != stage:
            iot.update_thing(
                thingName=thing,
                attributePayload={"attributes": {"model": model, "stage": stage}, "merge": True},
            )
        return str(described["thingArn"])
    created = iot.create_thing(
        thingName=thing, attributePayload={"attributes": {"model": model, "stage": stage}}
    )
    return str(created["thingArn"])


def _read_previous_record(out_dir: Path, thing: str, *, force: bool) -> dict[str, Any] | None:
    path = out_dir / RECORD_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        record = {}
    if record.get("thing") != thing:
        if force:
            return None
        raise ProvisionError(
            f"{out_dir} holds the bundle of thing {record.get('thing')!r}; choose another --out "
            "or pass --force to overwrite it"
        )
    return dict(record)


def _reusable_certificate(
    iot: Any, previous: dict[str, Any] | None, out_dir: Path
) -> tuple[str, str] | None:
    """The certificate of a previous run, if its key is still here and IoT has it active."""
    if not previous or not (out_dir / KEY_FILE).exists() or not (out_dir / CERT_FILE).exists():
        return None
    cert_id = str(previous.get("certificate_id", ""))
    if not cert_id:
        return None
    try:
        description = iot.describe_certificate(certificateId=cert_id)["certificateDescription"]
    except Exception as exc:
        if error_code(exc) == "ResourceNotFoundException":
            return None
        raise
    if description.get("status") != "ACTIVE":
        return None
    return cert_id, str(description["certificateArn"])


def _ca_note() -> str:
    return (
        "The device verifies AWS IoT's server certificate against Amazon Root CA 1.\n"
        f"Download it next to agent.json as {CA_FILE} (it is public, not a secret):\n\n"
        f"    curl -fsSo {CA_FILE} {ROOT_CA_URL}\n\n"
        "or pass --ca-file to `mledge provision-device` to copy a local copy in.\n"
    )


def _write(path: Path, text: str, *, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
