"""bfloat16 compute at DEFAULT matmul precision, for an MLA model (V2/V3 attention) and a GQA
model (V1-style), against the same parameters in float32 at "highest" precision.

Every other model test runs in float32 at "highest" precision (conftest), which is how a bf16
decode crash on XLA:CPU (issue 15: "DotThunk BF16 x BF16 = F32") went unnoticed. Here each
path the trainer, the sampler and GRPO take runs in bf16: the forward, one train step, the
cached absorbed and naive (expanded) decode, the sampler, and one GRPO step. The oracle is
the float32 computation; tolerances are those of bf16 (8 mantissa bits, relative rounding
~4e-3 per op, compounded over the layer), stated per check. Every comparison runs on one
[B, S] token shape so the float32 forward compiles once (compiles dominate the runtime).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deepseek_jax import kv_cache, sharding, train_step
from deepseek_jax.config import ModelConfig
from deepseek_jax.model import Transformer
from deepseek_jax.rl import advantages as adv_lib
from deepseek_jax.rl.sampler import Sampler

P, N = 6, 6  # sampler: prompt slots, new tokens
PROMPTS = [[5, 7, 9, 11], [3], [13, 17, 19, 23, 29, 31]]
B, S, PREFILL = len(PROMPTS), P + N, 5  # every forward / decode runs on [B, S] tokens
LOGITS_TOL = 3e-2  # max |bf16 - f32| / max |f32| over all logits
GRAD_TOL = 5e-2  # ||g_bf16 - g_f32|| / ||g_f32|| per parameter

CONFIGS = {
    # V3-style attention: q-LoRA MLA with v_head_dim != qk_nope_head_dim. Dense: MoE compiles
    # dominate CPU time, and bf16 MoE training runs end to end in the tiny_v3:bf16 acceptance run.
    "mla": ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       q_lora_rank=16, kv_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=4,
                       v_head_dim=12, intermediate_size=48),
    # V1-style (DeepSeek LLM 67B): dense, grouped-query attention, Llama RoPE layout.
    "gqa": ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, attention="mha", num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=48, rope_interleave=False),
}


def _rel(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(x - ref).max() / np.abs(ref).max())


def bf16(fn):
    """Run `fn` at jax's default matmul precision (the test harness sets "highest")."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.default_matmul_precision("default"):
            return fn(*args, **kwargs)
    return wrapped


def _plain(tokens):
    return dict(positions=jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape),
                segment_ids=jnp.ones(tokens.shape, jnp.int32))


@pytest.fixture(scope="module", params=list(CONFIGS))
def env(request):
    f32_config = CONFIGS[request.param]
    models = {"f32": Transformer(f32_config), "bf16": Transformer(dataclasses.replace(f32_config, dtype="bfloat16"))}
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    rules = sharding.logical_rules()
    opt = optax.sgd(1.0)  # the update is minus the gradient: compared with the float32 gradient
    state = train_step.create_train_state(models["f32"], opt, mesh, rules, seed=0)
    # Scaled up from the 0.02 init so logits vary by O(1) and a wrong path shows.
    state = state.replace(params=jax.tree.map(lambda p: p * 6.0 if p.ndim >= 2 else p, state.params))
    forward = jax.jit(lambda p, t, positions, segment_ids: models["f32"].apply(
        {"params": p}, t, positions=positions, segment_ids=segment_ids).logits)
    tokens = jax.random.randint(jax.random.key(1), (B, S), 0, f32_config.vocab_size)
    full = forward(state.params, tokens, **_plain(tokens))
    assert float(jnp.abs(full).max()) > 1.0
    return dict(models=models, params=state.params, state=state, tokens=tokens, full=full, forward=forward,
                opt=opt, mesh=mesh, rules=rules)


def _f32_grad(env, loss_name, batch):
    fn = train_step.bind_loss(loss_name, env["models"]["f32"])
    return jax.jit(jax.value_and_grad(lambda p: fn(p, batch, None)[0]))(env["params"])


def _check_grads(env, loss_bf16, grads_bf16, loss_name, batch):
    loss_f32, grads_f32 = _f32_grad(env, loss_name, batch)
    assert abs(float(loss_bf16) - float(loss_f32)) <= 2e-2 * max(1.0, abs(float(loss_f32)))
    errs = jax.tree.map(lambda g, r: float(np.linalg.norm(np.asarray(g, np.float64) - np.asarray(r, np.float64))
                                           / max(np.linalg.norm(np.asarray(r, np.float64)), 1e-12)),
                        grads_bf16, grads_f32)
    assert max(jax.tree.leaves(errs)) <= GRAD_TOL, errs
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads_f32)) > 1e-3  # a real gradient


def test_forward(env):
    model = env["models"]["bf16"]
    tokens = env["tokens"]
    logits = bf16(jax.jit(lambda p, t: model.apply({"params": p}, t, **_plain(t)).logits))(env["params"], tokens)
    assert logits.dtype == jnp.float32  # the head is float32 whatever the compute dtype
    assert _rel(logits, env["full"]) <= LOGITS_TOL


def test_train_step(env):
    """The trainer's step (make_train_step) in bf16; SGD at rate 1 makes its update -grad."""
    model = env["models"]["bf16"]
    toks = np.asarray(env["tokens"])
    batch = {"tokens": toks[:, :-1], "targets": toks[:, 1:], "loss_mask": np.ones((B, S - 1), np.float32),
             "positions": np.broadcast_to(np.arange(S - 1, dtype=np.int32), (B, S - 1)),
             "segment_ids": np.ones((B, S - 1), np.int32)}
    step = train_step.make_train_step(model, train_step.bind_loss("pretrain", model), env["opt"], env["mesh"],
                                      env["rules"], donate=False)
    new_state, metrics = bf16(step)(env["state"], batch)
    grads = jax.tree.map(lambda a, b: a - b, env["params"], new_state.params)
    _check_grads(env, metrics["loss"], grads, "pretrain", batch)


@pytest.mark.parametrize("absorbed", [True, False])
def test_cached_decode(env, absorbed):
    if env["models"]["f32"].config.attention != "mla" and not absorbed:
        pytest.skip("absorbed vs naive is an MLA choice; GQA is covered by absorbed=True")
    model, params = env["models"]["bf16"], env["params"]

    @jax.jit
    def run(tokens):
        cache = kv_cache.init_cache(model.config, B, S)
        out, cache = model.apply({"params": params}, tokens[:, :PREFILL], cache=cache, absorbed=absorbed)

        def step(cache, token_B):
            out, cache = model.apply({"params": params}, token_B[:, None], cache=cache, absorbed=absorbed)
            return cache, out.logits[:, 0]

        _, logits_SxBxV = jax.lax.scan(step, cache, tokens[:, PREFILL:].T)
        return jnp.concatenate([out.logits, logits_SxBxV.transpose(1, 0, 2)], axis=1), cache

    logits, cache = bf16(run)(env["tokens"])
    assert {a.dtype for layer in cache.layers for a in layer.values()} == {jnp.dtype(jnp.bfloat16)}
    assert _rel(logits, env["full"]) <= LOGITS_TOL


@pytest.fixture(scope="module")
def sampled(env):
    """A bf16 sampler run (greedy, absorbed decode, ragged prompts with left padding)."""
    sampler = Sampler(env["models"]["bf16"], max_prompt_len=P, max_new_tokens=N, pad_id=0)
    out = bf16(sampler.generate)(env["params"], PROMPTS, jax.random.key(0), temperature=0.0)
    tokens, positions, segment_ids, _ = out.sequences()
    assert tokens.shape == (B, S)
    return out, env["forward"](env["params"], tokens, positions, segment_ids)


def test_sampler(env, sampled):
    """Oracle: the float32 forward over the sampled sequences (teacher forcing), so a greedy
    choice that bf16 flips between two near-equal logits does not derail the comparison."""
    out, logits = sampled
    logp = np.asarray(jax.nn.log_softmax(logits[:, P - 1:-1], axis=-1))
    picked = np.take_along_axis(logp, np.asarray(out.tokens)[..., None], axis=-1)[..., 0]
    assert bool(out.mask.all())
    np.testing.assert_allclose(np.asarray(out.logprobs), picked, atol=5e-2)
    # Greedy in bf16 picks the float32 argmax wherever the float32 top-2 gap is beyond bf16 noise.
    top2 = np.sort(logp, axis=-1)[..., -2:]
    clear = (top2[..., 1] - top2[..., 0]) > 0.1
    assert clear.mean() > 0.5
    np.testing.assert_array_equal(np.asarray(out.tokens)[clear], logp.argmax(-1)[clear])


def test_grpo_step(env, sampled):
    """The GRPO loss and its gradient in bf16 on the bf16 rollout above (advantages from the
    group formula of fixed rewards; the optimizer update after the gradient is dtype-free)."""
    out, _ = sampled
    batch = adv_lib.build_grpo_batch(*jax.device_get(out.sequences()), np.asarray(out.logprobs),
                                     adv_lib.group_advantages(np.array([[1.0, 0.0, 0.5]]), "grpo").reshape(-1))
    batch["ref_logprobs"] = batch["old_logprobs"]
    fn = train_step.bind_loss("grpo", env["models"]["bf16"])
    loss, grads = bf16(jax.jit(jax.value_and_grad(lambda p: fn(p, batch, None)[0])))(env["params"])
    _check_grads(env, loss, grads, "grpo", batch)
