"""`onnx-delta-2`: bit-exact on random model pairs (hypothesis), small where the model
families need it (resized tensors, int8 steps, tree ensembles), and streaming from file to
file without leaving a partial model behind."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mledge_update import onnx_delta
from mledge_update.codecs import apply_delta, apply_delta_file, make_delta
from mledge_update.errors import PatchError
from mledge_update.hashing import sha256_hex
from onnx import TensorProto, helper, numpy_helper

CODEC = onnx_delta.NAME

DTYPES = [np.float32, np.float16, np.float64, np.int8, np.uint8, np.int32, np.int64]


def _model(tensors: dict[str, np.ndarray], floats: list[float], ints: list[int],
           raw: bool = True) -> bytes:
    """A small ONNX model: initializers (raw_data or typed fields) and a node whose
    attributes hold repeated floats and ints (proto2-unpacked, as tree ensembles are)."""
    initializers = []
    for name, array in tensors.items():
        tensor = numpy_helper.from_array(array, name)
        if not raw and array.dtype in (np.float32, np.float64, np.int32, np.int64):
            tensor = helper.make_tensor(name, helper.np_dtype_to_tensor_dtype(array.dtype),
                                        array.shape, array.flatten().tolist())
        initializers.append(tensor)
    node = helper.make_node("Identity", ["x"], ["y"], name="n0")
    if floats:
        node.attribute.append(helper.make_attribute("weights", floats))
    if ints:
        node.attribute.append(helper.make_attribute("ids", ints))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
                              initializer=initializers)
    return helper.make_model(graph).SerializeToString()


@st.composite
def model_pairs(draw: st.DrawFn) -> tuple[bytes, bytes]:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    old_tensors: dict[str, np.ndarray] = {}
    new_tensors: dict[str, np.ndarray] = {}
    for index in range(draw(st.integers(0, 4))):
        dtype = draw(st.sampled_from(DTYPES))
        shape = tuple(draw(st.lists(st.integers(1, 12), min_size=1, max_size=3)))
        if np.issubdtype(dtype, np.floating):
            old = (rng.normal(0, 1, shape) * draw(st.sampled_from([1e-3, 1.0, 1e4]))).astype(dtype)
        else:
            info = np.iinfo(dtype)
            old = rng.integers(info.min, info.max, shape, endpoint=True, dtype=dtype)
        change = draw(st.sampled_from(["same", "drift", "resize", "new", "gone", "specials"]))
        new = old.copy()
        if change == "drift":
            if np.issubdtype(dtype, np.floating):
                new = (old.astype(np.float64) * (1 + rng.normal(0, 1e-3, shape))).astype(dtype)
            else:
                new = (old + rng.integers(-1, 2, shape).astype(dtype)).astype(dtype)
        elif change == "resize":
            new_shape = tuple(max(1, d + int(rng.integers(-2, 3))) for d in shape)
            new = np.resize(old, new_shape).astype(dtype)
        elif change == "specials" and np.issubdtype(dtype, np.floating):
            flat = new.reshape(-1)
            flat[rng.integers(0, flat.size, 3)] = rng.choice(
                np.array([np.nan, np.inf, -np.inf, -0.0, 0.0], dtype=dtype), 3)
        if change != "new":
            old_tensors[f"t{index}"] = old
        if change != "gone":
            new_tensors[f"t{index}"] = new
    floats_old = rng.normal(0, 1, draw(st.integers(0, 40))).astype(np.float32).tolist()
    added = rng.normal(0, 1, draw(st.integers(0, 10))).astype(np.float32).tolist()
    floats_new = floats_old[: draw(st.integers(0, 40))] + added
    ints_old = rng.integers(-(2**40), 2**40, draw(st.integers(0, 40))).tolist()
    ints_new = [v + int(rng.integers(-1, 2)) for v in ints_old] + rng.integers(0, 5, draw(st.integers(0, 10))).tolist()
    raw = draw(st.booleans())
    return (_model(old_tensors, floats_old, ints_old, raw), _model(new_tensors, floats_new, ints_new, raw))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair=model_pairs())
def test_random_model_pairs_round_trip_bit_exactly(pair: tuple[bytes, bytes]) -> None:
    old, new = pair
    delta = make_delta(CODEC, old, new)
    assert apply_delta(CODEC, old, delta, expected_sha256=sha256_hex(new)) == new


@settings(max_examples=30, deadline=None)
@given(old=st.binary(max_size=300), new=st.binary(max_size=300))
def test_arbitrary_bytes_round_trip(old: bytes, new: bytes) -> None:
    assert apply_delta(CODEC, old, make_delta(CODEC, old, new)) == new


@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=50), tagged=st.booleans())
def test_varint_arrays_re_serialise_exactly(values: list[int], tagged: bool) -> None:
    layout = onnx_delta.Layout(onnx_delta.KIND_VARINT, 8, onnx_delta.CLS_INT, b"@" if tagged else b"")
    array = np.array(values, dtype=np.int64).view(np.uint64)
    assert (onnx_delta.decode(onnx_delta.encode(array, layout), layout) == array).all()


@settings(max_examples=40, deadline=None)
@given(bits=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=64),
       base=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=64),
       transform=st.sampled_from([onnx_delta.T_SUB, onnx_delta.T_XOR, onnx_delta.T_SCALE, onnx_delta.T_PREV]))
def test_every_transform_inverts_on_any_bit_pattern(bits: list[int], base: list[int], transform: int) -> None:
    new = np.array(bits, dtype=np.uint32)
    pred = np.resize(np.array(base, dtype=np.uint32), new.size)
    for cls in (onnx_delta.CLS_FLOAT, onnx_delta.CLS_INT):
        res = onnx_delta.residual(transform, new, pred, 4, cls, 0.7, 12345)
        assert (onnx_delta.restore(transform, res, pred, 4, cls, 0.7, 12345) == new).all()


def test_resized_tensor_references_the_shared_rows() -> None:
    rng = np.random.default_rng(0)
    vocab = rng.normal(0, 1, (2000, 32)).astype(np.float32)
    classes = rng.normal(0, 1, (64, 10)).astype(np.float32)
    old = _model({"embedding": vocab, "head": classes}, [], [])
    grown = np.vstack([vocab, rng.normal(0, 1, (20, 32)).astype(np.float32)])  # rows added
    wider = np.hstack([classes, rng.normal(0, 1, (64, 1)).astype(np.float32)])  # a class added
    new = _model({"embedding": grown, "head": wider}, [], [])
    delta = make_delta(CODEC, old, new)
    assert apply_delta(CODEC, old, delta) == new
    added_bytes = (20 * 32 + 64) * 4
    assert len(delta) < added_bytes * 1.5, len(delta)
    # retrained: every shared weight moves a little, so byte matching finds nothing and
    # only a codec that pairs the resized tensors' shared rows/columns codes small steps
    drifted = _model({"embedding": (grown * (1 + rng.normal(0, 1e-6, grown.shape))).astype(np.float32),
                      "head": (wider * (1 + rng.normal(0, 1e-6, wider.shape))).astype(np.float32)}, [], [])
    delta = make_delta(CODEC, old, drifted)
    assert apply_delta(CODEC, old, delta) == drifted
    assert len(delta) < 0.7 * len(make_delta("onnx-xor-planes", old, drifted))
    assert len(delta) < 0.9 * len(make_delta("bsdiff4", old, drifted))


def test_int8_steps_cost_less_than_xor() -> None:
    rng = np.random.default_rng(1)
    old_q = rng.integers(-128, 128, (256, 256), dtype=np.int16).astype(np.int8)
    new_q = np.clip(old_q.astype(np.int16) + rng.integers(-1, 2, old_q.shape), -128, 127).astype(np.int8)
    old, new = _model({"w": old_q}, [], []), _model({"w": new_q}, [], [])
    delta = make_delta(CODEC, old, new)
    assert apply_delta(CODEC, old, delta) == new
    assert len(delta) < 0.85 * len(make_delta("onnx-xor-planes", old, new))
    assert len(delta) < len(make_delta("bsdiff4", old, new))


@pytest.fixture(scope="module")
def forest_pair() -> tuple[bytes, bytes]:
    """A random forest warm-started with 4 more trees (skl2onnx rescales every old leaf)."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.ensemble import RandomForestClassifier

    warnings.filterwarnings("ignore")
    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    forest = RandomForestClassifier(10, max_depth=6, random_state=0, warm_start=True).fit(x[:800], y[:800])
    old = to_onnx(forest, x[:1], options={id(forest): {"zipmap": False}}, target_opset=17).SerializeToString()
    forest.set_params(n_estimators=14)
    forest.fit(x[:800], y[:800])
    new = to_onnx(forest, x[:1], options={id(forest): {"zipmap": False}}, target_opset=17).SerializeToString()
    return old, new


def test_tree_ensemble_beats_every_other_codec(forest_pair: tuple[bytes, bytes]) -> None:
    old, new = forest_pair
    ours = make_delta(CODEC, old, new)
    assert apply_delta(CODEC, old, ours) == new
    for other in ("bsdiff4", "zstd-patch", "onnx-xor-planes"):
        assert len(ours) < len(make_delta(other, old, new)), other
    keys = {a.key for a in onnx_delta.find_arrays(new)}
    assert any(k.endswith("class_weights:u7") for k in keys)
    assert any(k.endswith("nodes_truenodeids:u8") for k in keys)


def test_apply_delta_file_streams_and_leaves_nothing_on_failure(tmp_path, forest_pair) -> None:
    old, new = forest_pair
    delta = make_delta(CODEC, old, new)
    (tmp_path / "old.onnx").write_bytes(old)
    (tmp_path / "delta").write_bytes(delta)
    out = tmp_path / "new.onnx"
    apply_delta_file(CODEC, tmp_path / "old.onnx", tmp_path / "delta", out, expected_sha256=sha256_hex(new))
    assert out.read_bytes() == new
    out.unlink()
    for bad in (delta[: len(delta) // 2], delta[:-1] + bytes([delta[-1] ^ 1]), delta + b"x"):
        (tmp_path / "delta").write_bytes(bad)
        with pytest.raises(PatchError):
            apply_delta_file(CODEC, tmp_path / "old.onnx", tmp_path / "delta", out)
        assert not out.exists()
        assert list(tmp_path.iterdir()) == sorted([tmp_path / "old.onnx", tmp_path / "delta"]) or \
            set(tmp_path.iterdir()) == {tmp_path / "old.onnx", tmp_path / "delta"}
    # the other codecs go through the same file API (in memory)
    for codec in ("bsdiff4", "zstd-patch", "onnx-xor-planes"):
        (tmp_path / "delta").write_bytes(make_delta(codec, old, new))
        apply_delta_file(codec, tmp_path / "old.onnx", tmp_path / "delta", out)
        assert out.read_bytes() == new


def test_large_array_is_chunked_and_round_trips(monkeypatch) -> None:
    monkeypatch.setattr(onnx_delta, "CHUNK_ELEMENTS", 1000)
    monkeypatch.setattr(onnx_delta, "SAMPLE_ELEMENTS", 500)
    rng = np.random.default_rng(2)
    w = rng.normal(0, 1, (300, 40)).astype(np.float32)
    old = _model({"w": w, "flat": w.reshape(-1)}, [], [])
    w2 = np.vstack([w, w[:7]]) * np.float32(1.001)
    new = _model({"w": w2, "flat": w.reshape(-1)[:-5]}, [], [])
    delta = make_delta(CODEC, old, new)
    assert apply_delta(CODEC, old, delta) == new


def test_zstd_patch_prefix_path_finds_matches_across_the_whole_old_model(monkeypatch) -> None:
    """Above PATCH_PREFIX_ABOVE the old model is referenced as a prefix (what the zstd CLI
    does); the frame is a plain zstd frame that today's devices decode unchanged."""
    from mledge_update import _wire

    monkeypatch.setattr(_wire, "PATCH_PREFIX_ABOVE", 0)
    rng = np.random.default_rng(5)
    old = rng.integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    new = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes() + old[: len(old) // 2] + b"tail" + old[len(old) // 2 :]
    delta = make_delta("zstd-patch", old, new)
    assert apply_delta("zstd-patch", old, delta) == new
    assert len(delta) < 4096 + 2000
