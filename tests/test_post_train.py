"""Post-training a Hugging Face checkpoint on user files (configs/post_train.py): SFT, GRPO, DPO,
export, and the errors bad input gets. One tiny random DeepSeek-V3 checkpoint made by
transformers, with a trained byte-level BPE tokenizer and a chat template, serves every test."""
import json
import math
import os

import jax
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


# ----- GRPO ----------------------------------------------------------------------------------------

REWARD_FILE = '''
def says_answer(prompt, completion, answer, **columns):
    """Answer with the row's word: 1 for the word itself; partial credit for using its letters."""
    text = completion.strip()
    if not text:
        return 0.0
    letters = sum(ch in answer for ch in text) / len(text)
    return 0.5 * (answer in text.split()) + 0.5 * letters


def flaky(prompt, completion, **columns):
    if "a" in completion:
        raise ZeroDivisionError("boom")
    return float("nan") if "e" in completion else 1.0
'''


def test_grpo_user_prompts_and_reward_file_raise_reward(ckpt, tmp_path):
    from deepseek_jax.rl import grpo

    (tmp_path / "my_rewards.py").write_text(REWARD_FILE)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": f"Say the word: {w}.", "answer": w} for w in ("yes", "no", "red", "apple")])
    cfg = config("grpo", ckpt, **{
        "grpo.prompts": prompts, "grpo.eval_prompts": prompts,
        "grpo.reward_spec": f"{tmp_path}/my_rewards.py:says_answer=1.0",
        "grpo.prompts_per_step": 4, "grpo.group_size": 8, "grpo.max_prompt_len": 24,
        "grpo.max_new_tokens": 6, "grpo.temperature": 1.0, "grpo.eval_problems": 4,
        "total_steps": 24, "optimizer.learning_rate": 1e-2, "model.num_mtp_layers": 0})
    out = grpo.run(cfg, str(tmp_path / "w"), init_from=ckpt)
    rewards = [json.loads(line)["reward_mean"] for line in open(tmp_path / "w" / "metrics.jsonl")
               if "reward_mean" in json.loads(line)]
    early, late = np.mean(rewards[:4]), np.mean(rewards[-4:])
    # Measured: 0.04 -> 0.19 (steps 1-4 vs 21-24).
    assert late > max(3 * early, early + 0.1), rewards
    assert "reward_mean" in out["heldout"] and out["reward_failures"] == 0


def test_reward_spec_errors_and_failures(tmp_path):
    from deepseek_jax.rl import rewards

    (tmp_path / "my_rewards.py").write_text(REWARD_FILE)
    with pytest.raises(rewards.RewardError, match=r"reward 'nope.py:f': could not import it \(FileNotFoundError"):
        rewards.parse_reward_spec("accuracy=1,nope.py:f=1")
    with pytest.raises(rewards.RewardError, match=r"reward 'no_such_pkg_xyz:f': could not import it"):
        rewards.parse_reward_spec("no_such_pkg_xyz:f=1")
    with pytest.raises(rewards.RewardError, match=r"could not import it \(AttributeError"):
        rewards.parse_reward_spec(f"{tmp_path}/my_rewards.py:missing=1")
    with pytest.raises(rewards.RewardError, match=r"neither a registry reward"):
        rewards.parse_reward_spec("acuracy=1")
    with pytest.raises(rewards.RewardError, match=r"expected NAME=WEIGHT"):
        rewards.parse_reward_spec("accuracy")
    spec = rewards.parse_reward_spec(f"{tmp_path}/my_rewards.py:flaky=2.0")
    rows = [{"prompt": "p", "_where": "prompts.jsonl:7"}] * 4
    completions = ["xyz", "abc", "eee", "zzz"]  # ok, raises, NaN, ok
    scorer = rewards.Scorer(spec, max_failure_fraction=0.5)
    per, failed = scorer(rows, completions)
    np.testing.assert_array_equal(per["flaky"] if "flaky" in per else per[spec[0][0]], [2.0, 0.0, 0.0, 2.0])
    assert len(failed) == 2 and scorer.failures == 2
    assert "prompts.jsonl:7" in failed[0] and "'abc'" in failed[0] and "ZeroDivisionError: boom" in failed[0]
    assert "returned nan" in failed[1]
    with pytest.raises(rewards.RewardError, match=r"2 of 4 reward calls failed .*max_reward_failure_fraction=0.25"):
        rewards.Scorer(spec, max_failure_fraction=0.25)(rows, completions)


def test_grpo_prompt_file_errors(ckpt, tmp_path):
    cfg = post_train.resolve_init_from(config("grpo", ckpt))
    bad = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "answer": "x"}, "", {"question": "b"}])
    with pytest.raises(ValueError, match=r"p.jsonl:3: a GRPO prompt row needs a string 'prompt' or a 'messages'"):
        post_train.load_prompts(cfg, bad)
    broken = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "a"}, "{not json"])
    with pytest.raises(ValueError, match=r"q.jsonl:2: invalid JSON"):
        post_train.load_prompts(cfg, broken)


# ----- DPO and export ------------------------------------------------------------------------------

def test_dpo_preference_accuracy_and_export_matches_transformers(ckpt, tmp_path):
    import torch
    import transformers

    from deepseek_jax import hf

    words = ["yes", "no", "red", "apple", "cat", "dog", "blue", "cherry"]
    pairs = [{"prompt": f"Say the word: {w}.", "chosen": w, "rejected": words[(i + 3) % len(words)]}
             for i, w in enumerate(words)]
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    out_dir = str(tmp_path / "hf_out")
    cfg = config("dpo", ckpt, **{"data.path": data, "data.eval_path": data, "eval_every": 100, "eval_batches": 1,
                                 "total_steps": 15, "optimizer.learning_rate": 1e-2, "model.num_mtp_layers": 0,
                                 "data.batch_size": 16, "export_hf": out_dir})
    trainer.train(cfg, str(tmp_path / "w"))
    rows = [json.loads(line) for line in open(tmp_path / "w" / "metrics.jsonl")]
    # Step 1 scores the starting policy, equal to the reference: every margin is 0, none > 0.
    assert rows[0]["reward_accuracy"] <= 0.5 and abs(rows[0]["reward_margin"]) < 1e-3
    final = rows[-1]
    assert final["eval/reward_accuracy"] >= 0.8, final  # all 8 training pairs, after the last step
    assert final["eval/chosen_reward"] > final["eval/rejected_reward"]

    # The export loads in transformers, with the tokenizer beside it, and its logits equal ours.
    tok = transformers.AutoTokenizer.from_pretrained(out_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "Say the word: yes."}], add_generation_prompt=True)
    ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    theirs_model = transformers.AutoModelForCausalLM.from_pretrained(out_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = theirs_model(torch.tensor([ids])).logits.numpy()
    model, params = hf.from_pretrained(out_dir)
    from deepseek_jax import loading

    trained = loading.load(str(tmp_path / "w")).params  # our final params, straight from the checkpoint
    ours = np.asarray(jax.jit(model.apply)({"params": trained}, np.asarray([ids], np.int32)).logits)
    scale = np.abs(theirs).max()
    assert np.abs(ours - theirs).max() <= 2e-4 * scale, np.abs(ours - theirs).max() / scale
    del params
