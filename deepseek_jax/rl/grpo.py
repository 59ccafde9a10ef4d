"""GRPO with rule-based rewards (DeepSeekMath §4, DeepSeek-R1 §2.2): the RL stage of the recipe.

One GRPO step:
  1. take `prompts_per_step` training problems (a pure function of the seed and step);
  2. sample `group_size` completions for each with the current policy (rl/sampler.py);
  3. score them with the configured rewards (rl/rewards.py), compute group advantages
     (`grpo` z-score, `dr_grpo`, `rloo`; rl/advantages.py); optionally give no loss to
     groups whose rewards are all equal (DAPO dynamic sampling) and to completions that
     hit max_new_tokens unfinished (DAPO overlong filtering);
  4. old-policy log-probs come with the samples (the sampler's temperature-1 log-softmax);
     reference log-probs come from a forward of the reference params (skipped if beta = 0,
     when the old policy stands in and the "kl" metric measures drift from the rollouts);
  5. `inner_steps` (mu) updates of THE train step (train_step.py) with the `grpo` loss.
The reference policy is the starting policy, reset to the current one every
`ref_reset_every` steps (R1-Zero: 400). Rows dropped in (3) keep their place in the batch
with an all-zero loss mask, so shapes never change and nothing recompiles.

Metrics per step: reward mean/std (total and per reward function), accuracy, format rate,
completion length, fraction of informative groups, the loss's KL, clip fractions, entropy,
and the split of wall time between rollout and training.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from deepseek_jax import losses
from deepseek_jax.config import ConfigError
from deepseek_jax.model import inference_model
from deepseek_jax.data import synthetic
from deepseek_jax.rl import advantages as adv_lib
from deepseek_jax.rl import rewards as rewards_lib
from deepseek_jax.rl.sampler import Sampler

log = logging.getLogger(__name__)


def default_grpo_config() -> ml_collections.ConfigDict:
    """`cfg.grpo`: the RL stage's own settings (the model, optimizer, mesh are the usual keys)."""
    return ml_collections.ConfigDict(dict(
        group_size=8,  # G completions per prompt
        prompts_per_step=16,
        max_prompt_len=32,  # tokens, bos included; longer prompts are an error
        max_new_tokens=48,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        estimator="grpo",  # "grpo" | "dr_grpo" | "rloo"
        dynamic_sampling=False,  # DAPO: no loss on groups whose rewards are all equal
        mask_truncated=False,  # DAPO overlong filtering: no loss on unfinished completions
        inner_steps=1,  # mu: updates per batch of samples
        ref_reset_every=0,  # 0 = the reference stays the starting policy
        rewards=ml_collections.ConfigDict({"accuracy": 1.0, "format": 0.1}),
        task=ml_collections.ConfigDict(dict(task="arithmetic", digits=(1, 2), ops="+-")),
        eval_problems=200,
        eval_temperature=0.0,  # 0 = greedy
        speculative="",  # "mtp": MTP self-speculative rollouts (same distribution, fewer steps)
        tis_cap=0.0,  # > 0: truncated importance sampling, weight min(pi_old_train / pi_sampler, cap)
        # Router replay: the sampler records each token's experts per MoE layer and every training /
        # reference forward routes the rollout's tokens to them (gates from the current router).
        router_replay=False,
        sample_texts=4,  # completions written to TensorBoard per log step
        # Your prompts and rewards (post_train.py): JSONL/Parquet files with a `prompt` or `messages`
        # column plus any others (passed to the rewards); "" = the embedded tasks above.
        prompts="",
        eval_prompts="",
        reward_spec="",  # "NAME=WEIGHT,..." (registry names, pkg.mod:fn, path/file.py:fn); "" = `rewards`
        max_reward_failure_fraction=0.1,  # stop when more reward calls fail (raise / NaN) in a step
    ))


@dataclasses.dataclass
class Rollout:
    problems: list  # P problem dicts, each repeated G times in the rows
    completions: list  # B decoded completion strings
    rewards: np.ndarray  # [B] total reward
    per_reward: dict  # name -> [B]
    lengths: np.ndarray  # [B] completion tokens
    truncated: np.ndarray  # [B] hit max_new_tokens without a stop token
    batch: dict  # the GRPO training batch (numpy)
    informative: np.ndarray  # [P] groups with unequal rewards
    mismatch: dict = dataclasses.field(default_factory=dict)  # sampler vs trainer log-prob metrics


def encode_prompts(tokenizer, problems: Sequence[dict], max_prompt_len: int) -> list[list[int]]:
    # "_input": a chat-templated prompt (post_train.load_prompts) that writes its own bos.
    ids = [tokenizer.encode(p["_input"]) if p.get("_input") else tokenizer.encode(p["prompt"], add_bos=True)
           for p in problems]
    longest = max(map(len, ids))
    if longest > max_prompt_len:
        raise ValueError(f"grpo.max_prompt_len={max_prompt_len} but a prompt has {longest} tokens; "
                         f"raise grpo.max_prompt_len to at least {longest}")
    return ids


def completion_texts(tokenizer, sample) -> list[str]:
    """Decoded completions, the stop token excluded."""
    tokens, mask = np.asarray(sample.tokens), np.asarray(sample.mask)
    stop = tokenizer.eos_id
    return [tokenizer.decode([t for t, m in zip(row, row_mask) if m and t != stop])
            for row, row_mask in zip(tokens, mask)]


class GRPO:
    """Rollouts, scoring and updates for one model on one mesh (see the module docstring).

    parts: `trainer.build_state_and_step(cfg, mesh, loss_name="grpo")`.
    """

    def __init__(self, cfg: ml_collections.ConfigDict, parts: Any, tokenizer):
        self.cfg, self.g, self.parts, self.tokenizer = cfg, cfg.grpo, parts, tokenizer
        if self.g.estimator not in adv_lib.ESTIMATORS:
            raise ValueError(f"grpo.estimator={self.g.estimator!r}: use one of {adv_lib.ESTIMATORS}")
        # Rollouts and their log-probs never drop tokens (model.inference_model), whatever
        # the training dispatch: a sample must not depend on the other rows of its batch.
        self.inference_model = inference_model(parts.model)
        self.router_replay = bool(self.g.get("router_replay", False))
        if self.router_replay and not parts.model.config.is_moe:
            raise ConfigError("grpo.router_replay=True replays MoE routing; this model has no MoE layers: "
                              "set grpo.router_replay=False")
        if self.router_replay and self.g.get("speculative"):
            raise ConfigError(f"grpo.router_replay=True with grpo.speculative={self.g.speculative!r} is not "
                              "supported (speculative rollouts do not record expert ids): set "
                              "grpo.speculative='' or grpo.router_replay=False")
        self.sampler = Sampler(self.inference_model, self.g.max_prompt_len, self.g.max_new_tokens,
                               pad_id=tokenizer.pad_id, speculative=self.g.get("speculative") or None,
                               record_experts=self.router_replay)
        self.tis_cap = float(self.g.get("tis_cap", 0.0))
        self._train_logprobs = jax.jit(self._train_logprobs_impl)
        loss_cfg = losses.LossConfig.coerce(dict(cfg.get("loss_config", {})))
        self.beta, self.policy_temperature = loss_cfg.beta, loss_cfg.policy_temperature
        if self.policy_temperature != self.g.temperature:
            raise ValueError(
                f"loss_config.policy_temperature={self.policy_temperature} but grpo.temperature="
                f"{self.g.temperature}: the loss must score the distribution the rollouts were drawn "
                "from; set both to the same value")
        self._logprobs = jax.jit(self._logprobs_impl)
        spec = self.g.get("reward_spec", "")
        named = (rewards_lib.parse_reward_spec(spec) if spec else
                 [(n, w, rewards_lib.get_reward(n)) for n, w in self.g.rewards.to_dict().items()])
        self.scorer = rewards_lib.Scorer(named, self.g.get("max_reward_failure_fraction", 0.1))

    # ----- pieces ------------------------------------------------------------------------------

    def _in_mesh(self):
        return _MeshContext(self.parts.mesh, self.parts.rules)

    def _logprobs_impl(self, params, batch):
        out = self.inference_model.apply({"params": params}, batch["tokens"], positions=batch["positions"],
                                         segment_ids=batch["segment_ids"], expert_ids=batch.get("expert_ids"))
        return losses.token_logprobs(out.logits / self.policy_temperature, batch["targets"])[0]

    def _train_logprobs_impl(self, params, batch):
        out = self.parts.model.apply({"params": params}, batch["tokens"], positions=batch["positions"],
                                     segment_ids=batch["segment_ids"], expert_ids=batch.get("expert_ids"))
        return losses.token_logprobs(out.logits, batch["targets"])[0]

    def train_logprobs(self, params, batch: dict) -> np.ndarray:
        """log pi(target) at temperature 1 from the trainer's model (its MoE dispatch): the
        trainer's view of the rollout policy, compared with the sampler's every step."""
        from deepseek_jax.trainer import global_batch

        keys = ("tokens", "positions", "segment_ids", "targets") + (("expert_ids",) if "expert_ids" in batch else ())
        with self._in_mesh():
            return np.asarray(self._train_logprobs(params, global_batch({k: batch[k] for k in keys},
                                                                       self.parts.mesh)))

    def logprobs(self, params, batch: dict) -> np.ndarray:
        """log pi(target) at the policy temperature for every column of a GRPO batch."""
        from deepseek_jax.trainer import global_batch  # the trainer's host -> global array helper

        keys = ("tokens", "positions", "segment_ids", "targets") + (("expert_ids",) if "expert_ids" in batch else ())
        with self._in_mesh():
            return np.asarray(self._logprobs(params, global_batch({k: batch[k] for k in keys},
                                                                 self.parts.mesh)))

    def generate(self, params, problems: Sequence[dict], rng, *, temperature: float, num_samples: int = 1):
        """`num_samples` completions per problem (rows problem-major), one prefill per problem."""
        prompts = encode_prompts(self.tokenizer, problems, self.g.max_prompt_len)
        with self._in_mesh():
            return self.sampler.generate(params, prompts, rng, temperature=temperature, top_p=self.g.top_p,
                                         top_k=self.g.top_k, stop_tokens=[self.tokenizer.eos_id],
                                         num_samples=num_samples)

    def rollout(self, params, problems: Sequence[dict], rng) -> Rollout:
        """G samples per problem, their rewards, advantages and the training batch."""
        G = self.g.group_size
        rows = [p for p in problems for _ in range(G)]
        sample = jax.device_get(self.generate(params, problems, rng, temperature=self.g.temperature,
                                              num_samples=G))
        texts = completion_texts(self.tokenizer, sample)
        per_reward, _ = self.scorer(rows, texts)  # failures score 0, are logged, and are limited
        total = np.sum(list(per_reward.values()), axis=0).astype(np.float32)
        rewards_PxG = total.reshape(len(problems), G)
        advantages = adv_lib.group_advantages(rewards_PxG, self.g.estimator).reshape(-1)
        informative = adv_lib.informative_groups(rewards_PxG)
        keep = np.ones(len(rows), bool)
        if self.g.dynamic_sampling:
            keep &= np.repeat(informative, G)
        lengths = np.asarray(sample.lengths)
        last = np.asarray(sample.tokens)[np.arange(len(rows)), np.maximum(lengths - 1, 0)]
        truncated = (lengths == self.g.max_new_tokens) & (last != self.tokenizer.eos_id)
        if self.g.mask_truncated:
            keep &= ~truncated
        batch = adv_lib.build_grpo_batch(*jax.device_get(sample.sequences()), sample.logprobs, advantages, keep)
        if self.router_replay:  # aligned with the batch's input tokens (column t feeds token t)
            batch["expert_ids"] = np.asarray(sample.expert_ids)[:, :-1]
        # The sampler (cached decode, other shapes, dropless dispatch) and the trainer disagree
        # slightly, MoE routing amplifying it (a token near a top-k boundary takes another
        # expert): logged every step, and corrected for with grpo.tis_cap.
        sampler_logp = batch["old_logprobs"]
        completion = np.asarray(sample.sequences()[3])[:, 1:]  # targets that are completion tokens
        train_logp = self.train_logprobs(params, batch)
        mismatch = sampler_mismatch(sampler_logp, train_logp, completion)
        if self.policy_temperature != 1.0:
            # The sampler reports temperature-1 log-probs; the policy here is the tempered one.
            batch["old_logprobs"] = self.logprobs(params, batch) * batch["loss_mask"]
        if self.tis_cap > 0:
            # Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly
            # brings you off-policy RL training"): per token min(pi_old_train / pi_sampler, C), both
            # at temperature 1 (the sampler's log-probs).
            log_w = np.where(completion, train_logp - sampler_logp, 0.0)
            batch["tis_weight"] = np.minimum(np.exp(log_w), self.tis_cap).astype(np.float32)
        return Rollout(list(problems), texts, total, per_reward, lengths, truncated, batch, informative, mismatch)

    def reference_logprobs(self, ref_params, batch: dict) -> np.ndarray:
        if not self.beta:
            # The KL term is off: skip the forward. With the old policy standing in, the
            # reported "kl" then measures the drift from the rollout policy instead.
            return batch["old_logprobs"]
        return self.logprobs(ref_params, batch)

    def step(self, state, ref_params, problems: Sequence[dict], rng):
        """One GRPO step; returns (state, host metrics, rollout)."""
        from deepseek_jax.trainer import global_batch, step_metrics

        t0 = time.perf_counter()
        ro = self.rollout(state.params, problems, rng)
        batch = dict(ro.batch, ref_logprobs=self.reference_logprobs(ref_params, ro.batch))
        t1 = time.perf_counter()
        device_batch = global_batch(batch, self.parts.mesh)
        totals = {}
        for _ in range(self.g.inner_steps):
            state, metrics = self.parts.train_step(state, device_batch)
            for k, v in step_metrics(metrics).items():
                totals[k] = totals.get(k, 0.0) + float(v) / self.g.inner_steps
        t2 = time.perf_counter()
        record = dict(totals, **rollout_metrics(ro), rollout_s=t1 - t0, train_s=t2 - t1)
        return state, record, ro


def sampler_mismatch(sampler_logp, train_logp, mask) -> dict:
    """max and mean |log pi_sampler - log pi_old_train| over completion tokens, and the mismatch
    KL(pi_sampler || pi_old_train) estimated on the sampled tokens (k3, always >= 0)."""
    m = np.asarray(mask) > 0
    if not m.any():
        return {"logp_mismatch_max": 0.0, "logp_mismatch_mean": 0.0, "mismatch_kl": 0.0}
    d = (np.asarray(train_logp, np.float64) - np.asarray(sampler_logp, np.float64))[m]
    return {"logp_mismatch_max": float(np.abs(d).max()), "logp_mismatch_mean": float(np.abs(d).mean()),
            "mismatch_kl": float(np.mean(np.exp(d) - d - 1.0))}


def rollout_metrics(ro: Rollout) -> dict:
    out = {"reward_mean": float(ro.rewards.mean()), "reward_std": float(ro.rewards.std()),
           "completion_length": float(ro.lengths.mean()), "truncated_frac": float(ro.truncated.mean()),
           "informative_groups": float(ro.informative.mean()), **ro.mismatch}
    for name, values in ro.per_reward.items():
        out[f"reward/{name}"] = float(values.mean())
    if _is_user_row(ro.problems[0]):
        return out  # accuracy and format rate are the embedded tasks' measures
    out["accuracy"] = float(np.mean([rewards_lib.accuracy(p["prompt"], c, **p)
                                     for p, c in zip(_rows(ro), ro.completions)]))
    out["format_rate"] = float(np.mean([rewards_lib.format_reward(p["prompt"], c, **p)
                                        for p, c in zip(_rows(ro), ro.completions)]))
    return out


def _is_user_row(problem: dict) -> bool:
    return "_where" in problem  # rows of grpo.prompts / grpo.eval_prompts files


def _rows(ro: Rollout) -> list:
    G = len(ro.completions) // len(ro.problems)
    return [p for p in ro.problems for _ in range(G)]


def evaluate(grpo: GRPO, params, problems: Sequence[dict], rng, *, batch_size: int = 256,
             temperature: Optional[float] = None) -> dict:
    """Accuracy, format rate and mean length on `problems` (one sample each); for greedy
    decoding of a model with MTP modules also the MTP draft acceptance rate
    (`Sampler.mtp_draft_acceptance`)."""
    temperature = grpo.g.eval_temperature if temperature is None else temperature
    with_mtp = temperature == 0 and grpo.parts.model.config.num_mtp_layers > 0
    acc, fmt, length, hits, drafts = [], [], [], 0, 0
    # Fewer problems than a batch: the smallest batch that holds them and splits over the mesh
    # (a test's 8 held-out problems in 256 rows cost 32 times the work).
    per_mesh = grpo.parts.mesh.size
    batch_size = min(batch_size, max(1, -(-len(problems) // per_mesh)) * per_mesh)
    for start in range(0, len(problems), batch_size):
        chunk = list(problems[start:start + batch_size])
        real = len(chunk)
        chunk += [chunk[-1]] * (batch_size - real)  # one compiled shape for every chunk
        sample = grpo.generate(params, chunk, jax.random.fold_in(rng, start), temperature=temperature)
        if with_mtp:
            with grpo._in_mesh():
                d = grpo.sampler.mtp_draft_acceptance(params, jax.tree.map(lambda x: x[:real], sample))
            hits, drafts = hits + d["hits"], drafts + d["drafts"]
        sample = jax.device_get(sample)
        texts = completion_texts(grpo.tokenizer, sample)[:real]
        length += list(np.asarray(sample.lengths)[:real])
        if _is_user_row(chunk[0]):  # user prompts: the configured rewards are the measure
            per, _ = grpo.scorer(chunk[:real], texts)
            acc += list(np.sum(list(per.values()), axis=0))
            continue
        acc += [rewards_lib.accuracy(p["prompt"], t, **p) for p, t in zip(chunk, texts)]
        fmt += [rewards_lib.format_reward(p["prompt"], t, **p) for p, t in zip(chunk, texts)]
    measure = "reward_mean" if fmt == [] and problems and _is_user_row(problems[0]) else "accuracy"
    out = {measure: float(np.mean(acc)), "completion_length": float(np.mean(length)), "problems": len(problems)}
    if measure == "accuracy":
        out["format_rate"] = float(np.mean(fmt))
    if with_mtp:
        out["mtp_acceptance"] = hits / max(drafts, 1)
    return out


def training_problems(cfg: ml_collections.ConfigDict, step: int) -> list[dict]:
    """The prompts of GRPO step `step`: a pure function of (seed, step), from the train split
    (or from the rows of `grpo.prompts`)."""
    g = cfg.grpo
    if g.get("prompts"):
        from deepseek_jax import post_train

        return post_train.prompts_for_step(cfg, step)
    P = g.prompts_per_step
    options = _task_options(g)
    return [synthetic.make_problem(step * P + i, split="train", seed=f"grpo/{cfg.seed}", **options)
            for i in range(P)]


def heldout_problems(cfg: ml_collections.ConfigDict, n: Optional[int] = None) -> list[dict]:
    """The held-out set: `grpo.eval_prompts`' rows, none when only `grpo.prompts` is set, else
    the embedded tasks' held-out split."""
    if cfg.grpo.get("eval_prompts"):
        from deepseek_jax import post_train

        return post_train.load_prompts(cfg, cfg.grpo.eval_prompts)[:n]
    if cfg.grpo.get("prompts"):
        return []
    return synthetic.make_problems("heldout", n or cfg.grpo.eval_problems, seed=cfg.seed,
                                   **_task_options(cfg.grpo))


def _task_options(g) -> dict:
    options = dict(g.task.to_dict())
    return {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}


class _MeshContext:
    """The ambient mesh and logical rules the model's sharding annotations read."""

    def __init__(self, mesh, rules):
        self.cms = [jax.set_mesh(mesh), nn.logical_axis_rules(rules)]

    def __enter__(self):
        for cm in self.cms:
            cm.__enter__()

    def __exit__(self, *exc):
        for cm in reversed(self.cms):
            cm.__exit__(*exc)
        return False


# ----- the GRPO run: `python -m deepseek_jax.train` for the RL stage ---------------------------

def run(cfg: ml_collections.ConfigDict, workdir: str, init_from: Optional[str] = None) -> dict:
    """GRPO from the params of the run in `init_from` (e.g. the SFT stage), in `workdir`.

    Resumes from `workdir`'s newest checkpoint (state and reference params) if there is
    one. Returns the last logged record plus the final held-out evaluation.
    """
    from deepseek_jax import post_train

    cfg = post_train.resolve_init_from(cfg)  # an HF / convert / workdir init_from gives the model
    import os

    from deepseek_jax import trainer, warm_start
    from deepseek_jax.checkpoint import Checkpointer
    from deepseek_jax.data.tokenizer import get_tokenizer
    from deepseek_jax.metrics import MetricsWriter

    from deepseek_jax import loading
    from deepseek_jax.config import ConfigError

    if "grpo" not in cfg:
        raise ConfigError("loss='grpo' needs the grpo.* settings: use a GRPO config such as "
                          "configs/r1_tiny.py:grpo (or add rl.grpo.default_grpo_config() as cfg.grpo)")
    # Read-only checks first: a refused start writes nothing (trainer.train does the same).
    trainer.check_workdir(cfg, workdir)
    resuming = bool(loading.complete_steps(workdir))
    if not resuming and not init_from:
        raise ConfigError("init_from='': GRPO starts from a trained policy; pass "
                          "--config.init_from=WORKDIR of the SFT run (or a HF / convert directory)")
    mesh = trainer.build_mesh(cfg)
    parts = trainer.build_state_and_step(cfg, mesh, loss_name="grpo")
    grpo = GRPO(cfg, parts, get_tokenizer(cfg.data.tokenizer))
    restored = None
    abstract = {"state": parts.abstract_state, "ref_params": parts.abstract_state.params}
    if resuming:
        ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.keep_checkpoints)
        restored = ckpt.restore(abstract)
    if restored is not None:
        state, ref_params = restored.state["state"], restored.state["ref_params"]
    else:
        params = post_train.fit_params(warm_start.load_params(init_from, mesh), parts.abstract_state.params)
        state = warm_start.state_from_params(parts, params)
        ref_params = jax.tree.map(jnp.copy, state.params)  # the step donates the state's buffers
    trainer.write_config(cfg, workdir)
    if restored is None:
        ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.keep_checkpoints)
    writer = MetricsWriter(workdir, resume_step=restored.step if restored is not None else None)
    step = int(jax.device_get(state.step))
    heldout = heldout_problems(cfg)
    eval_rng = jax.random.key(cfg.seed + 1)
    last = {}
    try:
        while step < cfg.total_steps:
            rng = jax.random.fold_in(jax.random.key(cfg.seed), step)
            state, record, ro = grpo.step(state, ref_params, training_problems(cfg, step), rng)
            step += 1
            if grpo.g.ref_reset_every and step % grpo.g.ref_reset_every == 0:
                ref_params = jax.tree.map(jnp.copy, state.params)  # the state's buffers are donated
            if heldout and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.total_steps:
                record.update({f"eval/{k}": v for k, v in evaluate(grpo, state.params, heldout, eval_rng).items()})
            if step % cfg.log_every == 0 or step == cfg.total_steps:
                last = writer.write(step, record)
                for i in range(min(grpo.g.sample_texts, len(ro.completions))):
                    writer.write_text(step, f"samples/{i}", f"{_rows(ro)[i]['prompt']} -> {ro.completions[i]}")
                log.info("grpo step %d: reward %.3f accuracy %.3f length %.1f (rollout %.1fs, train %.1fs)",
                         step, record["reward_mean"], record.get("accuracy", float("nan")), record["completion_length"],
                         record["rollout_s"], record["train_s"])
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                ckpt.save(step, {"state": state, "ref_params": ref_params}, config=cfg)
        final = evaluate(grpo, state.params, heldout, eval_rng) if heldout else {}
        if final:
            writer.write(step, {f"eval/{k}": v for k, v in final.items()})
        ckpt.save(step, {"state": state, "ref_params": ref_params}, config=cfg, force=True)
        ckpt.wait()
    finally:
        ckpt.close()
        writer.close()
    if cfg.get("export_hf"):
        post_train.export_hf(cfg, parts.model, state.params, cfg.export_hf)
    return {**last, "step": step, "heldout": final, "reward_failures": grpo.scorer.failures}
