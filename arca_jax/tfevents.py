"""TensorBoard event files, written and read without TensorFlow, torch or tensorboardX.

An event file is a sequence of TFRecord records (u64 length, u32 masked CRC-32C of the length,
the payload, u32 masked CRC-32C of the payload), each payload a serialized `tensorflow.Event`
protobuf. The run log needs three messages of it, encoded here by hand in protobuf's wire format:

    Event          1: wall_time (double)   2: step (int64)   3: file_version (string)
                   5: summary (Summary)
    Summary        1: value (repeated Value)
    Summary.Value  1: tag (string)         2: simple_value (float)

Fields are written in field order with proto3's defaults left out, byte for byte what the
protobuf library writes for the same messages; the reader skips any other field. Importing
tensorboardX for this cost ~8 s per process where torch is installed (it imports torch).
"""

from __future__ import annotations

import glob
import os
import socket
import struct
import time
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

from arca_jax.rundir import LogWriteError


# --------------------------------------------------------------------------------------------
# CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), masked as TFRecord does
# --------------------------------------------------------------------------------------------


def _crc_table() -> List[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# --------------------------------------------------------------------------------------------
# protobuf wire format: the few messages above
# --------------------------------------------------------------------------------------------

_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64: two's complement, ten bytes
    out = bytearray()
    while True:
        bits = n & 0x7F
        n >>= 7
        if n:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _bytes_field(field: int, payload: bytes) -> bytes:
    return _key(field, _BYTES) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int = 0, file_version: str = "",
                 scalars: Optional[Dict[str, float]] = None) -> bytes:
    """A serialized `Event`; `scalars` (tag -> value) become its summary's simple values."""
    out = b""
    if wall_time:
        out += _key(1, _FIXED64) + struct.pack("<d", wall_time)
    if step:
        out += _key(2, _VARINT) + _varint(int(step))
    if file_version:
        out += _bytes_field(3, file_version.encode())
    if scalars is not None:
        summary = b"".join(
            _bytes_field(1, _bytes_field(1, tag.encode())
                         + _key(2, _FIXED32) + struct.pack("<f", float(value)))
            for tag, value in scalars.items())
        out += _bytes_field(5, summary)
    return out


def _fields(data: bytes) -> Iterator[Tuple[int, int, object]]:
    """(field, wire type, value) of a message: ints for varints, bytes for the others."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _read_varint(data, pos)
        elif wire == _FIXED64:
            value, pos = data[pos:pos + 8], pos + 8
        elif wire == _FIXED32:
            value, pos = data[pos:pos + 4], pos + 4
        elif wire == _BYTES:
            length, pos = _read_varint(data, pos)
            value, pos = data[pos:pos + length], pos + length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(data):
            raise ValueError("truncated protobuf message")
        yield field, wire, value


def _read_varint(data: bytes, pos: int) -> Tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


class Event(NamedTuple):
    """The parts of a decoded `Event` the run log reads; `scalars` is None without a summary."""
    wall_time: float
    step: int
    file_version: str
    scalars: Optional[List[Tuple[str, float]]]


def decode_event(payload: bytes) -> Event:
    wall_time, step, version, scalars = 0.0, 0, "", None
    for field, wire, value in _fields(payload):
        if field == 1 and wire == _FIXED64:
            wall_time = struct.unpack("<d", value)[0]
        elif field == 2 and wire == _VARINT:
            step = value - (1 << 64) if value >= 1 << 63 else value
        elif field == 3 and wire == _BYTES:
            version = value.decode()
        elif field == 5 and wire == _BYTES:
            scalars = scalars or []
            for vfield, vwire, raw in _fields(value):
                if vfield != 1 or vwire != _BYTES:
                    continue
                tag, simple = "", None
                for f, w, v in _fields(raw):
                    if f == 1 and w == _BYTES:
                        tag = v.decode()
                    elif f == 2 and w == _FIXED32:
                        simple = struct.unpack("<f", v)[0]
                if simple is not None:
                    scalars.append((tag, simple))
    return Event(wall_time, step, version, scalars)


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------


def frame(payload: bytes) -> bytes:
    """One TFRecord record around `payload`."""
    header = struct.pack("<Q", len(payload))
    return (header + struct.pack("<I", masked_crc32c(header)) + payload
            + struct.pack("<I", masked_crc32c(payload)))


class EventFile:
    """A TensorBoard event file written synchronously: one record per call, flushed at once (as
    the JSON lines; tensorboardX's writer queues events in a thread that its flush() does not
    drain, so a killed process lost scalars of steps its checkpoint held)."""

    def __init__(self, tb_dir: str):
        os.makedirs(tb_dir, exist_ok=True)
        name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(tb_dir, name)
        try:
            self._file = open(self.path, "ab")
        except OSError as e:
            raise LogWriteError(self.path, e) from e
        self._write(encode_event(time.time(), file_version="brain.Event:2"))

    def _write(self, payload: bytes) -> None:
        try:
            self._file.write(frame(payload))
            self._file.flush()
        except OSError as e:
            raise LogWriteError(self.path, e) from e

    def scalars(self, step: int, values: Dict[str, float]) -> None:
        """One event holding `values` (tag -> number) at `step`."""
        if values:
            self._write(encode_event(time.time(), step=int(step), scalars=values))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class Scalar(NamedTuple):
    tag: str
    step: int
    value: float


def records(path: str) -> Iterator[Tuple[bytes, bytes]]:
    """The records of an event file: (the record with its framing, its payload); stops at a
    torn or corrupted record (length or CRC wrong)."""
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos + 12 <= len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        end = pos + 12 + length + 4
        if end > len(data) or struct.unpack("<I", data[pos + 8:pos + 12])[0] != masked_crc32c(header):
            break
        payload = data[pos + 12:pos + 12 + length]
        if struct.unpack("<I", data[end - 4:end])[0] != masked_crc32c(payload):
            break
        yield data[pos:end], payload
        pos = end


def event_files(tb_dir: str) -> List[str]:
    return sorted(glob.glob(os.path.join(tb_dir, "events.out.tfevents.*")))


def truncate_events(tb_dir: str, last_step: int) -> None:
    """Drops the summaries of steps after `last_step` (and a torn last record) from every event
    file in `tb_dir`, rewriting each atomically; bookkeeping events (file version) stay.
    Records are copied unchanged, so no CRC is recomputed."""
    for path in event_files(tb_dir):
        keep = []
        for raw, payload in records(path):
            event = decode_event(payload)
            if event.scalars is None or event.step <= last_step:
                keep.append(raw)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.writelines(keep)
        os.replace(tmp, path)


def read_scalars(tb_dir: str) -> List[Scalar]:
    """Every scalar summary in the event files of `tb_dir`, in file and write order."""
    out = []
    for path in event_files(tb_dir):
        for _, payload in records(path):
            event = decode_event(payload)
            for tag, value in event.scalars or ():
                out.append(Scalar(tag, event.step, value))
    return out
