"""A stand-in training entrypoint for backend tests: `python -m tests.cloud.fake_trainer --base-dir DIR`.

It follows the container contract without learning anything: it records what
the backend laid out (hyperparameters, train files, champion) in
`model/seen.json`, writes `model/model.onnx`, and obeys `fake_mode`:
`ok` (exit 0), `fail` (write output/failure, exit 2), `sleep` (run until killed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-dir", required=True)
    base = Path(parser.parse_args().base_dir)
    hp = json.loads((base / "input/config/hyperparameters.json").read_text())
    mode = hp.get("fake_mode", "ok")
    if mode == "sleep":
        time.sleep(600)
    if mode == "fail":
        (base / "output").mkdir(parents=True, exist_ok=True)
        (base / "output/failure").write_text("not enough records: 3 < 100\n")
        return 2
    train = base / "input/data/train"
    champion = base / "input/data/champion/model.onnx"
    seen = {
        "hyperparameters": hp,
        "train_files": sorted(p.relative_to(train).as_posix() for p in train.rglob("*")
                              if p.is_file()),
        "champion": champion.read_text() if champion.is_file() else None,
    }
    model = base / "model"
    model.mkdir(parents=True, exist_ok=True)
    (model / "seen.json").write_text(json.dumps(seen))
    (model / "model.onnx").write_bytes(b"fake-onnx")
    (model / "metrics.json").write_text(json.dumps({"family": hp.get("family")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
