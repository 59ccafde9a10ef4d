"""DeepSeek LLM 7B (V1, dense, 6.9B params; arXiv:2401.02954) at paper size.

    python -m deepseek_jax.inspect --config configs/deepseek_v1_7b.py
    python -m deepseek_jax.train --config configs/deepseek_v1_7b.py --workdir runs/v1_7b
    python -m deepseek_jax.train --config configs/deepseek_v1_7b.py:runlocal --workdir runs/local

Llama architecture as published (deepseek-ai/deepseek-llm-7b-base `config.json`):
multi-head attention (32 heads), RoPE on halves (Llama layout, `rope_interleave=False`),
SwiGLU 11008, 30 layers, width 4096, vocabulary 102400, 4096 positions.
Training values follow the paper §2.3 (Table 2): AdamW (0.9, 0.95), weight decay 0.1, clip
1.0, 2000 warmup steps to 4.2e-4, the multi-step schedule (31.6% of the peak after 80% and 10%
after 90% of 2T tokens), batch 2304 x 4096 tokens.

Cluster defaults (a GPU cluster, e.g. 64 x H100/H200): bfloat16 compute with float32
master weights, full rematerialisation, pure FSDP (ZeRO-3) over all devices, and 36
micro-batches so each device sees one 4096-token sequence per micro-batch on 64 devices
(2304 / 36 = 64). Rescale `--config.microbatches` for another device count:
batch_size / microbatches must be a multiple of it.

Variants (`:ARG`): "" paper size; "runlocal" the same architecture shrunk to run on a laptop
CPU in seconds.
"""
from deepseek_jax import experiment

TRAIN_TOKENS = 2e12


def get_config(arg=None):
    c = experiment.default_config()
    c.model.update(dict(
        name="deepseek_v1_7b", vocab_size=102400, hidden_size=4096, intermediate_size=11008,
        num_hidden_layers=30, rms_norm_eps=1e-6, max_position_embeddings=4096,
        attention="mha", num_attention_heads=32, num_key_value_heads=32, rope_theta=10000.0,
        rope_interleave=False, rope_scaling=None, n_routed_experts=0, num_mtp_layers=0))
    c.loss = "pretrain"
    c.loss_config.seq_aux_alpha = 0.0  # dense: no router
    c.compute_dtype = "bfloat16"
    c.remat = "full"
    # The layers as nn.scan stacks (layer_stack.py): one layer traced per stack, so depth costs
    # ~nothing to compile; HF import/export and inspect see the per-layer layout.
    c.model.scan_layers = True
    c.mesh.update(dict(data=1, fsdp=-1, expert=1, tensor=1))
    c.data.seq_len = 4096
    c.data.batch_size = 2304
    c.microbatches = 36
    c.total_steps = round(TRAIN_TOKENS / (c.data.batch_size * c.data.seq_len))
    c.optimizer.update(dict(learning_rate=4.2e-4, warmup_steps=2000, schedule="multistep",
                            multistep_boundaries=[0.8, 0.9], multistep_factors=[0.316, 0.1],
                            weight_decay=0.1, clip_norm=1.0))
    c.checkpoint_every = 1000
    for part in (arg or "").split(","):
        if part == "runlocal":
            _runlocal(c)
        elif part:
            raise ValueError(f"configs/deepseek_v1_7b.py: unknown variant {part!r}; use runlocal")
    return c


def _runlocal(c):
    """The same attention layout (MHA or GQA, half-split RoPE) at toy width."""
    c.model.update(dict(vocab_size=264, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4))
    c.compute_dtype = "float32"
    c.remat = "none"
    c.data.update(dict(seq_len=128, batch_size=16))
    c.microbatches = 1
    c.total_steps = 100
    c.optimizer.update(dict(learning_rate=3e-3, warmup_steps=10))
    c.checkpoint_every = 50
