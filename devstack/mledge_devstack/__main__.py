"""`python -m mledge_devstack up|down|status|env|provision`: the local stack for developers.

`up` runs in the foreground until Ctrl-C (or `down` from another terminal),
then stops every process it started. The environment for other tools is in
`.devstack/env.json`; `status` shows it, `down` stops a stack another terminal
left running. `env` prints it as `export` lines (`eval "$(python -m mledge_devstack
env)"`, then `mledge models` works), `provision THING --model MODEL` registers a
device and writes its agent.json (`mledge-agent --config ...`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from mledge_devstack.certs import CertificateError
from mledge_devstack.devices import provision_local_device, shell_exports
from mledge_devstack.procs import port_open, process_group_alive
from mledge_devstack.stack import DEFAULT_DIRECTORY, LocalStack, StackError, StackInfo


def _up(args: argparse.Namespace) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stack = LocalStack(args.dir, stage=args.stage, pipeline_config=args.pipeline_config)
    with stack:
        info = stack.info
        assert info is not None
        print(f"local stack up (stage {args.stage})")
        print(f"  AWS endpoint   {info.endpoint_url}   (moto server)")
        print(f"  MQTT (TLS)     {info.mqtt_host}:{info.mqtt_port}   CA {info.ca_path}")
        print(f"  environment    {Path(info.directory) / 'env.json'}")
        print(f"  logs           {Path(info.directory) / 'logs'}, {Path(info.directory) / 'broker'}")
        for route in info.routes:
            print(f"  route          {route['queue']} -> {route['handler']} ({route['kind']})")
        print("Ctrl-C stops it.", flush=True)
        while not stop.wait(1.0):
            dead = [name for name, proc in (("dispatcher", stack.dispatcher), ("cloud", stack.cloud),
                                            ("mosquitto", stack.broker.process if stack.broker else None))
                    if proc is not None and not proc.alive()]
            if dead:
                print(f"stopping: {', '.join(dead)} exited (see the logs)", file=sys.stderr)
                return 1
    print("local stack stopped")
    return 0


def _down(args: argparse.Namespace) -> int:
    try:
        info = StackInfo.load(args.dir)
    except StackError as exc:
        print(exc, file=sys.stderr)
        return 1
    if info.owner_pid and _alive(info.owner_pid):
        # `up` is running: let it stop its children the orderly way.
        os.kill(info.owner_pid, signal.SIGTERM)
        print(f"asked `up` (pid {info.owner_pid}) to stop the stack")
        deadline = time.monotonic() + 20
        while _alive(info.owner_pid) and time.monotonic() < deadline:
            time.sleep(0.2)
    for name, pid in info.pids.items():
        if process_group_alive(pid):
            os.killpg(pid, signal.SIGKILL)
            print(f"killed {name} (process group {pid})")
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _status(args: argparse.Namespace) -> int:
    try:
        info = StackInfo.load(args.dir)
    except StackError as exc:
        print(exc, file=sys.stderr)
        return 1
    running = {name: process_group_alive(pid) for name, pid in info.pids.items()}
    moto_port = int(info.endpoint_url.rsplit(":", 1)[1])
    report = {
        "processes": {n: ("running" if up else "stopped") for n, up in running.items()},
        "moto": "listening" if port_open("127.0.0.1", moto_port) else "down",
        "mosquitto": "listening" if port_open("127.0.0.1", info.mqtt_port) else "down",
        "endpoint_url": info.endpoint_url,
        "mqtt": f"{info.mqtt_host}:{info.mqtt_port}",
        "routes": info.routes,
    }
    print(json.dumps(report, indent=2))
    return 0 if all(running.values()) else 3


def _env(args: argparse.Namespace) -> int:
    try:
        info = StackInfo.load(args.dir)
    except StackError as exc:
        print(exc, file=sys.stderr)
        return 1
    sys.stdout.write(shell_exports(info))
    return 0


def _provision(args: argparse.Namespace) -> int:
    if not args.thing or not args.model:
        print("provision needs a thing name and --model", file=sys.stderr)
        return 2
    try:
        info = StackInfo.load(args.dir)
        path = provision_local_device(info, args.thing, args.model, args.out)
    except (StackError, CertificateError) as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"thing {args.thing} ({args.model}) registered in the local stack")
    print(f"run: mledge-agent --config {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mledge_devstack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("up", "down", "status", "env", "provision"))
    parser.add_argument("thing", nargs="?", help="provision: the thing name")
    parser.add_argument("--model", help="provision: the model the device runs")
    parser.add_argument("--out", type=Path, default=None,
                        help="provision: where agent.json goes (default <dir>/devices/THING)")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIRECTORY,
                        help="where certificates, logs and env.json go (default .devstack/)")
    parser.add_argument("--stage", default="dev", help="the .chalice/config.json stage to mirror")
    parser.add_argument("--pipeline-config", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    commands = {"up": _up, "down": _down, "status": _status, "env": _env,
                "provision": _provision}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
