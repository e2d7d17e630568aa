"""TensorBoard event files written and read by hand (arca_jax.tfevents), against the protobuf
library's encoding of TensorBoard's own messages (tensorboardX's generated classes) and against
files tensorboardX writes."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from arca_jax import runlog, tfevents
from arca_jax.trainer import setup
from fixtures import read_jsonl

event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")
summary_pb2 = pytest.importorskip("tensorboardX.proto.summary_pb2")


def _reference_event(wall_time, step=0, file_version="", scalars=None):
    event = event_pb2.Event(wall_time=wall_time, step=step)
    if file_version:  # a member of the `what` oneof: set only when written
        event.file_version = file_version
    if scalars is not None:
        event.summary.CopyFrom(summary_pb2.Summary(value=[
            summary_pb2.Summary.Value(tag=t, simple_value=v) for t, v in scalars.items()]))
    return event.SerializeToString()


def test_crc32c_check_value_and_tensorboardx_mask():
    from tensorboardX.record_writer import masked_crc32c

    assert tfevents.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert tfevents.crc32c(b"") == 0
    rng = np.random.default_rng(0)
    for n in (1, 7, 8, 100, 4096):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert tfevents.masked_crc32c(data) == masked_crc32c(data)


@pytest.mark.parametrize("step", [0, 1, 127, 128, 300, 2**31 + 5, 2**62, -1, -300])
def test_events_encode_like_the_protobuf_library(step):
    scalars = {"train/loss": -0.125, "eval/pass_at_k": 0.0, "train/kl": 3.4e38,
               "train/überlänge": 1e-45, "x": float("inf"), "y": float("-inf")}
    for kwargs in ({"file_version": "brain.Event:2"}, {"step": step, "scalars": scalars},
                   {"step": step, "scalars": {}}, {"step": step}):
        want = _reference_event(1764612345.123456, **kwargs)
        assert tfevents.encode_event(1764612345.123456, **kwargs) == want, kwargs
        got = tfevents.decode_event(want)
        assert got.step == step if "step" in kwargs else got.step == 0
        assert got.wall_time == 1764612345.123456
        assert got.file_version == kwargs.get("file_version", "")
        if "scalars" in kwargs:
            assert [t for t, _ in got.scalars] == list(kwargs["scalars"])
            assert all(v == np.float32(kwargs["scalars"][t]) for t, v in got.scalars)
        else:
            assert got.scalars is None


def test_decoder_skips_fields_it_does_not_read():
    event = event_pb2.Event(wall_time=2.5, step=9)
    event.summary.value.add(tag="hist", histo=summary_pb2.HistogramProto(min=0.0, max=1.0))
    event.summary.value.add(tag="a", simple_value=float("nan"))
    payload = event.SerializeToString() + b"\x98\x06\x05"  # and an unknown field 99 (varint 5)
    got = tfevents.decode_event(payload)
    assert got.step == 9 and [t for t, _ in got.scalars] == ["a"] and math.isnan(got.scalars[0][1])
    with pytest.raises(ValueError, match="truncated"):
        tfevents.decode_event(event.SerializeToString()[:-3])


def test_files_written_here_read_by_tensorboardx_and_back(tmp_path):
    """Ours parsed with the protobuf library; tensorboardX's SummaryWriter's file read by ours."""
    ours = tmp_path / "ours"
    f = tfevents.EventFile(str(ours))
    f.scalars(3, {"train/loss": 0.5, "train/reward_mean": 0.25})
    f.scalars(4, {})  # nothing to write
    f.close()
    (path,) = tfevents.event_files(str(ours))
    parsed = [event_pb2.Event.FromString(p) for _, p in tfevents.records(path)]
    assert parsed[0].file_version == "brain.Event:2" and not parsed[0].HasField("summary")
    assert [(e.step, [(v.tag, v.simple_value) for v in e.summary.value]) for e in parsed[1:]] == [
        (3, [("train/loss", 0.5), ("train/reward_mean", 0.25)])]

    from tensorboardX import SummaryWriter

    other = str(tmp_path / "tbx")
    writer = SummaryWriter(other)
    writer.add_scalar("a/b", 1.5, 7)
    writer.add_text("note", "not a scalar", 8)
    writer.close()
    assert tfevents.read_scalars(other) == [tfevents.Scalar("a/b", 7, 1.5)]


def test_events_trimmed_like_the_json_logs(tmp_path):
    """A resumed run's event files: the killed attempt's scalars after the checkpoint step are
    dropped (and a torn last record), so each (tag, step) appears once after the resumed run
    writes its own; what was queued is on disk after `flush` (before a checkpoint)."""
    run_dir = str(tmp_path)
    log = runlog.RunLog(run_dir, stream=open(os.devnull, "w"))
    for step in (1, 2, 3, 4):
        log.metrics({"step": step, "loss": float(step)})
    log.eval({"step": 2, "greedy_accuracy": 0.5, "pass_at_k": 0.75, "k": 2, "num_problems": 4})
    log.flush()
    tb = os.path.join(run_dir, "tb")
    assert [(s.tag, s.step) for s in tfevents.read_scalars(tb)] == [
        ("train/loss", 1), ("train/loss", 2), ("train/loss", 3), ("train/loss", 4),
        ("eval/greedy_accuracy", 2), ("eval/pass_at_k", 2)]
    (events,) = os.listdir(tb)
    with open(os.path.join(tb, events), "ab") as f:
        f.write(b"\x20\x00\x00")  # a torn record, as a kill mid-write leaves
    setup.trim_step_logs(run_dir, 2)  # what --resume from the checkpoint of step 2 does
    resumed = runlog.RunLog(run_dir, stream=open(os.devnull, "w"))
    resumed.metrics({"step": 3, "loss": 30.0})
    resumed.close()
    log.close()
    assert sorted((s.tag, s.step, s.value) for s in tfevents.read_scalars(tb)) == sorted([
        ("train/loss", 1, 1.0), ("train/loss", 2, 2.0), ("train/loss", 3, 30.0),
        ("eval/greedy_accuracy", 2, 0.5), ("eval/pass_at_k", 2, 0.75)])


def test_corrupted_record_ends_the_read(tmp_path):
    f = tfevents.EventFile(str(tmp_path))
    for step in (1, 2, 3):
        f.scalars(step, {"v": float(step)})
    f.close()
    (path,) = tfevents.event_files(str(tmp_path))
    data = bytearray(open(path, "rb").read())
    sizes = [len(raw) for raw, _ in tfevents.records(path)]
    data[sum(sizes[:2]) + 14] ^= 0xFF  # a payload byte of the step-2 record (after the version)
    open(path, "wb").write(bytes(data))
    assert [s.step for s in tfevents.read_scalars(str(tmp_path))] == [1]


def test_run_log_needs_neither_tensorboardx_nor_torch(tmp_path):
    """The run log writes its events in a process where tensorboardX and torch cannot be
    imported (an accelerator image), and never imports them where they can."""
    script = f"""
import builtins, io, sys
real = builtins.__import__
def guarded(name, *a, **k):
    if name.split(".")[0] in ("tensorboardX", "torch"):
        raise ImportError(name)
    return real(name, *a, **k)
builtins.__import__ = guarded
from arca_jax import runlog
log = runlog.RunLog({str(tmp_path)!r}, stream=io.StringIO())
log.metrics({{"step": 1, "loss": 0.5}})
log.eval({{"step": 1, "greedy_accuracy": 0.5, "pass_at_k": 0.75, "k": 2, "num_problems": 4}})
log.close()
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    assert read_jsonl(str(tmp_path / "metrics.jsonl"))[0]["loss"] == 0.5
    assert sorted(tfevents.read_scalars(str(tmp_path / "tb"))) == [
        ("eval/greedy_accuracy", 1, 0.5), ("eval/pass_at_k", 1, 0.75), ("train/loss", 1, 0.5)]
    out = subprocess.run([sys.executable, "-c", "import sys; from arca_jax import runlog, tfevents;"
                          "print(sorted(m for m in ('torch', 'tensorboardX') if m in sys.modules))"],
                         check=True, capture_output=True, text=True, timeout=120).stdout
    assert out.strip() == "[]"
