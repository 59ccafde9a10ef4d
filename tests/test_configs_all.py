"""Config hygiene for every file in configs/ and EVERY variant it accepts.

tests/test_config.py already checks each file's default variant (and `runlocal`): it builds,
its docstring carries the command, local models trace and paper-size ones are shape-checked.
This file extends that to all variants (`pretrain`, `no_mtp`, `dense`, the R1 stages and
their comma-separated combinations):

  * `get_config(arg=None)` is the entry point and every variant in VARIANTS builds;
  * a new file in configs/ must be listed in VARIANTS (so it is tested too);
  * the docstring names every variant and the command that runs the file;
  * an unknown variant is refused with an error that names the file and the variant;
  * every variant passes the trainer's own pre-flight check (`trainer.validate_config`) on
    the device count it is meant for (the laptop's 8 test devices, or the paper cluster);
  * local-size variants trace a full forward with `jax.eval_shape`; paper-size variants are
    only traced through `deepseek_jax.inspect` (shapes, never allocated), and the counts are
    checked against the papers (MTP module of V3: 14B; YaRN adds no parameters).
"""
import glob
import inspect as py_inspect
import os

import jax
import jax.numpy as jnp
import pytest

from deepseek_jax import experiment, trainer
from deepseek_jax import inspect as ds_inspect
from deepseek_jax.model import Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))

# Every variant string each config accepts (None = the default).
VARIANTS = {
    "tiny_v3": [None, "f32", "bf16", "dense", "dense,bf16"],
    "r1_tiny": [None, "pretrain", "sft", "grpo", "student_pretrain", "student"],
    "deepseek_v1_7b": [None, "runlocal"],
    "deepseek_v1_67b": [None, "runlocal"],
    "deepseek_v2_lite": [None, "pretrain", "runlocal", "pretrain,runlocal"],
    "deepseek_v2": [None, "pretrain", "runlocal", "pretrain,runlocal"],
    "deepseek_v3": [None, "pretrain", "no_mtp", "runlocal", "pretrain,no_mtp", "runlocal,no_mtp"],
    "post_train": [None, "sft", "grpo", "dpo"],
}
# Templates whose model comes from `init_from` (post_train.resolve_init_from replaces cfg.model);
# built here with a stand-in for the checkpoint's MTP depth ("-1: the checkpoint's").
TEMPLATE_OVERRIDES = {"post_train": ["model.num_mtp_layers=0", "data.path=your_rows.jsonl"]}
# Variant words each docstring must mention (tiny_v3's "bf16" is an undocumented alias).
DOCUMENTED = {name: sorted({p for v in vs if v for p in v.split(",")} - {"bf16"}) for name, vs in VARIANTS.items()}
# Devices the paper-size configs are laid out for (their docstrings).
CLUSTER = {"deepseek_v1_7b": 64, "deepseek_v1_67b": 256, "deepseek_v2_lite": 64, "deepseek_v2": 256,
           "deepseek_v3": 256}

CASES = [(name, arg) for name, args in VARIANTS.items() for arg in args]


def _path(name):
    return os.path.join(ROOT, "configs", f"{name}.py")


def _spec(name, arg):
    return _path(name) + (f":{arg}" if arg else "")


def _load_module(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_cfg_{name}", _path(name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _is_local(cfg) -> bool:
    return experiment.model_config(cfg).hidden_size <= 512


def test_every_config_file_is_listed():
    names = {os.path.basename(p)[:-3] for p in CONFIG_FILES}
    assert names == set(VARIANTS), (
        f"configs/ has {sorted(names - set(VARIANTS))} not in VARIANTS, or VARIANTS lists "
        f"{sorted(set(VARIANTS) - names)} that no longer exist: update tests/test_configs_all.py")


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_get_config_signature_docstring_and_unknown_variant(name):
    module = _load_module(name)
    params = list(py_inspect.signature(module.get_config).parameters.values())
    assert len(params) == 1 and params[0].default is None, "get_config(arg=None) is the config contract"
    doc = module.__doc__ or ""
    assert f"--config configs/{name}.py" in doc, "the docstring must carry the command that runs the file"
    for word in DOCUMENTED[name]:
        assert word in doc, f"configs/{name}.py: variant {word!r} is accepted but not in the docstring"
    with pytest.raises(ValueError) as err:
        module.get_config("no_such_variant")
    assert "no_such_variant" in str(err.value) and f"{name}.py" in str(err.value)


@pytest.mark.parametrize("name, arg", CASES, ids=[f"{n}:{a or ''}" for n, a in CASES])
def test_variant_builds_and_passes_the_trainer_preflight(name, arg):
    # The R1 student reads the rejection samples the pipeline writes; point it at a file.
    overrides = ["data.path=runs/demo/rejection/samples.jsonl"] if arg == "student" else []
    overrides += TEMPLATE_OVERRIDES.get(name, [])
    cfg = experiment.load_config(_spec(name, arg), overrides)
    mc = experiment.model_config(cfg)
    experiment.optimizer_config(cfg)
    experiment.loss_config(cfg)
    devices = 8 if _is_local(cfg) else CLUSTER[name]
    sizes = trainer.validate_config(cfg, num_devices=devices, process_count=1)
    assert sizes["data"] * sizes["fsdp"] * sizes["expert"] * sizes["tensor"] == devices
    assert cfg.data.seq_len <= mc.max_position_embeddings


LOCAL_CASES = [c for c in CASES if _is_local(experiment.load_config(_spec(*c), TEMPLATE_OVERRIDES.get(c[0], [])))]


@pytest.mark.parametrize("name, arg", LOCAL_CASES, ids=[f"{n}:{a or ''}" for n, a in LOCAL_CASES])
def test_local_variant_forward_traces(name, arg):
    cfg = experiment.load_config(_spec(name, arg), TEMPLATE_OVERRIDES.get(name, []))
    mc = experiment.model_config(cfg)
    model = Transformer(mc)
    tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    out = jax.eval_shape(lambda t: model.apply(model.init(jax.random.key(0), t), t), tokens)
    assert out.logits.shape == (2, 16, mc.vocab_size)
    if mc.num_mtp_layers:
        assert out.mtp_logits.shape == (mc.num_mtp_layers, 2, 16, mc.vocab_size)
    else:
        assert out.mtp_logits is None
    assert (out.moe is not None) == mc.is_moe


@pytest.mark.parametrize("name", sorted(CLUSTER))
def test_paper_variants_by_shape_only(name):
    """Stage variants change what they say and nothing else: `pretrain` drops YaRN (no
    parameters change), `no_mtp` removes exactly the MTP module (V3: ~14B parameters)."""
    stats = {}
    for arg in VARIANTS[name]:
        if arg and "runlocal" in arg:
            continue
        mc = experiment.model_config(experiment.load_config(_spec(name, arg)))
        stats[arg] = ds_inspect.model_stats(mc, seq_len=4096)
        if arg and "pretrain" in arg:
            assert mc.rope_scaling is None and mc.max_position_embeddings == 4096
    base = stats[None]
    for arg, s in stats.items():
        assert s["total_params"] == base["total_params"], (arg, s["total_params"], base["total_params"])
        assert s["kv_cache_bytes_per_token"] == base["kv_cache_bytes_per_token"]
        if arg and "no_mtp" in arg:
            assert s["mtp_params"] == 0
    if name == "deepseek_v3":
        # V3 paper: 671B main model + 14B MTP module, counting the MTP module's own copies of
        # the embedding and output head (the release stores them); inspect shares them.
        mc = experiment.model_config(experiment.load_config(_spec(name, None)))
        with_copies = base["mtp_params"] + 2 * mc.vocab_size * mc.hidden_size
        assert abs(with_copies / 14e9 - 1) < 0.05, with_copies
        assert base["kv_cache_bytes_per_token"] == 70_272  # V3 paper: 70.272 KB per token


def test_r1_tiny_stages_fit_together():
    """The GRPO stage's prompts fit its prompt window, prompt + completion fit the positions,
    rollout rows split over the devices, and every policy stage shares one architecture (so
    pretrain -> sft -> grpo can warm-start from each other); the student is a dense MHA model."""
    from deepseek_jax.data.tokenizer import get_tokenizer
    from deepseek_jax.rl import grpo

    stages = {s: experiment.load_config(_spec("r1_tiny", s)) for s in ("pretrain", "sft", "grpo", "student_pretrain", "student")}
    models = {s: experiment.model_config(c) for s, c in stages.items()}
    assert models["pretrain"] == models["sft"] == models["grpo"]
    g = stages["grpo"]
    assert g.loss == "grpo" and g.grpo.estimator in ("grpo", "dr_grpo", "rloo")
    tok = get_tokenizer(g.data.tokenizer)
    problems = grpo.training_problems(g, 0) + grpo.heldout_problems(g, 64)
    longest = max(len(ids) for ids in grpo.encode_prompts(tok, problems, g.grpo.max_prompt_len))
    assert longest <= g.grpo.max_prompt_len
    assert g.grpo.max_prompt_len + g.grpo.max_new_tokens <= models["grpo"].max_position_embeddings
    assert (g.grpo.prompts_per_step * g.grpo.group_size) % 8 == 0
    student = models["student"]
    assert not student.is_moe and student.attention == "mha" and student.num_mtp_layers == 0
    assert stages["student"].loss == "sft"
    assert models["student_pretrain"] == student  # the student fine-tunes its own base model
    # What GRPO has to learn: the cold start answers without thinking more often than the
    # pretraining corpus does, and the student's base model reads the policy's corpus.
    fraction = {s: c.data.task.get("answer_only_fraction", 0.0) for s, c in stages.items()}
    assert fraction["sft"] > fraction["pretrain"] == fraction["student_pretrain"] > 0
