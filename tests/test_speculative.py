"""MTP self-speculative decoding, shared prefill and finished-row compaction (rl/speculative.py,
Sampler(speculative="mtp"), Sampler(compact=True)).

Oracles: the plain sampler (greedy tokens; the same sampler without compaction, sampled too);
the training forward's MTP logits (the cached MTP
drafts); a cache that never saw the rejected draft; the closed-form distribution of the next
two tokens from full forwards over every prefix (chi-square), which a wrong accept rule fails.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from deepseek_jax import kv_cache
from deepseek_jax.config import ModelConfig
from deepseek_jax.model import Transformer, init_params
from deepseek_jax.rl import sampler as sampler_lib
from deepseek_jax.rl import sampling
from deepseek_jax.rl import speculative as spec

MLA = ModelConfig(vocab_size=6, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16,
                  kv_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4,
                  num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1,
                  scoring_func="sigmoid", norm_topk_prob=True, router_bias=True, num_mtp_layers=1)
GQA = ModelConfig(vocab_size=6, hidden_size=32, num_hidden_layers=2, intermediate_size=48, attention="mha",
                  num_attention_heads=4, num_key_value_heads=2, num_mtp_layers=1)
P, N = 8, 12
PROMPTS = [[1, 2, 3, 4, 5], [3], [5, 1, 2, 3, 4, 5, 1, 2]]
G = 3  # samples per prompt in the shared-prefill tests
# Nine distinct prompts: the greedy and TIS tests run the batch shape [9, P] that the shared-prefill
# test's repeated prompts already compiled (a sampler compiles once per batch shape).
PROMPTS9 = PROMPTS + [[2, 2], [4, 1, 5], [5], [1, 1, 1, 1, 1, 1, 1, 1], [3, 5, 2, 4], [2, 4, 2, 4, 2, 4]]


@functools.lru_cache(maxsize=None)
def _init(config):
    return jax.jit(init_params, static_argnums=0)(config, jax.random.key(1))


@functools.lru_cache(maxsize=None)
def _params(config, scale):
    # Scaled up from the 0.02 init so next-token distributions are far from uniform.
    return jax.tree.map(lambda p: p * scale if p.ndim >= 2 else p, _init(config))


@functools.lru_cache(maxsize=None)
def _sampler(config, max_prompt_len, max_new_tokens, speculative):
    return sampler_lib.Sampler(Transformer(config), max_prompt_len, max_new_tokens, speculative=speculative)


@functools.lru_cache(maxsize=None)
def _apply(config):
    """The model's forward (training or cached), compiled: eager Flax costs far more than one compile."""
    model = Transformer(config)
    return jax.jit(lambda params, tokens, **kw: model.apply({"params": params}, tokens, **kw),
                   static_argnames=("absorbed",))


def _repeating_mtp(params):
    """MTP module 0 made to draft the token it is given (its block an identity, its input the main
    hidden state): greedy decodes of these small models repeat tokens, so such drafts are often
    right and often wrong, and both the accept and the roll-back branch run."""
    D = params["embed"]["embedding"].shape[1]

    def edit(path, x):
        name = jax.tree_util.keystr(path)
        if "mtp_0" not in name:
            return x
        if "eh_proj" in name:  # [embedding; hidden] -> hidden
            return jnp.concatenate([jnp.zeros((D, D)), jnp.eye(D)], axis=0).reshape(x.shape)
        if "o_proj" in name or "down_proj" in name:  # the block adds nothing to the residual
            return jnp.zeros_like(x)
        return x

    params = jax.tree_util.tree_map_with_path(edit, params)
    params["mtp_0"]["final_norm"] = params["final_norm"]
    return params


@pytest.mark.parametrize("config", [MLA, GQA], ids=["mla", "gqa"])
def test_greedy_speculative_equals_plain(config):
    params = _repeating_mtp(_params(config, 6.0))
    plain, fast = _sampler(config, P, N, None), _sampler(config, P, N, "mtp")
    ref = plain.generate(params, PROMPTS9, jax.random.key(0), temperature=0.0)
    out = fast.generate(params, PROMPTS9, jax.random.key(0), temperature=0.0)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), atol=1e-5)
    # Both branches ran: some drafts accepted (two tokens per step), some rejected (roll back).
    drafts, accepted = int(out.drafts.sum()), int(out.accepted.sum())
    assert 0 < accepted < drafts, (accepted, drafts)
    assert drafts < len(PROMPTS9) * (N - 1)  # fewer verify steps than plain decode steps
    # Stop tokens: rows stop at different steps, some right after an accepted draft.
    for stop in ([int(ref.tokens[0, 2])], [int(ref.tokens[1, 4]), int(ref.tokens[2, 7])]):
        ref_s = plain.generate(params, PROMPTS9, jax.random.key(0), temperature=0.0, stop_tokens=stop)
        out_s = fast.generate(params, PROMPTS9, jax.random.key(0), temperature=0.0, stop_tokens=stop)
        np.testing.assert_array_equal(np.asarray(out_s.tokens), np.asarray(ref_s.tokens))
        np.testing.assert_array_equal(np.asarray(out_s.mask), np.asarray(ref_s.mask))
        assert int(ref_s.lengths.min()) < N


def test_shared_prefill_equals_repeated_prompts():
    params = _params(MLA, 6.0)
    for speculative in (None, "mtp"):
        sampler = _sampler(MLA, P, N, speculative)
        shared = sampler.generate(params, PROMPTS, jax.random.key(0), temperature=0.0, num_samples=G)
        repeated = sampler.generate(params, [p for p in PROMPTS for _ in range(G)], jax.random.key(0),
                                    temperature=0.0)
        np.testing.assert_array_equal(np.asarray(shared.tokens), np.asarray(repeated.tokens))
        np.testing.assert_array_equal(np.asarray(shared.prompt_tokens), np.asarray(repeated.prompt_tokens))
        np.testing.assert_allclose(np.asarray(shared.logprobs), np.asarray(repeated.logprobs), atol=1e-5)
        drawn = sampler.generate(params, PROMPTS, jax.random.key(0), temperature=1.0, num_samples=G)
        assert len({tuple(r) for r in np.asarray(drawn.tokens)}) > len(PROMPTS)  # the group's samples differ
        # Randomness is per row id, so sampling with a shared prefill draws the same tokens too.
        drawn_repeated = sampler.generate(params, [p for p in PROMPTS for _ in range(G)], jax.random.key(0),
                                          temperature=1.0)
        np.testing.assert_array_equal(np.asarray(drawn.tokens), np.asarray(drawn_repeated.tokens))


def test_compaction_changes_no_output(monkeypatch):
    """Dropping finished rows from the decode batch (Sampler(compact=True)) leaves every row's
    tokens, log-probs, MTP counts and recorded experts as they were, greedy and sampled."""
    monkeypatch.setattr(sampler_lib, "COMPACT_MIN_ROWS", 2)  # 9 rows: batches of 9, then 5, then 3
    params = _repeating_mtp(_params(MLA, 6.0))
    model = Transformer(MLA)
    for speculative in (None, "mtp"):
        kw = dict(speculative=speculative, record_experts=speculative is None)
        full = sampler_lib.Sampler(model, P, N, compact=False, **kw)
        compact = sampler_lib.Sampler(model, P, N, compact=True, **kw)
        assert compact._batch_sizes(len(PROMPTS9)) == [9, 5, 3]
        for temperature in (0.0, 1.0):
            # The stop token whose first occurrences spread the rows' lengths most.
            free = np.asarray(full.generate(params, PROMPTS9, jax.random.key(3), temperature=temperature).tokens)
            first = [np.where((free == v).any(1), (free == v).argmax(1) + 1, N) for v in range(MLA.vocab_size)]
            gen = dict(temperature=temperature, stop_tokens=[int(np.argmax([np.std(f) for f in first]))])
            want = full.generate(params, PROMPTS9, jax.random.key(3), **gen)
            got = compact.generate(params, PROMPTS9, jax.random.key(3), **gen)
            lengths = np.sort(np.asarray(want.lengths))
            assert lengths[3] < lengths[-1] - 1, lengths  # 4 rows finished while others ran: compacted
            for field in ("tokens", "mask", "drafts", "accepted", "expert_ids"):
                if getattr(want, field) is not None:
                    np.testing.assert_array_equal(np.asarray(getattr(got, field)), np.asarray(getattr(want, field)))
            np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), atol=1e-5)


@pytest.mark.parametrize("config", [MLA, GQA], ids=["mla", "gqa"])
def test_cached_mtp_drafts_equal_training_forward(config):
    """MTP through its cache (prefill, then one position, then two) == the full forward's MTP logits."""
    model, params = Transformer(config), _params(config, 6.0)
    prompts, lengths = sampler_lib.left_pad(PROMPTS, P, 0)
    seq = np.concatenate([prompts, np.array([[1, 4, 2], [0, 5, 5], [3, 3, 1]])], axis=1)  # P + 3 columns
    valid = np.arange(P + 3)[None] >= P - lengths[:, None]
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
    B = len(PROMPTS)

    @jax.jit  # one compile for the whole test (eager Flax costs far more)
    def both_ways(params):
        full = model.apply({"params": params}, seq, positions=positions, segment_ids=valid.astype(np.int32))
        cache = kv_cache.init_cache(config, B, P + 4)
        layer = spec.init_mtp_layer(config, B, P + 4)
        out, cache = model.apply({"params": params}, seq[:, :P], segment_ids=valid[:, :P].astype(np.int32),
                                 cache=cache, prefill=True)
        layer = spec.mtp_prefill(config, params, out.hidden, seq[:, :P], valid[:, :P], layer)
        cache = kv_cache.per_row(cache)
        one, layer = spec.draft_logits(config, params, out.hidden[:, -1:], seq[:, P:P + 1], cache, cache.index - 1,
                                       cache.lengths - 1, np.ones((B, 1), bool), layer)
        index, lengths = cache.index, cache.lengths
        out, cache = model.apply({"params": params}, seq[:, P:P + 2], cache=cache)
        two, layer = spec.draft_logits(config, params, out.hidden, seq[:, P + 1:P + 3], cache, index, lengths,
                                       np.ones((B, 2), bool), layer)
        return full.mtp_logits[0], one, two

    want, one, two = (np.asarray(x) for x in both_ways(params))  # want: column j predicts token j + 2
    np.testing.assert_allclose(one[:, 0], want[:, P - 1], atol=1e-4)
    np.testing.assert_allclose(two, want[:, P:P + 2], atol=1e-4)


def test_cache_after_rejected_draft_equals_cache_that_never_saw_it():
    config = MLA
    params = _params(config, 6.0)
    prompts, lengths = sampler_lib.left_pad(PROMPTS, P, 0)
    B = len(PROMPTS)
    apply = _apply(config)
    cache = kv_cache.init_cache(config, B, P + 3)
    _, cache = apply(params, prompts, segment_ids=(np.arange(P)[None] >= P - lengths[:, None]).astype(np.int32),
                     cache=cache, absorbed=False)
    cache = kv_cache.per_row(cache)
    token, draft, after = np.array([[1], [2], [3]]), np.array([[4], [5], [0]]), np.array([[2], [2], [5]])
    _, spec_cache = apply(params, np.concatenate([token, draft], axis=1), cache=cache)
    spec_cache = kv_cache.truncate(spec_cache, cache.index + 1)  # every draft rejected
    _, never = apply(params, token, cache=cache)
    np.testing.assert_array_equal(np.asarray(spec_cache.valid), np.asarray(never.valid))
    np.testing.assert_array_equal(np.asarray(spec_cache.index), np.asarray(never.index))
    seen = np.arange(P + 3) < np.asarray(never.index)[:, None]
    for a, b in zip(jax.tree.leaves(spec_cache.layers), jax.tree.leaves(never.layers)):
        np.testing.assert_allclose(np.asarray(a)[seen], np.asarray(b)[seen], atol=1e-6)
    # The next token overwrites the rejected slot: the caches are then equal everywhere.
    out_s, spec_cache = apply(params, after, cache=spec_cache)
    out_n, never = apply(params, after, cache=never)
    np.testing.assert_allclose(np.asarray(out_s.logits), np.asarray(out_n.logits), atol=1e-5)
    for a, b in zip(jax.tree.leaves(spec_cache), jax.tree.leaves(never)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def _next_two_distribution(model, params, prompt, top_k):
    """Closed form P(s_1, s_2) [V, V] of completion tokens 1 and 2 (token 0 summed out) at temperature
    1: full forwards over every two-token continuation, filtered with top-k in numpy."""
    V = model.config.vocab_size
    s0, s1 = np.meshgrid(np.arange(V), np.arange(V), indexing="ij")
    seq = np.concatenate([np.tile(prompt, (V * V, 1)), s0.reshape(-1, 1), s1.reshape(-1, 1)], axis=1)
    logits = np.asarray(_apply(model.config)(params, seq).logits, np.float64)[:, len(prompt) - 1:]

    def probs(x):
        if top_k:
            x = np.where(x >= np.sort(x, axis=-1)[..., -top_k][..., None], x, -np.inf)
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p0 = probs(logits[0, 0])  # [V]
    p1 = probs(logits[:, 1]).reshape(V, V, V)[:, 0]  # [s0, s1]: rows with the same s0 agree
    p2 = probs(logits[:, 2]).reshape(V, V, V)  # [s0, s1, s2]
    return np.einsum("a,ab,abc->bc", p0, p1, p2)


def _chi2_pvalue(tokens, want_VxV):
    V = want_VxV.shape[0]
    counts = np.bincount(tokens[:, 1] * V + tokens[:, 2], minlength=V * V).astype(np.float64)
    expected = want_VxV.reshape(-1) * len(tokens)
    big = expected >= 5  # pool the sparse cells into one
    f_obs = np.append(counts[big], counts[~big].sum())
    f_exp = np.append(expected[big], expected[~big].sum())
    keep = f_exp > 0
    return stats.chisquare(f_obs[keep], f_exp[keep] * f_obs[keep].sum() / f_exp[keep].sum()).pvalue


def _wrong_accept(logits_BxV, draft_B, keys_B, temperature, top_k, top_p):
    """A classic bug: on rejection, redraw from p itself instead of p with the draft removed."""
    k_accept, k_residual = jnp.moveaxis(jax.vmap(jax.random.split)(keys_B), 1, 0)
    p = jax.nn.softmax(sampling.filter_logits(logits_BxV, temperature, top_k, top_p), axis=-1)
    p_draft = jnp.take_along_axis(p, draft_B[:, None], axis=-1)[:, 0]
    accepted = sampling.uniform(k_accept) < p_draft
    return accepted, jnp.where(accepted, draft_B, sampling.draw(k_residual, p))


_WRONG_SAMPLERS = {}  # traced once with the wrong accept rule (top_k is traced: both cases share it)


@pytest.mark.parametrize("top_k", [0, 3])
def test_sampled_next_two_tokens_match_closed_form(top_k, monkeypatch):
    config = MLA
    model, params = Transformer(config), _params(config, 2.0)
    prompt = [1, 2, 3, 4]
    want = _next_two_distribution(model, params, np.array(prompt), top_k)
    draws = 2000

    def sample(sampler):
        out = sampler.generate(params, [prompt], jax.random.key(11), temperature=1.0, top_k=top_k,
                               num_samples=draws)
        return np.asarray(out.tokens), out

    plain, _ = sample(_sampler(config, len(prompt), 3, None))
    fast, out = sample(_sampler(config, len(prompt), 3, "mtp"))
    assert 0 < int(out.accepted.sum()) < int(out.drafts.sum())
    assert _chi2_pvalue(plain, want) > 1e-3
    assert _chi2_pvalue(fast, want) > 1e-3
    monkeypatch.setattr(spec, "accept_draft", _wrong_accept)
    if config not in _WRONG_SAMPLERS:
        _WRONG_SAMPLERS[config] = sampler_lib.Sampler(model, len(prompt), 3, speculative="mtp")
    wrong, _ = sample(_WRONG_SAMPLERS[config])  # its own jit, traced with the wrong rule
    assert _chi2_pvalue(wrong, want) < 1e-6


def test_speculative_logprobs_match_training_forward_and_mismatch_metric():
    """The returned log-probs are the target model's temperature-1 log-probs: the trainer's forward
    over the sampled sequences agrees (float32: mismatch ~0), and grpo.sampler_mismatch says so;
    shifting one token's log-prob by 0.5 shows up as max 0.5 and the closed-form k3 KL."""
    from deepseek_jax.rl import advantages as adv_lib
    from deepseek_jax.rl.grpo import sampler_mismatch

    params = _params(MLA, 2.0)
    # num_samples=G: the shape the shared-prefill test compiled.
    out = _sampler(MLA, P, N, "mtp").generate(params, PROMPTS, jax.random.key(5), temperature=1.0, top_k=4,
                                              num_samples=G, stop_tokens=[3])
    tokens, positions, segment_ids, completion = out.sequences()
    batch = adv_lib.build_grpo_batch(tokens, positions, segment_ids, completion, out.logprobs,
                                     np.zeros(len(PROMPTS) * G))
    logits = _apply(MLA)(params, batch["tokens"], positions=batch["positions"],
                         segment_ids=batch["segment_ids"]).logits
    train = np.asarray(jnp.take_along_axis(jax.nn.log_softmax(logits, -1), batch["targets"][..., None], -1)[..., 0])
    mask = np.asarray(completion)[:, 1:]
    got = sampler_mismatch(batch["old_logprobs"], train, mask)
    assert got["logp_mismatch_max"] < 1e-4 and got["mismatch_kl"] < 1e-8
    shifted = np.array(batch["old_logprobs"])
    b, t = np.argwhere(mask)[0]
    shifted[b, t] += 0.5
    got = sampler_mismatch(shifted, train, mask)
    np.testing.assert_allclose(got["logp_mismatch_max"], 0.5, atol=1e-4)
    np.testing.assert_allclose(got["mismatch_kl"], (np.exp(-0.5) + 0.5 - 1.0) / mask.sum(), atol=1e-6)


def test_tis_weights_scale_each_tokens_loss():
    """grpo.tis_cap's per-token weights multiply each token's GRPO loss: weights c everywhere give
    c x the loss; zero weights on a row give the loss of that row with zero advantage (beta = 0)."""
    from deepseek_jax import losses
    from deepseek_jax.rl import advantages as adv_lib

    model, params = Transformer(MLA), _params(MLA, 2.0)
    out = _sampler(MLA, P, N, None).generate(params, PROMPTS9, jax.random.key(5), temperature=1.0)
    adv = np.linspace(-0.5, 2.0, len(PROMPTS9)).astype(np.float32)
    batch = adv_lib.build_grpo_batch(*out.sequences(), out.logprobs, adv)
    batch = dict(batch, old_logprobs=batch["old_logprobs"] - 0.1 * batch["loss_mask"], ref_logprobs=batch["old_logprobs"])
    cfg = dict(beta=0.0, seq_aux_alpha=0.0)
    grpo_loss = jax.jit(lambda p, b: losses.grpo_loss(p, b, None, model=model, cfg=cfg)[0])
    loss = lambda b: float(grpo_loss(params, b))  # noqa: E731
    base = loss(batch)
    assert abs(base) > 1e-3
    np.testing.assert_allclose(loss(dict(batch, tis_weight=np.full_like(batch["old_logprobs"], 1.7))), 1.7 * base,
                               rtol=1e-5)
    w = np.ones_like(batch["old_logprobs"])
    w[1] = 0.0
    np.testing.assert_allclose(loss(dict(batch, tis_weight=w)), loss(dict(batch, advantages=adv * (w[:, 0] > 0))),
                               rtol=1e-5)
