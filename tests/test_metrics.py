"""metrics.py: expert-load statistics, PNG heatmaps, FLOP counts, metrics.jsonl and TensorBoard.

Oracles: statistics recomputed with Python's `statistics` module; PNG bytes parsed by a
small independent reader (chunk CRCs checked with binascii); event files read back with
a TFRecord reader written here from the format spec and tensorboardX's protobufs; FLOPs
counted by hand from the config's dimensions.
"""
import binascii
import glob
import json
import os
import statistics
import struct
import zlib

import numpy as np
import pytest

from deepseek_jax import metrics
from deepseek_jax.config import ModelConfig


# ----- readers used as oracles (also by test_trainer) -----------------------------------------

def read_tfrecords(path):
    """Yields the payloads of a TFRecord file (u64 length, u32 crc, data, u32 crc)."""
    with open(path, "rb") as f:
        while True:
            header = f.read(12)
            if len(header) < 12:
                return
            (length,) = struct.unpack("<Q", header[:8])
            data = f.read(length)
            f.read(4)
            yield data


def read_events(tb_dir):
    """{tag: [(step, value)]} for scalars, plus {"__images__": {tag: [Summary.Image]},
    "__histograms__": {tag: [step]}, "__text__": {tag: [step]}} from every event file."""
    from tensorboardX.proto.event_pb2 import Event

    out = {"__images__": {}, "__histograms__": {}, "__text__": {}}
    for path in sorted(glob.glob(os.path.join(tb_dir, "**", "events.out.tfevents.*"), recursive=True)):
        for payload in read_tfrecords(path):
            event = Event.FromString(payload)
            for v in event.summary.value:
                kind = v.WhichOneof("value")
                if kind == "simple_value":
                    out.setdefault(v.tag, []).append((event.step, v.simple_value))
                elif kind == "image":
                    out["__images__"].setdefault(v.tag, []).append(v.image)
                elif kind == "histo":
                    out["__histograms__"].setdefault(v.tag, []).append(event.step)
                elif kind == "tensor" or v.tag.endswith("text_summary"):
                    out["__text__"].setdefault(v.tag, []).append(event.step)
    return out


def decode_png(data):
    """(width, height, rgb array) of an 8-bit RGB, non-interlaced PNG with filter 0 rows."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert crc == binascii.crc32(kind + body) & 0xFFFFFFFF, kind
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + n
    w, h, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, colour) == (8, 2)
    raw = zlib.decompress(chunks[b"IDAT"])
    rows = [raw[r * (3 * w + 1):(r + 1) * (3 * w + 1)] for r in range(h)]
    assert all(row[0] == 0 for row in rows)
    return w, h, np.frombuffer(b"".join(row[1:] for row in rows), np.uint8).reshape(h, w, 3)


# ----- expert load -----------------------------------------------------------------------------

def test_expert_load_stats_match_statistics_module():
    counts = [[10, 20, 30, 40], [25, 25, 25, 25], [0, 0, 0, 0]]
    got = metrics.expert_load_stats(counts, dropped=10.0)
    for layer, row in enumerate(counts):
        mean = statistics.fmean(row)
        want_max = max(row) / mean if mean else 0.0
        want_cv = statistics.pstdev(row) / mean if mean else 0.0
        assert got[f"moe/layer{layer}/max_over_mean"] == pytest.approx(want_max)
        assert got[f"moe/layer{layer}/cv"] == pytest.approx(want_cv)
    assert got["moe/max_over_mean"] == pytest.approx((1.6 + 1.0 + 0.0) / 3)
    assert got["moe/drop_rate"] == pytest.approx(10.0 / 200.0)
    assert metrics.expert_load_stats(np.zeros((0,))) == {}


def test_png_round_trip_and_heatmap_colours():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    w, h, back = decode_png(metrics.encode_png(rgb))
    assert (w, h) == (7, 5)
    np.testing.assert_array_equal(back, rgb)

    # Balanced experts sit at the ramp's middle anchor, idle ones at its start, >= 2x at its end.
    img = metrics.load_heatmap([[0, 10, 20, 10]], cell=3)
    assert img.shape == (3, 12, 3)
    np.testing.assert_array_equal(img[0, 0], [68, 1, 84])
    np.testing.assert_array_equal(img[0, 3], [33, 145, 140])
    np.testing.assert_array_equal(img[0, 6], [253, 231, 37])


# ----- FLOPs -----------------------------------------------------------------------------------

def test_local_flops_per_token_dense_mha_by_hand():
    cfg = ModelConfig(name="t", vocab_size=96, hidden_size=32, num_hidden_layers=2, intermediate_size=80,
                      attention="mha", num_attention_heads=4)
    T, D, I, V, L, H = 16, 32, 80, 96, 2, 4
    matmul_params = L * (4 * D * D + 3 * D * I) + D * V  # q, k, v, o; gate, up, down; lm_head
    want = 6 * matmul_params + 3 * L * H * (2 * (D // H)) * T  # causal attention
    assert metrics._local_flops_per_token(cfg, T) == pytest.approx(want)


def test_local_flops_counts_routed_experts_k_over_e():
    base = dict(name="t", vocab_size=64, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                attention="mha", num_attention_heads=4, n_routed_experts=8, n_shared_experts=1,
                moe_intermediate_size=16, first_k_dense_replace=1)
    k2 = metrics._local_flops_per_token(ModelConfig(**base, num_experts_per_tok=2), 8)
    k8 = metrics._local_flops_per_token(ModelConfig(**base, num_experts_per_tok=8), 8)
    routed = 1 * 8 * 3 * 32 * 16  # one MoE layer, E experts x (gate, up, down) of D x I_moe
    assert k8 - k2 == pytest.approx(6 * routed * (1 - 2 / 8))


def test_model_flops_agree_with_inspect():
    """The fallback and inspect.py count the same model independently; they differ only by
    the output head that inspect counts again for each MTP depth."""
    from deepseek_jax import experiment

    cfg = experiment.model_config(experiment.load_config("configs/tiny_v3.py:f32"))
    head = cfg.vocab_size * cfg.hidden_size
    want = metrics._local_flops_per_token(cfg, 32) + 6 * cfg.num_mtp_layers * head
    assert metrics.model_flops_per_token(cfg, 32) == pytest.approx(want)


def test_peak_flops_is_measured():
    peak = metrics.measure_peak_flops(n=128, reps=2)
    assert np.isfinite(peak) and peak > 1e6


# ----- writer ----------------------------------------------------------------------------------

def test_writer_jsonl_tensorboard_and_resume(tmp_path):
    w = metrics.MetricsWriter(str(tmp_path))
    counts = np.array([[1.0, 2.0, 3.0, 2.0], [2.0, 2.0, 2.0, 2.0]])
    for step in (1, 2, 3):
        w.write(step, {"loss": 4.0 - step, "lr": np.float32(0.5), "vec": np.ones(3), "name": "x"})
    w.write_expert_load(3, counts)
    w.write_text(3, "samples", "hello")
    w.close()

    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert lines == [{"step": s, "loss": 4.0 - s, "lr": 0.5} for s in (1, 2, 3)]
    events = read_events(str(tmp_path / "tb"))
    assert events["loss"] == [(1, 3.0), (2, 2.0), (3, 1.0)]
    assert set(events["__histograms__"]) == {"moe/load/layer0", "moe/load/layer1"}
    (image,) = events["__images__"]["moe/expert_load_heatmap"]
    w_, h_, _ = decode_png(image.encoded_image_string)
    assert (w_, h_) == (image.width, image.height) == (4 * 12, 2 * 12)
    assert events["__text__"]

    # A resumed run drops what came after its checkpoint, and appends from there.
    w = metrics.MetricsWriter(str(tmp_path), resume_step=2, tensorboard=False)
    w.write(3, {"loss": 9.0})
    w.close()
    assert [json.loads(line)["loss"] for line in open(tmp_path / "metrics.jsonl")] == [3.0, 2.0, 9.0]


def test_truncate_jsonl_drops_later_and_half_written_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "loss": 0.1}\n{"step": 2, "loss": 0.2}\n{"step": 3, "loss": 0.3}\n{"step": 4, "lo')
    assert metrics.truncate_jsonl(str(path), 2) == 2
    assert path.read_text() == '{"step": 1, "loss": 0.1}\n{"step": 2, "loss": 0.2}\n'


def test_writer_is_noop_when_disabled(tmp_path):
    w = metrics.MetricsWriter(str(tmp_path / "x"), enabled=False)
    w.write(1, {"loss": 1.0})
    w.write_expert_load(1, np.ones((2, 2)))
    w.close()
    assert not os.path.exists(tmp_path / "x")


def test_writer_never_blocks_after_tensorboards_thread_dies_of_a_full_disk(tmp_path):
    """tensorboardX writes events from a thread that dies on an OSError; with its default
    10-event queue the next adds blocked forever (a disk-full run hung instead of exiting 3).
    Oracle: 200 records after the thread died complete within seconds, and close() does not
    raise over the (simulated) full disk."""
    import errno
    import threading

    w = metrics.MetricsWriter(str(tmp_path), enabled=True)
    events = w._tb._get_file_writer().event_writer

    def full_disk(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    disk = events._ev_writer.write_event, events._ev_writer.flush
    events._ev_writer.write_event = full_disk  # what the writer thread calls for each event
    events._ev_writer.flush = full_disk
    w.write(1, {"loss": 1.0})
    events._worker.join(timeout=10)
    assert not events._worker.is_alive()  # the writer thread is gone, as on a full disk
    done = threading.Event()

    def keep_logging():
        for step in range(2, 202):
            w.write(step, {"loss": 1.0, "lr": 0.1})
        w.close()
        done.set()

    threading.Thread(target=keep_logging, daemon=True).start()
    assert done.wait(timeout=30), "MetricsWriter blocked once TensorBoard's writer thread had died"
    events._ev_writer.write_event, events._ev_writer.flush = disk  # tensorboardX's exit-time close then succeeds
    assert len(open(tmp_path / "metrics.jsonl").read().splitlines()) == 201
