"""The `cnn` family (PyTorch) end to end: training, export, parity, warm start, the device.

Small and fast on CPU (a few epochs, one thread); nothing here needs a GPU. The CUDA
path is the same code with another `torch.device`: these tests check that the device
recorded is the one the machine offers.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mledge_edge.model import LoadedModel, run_smoke
from mledge_update.hashing import sha256_hex
from trainer import synthetic
from trainer.entrypoint import main
from trainer.errors import FamilyUnavailableError, HyperparameterError
from trainer.families import get_family
from trainer.hyperparameters import Hyperparameters
from trainer.onnx_export import TARGET_OPSET

torch = pytest.importorskip("torch")
from trainer.families.cnn import Architecture, _frozen_layers  # noqa: E402

FAST = {"epochs": "6", "learning_rate": "0.005", "fine_tune_epochs": "2"}
LAYERS = ("net.conv1.weight", "net.conv1.bias", "net.conv2.weight", "net.conv2.bias",
          "net.dense.weight", "net.dense.bias", "net.head.weight", "net.head.bias")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The shared 2-core box is oversubscribed; results are reproducible per thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits() -> list[dict[str, Any]]:
    return list(synthetic.digits_records(1797))


def run(base: Path, records: list[dict[str, Any]], champion: Path | None = None,
        **overrides: Any) -> tuple[int, Path]:
    synthetic.write_channel(base / "input" / "data" / "train", records, per_file=400)
    synthetic.write_hyperparameters(base, synthetic.cnn_hyperparameters(**{**FAST, **overrides}))
    if champion is not None:
        target = base / "input" / "data" / "champion" / "model.onnx"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(champion, target)
    return main(["--base-dir", str(base)]), base


def ok(result: tuple[int, Path]) -> dict[str, Any]:
    code, base = result
    failure = base / "output" / "failure"
    assert code == 0, failure.read_text() if failure.exists() else "no failure file"
    return json.loads((base / "model" / "metrics.json").read_text())


def failed(result: tuple[int, Path]) -> tuple[int, str]:
    code, base = result
    assert code != 0
    return code, (base / "output" / "failure").read_text()


def weights(path: Path) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


@pytest.fixture(scope="module")
def first(tmp_path_factory, digits) -> Path:
    """v1 from scratch on the first 40 % of the digits."""
    _, base = run(tmp_path_factory.mktemp("cnn1"), digits[:720])
    return base


def test_cnn_trains_exports_and_passes_parity(first: Path):
    metrics = json.loads((first / "model" / "metrics.json").read_text())
    assert metrics["family"] == "cnn" and metrics["metric"] == "accuracy"
    assert metrics["parity"]["passed"] is True and metrics["parity"]["label_agreement"] == 1.0
    assert metrics["challenger"]["accuracy"] > 0.5  # 6 epochs: far above 10 % chance
    model = metrics["model"]
    assert model["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert model["warm_start"] == {"used": False, "reason": "no champion", "frozen_layers": [],
                                   "update_fraction": None, "weights_changed": None}
    exported = weights(first / "model" / "model.onnx")
    assert model["parameters"] == sum(exported[name].size for name in LAYERS)


def test_cnn_onnx_follows_the_conventions(first: Path):
    path = first / "model" / "model.onnx"
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["input"]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert not dims[0].HasField("dim_value") and dims[1].dim_value == 64
    assert [o.name for o in proto.graph.output] == ["label", "scores"]
    assert {o.domain or "": o.version for o in proto.opset_import}[""] <= TARGET_OPSET[""]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["mledge.family"] == "cnn" and json.loads(meta["mledge.classes"]) == list(range(10))
    assert json.loads(meta["mledge.cnn.architecture"])["channels"] == [16, 32]
    assert [t.name for t in proto.graph.initializer] == sorted(t.name for t in proto.graph.initializer)
    assert set(LAYERS) <= {t.name for t in proto.graph.initializer}


def test_device_agent_serves_the_cnn_and_passes_its_golden_rows(first: Path):
    data = (first / "model" / "model.onnx").read_bytes()
    model = LoadedModel(first / "model" / "model.onnx", sha256_hex(data))
    assert model.info.family == "cnn" and model.info.n_features == 64
    golden = json.loads((first / "model" / "golden.json").read_text())
    assert run_smoke(model, golden["inputs"], golden["outputs"], golden["tolerance"]) == 8
    prediction = model.predict(golden["inputs"][0])
    assert prediction.label == golden["outputs"]["label"][0]
    assert prediction.score == pytest.approx(max(golden["outputs"]["scores"][0]))
    assert sum(prediction.scores) == pytest.approx(1.0, abs=1e-5)


def test_same_seed_same_bytes(tmp_path: Path, digits, first: Path):
    metrics = ok(run(tmp_path, digits[:720]))
    assert (tmp_path / "model" / "model.onnx").read_bytes() == \
        (first / "model" / "model.onnx").read_bytes()
    assert metrics["onnx"]["sha256"] == json.loads(
        (first / "model" / "metrics.json").read_text())["onnx"]["sha256"]


def test_warm_start_fine_tunes_the_champion_and_keeps_frozen_layers(tmp_path: Path, digits,
                                                                    first: Path):
    champion = first / "model" / "model.onnx"
    metrics = ok(run(tmp_path, digits[:1080], champion, model_version="2",
                     frozen_layers="conv1,conv2", fine_tune_learning_rate="0.001"))
    warm = metrics["model"]["warm_start"]
    assert warm == {"used": True, "reason": "warm-started from the champion",
                    "frozen_layers": ["conv1", "conv2"], "update_fraction": 1.0,
                    "weights_changed": None}
    assert metrics["model"]["learning_rate"] == 0.001 and metrics["model"]["epochs"] == 2
    # The gate's inputs: both models scored on this run's holdout.
    assert set(metrics["champion"]) == {"accuracy", "macro_f1"}
    old, new = weights(champion), weights(tmp_path / "model" / "model.onnx")
    for name in ("net.conv1.weight", "net.conv1.bias", "net.conv2.weight", "net.conv2.bias"):
        assert old[name].tobytes() == new[name].tobytes()
    for name in ("net.dense.weight", "net.head.weight"):
        assert not np.array_equal(old[name], new[name])
        # fine-tuned, not retrained: the weights moved a little, not to somewhere new
        assert np.max(np.abs(old[name] - new[name])) < 0.1


def test_update_fraction_keeps_every_other_weight_bit_identical(tmp_path: Path, digits,
                                                                first: Path):
    champion = first / "model" / "model.onnx"
    metrics = ok(run(tmp_path, digits[:1080], champion, model_version="2",
                     update_fraction="0.1"))
    warm = metrics["model"]["warm_start"]
    assert warm["used"] is True and warm["update_fraction"] == 0.1
    old, new = weights(champion), weights(tmp_path / "model" / "model.onnx")
    same = sum(int(np.sum(old[n].view(np.uint32) == new[n].view(np.uint32))) for n in LAYERS)
    total = sum(old[n].size for n in LAYERS)
    assert 0.0 < 1 - same / total <= 0.1 + 1e-3
    assert warm["weights_changed"] == pytest.approx(1 - same / total)
    assert metrics["parity"]["passed"] is True


def test_warm_start_can_be_turned_off(tmp_path: Path, digits, first: Path):
    metrics = ok(run(tmp_path, digits[:720], first / "model" / "model.onnx",
                     warm_start="false"))
    assert metrics["model"]["warm_start"]["used"] is False
    assert metrics["model"]["warm_start"]["reason"] == "warm_start is false"
    # ... and then it is the from-scratch model, bit for bit
    assert (tmp_path / "model" / "model.onnx").read_bytes() == \
        (first / "model" / "model.onnx").read_bytes()


def test_champion_with_another_architecture_trains_from_scratch(tmp_path: Path, digits,
                                                                 first: Path):
    metrics = ok(run(tmp_path, digits[:720], first / "model" / "model.onnx", channels="8,16"))
    assert metrics["model"]["warm_start"]["used"] is False
    assert "architecture differs" in metrics["model"]["warm_start"]["reason"]
    assert metrics["champion"] is not None  # still scored on the same holdout


def test_champion_of_another_family_trains_from_scratch(tmp_path: Path, digits):
    classifier = tmp_path / "classifier"
    synthetic.write_channel(classifier / "input" / "data" / "train", digits[:400])
    synthetic.write_hyperparameters(classifier, synthetic.classifier_hyperparameters(
        hidden_layer_sizes="8", max_iter="20"))
    assert main(["--base-dir", str(classifier)]) == 0
    metrics = ok(run(tmp_path / "cnn", digits[:400], classifier / "model" / "model.onnx"))
    assert metrics["model"]["warm_start"]["used"] is False
    assert "'classifier', not 'cnn'" in metrics["model"]["warm_start"]["reason"]


@pytest.mark.parametrize(("overrides", "message"), [
    ({"image_shape": "8,7"}, "image_shape': height,width must multiply to the 64"),
    ({"image_shape": "64"}, "image_shape': height,width must multiply"),
    ({"frozen_layers": "conv9"}, "frozen_layers': unknown layer(s) conv9"),
    ({"frozen_layers": "conv1,conv2,dense,head"}, "leaves nothing to train"),
    ({"optimizer": "lbfgs"}, "optimizer': must be one of adam, sgd"),
    ({"label_mode": "none"}, "the cnn family needs labels"),
    ({"epochs": "0"}, "epochs"),
    ({"input_scale": "0"}, "input_scale': must be greater than 0"),
    ({"chanels": "8"}, "chanels"),
])
def test_bad_hyperparameters_fail_with_the_reason(tmp_path: Path, digits, overrides, message):
    code, reason = failed(run(tmp_path, digits[:100], **overrides))
    assert code == HyperparameterError.exit_code
    assert message in reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_asked_for_without_a_gpu_fails_clearly(tmp_path: Path, digits):
    code, reason = failed(run(tmp_path, digits[:100], device="cuda"))
    assert code == HyperparameterError.exit_code
    assert "'cuda' but no CUDA device is visible" in reason


def test_labels_outside_the_classes_fail_the_run(tmp_path: Path, digits):
    records = [dict(r, label=r["label"] + 5) for r in digits[:300]]
    code, reason = failed(run(tmp_path, records))
    assert code == 4 and "labels outside 0..9" in reason and "'classes'" in reason


def test_family_without_pytorch_names_the_extra(monkeypatch):
    monkeypatch.delitem(sys.modules, "trainer.families.cnn")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    with pytest.raises(FamilyUnavailableError, match=r"needs torch.*mledge-trainer\[cnn\]"):
        get_family("cnn")


ARCH = Architecture(image_shape=(8, 8), channels=(4, 8), dense_units=8, classes=10,
                    input_scale=16.0)


def _check_frozen_layers(raw: str) -> None:
    hp = Hyperparameters({"frozen_layers": raw})
    try:
        names = _frozen_layers(hp, ARCH)
    except HyperparameterError as exc:
        assert "frozen_layers" in str(exc)
    else:
        assert set(names) < set(ARCH.layer_names())
        assert len(names) == len(set(names))


@pytest.mark.parametrize("raw", [
    "", " ", ",", ",,conv1,,", "conv1", "conv1,conv1", " head , dense ", "CONV1", "conv1;conv2",
    "conv0", "conv3", "conv1,conv2,dense,head", "dense,head,conv1,conv2,conv1", "\u00e9", "\x00",
    "conv1\nconv2", "a" * 500, "[\"conv1\"]",
])
def test_frozen_layers_parse_or_fail_clearly(raw: str):
    _check_frozen_layers(raw)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=60), st.lists(st.sampled_from(
    ["conv1", "conv2", "dense", "head", "conv3", " ", "", "CONV1"]), max_size=6).map(",".join)))
def test_frozen_layers_parse_or_fail_clearly_property(raw: str):
    _check_frozen_layers(raw)
