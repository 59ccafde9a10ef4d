"""experiments/benchmarks/train_step_cpu.py --quick --tiny --json runs and reports sane numbers.

A subprocess, so the command line is exercised as a user runs it. The oracle for the
FLOP count is the parameter count of the model actually built (activated = all weights
here minus the embedding and the experts a token skips), checked independently of the
bench's own formula.
"""
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "benchmarks" / "train_step_cpu.py"
sys.path.insert(0, str(SCRIPT.parent))
import train_step_cpu as bench  # noqa: E402


def test_quick_json_run(tmp_path):
    results = tmp_path / "RESULTS.md"
    # The repository's compilation cache makes reruns fast (as tests/conftest.py does).
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(REPO / ".jax_cache"))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--tiny", "--json", "--dtype", "float32",
                           "--results", str(results)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    r = json.loads(lines[0])
    assert r["dtype"] == "float32"
    assert r["tokens_per_s"] > 0 and np.isfinite(r["loss"])
    # MFU against the same run's peak: positive, and a CPU step cannot beat its matmul peak.
    assert 0 < r["mfu"] < 1
    np.testing.assert_allclose(r["mfu"], r["flops_per_step"] / r["step_s"] / r["peak_flops"], rtol=1e-6)
    text = results.read_text()
    assert "## train_step_cpu.py, " in text and "| float32 |" in text


def test_activated_params_match_the_built_model():
    from deepseek_jax.config import ModelConfig
    from deepseek_jax.model import Transformer
    from deepseek_jax import sharding
    from flax import linen as nn

    c = ModelConfig.from_dict(bench.BENCH)
    params = nn.meta.unbox(sharding.abstract_params(Transformer(c)))
    flat = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    size = lambda shape: int(np.prod(shape))
    matmul = sum(size(s) for k, s in flat.items() if len(s) >= 2 and "embedding" not in k)
    # Routed experts: a token uses top_k of the n_routed_experts in each MoE layer.
    routed = sum(size(s) for k, s in flat.items() if len(s) == 3 and any(w in k for w in ("gate_proj", "up_proj", "down_proj")) and "shared" not in k)
    want = matmul - routed + routed * c.num_experts_per_tok // c.n_routed_experts
    assert bench.activated_matmul_params(c) == want
    # inspect.py's count (read off logical axes) agrees with this one: 6N + causal attention.
    flops, source = bench.train_flops_per_token(c, 256)
    attn = 3 * c.num_hidden_layers * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * 256
    assert flops == 6 * want + attn, source
    # The output head dominates at vocab 32000 (the issue quotes ~77%).
    assert 0.7 < 6 * c.hidden_size * c.vocab_size / flops < 0.85
