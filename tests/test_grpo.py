"""The GRPO loop (rl/grpo.py) against independent computations of each of its parts.

A tiny random policy on the r1_tiny GRPO stage: the rollout's rewards are the reward
functions applied to the decoded completions, its advantages are the group formula, its
old log-probs are the forward's at the policy temperature on exactly the sampled tokens,
and a run stopped after its checkpoint resumes with the samples of an uninterrupted run.
"""
import json

import jax
import numpy as np
import pytest

from deepseek_jax import experiment, trainer, warm_start
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
    # Old log-probs: the forward's at the policy temperature, where the loss counts.
    forward = grpo.logprobs(state.params, b)
    mask = b["loss_mask"] > 0
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
def test_run_resumes_exactly_and_evaluates_heldout(tmp_path, monkeypatch):
    """A GRPO run stopped after a checkpoint continues with the uninterrupted run's rewards."""
    init = tmp_path / "init"
    base = experiment.load_config("configs/r1_tiny.py:sft", [o for o in SMALL if not o.startswith("grpo")]
                                  + ["total_steps=1", "data.batch_size=8", "data.seq_len=64",
                                     "progress=False", "optimizer.warmup_steps=0"])
    trainer.train(base, str(init))
    common = SMALL + ["grpo.eval_problems=8", "log_every=1", "checkpoint_every=1",
                      "optimizer.warmup_steps=1"]

    def run(workdir, steps):
        cfg = experiment.load_config("configs/r1_tiny.py:grpo", common + [f"total_steps={steps}"])
        return grpo_lib.run(cfg, str(workdir), init_from=str(init))

    full = run(tmp_path / "full", 3)
    run(tmp_path / "cut", 2)
    resumed = run(tmp_path / "cut", 3)

    def rewards_of(workdir):
        rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
        return {r["step"]: r["reward_mean"] for r in rows if "reward_mean" in r}

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
