"""The GRPO loop (rl/grpo.py) against independent computations of each of its parts.

A tiny random policy on the r1_tiny GRPO stage: the rollout's rewards are the reward
functions applied to the decoded completions, its advantages are the group formula, its
old log-probs are the forward's at the policy temperature on exactly the sampled tokens,
and a run stopped after its checkpoint resumes with the samples of an uninterrupted run.
"""
import json
import shutil

import jax
import numpy as np
import pytest

from deepseek_jax import experiment, loading, trainer, warm_start
from deepseek_jax.data.tokenizer import get_tokenizer
from deepseek_jax.rl import advantages as adv_lib
from deepseek_jax.rl import grpo as grpo_lib
from deepseek_jax.rl import rewards

SMALL = ["model.hidden_size=32", "model.num_hidden_layers=2", "model.intermediate_size=64",
         "model.moe_intermediate_size=16", "model.num_mtp_layers=0", "grpo.prompts_per_step=4",
         "grpo.group_size=4", "grpo.max_new_tokens=12"]


@pytest.fixture(scope="module")
def setup():
    cfg = experiment.load_config("configs/r1_tiny.py:grpo", SMALL)
    mesh = trainer.build_mesh(cfg)
    parts = trainer.build_state_and_step(cfg, mesh, loss_name="grpo")
    grpo = grpo_lib.GRPO(cfg, parts, get_tokenizer("byte"))
    return cfg, grpo, parts.init_state()


def test_rollout_scores_advantages_and_old_logprobs(setup):
    cfg, grpo, state = setup
    problems = grpo_lib.training_problems(cfg, 0)
    ro = grpo.rollout(state.params, problems, jax.random.key(0))
    G = cfg.grpo.group_size
    rows = [p for p in problems for _ in range(G)]
    want = [sum(rewards.score(dict(cfg.grpo.rewards), p["prompt"], c, **p).values())
            for p, c in zip(rows, ro.completions)]
    np.testing.assert_allclose(ro.rewards, want, atol=1e-6)
    np.testing.assert_allclose(ro.batch["advantages"],
                               adv_lib.group_advantages(np.reshape(want, (-1, G)), "grpo").reshape(-1),
                               atol=1e-6)
    b = ro.batch
    # The loss covers exactly the sampled tokens: one row's targets under its mask decode
    # to its completion (the stop token included).
    tok = get_tokenizer("byte")
    row = b["targets"][0][b["loss_mask"][0] > 0].tolist()
    assert tok.decode([t for t in row if t != tok.eos_id]) == ro.completions[0]
    assert int(b["loss_mask"].sum()) == int(ro.lengths.sum())
    # Old log-probs: an independent forward (plain model.apply, one device, numpy log-softmax
    # at the policy temperature, gathered at the targets), where the loss counts.
    out = jax.jit(grpo.parts.model.apply)({"params": jax.device_get(state.params)}, b["tokens"],
                                          positions=b["positions"], segment_ids=b["segment_ids"])
    z = np.asarray(out.logits, np.float64) / cfg.loss_config.policy_temperature
    logp = z - z.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    forward = np.take_along_axis(logp, np.asarray(b["targets"])[..., None], -1)[..., 0]
    mask = b["loss_mask"] > 0
    assert cfg.loss_config.policy_temperature != 1.0  # the rollout recomputed them (not the sampler's)
    np.testing.assert_allclose(b["old_logprobs"][mask], forward[mask], atol=2e-4)


def test_sampler_logprobs_are_the_training_forwards(setup):
    """At temperature 1 the old log-probs come from the sampler's decode loop (KV cache, left
    padding); the loss recomputes them with a full forward over the packed batch. The two
    must agree token for token, or the first GRPO update would not be on-policy."""
    _, grpo, state = setup
    cfg = experiment.load_config("configs/r1_tiny.py:grpo",
                                 SMALL + ["grpo.temperature=1.0", "loss_config.policy_temperature=1.0"])
    tempered_one = grpo_lib.GRPO(cfg, grpo.parts, grpo.tokenizer)
    ro = tempered_one.rollout(state.params, grpo_lib.training_problems(cfg, 0), jax.random.key(1))
    b = ro.batch
    mask = b["loss_mask"] > 0
    assert mask.sum() > 0
    np.testing.assert_allclose(b["old_logprobs"][mask], tempered_one.logprobs(state.params, b)[mask], atol=2e-4)


def test_mismatched_policy_temperature_is_refused(setup):
    cfg, grpo, _ = setup
    bad = experiment.load_config("configs/r1_tiny.py:grpo", SMALL + ["grpo.temperature=1.0"])
    with pytest.raises(ValueError, match="policy_temperature"):
        grpo_lib.GRPO(bad, grpo.parts, grpo.tokenizer)


@pytest.mark.slow
def test_run_resumes_exactly_and_evaluates_heldout(setup, tmp_path, monkeypatch):
    """A GRPO run stopped after a checkpoint continues with the uninterrupted run's rewards."""
    from deepseek_jax import convert

    _, grpo, state = setup
    init = tmp_path / "init"  # the setup's random policy as a `convert` directory (no SFT run to compile)
    convert.save_orbax(grpo.parts.model, jax.device_get(state.params), str(init))
    common = SMALL + ["grpo.eval_problems=8", "log_every=1", "checkpoint_every=1",
                      "optimizer.warmup_steps=1", "total_steps=2"]

    def run(workdir):
        cfg = experiment.load_config("configs/r1_tiny.py:grpo", common)
        return grpo_lib.run(cfg, str(workdir), init_from=str(init))

    full = run(tmp_path / "full")
    # The run stopped after its step-1 checkpoint: the workdir as it was then (metrics past the
    # restored step are dropped by the resumed run itself).
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "2")
    assert loading.complete_steps(str(tmp_path / "cut")) == [1]
    resumed = run(tmp_path / "cut")

    def rewards_of(workdir):
        rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
        return {r["step"]: r["reward_mean"] for r in rows if "reward_mean" in r}

    assert sorted(rewards_of(tmp_path / "full")) == [1, 2]
    assert rewards_of(tmp_path / "cut") == rewards_of(tmp_path / "full")
    assert resumed["heldout"] == full["heldout"]
    assert full["heldout"]["problems"] == 8
    # Later stages (rejection sampling, evaluation) read the policy out of a GRPO workdir.
    mesh = trainer.build_mesh(experiment.load_config("configs/r1_tiny.py:grpo", SMALL))
    params = warm_start.load_params(str(tmp_path / "full"), mesh)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(params))
    # A relative workdir, as `make demo` passes them (runs/demo/...), reads the same params.
    monkeypatch.chdir(tmp_path)
    relative = warm_start.load_params("full", mesh)
    jax.tree.map(np.testing.assert_array_equal, relative, params)
    first = next(iter(json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")))
    assert first["step"] == 1


def test_generation_of_a_row_does_not_depend_on_its_batch_under_capacity_training():
    """DeepSeek-V2 drops tokens in training only. With a capacity config whose training forward
    makes row 0 depend on the other rows (positive control), generation and the GRPO scoring
    model are dropless: row 0's greedy completion and log-probs are the same whatever the other
    rows of its batch (three batches of one shape: one compile), and its scoring log-probs equal
    those of row 0 alone."""
    from deepseek_jax.config import ModelConfig
    from deepseek_jax.model import Transformer, inference_model, init_params
    from deepseek_jax.rl.sampler import Sampler

    c = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                    n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                    moe_dispatch="capacity", capacity_policy="affinity", capacity_factor=0.3,
                    capacity_protected_fraction=0.0)
    model = Transformer(c)
    params = jax.jit(init_params, static_argnums=0)(c, jax.random.key(0))
    rng = np.random.default_rng(0)
    a = rng.integers(1, 64, (4, 6))
    batches = [a] + [np.concatenate([a[:1], rng.integers(1, 64, (3, 6))]) for _ in range(2)]  # row 0 shared
    train = jax.jit(model.apply)
    train_a, train_b = (train({"params": params}, x).logits[0] for x in batches[:2])
    assert np.abs(np.asarray(train_a - train_b)).max() > 1e-3  # training drops depend on the batch
    scorer = inference_model(model)
    assert scorer.config.moe_dispatch == "dropless"
    score = jax.jit(scorer.apply)
    first = score({"params": params}, a).logits[0]
    for x in batches[1:]:
        np.testing.assert_allclose(score({"params": params}, x).logits[0], first, atol=1e-5)
    np.testing.assert_allclose(score({"params": params}, a[:1]).logits[0], first, atol=1e-5)  # row 0 alone
    sampler = Sampler(model, max_prompt_len=6, max_new_tokens=6)  # the TRAINING model: decode is dropless
    outs = [sampler.generate(params, x.tolist(), jax.random.key(1), temperature=0.0) for x in batches]
    for o in outs[1:]:
        np.testing.assert_array_equal(np.asarray(o.tokens[0]), np.asarray(outs[0].tokens[0]))
        np.testing.assert_allclose(np.asarray(o.logprobs[0]), np.asarray(outs[0].logprobs[0]), atol=1e-5)


def test_grpo_rollouts_and_scoring_run_dropless_under_a_capacity_config(setup):
    cfg, grpo, _ = setup
    cap = experiment.load_config("configs/r1_tiny.py:grpo", SMALL + ["moe.dispatch=capacity"])
    parts = trainer.build_state_and_step(cap, grpo.parts.mesh, loss_name="grpo")
    assert parts.model.config.moe_dispatch == "capacity"
    g = grpo_lib.GRPO(cap, parts, grpo.tokenizer)
    assert g.sampler.model.config.moe_dispatch == "dropless"
    assert g.inference_model.config.moe_dispatch == "dropless"
