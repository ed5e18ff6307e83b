"""A device for the running local stack, and the stack's environment for a shell.

`python -m mledge_devstack provision THING --model MODEL` registers the thing in the
stack's moto (in its model's thing group), issues its client certificate from the
stack's CA and writes `agent.json` (broker, certificate, the stage's release public
key, state directory) so `mledge-agent --config <that file>` runs a device against
the stack. `python -m mledge_devstack env` prints the stack's settings as `export`
lines: `eval "$(python -m mledge_devstack env)"` and `mledge models` talks to it.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from mledge_update.naming import AGENT_CONFIG_FILE, SIMULATED_SENSOR

from chalicelib.config import UnknownModelError, load_pipeline_config
from chalicelib.settings import Settings
from mledge_devstack.certs import LocalCA
from mledge_devstack.resources import provision_thing
from mledge_devstack.stack import StackClients, StackError, StackInfo

# What a tool needs to reach the stack: AWS endpoint and test credentials, stage names.
EXPORTED = re.compile(r"^(AWS_|MLEDGE_|POWERTOOLS_)")


def provision_local_device(info: StackInfo, thing: str, model: str,
                           out_dir: Path | None = None) -> Path:
    """Register `thing` for `model` in the running stack; returns its agent.json."""
    settings = Settings.from_env(info.env)
    try:
        group = load_pipeline_config(settings.pipeline_config).model(model).thing_group
    except UnknownModelError as exc:
        raise StackError(str(exc)) from None
    clients = StackClients(region=settings.region, endpoint_url=info.endpoint_url)
    provision_thing(clients, thing, group)
    credentials = LocalCA.load(Path(info.certs_dir)).issue_client(thing)
    out = Path(out_dir) if out_dir else Path(info.directory) / "devices" / thing
    out.mkdir(parents=True, exist_ok=True)
    agent = {
        "thing": thing,
        "model": model,
        "endpoint": info.mqtt_host,
        "port": info.mqtt_port,
        "cert": str(credentials.cert_path),
        "key": str(credentials.key_path),
        "ca": str(credentials.ca_path),
        "release_keys": info.release_keys_path,
        "state_dir": str(out / "state"),
        "sensor": SIMULATED_SENSOR.get(model, "none"),
    }
    path = out / AGENT_CONFIG_FILE
    path.write_text(json.dumps(agent, indent=2) + "\n")
    return path


def shell_exports(info: StackInfo) -> str:
    """`export NAME=value` lines for the stack's settings (shell-quoted)."""
    return "".join(f"export {name}={shlex.quote(value)}\n"
                   for name, value in sorted(info.env.items()) if EXPORTED.match(name))
