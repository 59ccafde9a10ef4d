"""Post-training a Hugging Face checkpoint on user files (configs/post_train.py): SFT, GRPO, DPO,
export, and the errors bad input gets. One tiny random DeepSeek-V3 checkpoint made by
transformers, with a trained byte-level BPE tokenizer and a chat template, serves every test."""
import json
import math
import os

import numpy as np
import pytest

from deepseek_jax import experiment, post_train, trainer
from tests import chat_fixtures as cf
from tests import hf_fixtures as hff

CFG = "configs/post_train.py"


def tiny_config(vocab: int) -> dict:
    return hff.tiny_v3_config(vocab_size=vocab, hidden_size=48, intermediate_size=64, moe_intermediate_size=16,
                              num_hidden_layers=2, n_routed_experts=4, n_group=2, topk_group=1,
                              num_experts_per_tok=2, kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8,
                              qk_rope_head_dim=8, v_head_dim=8, num_nextn_predict_layers=1,
                              rope_scaling=hff.yarn(1.0, factor=4.0, original=64))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """HF directory: config.json + safetensors (with the V3 MTP layer) + tokenizer files."""
    pytest.importorskip("transformers")
    path = str(tmp_path_factory.mktemp("hf_v3"))
    cf.write_tokenizer(path)
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(os.path.join(path, "tokenizer.json")).get_vocab_size()
    config = tiny_config(vocab)
    model = hff.build_hf_model(config)
    sd = hff.add_mtp_layer(hff.published_state_dict(model, config), config)
    sd = {k: np.array(v) for k, v in sd.items()}  # one shard: no tensor may share memory
    hff.write_checkpoint(path, config, sd, shards=1)
    return path


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return str(path)


def config(variant, ckpt, **overrides):
    cfg = experiment.load_config(f"{CFG}:{variant}")
    cfg.init_from = ckpt
    cfg.compute_dtype = "float32"
    cfg.data.seq_len, cfg.data.batch_size = 48, 8
    cfg.optimizer.warmup_steps = 0
    cfg.progress, cfg.log_every, cfg.peak_flops = False, 1, 1.0
    for key, value in overrides.items():
        experiment._set_dotted(cfg, key, json.dumps(value) if not isinstance(value, str) else value)
    return cfg


CHATS = [{"messages": [{"role": "user", "content": f"Say the word: {w}."},
                       {"role": "assistant", "content": w}]} for w in ("apple", "banana", "cherry", "red")]


# ----- config resolution -------------------------------------------------------------------------

def test_init_from_hf_gives_model_and_tokenizer(ckpt):
    cfg = post_train.resolve_init_from(config("sft", ckpt))
    assert cfg.model.hidden_size == 48 and cfg.model.num_mtp_layers == 1
    assert cfg.data.tokenizer == ckpt
    dropped = post_train.resolve_init_from(config("sft", ckpt, **{"model.num_mtp_layers": 0}))
    assert dropped.model.num_mtp_layers == 0
    with pytest.raises(Exception, match=r"model.hidden_size=64 but init_from=.* has 48"):
        post_train.resolve_init_from(config("sft", ckpt, **{"model.hidden_size": 64}))


# ----- SFT ---------------------------------------------------------------------------------------

def test_sft_lowers_loss_on_the_rows(ckpt, tmp_path):
    data = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    cfg = config("sft", ckpt, **{"data.path": data, "total_steps": 12, "optimizer.learning_rate": 3e-3,
                                 "model.num_mtp_layers": 0})
    trainer.train(cfg, str(tmp_path / "w"))
    rows = [json.loads(line) for line in open(tmp_path / "w" / "metrics.jsonl")]
    first, last = rows[0]["loss"], rows[-1]["loss"]
    assert last < 0.5 * first, (first, last)


def test_sft_bad_rows_name_file_and_line(ckpt, tmp_path):
    cfg = config("sft", ckpt)
    cfg = post_train.resolve_init_from(cfg)
    bad = write_jsonl(tmp_path / "missing.jsonl", CHATS[:2] + [{"prompt": "x"}])
    cfg.data.path = bad
    with pytest.raises(ValueError, match=r"missing.jsonl:3: missing field 'messages'"):
        trainer.build_data(cfg)
    first = write_jsonl(tmp_path / "first.jsonl", [{"text": "x"}])
    cfg.data.path = first
    with pytest.raises(ValueError, match=r"first.jsonl:1: the row has columns \['text'\]; expected"):
        trainer.build_data(cfg)
    role = write_jsonl(tmp_path / "role.jsonl", CHATS[:2] + [
        {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}])
    cfg.data.path = role
    with pytest.raises(ValueError, match=r"role.jsonl:3: .*Unknown role: tool"):
        trainer.build_data(cfg)
    shape = write_jsonl(tmp_path / "shape.jsonl", CHATS[:1] + [{"messages": [{"role": "user"}]}])
    cfg.data.path = shape
    with pytest.raises(ValueError, match=r"shape.jsonl:2: field 'messages': messages\[0\] has no string 'content'"):
        trainer.build_data(cfg)
