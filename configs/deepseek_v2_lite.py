"""DeepSeek-V2-Lite (15.7B total, 2.4B activated; arXiv:2405.04434 Appendix B) at paper size.

    python -m deepseek_jax.inspect --config configs/deepseek_v2_lite.py
    python -m deepseek_jax.train --config configs/deepseek_v2_lite.py --workdir runs/v2_lite
    python -m deepseek_jax.train --config configs/deepseek_v2_lite.py:runlocal --workdir runs/local

Model values are the published `config.json` (deepseek-ai/DeepSeek-V2-Lite): MLA without
q-LoRA, 64 routed experts (top-6, greedy: no group limit) + 2 shared, softmax scores, scale
1.0, first layer dense, YaRN factor 40 with mscale 0.707. Training values follow Appendix B:
AdamW (0.9, 0.95), weight decay 0.1, clip 1.0, 2000 warmup steps to 4.2e-4, the V2 step decay,
batch 4608 x 4096 tokens over 5.7T tokens, expert-level balance loss alpha_1 0.001 (the
experts are not spread over devices for routing, so no device/communication losses).
Dispatch is dropless; `--config.moe.dispatch=capacity` gives V2's token dropping (§2.2.4,
`moe.capacity_policy="affinity"`, capacity factor 1.0 per device; never at inference).

Cluster defaults (a GPU cluster, e.g. 64 x H100/H200): bfloat16 compute with float32 master
weights, full rematerialisation, 8-way expert parallelism inside a node, the remaining
devices as FSDP, and 72 micro-batches so each device sees one 4096-token sequence per
micro-batch on 64 devices (4608 / 72 = 64). Rescale `--config.microbatches` for another
device count: batch_size / microbatches must be a multiple of it.

Variants (`:ARG`): "" paper size; "pretrain" the 4K pre-training stage (no YaRN);
"runlocal" the same architecture shrunk to run on a laptop CPU in seconds.
"""
from deepseek_jax import experiment

TRAIN_TOKENS = 5.7e12


def get_config(arg=None):
    c = experiment.default_config()
    c.model.update(dict(
        name="deepseek_v2_lite", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        num_hidden_layers=27, rms_norm_eps=1e-6, max_position_embeddings=163840,
        attention="mla", num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, rope_theta=10000.0,
        rope_interleave=True,
        rope_scaling=dict(factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
                          beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707),
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
        moe_intermediate_size=1408, first_k_dense_replace=1, moe_layer_freq=1,
        scoring_func="softmax", n_group=1, topk_group=1, group_score="max",
        norm_topk_prob=False, routed_scaling_factor=1.0, router_bias=False, num_mtp_layers=0))
    c.loss = "pretrain"
    c.loss_config.update(dict(seq_aux_alpha=0.0, expert_aux_alpha=0.001))
    c.compute_dtype = "bfloat16"
    c.remat = "full"
    # The layers as nn.scan stacks (layer_stack.py): one layer traced per stack, so depth costs
    # ~nothing to compile; HF import/export and inspect see the per-layer layout.
    c.model.scan_layers = True
    c.mesh.update(dict(data=1, fsdp=-1, expert=8, tensor=1))
    c.moe.update(dict(dispatch="dropless", capacity_policy="affinity", capacity_factor=1.0,
                      routing_impl="auto", bias_update_rate=0.0))
    c.data.seq_len = 4096
    c.data.batch_size = 4608
    c.microbatches = 72
    c.total_steps = round(TRAIN_TOKENS / (c.data.batch_size * c.data.seq_len))
    c.optimizer.update(dict(learning_rate=4.2e-4, warmup_steps=2000, schedule="multistep",
                            multistep_boundaries=[0.6, 0.9], multistep_factors=[0.316, 0.1],
                            weight_decay=0.1, clip_norm=1.0))
    c.checkpoint_every = 1000
    for part in (arg or "").split(","):
        if part == "pretrain":
            c.model.rope_scaling = None
            c.model.max_position_embeddings = 4096
        elif part == "runlocal":
            _runlocal(c)
        elif part:
            raise ValueError(f"configs/deepseek_v2_lite.py: unknown variant {part!r}; "
                             "use pretrain, runlocal (comma-separated)")
    return c


def _runlocal(c):
    """Direct-query MLA, YaRN, greedy softmax routing, 2 shared experts at toy width."""
    c.model.update(dict(
        vocab_size=264, hidden_size=64, intermediate_size=192, num_hidden_layers=3,
        num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32))
    c.compute_dtype = "float32"
    c.remat = "none"
    c.mesh.update(dict(data=-1, fsdp=1, expert=1, tensor=1))
    c.data.update(dict(seq_len=128, batch_size=16))
    c.microbatches = 1
    c.total_steps = 100
    c.optimizer.update(dict(learning_rate=3e-3, warmup_steps=10))
    c.checkpoint_every = 50
