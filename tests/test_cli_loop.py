"""The closed loop of command-line tools (issue: every CLI reads every run, readers never
write, refusals are one clean line, logs work without a terminal).

One briefly trained r1_tiny policy (train CLI, output piped: no TTY) is shared. Oracles:
the file tree (names, sizes, mtimes) before and after a reader; the schedule's closed
form; transformers (logits, greedy generate, tokenizer) on the exported directory; a real
full file system (a small tmpfs) for the disk-full save.
"""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from deepseek_jax import export, generate, loading
from deepseek_jax.data.tokenizer import ByteTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = ["--config", "configs/r1_tiny.py:pretrain", "--config.total_steps=30", "--config.data.batch_size=8",
            "--config.data.seq_len=64", "--config.log_every=5", "--config.optimizer.warmup_steps=2",
            "--config.data.num_problems=2000", "--config.checkpoint_every=10"]
pytestmark = pytest.mark.slow


def _env():
    env = dict(os.environ)
    env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("DEEPSEEK_JAX_TRACEBACK", None)
    return env


def _cli(module, *args, timeout=900):
    r = subprocess.run([sys.executable, "-m", f"deepseek_jax.{module}", *args], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stdout + r.stderr


def _tree(path):
    """Every file and directory under `path` with its size and mtime (what a reader must not change)."""
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = os.path.join(root, name)
            st = os.stat(p)
            out[os.path.relpath(p, path)] = (st.st_size if name in files else 0, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("cli") / "pretrain")
    rc, out = _cli("train", *PRETRAIN, "--workdir", workdir)
    assert rc == 0, out[-3000:]
    return workdir, out


def test_train_without_a_terminal_logs_every_step_line_and_the_first_lr_is_not_zero(pretrained):
    workdir, out = pretrained
    lines = [line for line in out.splitlines() if "step " in line and "/30" in line]
    assert len(lines) == 6, out[-3000:]  # log_every=5 over 30 steps
    for key in ("loss ", "lr ", "tokens/s ", "ETA "):
        assert all(key in line for line in lines), (key, lines)
    assert "documents: 0" not in out and '"data/documents": 0' not in out
    assert "synthetic, 2000 problems" in out
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    # Closed form of the warm-up: peak * (step + 1) / W at the first update (step index 0).
    assert rows[0]["step"] == 5
    assert rows[0]["learning_rate"] > 0
    from deepseek_jax import experiment, optim
    cfg = experiment.load_config("configs/r1_tiny.py:pretrain", ["optimizer.warmup_steps=2", "total_steps=30"])
    assert float(optim.make_schedule(experiment.optimizer_config(cfg))(0)) == pytest.approx(3e-3 / 2)
    # No absl/Orbax INFO chatter beyond our own lines.
    assert not [line for line in out.splitlines() if "orbax" in line.lower() and line.startswith("I")]


def test_loader_reads_a_given_step_read_only(pretrained):
    workdir, _ = pretrained
    before = _tree(workdir)
    newest, older = loading.load(workdir), loading.load(workdir, step=20)
    assert (newest.step, older.step, newest.kind) == (30, 20, loading.WORKDIR)
    a = np.asarray(newest.params["embed"]["embedding"])
    b = np.asarray(older.params["embed"]["embedding"])
    assert a.shape == b.shape and not np.array_equal(a, b)
    with pytest.raises(loading.LoadError, match=r"steps \[10, 20, 30\]"):
        loading.load(workdir, step=7)
    assert _tree(workdir) == before


def test_refused_resume_writes_nothing_and_names_the_key(pretrained):
    workdir, _ = pretrained
    config_bytes = open(os.path.join(workdir, "config.json"), "rb").read()
    before = _tree(workdir)
    rc, out = _cli("train", *PRETRAIN, "--config.model.hidden_size=96", "--workdir", workdir)
    assert rc == 2, out
    assert len(out.strip().splitlines()) < 20, out
    assert "model.hidden_size: 64 -> 96" in out
    assert "Event loop is closed" not in out and "Traceback" not in out
    assert open(os.path.join(workdir, "config.json"), "rb").read() == config_bytes
    assert _tree(workdir) == before


def test_help_exits_0_and_unknown_key_is_one_line_with_did_you_mean(tmp_path):
    rc, out = _cli("train", "--help")
    assert rc == 0 and "--config.KEY=VALUE" in out and "--workdir" in out, out
    rc, out = _cli("train", "--config", "configs/tiny_v3.py", "--config.modle.hidden_size=96",
                   "--workdir", str(tmp_path / "w"))
    assert rc == 2 and len(out.strip().splitlines()) == 1, out
    assert "did you mean" in out.lower() and '"model"' in out
    assert not os.path.exists(tmp_path / "w")


def test_train_cli_runs_grpo_and_generate_reads_the_grpo_workdir_without_writing(pretrained, tmp_path):
    sft, _ = pretrained
    grpo_dir = str(tmp_path / "grpo")
    rc, out = _cli("train", "--config", "configs/r1_tiny.py:grpo", "--workdir", grpo_dir,
                   f"--config.init_from={sft}", "--config.total_steps=2", "--config.optimizer.warmup_steps=0",
                   "--config.log_every=1", "--config.grpo.prompts_per_step=4", "--config.grpo.group_size=2",
                   "--config.grpo.max_new_tokens=8", "--config.eval_every=0", "--config.grpo.eval_problems=8")
    assert rc == 0, out[-3000:]
    rows = [json.loads(line) for line in open(os.path.join(grpo_dir, "metrics.jsonl"))]
    assert [r["step"] for r in rows if "reward_mean" in r] == [1, 2]

    # A save in progress beside the reader (what a running training would have) must survive.
    os.makedirs(os.path.join(grpo_dir, "checkpoints", "4.orbax-checkpoint-tmp-1"))
    before, before_sft = _tree(grpo_dir), _tree(sft)
    rc, out = _cli("generate", "--workdir", grpo_dir, "--prompt", "12+3=", "--max_new_tokens", "8")
    assert rc == 0, out[-3000:]
    assert out.strip().splitlines()[-1].startswith("12+3="), out
    assert len(out.strip().splitlines()) <= 2, out  # no absl/Orbax INFO lines
    assert _tree(grpo_dir) == before and _tree(sft) == before_sft

    # The GRPO policy is the loaded one (not the SFT start): the loader's params are the state's.
    loaded = loading.load(grpo_dir)
    start = loading.load(sft)
    assert loaded.step == 2
    assert not np.array_equal(np.asarray(loaded.params["embed"]["embedding"]),
                              np.asarray(start.params["embed"]["embedding"]))


def test_generate_refuses_prompts_beyond_max_position_embeddings(pretrained):
    model, params, tok_name = generate.load(workdir=pretrained[0])
    assert model.config.max_position_embeddings == 256 and tok_name == "byte"
    tok = ByteTokenizer()
    long_prompt = "1+2=" * 150  # 601 tokens with BOS
    with pytest.raises(ValueError, match="max_position_embeddings=256"):
        generate.generate_text(model, params, tok, [long_prompt], max_new_tokens=8, temperature=0.0)
    ids = generate.fit_prompts([tok.encode(long_prompt, add_bos=True)], 8, 256, truncate=True)
    assert len(ids[0]) == 248 and ids[0][0] == tok.bos_id and ids[0][-4:] == tok.encode("1+2=")
    (text, _), = generate.generate_text(model, params, tok, [long_prompt], max_new_tokens=8, temperature=0.0,
                                        truncate_prompt=True)
    assert isinstance(text, str)


def test_export_cli_loads_in_transformers_with_equal_logits_and_greedy_tokens(pretrained, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    workdir, _ = pretrained
    out_dir = str(tmp_path / "hf")
    before = _tree(workdir)
    rc, out = _cli("convert", "--from_workdir", workdir, "--to_hf", out_dir)
    assert rc == 0, out
    assert _tree(workdir) == before
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(out_dir):
        assert os.stat(os.path.join(out_dir, name)).st_mode & 0o777 == 0o666 & ~umask, name
    tok = ByteTokenizer()
    config = json.load(open(os.path.join(out_dir, "config.json")))
    gen_config = json.load(open(os.path.join(out_dir, "generation_config.json")))
    for c in (config, gen_config):
        assert (c["bos_token_id"], c["eos_token_id"], c["pad_token_id"]) == (tok.bos_id, tok.eos_id, tok.pad_id)

    hf_tok = transformers.AutoTokenizer.from_pretrained(out_dir)
    for text in ("12+34=46", "<think>3*4</think><answer>12</answer>", "héllo\n wörld €"):
        assert hf_tok(text)["input_ids"] == tok.encode(text, add_bos=True), text
        assert hf_tok.decode(tok.encode(text, add_bos=True, add_eos=True), skip_special_tokens=True) == \
            tok.decode(tok.encode(text, add_bos=True, add_eos=True), skip_special_tokens=True)

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    model, params, _ = generate.load(workdir=workdir)
    prompts = ["12+34=", "7-5=", "Question: 3+4"]
    ids = [tok.encode(p, add_bos=True) for p in prompts]
    T = max(map(len, ids))
    tokens = np.array([i + [tok.pad_id] * (T - len(i)) for i in ids], np.int32)
    ours = np.asarray(jax.jit(model.apply)({"params": params}, tokens).logits)  # compiled: eager Flax costs more
    with torch.no_grad():
        theirs = hf_model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    rel = np.abs(ours - theirs).max() / np.abs(theirs).max()
    assert rel <= 2e-4, rel

    new = 24
    # One batch (left-padded, one compile); transformers generates each prompt alone.
    texts = [text for text, _ in generate.generate_text(model, params, tok, prompts, max_new_tokens=new,
                                                         temperature=0.0)]
    for prompt, row, text in zip(prompts, ids, texts):
        with torch.no_grad():
            hf_out = hf_model.generate(torch.tensor([row]), max_new_tokens=new, do_sample=False)[0].tolist()[len(row):]
        # Ours stops at <eos> (not returned in the text); transformers stops there too and includes it.
        if tok.eos_id in hf_out:
            assert hf_out.index(tok.eos_id) == len(hf_out) - 1
        assert tok.decode(hf_out, skip_special_tokens=True) == text, (prompt, text, hf_out)

    # bfloat16 export (Python path): the weights are BF16, the router stays F32.
    bf16_dir = str(tmp_path / "hf_bf16")
    export.export_hf(workdir, bf16_dir, dtype="bfloat16")
    (shard,) = [f for f in os.listdir(bf16_dir) if f.endswith(".safetensors")]
    raw = open(os.path.join(bf16_dir, shard), "rb").read()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    dtypes = {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}
    assert dtypes["model.embed_tokens.weight"] == "BF16"
    assert all(v == "F32" for k, v in dtypes.items() if k.endswith("mlp.gate.weight"))


def _mount_tmpfs(path, size):
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], capture_output=True)
    return r.returncode == 0


def test_disk_full_during_a_save_is_one_message_and_the_rerun_resumes(tmp_path):
    mnt = str(tmp_path / "small_fs")
    if os.geteuid() != 0 or not _mount_tmpfs(mnt, "10m"):
        pytest.skip("needs root to mount a small tmpfs (a real full file system)")
    try:
        workdir = os.path.join(mnt, "run")
        # ~4.4 MB per checkpoint (params + Adam moments): the second one fills 10 MB.
        args = [*PRETRAIN, "--config.total_steps=8", "--config.checkpoint_every=2", "--config.keep_checkpoints=0",
                "--workdir", workdir]
        rc, out = _cli("train", *args)
        assert rc == 3, out[-3000:]
        lines = out.strip().splitlines()
        assert len(lines) < 20, out[-3000:]
        assert "No space left on device" in out and "Event loop is closed" not in out
        good = loading.complete_steps(workdir)
        assert good, out
        assert f"Last good checkpoint: {os.path.join(workdir, 'checkpoints', str(good[-1]))}" in out, out

        subprocess.run(["mount", "-o", "remount,size=64m", mnt], check=True)
        rc, out = _cli("train", *args)
        assert rc == 0, out[-3000:]
        assert f"resumed from {os.path.join(workdir, 'checkpoints', str(good[-1]))}" in out
        assert loading.complete_steps(workdir)[-1] == 8
    finally:
        subprocess.run(["umount", "-l", mnt], capture_output=True)


def test_failed_start_leaves_no_workdir_and_malformed_json_message(tmp_path):
    from deepseek_jax import experiment, trainer
    from deepseek_jax.data import sources

    workdir = str(tmp_path / "run")
    cfg = experiment.load_config("configs/tiny_v3.py:f32", ["data.kind='jsonl'", f"data.path='{tmp_path}/none.jsonl'"])
    with pytest.raises(Exception):
        trainer.train(cfg, workdir)
    assert not os.path.exists(workdir)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine row"}\n{"text": "unterminated\n')
    src = sources.JsonlSource(str(bad), on_error="skip")
    (example,) = src.stats.examples
    assert "at at" not in example and "at column" in example
    shutil.rmtree(workdir, ignore_errors=True)


def test_out_of_memory_is_one_message_with_exit_5(tmp_path):
    """A real XLA allocation failure (RESOURCE_EXHAUSTED) ends as one line with advice, exit 5."""
    script = tmp_path / "oom.py"
    script.write_text(
        "import jax, jax.numpy as jnp\n"
        "from deepseek_jax import cli\n"
        "def main(argv):\n"
        "    jax.jit(lambda: jnp.ones((2**40,), jnp.float32))().block_until_ready()  # 4 TiB\n"
        "cli.run(main, 'oom', 'doc')\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("DEEPSEEK_JAX_TRACEBACK", None)
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120,
                         preexec_fn=lambda: __import__("resource").setrlimit(
                             __import__("resource").RLIMIT_AS, (16 << 30, 16 << 30)))
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 5, res.stderr[-2000:]
    assert len(lines) <= 2 and "out of memory" in lines[-1] and "deepseek_jax.plan" in lines[-1], lines
