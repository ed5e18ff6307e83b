"""What the fleet flags after a retrain that follows injected faults: the old loop vs this one.

    python bench/retrain_after_faults.py                # 30 000 readings, 5 % faults
    python bench/retrain_after_faults.py --stream 60000 --fault-rate 0.03

The story of the issue, with the real trainer, the real gate and the device's real
uplink policy: v1 is trained on a clean stream and released; faults start; devices send
what v1 flags plus a 2 % sample of the rest; v2 is trained on everything sent with v1
as its champion and the gate decides which model the fleet runs. Printed per loop: the
gate's decision on v2, and the fleet's fault detection and false-alarm rate on a fresh
stream afterwards (v1's beside it: the figure a retrain must not fall below).

- baseline (the loop before this change): every record weighted 1, no verdicts, no
  detection rule in the gate;
- weighted + labels: records weighted by 1 / inclusion_p, an operator labelled 30 % of
  the flagged faults (`mledge label`), the gate's detection rule;
- weighted + fault rule: the same with `fault_rules` (kurtosis above 9) in the config.

Then a regime shift instead of faults (a new operating mode, every reading of it
flagged by v1): the retrain must still learn it and be released.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from threadpoolctl import threadpool_limits  # noqa: E402

from chalicelib.config import load_pipeline_config  # noqa: E402
from chalicelib.gate import evaluate  # noqa: E402
from chalicelib.settings import DEFAULT_PIPELINE_CONFIG  # noqa: E402
from tests import uplink_stream as us  # noqa: E402

RULE = '[{"feature": "kurtosis", "above": 9.0}]'


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stream", type=int, default=30_000, help="readings in the fault phase")
    parser.add_argument("--fault-rate", type=float, default=0.05)
    args = parser.parse_args()
    vib = load_pipeline_config(DEFAULT_PIPELINE_CONFIG).model("vibration-anomaly")
    loops = [("baseline (before)", dict(labelled_share=0.0, weighted=False)),
             ("weighted + 30 % labelled", dict(labelled_share=0.3)),
             ("weighted + fault rule", dict(labelled_share=0.0, fault_rules=RULE))]
    print(f"fault phase: {args.stream} readings, {args.fault_rate:.0%} faults, 2 % sample; "
          f"fleet detection on 20 000 fresh readings")
    print(f"{'loop':28} {'gate on v2':10} {'sent (faults)':>14} {'fleet runs':>10} "
          f"{'detects faults':>15} {'false alarms':>13} {'v1 detects':>11}")
    with threadpool_limits(limits=1), tempfile.TemporaryDirectory() as tmp:
        for i, (name, options) in enumerate(loops):
            weighted = options.pop("weighted", True)
            run = us.retrain_after_faults(Path(tmp) / str(i), stream_size=args.stream,
                                          fault_rate=args.fault_rate, weighted=weighted,
                                          **options)
            decision = evaluate(vib, run["metrics"], champion_in_production=True)
            checks = [c for c in decision.checks if weighted or c.rule != "detection"]
            approved = all(c.passed for c in checks)
            runs = "v2" if approved else "v1"
            detects = run["v2_detection"] if approved else run["v1_detection"]
            alarms = run["v2_false_alarms"] if approved else run["v1_false_alarms"]
            print(f"{name:28} {'APPROVED' if approved else 'REJECTED':10} "
                  f"{run['sent']:>7} ({run['sent_faults']:>4}) {runs:>10} {detects:>15.1%} "
                  f"{alarms:>13.2%} {run['v1_detection']:>11.1%}")
        print("\nregime shift (no faults; a new operating mode in half the readings): "
              "false alarms on the new regime")
        print(f"{'loop':28} {'gate on v2':10} {'sent':>7} {'fleet runs':>10} "
              f"{'false alarms':>13} {'v1 alarms':>10}")
        for i, (name, weighted) in enumerate((("baseline (before)", False),
                                               ("weighted", True))):
            run = us.retrain_after_shift(Path(tmp) / f"shift{i}", stream_size=args.stream,
                                         weighted=weighted)
            decision = evaluate(vib, run["metrics"], champion_in_production=True)
            approved = all(c.passed for c in decision.checks
                           if weighted or c.rule != "detection")
            alarms = run["v2_false_alarms"] if approved else run["v1_false_alarms"]
            print(f"{name:28} {'APPROVED' if approved else 'REJECTED':10} {run['sent']:>7} "
                  f"{'v2' if approved else 'v1':>10} {alarms:>13.2%} "
                  f"{run['v1_false_alarms']:>10.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
