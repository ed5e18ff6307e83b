"""`mledge-agent`: run the device agent from a JSON config file and/or flags."""

from __future__ import annotations

import logging
import signal
import sys

from .agent import Agent
from .config import ConfigError, config_from_args
from .mqtt import MqttError


def main(argv: list[str] | None = None) -> int:
    try:
        config = config_from_args(argv)
    except ConfigError as exc:
        print(f"mledge-agent: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level,
        format=f"%(asctime)s %(levelname)s {config.thing} %(name)s: %(message)s",
    )
    agent = Agent(config)

    def stop(signum, frame) -> None:
        agent._stop.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        agent.run(config.duration)
    except MqttError as exc:
        logging.getLogger("mledge_edge").error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
