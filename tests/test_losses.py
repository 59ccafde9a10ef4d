"""Every loss against an independent NumPy implementation of its paper formula.

A tiny fake Flax LM (embedding + dense heads + dense routers) stands in for the model, so
these tests depend only on the ModelOutput interface. NumPy oracles read the fake model's
logits / MoEStats and recompute each objective with explicit loops in float64.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import losses as L
from deepseek_jax.outputs import ModelOutput, MoEStats

V = 11


@dataclasses.dataclass(frozen=True)
class FakeConfig:
    vocab_size: int = V
    hidden_size: int = 8
    n_routed_experts: int = 4
    num_experts_per_tok: int = 2
    n_group: int = 2
    topk_group: int = 1
    num_mtp_layers: int = 2
    moe_layers: int = 2


class FakeLM(nn.Module):
    config: FakeConfig

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None):
        c = self.config
        h = nn.Embed(c.vocab_size, c.hidden_size, name="embed")(tokens)
        h = jnp.tanh(h + nn.Embed(64, c.hidden_size, name="pos")(positions))
        logits = nn.Dense(c.vocab_size, name="lm_head")(h)
        mtp = None
        if c.num_mtp_layers:
            mtp = jnp.stack([nn.Dense(c.vocab_size, name=f"mtp_{k}")(h) for k in range(c.num_mtp_layers)])
        moe = None
        if c.n_routed_experts:
            valid = (segment_ids != 0).astype(jnp.float32)[..., None]
            counts, probs, z = [], [], []
            for layer in range(c.moe_layers):
                r = nn.Dense(c.n_routed_experts, name=f"router_{layer}")(h)
                p = jax.nn.softmax(r)
                ids = jax.lax.top_k(p, c.num_experts_per_tok)[1]
                counts.append((jax.nn.one_hot(ids, c.n_routed_experts).sum(-2) * valid).sum(1))
                probs.append((p * valid).sum(1))
                z.append((jax.nn.logsumexp(r, -1) ** 2 * valid[..., 0]).sum(1))
            moe = MoEStats(counts=jnp.stack(counts), probs=jnp.stack(probs), router_z=jnp.stack(z),
                           tokens=valid[..., 0].sum(1), dropped=jnp.zeros((c.moe_layers,)))
        return ModelOutput(logits=logits, mtp_logits=mtp, moe=moe, hidden=h)


# ----- hand-built batches --------------------------------------------------------------------

def make_batch(seed=0, B=8, T=8, sft=False, packed=True):
    """Rows of packed documents (or one document per row, as RL and DPO rows are), padding
    at the end, targets inside documents; sft=True counts only targets past a 2-token prompt."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, V, size=(B, T)).astype(np.int32)
    seg = np.zeros((B, T), np.int32)
    pos = np.zeros((B, T), np.int32)
    for b in range(B):
        t, doc = 0, 1
        end = T - int(rng.integers(0, 3))  # up to two padding tokens
        while t < end:
            n = min(int(rng.integers(2, 6)) if packed else T, end - t)
            seg[b, t:t + n], pos[b, t:t + n] = doc, np.arange(n)
            t, doc = t + n, doc + 1
    tokens[seg == 0] = 0
    targets = np.zeros((B, T), np.int32)
    mask = np.zeros((B, T), np.float32)
    for b in range(B):
        for t in range(T - 1):
            if seg[b, t] != 0 and seg[b, t + 1] == seg[b, t]:
                targets[b, t], mask[b, t] = tokens[b, t + 1], 1.0
    if sft:  # the first two positions of each document are "prompt"
        mask[pos < 2] = 0.0
    return {"tokens": tokens, "targets": targets, "loss_mask": mask, "segment_ids": seg, "positions": pos}


def init(cfg=FakeConfig()):
    model = FakeLM(cfg)
    b = make_batch()
    params = model.init(jax.random.PRNGKey(0), b["tokens"], positions=b["positions"],
                        segment_ids=b["segment_ids"])["params"]
    return model, params


def forward_np(model, params, batch):
    out = model.apply({"params": params}, batch["tokens"], positions=batch["positions"],
                      segment_ids=batch["segment_ids"])
    return jax.tree.map(lambda x: np.asarray(x, np.float64), out)


def log_softmax_np(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def token_logp_np(logits, targets):
    ls = log_softmax_np(logits)
    return np.take_along_axis(ls, targets[..., None].astype(np.int64), -1)[..., 0]


# ----- NumPy oracles of the papers' formulas ----------------------------------------------

def balance_np(counts, probs, tokens, E, K, G, M=None, group_tokens=None):
    """V3 eq. 17-20 / V2 eq. 12-20 per row with explicit loops; returns per-row sums over layers."""
    Lyr, B, _ = counts.shape
    out = {"expert": np.zeros(B), "device": np.zeros(B), "comm": np.zeros(B)}
    per = E // G
    for b in range(B):
        T = tokens[b]
        if T == 0:
            continue
        for l in range(Lyr):
            f = [E / (K * T) * counts[l, b, i] for i in range(E)]
            P = [probs[l, b, i] / T for i in range(E)]
            out["expert"][b] += sum(f[i] * P[i] for i in range(E))
            for d in range(G):
                grp = range(d * per, (d + 1) * per)
                f_dev = sum(f[j] for j in grp) / per
                P_dev = sum(P[j] for j in grp)
                out["device"][b] += f_dev * P_dev
                if group_tokens is not None:
                    out["comm"][b] += G / (M * T) * group_tokens[l, b, d] * P_dev
    return out


def mtp_ce_sum_np(mtp_logits, batch):
    tg, seg, mask = batch["targets"], batch["segment_ids"], batch["loss_mask"]
    N, B, T, _ = mtp_logits.shape
    total = 0.0
    for k in range(N):
        ls = log_softmax_np(mtp_logits[k])
        for b in range(B):
            for t in range(T):
                j = t + k + 1  # mtp_logits[k, :, t] predicts tokens[t + k + 2] = targets[t + k + 1]
                if j < T and seg[b, t] != 0 and seg[b, j] == seg[b, t] and mask[b, j] > 0:
                    total -= ls[b, t, tg[b, j]]
    return total


def pretrain_np(out, batch, cfg, mcfg):
    mask = batch["loss_mask"]
    ntok = mask.sum()
    logp = token_logp_np(out.logits, batch["targets"])
    ce = -(mask * logp).sum() / ntok
    m = out.logits.max(-1)
    logz = m + np.log(np.exp(out.logits - m[..., None]).sum(-1))
    N = out.mtp_logits.shape[0]
    mtp = mtp_ce_sum_np(out.mtp_logits, batch) / (N * ntok)
    st = out.moe
    bal = balance_np(st.counts, st.probs, st.tokens, mcfg.n_routed_experts, mcfg.num_experts_per_tok, mcfg.n_group)
    rows = (batch["segment_ids"] != 0).any(1).sum()
    z_router = sum(st.router_z[l, b] / st.tokens[b] for l in range(st.router_z.shape[0])
                   for b in range(st.router_z.shape[1]) if st.tokens[b] > 0) / rows
    return (ce + cfg.mtp_weight * mtp + cfg.z_loss * (mask * logz**2).sum() / ntok
            + cfg.seq_aux_alpha * bal["expert"].sum() / rows + cfg.device_aux_alpha * bal["device"].sum() / rows
            + cfg.router_z_loss * z_router), ce, mtp


def grpo_tokens_np(logp, old, ref, adv, eps_low, eps_high, beta):
    """DeepSeekMath eq. 3-4 per token, with its gradient d loss / d logp, in explicit cases."""
    B, T = logp.shape
    loss, grad = np.zeros((B, T)), np.zeros((B, T))
    low, high = np.zeros((B, T)), np.zeros((B, T))
    for b in range(B):
        A = adv[b]
        for t in range(T):
            rho = np.exp(logp[b, t] - old[b, t])
            clipped = min(max(rho, 1 - eps_low), 1 + eps_high)
            if rho * A <= clipped * A:
                surr, dsurr = rho * A, rho * A  # unclipped branch: d(rho A)/dlogp = rho A
            else:
                surr, dsurr = clipped * A, 0.0
                low[b, t], high[b, t] = rho < 1 - eps_low, rho > 1 + eps_high
            r = ref[b, t] - logp[b, t]
            kl = np.exp(r) - r - 1
            loss[b, t] = -(surr - beta * kl)
            grad[b, t] = -(dsurr - beta * (1 - np.exp(r)))
    return loss, grad, low, high


def aggregate_np(x, mask, mode, max_len=None):
    B, T = x.shape
    seqs = [b for b in range(B) if mask[b].sum() > 0]
    if mode == "token_mean":
        return (x * mask).sum() / mask.sum()
    if mode == "seq_mean_token_mean":
        return np.mean([(x[b] * mask[b]).sum() / mask[b].sum() for b in seqs])
    return np.mean([(x[b] * mask[b]).sum() / (max_len or T) for b in seqs])


# ----- pure pieces ---------------------------------------------------------------------------

def test_token_logprobs_and_entropy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 3, V)) * 3
    targets = rng.integers(0, V, size=(2, 3))
    logp, logz = L.token_logprobs(jnp.asarray(logits, jnp.float32), jnp.asarray(targets))
    np.testing.assert_allclose(logp, token_logp_np(logits, targets), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logz, np.log(np.exp(logits).sum(-1)), rtol=1e-5)
    p = np.exp(log_softmax_np(logits))
    np.testing.assert_allclose(L.token_entropy(jnp.asarray(logits, jnp.float32)), -(p * np.log(p)).sum(-1),
                               rtol=1e-5)


def test_token_logprobs_gradient_is_onehot_minus_softmax():
    """The custom backward of target_logz_max against the analytic gradient in float64:
    d/dlogits [a * log p(t) + b * log Z] = a * (onehot(t) - softmax) + b * softmax, with a
    masked vocabulary entry (-inf logit) and an out-of-range (padding) target clipped to V-1."""
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 3, V)) * 3
    targets = rng.integers(0, V, size=(2, 3))
    masked = (targets[0, 1] + 1) % V
    logits[0, 1, masked] = -np.inf
    targets[1, 2] = V + 5
    a, b = rng.normal(size=(2, 3)), rng.normal(size=(2, 3))

    def objective(lg):
        logp, logz = L.token_logprobs(lg, jnp.asarray(targets))
        return jnp.sum(jnp.asarray(a, jnp.float32) * logp + jnp.asarray(b, jnp.float32) * logz)

    got = np.asarray(jax.grad(objective)(jnp.asarray(logits, jnp.float32)))
    soft = np.exp(log_softmax_np(logits))
    onehot = np.eye(V)[np.clip(targets, 0, V - 1)]
    want = a[..., None] * (onehot - soft) + b[..., None] * soft
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert got[0, 1, masked] == 0.0


def test_mtp_targets_respect_documents_and_row_end():
    # Row: doc 1 = tokens a b c d, doc 2 = e f g, one padding position.
    seg = np.array([[1, 1, 1, 1, 2, 2, 2, 0]])
    targets = np.array([[2, 3, 4, 0, 6, 7, 0, 0]])  # b c d | f g ; last token of a doc masked
    mask = np.array([[1, 1, 1, 0, 1, 1, 0, 0]], np.float32)
    t1, m1 = L.mtp_targets(jnp.asarray(targets), jnp.asarray(mask), jnp.asarray(seg), 1)
    # Depth 1 at t predicts targets[t + 1] = tokens[t + 2]: a->c, b->d, e->g; c->(e) crosses.
    np.testing.assert_array_equal(m1, [[1, 1, 0, 0, 1, 0, 0, 0]])
    np.testing.assert_array_equal(np.asarray(t1)[m1 > 0], [3, 4, 7])
    t2, m2 = L.mtp_targets(jnp.asarray(targets), jnp.asarray(mask), jnp.asarray(seg), 2)
    np.testing.assert_array_equal(m2, [[1, 0, 0, 0, 0, 0, 0, 0]])  # only a -> d stays inside doc 1
    np.testing.assert_array_equal(np.asarray(t2)[m2 > 0], [4])
    _, m9 = L.mtp_targets(jnp.asarray(targets), jnp.asarray(mask), jnp.asarray(seg), 9)
    assert float(m9.sum()) == 0.0  # a shift past the row end masks everything


def _routing_np(rng, Lyr, B, T, E, K, G):
    """Per-token softmax scores and top-K choices, and the per-row sums MoEStats holds."""
    logits = rng.normal(size=(Lyr, B, T, E))
    s = np.exp(log_softmax_np(logits))
    top = np.argsort(-s, -1)[..., :K]
    onehot = np.zeros_like(s)
    np.put_along_axis(onehot, top, 1.0, -1)
    per = E // G
    sent = np.stack([onehot[..., d * per:(d + 1) * per].max(-1) for d in range(G)], -1)
    return s, onehot, sent


def test_balance_losses_match_per_token_paper_formulas():
    rng = np.random.default_rng(2)
    Lyr, B, T, E, K, G, M = 2, 3, 6, 8, 2, 4, 2
    s, onehot, sent = _routing_np(rng, Lyr, B, T, E, K, G)
    tokens = np.full(B, float(T))
    # Paper formulas straight from per-token quantities (V2 eq. 12-20, V3 eq. 17-20).
    expert = np.zeros(B)
    device = np.zeros(B)
    comm = np.zeros(B)
    per = E // G
    for l in range(Lyr):
        for b in range(B):
            f = E / (K * T) * onehot[l, b].sum(0)
            P = s[l, b].mean(0)
            expert[b] += (f * P).sum()
            for d in range(G):
                Pd = P[d * per:(d + 1) * per].sum()
                device[b] += f[d * per:(d + 1) * per].mean() * Pd
                comm[b] += G / (M * T) * sent[l, b, :, d].sum() * Pd
    counts, probs, gt = (jnp.asarray(x.sum(2), jnp.float32) for x in (onehot, s, sent))
    np.testing.assert_allclose(L.expert_balance_loss(counts, probs, tokens, K), expert, rtol=1e-5)
    np.testing.assert_allclose(L.device_balance_loss(counts, probs, tokens, K, G), device, rtol=1e-5)
    np.testing.assert_allclose(L.comm_balance_loss(gt, probs, tokens, M), comm, rtol=1e-5)
    # Perfect balance (uniform scores, every expert picked equally) gives exactly 1 per layer.
    uniform = jnp.full((1, 1, E), T * K / E), jnp.full((1, 1, E), T / E)
    np.testing.assert_allclose(L.expert_balance_loss(*uniform, jnp.array([T]), K), [1.0], rtol=1e-6)


def test_router_z_loss():
    z = np.array([[3.0, 0.0], [5.0, 0.0]])
    np.testing.assert_allclose(L.router_z_loss(jnp.asarray(z), jnp.array([2.0, 0.0])), [4.0, 0.0])


def test_grpo_token_objective_all_regions_and_gradient():
    eps_low, eps_high, beta = 0.2, 0.28, 0.04
    # Ratios below, inside and above the clip range; advantages of both signs; reference
    # log-probs on both sides of logp (both KL signs).
    rho = np.array([[0.5, 0.9, 1.0, 1.2, 1.5, 2.0]] * 2)
    logp = np.log(np.array([[0.3, 0.5, 0.2, 0.7, 0.4, 0.6], [0.6, 0.4, 0.7, 0.2, 0.5, 0.3]]))
    old = logp - np.log(rho)
    ref = logp + np.array([[0.3, -0.3, 0.0, 0.8, -0.5, 0.1]] * 2)
    adv = np.array([1.5, -0.7])
    loss, grad, low, high = grpo_tokens_np(logp, old, ref, adv, eps_low, eps_high, beta)
    f = lambda lp: L.grpo_token_objective(lp, jnp.asarray(old, jnp.float32), jnp.asarray(ref, jnp.float32),
                                          jnp.asarray(adv, jnp.float32), eps_low=eps_low, eps_high=eps_high,
                                          beta=beta)
    terms = f(jnp.asarray(logp, jnp.float32))
    np.testing.assert_allclose(terms["loss"], loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(terms["clipped_low"], low)
    np.testing.assert_array_equal(terms["clipped_high"], high)
    assert low.sum() == 1 and high.sum() == 2  # A<0 clips rho=0.5; A>0 clips rho=1.5, 2.0
    g = jax.grad(lambda lp: f(lp)["loss"].sum())(jnp.asarray(logp, jnp.float32))
    np.testing.assert_allclose(g, grad, rtol=1e-5, atol=1e-6)


def test_gspo_sequence_ratio_value_and_gradient():
    rng = np.random.default_rng(3)
    logp = np.log(rng.uniform(0.1, 0.9, size=(2, 5)))
    old = logp + rng.normal(scale=0.05, size=(2, 5))
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.float64)
    adv = np.array([1.0, -2.0])
    eps = 0.2  # wide enough that no sequence ratio is clipped here
    s = np.exp(((logp - old) * mask).sum(1) / mask.sum(1))  # GSPO sequence-level ratio
    f = lambda lp: L.grpo_token_objective(lp, jnp.asarray(old, jnp.float32), lp, jnp.asarray(adv, jnp.float32),
                                          jnp.asarray(mask, jnp.float32), eps_low=eps, eps_high=eps, beta=0.0,
                                          ratio_level="sequence")
    terms = f(jnp.asarray(logp, jnp.float32))
    np.testing.assert_allclose(terms["ratio"], np.repeat(s[:, None], 5, 1), rtol=1e-5)
    # Sequence mean of token means = GSPO's -mean_i s_i A_i; gradient -s_i A_i / |o_i| per token.
    obj = lambda lp: L.aggregate(f(lp)["loss"], jnp.asarray(mask, jnp.float32), "seq_mean_token_mean", 2.0)
    np.testing.assert_allclose(obj(jnp.asarray(logp, jnp.float32)), -(s * adv).mean(), rtol=1e-5)
    g = jax.grad(obj)(jnp.asarray(logp, jnp.float32))
    np.testing.assert_allclose(g, -(s * adv / mask.sum(1))[:, None] * mask / 2, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", L.AGGREGATIONS)
def test_aggregate_modes(mode):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(4, 6))
    mask = (rng.uniform(size=(4, 6)) > 0.4).astype(np.float64)
    mask[2] = 0.0  # an empty sequence is not counted
    denom = L.grpo_denominator(jnp.asarray(mask), mode, max_len=10)
    got = L.aggregate(jnp.asarray(x, jnp.float32), jnp.asarray(mask, jnp.float32), mode, denom)
    np.testing.assert_allclose(got, aggregate_np(x, mask, mode, max_len=10), rtol=1e-5)


def test_distill_kl_dense_and_topk():
    rng = np.random.default_rng(5)
    s_logits = rng.normal(size=(2, 3, V)) * 2
    t_logp = log_softmax_np(rng.normal(size=(2, 3, V)) * 2)
    tau = 2.0
    p = np.exp(log_softmax_np(t_logp / tau))
    q = np.exp(log_softmax_np(s_logits / tau))
    kl = tau**2 * (p * np.log(p / q)).sum(-1)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    np.testing.assert_allclose(L.distill_kl(f32(s_logits), f32(t_logp), tau), kl, rtol=1e-4, atol=1e-6)
    ids_all = np.broadcast_to(np.arange(V), (2, 3, V))
    np.testing.assert_allclose(L.distill_kl_topk(f32(s_logits), jnp.asarray(ids_all), f32(t_logp), tau), kl,
                               rtol=1e-4, atol=1e-6)
    k = 3
    ids = np.argsort(-t_logp, -1)[..., :k]
    tk = np.take_along_axis(t_logp, ids, -1)
    pk = np.exp(log_softmax_np(tk / tau))
    qk = np.take_along_axis(q, ids, -1)
    np.testing.assert_allclose(L.distill_kl_topk(f32(s_logits), jnp.asarray(ids), f32(tk), tau),
                               tau**2 * (pk * np.log(pk / qk)).sum(-1), rtol=1e-4, atol=1e-6)
    # A teacher with exact zeros (-inf log-probs) gives a finite KL.
    t_inf = t_logp.copy()
    t_inf[..., :4] = -np.inf
    assert np.isfinite(np.asarray(L.distill_kl(f32(s_logits), f32(t_inf), 1.0))).all()


# ----- whole losses through the fake model ------------------------------------------------

def test_pretrain_loss_matches_numpy():
    model, params = init()
    batch = make_batch(seed=6)
    cfg = L.LossConfig(mtp_weight=0.3, z_loss=1e-2, seq_aux_alpha=0.1, device_aux_alpha=0.05, router_z_loss=1e-2)
    fn = lambda p: L.get_loss("pretrain")(p, batch, None, model=model, cfg=cfg)
    (loss, metrics), g = jax.jit(jax.value_and_grad(fn, has_aux=True))(params)
    want, ce, mtp = pretrain_np(forward_np(model, params, batch), batch, cfg, model.config)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(metrics["ce"], ce, rtol=1e-5)
    np.testing.assert_allclose(metrics["mtp_ce"], mtp, rtol=1e-5)
    assert float(metrics["tokens"]) == batch["loss_mask"].sum()
    # The balance loss gradient reaches the router.
    assert float(jnp.abs(g["router_0"]["kernel"]).sum()) > 0


def test_sft_counts_response_tokens_only():
    model, params = init(FakeConfig(num_mtp_layers=0, n_routed_experts=0))
    batch = make_batch(seed=7, sft=True)
    loss, metrics = L.get_loss("sft")(params, batch, None, model=model, cfg={"z_loss": 0.0})
    out = forward_np(model, params, batch)
    mask = batch["loss_mask"]
    want = -(mask * token_logp_np(out.logits, batch["targets"])).sum() / mask.sum()
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    hits = (out.logits.argmax(-1) == batch["targets"]) * mask
    np.testing.assert_allclose(metrics["accuracy"], hits.sum() / mask.sum(), rtol=1e-6)


def grpo_batch(model, params, seed=8):
    batch = make_batch(seed=seed, sft=True, packed=False)
    logp = token_logp_np(forward_np(model, params, batch).logits, batch["targets"])
    rng = np.random.default_rng(seed)
    # Ratios spread over all three clip regions, reference on both sides of the policy.
    rho = np.resize([0.5, 0.95, 1.05, 1.6, 1.0], logp.shape)
    batch["old_logprobs"] = (logp - np.log(rho)).astype(np.float32)
    batch["ref_logprobs"] = (logp + rng.normal(scale=0.3, size=logp.shape)).astype(np.float32)
    batch["advantages"] = (np.resize([1.0, -1.0], logp.shape[0]) * rng.uniform(0.5, 2.0, logp.shape[0])
                           ).astype(np.float32)
    return batch, logp


@pytest.mark.parametrize("mode", L.AGGREGATIONS)
def test_grpo_loss_matches_numpy(mode):
    model, params = init(FakeConfig(num_mtp_layers=0, n_routed_experts=0))
    batch, logp = grpo_batch(model, params)
    cfg = L.LossConfig(eps_low=0.2, eps_high=0.28, beta=0.04, aggregation=mode, max_len=12)
    loss, metrics = L.get_loss("grpo")(params, batch, None, model=model, cfg=cfg)
    per_tok, _, low, high = grpo_tokens_np(logp, batch["old_logprobs"], batch["ref_logprobs"],
                                           batch["advantages"], 0.2, 0.28, 0.04)
    mask = batch["loss_mask"].astype(np.float64)
    np.testing.assert_allclose(loss, aggregate_np(per_tok, mask, mode, max_len=12), rtol=1e-5, atol=1e-7)
    tmean = lambda x: (x * mask).sum() / mask.sum()
    d = batch["ref_logprobs"] - logp
    np.testing.assert_allclose(metrics["kl"], tmean(np.exp(d) - d - 1), rtol=1e-4)
    np.testing.assert_allclose(metrics["clip_frac_low"], tmean(low), rtol=1e-6)
    np.testing.assert_allclose(metrics["clip_frac_high"], tmean(high), rtol=1e-6)
    assert float(metrics["clip_frac_low"]) > 0 and float(metrics["clip_frac_high"]) > 0
    np.testing.assert_allclose(metrics["ratio"], tmean(np.exp(logp - batch["old_logprobs"])), rtol=1e-5)
    pr = np.exp(log_softmax_np(forward_np(model, params, batch).logits))
    np.testing.assert_allclose(metrics["entropy"], tmean(-(pr * np.log(pr)).sum(-1)), rtol=1e-5)


def test_grpo_policy_temperature_scores_the_tempered_policy():
    """With policy_temperature T the ratio and entropy are those of softmax(logits / T)."""
    model, params = init(FakeConfig(num_mtp_layers=0, n_routed_experts=0))
    batch, _ = grpo_batch(model, params)
    T = 0.7
    logits = forward_np(model, params, batch).logits / T
    logp = token_logp_np(logits, batch["targets"])
    cfg = L.LossConfig(beta=0.0, policy_temperature=T)
    _, metrics = L.get_loss("grpo")(params, batch, None, model=model, cfg=cfg)
    mask = batch["loss_mask"].astype(np.float64)
    tmean = lambda x: (x * mask).sum() / mask.sum()
    np.testing.assert_allclose(metrics["ratio"], tmean(np.exp(logp - batch["old_logprobs"])), rtol=1e-5)
    pr = np.exp(log_softmax_np(logits))
    np.testing.assert_allclose(metrics["entropy"], tmean(-(pr * np.log(pr)).sum(-1)), rtol=1e-5)
    with pytest.raises(ValueError, match="policy_temperature"):
        L.LossConfig(policy_temperature=0.0)


def distill_batch(seed=9, topk=None):
    batch = make_batch(seed=seed)
    rng = np.random.default_rng(seed)
    t_logp = log_softmax_np(rng.normal(size=batch["tokens"].shape + (V,)) * 2)
    if topk is None:
        batch["teacher_logprobs"] = t_logp.astype(np.float32)
    else:
        ids = np.argsort(-t_logp, -1)[..., :topk]
        batch["teacher_topk_ids"] = ids.astype(np.int32)
        batch["teacher_topk_logprobs"] = np.take_along_axis(t_logp, ids, -1).astype(np.float32)
    return batch, t_logp


def test_distill_loss_matches_numpy():
    model, params = init(FakeConfig(num_mtp_layers=0, n_routed_experts=0))
    batch, t_logp = distill_batch()
    tau, alpha = 2.0, 0.7
    loss, metrics = L.get_loss("distill")(params, batch, None, model=model,
                                          cfg={"temperature": tau, "distill_alpha": alpha})
    out = forward_np(model, params, batch)
    mask = batch["loss_mask"]
    p, q = np.exp(log_softmax_np(t_logp / tau)), np.exp(log_softmax_np(out.logits / tau))
    kd = (mask * tau**2 * (p * np.log(p / q)).sum(-1)).sum() / mask.sum()
    ce = -(mask * token_logp_np(out.logits, batch["targets"])).sum() / mask.sum()
    np.testing.assert_allclose(metrics["kd"], kd, rtol=1e-5)
    np.testing.assert_allclose(loss, alpha * kd + (1 - alpha) * ce, rtol=1e-5)


def dpo_batch(model, params, seed=10, per_sequence_ref=False):
    batch = make_batch(seed=seed, sft=True, packed=False)
    logp = token_logp_np(forward_np(model, params, batch).logits, batch["targets"])
    rng = np.random.default_rng(seed)
    ref = logp + rng.normal(scale=0.5, size=logp.shape)
    batch["ref_logprobs"] = ((ref * batch["loss_mask"]).sum(1) if per_sequence_ref else ref).astype(np.float32)
    return batch, logp, ref


@pytest.mark.parametrize("per_sequence_ref", [False, True])
def test_dpo_loss_matches_numpy(per_sequence_ref):
    model, params = init(FakeConfig(num_mtp_layers=0, n_routed_experts=0))
    batch, logp, ref = dpo_batch(model, params, per_sequence_ref=per_sequence_ref)
    beta = 0.5
    loss, metrics = L.get_loss("dpo")(params, batch, None, model=model, cfg={"dpo_beta": beta})
    mask = batch["loss_mask"]
    pi, rf = (logp * mask).sum(1), (ref * mask).sum(1)
    z = beta * ((pi[0::2] - rf[0::2]) - (pi[1::2] - rf[1::2]))
    np.testing.assert_allclose(loss, np.mean(np.log1p(np.exp(-z))), rtol=1e-4)
    np.testing.assert_allclose(metrics["reward_accuracy"], np.mean(z > 0), rtol=1e-6)


def test_comm_loss_requires_group_counts_and_config_errors():
    model, params = init()
    with pytest.raises(ValueError, match="group_tokens"):
        L.pretrain_loss(params, make_batch(), None, model=model, cfg={"comm_aux_alpha": 0.02})
    with pytest.raises(KeyError, match="known losses"):
        L.get_loss("ppo")
    with pytest.raises(ValueError, match="aggregation"):
        L.LossConfig(aggregation="mean")
    with pytest.raises(ValueError, match="set only one"):
        L.LossConfig(seq_aux_alpha=1e-4, expert_aux_alpha=0.003)
    with pytest.raises(ValueError, match="unknown LossConfig"):
        L.LossConfig.from_dict({"kl_coef": 0.1})


# ----- the normalisation contract ---------------------------------------------------------

CASES = {
    "pretrain": ("pretrain", {"z_loss": 1e-3, "seq_aux_alpha": 0.01, "device_aux_alpha": 0.05,
                              "router_z_loss": 1e-3}),
    "sft": ("sft", {}),
    "grpo_token": ("grpo", {"aggregation": "token_mean", "eps_high": 0.28}),
    "grpo_seq": ("grpo", {"aggregation": "seq_mean_token_mean"}),
    "grpo_drgrpo": ("grpo", {"aggregation": "seq_mean_token_sum_norm", "max_len": 16}),
    "grpo_gspo": ("grpo", {"aggregation": "token_mean", "ratio_level": "sequence"}),
    "distill": ("distill", {"temperature": 2.0, "distill_alpha": 0.5}),
    "dpo": ("dpo", {"dpo_beta": 0.2}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_four_micro_batches_with_global_counts_equal_one_batch(case):
    name, cfg = CASES[case]
    # MoE statistics and MTP (the terms normalised by rows and tokens) go through pretrain;
    # the other objectives use a plain LM to keep compile times small.
    model, params = init() if name == "pretrain" else init(FakeConfig(num_mtp_layers=0, n_routed_experts=0))
    if name == "grpo":
        batch = grpo_batch(model, params)[0]
    elif name == "distill":
        batch = distill_batch()[0]
    elif name == "dpo":
        batch = dpo_batch(model, params)[0]
    else:
        batch = make_batch(seed=11, sft=name == "sft")
    batch["loss_mask"][5] = 0.0  # an empty row must not change any count
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    fn = jax.jit(jax.value_and_grad(lambda p, b: L.get_loss(name)(p, b, None, model=model, cfg=cfg),
                                    has_aux=True))
    (loss, metrics), grads = fn(params, batch)
    counts = L.global_counts(name, batch, cfg)
    total = None
    for i in range(4):
        mb = {k: v[2 * i:2 * i + 2] for k, v in batch.items()} | counts
        part = fn(params, mb)
        total = part if total is None else jax.tree.map(jnp.add, total, part)
    (loss_sum, metrics_sum), grads_sum = total
    np.testing.assert_allclose(loss_sum, loss, rtol=1e-6, atol=1e-6)
    for k in metrics:
        np.testing.assert_allclose(metrics_sum[k], metrics[k], rtol=1e-6, atol=1e-6, err_msg=k)
    flat, flat_sum = jax.tree.leaves(grads), jax.tree.leaves(grads_sum)
    assert all(np.isfinite(g).all() for g in flat) and sum(float(jnp.abs(g).sum()) for g in flat) > 0
    for g, gs in zip(flat, flat_sum):
        np.testing.assert_allclose(gs, g, rtol=1e-5, atol=1e-6)
