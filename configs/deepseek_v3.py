"""DeepSeek-V3 (671B total, 37B activated; arXiv:2412.19437) at paper size.

    python -m deepseek_jax.inspect --config configs/deepseek_v3.py
    python -m deepseek_jax.train --config configs/deepseek_v3.py --workdir runs/deepseek_v3
    python -m deepseek_jax.train --config configs/deepseek_v3.py:runlocal --workdir runs/v3_local

Model values are the published `config.json` (deepseek-ai/DeepSeek-V3, = transformers'
`DeepseekV3Config()` defaults plus the YaRN `rope_scaling` and max_position_embeddings
163840 of the release). Training values follow the paper §4.2: AdamW (0.9, 0.95), weight
decay 0.1, clip 1.0, 2000 warmup steps to 2.2e-4, constant, then cosine decay to 2.2e-5 over
the last 4.3T of 14.8T tokens (`wsd`), batch 15360 x 4096 tokens, bias update rate 0.001,
sequence-wise balance alpha 1e-4, MTP weight 0.3.

Cluster defaults (a GPU cluster, e.g. 256 x H100/H200): bfloat16 compute with float32
master weights, full rematerialisation, 64-way expert parallelism (as in the paper, 4 experts
per GPU), the remaining devices as FSDP, every non-expert weight split over FSDP x expert
(ZeRO-3 over the whole mesh), no tensor parallelism, and 60 micro-batches so each
device sees one 4096-token sequence per micro-batch on 256 devices (15360 / 60 = 256).
Rescale `--config.microbatches` for another device count: batch_size / microbatches must be
a multiple of it. The full model needs ~16 bytes/param of train state (~10.7 TB), i.e. at
least ~128 80-GB GPUs.

Variants (`:ARG`, comma-separated): "" paper size; "pretrain" the 4K pre-training stage
(no YaRN, max_position_embeddings 4096); "no_mtp" drops the MTP module; "runlocal" the same
architecture shrunk to run on a laptop CPU in seconds (float32, one device group).
"""
from deepseek_jax import experiment

TRAIN_TOKENS = 14.8e12


def get_config(arg=None):
    c = experiment.default_config()
    c.model.update(dict(
        name="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
        num_hidden_layers=61, rms_norm_eps=1e-6, max_position_embeddings=163840,
        attention="mla", num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, rope_theta=10000.0,
        rope_interleave=True,
        rope_scaling=dict(factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
                          beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
        n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8,
        moe_intermediate_size=2048, first_k_dense_replace=3, moe_layer_freq=1,
        scoring_func="sigmoid", n_group=8, topk_group=4, group_score="top2_sum",
        norm_topk_prob=True, routed_scaling_factor=2.5, router_bias=True, num_mtp_layers=1))
    c.loss = "pretrain"
    c.loss_config.seq_aux_alpha = 1e-4
    c.loss_config.mtp_weight = 0.3
    c.compute_dtype = "bfloat16"
    c.remat = "full"
    # The layers as nn.scan stacks (layer_stack.py): one layer traced per stack, so depth costs
    # ~nothing to compile; HF import/export and inspect see the per-layer layout.
    c.model.scan_layers = True
    c.mesh.update(dict(data=1, fsdp=-1, expert=64, tensor=1))
    # ZeRO-3 over the whole mesh: the non-expert weights (attention incl. MLA's q_b / kv_b
    # projections, shared experts, dense layers, embedding, head) are split over fsdp x expert,
    # as the routed experts are. Over fsdp alone they were 64x replicated: 38 GB of parameters
    # per device on 256 GPUs where an even split is 10.7 GB (README "Planning a run").
    for name in ("embed", "q_lora", "kv_lora"):
        c.sharding_rules[name] = ("fsdp", "expert")
    c.moe.update(dict(dispatch="dropless", routing_impl="auto", bias_update_rate=1e-3))
    c.data.seq_len = 4096
    c.data.batch_size = 15360
    c.microbatches = 60
    c.total_steps = round(TRAIN_TOKENS / (c.data.batch_size * c.data.seq_len))
    c.optimizer.update(dict(learning_rate=2.2e-4, warmup_steps=2000, schedule="wsd",
                            wsd_decay_fraction=4.3 / 14.8, wsd_decay_shape="cosine",
                            min_lr_ratio=0.1, weight_decay=0.1, clip_norm=1.0))
    c.log_every = 10
    c.checkpoint_every = 1000
    for part in (arg or "").split(","):
        if part == "pretrain":
            c.model.rope_scaling = None
            c.model.max_position_embeddings = 4096
        elif part == "no_mtp":
            c.model.num_mtp_layers = 0
        elif part == "runlocal":
            _runlocal(c)
        elif part:
            raise ValueError(f"configs/deepseek_v3.py: unknown variant {part!r}; "
                             "use pretrain, no_mtp, runlocal (comma-separated)")
    return c


def _runlocal(c):
    """Every V3 feature (q-LoRA MLA, YaRN, sigmoid top2_sum groups, bias, MTP) at toy width."""
    c.model.update(dict(
        vocab_size=264, hidden_size=64, intermediate_size=192, num_hidden_layers=3,
        num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=16, num_experts_per_tok=4,
        moe_intermediate_size=32, first_k_dense_replace=1))
    c.compute_dtype = "float32"
    c.remat = "none"
    c.mesh.update(dict(data=-1, fsdp=1, expert=1, tensor=1))
    c.data.update(dict(seq_len=128, batch_size=16))
    c.microbatches = 1
    c.total_steps = 100
    c.optimizer.update(dict(learning_rate=3e-3, warmup_steps=10))
    c.checkpoint_every = 50
