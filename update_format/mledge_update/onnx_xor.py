"""`onnx-xor-planes`: a delta codec that knows where an ONNX model keeps its numbers.

Retraining changes almost every weight a little, so byte-matching diffs (bsdiff4) find
nothing to reuse. This codec instead:

1. walks both files' protobuf (ModelProto -> graph -> initializers, node attributes,
   subgraphs) just far enough to find the numeric arrays: tensor `raw_data`,
   `float_data`, `double_data`, and attribute `floats` (packed, or unpacked runs whose
   5-byte stride is "tag + float"), each keyed by where it lives (graph path, tensor
   or node and attribute name);
2. pairs each array of the new model with the same-keyed, same-sized array of the old
   one and XORs their bits (unpaired arrays XOR with zeros): close floats share sign,
   exponent and high mantissa bits, so the XOR is mostly zero bytes;
3. splits every XORed array into byte planes (byte k of each element) and compresses
   each plane stream separately with zstd;
4. compresses the rest of the new file (protobuf structure, names, metadata) with zstd
   using the old file (without the paired arrays) as dictionary.

The delta lists each array's place and its base's offset in the old file, so applying it
needs no protobuf parsing at all. Inputs that are not ONNX (or not parseable) simply have
no arrays: the codec then degrades to zstd-patch, never to an error.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise

from ._wire import (
    Reader,
    apply_envelope,
    put_varint,
    write_envelope,
    zstd_compress,
    zstd_decompress_checked,
    zstd_decompressor,
)
from .errors import PatchError

NAME = "onnx-xor-planes"
MAGIC = b"MXP1"
REST_LEVEL = 19
PLANE_LEVEL = 19
# Arrays shorter than this stay in the "rest" stream: not worth a region entry.
MIN_REGION_BYTES = 32
MAX_WIDTH = 16

# TensorProto.data_type -> element width in bytes, for raw_data.
_DTYPE_WIDTH = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}


# ------------------------------------------------------------------ minimal protobuf walk


class _NotProtobufError(Exception):
    """The bytes are not the protobuf shape we expect; the codec then uses no regions."""


@dataclass(frozen=True)
class Region:
    key: str
    offset: int
    length: int
    width: int


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if pos >= end or shift > 63:
            raise _NotProtobufError
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, tag start, value start, value end) of each field."""
    pos = start
    while pos < end:
        tag_start = pos
        tag, pos = _varint(buf, pos, end)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise _NotProtobufError
        if wire == 0:
            _, value_end = _varint(buf, pos, end)
        elif wire == 1:
            value_end = pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            value_end = pos + length
        elif wire == 5:
            value_end = pos + 4
        else:  # groups (3, 4) are not used by ONNX
            raise _NotProtobufError
        if value_end > end:
            raise _NotProtobufError
        yield number, wire, tag_start, pos, value_end
        pos = value_end


def _text(buf: bytes, start: int, end: int) -> str:
    return buf[start:end].decode("utf-8", "replace")


class _Walker:
    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.regions: list[Region] = []
        self.seen: dict[str, int] = {}

    def add(self, key: str, offset: int, length: int, width: int) -> None:
        if length < MIN_REGION_BYTES or length % width:
            return
        count = self.seen.get(key, 0)
        self.seen[key] = count + 1
        self.regions.append(Region(key if not count else f"{key}#{count}", offset, length, width))

    def repeated_fixed(self, key: str, fields: list[tuple[int, int, int, int, int]], number: int) -> None:
        """Packed (wire 2) or unpacked (runs of wire 5/1, stride tag + value) numbers."""
        run_start = run_end = -1
        run_width = 0
        for field_number, wire, tag_start, start, end in [*fields, (0, 0, -1, -1, -1)]:
            if field_number == number and wire == 2:
                width = 8 if number == 10 else 4  # double_data is the only 8-byte one here
                self.add(f"{key}:p{number}", start, end - start, width)
                continue
            stride = end - tag_start
            if field_number == number and wire in (1, 5) and tag_start == run_end and stride == run_width:
                run_end = end
                continue
            if run_start >= 0:
                self.add(f"{key}:u{number}", run_start, run_end - run_start, run_width)
            continues = field_number == number and wire in (1, 5)
            run_start, run_end, run_width = (tag_start, end, stride) if continues else (-1, -1, 0)

    def tensor(self, key: str, start: int, end: int) -> None:
        fields = list(_fields(self.buf, start, end))
        name = next((_text(self.buf, s, e) for n, w, _, s, e in fields if n == 8 and w == 2), "")
        dtype = next((_varint(self.buf, s, e)[0] for n, w, _, s, e in fields if n == 2 and w == 0), 0)
        key = f"{key}:{name}" if name else key
        for number, wire, _, s, e in fields:
            if number == 9 and wire == 2:
                self.add(f"{key}:raw", s, e - s, _DTYPE_WIDTH.get(dtype, 1))
        self.repeated_fixed(key, fields, 4)
        self.repeated_fixed(key, fields, 10)

    def attribute(self, key: str, start: int, end: int) -> None:
        fields = list(_fields(self.buf, start, end))
        name = next((_text(self.buf, s, e) for n, w, _, s, e in fields if n == 1 and w == 2), "")
        key = f"{key}.{name}"
        self.repeated_fixed(key, fields, 7)
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
        key = f"{key}/n:{name}" if name else key
        for number, wire, _, s, e in fields:
            if number == 5 and wire == 2:
                self.attribute(key, s, e)

    def graph(self, key: str, start: int, end: int) -> None:
        node_index = 0
        for number, wire, _, s, e in _fields(self.buf, start, end):
            if wire != 2:
                continue
            if number == 1:
                self.node(f"{key}/n{node_index}", s, e)
                node_index += 1
            elif number == 5:
                self.tensor(f"{key}/i", s, e)
            elif number == 15:  # SparseTensorProto: values (1), indices (2)
                for sub, sub_wire, _, ss, se in _fields(self.buf, s, e):
                    if sub in (1, 2) and sub_wire == 2:
                        self.tensor(f"{key}/s{sub}", ss, se)

    def model(self) -> list[Region]:
        for number, wire, _, s, e in _fields(self.buf, 0, len(self.buf)):
            if number == 7 and wire == 2:
                self.graph("g", s, e)
        return self.regions


def numeric_regions(model: bytes) -> list[Region]:
    """The numeric arrays of an ONNX model, sorted by offset; [] when it is not ONNX."""
    try:
        regions = _Walker(model).model()
    except (_NotProtobufError, RecursionError):
        return []
    regions.sort(key=lambda r: r.offset)
    # Keep only non-overlapping regions (nested ones cannot occur, but be safe).
    kept: list[Region] = []
    for region in regions:
        if not kept or region.offset >= kept[-1].offset + kept[-1].length:
            kept.append(region)
    return kept


# ------------------------------------------------------------------ the codec


def _xor(a: bytes, b: bytes) -> bytes:
    # Python's big integers XOR at C speed; no numpy on Lambda/devices.
    n = len(a)
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(n, "little")


def _without(data: bytes, spans: list[tuple[int, int]]) -> bytes:
    """`data` with the given (offset, length) spans cut out; spans sorted, disjoint."""
    parts = []
    pos = 0
    for offset, length in spans:
        parts.append(data[pos:offset])
        pos = offset + length
    parts.append(data[pos:])
    return b"".join(parts)


# Below this size the maker also tries the plain layout (no regions: zstd with the old
# model as dictionary) and keeps the smaller; per-plane frame headers cost more than
# they save on a model of a few kB.
TRY_BOTH_BELOW = 1 << 20


def make(old: bytes, new: bytes) -> bytes:
    new_regions = numeric_regions(new)
    body = _make_body(old, new, numeric_regions(old), new_regions)
    if new_regions and len(new) < TRY_BOTH_BELOW:
        plain = _make_body(old, new, [], [])
        body = min(body, plain, key=len)
    return write_envelope(MAGIC, old, new, body)


def _make_body(old: bytes, new: bytes, old_regions: list[Region], new_regions: list[Region]) -> bytes:
    old_by_key = {r.key: r for r in old_regions}
    body = bytearray()
    put_varint(body, len(new_regions))
    streams: dict[tuple[int, int], list[bytes]] = {}
    rest: list[bytes] = []
    paired_old: list[tuple[int, int]] = []
    pos = 0
    for region in new_regions:
        base = old_by_key.get(region.key)
        if base is not None and (base.length, base.width) != (region.length, region.width):
            base = None
        values = new[region.offset : region.offset + region.length]
        if base is not None:
            values = _xor(values, old[base.offset : base.offset + base.length])
            paired_old.append((base.offset, base.length))
        rest.append(new[pos : region.offset])
        put_varint(body, region.offset - pos)
        put_varint(body, region.length)
        put_varint(body, region.width)
        put_varint(body, base.offset + 1 if base is not None else 0)
        for plane in range(region.width):
            streams.setdefault((region.width, plane), []).append(values[plane :: region.width])
        pos = region.offset + region.length
    rest.append(new[pos:])
    put_varint(body, len(streams))
    for (width, plane), chunks in streams.items():
        frame = zstd_compress(b"".join(chunks), level=PLANE_LEVEL)
        for value in (width, plane, len(frame)):
            put_varint(body, value)
        body += frame
    paired_old.sort()
    rest_frame = zstd_compress(
        b"".join(rest), level=REST_LEVEL, dictionary=_without(old, paired_old), long_window=True
    )
    put_varint(body, len(rest_frame))
    body += rest_frame
    return bytes(body)


def _apply_body(old: bytes, body: bytes, new_size: int) -> bytes:
    reader = Reader(body, NAME)
    regions: list[tuple[int, int, int, int]] = []
    covered = 0
    for _ in range(reader.varint(new_size)):
        gap = reader.varint(new_size)
        length = reader.varint(new_size)
        covered += gap + length
        if covered > new_size:  # refuse before allocating anything a corrupt table asks for
            raise reader.fail("regions extend past the declared size")
        width = reader.varint(MAX_WIDTH)
        base = reader.varint(len(old)) - 1
        if width == 0 or length % width:
            raise reader.fail("region length is not a multiple of its width")
        if base >= 0 and base + length > len(old):
            raise reader.fail("region base lies outside the old model")
        regions.append((gap, length, width, base))
    streams: dict[tuple[int, int], bytes] = {}
    for _ in range(reader.varint(2 * MAX_WIDTH * MAX_WIDTH)):
        width = reader.varint(MAX_WIDTH)
        plane = reader.varint(MAX_WIDTH)
        frame = reader.take(reader.varint(len(body)))
        streams[(width, plane)] = zstd_decompress_checked(frame, max_size=new_size, what=NAME)
    rest_frame = reader.take(reader.varint(len(body)))
    reader.done()

    paired_old = sorted((base, length) for _, length, _, base in regions if base >= 0)
    if any(a + n > b for (a, n), (b, _) in pairwise(paired_old)):
        raise PatchError(f"{NAME}: overlapping base regions")
    rest = zstd_decompress_checked(
        rest_frame, max_size=new_size, what=NAME, decompressor=zstd_decompressor(_without(old, paired_old))
    )

    out = bytearray()
    cursors: dict[tuple[int, int], int] = {}
    rest_pos = 0
    for gap, length, width, base in regions:
        if rest_pos + gap > len(rest):
            raise PatchError(f"{NAME}: regions do not match the rest stream")
        out += rest[rest_pos : rest_pos + gap]
        rest_pos += gap
        values = bytearray(length)
        count = length // width
        for plane in range(width):
            stream = streams.get((width, plane))
            at = cursors.get((width, plane), 0)
            if stream is None or at + count > len(stream):
                raise PatchError(f"{NAME}: plane stream {width}/{plane} is too short")
            values[plane::width] = stream[at : at + count]
            cursors[(width, plane)] = at + count
        if base >= 0:
            values = bytearray(_xor(bytes(values), old[base : base + length]))
        out += values
        if len(out) > new_size:
            raise PatchError(f"{NAME}: result longer than the declared size")
    out += rest[rest_pos:]
    if any(cursors.get(key, 0) != len(stream) for key, stream in streams.items()):
        raise PatchError(f"{NAME}: unused bytes in a plane stream")
    return bytes(out)


def apply(old: bytes, delta: bytes) -> bytes:
    return apply_envelope(MAGIC, NAME, old, delta, _apply_body)
