"""DeepSeek-V2 (236B total, 21B activated; arXiv:2405.04434) at paper size.

    python -m deepseek_jax.inspect --config configs/deepseek_v2.py
    python -m deepseek_jax.train --config configs/deepseek_v2.py --workdir runs/deepseek_v2
    python -m deepseek_jax.train --config configs/deepseek_v2.py:runlocal --workdir runs/v2_local

Model values are the published `config.json` (deepseek-ai/DeepSeek-V2): MLA with q-LoRA,
160 routed experts (top-6) + 2 shared, device-limited routing (8 groups, top-3 by max score),
softmax scores without renormalisation, scale 16, YaRN factor 40 with mscale 0.707.
Training values follow the paper §3.2: AdamW (0.9, 0.95), weight decay 0.1, clip 1.0,
2000 warmup steps to 2.4e-4, x0.316 after ~60% and again after ~90% of 8.1T tokens, batch
9216 x 4096 tokens, balance losses alpha_1 0.003 / alpha_2 0.05 / alpha_3 0.02, token
dropping (§2.2.4, `moe.capacity_policy="affinity"`): each device computes at most its average
load (capacity factor 1.0), dropping the lowest-affinity copies; ~10% of the sequences are
never dropped, and evaluation and generation never drop.

Cluster defaults (a GPU cluster, e.g. 256 x H100/H200): bfloat16 compute with float32 master
weights, full rematerialisation, 8-way expert parallelism inside a node (the paper's EP), the
remaining devices as FSDP, and 36 micro-batches so each device sees one 4096-token sequence
per micro-batch on 256 devices (9216 / 36 = 256). Rescale `--config.microbatches` for another
device count: batch_size / microbatches must be a multiple of it.

Variants (`:ARG`): "" paper size; "pretrain" the 4K pre-training stage (no YaRN);
"runlocal" the same architecture shrunk to run on a laptop CPU in seconds.
"""
from deepseek_jax import experiment

TRAIN_TOKENS = 8.1e12


def get_config(arg=None):
    c = experiment.default_config()
    c.model.update(dict(
        name="deepseek_v2", vocab_size=102400, hidden_size=5120, intermediate_size=12288,
        num_hidden_layers=60, rms_norm_eps=1e-6, max_position_embeddings=163840,
        attention="mla", num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, rope_theta=10000.0,
        rope_interleave=True,
        rope_scaling=dict(factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
                          beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707),
        n_routed_experts=160, n_shared_experts=2, num_experts_per_tok=6,
        moe_intermediate_size=1536, first_k_dense_replace=1, moe_layer_freq=1,
        scoring_func="softmax", n_group=8, topk_group=3, group_score="max",
        norm_topk_prob=False, routed_scaling_factor=16.0, router_bias=False, num_mtp_layers=0))
    c.loss = "pretrain"
    c.loss_config.update(dict(seq_aux_alpha=0.0, expert_aux_alpha=0.003, device_aux_alpha=0.05,
                              comm_aux_alpha=0.02))
    c.compute_dtype = "bfloat16"
    c.remat = "full"
    # The layers as nn.scan stacks (layer_stack.py): one layer traced per stack, so depth costs
    # ~nothing to compile; HF import/export and inspect see the per-layer layout.
    c.model.scan_layers = True
    c.mesh.update(dict(data=1, fsdp=-1, expert=8, tensor=1))
    # ZeRO-3 over the whole mesh, as in configs/deepseek_v3.py: the non-expert weights are
    # split over fsdp x expert like the routed experts, not replicated 8x over expert.
    for name in ("embed", "q_lora", "kv_lora"):
        c.sharding_rules[name] = ("fsdp", "expert")
    c.moe.update(dict(dispatch="capacity", capacity_policy="affinity", capacity_factor=1.0,
                      routing_impl="auto", bias_update_rate=0.0))
    c.data.seq_len = 4096
    c.data.batch_size = 9216
    c.microbatches = 36
    c.total_steps = round(TRAIN_TOKENS / (c.data.batch_size * c.data.seq_len))
    c.optimizer.update(dict(learning_rate=2.4e-4, warmup_steps=2000, schedule="multistep",
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
            raise ValueError(f"configs/deepseek_v2.py: unknown variant {part!r}; "
                             "use pretrain, runlocal (comma-separated)")
    return c


def _runlocal(c):
    """q-LoRA MLA, YaRN, softmax max-score groups, 2 shared experts at toy width."""
    c.model.update(dict(
        vocab_size=264, hidden_size=64, intermediate_size=192, num_hidden_layers=3,
        num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=16, num_experts_per_tok=3,
        moe_intermediate_size=32, n_group=4, topk_group=2))
    c.compute_dtype = "float32"
    c.remat = "none"
    c.mesh.update(dict(data=-1, fsdp=1, expert=1, tensor=1))
    c.moe.dispatch = "dropless"
    c.data.update(dict(seq_len=128, batch_size=16))
    c.microbatches = 1
    c.total_steps = 100
    c.optimizer.update(dict(learning_rate=3e-3, warmup_steps=10))
    c.checkpoint_every = 50
