"""The miniature DeepSeek-R1 recipe: pretrain -> cold-start SFT -> GRPO -> rejection-sampled
SFT of a small dense student, on the embedded arithmetic tasks. Each stage is a variant:

    python experiments/r1_pipeline.py --workdir runs/demo            # every stage, in order
    python -m deepseek_jax.train --config configs/r1_tiny.py:pretrain --workdir runs/demo/pretrain
    python -m deepseek_jax.train --config configs/r1_tiny.py:sft --workdir runs/demo/sft \\
        --config.init_from=runs/demo/pretrain

Stages ("ARG"): pretrain, sft (cold start: few steps, teaches the R1 format), grpo (the RL
stage, rl/grpo.py), student_pretrain (a V1-style dense base model on the same corpus) and
student (that base model fine-tuned on the GRPO policy's rejection-sampled completions:
R1's distillation into smaller dense models). The policy is the tiny V3 architecture
(MLA + DeepSeekMoE with sigmoid group-limited routing, router bias, MTP).

What RL has to learn here. The task is a chain of three operands ("Compute 47+38-25.",
running values in 0..99), which the tiny policy cannot answer at once but can work through
in place-value steps ("47+30=77, 77+8=85, 85-20=65, 65-5=60"). Three quarters of the
pretraining records show the worked solution and a quarter the answer alone; the cold-start
SFT pairs are three quarters answer-only (`<think></think><answer>60</answer>`). The SFT policy therefore
answers at once and is almost always wrong (held-out ~0.07, greedy), while the same policy
forced to think first is right ~0.9 of the time. GRPO, rewarded only for correct,
well-formatted answers, learns to think first within ~10 steps: completions grow from ~7
to ~27 tokens and held-out accuracy rises by tens of points on every seed and CPU tried
(README), R1-Zero's growing responses in miniature. With two operands instead (the demo
before 2026-11-30) answering at once was right 0.5-0.8 of the time depending on the CPU
(float summation order changes what the tiny model learns), and GRPO's gain with it.
"""
from deepseek_jax import experiment
from deepseek_jax.rl import grpo

# Three-operand +/- chains with running values in 0..99 (synthetic.make_problem options).
TASK = dict(task="arithmetic", digits=(1, 2), ops="+-", terms=3, value_range=(0, 99))
# Share of records rendered without the worked solution (synthetic.shows_reasoning). A quarter
# in pretraining: the policy needs the worked steps (answering at once is out of its reach
# anyway); at half, with 1200 steps, seed 1's policy forced to think first was right 0.25 of
# the time (seed 0: 0.72), and GRPO gained 10 points instead of 67.
ANSWER_ONLY = {"pretrain": 0.25, "student_pretrain": 0.25, "sft": 0.75}
STAGES = ("pretrain", "sft", "grpo", "student_pretrain", "student")


def _policy(c):
    c.model.update(dict(
        name="r1_tiny", vocab_size=264, hidden_size=64, num_hidden_layers=3, intermediate_size=192,
        max_position_embeddings=256, attention="mla", num_attention_heads=4, q_lora_rank=32,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=48,
        first_k_dense_replace=1, scoring_func="sigmoid", n_group=4, topk_group=2,
        group_score="top2_sum", norm_topk_prob=True, routed_scaling_factor=2.5, router_bias=True,
        num_mtp_layers=1))


def _student(c):
    c.model.update(dict(
        name="r1_tiny_student", vocab_size=264, hidden_size=64, num_hidden_layers=2,
        intermediate_size=192, max_position_embeddings=256, attention="mha", num_attention_heads=4,
        rope_interleave=False))


def get_config(arg=None):
    stage = arg or "pretrain"
    if stage not in STAGES:
        raise ValueError(f"configs/r1_tiny.py: unknown stage {stage!r}; use one of {STAGES}")
    c = experiment.default_config()
    c.compute_dtype = "float32"  # CPU: float32 is as fast as bfloat16 at this size
    c.data.task = dict(TASK, answer_only_fraction=ANSWER_ONLY.get(stage, 0.0))
    c.data.seq_len = 96
    c.data.batch_size = 32
    c.log_every = 25
    c.checkpoint_every = 0
    c.progress = True
    c.optimizer.weight_decay = 0.01
    c.optimizer.warmup_steps = 20
    _student(c) if stage.startswith("student") else _policy(c)
    if stage in ("pretrain", "student_pretrain"):
        # The policy's 2000 steps (with a quarter answer-only: seed 1's think-first accuracy 0.91,
        # from 0.25 at 1200 steps and half answer-only); fewer leave the step arithmetic to chance.
        c.loss, c.total_steps = "pretrain", 2000 if stage == "pretrain" else 600
        c.optimizer.learning_rate = 3e-3
    elif stage in ("sft", "student"):
        c.loss = "sft"
        c.total_steps = 150 if stage == "sft" else 600
        c.optimizer.learning_rate = 1e-3 if stage == "sft" else 3e-3
        c.loss_config.mtp_weight = 0.1
        if stage == "student":
            c.data.kind, c.data.path = "jsonl", ""  # the pipeline points it at the rejection samples
    else:  # grpo
        # 50 steps: the policy thinks first from ~step 10 and held-out accuracy is flat after
        # (seed 1: 0.92 at step 10, 0.93 at 50; a 1200-step seed-0 policy: 0.72 at 25, 0.76 at 200).
        c.loss, c.total_steps = "grpo", 50
        # Small, warmed-up lr. 1e-4 moves the answer-only vs think-first choice within ~50
        # steps (held-out 0.57 -> 0.70; 0.80 at 200); 3e-4 collapsed earlier policies (0.50 ->
        # 0.18 in 60 steps). On an all-worked corpus of 3-digit +/- (SFT at 0.55), where the
        # errors are the tiny model's arithmetic rather than a choice, neither 3e-5 nor 1e-4
        # gained more than 2 points in 150 steps.
        c.optimizer.learning_rate = 1e-4
        c.optimizer.warmup_steps = 10
        c.optimizer.b2 = 0.999
        c.optimizer.schedule = "constant"
        c.loss_config.beta = 0.0  # Dr. GRPO / DAPO drop the KL term; R1-Zero used 0.001
        # No load balancing during RL. Groups whose samples all score alike have zero
        # advantage, and Adam normalises whatever gradient is left into full-size steps: with
        # every reward zeroed, the balance loss and the bias update alone took held-out
        # accuracy from 0.50 to 0.02 in 25 steps at lr 3e-4 (0.50 with both off).
        c.loss_config.seq_aux_alpha = 0.0
        c.moe.bias_update_rate = 0.0
        c.loss_config.policy_temperature = 0.7
        c.log_every = 5
        c.eval_every = 10  # held-out accuracy along the run (plotted with the reward curve)
        c.grpo = grpo.default_grpo_config()
        c.grpo.task = dict(TASK)
        c.grpo.prompts_per_step = 32
        c.grpo.group_size = 8
        c.grpo.max_prompt_len = 20  # the longest prompt is 18 tokens, bos included
        c.grpo.max_new_tokens = 48  # the longest worked response is 43, eos included
        c.grpo.temperature = 0.7  # the tiny policy's T=1 samples are mostly wrong
        c.grpo.eval_problems = 500  # binomial standard error ~2.2 points (3.5 at 200)
    return c

