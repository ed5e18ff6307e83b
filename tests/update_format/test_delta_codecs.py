"""Every registered delta codec round-trips bit-exactly on real retrained ONNX models and
on edge cases, and refuses corrupt, truncated or wrong-base deltas with PatchError."""

from __future__ import annotations

import random
import warnings

import numpy as np
import onnx
import pytest
from mledge_update.codecs import SUPPORTED_CODECS, apply_delta, make_delta
from mledge_update.errors import PatchError
from mledge_update.hashing import sha256_hex
from mledge_update.onnx_xor import numeric_regions
from onnx import numpy_helper
from skl2onnx import to_onnx
from sklearn.cluster import KMeans
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier

NEW_CODECS = [c for c in SUPPORTED_CODECS if c != "bsdiff4"]


def _export(estimator, sample: np.ndarray) -> bytes:
    options = None if isinstance(estimator, KMeans) else {id(estimator): {"zipmap": False}}
    return to_onnx(estimator, sample[:1], options=options, target_opset=17).SerializeToString()


def _vibration(rows: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, size=(3, 8))
    return (centres[rng.integers(0, 3, rows)] + rng.normal(0, 0.5, size=(rows, 8))).astype(np.float32)


@pytest.fixture(scope="module")
def model_pairs() -> dict[str, tuple[bytes, bytes]]:
    """(old, new) ONNX bytes: each model retrained on grown data."""
    warnings.filterwarnings("ignore")
    digits_x, digits_y = load_digits(return_X_y=True)
    digits_x = digits_x.astype(np.float32)
    vib = _vibration(1200, seed=3)
    pairs: dict[str, tuple[bytes, bytes]] = {}

    kmeans_old = KMeans(4, n_init=1, random_state=0).fit(vib[:600])
    kmeans_new = KMeans(4, init=kmeans_old.cluster_centers_, n_init=1).fit(vib)
    pairs["kmeans-warm"] = (_export(kmeans_old, vib), _export(kmeans_new, vib))
    kmeans_k5 = KMeans(5, n_init=1, random_state=0).fit(vib)  # different tensor shapes
    pairs["kmeans-k-changed"] = (pairs["kmeans-warm"][0], _export(kmeans_k5, vib))

    mlp = MLPClassifier((24,), max_iter=15, random_state=0).fit(digits_x[:700], digits_y[:700])
    mlp_old = _export(mlp, digits_x)
    scratch = MLPClassifier((24,), max_iter=15, random_state=1).fit(digits_x[:1200], digits_y[:1200])
    pairs["mlp-scratch"] = (mlp_old, _export(scratch, digits_x))
    mlp.set_params(warm_start=True, max_iter=3)
    pairs["mlp-warm"] = (mlp_old, _export(mlp.fit(digits_x[:1200], digits_y[:1200]), digits_x))

    logistic_old = LogisticRegression(max_iter=60).fit(digits_x[:700], digits_y[:700])
    logistic_new = LogisticRegression(max_iter=60).fit(digits_x[:1200], digits_y[:1200])
    # LinearClassifier keeps its weights in node attribute `floats` (unpacked in proto2).
    pairs["logistic-attributes"] = (_export(logistic_old, digits_x), _export(logistic_new, digits_x))

    def to_raw_data(blob: bytes) -> bytes:
        model = onnx.load_from_string(blob)
        for index, tensor in enumerate(model.graph.initializer):
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
        return model.SerializeToString()

    pairs["mlp-raw-data"] = tuple(to_raw_data(b) for b in pairs["mlp-warm"])  # type: ignore[assignment]
    return pairs


@pytest.mark.parametrize("codec", SUPPORTED_CODECS)
@pytest.mark.parametrize(
    "pair", ["kmeans-warm", "kmeans-k-changed", "mlp-scratch", "mlp-warm", "logistic-attributes", "mlp-raw-data"]
)
def test_round_trip_on_retrained_onnx(model_pairs, codec: str, pair: str) -> None:
    old, new = model_pairs[pair]
    assert old != new
    delta = make_delta(codec, old, new)
    assert apply_delta(codec, old, delta, expected_sha256=sha256_hex(new)) == new
    # The patched model is a loadable ONNX model.
    onnx.checker.check_model(onnx.load_from_string(apply_delta(codec, old, delta)))


def test_onnx_codec_finds_weights_in_initializers_and_attributes(model_pairs) -> None:
    mlp_regions = numeric_regions(model_pairs["mlp-warm"][1])
    assert [r.width for r in mlp_regions] and all(r.width == 4 for r in mlp_regions)
    assert sum(r.length for r in mlp_regions) == 4 * (64 * 24 + 24 + 24 * 10 + 10)
    raw_regions = numeric_regions(model_pairs["mlp-raw-data"][1])
    assert any(r.key.endswith(":raw") for r in raw_regions)
    logistic = numeric_regions(model_pairs["logistic-attributes"][1])
    coefficients = [r for r in logistic if "coefficients" in r.key]
    assert coefficients and coefficients[0].width == 5 and coefficients[0].length == 5 * 640


def test_onnx_codec_beats_bsdiff4_on_warm_started_mlp(model_pairs) -> None:
    old, new = model_pairs["mlp-warm"]
    assert len(make_delta("onnx-xor-planes", old, new)) < len(make_delta("bsdiff4", old, new))


@pytest.mark.parametrize("codec", SUPPORTED_CODECS)
@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b"", b""),
        (b"", b"new model"),
        (b"old model", b""),
        (b"identical" * 500, b"identical" * 500),
        (b"\x01", bytes(range(256)) * 40),
        (bytes(range(256)) * 40, b"\x01"),
        (random.Random(1).randbytes(4096), random.Random(2).randbytes(3000)),
        # Looks like a protobuf start but is not: must fall back, not fail.
        (b"\x3a\xff\xff\xff\x0f" + b"x" * 100, b"\x3a\x05abc" + b"y" * 100),
    ],
    ids=["empty", "from-empty", "to-empty", "identical", "grow", "shrink", "random", "fake-protobuf"],
)
def test_edge_cases_round_trip(codec: str, old: bytes, new: bytes) -> None:
    assert apply_delta(codec, old, make_delta(codec, old, new)) == new


@pytest.mark.parametrize("codec", NEW_CODECS)
def test_identical_models_give_a_tiny_delta(model_pairs, codec: str) -> None:
    model = model_pairs["mlp-warm"][1]
    assert len(make_delta(codec, model, model)) < 300


@pytest.mark.parametrize("codec", NEW_CODECS)
def test_truncated_and_corrupt_deltas_raise(model_pairs, codec: str) -> None:
    old, new = model_pairs["mlp-warm"]
    delta = make_delta(codec, old, new)
    for cut in sorted({0, 3, 4, 40, 75, len(delta) // 3, len(delta) // 2, len(delta) - 1}):
        with pytest.raises(PatchError):
            apply_delta(codec, old, delta[:cut])
    with pytest.raises(PatchError):
        apply_delta(codec, old, delta + b"\x00")
    rng = random.Random(11)
    for _ in range(60):
        corrupt = bytearray(delta)
        corrupt[rng.randrange(len(corrupt))] ^= 1 << rng.randrange(8)
        try:
            result = apply_delta(codec, old, bytes(corrupt))
        except PatchError:
            continue
        assert result == new  # the envelope's sha256 makes any other outcome impossible


@pytest.mark.parametrize("codec", NEW_CODECS)
def test_wrong_base_is_refused(model_pairs, codec: str) -> None:
    old, new = model_pairs["mlp-warm"]
    delta = make_delta(codec, old, new)
    with pytest.raises(PatchError, match="different base"):
        apply_delta(codec, model_pairs["mlp-scratch"][1], delta)


@pytest.mark.parametrize("codec", NEW_CODECS)
def test_delta_of_one_codec_is_not_accepted_by_another(model_pairs, codec: str) -> None:
    old, new = model_pairs["kmeans-warm"]
    for other in SUPPORTED_CODECS:
        if other != codec:
            with pytest.raises(PatchError):
                apply_delta(other, old, make_delta(codec, old, new))
