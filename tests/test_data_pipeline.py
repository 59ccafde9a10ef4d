"""Packing and pipelines: documents recovered exactly from the packed rows, loss masks,
overlong handling, per-host shards and exact resume. The oracle is each document's
encoding computed directly here ([bos] + UTF-8 bytes + [eos])."""
import collections
import json

import numpy as np
import pytest

from deepseek_jax.data.pipeline import make_pretrain_dataset, make_sft_dataset
from deepseek_jax.data.sources import JsonlSource, SyntheticSource
from deepseek_jax.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
BOS, EOS, PAD, THINK = 257, 258, 256, 259


def _byte_doc(text):
    return [BOS, *text.encode("utf-8"), EOS]


def _segments(batch):
    """Yields (ids, loss_mask) per packed document, checking the row invariants."""
    for b in range(batch["tokens"].shape[0]):
        seg = batch["segment_ids"][b]
        pad = seg == 0
        assert (batch["tokens"][b][pad] == PAD).all() and (batch["targets"][b][pad] == PAD).all()
        assert (batch["loss_mask"][b][pad] == 0).all() and (batch["positions"][b][pad] == 0).all()
        used = seg[~pad]
        # Documents fill a prefix of the row, numbered 1, 2, 3, ... in order.
        assert not pad[: len(used)].any() and len(used) > 0
        assert (np.diff(used) >= 0).all()
        assert list(np.unique(used)) == list(range(1, used.max() + 1))
        for k in np.unique(used):
            where = seg == k
            tokens, targets = batch["tokens"][b][where], batch["targets"][b][where]
            assert (batch["positions"][b][where] == np.arange(where.sum())).all()
            # Targets are the same document's next tokens: never across a boundary.
            assert (targets[:-1] == tokens[1:]).all()
            yield [*tokens.tolist(), int(targets[-1])], batch["loss_mask"][b][where]


def _all_documents(dataset):
    return [ids for batch in dataset for ids, _ in _segments(batch)]


def _write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return JsonlSource(path)


@pytest.fixture
def texts():
    # Distinct documents of varied length, a few multi-byte, some near a row's size.
    rng = np.random.default_rng(0)
    return [f"doc {i} é" + "xyz" * int(rng.integers(0, 12)) for i in range(60)]


def test_batch_layout(tmp_path, texts):
    pipe = make_pretrain_dataset(_write_jsonl(tmp_path / "d.jsonl", texts), "byte",
                                 seq_len=48, batch_size=4)
    batch = next(iter(pipe.dataset))
    dtypes = {"tokens": np.int32, "targets": np.int32, "loss_mask": np.float32,
              "segment_ids": np.int32, "positions": np.int32}
    assert set(batch) == set(dtypes)
    for key, dtype in dtypes.items():
        assert batch[key].shape == (4, 48) and batch[key].dtype == dtype, key


def test_pretrain_documents_recovered_exactly(tmp_path, texts):
    pipe = make_pretrain_dataset(_write_jsonl(tmp_path / "d.jsonl", texts), "byte",
                                 seq_len=48, batch_size=4, num_epochs=1, drop_remainder=False)
    recovered, masks = [], []
    for batch in pipe.dataset:
        for ids, mask in _segments(batch):
            recovered.append(ids)
            masks.append(mask)
    assert sorted(recovered) == sorted(_byte_doc(t) for t in texts)
    assert all((m == 1).all() for m in masks)  # pretraining: every target counts
    assert pipe.stats.pipeline.snapshot()["documents"] == len(texts)


def test_sft_loss_only_on_response():
    pipe = make_sft_dataset(SyntheticSource(40, style="sft", seed=1), TOK,
                            seq_len=128, batch_size=4, num_epochs=1, drop_remainder=False)
    count = 0
    for batch in pipe.dataset:
        for ids, mask in _segments(batch):
            count += 1
            assert ids[0] == BOS and ids[-1] == EOS
            start = ids.index(THINK)  # the response begins with <think>
            # Slot j predicts ids[j + 1]: it counts iff that id belongs to the response.
            expected = [1.0 if j + 1 >= start else 0.0 for j in range(len(ids) - 1)]
            assert mask.tolist() == expected
            assert TOK.decode(ids[start:], skip_special_tokens=True).endswith("</answer>")
    assert count == 40


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_overlong_documents(tmp_path, overlong):
    texts = ["short one", "a" * 30, "b" * 31, "c" * 100]  # 31 and 32 slots with bos/eos
    seq_len = 32
    pipe = make_pretrain_dataset(_write_jsonl(tmp_path / "d.jsonl", texts), TOK,
                                 seq_len=seq_len, batch_size=2, num_epochs=1,
                                 drop_remainder=False, overlong=overlong)
    docs = sorted(_all_documents(pipe.dataset))
    fits = [_byte_doc(t) for t in texts[:3]]
    stats = pipe.stats.pipeline.snapshot()
    if overlong == "truncate":
        # The first T+1 ids survive, so every one of the T slots has a real target.
        assert docs == sorted(fits + [_byte_doc(texts[3])[: seq_len + 1]])
        assert (stats["truncated"], stats["dropped_overlong"]) == (1, 0)
    else:
        assert docs == sorted(fits)
        assert (stats["truncated"], stats["dropped_overlong"]) == (0, 1)


def test_sft_prompt_filling_the_row_is_dropped():
    records = [{"prompt": "p" * 40, "response": "r"}, {"prompt": "q", "response": "ok"}]
    pipe = make_sft_dataset(records, TOK, seq_len=16, batch_size=1, num_epochs=1,
                            drop_remainder=False)
    assert _all_documents(pipe.dataset) == [[BOS, *b"qok", EOS]]
    assert pipe.stats.pipeline.snapshot()["dropped_no_loss"] == 1


def test_shards_are_disjoint_and_cover_the_data(tmp_path, texts):
    source = _write_jsonl(tmp_path / "d.jsonl", texts)
    shards = [
        _all_documents(make_pretrain_dataset(
            source, TOK, seq_len=48, batch_size=2, seed=7, num_epochs=1,
            shard_index=k, shard_count=3, drop_remainder=False).dataset)
        for k in range(3)
    ]
    as_sets = [{tuple(d) for d in shard} for shard in shards]
    assert all(len(s) == len(shard) for s, shard in zip(as_sets, shards))
    assert not (as_sets[0] & as_sets[1] or as_sets[0] & as_sets[2] or as_sets[1] & as_sets[2])
    assert set().union(*as_sets) == {tuple(_byte_doc(t)) for t in texts}
    with pytest.raises(ValueError, match="shard_index"):
        make_pretrain_dataset(source, TOK, seq_len=8, batch_size=1, shard_index=3, shard_count=3)


def test_order_depends_on_seed_and_epoch_only(tmp_path, texts):
    source = _write_jsonl(tmp_path / "d.jsonl", texts)

    def first_batches(seed, n=6):
        it = iter(make_pretrain_dataset(source, TOK, seq_len=48, batch_size=2, seed=seed).dataset)
        return [next(it) for _ in range(n)]

    a, b, c = first_batches(3), first_batches(3), first_batches(4)
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    assert not all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, c))

    # Each epoch visits every document once, in a fresh order.
    pipe = make_pretrain_dataset(source, TOK, seq_len=48, batch_size=1, seed=3, num_epochs=2,
                                 num_packing_bins=1, drop_remainder=False)
    order = [tuple(d) for d in _all_documents(pipe.dataset)]
    first, second = order[: len(texts)], order[len(texts):]
    assert collections.Counter(first) == collections.Counter(second)
    assert set(first) == {tuple(_byte_doc(t)) for t in texts} and first != second


def test_iterator_state_resumes_at_the_exact_element(tmp_path, texts):
    pipe = make_sft_dataset(SyntheticSource(500, style="sft"), TOK, seq_len=64,
                            batch_size=3, seed=5, num_packing_bins=6)
    it = iter(pipe.dataset)
    for _ in range(7):  # stop mid packing group: 6 bins feed two batches of 3
        next(it)
    # The trainer stores the state as JSON inside the checkpoint.
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(5)]
    resumed = iter(pipe.dataset)
    resumed.set_state(state)
    got = [next(resumed) for _ in range(5)]
    for x, y in zip(expected, got):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.mark.parametrize("attention", ["mla", "mha"])
def test_packed_rows_never_attend_across_documents(tmp_path, texts, attention):
    """Every document in a packed row gets exactly the logits it gets alone (unpacked)."""
    import jax
    import jax.numpy as jnp

    from deepseek_jax.config import ModelConfig
    from deepseek_jax.model import Transformer, init_params

    config = ModelConfig(attention=attention, hidden_size=32, num_attention_heads=4, n_routed_experts=4,
                         num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1)
    params = jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))
    # One compiled program: params are an argument (not baked-in constants) and every call
    # below has the packed batch's [4, 48] shape.
    apply = jax.jit(lambda params, t, p, s: Transformer(config).apply({"params": params}, t, positions=p,
                                                                      segment_ids=s).logits)
    pipe = make_pretrain_dataset(_write_jsonl(tmp_path / "d.jsonl", texts), "byte", seq_len=48, batch_size=4)
    batch = next(iter(pipe.dataset))
    B = batch["tokens"].shape[0]
    packed = np.asarray(apply(params, batch["tokens"], batch["positions"], batch["segment_ids"]))
    # Each document alone at the start of an otherwise empty row, B such rows per call (rows
    # never interact: dropless MoE routes every token on its own).
    docs = [(b, np.flatnonzero(batch["segment_ids"][b] == seg))
            for b in range(B) for seg in sorted(set(batch["segment_ids"][b].tolist()) - {0})]
    n = -(-len(docs) // B) * B
    tokens, segments = np.zeros((n, 48), np.int32), np.zeros((n, 48), np.int32)
    for i, (b, where) in enumerate(docs):
        tokens[i, :len(where)], segments[i, :len(where)] = batch["tokens"][b, where], 1
    positions = np.broadcast_to(np.arange(48, dtype=np.int32), (B, 48))
    alone = np.concatenate([np.asarray(apply(params, tokens[i:i + B], positions, segments[i:i + B]))
                            for i in range(0, n, B)])
    for i, (b, where) in enumerate(docs):
        np.testing.assert_allclose(packed[b, where], alone[i, :len(where)], rtol=1e-5, atol=1e-5)
    assert len(docs) > B  # rows really hold several documents
