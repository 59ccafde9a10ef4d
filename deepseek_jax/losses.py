"""Training objectives: one signature, one registry, one normalisation contract.

Dimension legend: B batch (rows), T time, V vocabulary, N MTP depth, L MoE layers,
E routed experts, G expert groups (devices / nodes), k teacher top-k.

Every loss has the signature

    loss_fn(params, batch, rng, *, model, cfg) -> (loss, metrics)

and is picked by name: `get_loss("pretrain" | "sft" | "grpo" | "distill" | "dpo")`. `model` is
a Flax module returning `outputs.ModelOutput` with a `.config` (ModelConfig); `cfg` is a
`LossConfig`, a dict of its fields, or None for the defaults. `rng` is accepted for
objectives that sample; the ones here are deterministic and ignore it.

Normalisation contract (REFERENCES.md: normalisation under gradient accumulation)
-----------------------------------------------------------------------------------
Each term of a loss is a SUM over counted units divided by a COUNT of those units. The
train step accumulates gradients over micro-batches, so the counts must be those of the
whole global batch. Before splitting the global batch the step calls

    counts = global_counts(name, batch, cfg)
    # {"global_denominator": .., "global_tokens": .., "global_rows": ..}  (float32 scalars)

and merges these scalars into every micro-batch (`mb = {**mb, **counts}`). A loss divides
by them when present and by the counts of the batch it was given otherwise, so a lone
batch needs nothing. With them, for any split of the rows into micro-batches:

    sum over micro-batches of loss     == loss of the global batch
    sum over micro-batches of metrics  == metrics of the global batch   (every entry)

Every metric is a sum or a sum divided by a global count, so the step SUMS metrics over
micro-batches and never averages them. MoE models add `moe/expert_counts` [L, E], the
routed token-slots per expert, whose sum is the global load the aux-loss-free bias update
(V3 §2.1.2) needs. The counts are:

- global_denominator: the main objective's units. Tokens (sum of loss_mask) for pretrain,
  sft, distill and GRPO "token_mean"; sequences with a counted token for GRPO
  "seq_mean_token_mean"; those sequences times max_len for "seq_mean_token_sum_norm";
  preference pairs for dpo.
- global_tokens: sum of loss_mask (token means: MTP, z-loss, accuracy, entropy, KL).
- global_rows: rows holding a non-padding token (segment_ids != 0): the sequence-wise
  router losses (V3 eq. 17-20, V2 §2.2.3 eq. 12-20), computed per row from `MoEStats`.

metrics["denominator"], ["tokens"] and ["rows"] are the local counts (they also sum to the
global ones). Setting all three global counts to 1.0 turns every term into its plain sum.
Rows are never split, so DPO micro-batches must hold whole (chosen, rejected) row pairs.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp

from deepseek_jax.chunked_xent import map_head

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
RATIO_LEVELS = ("token", "sequence")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Hyper-parameters of every objective (each loss reads the fields it needs)."""

    # Language modelling (pretrain, sft; the CE part of distill).
    mtp_weight: float = 0.3  # V3 eq. 25 lambda: 0.3, then 0.1 late in training
    z_loss: float = 0.0  # PaLM output z-loss coefficient (1e-4 there)
    # Router losses of MoE models, summed over MoE layers, averaged over rows.
    seq_aux_alpha: float = 1e-4  # V3 sequence-wise balance loss (eq. 17-20)
    expert_aux_alpha: float = 0.0  # V2 expert-level balance alpha_1 = 0.003 (eq. 12-14)
    device_aux_alpha: float = 0.0  # V2 device-level balance alpha_2 = 0.05 (eq. 15-17)
    comm_aux_alpha: float = 0.0  # V2 communication balance alpha_3 = 0.02 (eq. 18-20)
    router_z_loss: float = 0.0  # ST-MoE router z-loss coefficient (1e-3 there)
    # GRPO (DeepSeekMath eq. 3; DAPO clip-higher sets eps_high = 0.28).
    eps_low: float = 0.2
    eps_high: float = 0.2
    beta: float = 0.001  # k3 KL coefficient (R1-Zero 0.001, DeepSeekMath 0.04)
    aggregation: str = "token_mean"
    max_len: Optional[int] = None  # Dr. GRPO constant normaliser; None = the batch's T
    ratio_level: str = "token"  # "sequence" = GSPO length-normalised sequence ratio
    # The policy whose samples GRPO scores is softmax(logits / policy_temperature): the
    # sampling temperature. Ratios, KL and entropy then all refer to that distribution.
    policy_temperature: float = 1.0
    # Logit distillation (Hinton et al. 2015).
    temperature: float = 1.0
    distill_alpha: float = 1.0  # weight of the KD term; 1 - distill_alpha weighs the CE
    # DPO (Rafailov et al. 2023, eq. 7).
    dpo_beta: float = 0.1

    def __post_init__(self):
        def check(ok, field, fix):
            if not ok:
                raise ValueError(f"loss.{field}={getattr(self, field)!r}: {fix}")

        check(self.aggregation in AGGREGATIONS, "aggregation", f"use one of {AGGREGATIONS}")
        check(self.ratio_level in RATIO_LEVELS, "ratio_level", f"use one of {RATIO_LEVELS}")
        check(0.0 <= self.eps_low < 1.0, "eps_low", "the lower clip 1 - eps_low must stay in (0, 1]")
        check(self.eps_high >= 0.0, "eps_high", "must be >= 0")
        check(self.temperature > 0.0, "temperature", "must be > 0")
        check(self.policy_temperature > 0.0, "policy_temperature",
              "must be > 0 (the sampling temperature; greedy rollouts cannot be trained on)")
        check(0.0 <= self.distill_alpha <= 1.0, "distill_alpha", "must be in [0, 1]")
        check(self.max_len is None or self.max_len > 0, "max_len", "use None (= T) or a positive length")
        # Both coefficients weigh the same formula (V3 eq. 17-20 is V2 eq. 12-14 per sequence).
        check(not (self.seq_aux_alpha and self.expert_aux_alpha), "expert_aux_alpha",
              f"seq_aux_alpha={self.seq_aux_alpha} weighs the same loss; set only one of them "
              "(seq_aux_alpha for V3, expert_aux_alpha for V2)")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LossConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown LossConfig field(s) {unknown}; known fields: {sorted(names)}")
        return cls(**dict(d))

    @classmethod
    def coerce(cls, cfg: Any) -> "LossConfig":
        """Accept None (defaults), a LossConfig, a dict or an ml_collections ConfigDict."""
        if cfg is None:
            return cls()
        if isinstance(cfg, cls):
            return cfg
        if hasattr(cfg, "to_dict"):
            cfg = cfg.to_dict()
        return cls.from_dict(cfg)


# ----- pure pieces ---------------------------------------------------------------------------

def token_logprobs(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(log p(target), log Z) per position, in float32; cross-entropy is -log p(target).

    Targets outside [0, V) (padding ids) are clipped: callers mask those positions.
    """
    target_BxT, logz_BxT, _ = target_logz_max(logits_BxTxV, _clip_ids(targets_BxT, logits_BxTxV))
    return target_BxT - logz_BxT, logz_BxT


def _clip_ids(targets_BxT: jax.Array, logits_BxTxV: jax.Array) -> jax.Array:
    return jnp.clip(targets_BxT, 0, logits_BxTxV.shape[-1] - 1)


@jax.custom_vjp
def target_logz_max(logits_BxTxV: jax.Array, ids_BxT: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(the target's logit, log Z, the largest logit) per position, float32; ids in [0, V).

    Two passes over the logits (the max, then the shifted exp-sum). custom_vjp because the
    gradient, g_target * onehot(target) + g_logz * softmax, is then one fused pass that reads
    the logits once and writes their gradient, where autodiff's took four passes over the
    [B, T, V] float32 array (exp, a product, a scatter-add of the target's term, a convert;
    XLA's cost analysis of the bench model's head + CE, fwd + bwd: 3.4 -> 1.9 GB accessed).
    The max is returned without a gradient: the losses only compare against it (accuracy).
    """
    return _target_logz_max_fwd(logits_BxTxV, ids_BxT)[0]


def _target_logz_max_fwd(logits_BxTxV, ids_BxT):
    logits = logits_BxTxV.astype(jnp.float32)
    target_BxT = jnp.take_along_axis(logits, ids_BxT[..., None], axis=-1)[..., 0]
    top_BxT = jnp.max(logits, axis=-1)
    shift_BxT = jnp.where(jnp.isfinite(top_BxT), top_BxT, 0.0)
    logz_BxT = shift_BxT + jnp.log(jnp.sum(jnp.exp(logits - shift_BxT[..., None]), axis=-1))
    return (target_BxT, logz_BxT, top_BxT), (logits_BxTxV, ids_BxT, logz_BxT)


def _target_logz_max_bwd(res, g):
    logits_BxTxV, ids_BxT, logz_BxT = res
    g_target_BxT, g_logz_BxT, _ = g  # the max has no gradient (see the docstring)
    logits = logits_BxTxV.astype(jnp.float32)
    probs = jnp.exp(logits - logz_BxT[..., None])
    is_target = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == ids_BxT[..., None]
    d = g_logz_BxT[..., None] * probs + jnp.where(is_target, g_target_BxT[..., None], 0.0)
    return d.astype(logits_BxTxV.dtype), None


target_logz_max.defvjp(_target_logz_max_fwd, _target_logz_max_bwd)


def token_entropy(logits_BxTxV: jax.Array) -> jax.Array:
    """Entropy of the full predictive distribution per position, float32."""
    logp = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def mtp_targets(targets_BxT: jax.Array, loss_mask_BxT: jax.Array, segment_ids_BxT: Optional[jax.Array],
                shift: int) -> tuple[jax.Array, jax.Array]:
    """Targets and mask of MTP depth `shift` (V3 §2.2): position t predicts targets[t + shift].

    mtp_logits[k] uses shift = k + 1 (it predicts tokens[t + k + 2] = targets[t + k + 1]). A
    position counts only if t + shift is inside the row, in the same document, and its
    target counts in loss_mask; so nothing is predicted across a document boundary.
    """
    B, T = targets_BxT.shape
    pad = lambda a, v: jnp.concatenate([a[:, shift:], jnp.full((B, min(shift, T)), v, a.dtype)], 1)[:, :T]
    seg = jnp.ones_like(targets_BxT) if segment_ids_BxT is None else segment_ids_BxT
    same_doc = (pad(seg, 0) == seg) & (seg != 0)
    mask = jnp.where(same_doc, pad(loss_mask_BxT.astype(jnp.float32), 0.0), 0.0)
    return pad(targets_BxT, 0), mask


def _per_row(x_LxBxE: jax.Array, tokens_B: jax.Array) -> jax.Array:
    """Divide per-row sums by the row's token count (empty rows give 0)."""
    return x_LxBxE / jnp.maximum(tokens_B, 1.0)[None, :, None]


def _group_sum(x_LxBxE: jax.Array, n_group: int) -> jax.Array:
    # Experts are laid out group by group, as in DeepSeek's routing (view(T, n_group, -1)).
    L, B, E = x_LxBxE.shape
    return x_LxBxE.reshape(L, B, n_group, E // n_group).sum(-1)


def expert_balance_loss(counts_LxBxE, probs_LxBxE, tokens_B, top_k: int) -> jax.Array:
    """Sequence-wise balance loss per row, summed over layers, without its alpha: [B].

    V3 eq. 17-20 (= V2 eq. 12-14 per sequence): f_i = E / (K T) * #{t: i in TopK(t)},
    P_i = (1/T) sum_t s'_{i,t}, loss = sum_i f_i P_i. Equals 1 under perfect balance.
    """
    E = counts_LxBxE.shape[-1]
    f = _per_row(counts_LxBxE, tokens_B) * (E / top_k)
    return jnp.sum(f * _per_row(probs_LxBxE, tokens_B), axis=(0, 2))


def device_balance_loss(counts_LxBxE, probs_LxBxE, tokens_B, top_k: int, n_group: int) -> jax.Array:
    """V2 device-level balance loss per row (§2.2.3 eq. 15-17), summed over layers: [B].

    f'_d = mean of f_j over the experts of device d, P'_d = sum of P_j over them,
    loss = sum_d f'_d P'_d.
    """
    E = counts_LxBxE.shape[-1]
    f = _per_row(counts_LxBxE, tokens_B) * (E / top_k)
    f_dev = _group_sum(f, n_group) / (E // n_group)
    return jnp.sum(f_dev * _group_sum(_per_row(probs_LxBxE, tokens_B), n_group), axis=(0, 2))


def comm_balance_loss(group_tokens_LxBxG, probs_LxBxE, tokens_B, topk_group: int) -> jax.Array:
    """V2 communication balance loss per row (§2.2.3 eq. 18-20), summed over layers: [B].

    f''_d = D / (M T) * #{t: token t is sent to device d}, P''_d = sum of P_j over the
    experts of device d, loss = sum_d f''_d P''_d (D devices = groups, M = topk_group).
    """
    G = group_tokens_LxBxG.shape[-1]
    f = _per_row(group_tokens_LxBxG, tokens_B) * (G / topk_group)
    return jnp.sum(f * _group_sum(_per_row(probs_LxBxE, tokens_B), G), axis=(0, 2))


def router_z_loss(router_z_LxB, tokens_B) -> jax.Array:
    """ST-MoE router z-loss per row, summed over layers: (1/T) sum_t logsumexp(x_t)^2. [B]"""
    return jnp.sum(router_z_LxB / jnp.maximum(tokens_B, 1.0)[None], axis=0)


def grpo_token_objective(logp_BxT, old_logp_BxT, ref_logp_BxT, advantages_B, mask_BxT=None, *,
                         eps_low: float, eps_high: float, beta: float,
                         ratio_level: str = "token") -> dict[str, jax.Array]:
    """Per-token GRPO loss (to minimise), DeepSeekMath eq. 3 with DAPO's asymmetric clip.

    loss_t = -[min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) - beta KL_t], with
    rho = exp(logp - old_logp) and KL_t = exp(ref - logp) - (ref - logp) - 1 (k3, eq. 4).
    ratio_level="sequence" uses GSPO's ratio exp(mean_t(logp - old_logp)) for every token
    of a row, with the per-token gradient of GSPO-token (value of the sequence ratio,
    gradient through each token's logp); it needs `mask_BxT` for the mean.
    Also returns the ratio, the KL and where the clip is active on each side (there the
    surrogate has no gradient).
    """
    log_ratio = logp_BxT - old_logp_BxT
    if ratio_level == "sequence":
        if mask_BxT is None:
            raise ValueError("ratio_level='sequence' (GSPO) needs mask_BxT to average the log-ratio")
        seq = jnp.sum(mask_BxT * log_ratio, 1) / jnp.maximum(jnp.sum(mask_BxT, 1), 1.0)
        log_ratio = jax.lax.stop_gradient(seq)[:, None] + logp_BxT - jax.lax.stop_gradient(logp_BxT)
    elif ratio_level != "token":
        raise ValueError(f"ratio_level={ratio_level!r}; use one of {RATIO_LEVELS}")
    rho = jnp.exp(log_ratio)
    adv = advantages_B.astype(jnp.float32)[:, None]
    surrogate = jnp.minimum(rho * adv, jnp.clip(rho, 1.0 - eps_low, 1.0 + eps_high) * adv)
    d = ref_logp_BxT - logp_BxT
    kl = jnp.exp(d) - d - 1.0
    return {"loss": -(surrogate - beta * kl), "surrogate": surrogate, "ratio": rho, "kl": kl,
            "clipped_low": ((rho < 1.0 - eps_low) & (adv < 0)).astype(jnp.float32),
            "clipped_high": ((rho > 1.0 + eps_high) & (adv > 0)).astype(jnp.float32)}


def grpo_denominator(mask_BxT: jax.Array, aggregation: str, max_len: Optional[int] = None) -> jax.Array:
    """The count GRPO's aggregation divides by (see `aggregate`)."""
    mask = mask_BxT.astype(jnp.float32)
    if aggregation == "token_mean":
        return jnp.sum(mask)
    seqs = jnp.sum(jnp.any(mask > 0, axis=1).astype(jnp.float32))
    if aggregation == "seq_mean_token_mean":
        return seqs
    if aggregation == "seq_mean_token_sum_norm":
        return seqs * float(max_len or mask.shape[1])
    raise ValueError(f"aggregation={aggregation!r}; use one of {AGGREGATIONS}")


def aggregate(x_BxT: jax.Array, mask_BxT: jax.Array, aggregation: str, denominator: jax.Array) -> jax.Array:
    """Reduce per-token values to the scalar GRPO optimises.

    token_mean: sum_{i,t} x / #tokens (DAPO); seq_mean_token_mean: mean over sequences of
    each sequence's token mean (GRPO as published); seq_mean_token_sum_norm: mean over
    sequences of sum_t x / max_len (Dr. GRPO's constant normaliser). `denominator` comes
    from `grpo_denominator` of the global batch, which makes micro-batches add up.
    """
    mask = mask_BxT.astype(jnp.float32)
    if aggregation == "seq_mean_token_mean":
        per_seq = jnp.sum(mask * x_BxT, 1) / jnp.maximum(jnp.sum(mask, 1), 1.0)
        return jnp.sum(per_seq) / denominator
    if aggregation in ("token_mean", "seq_mean_token_sum_norm"):
        return jnp.sum(mask * x_BxT) / denominator
    raise ValueError(f"aggregation={aggregation!r}; use one of {AGGREGATIONS}")


def distill_kl(student_logits_BxTxV, teacher_logprobs_BxTxV, temperature: float) -> jax.Array:
    """tau^2 KL(p_teacher^tau || p_student^tau) per position (Hinton et al. 2015, §2).

    p^tau = softmax(logits / tau); teacher log-probs are logits up to a constant, so they
    are rescaled the same way. The tau^2 keeps gradient sizes independent of tau.
    """
    tau = temperature
    logq = jax.nn.log_softmax(student_logits_BxTxV.astype(jnp.float32) / tau, axis=-1)
    logp = jax.nn.log_softmax(teacher_logprobs_BxTxV.astype(jnp.float32) / tau, axis=-1)
    return tau**2 * _kl_terms(logp, logq)


def distill_kl_topk(student_logits_BxTxV, teacher_ids_BxTxk, teacher_logprobs_BxTxk,
                    temperature: float) -> jax.Array:
    """Memory-light tau^2 KL on the teacher's top-k support per position.

    The teacher is renormalised over its k ids; the student keeps its full-vocabulary
    normaliser, so the value is >= -log(student mass on the k ids) >= 0 and equals
    `distill_kl` when the k ids cover the whole vocabulary.
    """
    tau = temperature
    logq_all = jax.nn.log_softmax(student_logits_BxTxV.astype(jnp.float32) / tau, axis=-1)
    logq = jnp.take_along_axis(logq_all, teacher_ids_BxTxk, axis=-1)
    logp = jax.nn.log_softmax(teacher_logprobs_BxTxk.astype(jnp.float32) / tau, axis=-1)
    return tau**2 * _kl_terms(logp, logq)


def _kl_terms(logp, logq):
    # Teacher zeros (log p = -inf) contribute 0, not nan.
    p = jnp.exp(logp)
    return jnp.sum(jnp.where(p > 0, p * (jnp.where(p > 0, logp, 0.0) - logq), 0.0), axis=-1)


def dpo_objective(policy_chosen_P, policy_rejected_P, ref_chosen_P, ref_rejected_P,
                  beta: float) -> dict[str, jax.Array]:
    """DPO loss per pair (Rafailov et al. 2023, eq. 7) and the implicit rewards.

    loss = -log sigmoid(beta [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))]).
    """
    chosen = beta * (policy_chosen_P - ref_chosen_P)
    rejected = beta * (policy_rejected_P - ref_rejected_P)
    return {"loss": -jax.nn.log_sigmoid(chosen - rejected), "chosen_reward": chosen,
            "rejected_reward": rejected}


# ----- counts (the normalisation contract) ----------------------------------------------------

def _rows(batch) -> jax.Array:
    seg = batch.get("segment_ids")
    if seg is None:
        return jnp.float32(batch["tokens"].shape[0])
    return jnp.sum(jnp.any(seg != 0, axis=1).astype(jnp.float32))


def _main_count(name: str, batch, cfg: LossConfig) -> jax.Array:
    mask = batch["loss_mask"].astype(jnp.float32)
    if name == "grpo":
        return grpo_denominator(mask, cfg.aggregation, cfg.max_len)
    if name == "dpo":
        return jnp.sum(jnp.any(mask[0::2] > 0, axis=1).astype(jnp.float32))
    return jnp.sum(mask)


def local_counts(name: str, batch, cfg=None) -> dict[str, jax.Array]:
    """The counts of `batch` itself: {"denominator", "tokens", "rows"}."""
    cfg = LossConfig.coerce(cfg)
    if name not in LOSSES:
        raise KeyError(f"unknown loss {name!r}; known losses: {sorted(LOSSES)}")
    return {"denominator": _main_count(name, batch, cfg),
            "tokens": jnp.sum(batch["loss_mask"].astype(jnp.float32)), "rows": _rows(batch)}


def global_counts(name: str, batch, cfg=None) -> dict[str, jax.Array]:
    """Counts of the whole global batch, to merge into every micro-batch (module docstring)."""
    return {f"global_{k}": v for k, v in local_counts(name, batch, cfg).items()}


def _normalisers(name: str, batch, cfg: LossConfig):
    """(local counts, counts to divide by): the global ones when the batch carries them."""
    local = local_counts(name, batch, cfg)
    norm = {k: jnp.asarray(batch.get(f"global_{k}", v), jnp.float32) for k, v in local.items()}
    # An all-masked batch has zero counts and zero sums: divide by 1 rather than make a nan.
    return local, {k: jnp.where(v > 0, v, 1.0) for k, v in norm.items()}


# ----- shared parts of the objectives ------------------------------------------------------------

def _forward(model, params, batch):
    # Models that can skip their output head leave it to `_per_token` (no [B, T, V] logits).
    hidden = {"return_hidden": True} if "return_hidden" in inspect.signature(type(model).__call__).parameters else {}
    if "expert_ids" in batch:  # router replay (grpo.router_replay): route to the rollout's experts
        hidden["expert_ids"] = batch["expert_ids"]
    return model.apply({"params": params}, batch["tokens"], positions=batch.get("positions"),
                       segment_ids=batch.get("segment_ids"), **hidden)


def _per_token(fn, out, model, *extras_BxTx_, depth: Optional[int] = None):
    """fn(logits [B, T, V], *extras) -> per-position outputs, for the main head (depth None)
    or MTP depth `depth`; chunk by chunk (chunked_xent.map_head) when the model returned
    its hidden states instead of logits."""
    if out.logits is not None:
        logits = out.logits if depth is None else out.mtp_logits[depth]
        return fn(logits, *extras_BxTx_)
    h = out.hidden if depth is None else out.mtp_hidden[depth]
    return map_head(fn, h, out.head_kernel, *extras_BxTx_, dtype=jnp.dtype(model.config.dtype))


def _num_mtp(out) -> int:
    mtp = out.mtp_logits if out.logits is not None else out.mtp_hidden
    return 0 if mtp is None else mtp.shape[0]


def _logp_logz_hit(logits_BxTxV, targets_BxT):
    """token_logprobs, and hit = 1.0 where the target's logit is the largest (a tie counts).

    The hit reuses logsumexp's max instead of an argmax: a variadic reduce that XLA:CPU does
    not vectorise, a third pass over the [B, T, V] logits and 10% of the bench model's step.
    """
    target_BxT, logz_BxT, top_BxT = target_logz_max(logits_BxTxV, _clip_ids(targets_BxT, logits_BxTxV))
    return target_BxT - logz_BxT, logz_BxT, (target_BxT >= top_BxT).astype(jnp.float32)


def _router_terms(out, model, cfg: LossConfig, rows: jax.Array) -> tuple[jax.Array, dict]:
    """Balance and z losses of the router from per-row MoEStats, averaged over global rows."""
    moe = out.moe
    if moe is None:
        return jnp.float32(0.0), {}
    c = model.config
    K, G = c.num_experts_per_tok, c.n_group
    # Per document (packed rows hold several; V3 eq. 17-20 is per sequence) when the model
    # reports it, else per row. Then averaged over the global rows.
    seq_balance = getattr(moe, "seq_balance", None)
    if seq_balance is None:
        seq_balance = expert_balance_loss(moe.counts, moe.probs, moe.tokens, K)
    expert = jnp.sum(seq_balance) / rows
    z = jnp.sum(router_z_loss(moe.router_z, moe.tokens)) / rows
    # expert_counts [L, E] sums to the global load the aux-loss-free bias update needs.
    metrics = {"moe/expert_balance": expert, "moe/router_z": z, "moe/dropped": jnp.sum(moe.dropped),
               "moe/expert_counts": jnp.sum(moe.counts, axis=1)}
    total = (cfg.seq_aux_alpha + cfg.expert_aux_alpha) * expert + cfg.router_z_loss * z
    if G > 1:
        device = device_balance_loss(moe.counts, moe.probs, moe.tokens, K, G)
        metrics["moe/device_balance"] = jnp.sum(device) / rows
        total = total + cfg.device_aux_alpha * metrics["moe/device_balance"]
    if cfg.comm_aux_alpha:
        group_tokens = getattr(moe, "group_tokens", None)
        if group_tokens is None:
            raise ValueError(
                f"loss.comm_aux_alpha={cfg.comm_aux_alpha} needs the tokens sent to each device "
                "per row (MoEStats.group_tokens [L, B, G]), which this model does not report; "
                "set comm_aux_alpha=0 or add that statistic to the MoE layer")
        metrics["moe/comm_balance"] = jnp.sum(comm_balance_loss(group_tokens, moe.probs, moe.tokens,
                                                                c.topk_group)) / rows
        total = total + cfg.comm_aux_alpha * metrics["moe/comm_balance"]
    metrics["moe/aux_loss"] = total
    return total, metrics


def _plus_router_terms(loss, metrics: dict, out, model, cfg: LossConfig, rows) -> tuple[jax.Array, dict]:
    """(loss + the router's balance and z losses, metrics with theirs and the total as "loss")."""
    router, router_metrics = _router_terms(out, model, cfg, rows)
    loss = loss + router
    return loss, {**metrics, **router_metrics, "loss": loss}


# ----- objectives ----------------------------------------------------------------------------------

def pretrain_loss(params, batch, rng, *, model, cfg=None):
    """Next-token CE + lambda * MTP CE (V3 eq. 21-25) + router losses + optional z-loss.

    CE and MTP terms are divided by the counted tokens, as V3 eq. 24 divides every depth
    by T (positions whose MTP target leaves the document count as zero, not as fewer).
    """
    del rng
    cfg = LossConfig.coerce(cfg)
    local, norm = _normalisers("pretrain", batch, cfg)
    out = _forward(model, params, batch)
    mask = batch["loss_mask"].astype(jnp.float32)
    logp, logz, hits = _per_token(_logp_logz_hit, out, model, batch["targets"])
    ce = -jnp.sum(mask * logp) / norm["denominator"]
    metrics = {"ce": ce, "accuracy": jnp.sum(mask * hits) / norm["tokens"], **local}
    loss = ce
    if cfg.z_loss:
        metrics["z_loss"] = jnp.sum(mask * logz**2) / norm["tokens"]
        loss = loss + cfg.z_loss * metrics["z_loss"]
    if _num_mtp(out):
        N = _num_mtp(out)
        mtp_sum = 0.0
        for k in range(N):
            tgt, m = mtp_targets(batch["targets"], mask, batch.get("segment_ids"), k + 1)
            logp_k = _per_token(lambda lg, t: token_logprobs(lg, t)[0], out, model, tgt, depth=k)
            mtp_sum = mtp_sum - jnp.sum(m * logp_k)
        metrics["mtp_ce"] = mtp_sum / (N * norm["tokens"])
        loss = loss + cfg.mtp_weight * metrics["mtp_ce"]
    return _plus_router_terms(loss, metrics, out, model, cfg, norm["rows"])


def sft_loss(params, batch, rng, *, model, cfg=None):
    """Supervised fine-tuning: `pretrain_loss` with a loss_mask on the response tokens only."""
    return pretrain_loss(params, batch, rng, model=model, cfg=cfg)


def grpo_loss(params, batch, rng, *, model, cfg=None):
    """GRPO / DAPO / Dr. GRPO / GSPO policy loss on precomputed advantages (DeepSeekMath eq. 3).

    batch adds old_logprobs [B, T] and ref_logprobs [B, T] (log-probs of `targets`),
    advantages [B]; loss_mask covers completion tokens.
    """
    del rng
    cfg = LossConfig.coerce(cfg)
    local, norm = _normalisers("grpo", batch, cfg)
    out = _forward(model, params, batch)
    mask = batch["loss_mask"].astype(jnp.float32)
    def logp_entropy(logits, targets):
        logits = logits / cfg.policy_temperature
        return token_logprobs(logits, targets)[0], jax.lax.stop_gradient(token_entropy(logits))

    logp, entropy = _per_token(logp_entropy, out, model, batch["targets"])
    terms = grpo_token_objective(logp, batch["old_logprobs"], batch["ref_logprobs"], batch["advantages"],
                                 mask, eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=cfg.beta,
                                 ratio_level=cfg.ratio_level)
    agg = lambda x: aggregate(x, mask, cfg.aggregation, norm["denominator"])
    token_mean = lambda x: jnp.sum(mask * jax.lax.stop_gradient(x)) / norm["tokens"]
    if "tis_weight" in batch:  # grpo.tis_cap: truncated importance weights pi_train / pi_sampler (constants)
        terms["loss"] = terms["loss"] * batch["tis_weight"]
    loss = agg(terms["loss"])
    metrics = {"pg_loss": -agg(jax.lax.stop_gradient(terms["surrogate"])), "kl": token_mean(terms["kl"]),
               "ratio": token_mean(terms["ratio"]), "clip_frac_low": token_mean(terms["clipped_low"]),
               "clip_frac_high": token_mean(terms["clipped_high"]),
               "entropy": token_mean(entropy), **local}
    return _plus_router_terms(loss, metrics, out, model, cfg, norm["rows"])


def distill_loss(params, batch, rng, *, model, cfg=None):
    """alpha * tau^2 KL(teacher || student) + (1 - alpha) * CE, per counted token.

    The teacher comes as full log-probs `teacher_logprobs` [B, T, V], or memory-light as
    `teacher_topk_ids` / `teacher_topk_logprobs` [B, T, k].
    """
    del rng
    cfg = LossConfig.coerce(cfg)
    local, norm = _normalisers("distill", batch, cfg)
    out = _forward(model, params, batch)
    mask = batch["loss_mask"].astype(jnp.float32)
    if "teacher_logprobs" in batch:
        kd_fn, teacher = lambda lg, t: distill_kl(lg, t, cfg.temperature), (batch["teacher_logprobs"],)
    elif "teacher_topk_ids" in batch:
        kd_fn = lambda lg, ids, lp: distill_kl_topk(lg, ids, lp, cfg.temperature)
        teacher = (batch["teacher_topk_ids"], batch["teacher_topk_logprobs"])
    else:
        raise KeyError("distill batch needs 'teacher_logprobs' [B, T, V] or 'teacher_topk_ids' and "
                       f"'teacher_topk_logprobs' [B, T, k]; got keys {sorted(batch)}")
    def kd_logp_hit(logits, targets, *teacher_chunk):
        logp, _, hit = _logp_logz_hit(logits, targets)
        return kd_fn(logits, *teacher_chunk), logp, hit

    kd_BxT, logp, hits = _per_token(kd_logp_hit, out, model, batch["targets"], *teacher)
    kd = jnp.sum(mask * kd_BxT) / norm["denominator"]
    ce = -jnp.sum(mask * logp) / norm["denominator"]
    loss = cfg.distill_alpha * kd + (1.0 - cfg.distill_alpha) * ce
    metrics = {"kd": kd, "ce": ce, "accuracy": jnp.sum(mask * hits) / norm["tokens"], **local}
    return _plus_router_terms(loss, metrics, out, model, cfg, norm["rows"])


def dpo_loss(params, batch, rng, *, model, cfg=None):
    """DPO on (chosen, rejected) pairs laid out as rows (0, 1), (2, 3), ...

    Sequence log-probs are sums over loss_mask tokens; `ref_logprobs` is per token [B, T]
    (summed the same way) or per sequence [B].
    """
    del rng
    cfg = LossConfig.coerce(cfg)
    B = batch["tokens"].shape[0]
    if B % 2:
        raise ValueError(f"dpo needs an even number of rows (chosen, rejected pairs); got B={B}")
    local, norm = _normalisers("dpo", batch, cfg)
    out = _forward(model, params, batch)
    mask = batch["loss_mask"].astype(jnp.float32)
    seq_logp = jnp.sum(mask * _per_token(lambda lg, t: token_logprobs(lg, t)[0], out, model, batch["targets"]), axis=1)
    ref = batch["ref_logprobs"].astype(jnp.float32)
    seq_ref = jnp.sum(mask * ref, axis=1) if ref.ndim == 2 else ref
    terms = dpo_objective(seq_logp[0::2], seq_logp[1::2], seq_ref[0::2], seq_ref[1::2], cfg.dpo_beta)
    pair = jnp.any(mask[0::2] > 0, axis=1).astype(jnp.float32)  # padding pairs do not count
    mean = lambda x: jnp.sum(pair * x) / norm["denominator"]
    loss = mean(terms["loss"])
    margin = jax.lax.stop_gradient(terms["chosen_reward"] - terms["rejected_reward"])
    metrics = {"reward_accuracy": mean((margin > 0).astype(jnp.float32)), "reward_margin": mean(margin),
               "chosen_reward": mean(jax.lax.stop_gradient(terms["chosen_reward"])),
               "rejected_reward": mean(jax.lax.stop_gradient(terms["rejected_reward"])),
               **local}
    return _plus_router_terms(loss, metrics, out, model, cfg, norm["rows"])


LossFn = Callable[..., tuple[jax.Array, dict]]

LOSSES: dict[str, LossFn] = {
    "pretrain": pretrain_loss,
    "sft": sft_loss,
    "grpo": grpo_loss,
    "distill": distill_loss,
    "dpo": dpo_loss,
}


def get_loss(name: str) -> LossFn:
    """The loss function registered under `name` (the config's `loss` key)."""
    if name not in LOSSES:
        raise KeyError(f"unknown loss {name!r}; known losses: {sorted(LOSSES)}")
    return LOSSES[name]
