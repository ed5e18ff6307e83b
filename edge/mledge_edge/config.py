"""Agent configuration: a JSON file and/or command-line flags (flags win)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from mledge_update.document import MODEL_NAME
from mledge_update.iot_jobs import THING_NAME


class ConfigError(ValueError):
    """The configuration is incomplete or inconsistent."""


@dataclass
class AgentConfig:
    thing: str = ""
    model: str = ""
    endpoint: str = "localhost"
    port: int = 8883
    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    insecure_no_tls: bool = False  # plain TCP: local brokers only
    state_dir: str = "./mledge-state"
    sensor: str = "vibration"  # vibration | digits | none
    rate: float = 1.0  # readings per second (0: no telemetry, jobs only)
    fault_rate: float = 0.02
    seed: int | None = None  # default: derived from the thing name
    duration: float | None = None  # seconds to run; None: until SIGINT/SIGTERM
    stats_interval: float = 2.0
    session_threads: int = 1
    request_timeout: float = 10.0
    download_retries: int = 4
    download_timeout: float = 30.0
    log_level: str = "INFO"
    # PEM file with the trusted release public key(s) (`mledge provision-device` writes
    # release-keys.pem beside the certificate); every release must verify with one.
    release_keys: str | None = None
    allow_unsigned_releases: bool = False  # development only: skip signature checks

    def validate(self) -> AgentConfig:
        """Check every field's type and range; ConfigError names the first bad one."""
        _check_types(self)
        if not self.thing:
            raise ConfigError("thing is required (--thing or \"thing\" in the config file)")
        if not THING_NAME.fullmatch(self.thing):
            # the MQTT client id and a topic segment: AWS's thing-name pattern
            raise ConfigError(f"thing must be 1-128 of a-z A-Z 0-9 : _ -, got {self.thing!r:.80}")
        if not self.model:
            raise ConfigError("model is required (--model or \"model\" in the config file)")
        if not MODEL_NAME.fullmatch(self.model):
            raise ConfigError(f"model must be lower-case letters, digits and '-' (a topic "
                              f"segment), got {self.model!r:.80}")
        if self.sensor not in ("vibration", "digits", "none"):
            raise ConfigError(f"sensor must be vibration, digits or none, got {self.sensor!r}")
        if not self.insecure_no_tls and bool(self.cert) != bool(self.key):
            raise ConfigError("cert and key go together (mutual TLS)")
        if self.rate < 0:
            raise ConfigError("rate must be >= 0")
        if not 0 <= self.fault_rate <= 1:
            raise ConfigError("fault_rate must be within [0, 1]")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port {self.port} is out of range")
        if not self.release_keys and not self.allow_unsigned_releases:
            raise ConfigError("release_keys is required (--release-keys: the PEM public key "
                              "releases are signed with); allow_unsigned_releases is for "
                              "development only")
        for name in ("stats_interval", "request_timeout", "download_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0")
        if self.duration is not None and self.duration < 0:
            raise ConfigError("duration must be >= 0")
        if self.session_threads < 1 or self.download_retries < 0:
            raise ConfigError("session_threads must be >= 1 and download_retries >= 0")
        if self.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"log_level must be DEBUG, INFO, WARNING or ERROR, got "
                              f"{self.log_level!r:.40}")
        return self

    @property
    def effective_seed(self) -> int:
        if self.seed is not None:
            return self.seed
        return sum((i + 1) * ord(c) for i, c in enumerate(self.thing)) % (2**31)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_mapping(cls, values: Any) -> AgentConfig:
        """Fields from a mapping (unchecked until `validate`); ConfigError for unknown names."""
        if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
            raise ConfigError("the config must be a JSON object of field names")
        names = {f.name for f in fields(cls)}
        normalised = {k.replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(normalised) - names)
        if unknown:
            raise ConfigError(f"unknown config fields {unknown}; known: {sorted(names)}")
        return cls(**normalised)

    @classmethod
    def from_file(cls, path: str | Path) -> AgentConfig:
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        except RecursionError:
            raise ConfigError(f"cannot read config file {path}: nested too deeply") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_mapping(values)


def _check_types(config: AgentConfig) -> None:
    """Each field holds its declared type: str, int (not bool), finite float (or int), bool,
    or None where the field is optional."""
    hints = typing.get_type_hints(AgentConfig)
    for f in fields(AgentConfig):
        value = getattr(config, f.name)
        allowed = typing.get_args(hints[f.name]) or (hints[f.name],)
        if value is None and type(None) in allowed:
            continue
        if bool in allowed:
            ok = isinstance(value, bool)
        elif int in allowed:
            ok = type(value) is int
        elif float in allowed:
            # an int must fit a float too (math.isfinite(10**400) raises OverflowError)
            ok = (type(value) is float and math.isfinite(value)) or (
                type(value) is int and abs(value) <= sys.float_info.max)
        else:
            ok = isinstance(value, str)
        if not ok:
            kinds = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise ConfigError(f"{f.name} must be {kinds}, got {_shown(value)}")


def _shown(value: Any) -> str:
    try:
        text = repr(value)
    except (RecursionError, ValueError):
        text = f"a {type(value).__name__}"
    return text[:80]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mledge-agent",
        description="MLEdgeDeploy device agent: telemetry, IoT Jobs model updates, local inference.",
    )
    parser.add_argument("--config", help="JSON config file (same field names as the flags)")
    parser.add_argument("--thing", help="thing name (also the MQTT client id)")
    parser.add_argument("--model", help="model name, e.g. vibration-anomaly")
    parser.add_argument("--endpoint", help="broker host: the AWS IoT data endpoint or a local broker")
    parser.add_argument("--port", type=int, help="broker port (8883 TLS, 443 with ALPN, 1883 plain)")
    parser.add_argument("--cert", help="device certificate (PEM)")
    parser.add_argument("--key", help="device private key (PEM)")
    parser.add_argument("--ca", help="CA bundle to trust (e.g. AmazonRootCA1.pem)")
    parser.add_argument("--release-keys",
                        help="PEM file of the public key(s) releases must be signed with")
    parser.add_argument("--allow-unsigned-releases", action="store_true", default=None,
                        help="accept unsigned releases (development only)")
    parser.add_argument("--insecure-no-tls", action="store_true", default=None,
                        help="plain TCP (local test brokers only)")
    parser.add_argument("--state-dir", help="where models, state.json and stats.json live")
    parser.add_argument("--sensor", choices=["vibration", "digits", "none"])
    parser.add_argument("--rate", type=float, help="readings per second (0: no telemetry)")
    parser.add_argument("--fault-rate", type=float, help="fraction of simulated readings with a fault")
    parser.add_argument("--seed", type=int, help="simulator seed (default: from the thing name)")
    parser.add_argument("--duration", type=float, help="run this many seconds, then stop")
    parser.add_argument("--stats-interval", type=float, help="seconds between stats.json writes")
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def config_from_args(argv: list[str] | None = None) -> AgentConfig:
    args = vars(build_parser().parse_args(argv))
    config_file = args.pop("config")
    config = AgentConfig.from_file(config_file) if config_file else AgentConfig()
    for name, value in args.items():
        if value is not None:
            setattr(config, name, value)
    return config.validate()
