"""One simulated device of the demo: the real device agent (`mledge_edge.Agent`) fed by a
scenario-controlled simulator.

    python -m mledge_devstack.demo.device --control CONTROL.json --scenario anomaly \
        --device-index 0 --device-count 10 <mledge-agent flags...>

Everything the device does on the network is the agent's own code (MQTT over TLS with
the thing's certificate, IoT Jobs, download, patch, verify, hot-swap, uplink policy);
this wrapper only chooses what the "machine" senses, which the demo changes while the
agents run, through a small JSON control file the demo rewrites atomically:

    {"phase": "stream", "regime": "normal" | "shifted", "fault_rate": 0.0,
     "digits_limit": 179}

- `regime: shifted`: the line adds a high-speed product: half of the operating-mode
  draws now give `NEW_MODE` (250 Hz shaft: its fundamental leaves the low band and its
  gear mesh enters the high band), a regime no model trained before the shift has seen.
- `fault_rate`: the fraction of readings with an injected fault (impulses, imbalance,
  bearing wear); zero while the models learn, raised to show local detection.
- digits: every device reads its own slice of one shuffled copy of scikit-learn's
  digits, so the fleet never sends an image twice; `digits_limit` is how far into that
  shuffled order the fleet may read (10 %, then 70 %, then all of it).

The wrapper also tallies, per control phase and serving model version, what the device
read, flagged and sent (`stats.json` key `demo`), with the simulator's ground truth
(injected fault, operating mode, digit label) that the agent itself never sees.
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
from typing import Any

import numpy as np
from mledge_edge.agent import Agent
from mledge_edge.config import ConfigError, build_parser, config_from_args
from mledge_edge.model import Prediction
from mledge_edge.mqtt import MqttError
from mledge_edge.sensors import MODES, OperatingMode, Reading, VibrationSensor

NEW_MODE = OperatingMode(shaft_hz=250.0, load=1.0, base_temp_c=50.0)
SHIFTED_MODES = (*MODES, NEW_MODE, NEW_MODE, NEW_MODE)  # half the draws are the new mode
MODE_DWELL = 20  # readings per operating-mode draw: every device visits every mode early
DIGITS_ORDER_SEED = 20240601  # one shuffled order of the digits data set, shared by the fleet
CONTROL_REFRESH_SECONDS = 0.5
MAX_FAULT_IDS = 2000

KIND_NORMAL, KIND_NEW_REGIME, KIND_FAULT, KIND_DIGIT = "normal", "new_regime", "fault", "digit"


class Control:
    """The demo's control file, re-read when it changes (at most every 0.5 s)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.values: dict[str, Any] = {}
        self._mtime_ns = -1
        self._checked = 0.0
        self.refresh(force=True)

    def refresh(self, force: bool = False) -> dict[str, Any]:
        now = time.monotonic()
        if not force and now - self._checked < CONTROL_REFRESH_SECONDS:
            return self.values
        self._checked = now
        try:
            mtime = self.path.stat().st_mtime_ns
            if mtime != self._mtime_ns:
                self.values = json.loads(self.path.read_text())
                self._mtime_ns = mtime
        except (OSError, ValueError):
            pass  # keep the last good values; the demo writes the file atomically
        return self.values

    @property
    def phase(self) -> str:
        return str(self.values.get("phase", "stream"))


class ScenarioVibration:
    """The agent's vibration simulator, with the regime and fault rate the demo sets."""

    feature_names = VibrationSensor.feature_names

    def __init__(self, seed: int, control: Control) -> None:
        self.control = control
        self.sensor = VibrationSensor(seed=seed, fault_rate=0.0, mode_dwell=MODE_DWELL)

    def read(self) -> Reading:
        values = self.control.refresh()
        self.sensor.modes = SHIFTED_MODES if values.get("regime") == "shifted" else MODES
        self.sensor.fault_rate = float(values.get("fault_rate", 0.0))
        return self.sensor.read()

    def kind(self, reading: Reading) -> str:
        if reading.fault:
            return KIND_FAULT
        if reading.mode is not None and self.sensor.modes[reading.mode] == NEW_MODE:
            return KIND_NEW_REGIME
        return KIND_NORMAL


class SharedDigits:
    """Device `index` of `count` reads positions index, index+count, ... of one shuffled
    order of the digits data set, up to the control's `digits_limit`; then it idles."""

    def __init__(self, index: int, count: int, control: Control) -> None:
        from sklearn.datasets import load_digits

        data = load_digits()
        self._x = np.asarray(data.data, dtype=np.float64)
        self._y = np.asarray(data.target, dtype=np.int64)
        self.order = np.random.default_rng(DIGITS_ORDER_SEED).permutation(len(self._y))
        self.index, self.count, self.control = index, count, control
        self._next = index
        self.feature_names = tuple(f"px{i}" for i in range(self._x.shape[1]))

    def read(self) -> Reading | None:
        limit = int(self.control.refresh().get("digits_limit", len(self.order)))
        if self._next >= min(limit, len(self.order)):
            return None  # nothing new to look at yet
        image = int(self.order[self._next])
        self._next += self.count
        return Reading([float(v) for v in self._x[image]], label=int(self._y[image]))

    def kind(self, reading: Reading) -> str:
        return KIND_DIGIT


class DemoAgent(Agent):
    """The agent, plus a tally of what it read, flagged and sent, by phase and model version."""

    def __init__(self, config: Any, *, source: ScenarioVibration | SharedDigits,
                 control: Control) -> None:
        super().__init__(config, source=source)  # type: ignore[arg-type]
        self.control = control
        self._tally: dict[str, dict[str, Any]] = {}
        self._tally_lock = threading.Lock()
        self._sent_bytes = 0
        self._sent_messages = 0
        # Ground truth the demo's operator "confirms" (mledge label): ids of the fault
        # readings this device sent, in the agent's own id format.
        self._fault_ids: list[str] = []

    def process(self, reading: Reading | None) -> Prediction | None:
        if reading is None:  # the simulated machine has nothing new to report
            return None
        seq_before = self._seq  # the agent numbers each telemetry message it sends
        prediction = super().process(reading)
        sent = self._seq != seq_before
        if sent and reading.fault and len(self._fault_ids) < MAX_FAULT_IDS:
            with self._tally_lock:
                self._fault_ids.append(f"{self.thing}-{self._boot}-{self._seq}")
        uplink = self.counter.snapshot()
        messages = sum(phase["messages"] for phase in uplink.values())
        total = sum(phase["bytes"] for phase in uplink.values())
        version = prediction.model_version if prediction is not None else 0
        kind = self.source.kind(reading)  # type: ignore[union-attr]
        with self._tally_lock:
            key = f"{self.control.phase}/v{version}"
            entry = self._tally.setdefault(key, {
                "phase": self.control.phase, "version": version, "readings": 0,
                "messages": 0, "bytes": 0, "kinds": {}, "first_at": time.time()})
            entry["readings"] += 1
            # Bytes (topic + payload) since the previous reading: this reading's
            # telemetry and any summary the agent published in between.
            entry["messages"] += messages - self._sent_messages
            entry["bytes"] += total - self._sent_bytes
            entry["last_at"] = time.time()
            self._sent_messages, self._sent_bytes = messages, total
            counts = entry["kinds"].setdefault(kind, {"readings": 0, "flagged": 0, "sent": 0,
                                                      "predicted": 0, "correct": 0,
                                                      "inference_us": 0})
            counts["readings"] += 1
            counts["sent"] += int(sent)
            if prediction is not None:
                counts["predicted"] += 1
                counts["inference_us"] += self.last_inference_us or 0
                counts["flagged"] += int(prediction.anomaly)
                if reading.label is not None:
                    counts["correct"] += int(prediction.label == reading.label)
        return prediction

    def stats(self) -> dict[str, Any]:
        stats = super().stats()
        with self._tally_lock:
            stats["demo"] = json.loads(json.dumps(self._tally))
            stats["demo_fault_ids"] = list(self._fault_ids)
        return stats


def build_demo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--control", required=True, help="the demo's control file (JSON)")
    parser.add_argument("--scenario", choices=["anomaly", "digits"], default="anomaly")
    parser.add_argument("--device-index", type=int, default=0)
    parser.add_argument("--device-count", type=int, default=1)
    return parser


def main(argv: list[str] | None = None) -> int:
    demo_args, agent_argv = build_demo_parser().parse_known_args(argv)
    if "-h" in agent_argv or "--help" in agent_argv:
        build_demo_parser().print_usage()
        build_parser().print_help()
        return 0
    try:
        config = config_from_args(agent_argv)
    except ConfigError as exc:
        print(f"demo-device: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level,
                        format=f"%(asctime)s %(levelname)s {config.thing} %(name)s: %(message)s")
    control = Control(Path(demo_args.control))
    source: ScenarioVibration | SharedDigits
    if demo_args.scenario == "digits":
        config.sensor = "digits"
        source = SharedDigits(demo_args.device_index, demo_args.device_count, control)
    else:
        config.sensor = "vibration"
        source = ScenarioVibration(config.effective_seed, control)
    agent = DemoAgent(config, source=source, control=control)

    def stop(signum: int, frame: Any) -> None:
        agent._stop.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    parent = os.getppid()

    def stop_when_orphaned() -> None:
        # The demo stops every agent itself; if it was killed outright (SIGKILL), the agent
        # is re-parented and stops on its own instead of streaming forever.
        while not agent._stop.wait(1.0):
            if os.getppid() != parent:
                logging.getLogger(__name__).warning("the demo (pid %d) is gone; stopping", parent)
                agent._stop.set()

    threading.Thread(target=stop_when_orphaned, name="orphan-watch", daemon=True).start()
    try:
        agent.run(config.duration)
    except MqttError as exc:
        logging.getLogger("mledge_edge").error("%s", exc)
        return 1
    logging.getLogger(__name__).info("demo device %s stopped (pid %d)", config.thing, os.getpid())
    return 0


if __name__ == "__main__":
    sys.exit(main())
