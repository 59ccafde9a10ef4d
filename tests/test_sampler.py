"""rl/sampler.py against the full forward (issue 6 acceptance).

Oracles: the training forward (`model.apply` without a cache, positions / segment_ids for the
left padding) for greedy choices and log-probs; each prompt decoded alone for ragged
batches; numpy's closed-form filtered distribution for temperature / top-k / top-p, and the
weights themselves for the inverse-CDF draw.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.config import ModelConfig
from deepseek_jax.model import Transformer, init_params
from deepseek_jax.rl import sampler as sampler_lib
from deepseek_jax.rl import sampling

CONFIG = ModelConfig(vocab_size=48, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16,
                     kv_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4,
                     num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1,
                     scoring_func="sigmoid", norm_topk_prob=True, router_bias=True)
P, N, PAD = 8, 10, 0
PROMPTS = [[5, 7, 9, 11, 13], [3], [17, 19, 23, 29, 31, 37, 41, 43]]
TOL = 1e-4


@functools.partial(jax.jit, static_argnums=0)
def _params(config):
    # Scaled up from the 0.02 init so the next-token distribution is far from uniform.
    return jax.tree.map(lambda p: p * 6.0 if p.ndim >= 2 else p, init_params(config, jax.random.key(0)))


@pytest.fixture(scope="module")
def env():
    model = Transformer(CONFIG)
    params = _params(CONFIG)
    sampler = sampler_lib.Sampler(model, max_prompt_len=P, max_new_tokens=N, pad_id=PAD)
    full = jax.jit(lambda p, t, pos, seg: model.apply({"params": p}, t, positions=pos, segment_ids=seg).logits)
    greedy = sampler.generate(params, PROMPTS, jax.random.key(0), temperature=0.0)
    return sampler, params, full, greedy


def _oracle_logprobs(env, out):
    """Full-forward log-softmax over the sampled sequences: [B, N] at each sampled token, and argmax."""
    _, params, full, _ = env
    tokens, positions, segment_ids, _ = out.sequences()
    logp = jax.nn.log_softmax(full(params, tokens, positions, segment_ids), axis=-1)[:, P - 1:-1]  # predicts col j+1
    picked = jnp.take_along_axis(logp, out.tokens[..., None], axis=-1)[..., 0]
    return np.asarray(picked), np.asarray(jnp.argmax(logp, axis=-1))


def test_greedy_is_argmax_of_full_forward(env):
    greedy = env[3]
    assert bool(greedy.mask.all()) and list(np.asarray(greedy.lengths)) == [N] * len(PROMPTS)
    logp, argmax = _oracle_logprobs(env, greedy)
    np.testing.assert_array_equal(np.asarray(greedy.tokens), argmax)
    np.testing.assert_allclose(np.asarray(greedy.logprobs), logp, atol=TOL)


def test_ragged_rows_equal_each_prompt_alone(env):
    sampler, params, _, greedy = env
    for b, prompt in enumerate(PROMPTS):
        # The prompt with no other prompt beside it; the batch keeps its size so nothing recompiles.
        alone = sampler.generate(params, [prompt] * len(PROMPTS), jax.random.key(0), temperature=0.0)
        np.testing.assert_array_equal(np.asarray(alone.tokens[0]), np.asarray(greedy.tokens[b]))
        np.testing.assert_allclose(np.asarray(alone.logprobs[0]), np.asarray(greedy.logprobs[b]), atol=TOL)


def test_top_k_1_is_greedy(env):
    sampler, params, _, greedy = env
    out = sampler.generate(params, PROMPTS, jax.random.key(7), temperature=1.3, top_k=1)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(greedy.tokens))


def test_sampled_logprobs_equal_full_forward_and_are_deterministic(env):
    sampler, params, _, greedy = env
    out = sampler.generate(params, PROMPTS, jax.random.key(3), temperature=1.0)
    again = sampler.generate(params, PROMPTS, jax.random.key(3), temperature=1.0)
    other = sampler.generate(params, PROMPTS, jax.random.key(4), temperature=1.0)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(again.tokens))
    assert not np.array_equal(np.asarray(out.tokens), np.asarray(other.tokens))
    assert not np.array_equal(np.asarray(out.tokens), np.asarray(greedy.tokens))
    logp, _ = _oracle_logprobs(env, out)
    np.testing.assert_allclose(np.asarray(out.logprobs), logp, atol=TOL)
    # Temperature changes what is drawn, not what is reported: still log pi at temperature 1.
    hot = sampler.generate(params, PROMPTS, jax.random.key(3), temperature=2.0, top_p=0.9)
    np.testing.assert_allclose(np.asarray(hot.logprobs), _oracle_logprobs(env, hot)[0], atol=TOL)


def test_stop_tokens_stop_rows_independently(env):
    sampler, params, _, greedy = env
    g = np.asarray(greedy.tokens)
    stop = int(g[0, 3])
    out = sampler.generate(params, PROMPTS, jax.random.key(0), temperature=0.0, stop_tokens=[stop])
    tokens, mask, lengths = np.asarray(out.tokens), np.asarray(out.mask), np.asarray(out.lengths)
    for b in range(len(PROMPTS)):
        hits = np.flatnonzero(g[b] == stop)
        n = int(hits[0]) + 1 if hits.size else N  # the stop token itself is part of the completion
        assert lengths[b] == n and mask[b].sum() == n and mask[b, :n].all()
        np.testing.assert_array_equal(tokens[b, :n], g[b, :n])
        assert (tokens[b, n:] == PAD).all() and (np.asarray(out.logprobs)[b, n:] == 0).all()
    assert lengths[0] <= 4


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.5, 3, 0.8), (0.7, 0, 1.0)])
def test_sampling_distribution(temperature, top_k, top_p):
    """Temperature, top-k, top-p on a fixed 5-way distribution vs the closed form; (0.7, 0, 1.0)
    takes the branch that skips the filters."""
    p = np.array([0.05, 0.4, 0.1, 0.3, 0.15])
    q = p ** (1 / temperature)
    order = np.argsort(-q)
    keep = np.zeros(5, bool)
    keep[order[:top_k or 5]] = True
    q_k = np.where(keep, q, 0) / np.where(keep, q, 0).sum()
    mass_before = np.cumsum(q_k[order]) - q_k[order]
    nucleus = np.zeros(5, bool)
    nucleus[order[(mass_before < top_p) & keep[order]]] = True
    expected = np.where(nucleus, q, 0) / np.where(nucleus, q, 0).sum()
    assert nucleus.sum() == (2 if top_k else 5)  # the filtered case exercises both filters

    n = 40_000
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(p, jnp.float32)), (n, 5))
    keys = sampling.row_keys(jax.random.key(0), 0, jnp.arange(n))
    draws = jax.jit(sampler_lib.sample_tokens)(logits, keys, jnp.float32(temperature), jnp.int32(top_k),
                                               jnp.float32(top_p))
    freq = np.bincount(np.asarray(draws), minlength=5) / n
    np.testing.assert_allclose(freq, expected, atol=0.012)  # ~5 sigma at n = 40k


def test_draw_never_picks_a_zero_weight():
    """Inverse-CDF draws: frequencies follow unnormalised weights, and zero-weight entries (a top-k
    cut, a rejected draft) are never drawn, also where the prefix sums round."""
    weights = np.array([0.0, 3.0, 0.0, 1e-30, 1.0, 0.0, 2.0, 0.0], np.float32)
    n = 60_000
    draws = np.asarray(jax.jit(sampling.draw)(sampling.row_keys(jax.random.key(1), 0, jnp.arange(n)),
                                              jnp.broadcast_to(jnp.asarray(weights), (n, 8))))
    freq = np.bincount(draws, minlength=8) / n
    assert freq[weights == 0].sum() == 0
    np.testing.assert_allclose(freq, weights / weights.sum(), atol=0.01)
    # A row of one tiny weight among zeros: the only possible draw.
    only = jnp.zeros((4, 8)).at[:, 5].set(1e-30)
    assert (np.asarray(sampling.draw(sampling.row_keys(jax.random.key(2), 0, jnp.arange(4)), only)) == 5).all()


def test_bad_prompts_are_rejected(env):
    sampler, params, _, _ = env
    with pytest.raises(ValueError, match="max_prompt_len"):
        sampler.generate(params, [[1] * (P + 1)], jax.random.key(0))
    with pytest.raises(ValueError, match="BOS"):
        sampler.generate(params, [[]], jax.random.key(0))


def test_vocab_limit_restricts_draws_not_logprobs(env):
    _, params, _, _ = env
    limited = sampler_lib.Sampler(Transformer(CONFIG), max_prompt_len=P, max_new_tokens=N, pad_id=PAD, vocab_limit=6)
    out = limited.generate(params, PROMPTS, jax.random.key(5), temperature=1.5)
    assert int(out.tokens.max()) < 6
    np.testing.assert_allclose(np.asarray(out.logprobs), _oracle_logprobs(env, out)[0], atol=TOL)


def test_mtp_draft_acceptance_against_prefix_forwards():
    """Oracle: for each draft, a forward of the row with every token after j+1 replaced by
    noise (causality makes them irrelevant); MTP module 0's argmax at column j is the draft
    of token j+2, accepted iff it is the greedy completion's token j+2."""
    config = dataclasses.replace(CONFIG, num_mtp_layers=1)
    model = Transformer(config)
    params = _params(config)
    sampler = sampler_lib.Sampler(model, max_prompt_len=P, max_new_tokens=N, pad_id=PAD)
    greedy = sampler.generate(params, PROMPTS, jax.random.key(0), temperature=0.0, stop_tokens=[2])
    got = sampler.mtp_draft_acceptance(params, greedy)
    tokens, positions, segment_ids, completion = map(np.asarray, greedy.sequences())
    mtp = jax.jit(lambda t, pos, seg: model.apply({"params": params}, t, positions=pos, segment_ids=seg).mtp_logits[0])
    noise = np.random.default_rng(0).integers(3, config.vocab_size, tokens.shape[1])
    hits = drafts = 0
    for b in range(len(PROMPTS)):
        for j in range(tokens.shape[1] - 2):
            if not (completion[b, j + 1] and completion[b, j + 2]):
                continue
            row = np.where(np.arange(tokens.shape[1]) <= j + 1, tokens[b], noise)[None]
            drafts += 1
            hits += int(np.argmax(mtp(row, positions[b:b + 1], segment_ids[b:b + 1])[0, j]) == tokens[b, j + 2])
    assert 0 < hits < drafts  # some drafts right, some wrong: the comparison is not vacuous
    assert got == {"acceptance": hits / drafts, "hits": hits, "drafts": drafts}
    assert drafts == int(np.sum(np.maximum(np.asarray(greedy.lengths) - 1, 0)))
    with pytest.raises(ValueError, match="num_mtp_layers"):
        sampler_lib.Sampler(Transformer(CONFIG), P, N).mtp_draft_acceptance(_params(CONFIG), greedy)
