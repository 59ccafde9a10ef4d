"""Post-training any DeepSeek-family checkpoint on your own data: SFT, GRPO or DPO.

    # SFT on conversations ({"messages": [...]}) or {"prompt", "response"} rows
    python -m deepseek_jax.train --config configs/post_train.py:sft --workdir runs/sft \\
        --config.init_from=path/to/hf_dir --config.data.path=chats.jsonl
    # GRPO on your prompts, scored by your reward function (reward(prompt, completion, **columns))
    python -m deepseek_jax.train --config configs/post_train.py:grpo --workdir runs/grpo \\
        --config.init_from=runs/sft --config.grpo.prompts=prompts.jsonl \\
        --config.grpo.reward_spec="my_rewards.py:exact_word=1.0,format=0.1"
    # DPO on {"prompt", "chosen", "rejected"} rows
    python -m deepseek_jax.train --config configs/post_train.py:dpo --workdir runs/dpo \\
        --config.init_from=runs/sft --config.data.path=pairs.jsonl --config.export_hf=out/dpo_hf

`init_from` is a Hugging Face directory (config.json + safetensors, FP8 included), an Orbax
directory from `python -m deepseek_jax.convert`, or a training workdir; the model config is
the checkpoint's (post_train.resolve_init_from): `compute_dtype`, `remat`, `moe.*` may be
changed, and `model.num_mtp_layers=0` drops the MTP modules (-1 keeps the checkpoint's).
`data.tokenizer="auto"` is the checkpoint's tokenizer.json and `data.chat_template="auto"` its
tokenizer_config.json template. Bad rows are errors naming file:line (`data.on_error="raise"`).
`export_hf=DIR` writes the final policy as a transformers checkpoint with the tokenizer files.
"""
from deepseek_jax import experiment
from deepseek_jax.rl import grpo

VARIANTS = ("sft", "grpo", "dpo")


def get_config(arg=None):
    variant = arg or "sft"
    if variant not in VARIANTS:
        raise ValueError(f"configs/post_train.py: unknown variant {variant!r}; use one of {VARIANTS}")
    c = experiment.default_config()
    c.model.num_mtp_layers = -1  # -1: the checkpoint's; 0 drops MTP for post-training
    c.init_from = ""
    c.export_hf = ""
    c.data.kind, c.data.path, c.data.eval_path = "jsonl", "", ""
    c.data.tokenizer, c.data.chat_template, c.data.on_error = "auto", "auto", "raise"
    c.data.seq_len, c.data.batch_size = 1024, 16
    c.log_every, c.checkpoint_every = 10, 500
    c.optimizer.weight_decay = 0.0
    c.optimizer.warmup_steps = 10
    c.loss_config.seq_aux_alpha = 0.0  # post-training: no balance loss, no bias updates
    c.moe.bias_update_rate = 0.0
    if variant == "sft":
        c.loss, c.total_steps = "sft", 1000
        c.optimizer.learning_rate = 1e-5
        c.loss_config.mtp_weight = 0.1
    elif variant == "dpo":
        c.loss, c.total_steps = "dpo", 500
        c.optimizer.learning_rate = 5e-7  # DPO's usual range (Rafailov et al. use 1e-6)
        c.loss_config.dpo_beta = 0.1
    else:
        c.loss, c.total_steps = "grpo", 200
        c.optimizer.learning_rate = 1e-6
        c.optimizer.schedule = "constant"
        c.loss_config.beta = 0.0
        c.grpo = grpo.default_grpo_config()
        c.grpo.max_prompt_len = 512
        c.grpo.max_new_tokens = 512
        c.eval_every = 0
    return c
