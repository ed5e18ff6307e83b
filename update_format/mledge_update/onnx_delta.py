"""`onnx-delta-2`: a model-aware delta codec that streams on apply.

Making (cloud side, whole models in memory):

1. walk both ONNX files (protobuf, no onnx package) and find every numeric array: tensor
   `raw_data` (element type from `data_type`, shape from `dims`), packed or unpacked
   `float_data` / `double_data` / `int32_data` / `int64_data`, and node attribute `floats`
   and `ints` (tree ensembles keep ~15 per-node arrays there, proto2-unpacked as "tag +
   varint"). Each array gets a key from where it lives and is paired with the old array of
   the same key, even when its length or shape changed;
2. per array, code a residual against a predictor taken from the paired old array and keep
   whichever candidate compresses smallest:
   - `sub`: arithmetic difference (integers), or the difference of the floats' order-
     preserving integer images (the ULP distance), zigzagged so small steps of either sign
     become small numbers; elements outside the overlap of old and new shape (rows or
     classes added, a tree appended) are predicted by zero;
   - `xor`: bit XOR with the prediction (floats whose low bits are noise);
   - `scale`: `sub` against the old array times one constant (skl2onnx rescales every
     random-forest leaf weight by old/new tree count when trees are added);
   - `prev`: difference from the previous element (tree node/tree ids, unpaired arrays);
   - `dict`: the raw elements compressed with the old array as zstd dictionary, so trees
     that moved (one tree grew, every later one shifted) are still referenced;
   - `raw`: the elements themselves;
   the residual is split into byte planes (plane-major) and zstd-compressed, in chunks of
   whole rows so applying never holds more than a chunk;
3. the bytes around the arrays (graph structure, names, string attributes) go into one
   zstd frame with the old file minus its paired arrays as dictionary, window spanning it.

Applying (`apply_stream`) reads the old model by offset, the delta sequentially and
writes the new model front to back: memory is the rest frame, its dictionary (the old
file without its arrays: small for large models) and one chunk, not the model.
Every array's re-serialisation is checked against the original bytes when making, so an
array whose encoding is not canonical (say, a padded varint) stays in the rest stream.
"""

from __future__ import annotations

import hashlib
import io
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
import zstandard

from ._wire import MAX_OUTPUT_BYTES, Reader, put_varint, window_log_for
from .errors import PatchError
from .onnx_xor import _fields, _NotProtobufError, _text, _varint

NAME = "onnx-delta-2"
MAGIC = b"MOD2"
REST_LEVEL = 19
# Residual frames: level 19 for small arrays (cheap, every byte counts); large arrays are
# dominated by near-random low mantissa planes where a high level buys little and costs
# seconds per MB on a packaging Lambda.
SMALL_LEVEL = 19
LARGE_LEVEL = 6
LARGE_ARRAY_BYTES = 1 << 20
# Chunk size in elements: bounds the applying process's working set to a few copies of this.
CHUNK_ELEMENTS = 1 << 18
MIN_REGION_BYTES = 32
# Candidates are compared on a sample this long (elements) for large arrays.
SAMPLE_ELEMENTS = 1 << 17
DICT_MAX_BYTES = 1 << 20  # zstd with a larger dictionary costs seconds per array
TRY_PLAIN_BELOW = 1 << 20
# Arrays up to this size share one frame (a frame costs ~10 bytes and its entropy tables
# more: a forest of 60 small trees would pay that 700 times); the shared stream is held
# whole when applying, so its total is capped.
SMALL_ARRAY_BYTES = 64 << 10
SHARED_MAX_BYTES = 8 << 20
# The envelope carries the first HASH_BYTES of each SHA-256: enough to refuse a wrong base
# and catch corruption; the job document carries the full hash of the result.
HASH_BYTES = 8

# kinds of element encodings in the protobuf
KIND_FIXED = 0  # little-endian fixed-width elements, optionally each preceded by a tag
KIND_VARINT = 1  # varint int64 elements, optionally each preceded by a tag

# element classes
CLS_FLOAT = 0
CLS_INT = 1

TRANSFORMS = ("raw", "sub", "xor", "scale", "prev", "dict")
T_RAW, T_SUB, T_XOR, T_SCALE, T_PREV, T_DICT = range(6)

_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_SINT = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}
_FLOAT = {2: np.float16, 4: np.float32, 8: np.float64}

# TensorProto.data_type -> (width, class) for raw_data
_DTYPES = {
    1: (4, CLS_FLOAT), 2: (1, CLS_INT), 3: (1, CLS_INT), 4: (2, CLS_INT), 5: (2, CLS_INT),
    6: (4, CLS_INT), 7: (8, CLS_INT), 9: (1, CLS_INT), 10: (2, CLS_FLOAT), 11: (8, CLS_FLOAT),
    12: (4, CLS_INT), 13: (8, CLS_INT), 16: (2, CLS_FLOAT),
}


@dataclass(frozen=True)
class Layout:
    """How an array's elements sit in the file."""

    kind: int
    width: int  # element width in bytes (8 for varints: they are decoded to int64)
    cls: int
    tag: bytes = b""  # per-element tag for proto2-unpacked repeated fields


@dataclass
class Array:
    key: str
    offset: int
    length: int
    layout: Layout
    dims: tuple[int, ...] = ()
    count: int = 0
    values: np.ndarray | None = field(default=None, repr=False)


# ------------------------------------------------------------------ element (de)serialisation


def decode(buf: bytes | memoryview, layout: Layout) -> np.ndarray:
    """Elements of one array as unsigned integers of `layout.width` bytes (bit patterns)."""
    raw = np.frombuffer(buf, dtype=np.uint8)
    tag = len(layout.tag)
    if layout.kind == KIND_FIXED:
        stride = tag + layout.width
        if raw.size % stride:
            raise ValueError("array length is not a multiple of its element stride")
        if tag:
            rows = raw.reshape(-1, stride)
            if not (rows[:, :tag] == np.frombuffer(layout.tag, dtype=np.uint8)).all():
                raise ValueError("unexpected tag inside an unpacked run")
            raw = np.ascontiguousarray(rows[:, tag:])
        return raw.view(_UINT[layout.width]).reshape(-1).copy() if raw.size else np.zeros(0, _UINT[layout.width])
    # varints: terminators are bytes < 0x80; with a one-byte tag (< 0x80 too) they alternate
    low = np.flatnonzero(raw < 0x80)
    if tag:
        if tag != 1 or low.size % 2 or not (raw[low[0::2]] == layout.tag[0]).all():
            raise ValueError("unpacked varint run with an unexpected tag")
        starts = low[0::2] + 1
        ends = low[1::2] + 1
    else:
        ends = low + 1
        starts = np.concatenate(([0], ends[:-1])).astype(np.int64)
    if ends.size and ends[-1] != raw.size:
        raise ValueError("varint run does not end on a terminator")
    lengths = ends - starts
    if lengths.size and (lengths.min() < 1 or lengths.max() > 10):
        raise ValueError("varint longer than 10 bytes")
    values = np.zeros(lengths.size, dtype=np.uint64)
    for k in range(int(lengths.max()) if lengths.size else 0):
        has = lengths > k
        byte = raw[(starts + k)[has]].astype(np.uint64) & np.uint64(0x7F)
        values[has] |= byte << np.uint64(7 * k)
    return values


def encode(values: np.ndarray, layout: Layout) -> bytes:
    """Inverse of `decode`: the exact bytes of the array in the file."""
    tag = np.frombuffer(layout.tag, dtype=np.uint8)
    if layout.kind == KIND_FIXED:
        body = values.astype(_UINT[layout.width], copy=False).view(np.uint8).reshape(-1, layout.width)
        if tag.size:
            body = np.hstack([np.broadcast_to(tag, (body.shape[0], tag.size)), body])
        return body.tobytes()
    u = values.astype(np.uint64, copy=False)
    n = u.size
    lengths = np.ones(n, dtype=np.int64)
    for k in range(1, 10):
        lengths += u >= np.uint64(1 << (7 * k))
    cols = tag.size + 10
    out = np.zeros((n, cols), dtype=np.uint8)
    if tag.size:
        out[:, : tag.size] = tag
    for k in range(10):
        byte = ((u >> np.uint64(7 * k)) & np.uint64(0x7F)).astype(np.uint8)
        byte |= np.where(lengths > k + 1, 0x80, 0).astype(np.uint8)
        out[:, tag.size + k] = byte
    keep = np.arange(cols)[None, :] < (lengths + tag.size)[:, None]
    return out[keep].tobytes()


# ------------------------------------------------------------------ protobuf walk


class _Walker:
    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.arrays: list[Array] = []
        self.seen: dict[str, int] = {}

    def add(self, key: str, start: int, end: int, layout: Layout, dims: tuple[int, ...] = ()) -> None:
        if end - start < MIN_REGION_BYTES:
            return
        index = self.seen.get(key, 0)
        self.seen[key] = index + 1
        self.arrays.append(Array(key if not index else f"{key}#{index}", start, end - start, layout, dims))

    def repeated(self, key: str, fields: list[tuple[int, int, int, int, int]], number: int,
                 layout_packed: Layout, unpacked_wire: int, dims: tuple[int, ...] = ()) -> None:
        """Packed (wire 2) arrays and runs of unpacked elements of field `number`."""
        run: list[int] = []  # [start, end, count]
        tag_len = 0

        def close() -> None:
            if run:
                tag = self.buf[run[0] : run[0] + tag_len]
                self.add(f"{key}:u{number}", run[0], run[1],
                         Layout(layout_packed.kind, layout_packed.width, layout_packed.cls, bytes(tag)), dims)
            run.clear()

        for field_number, wire, tag_start, start, end in fields:
            if field_number != number:
                close()
                continue
            if wire == 2:
                close()
                self.add(f"{key}:p{number}", start, end, layout_packed, dims)
            elif wire == unpacked_wire:
                this_tag = start - tag_start
                if run and tag_start == run[1] and this_tag == tag_len:
                    run[1] = end
                else:
                    close()
                    tag_len = this_tag
                    run.extend([tag_start, end])
            else:
                close()
        close()

    def tensor(self, key: str, start: int, end: int) -> None:
        fields = list(_fields(self.buf, start, end))
        name = next((_text(self.buf, s, e) for n, w, _, s, e in fields if n == 8 and w == 2), "")
        dtype = next((_varint(self.buf, s, e)[0] for n, w, _, s, e in fields if n == 2 and w == 0), 0)
        dims: list[int] = []
        for n, w, _, s, e in fields:
            if n == 1 and w == 0:
                dims.append(_varint(self.buf, s, e)[0])
            elif n == 1 and w == 2:
                pos = s
                while pos < e:
                    value, pos = _varint(self.buf, pos, e)
                    dims.append(value)
        key = f"{key}:{name}" if name else key
        shape = tuple(dims)
        width, cls = _DTYPES.get(dtype, (1, CLS_INT))
        for number, wire, _, s, e in fields:
            if number == 9 and wire == 2:
                self.add(f"{key}:raw", s, e, Layout(KIND_FIXED, width, cls), shape)
        self.repeated(key, fields, 4, Layout(KIND_FIXED, 4, CLS_FLOAT), 5, shape)
        self.repeated(key, fields, 10, Layout(KIND_FIXED, 8, CLS_FLOAT), 1, shape)
        self.repeated(key, fields, 5, Layout(KIND_VARINT, 8, CLS_INT), 0, shape)
        self.repeated(key, fields, 7, Layout(KIND_VARINT, 8, CLS_INT), 0, shape)

    def attribute(self, key: str, start: int, end: int) -> None:
        fields = list(_fields(self.buf, start, end))
        name = next((_text(self.buf, s, e) for n, w, _, s, e in fields if n == 1 and w == 2), "")
        key = f"{key}.{name}"
        self.repeated(key, fields, 7, Layout(KIND_FIXED, 4, CLS_FLOAT), 5)
        self.repeated(key, fields, 8, Layout(KIND_VARINT, 8, CLS_INT), 0)
        counts: dict[int, int] = {}
        for number, wire, _, s, e in fields:
            if wire != 2 or number not in (5, 6, 10, 11):
                continue
            index = counts.get(number, 0)
            counts[number] = index + 1
            if number in (5, 10):
                self.tensor(f"{key}/t{index}", s, e)
            else:
                self.graph(f"{key}/g{index}", s, e)

    def node(self, key: str, start: int, end: int) -> None:
        fields = list(_fields(self.buf, start, end))
        name = next((_text(self.buf, s, e) for n, w, _, s, e in fields if n == 3 and w == 2), "")
        op = next((_text(self.buf, s, e) for n, w, _, s, e in fields if n == 4 and w == 2), "")
        # Key by name when there is one, else by op type and index among that op type, so
        # inserting an unrelated node does not unpair every later one.
        key = f"{key}/n:{name}" if name else f"{key}/{op}"
        for number, wire, _, s, e in fields:
            if number == 5 and wire == 2:
                self.attribute(key, s, e)

    def graph(self, key: str, start: int, end: int) -> None:
        for number, wire, _, s, e in _fields(self.buf, start, end):
            if wire != 2:
                continue
            if number == 1:
                self.node(key, s, e)
            elif number == 5:
                self.tensor(f"{key}/i", s, e)
            elif number == 15:
                for sub, sub_wire, _, ss, se in _fields(self.buf, s, e):
                    if sub in (1, 2) and sub_wire == 2:
                        self.tensor(f"{key}/s{sub}", ss, se)

    def model(self) -> list[Array]:
        for number, wire, _, s, e in _fields(self.buf, 0, len(self.buf)):
            if number == 7 and wire == 2:
                self.graph("g", s, e)
        return self.arrays


def find_arrays(model: bytes) -> list[Array]:
    """Numeric arrays of an ONNX model whose elements re-serialise to the same bytes,
    sorted by offset; [] for anything that is not ONNX."""
    try:
        arrays = _Walker(model).model()
    except (_NotProtobufError, RecursionError):
        return []
    kept: list[Array] = []
    for array in sorted(arrays, key=lambda a: a.offset):
        if kept and array.offset < kept[-1].offset + kept[-1].length:
            continue
        chunk = model[array.offset : array.offset + array.length]
        try:
            values = decode(chunk, array.layout)
        except ValueError:
            continue
        if encode(values, array.layout) != chunk:
            continue
        count = values.size
        dims = array.dims if array.dims and int(np.prod(array.dims)) == count else (count,)
        kept.append(Array(array.key, array.offset, array.length, array.layout, dims, count, values))
    return kept


# ------------------------------------------------------------------ residual transforms


def _ordered(bits: np.ndarray, width: int, cls: int) -> np.ndarray:
    """Unsigned integers whose order (and differences) follow the numbers': floats map
    sign-magnitude to offset binary (so the difference is the ULP distance)."""
    if cls != CLS_FLOAT:
        return bits
    sign = _UINT[width](1 << (8 * width - 1))
    return np.where(bits & sign, ~bits, bits | sign)


def _unordered(ordered: np.ndarray, width: int, cls: int) -> np.ndarray:
    if cls != CLS_FLOAT:
        return ordered
    sign = np.array(1 << (8 * width - 1), dtype=_UINT[width])
    return np.where(ordered & sign, ordered & ~sign, ~ordered)


def _zigzag(diff: np.ndarray, width: int) -> np.ndarray:
    signed = diff.view(_SINT[width])
    return ((signed << 1) ^ (signed >> (8 * width - 1))).view(_UINT[width])


def _unzigzag(zig: np.ndarray, width: int) -> np.ndarray:
    u = zig.astype(_UINT[width], copy=False)
    return (u >> _UINT[width](1)) ^ (-(u & _UINT[width](1)).view(_SINT[width])).view(_UINT[width])


def _scaled(old_bits: np.ndarray, width: int, scale: float) -> np.ndarray:
    floats = old_bits.view(_FLOAT[width]).astype(np.float64) * scale
    with np.errstate(over="ignore", invalid="ignore"):
        return floats.astype(_FLOAT[width]).view(_UINT[width])


def residual(transform: int, new: np.ndarray, pred: np.ndarray, width: int, cls: int,
             scale: float = 1.0, first_prev: int = 0) -> np.ndarray:
    """Residual of `new` given the prediction (old elements aligned to it, zeros where none)."""
    if transform in (T_RAW, T_DICT):
        return new
    if transform == T_XOR:
        return new ^ pred
    if transform == T_SCALE:
        pred = _scaled(pred, width, scale)
    if transform == T_PREV:
        pred = np.concatenate((np.array([first_prev], dtype=_UINT[width]), new[:-1]))
    with np.errstate(over="ignore"):
        diff = _ordered(new, width, cls) - _ordered(pred, width, cls)
    return _zigzag(diff, width)


def restore(transform: int, res: np.ndarray, pred: np.ndarray, width: int, cls: int,
            scale: float = 1.0, first_prev: int = 0) -> np.ndarray:
    if transform in (T_RAW, T_DICT):
        return res
    if transform == T_XOR:
        return res ^ pred
    diff = _unzigzag(res, width)
    if transform == T_PREV:
        # ordered(new[i]) = ordered(new[i-1]) + diff[i]: a running sum (mod 2^bits)
        start = _ordered(np.array([first_prev], dtype=_UINT[width]), width, cls)
        with np.errstate(over="ignore"):
            ordered = np.cumsum(np.concatenate((start, diff)), dtype=_UINT[width])[1:]
        return _unordered(ordered, width, cls)
    if transform == T_SCALE:
        pred = _scaled(pred, width, scale)
    with np.errstate(over="ignore"):
        return _unordered(_ordered(pred, width, cls) + diff, width, cls)


def planes(res: np.ndarray, width: int) -> bytes:
    return res.astype(_UINT[width], copy=False).view(np.uint8).reshape(-1, width).T.tobytes()


def unplanes(data: bytes, width: int) -> np.ndarray:
    raw = np.frombuffer(data, dtype=np.uint8)
    if raw.size % width:
        raise PatchError(f"{NAME}: residual is not a whole number of elements")
    return np.ascontiguousarray(raw.reshape(width, -1).T).view(_UINT[width]).reshape(-1)


# ------------------------------------------------------------------ alignment of old and new


def _row_plan(new_dims: tuple[int, ...], old_dims: tuple[int, ...]) -> tuple[int, int, tuple[int, ...]]:
    """(new row size, old row size, overlap inner dims) for the leading-dim split, where a
    'row' is one index of the first dimension. Same-rank shapes only; others -> no overlap."""
    new_row = int(np.prod(new_dims[1:])) if len(new_dims) > 1 else 1
    old_row = int(np.prod(old_dims[1:])) if len(old_dims) > 1 else 1
    inner = tuple(min(a, b) for a, b in zip(new_dims[1:], old_dims[1:], strict=True))
    return new_row, old_row, inner


def predict_rows(old_rows: np.ndarray, new_dims: tuple[int, ...], old_dims: tuple[int, ...],
                 rows: int, width: int) -> np.ndarray:
    """Prediction for `rows` leading rows of the new array, from the same rows of the old
    one (`old_rows` holds those of them that exist): the overlapping sub-block is copied,
    everything else is zero."""
    new_row, old_row, inner = _row_plan(new_dims, old_dims)
    pred = np.zeros(rows * new_row, dtype=_UINT[width])
    have = old_rows.size // old_row if old_row else 0
    if have == 0:
        return pred
    if new_dims[1:] == old_dims[1:]:
        pred[: have * new_row] = old_rows
        return pred
    sub = tuple(slice(0, m) for m in inner)
    shared_block = old_rows.reshape((have, *old_dims[1:]))[(slice(None), *sub)]
    pred.reshape((rows, *new_dims[1:]))[(slice(0, have), *sub)] = shared_block
    return pred


def _compatible(new_dims: tuple[int, ...], old_dims: tuple[int, ...]) -> bool:
    return len(new_dims) == len(old_dims) and len(new_dims) >= 1


def _chunks(dims: tuple[int, ...]) -> Iterator[tuple[int, int]]:
    """(first row, row count) of each chunk: whole leading rows, about CHUNK_ELEMENTS each."""
    row = int(np.prod(dims[1:])) if len(dims) > 1 else 1
    per = max(1, CHUNK_ELEMENTS // max(row, 1))
    total = dims[0] if dims else 0
    for first in range(0, total, per):
        yield first, min(per, total - first)


# ------------------------------------------------------------------ making


def _level(nbytes: int) -> int:
    return SMALL_LEVEL if nbytes <= LARGE_ARRAY_BYTES else LARGE_LEVEL


def _dict(dictionary: bytes) -> zstandard.ZstdCompressionDict | None:
    return zstandard.ZstdCompressionDict(dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT) if dictionary else None


def _compress(data: bytes, level: int, dictionary: bytes = b"") -> bytes:
    """A magicless zstd frame with its content size and no checksum: the table says what
    each frame is and the whole result is hashed, so magic and checksum would be 8 bytes
    of every frame spent twice."""
    params = zstandard.ZstdCompressionParameters.from_level(
        level, source_size=len(data) + len(dictionary),
        window_log=window_log_for(len(dictionary), len(data)) if dictionary else 0,
        enable_ldm=len(dictionary) > (8 << 20),
        format=zstandard.FORMAT_ZSTD1_MAGICLESS, write_checksum=0, write_content_size=1, write_dict_id=0)
    return zstandard.ZstdCompressor(compression_params=params, dict_data=_dict(dictionary)).compress(data)


def _decompressor(dictionary: bytes = b"") -> zstandard.ZstdDecompressor:
    return zstandard.ZstdDecompressor(dict_data=_dict(dictionary), max_window_size=2**31,
                                      format=zstandard.FORMAT_ZSTD1_MAGICLESS)


def _decompress(frame: bytes, size: int, dictionary: bytes = b"") -> bytes:
    """Exactly `size` bytes from one frame, or PatchError."""
    try:
        reader = _decompressor(dictionary).decompressobj()
        out = reader.decompress(frame)
        if not reader.eof or reader.unused_data or len(out) != size:
            raise PatchError(f"{NAME}: frame does not hold the {size} bytes the table says")
    except zstandard.ZstdError as exc:
        raise PatchError(f"{NAME}: corrupt frame: {exc}") from exc
    return out


def _plane_cost(res: np.ndarray, width: int) -> float:
    """Order-0 entropy of the residual's byte planes, in bytes: the ranking for arrays
    that go into the shared frame (compressing each candidate alone would rank frame
    overhead, not content)."""
    if res.size == 0:
        return 0.0
    cost = 0.0
    view = res.astype(_UINT[width], copy=False).view(np.uint8).reshape(-1, width)
    for k in range(width):
        counts = np.bincount(view[:, k], minlength=256)
        counts = counts[counts > 0]
        cost -= float((counts * np.log2(counts / res.size)).sum()) / 8
    return cost


def _scale_for(new: np.ndarray, old: np.ndarray, width: int) -> float | None:
    """The most common new/old ratio over the overlap, when it is not 1 (RF rescaling)."""
    n = min(new.size, old.size)
    if n < 8 or width not in _FLOAT:
        return None
    a = new[:n].view(_FLOAT[width]).astype(np.float64)
    b = old[:n].view(_FLOAT[width]).astype(np.float64)
    ok = np.isfinite(a) & np.isfinite(b) & (b != 0) & (a != 0)
    if ok.sum() < 8:
        return None
    ratios = np.round(a[ok] / b[ok], 6)
    values, counts = np.unique(ratios, return_counts=True)
    best = float(values[counts.argmax()])
    if counts.max() < ok.sum() // 4 or best == 1.0 or not np.isfinite(best):
        return None
    return best


def _candidates(array: Array, base: Array | None) -> list[tuple[int, float]]:
    layout = array.layout
    out: list[tuple[int, float]] = [(T_RAW, 1.0)]
    if layout.cls == CLS_INT or layout.kind == KIND_VARINT:
        out.append((T_PREV, 1.0))
    if base is None:
        return out
    out += [(T_SUB, 1.0)]
    if layout.cls == CLS_FLOAT:
        out.append((T_XOR, 1.0))
        assert base.values is not None and array.values is not None
        scale = _scale_for(array.values, base.values, layout.width)
        if scale is not None:
            out.append((T_SCALE, scale))
    if array.count * layout.width <= DICT_MAX_BYTES and base.count * layout.width <= DICT_MAX_BYTES:
        out.append((T_DICT, 1.0))
    return out


@dataclass
class _Coded:
    transform: int
    scale: float
    frames: list[tuple[int, bytes]]  # (rows, frame); empty when in the shared frame
    shared: bytes = b""  # the residual's byte planes, for the shared frame

    @property
    def size(self) -> int:
        return sum(len(f) + 4 for _, f in self.frames)


def _row(dims: tuple[int, ...]) -> int:
    return int(np.prod(dims[1:])) if len(dims) > 1 else 1


def _prediction(array: Array, base: Array | None, first: int, rows: int) -> np.ndarray:
    """The old elements aligned to new rows [first, first + rows) (zeros where none)."""
    width = array.layout.width
    if base is None or base.values is None:
        return np.zeros(rows * _row(array.dims), dtype=_UINT[width])
    old_row = _row(base.dims)
    old_rows = base.values[first * old_row : min(first + rows, base.dims[0]) * old_row] \
        if first < base.dims[0] else base.values[:0]
    return predict_rows(old_rows, array.dims, base.dims, rows, width)


def _cls(layout: Layout) -> int:
    return CLS_FLOAT if layout.cls == CLS_FLOAT else CLS_INT


def _code(array: Array, base: Array | None, transform: int, scale: float, level: int,
          limit_rows: int | None = None) -> _Coded:
    assert array.values is not None
    width, cls, dims = array.layout.width, _cls(array.layout), array.dims
    if transform == T_DICT:
        assert base is not None and base.values is not None
        values = array.values if limit_rows is None else array.values[: limit_rows * _row(dims)]
        frame = _compress(planes(values, width), level, planes(base.values, width))
        return _Coded(transform, scale, [(values.size // _row(dims), frame)])
    frames: list[tuple[int, bytes]] = []
    previous = 0
    spans = list(_chunks(dims)) if limit_rows is None else [(0, min(limit_rows, dims[0]))]
    for first, rows in spans:
        new = array.values[first * _row(dims) : (first + rows) * _row(dims)]
        res = residual(transform, new, _prediction(array, base, first, rows), width, cls, scale, previous)
        frames.append((rows, _compress(planes(res, width), level)))
        previous = int(new[-1])
    return _Coded(transform, scale, frames)


def _best(array: Array, base: Array | None, shared: bool) -> _Coded:
    assert array.values is not None
    candidates = _candidates(array, base)
    width, cls = array.layout.width, _cls(array.layout)
    if shared:
        pred = _prediction(array, base, 0, array.dims[0])
        # The shared frame has the old arrays' planes as dictionary, so a candidate's cost
        # is its size coded against its own base (raw trees find the old trees' bytes)
        dictionary = planes(base.values, width) if base is not None and base.values is not None else b""
        best = None
        for transform, scale in candidates:
            if transform == T_DICT:
                continue
            res = residual(transform, array.values, pred, width, cls, scale)
            cost = len(_compress(planes(res, width), 3, dictionary)) if dictionary else _plane_cost(res, width)
            if best is None or cost < best[0]:
                best = (cost, transform, scale, res)
        assert best is not None
        return _Coded(best[1], best[2], [], planes(best[3], width))
    level = _level(array.count * width)
    if len(candidates) > 1:
        # rank on leading rows at a fast level, then code only the winner at `level`
        sample_rows = max(1, SAMPLE_ELEMENTS // max(_row(array.dims), 1))
        candidates = sorted(candidates, key=lambda c: _code(array, base, c[0], c[1], 3, sample_rows).size)[:1]
    transform, scale = candidates[0]
    return _code(array, base, transform, scale, level)


def _without(data: bytes, spans: list[tuple[int, int]]) -> bytes:
    parts = []
    pos = 0
    for offset, length in sorted(spans):
        parts.append(data[pos:offset])
        pos = offset + length
    parts.append(data[pos:])
    return b"".join(parts)


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()[:HASH_BYTES]


def make(old: bytes, new: bytes) -> bytes:
    new_arrays = find_arrays(new)
    body = _make_body(old, new, find_arrays(old), new_arrays)
    if new_arrays and len(new) < TRY_PLAIN_BELOW:
        body = min(body, _make_body(old, new, [], []), key=len)
    out = bytearray(MAGIC)
    put_varint(out, len(old))
    out += _digest(old)
    put_varint(out, len(new))
    out += _digest(new)
    return bytes(out) + body


def _put_dims(out: bytearray, dims: tuple[int, ...]) -> None:
    put_varint(out, len(dims))
    for d in dims:
        put_varint(out, d)


def _make_body(old: bytes, new: bytes, old_arrays: list[Array], new_arrays: list[Array]) -> bytes:
    old_by_key = {a.key: a for a in old_arrays}
    table = bytearray()
    put_varint(table, len(new_arrays))
    payload = bytearray()
    rest: list[bytes] = []
    used_old: list[tuple[int, int]] = []
    shared: dict[int, list[bytes]] = {}  # width -> residual planes of each shared array
    shared_dict: dict[int, list[bytes]] = {}  # width -> planes of each one's old array
    shared_bytes = 0
    pos = 0
    for array in new_arrays:
        base = old_by_key.get(array.key)
        if base is not None and (base.layout != array.layout or not _compatible(array.dims, base.dims)):
            base = None
        nbytes = array.count * array.layout.width
        in_shared = nbytes <= SMALL_ARRAY_BYTES and shared_bytes + nbytes <= SHARED_MAX_BYTES
        coded = _best(array, base, in_shared)
        if coded.transform in (T_RAW, T_PREV) and not in_shared:
            base = None  # its bytes stay in the rest stream's dictionary
        rest.append(new[pos : array.offset])
        layout = array.layout
        for value in (array.offset - pos, layout.kind, layout.width, layout.cls, len(layout.tag)):
            put_varint(table, value)
        table += layout.tag
        put_varint(table, array.count)
        _put_dims(table, array.dims)
        put_varint(table, coded.transform)
        if base is None:
            put_varint(table, 0)
        else:
            used_old.append((base.offset, base.length))
            put_varint(table, base.offset + 1)
            put_varint(table, base.length)
            _put_dims(table, base.dims)
        if coded.transform == T_SCALE:
            table += np.float64(coded.scale).tobytes()
        put_varint(table, len(coded.frames))  # 0: in the shared frame
        if in_shared:
            shared.setdefault(layout.width, []).append(coded.shared)
            shared_dict.setdefault(layout.width, []).append(
                planes(base.values, layout.width) if base is not None and base.values is not None else b"")
            shared_bytes += nbytes
        for rows, frame in coded.frames:
            put_varint(payload, rows)
            put_varint(payload, len(frame))
            payload += frame
        pos = array.offset + array.length
    rest.append(new[pos:])
    rest_data = b"".join(rest)
    rest_frame = _compress(rest_data, REST_LEVEL, _without(old, used_old))
    body = bytearray(table)
    put_varint(body, len(rest_data))
    put_varint(body, len(rest_frame))
    body += rest_frame
    shared_data = b"".join(_shared_planes(shared[w], w) for w in sorted(shared))
    dictionary = b"".join(_shared_planes(shared_dict[w], w) for w in sorted(shared_dict))
    shared_frame = _compress(shared_data, SMALL_LEVEL, dictionary) if shared_data else b""
    put_varint(body, len(shared_frame))
    body += shared_frame
    body += payload
    return bytes(body)


def _shared_planes(arrays: list[bytes], width: int) -> bytes:
    """Plane k of every array of this width, then plane k + 1...: like bytes together."""
    parts = []
    for k in range(width):
        for data in arrays:
            n = len(data) // width
            parts.append(data[k * n : (k + 1) * n])
    return b"".join(parts)


# ------------------------------------------------------------------ applying (streaming)


class _OldFile:
    """Random access to the old model by offset, without holding it."""

    def __init__(self, source: BinaryIO, size: int) -> None:
        self.source = source
        self.size = size

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise PatchError(f"{NAME}: base region lies outside the old model")
        self.source.seek(offset)
        data = self.source.read(length)
        if len(data) != length:
            raise PatchError(f"{NAME}: old model is shorter than its declared size")
        return data

    def without(self, spans: list[tuple[int, int]]) -> bytes:
        parts = []
        pos = 0
        for offset, length in spans:
            parts.append(self.read(pos, offset - pos))
            pos = offset + length
        parts.append(self.read(pos, self.size - pos))
        return b"".join(parts)


class _DeltaStream(Reader):
    """Reads the delta sequentially from a file object: only the current piece is held."""

    def __init__(self, source: BinaryIO) -> None:
        super().__init__(b"", NAME)
        self.source = source

    def _fill(self, n: int) -> None:
        if self.pos + n <= len(self.data):
            return
        need = self.pos + n - len(self.data)
        more = self.source.read(max(need, 1 << 16))
        self.data = self.data[self.pos :] + more
        self.pos = 0

    def varint(self, limit: int = 2**63) -> int:
        self._fill(10)
        return super().varint(limit)

    def take(self, length: int) -> bytes:
        if length < 0:
            raise self.fail("negative length")
        if length > MAX_OUTPUT_BYTES:
            raise self.fail("piece larger than any model")
        self._fill(length)
        return super().take(length)

    def done(self) -> None:
        self._fill(1)
        if self.pos != len(self.data):
            raise self.fail("unexpected trailing bytes")


@dataclass
class _Entry:
    gap: int
    layout: Layout
    count: int
    dims: tuple[int, ...]
    transform: int
    base_offset: int
    base_length: int
    base_dims: tuple[int, ...]
    scale: float
    frames: int


def _read_dims(reader: Reader, limit: int) -> tuple[int, ...]:
    rank = reader.varint(16)
    dims = tuple(reader.varint(limit) for _ in range(rank))
    if not dims:
        raise reader.fail("array without a shape")
    return dims


def _read_table(reader: Reader, old_size: int, new_size: int) -> list[_Entry]:
    entries = []
    covered = 0
    for _ in range(reader.varint(new_size)):
        gap = reader.varint(new_size)
        kind = reader.varint(1)
        width = reader.varint(8)
        cls = reader.varint(1)
        tag = reader.take(reader.varint(4))
        if width not in _UINT or (kind == KIND_VARINT and width != 8):
            raise reader.fail("bad element width")
        layout = Layout(kind, width, cls, tag)
        count = reader.varint(new_size)
        dims = _read_dims(reader, new_size)
        if int(np.prod(dims, dtype=object)) != count or count == 0:
            raise reader.fail("shape does not match the element count")
        transform = reader.varint(len(TRANSFORMS) - 1)
        base_offset = reader.varint(old_size) - 1
        base_length, base_dims = 0, dims
        if base_offset >= 0:
            base_length = reader.varint(old_size)
            base_dims = _read_dims(reader, old_size)
            if base_offset + base_length > old_size:
                raise reader.fail("base region lies outside the old model")
            if len(base_dims) != len(dims):
                raise reader.fail("base of another rank")
            if layout.kind == KIND_FIXED and int(np.prod(base_dims, dtype=object)) * (width + len(tag)) != base_length:
                raise reader.fail("base shape does not match its length")
        elif transform not in (T_RAW, T_PREV):
            raise reader.fail("transform needs a base")
        scale = float(np.frombuffer(reader.take(8), dtype=np.float64)[0]) if transform == T_SCALE else 1.0
        frames = reader.varint(new_size)
        if transform == T_DICT and frames != 1:
            raise reader.fail("a dictionary-coded array is one frame")
        stride = len(tag) + (width if kind == KIND_FIXED else 1)
        covered += gap + count * stride
        if covered > new_size:  # refuse before allocating what a corrupt table asks for
            raise reader.fail("arrays extend past the declared size")
        entries.append(_Entry(gap, layout, count, dims, transform, base_offset, base_length,
                              base_dims, scale, frames))
    return entries


class _HashingWriter:
    def __init__(self, out: BinaryIO, limit: int) -> None:
        self.out = out
        self.hash = hashlib.sha256()
        self.size = 0
        self.limit = limit

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise PatchError(f"{NAME}: result longer than the declared size")
        self.hash.update(data)
        self.out.write(data)


class _Shared:
    """The shared frame's planes, consumed array by array in table order."""

    def __init__(self, data: bytes, entries: list[_Entry]) -> None:
        totals: dict[int, int] = {}
        for e in entries:
            if e.frames == 0:
                totals[e.layout.width] = totals.get(e.layout.width, 0) + e.count
        if sum(w * n for w, n in totals.items()) != len(data):
            raise PatchError(f"{NAME}: shared frame does not match the table")
        self.data = data
        self.bases: Iterator[np.ndarray | None] = iter(())
        self.start: dict[int, int] = {}
        self.total = totals
        self.cursor = dict.fromkeys(totals, 0)
        pos = 0
        for width in sorted(totals):
            self.start[width] = pos
            pos += width * totals[width]

    def take(self, width: int, count: int) -> np.ndarray:
        at, n = self.cursor[width], self.total[width]
        base = self.start[width]
        planes_ = [self.data[base + k * n + at : base + k * n + at + count] for k in range(width)]
        self.cursor[width] = at + count
        return unplanes(b"".join(planes_), width)


def _read_exact(stream: zstandard.ZstdDecompressionReader, n: int) -> bytes:
    parts = []
    while n > 0:
        chunk = stream.read(n)
        if not chunk:
            raise PatchError(f"{NAME}: arrays do not match the rest stream")
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def apply_stream(old: BinaryIO, delta: BinaryIO, out: BinaryIO) -> None:
    """Apply a delta read from `delta` to the model in `old` (seekable), writing the new
    model to `out` front to back. Raises PatchError on anything wrong; `out` then holds
    partial output the caller must discard (`apply_delta_file` does)."""
    reader = _DeltaStream(delta)
    if reader.take(len(MAGIC)) != MAGIC:
        raise PatchError(f"{NAME}: not a {NAME} delta (bad magic)")
    old_size = reader.varint(MAX_OUTPUT_BYTES)
    old_digest = reader.take(HASH_BYTES)
    new_size = reader.varint(MAX_OUTPUT_BYTES)
    new_digest = reader.take(HASH_BYTES)
    old.seek(0, io.SEEK_END)
    if old.tell() != old_size:
        raise PatchError(f"{NAME}: delta was made for a different base model")
    old.seek(0)
    digest = hashlib.sha256()
    for piece in iter(lambda: old.read(1 << 20), b""):
        digest.update(piece)
    if digest.digest()[:HASH_BYTES] != old_digest:
        raise PatchError(f"{NAME}: delta was made for a different base model")
    base = _OldFile(old, old_size)

    entries = _read_table(reader, old_size, new_size)
    spans = sorted((e.base_offset, e.base_length) for e in entries if e.base_offset >= 0)
    if any(a + n > b for (a, n), (b, _) in itertools.pairwise(spans)):
        raise PatchError(f"{NAME}: overlapping base regions")
    rest_size = reader.varint(new_size)
    rest_frame = reader.take(reader.varint(MAX_OUTPUT_BYTES))
    shared_frame = reader.take(reader.varint(MAX_OUTPUT_BYTES))
    shared_size = sum(e.count * e.layout.width for e in entries if e.frames == 0)
    if shared_size > SHARED_MAX_BYTES:
        raise reader.fail("shared frame larger than the format allows")
    shared_bases = [_base_values(e, base) for e in entries if e.frames == 0]
    by_width: dict[int, list[bytes]] = {}
    for e, values in zip((e for e in entries if e.frames == 0), shared_bases, strict=True):
        by_width.setdefault(e.layout.width, []).append(b"" if values is None else planes(values, e.layout.width))
    dictionary = b"".join(_shared_planes(by_width[w], w) for w in sorted(by_width))
    shared = _Shared(_decompress(shared_frame, shared_size, dictionary) if shared_frame else b"", entries)
    shared.bases = iter(shared_bases)
    writer = _HashingWriter(out, new_size)
    try:
        rest = _decompressor(base.without(spans)).stream_reader(rest_frame, read_across_frames=False)
        for entry in entries:
            writer.write(_read_exact(rest, entry.gap))
            _apply_array(entry, reader, base, writer, shared)
        writer.write(_read_exact(rest, rest_size - rest.tell()) if rest_size >= rest.tell() else b"")
        if rest.tell() != rest_size or rest.read(1):
            raise PatchError(f"{NAME}: rest stream longer than the table says")
    except zstandard.ZstdError as exc:
        raise PatchError(f"{NAME}: corrupt rest stream: {exc}") from exc
    reader.done()
    if writer.size != new_size or writer.hash.digest()[:HASH_BYTES] != new_digest:
        raise PatchError(f"{NAME}: patched result does not match the delta's sha256")


def _apply_array(entry: _Entry, reader: Reader, base: _OldFile, writer: _HashingWriter,
                 shared: _Shared) -> None:
    layout = entry.layout
    width, cls = layout.width, _cls(layout)
    row, old_row = _row(entry.dims), _row(entry.base_dims)
    old_values: np.ndarray | None = None
    if entry.frames == 0:
        old_values = next(shared.bases)
    elif entry.base_offset >= 0 and (entry.frames == 1 or layout.kind == KIND_VARINT or layout.tag):
        # dictionary, varint or tagged bases are decoded whole (not addressable by
        # element); large fixed-width ones are read row by row
        old_values = _base_values(entry, base)

    def prediction(first: int, rows: int) -> np.ndarray:
        if entry.base_offset < 0:
            return np.zeros(rows * row, dtype=_UINT[width])
        have = max(0, min(first + rows, entry.base_dims[0]) - first)
        if old_values is not None:
            old_rows = old_values[first * old_row : (first + have) * old_row]
        else:
            old_rows = np.frombuffer(
                base.read(entry.base_offset + first * old_row * width, have * old_row * width),
                dtype=_UINT[width])
        return predict_rows(old_rows, entry.dims, entry.base_dims, rows, width)

    if entry.frames == 0:
        res = shared.take(width, entry.count)
        writer.write(encode(restore(entry.transform, res, prediction(0, entry.dims[0]), width, cls,
                                    entry.scale), layout))
        return
    if entry.transform == T_DICT:
        assert old_values is not None
        rows = reader.varint(entry.dims[0])
        frame = reader.take(reader.varint(MAX_OUTPUT_BYTES))
        if rows != entry.dims[0]:
            raise reader.fail("dictionary-coded frame must cover the array")
        values = unplanes(_decompress(frame, entry.count * width, planes(old_values, width)), width)
        writer.write(encode(values, layout))
        return
    first = previous = 0
    for _ in range(entry.frames):
        rows = reader.varint(entry.dims[0])
        frame = reader.take(reader.varint(MAX_OUTPUT_BYTES))
        if rows == 0 or first + rows > entry.dims[0]:
            raise reader.fail("frames do not tile the array's rows")
        res = unplanes(_decompress(frame, rows * row * width), width)
        values = restore(entry.transform, res, prediction(first, rows), width, cls, entry.scale, previous)
        previous = int(values[-1])
        writer.write(encode(values, layout))
        first += rows
    if first != entry.dims[0]:
        raise PatchError(f"{NAME}: frames do not cover the array")


def _base_values(entry: _Entry, base: _OldFile) -> np.ndarray | None:
    if entry.base_offset < 0:
        return None
    old_count = int(np.prod(entry.base_dims, dtype=object))
    return _decode_checked(base.read(entry.base_offset, entry.base_length), entry.layout, old_count)


def _decode_checked(data: bytes, layout: Layout, count: int) -> np.ndarray:
    try:
        values = decode(data, layout)
    except ValueError as exc:
        raise PatchError(f"{NAME}: base array cannot be decoded: {exc}") from exc
    if values.size != count:
        raise PatchError(f"{NAME}: base array has the wrong number of elements")
    return values


# ------------------------------------------------------------------ in-memory API


def apply(old: bytes, delta: bytes) -> bytes:
    out = io.BytesIO()
    apply_stream(io.BytesIO(old), io.BytesIO(delta), out)
    return out.getvalue()
