"""Batched sampling with a KV cache: a jitted prefill, then `lax.while_loop`s of decode steps.

Dimension legend: B batch (rows), P prompt slots, N new-token slots (max_new_tokens),
V vocabulary, S stop-token slots.

    sampler = Sampler(model, max_prompt_len=64, max_new_tokens=128, pad_id=tok.pad_id)
    out = sampler.generate(params, [tok.encode(p, add_bos=True) for p in prompts], rng,
                           temperature=1.0, top_p=1.0, top_k=0, stop_tokens=[tok.eos_id])
    out.tokens [B, N], out.mask [B, N], out.lengths [B], out.logprobs [B, N]

Ragged prompts are LEFT-padded to P slots; every row's RoPE positions count its own real
tokens (kv_cache.py), so a row's completion is what that prompt alone would give (with the
default dropless MoE dispatch; capacity dispatch lets padding and other rows take capacity).
Log-probabilities are the model's log-softmax at temperature 1 over the full vocabulary,
evaluated at the sampled token, whatever temperature / top-k / top-p drew it: the
old-policy log-probs GRPO's ratio needs (pi_old(o_t | ...)), not the sampling distribution's.
Greedy decoding is temperature 0. Sampling is a pure function of (params, prompts, rng), and
each row's draws come from its own key (rl/sampling.py): a row samples the same tokens whatever
else is in the batch, so the decode loop drops finished rows without changing any output
(`compact`, on by default: the batch halves each time half of it has finished).

`speculative="mtp"`: MTP self-speculative decoding (rl/speculative.py): the same output
distribution (greedy: the same tokens) in fewer main-model steps. `generate(num_samples=G)`:
G samples per prompt share one prefill (rows b*G .. b*G+G-1 belong to prompt b), as GRPO wants.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax import kv_cache
from deepseek_jax.model import Transformer
from deepseek_jax.rl import sampling
from deepseek_jax.rl import speculative as spec
from deepseek_jax.rl.sampling import sample_tokens

MAX_STOP_TOKENS = 8  # stop tokens are padded to this many slots so their number never recompiles
# `compact`: the decode batch halves while the half holds at least this many rows. Each batch
# size is one more compiled loop: on the demo's GRPO rollouts (256 rows, 2-core CPU) stopping at
# 64 rows instead compiled ~10 s faster and sampled 7% slower; 16 favours long RL runs.
COMPACT_MIN_ROWS = 16


@flax.struct.dataclass
class SampleOutput:
    prompt_tokens: jax.Array  # [B, P] int32, left-padded with pad_id
    prompt_lengths: jax.Array  # [B] int32 real prompt tokens
    tokens: jax.Array  # [B, N] int32 completion; pad_id after the row stopped
    mask: jax.Array  # [B, N] bool: sampled tokens, the stop token included
    lengths: jax.Array  # [B] int32 = mask.sum(1)
    logprobs: jax.Array  # [B, N] float32 log pi(token) at temperature 1; 0 where ~mask
    # speculative="mtp" only: per row, drafts verified and drafts accepted (else None)
    drafts: Optional[jax.Array] = None
    accepted: Optional[jax.Array] = None
    # record_experts=True only: [B, P+N, L, K] int32, aligned with `sequences()`' tokens, the
    # experts each prompt and completion token went to in each MoE layer (router replay); -1
    # for padding and for each row's last completion token (never fed back, it routes nothing
    # a log-prob depends on).
    expert_ids: Optional[jax.Array] = None

    def sequences(self):
        """The prompt + completion as one training batch for `model.apply` (e.g. GRPO):
        (tokens [B, P+N], positions [B, P+N], segment_ids [B, P+N] (0 = padding),
        completion_mask [B, P+N]). Logits at column j predict tokens[:, j + 1]."""
        prompt_valid = jnp.arange(self.prompt_tokens.shape[1])[None] >= (
            self.prompt_tokens.shape[1] - self.prompt_lengths[:, None])
        valid = jnp.concatenate([prompt_valid, self.mask], axis=1)
        positions = jnp.maximum(jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1, 0)
        completion = jnp.concatenate([jnp.zeros_like(prompt_valid), self.mask], axis=1)
        tokens = jnp.concatenate([self.prompt_tokens, self.tokens], axis=1)
        return tokens, positions, valid.astype(jnp.int32), completion


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [B, length] right-aligned, lengths [B]) from a list of token-id lists."""
    out = np.full((len(prompts), length), pad_id, np.int32)
    lengths = np.zeros((len(prompts),), np.int32)
    for b, p in enumerate(prompts):
        if not 1 <= len(p) <= length:
            raise ValueError(f"prompt {b} has {len(p)} tokens; need 1..max_prompt_len={length} "
                             "(start empty prompts with a BOS token, or raise max_prompt_len)")
        out[b, length - len(p):] = p
        lengths[b] = len(p)
    return out, lengths


class Sampler:
    """Compiled generation for one model and fixed (max_prompt_len, max_new_tokens).

    The batch size is taken from the prompts (a new batch size compiles once more).
    `absorbed` selects MLA's absorbed decode (default) or the naive expanded one; the prompt
    is always prefilled expanded (compute-bound there, where absorbing costs C/N more FLOPs),
    its tokens attending among themselves with attention_impl's kernel (Transformer(prefill=True)).
    `vocab_limit`: never sample ids >= it (a checkpoint's embedding rows past the tokenizer's
    vocabulary); the reported log-probs stay the model's full-vocabulary log-softmax.
    `speculative`: None (one token per step) or "mtp" (rl/speculative.py; needs MTP modules).
    `record_experts`: return each token's expert ids per MoE layer (SampleOutput.expert_ids),
    from the prefill and from the decode step that fed the token, for router replay.
    `compact`: finished rows stop costing: the decode loop cuts its batch to the unfinished rows
    (halving, `_phase_impl`); every row's output is unchanged.
    """

    def __init__(self, model: Transformer, max_prompt_len: int, max_new_tokens: int, pad_id: int = 0,
                 absorbed: bool = True, cache_dtype=None, vocab_limit: Optional[int] = None,
                 speculative: Optional[str] = None, record_experts: bool = False, compact: bool = True):
        if max_prompt_len < 1 or max_new_tokens < 1:
            raise ValueError(f"need max_prompt_len >= 1 and max_new_tokens >= 1; got "
                             f"{max_prompt_len}, {max_new_tokens}")
        if speculative not in (None, "mtp"):
            raise ValueError(f"speculative={speculative!r}: use None or 'mtp'")
        if speculative == "mtp" and not model.config.num_mtp_layers:
            raise ValueError("speculative='mtp' drafts with MTP module 0; the model has num_mtp_layers=0 "
                             "(use speculative=None, or a config with num_mtp_layers >= 1)")
        if record_experts and not model.config.is_moe:
            raise ValueError("record_experts=True records MoE routing; this model has no MoE layers "
                             "(n_routed_experts=0): use record_experts=False")
        if record_experts and speculative:
            raise ValueError(f"record_experts=True with speculative={speculative!r} is not supported "
                             "(the verify forward's ids are not recorded yet): use speculative=None "
                             "with router replay (grpo.speculative='' with grpo.router_replay=True)")
        self.record_experts, self.compact = record_experts, compact
        self.model, self.pad_id, self.absorbed = model, pad_id, absorbed
        self.max_prompt_len, self.max_new_tokens = max_prompt_len, max_new_tokens
        self.cache_dtype, self.vocab_limit, self.speculative = cache_dtype, vocab_limit, speculative
        # Prefill, the decode loop and the output are three programs: the loop is compiled once
        # per batch size and shared by every call that decodes that many rows (GRPO's rollouts of
        # 32 prompts x 8 samples and its evaluation batches of 256 prompts), and `compact` runs it
        # once per batch size (`_batch_sizes`). The last loop updates the cache in place (donated);
        # the others return a smaller one.
        self._prefill = jax.jit(self._prefill_impl, static_argnames="num_samples")
        self._phase = jax.jit(self._phase_impl, static_argnames="fits")
        self._last_phase = jax.jit(functools.partial(self._phase_impl, fits=0), donate_argnames="cache")
        self._finish = jax.jit(self._finish_impl)
        self._mtp_hits = jax.jit(self._mtp_hits_impl)

    def generate(self, params, prompts: Union[Sequence[Sequence[int]], np.ndarray, jax.Array], rng: jax.Array, *,
                 prompt_lengths: Optional[Union[np.ndarray, jax.Array]] = None, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, stop_tokens: Sequence[int] = (),
                 num_samples: int = 1) -> SampleOutput:
        """Samples up to max_new_tokens per row; a row stops after emitting any `stop_tokens`.

        `prompts`: a list of token-id lists, or an already left-padded int array [B, P] with
        `prompt_lengths` [B] (P == max_prompt_len). `num_samples` = G: each prompt is prefilled
        once and sampled G times; the output has B * G rows, prompt b's at b*G .. b*G+G-1.
        """
        if num_samples < 1:
            raise ValueError(f"num_samples={num_samples}: need >= 1 samples per prompt")
        if isinstance(prompts, (list, tuple)):
            tokens, lengths = left_pad(prompts, self.max_prompt_len, self.pad_id)
        else:
            if prompt_lengths is None or prompts.shape[1] != self.max_prompt_len:
                raise ValueError(f"a prompt array needs shape [B, max_prompt_len={self.max_prompt_len}] "
                                 f"(got {prompts.shape}) and prompt_lengths [B] (left padding)")
            tokens, lengths = prompts, prompt_lengths
        stop = list(stop_tokens)
        if len(stop) > MAX_STOP_TOKENS:
            raise ValueError(f"{len(stop)} stop tokens; at most {MAX_STOP_TOKENS} (MAX_STOP_TOKENS)")
        knobs = (jnp.float32(temperature), jnp.float32(top_p), jnp.int32(top_k),
                 jnp.asarray(stop + [-1] * (MAX_STOP_TOKENS - len(stop)), jnp.int32))
        prompt, (step, cache, rows), result = self._prefill(params, jnp.asarray(tokens, jnp.int32),
                                                            jnp.asarray(lengths, jnp.int32), rng, knobs,
                                                            num_samples=num_samples)
        for fits in self._batch_sizes(tokens.shape[0] * num_samples)[1:]:
            step, cache, rows, result = self._phase(params, rng, knobs, step, cache, rows, result, fits=fits)
        step, cache, rows, result = self._last_phase(params, rng, knobs, step, cache, rows, result)
        return self._finish(prompt, result, knobs[3])

    def mtp_draft_acceptance(self, params, greedy: SampleOutput) -> dict:
        """How often the first MTP module drafts the main model's next greedy token.

        Greedy speculative decoding with MTP as a one-token draft (V3 §5.4.3 reports 85-90%
        for the second token): once the main model has emitted token j+1, MTP module 0 at
        column j (its hidden state plus the embedding of token j+1) drafts token j+2, and the
        main model keeps the draft iff it is its own greedy choice. On a greedy `sample` that
        choice is the completion's token j+2, and attention is causal, so one forward over the
        finished sequences scores every draft at once. Counts drafts whose token j+1 and j+2
        are both generated. Returns {"acceptance": hits / drafts, "hits": ..., "drafts": ...}.
        """
        if not self.model.config.num_mtp_layers:
            raise ValueError("mtp_draft_acceptance needs a model with MTP modules (num_mtp_layers >= 1)")
        hits, drafts = map(int, jax.device_get(self._mtp_hits(params, *greedy.sequences())))
        return {"acceptance": hits / max(drafts, 1), "hits": hits, "drafts": drafts}

    def _mtp_hits_impl(self, params, tokens_BxS, positions_BxS, segment_ids_BxS, completion_BxS):
        out = self.model.apply({"params": params}, tokens_BxS, positions=positions_BxS,
                               segment_ids=segment_ids_BxS)
        draft_BxS = jnp.argmax(out.mtp_logits[0], axis=-1)  # column j drafts token j + 2
        counted = completion_BxS[:, 1:-1] & completion_BxS[:, 2:]
        hits = counted & (draft_BxS[:, :-2] == tokens_BxS[:, 2:])
        return jnp.sum(hits), jnp.sum(counted)

    def _allowed(self, logits_BxV):
        if self.vocab_limit is None:
            return logits_BxV
        return jnp.where(jnp.arange(logits_BxV.shape[-1]) < self.vocab_limit, logits_BxV, -jnp.inf)

    def _outputs(self) -> tuple[str, ...]:
        """The per-row results the decode loop writes back by row id."""
        return (("tokens", "logprobs") + (("drafts", "accepted") if self.speculative else ())
                + (("expert_ids",) if self.record_experts else ()))

    def _pick(self, i, logits_BxV, r, rng, knobs):
        """Samples completion slot i of the rows in `r` (pad_id and log-prob 0 for finished rows)."""
        temperature, top_p, top_k, stop_S = knobs
        token_B = sample_tokens(self._allowed(logits_BxV), sampling.row_keys(rng, i, r["row"]), temperature, top_k,
                                top_p)
        logp_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BxV, axis=-1), token_B[:, None], axis=-1)[:, 0]
        token_B = jnp.where(r["done"], self.pad_id, token_B)
        return dict(r, token=token_B, done=r["done"] | jnp.isin(token_B, stop_S),
                    tokens=r["tokens"].at[:, i].set(token_B),
                    logprobs=r["logprobs"].at[:, i].set(jnp.where(r["done"], 0.0, logp_B)))

    def _prefill_impl(self, params, prompt_BxP, lengths_B, rng, knobs, num_samples):
        """The prompt through the model, slot 0 sampled -> (prompt, (step, cache, rows), result).

        rows: the decode loop's per-row state, [B, ...] each: "row" (ids), "token" (the last
        sampled), "done", the outputs, and for speculative decoding MTP's cache and draft.
        """
        P, N, G = prompt_BxP.shape[1], self.max_new_tokens, num_samples
        valid_BxP = jnp.arange(P)[None] >= P - lengths_B[:, None]
        # Plain: N - 1 decode steps (the last sampled token is never fed back). Speculative: a
        # row still decoding has m <= P + N - 2 and writes slots m, m + 1; a finished row keeps
        # its index, one slot of slack keeps its (ignored) writes inside the buffer.
        slots = P + N + 1 if self.speculative else P + N - 1
        cache = kv_cache.init_cache(self.model.config, prompt_BxP.shape[0], slots, self.cache_dtype)
        out, cache = self.model.apply({"params": params}, prompt_BxP, segment_ids=valid_BxP.astype(jnp.int32),
                                      cache=cache, prefill=True)
        if self.speculative:
            mtp_layer = spec.init_mtp_layer(self.model.config, prompt_BxP.shape[0], slots, self.cache_dtype)
            mtp_layer = spec.mtp_prefill(self.model.config, params, out.hidden, prompt_BxP, valid_BxP, mtp_layer)
        # Left padding puts every row's last prompt token in the last column.
        last_logits_BxV, last_hidden_BxD = out.logits[:, -1], out.hidden[:, -1]
        # [B, P, L, K] the prompt tokens' experts (-1 on left padding); then per decode step
        prompt_ids = (jnp.where(valid_BxP[:, :, None, None], jnp.moveaxis(out.moe.expert_ids, 0, 2), -1)
                      if self.record_experts else None)
        if G > 1:  # the group's samples share the prefill: broadcast its results to G rows each
            rep = lambda x: jnp.repeat(x, G, axis=0)  # noqa: E731
            cache = kv_cache.repeat_rows(cache, G)
            prompt_BxP, lengths_B, last_logits_BxV, last_hidden_BxD = map(
                rep, (prompt_BxP, lengths_B, last_logits_BxV, last_hidden_BxD))
            prompt_ids = None if prompt_ids is None else rep(prompt_ids)
            if self.speculative:
                mtp_layer = jax.tree.map(rep, mtp_layer)
        B = prompt_BxP.shape[0]
        rows = self._pick(0, last_logits_BxV, dict(row=jnp.arange(B, dtype=jnp.int32), done=jnp.zeros((B,), bool),
                                                   tokens=jnp.full((B, N), self.pad_id, jnp.int32),
                                                   logprobs=jnp.zeros((B, N), jnp.float32)), rng, knobs)
        if self.record_experts:
            rows["expert_ids"] = jnp.full((B, N) + prompt_ids.shape[2:], -1, jnp.int32)
        if self.speculative:
            cache = kv_cache.per_row(cache)
            # MTP at the last prompt position (hidden h_{P-1}, token s_P) drafts s_{P+1}; it
            # overwrites the placeholder mtp_prefill left in that slot.
            logits, mtp_layer = spec.draft_logits(self.model.config, params, last_hidden_BxD[:, None],
                                                  rows["token"][:, None], cache, cache.index - 1, cache.lengths - 1,
                                                  jnp.ones((B, 1), bool), mtp_layer, self.absorbed)
            n_B = jnp.ones((B,), jnp.int32)  # tokens emitted so far
            rows.update(mtp_layer=mtp_layer, draft=jnp.argmax(self._allowed(logits[:, 0]), axis=-1).astype(jnp.int32),
                        n=n_B, done=rows["done"] | (n_B >= N), drafts=jnp.zeros((B,), jnp.int32),
                        accepted=jnp.zeros((B,), jnp.int32))
        result = {k: rows[k] for k in self._outputs()}
        return (prompt_BxP, lengths_B, prompt_ids), (jnp.int32(1), cache, rows), result

    def _batch_sizes(self, B: int) -> list[int]:
        """The decode loop's batch sizes: B, then halved while the half holds >= COMPACT_MIN_ROWS."""
        sizes = [B]
        while self.compact and sizes[-1] >= 2 * COMPACT_MIN_ROWS:
            sizes.append(-(-sizes[-1] // 2))
        return sizes

    def _phase_impl(self, params, rng, knobs, step, cache, rows, result, fits):
        """Decodes until every row is done, step = N, or the unfinished rows fit in `fits` rows;
        writes the outputs back by row id, then (fits > 0) keeps only `fits` rows, the unfinished
        first, cache included -> (step, cache, rows, result).

        A finished row only pads the batch, and randomness is per row id (sampling.row_keys),
        so every row's output is the same as without compaction (greedy: token for token).
        """
        body = self._speculative_step if self.speculative else self._plain_step

        def cond(carry):
            step, _, r = carry
            return (step < self.max_new_tokens) & (jnp.sum(~r["done"]) > fits)

        step, cache, rows = jax.lax.while_loop(cond, functools.partial(body, params, rng, knobs), (step, cache, rows))
        result = {k: result[k].at[rows["row"]].set(rows[k]) for k in result}
        if fits:
            keep = jnp.argsort(rows["done"], stable=True)[:fits]  # unfinished rows first
            cache = kv_cache.take_rows(cache, keep)
            rows = jax.tree.map(lambda x: x[keep], rows)
        return step, cache, rows, result

    def _plain_step(self, params, rng, knobs, carry):
        i, cache, r = carry
        out, cache = self.model.apply({"params": params}, r["token"][:, None], cache=cache, absorbed=self.absorbed)
        if self.record_experts:  # the fed token is completion slot i - 1
            r = dict(r, expert_ids=r["expert_ids"].at[:, i - 1].set(jnp.moveaxis(out.moe.expert_ids[:, :, 0], 0, 1)))
        return i + 1, cache, self._pick(i, out.logits[:, 0], r, rng, knobs)

    def _speculative_step(self, params, rng, knobs, carry):
        """One verify / accept / roll back / draft step of rl/speculative.py."""
        c, N = self.model.config, self.max_new_tokens
        temperature, top_p, top_k, stop_S = knobs
        step, cache, r = carry
        token_B, draft_B, done_B, n_B = r["token"], r["draft"], r["done"], r["n"]
        index_B, lengths_B = cache.index, cache.lengths
        out, cache = self.model.apply({"params": params}, jnp.stack([token_B, draft_B], axis=1), cache=cache,
                                      absorbed=self.absorbed)
        logits_Bx2xV = self._allowed(out.logits)
        k_accept, k_bonus = jax.random.split(jax.random.fold_in(rng, step))
        accepted_B, tok1_B = spec.accept_draft(logits_Bx2xV[:, 0], draft_B, sampling.row_keys(k_accept, 0, r["row"]),
                                               temperature, top_k, top_p)
        tok2_B = sample_tokens(logits_Bx2xV[:, 1], sampling.row_keys(k_bonus, 0, r["row"]), temperature, top_k, top_p)
        logp_Bx2xV = jax.nn.log_softmax(out.logits, axis=-1)
        logp1_B = jnp.take_along_axis(logp_Bx2xV[:, 0], tok1_B[:, None], axis=-1)[:, 0]
        logp2_B = jnp.take_along_axis(logp_Bx2xV[:, 1], tok2_B[:, None], axis=-1)[:, 0]
        active_B = ~done_B
        # The bonus token counts only after an accepted draft that is not a stop token, within N.
        two_B = active_B & accepted_B & ~jnp.isin(tok1_B, stop_S) & (n_B + 1 < N)

        def emit(buf_BxN, at_B, value_B, on_B):
            # Out-of-range slots (rows not emitting) are dropped, not clamped onto real ones.
            return buf_BxN.at[jnp.arange(buf_BxN.shape[0]), jnp.where(on_B, at_B, N)].set(value_B, mode="drop")

        tokens_BxN = emit(emit(r["tokens"], n_B, tok1_B, active_B), n_B + 1, tok2_B, two_B)
        logprobs_BxN = emit(emit(r["logprobs"], n_B, logp1_B, active_B), n_B + 1, logp2_B, two_B)
        advance_B = active_B.astype(jnp.int32) + two_B
        cache = kv_cache.truncate(cache, index_B + advance_B)
        # MTP on the new positions m (and m + 1): h from the verify forward, the token after each.
        logits, mtp_layer = spec.draft_logits(c, params, out.hidden, jnp.stack([tok1_B, tok2_B], axis=1), cache,
                                              index_B, lengths_B, jnp.stack([active_B, two_B], axis=1),
                                              r["mtp_layer"], self.absorbed)
        new_draft_B = jnp.argmax(jnp.where(two_B[:, None], self._allowed(logits[:, 1]), self._allowed(logits[:, 0])),
                                 axis=-1).astype(jnp.int32)
        last_B = jnp.where(two_B, tok2_B, tok1_B)
        n_B = n_B + advance_B
        stopped_B = jnp.isin(last_B, stop_S) | jnp.isin(tok1_B, stop_S)
        r = dict(r, mtp_layer=mtp_layer, token=jnp.where(active_B, last_B, token_B),
                 draft=jnp.where(active_B, new_draft_B, draft_B), n=n_B,
                 done=done_B | (active_B & (stopped_B | (n_B >= N))), tokens=tokens_BxN, logprobs=logprobs_BxN,
                 drafts=r["drafts"] + active_B, accepted=r["accepted"] + (active_B & accepted_B))
        return step + 1, cache, r

    def _finish_impl(self, prompt, result, stop_S) -> SampleOutput:
        prompt_BxP, lengths_B, prompt_ids = prompt
        N = self.max_new_tokens
        result = dict(result)
        tokens_BxN, logprobs_BxN = result.pop("tokens"), result.pop("logprobs")
        # A position is sampled iff no stop token came strictly before it.
        stopped_BxN = jnp.isin(tokens_BxN, stop_S)
        mask_BxN = jnp.cumsum(stopped_BxN, axis=1) - stopped_BxN == 0
        tokens_BxN = jnp.where(mask_BxN, tokens_BxN, self.pad_id)
        if self.record_experts:
            fed_BxN = jnp.arange(N)[None] < mask_BxN.sum(axis=1)[:, None] - 1  # a row's last token is never fed
            ids_BxNxLxK = jnp.where(fed_BxN[:, :, None, None], result["expert_ids"], -1)
            result["expert_ids"] = jnp.concatenate([prompt_ids, ids_BxNxLxK], axis=1)
        # drafts / accepted (speculative), expert_ids (record_experts)
        return SampleOutput(prompt_tokens=prompt_BxP, prompt_lengths=lengths_B, tokens=tokens_BxN, mask=mask_BxN,
                            lengths=mask_BxN.sum(axis=1, dtype=jnp.int32),
                            logprobs=jnp.where(mask_BxN, logprobs_BxN, 0.0), **result)
