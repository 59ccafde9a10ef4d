"""Group advantages and the GRPO training batch built from sampled completions.

Dimension legend: P prompts, G completions per prompt (the group), B = P*G rows,
T training length, S prompt length, C completion length.

Estimators (one advantage per completion, shared by all its tokens):
  grpo     (r_i - mean(r)) / (std(r) + eps)        DeepSeekMath eq. 3 / R1
  dr_grpo  r_i - mean(r)                           Dr. GRPO (Liu et al. 2025): no std division
  rloo     r_i - mean_{j != i}(r_j) = G/(G-1) (r_i - mean(r))     RLOO (Ahmadian et al. 2024)
std is the population standard deviation of the group (ddof=0).
"""
from __future__ import annotations


import numpy as np

ESTIMATORS = ("grpo", "dr_grpo", "rloo")


def group_advantages(rewards_PxG: np.ndarray, estimator: str = "grpo", eps: float = 1e-4) -> np.ndarray:
    """Per-completion advantages from the rewards of each prompt's group."""
    r = np.asarray(rewards_PxG, np.float64)
    if r.ndim != 2:
        raise ValueError(f"rewards must be [prompts, group], got shape {r.shape}")
    G = r.shape[1]
    centred = r - r.mean(axis=1, keepdims=True)
    if estimator == "grpo":
        adv = centred / (r.std(axis=1, keepdims=True) + eps)
    elif estimator == "dr_grpo":
        adv = centred
    elif estimator == "rloo":
        if G < 2:
            raise ValueError("rloo needs at least 2 completions per prompt (group_size >= 2)")
        adv = centred * G / (G - 1)
    else:
        raise ValueError(f"advantage estimator {estimator!r}: use one of {ESTIMATORS}")
    return adv.astype(np.float32)


def informative_groups(rewards_PxG: np.ndarray) -> np.ndarray:
    """[P] bool: groups whose rewards are not all equal (DAPO dynamic sampling keeps these).

    A group of equal rewards has zero advantage everywhere: it adds no policy gradient,
    only dilutes the token mean and the KL term.
    """
    r = np.asarray(rewards_PxG)
    return r.max(axis=1) > r.min(axis=1)


def build_grpo_batch(tokens_BxS, positions_BxS, segment_ids_BxS, completion_BxS, old_logprobs_BxN,
                     advantages_B, keep_B=None) -> dict:
    """The next-token GRPO batch from `SampleOutput.sequences()` (prompt + completion rows).

    Column t of the batch predicts token t + 1, so the loss covers the targets that are
    completion tokens. The sampler's log-probs (one per completion slot, N = the last N
    columns) become `old_logprobs` aligned with the targets. Rows with keep_B False
    (dynamic sampling, overlong filtering) stay in the batch with no loss, so its shape,
    and hence the compiled step, never changes.
    """
    tokens, positions = np.asarray(tokens_BxS, np.int32), np.asarray(positions_BxS, np.int32)
    completion = np.asarray(completion_BxS, np.float32)
    B, S = tokens.shape
    N = np.asarray(old_logprobs_BxN).shape[1]
    keep = np.ones(B, bool) if keep_B is None else np.asarray(keep_B, bool)
    old = np.zeros((B, S - 1), np.float32)
    old[:, S - 1 - N:] = old_logprobs_BxN  # completion slot j is column S - N + j, target of column S - N - 1 + j
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
            "loss_mask": completion[:, 1:] * keep[:, None],
            "segment_ids": np.asarray(segment_ids_BxS, np.int32)[:, :-1], "positions": positions[:, :-1],
            "old_logprobs": old, "advantages": np.asarray(advantages_B, np.float32)}
