"""Tiny DeepSeek-V3 architecture (MLA + DeepSeekMoE with sigmoid group-limited routing,
router bias + MTP) that trains in seconds on a laptop CPU on the embedded synthetic tasks.

    python -m deepseek_jax.train --config configs/tiny_v3.py --workdir runs/tiny_v3
    python -m deepseek_jax.inspect --config configs/tiny_v3.py

Variants (`--config configs/tiny_v3.py:ARG`): "" (default), "f32" (float32 compute, what
the tests use), "dense" (the same width without MoE, for ablations).
"""
from deepseek_jax import experiment


def get_config(arg=None):
    c = experiment.default_config()
    c.model.update(dict(
        name="tiny_v3", vocab_size=264, hidden_size=64, num_hidden_layers=3, intermediate_size=192,
        max_position_embeddings=512,
        attention="mla", num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=48,
        first_k_dense_replace=1, scoring_func="sigmoid", n_group=4, topk_group=2,
        group_score="top2_sum", norm_topk_prob=True, routed_scaling_factor=2.5, router_bias=True,
        num_mtp_layers=1))
    c.loss = "pretrain"
    c.total_steps = 200
    c.compute_dtype = "float32"
    c.optimizer.learning_rate = 3e-3
    c.optimizer.warmup_steps = 10
    c.optimizer.weight_decay = 0.01
    c.data.seq_len = 128
    c.data.batch_size = 16
    c.log_every = 10
    c.checkpoint_every = 100
    for part in (arg or "").split(","):
        if part == "f32":
            c.compute_dtype = "float32"
        elif part == "bf16":
            c.compute_dtype = "bfloat16"
        elif part == "dense":
            c.model.n_routed_experts = 0
            c.model.num_mtp_layers = 0
        elif part:
            raise ValueError(f"configs/tiny_v3.py: unknown variant {part!r}; use f32, bf16, dense")
    return c
