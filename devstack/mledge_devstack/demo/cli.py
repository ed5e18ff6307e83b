"""`python -m mledge_devstack.demo`: options, signals, the chosen scenario on a `Demo`."""

from __future__ import annotations

import argparse
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mledge_devstack.demo import anomaly, digits
from mledge_devstack.demo.record import (
    DEFAULT_OUTPUT,
    DEFAULT_WORKDIR,
    SCENARIO_MODEL,
    DemoError,
    DemoInterruptedError,
    DemoOptions,
)
from mledge_devstack.demo.run import Demo
from mledge_devstack.local_training import register_local_backend

# One module per scenario: adding one is a module with `tell(demo)` and a line here
# (and its model in record.SCENARIO_MODEL).
SCENARIOS: dict[str, Callable[[Demo], None]] = {"anomaly": anomaly.tell, "digits": digits.tell}


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise DemoInterruptedError(f"signal {signal.Signals(signum).name}")


def run_demo(options: DemoOptions) -> dict[str, Any]:
    return Demo(options, SCENARIOS[options.validate().scenario]).run()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mledge_devstack.demo",
        description="The local end-to-end demo: a simulated fleet of real device agents, the "
                    "whole retrain-and-deliver loop (docs/demo.md).")
    parser.add_argument("--scenario", choices=sorted(SCENARIO_MODEL), default="anomaly")
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--fleet-rate", type=float, default=30.0,
                        help="readings per second across the fleet (split evenly)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help="where summary.json and report.html go")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help="stack files, device state, logs")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds for the whole story")
    parser.add_argument("--plain", action="store_true", help="no live redraw, no colours")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The operator's `mledge train` runs in this process (the digits story): the local
    # training backend must be registered here too, not only in the dispatcher.
    register_local_backend()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # A slow stop escalates to SIGKILL by design; the display says what is stopping.
    logging.getLogger("mledge_devstack.procs").setLevel(logging.ERROR)
    options = DemoOptions(scenario=args.scenario, devices=args.devices,
                          fleet_rate=args.fleet_rate, output=args.output.resolve(),
                          workdir=args.workdir.resolve(), timeout=args.timeout,
                          live=False if args.plain else None)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    signal.signal(signal.SIGHUP, _raise_interrupted)  # the terminal closed: clean up too
    # Ctrl-C stops the story even where the demo was started with SIGINT ignored (a
    # background job of a script): cleanup then runs as for any other stop.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        summary = run_demo(options)
    except (KeyboardInterrupt, DemoInterruptedError):
        return 130
    except DemoError:
        return 1
    return 0 if summary.get("outcome") == "passed" else 1


