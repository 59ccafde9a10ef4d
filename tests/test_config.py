"""ModelConfig validation messages, experiment.load_config, and every file in configs/.

Oracles: the published config.json values / safetensors shapes of the DeepSeek releases and
the token counts of the papers; paper-size models are only traced (jax.eval_shape).
"""
import dataclasses
import glob
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from deepseek_jax import experiment, layer_stack, sharding
from deepseek_jax import inspect as ins
from deepseek_jax.config import ConfigError, ModelConfig
from deepseek_jax.model import Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
PAPER = ("deepseek_v1_7b", "deepseek_v1_67b", "deepseek_v2_lite", "deepseek_v2", "deepseek_v3")

MOE = dict(n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2)


def _path(name):
    return os.path.join(ROOT, "configs", f"{name}.py")


# ----- validation: each message names the field, the offending value and the fix --------------

@pytest.mark.parametrize("kwargs, words", [
    (dict(MOE, n_routed_experts=10), ["model.n_group=4", "n_routed_experts=10", "divisible"]),
    (dict(MOE, topk_group=1, num_experts_per_tok=3),
     ["model.num_experts_per_tok=3", "topk_group * experts_per_group = 1 * 2 = 2"]),
    (dict(attention="gqa"), ["model.attention='gqa'", "use 'mha' (V1) or 'mla' (V2/V3)"]),
    (dict(qk_rope_head_dim=7), ["model.qk_rope_head_dim=7", "even"]),
    (dict(attention="mha", hidden_size=36, num_attention_heads=4), ["model.head_dim=9", "even head_dim"]),
    (dict(attention="mha", num_attention_heads=6, num_key_value_heads=4, hidden_size=48),
     ["model.num_key_value_heads=4", "must divide num_attention_heads=6"]),
    (dict(MOE, group_score="top2_sum", n_group=8), ["model.n_group=8", ">= 2 experts per group; got 1"]),
    (dict(MOE, capacity_policy="switch"), ["model.capacity_policy='switch'", "'affinity'", "'gshard'"]),
    (dict(MOE, capacity_protected_fraction=1.5), ["model.capacity_protected_fraction=1.5", "[0, 1]"]),
    (dict(MOE, ep_buffer_factor=0.0), ["model.ep_buffer_factor=0.0", "factor > 0"]),
    (dict(MOE, moe_dispatch="capacity", ep_buffer_factor=2.0),
     ["model.ep_buffer_factor=2.0", "moe_dispatch='capacity'", "None"]),
])
def test_validation_names_field_value_and_fix(kwargs, words):
    with pytest.raises(ConfigError) as err:
        ModelConfig(**kwargs)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_inference_runs_exactly_dropless():
    """Capacity dispatch and bounded expert-parallel buffers drop copies depending on the batch;
    generation and evaluation (model.inference_model) must not."""
    from deepseek_jax.model import dropless_config

    for kw in (dict(moe_dispatch="capacity"), dict(ep_buffer_factor=2.0)):
        c = dropless_config(ModelConfig(**dict(MOE, **kw)))
        assert (c.moe_dispatch, c.ep_buffer_factor) == ("dropless", None)
    cfg = experiment.load_config("configs/tiny_v3.py:f32", ["moe.ep_buffer_factor=2.0"])
    assert experiment.model_config(cfg).ep_buffer_factor == 2.0
    assert experiment.model_config(experiment.load_config("configs/tiny_v3.py:f32")).ep_buffer_factor is None


def test_valid_boundaries_are_accepted():
    # top-k exactly at the group limit (topk_group x experts per group) is allowed.
    assert ModelConfig(**dict(MOE, topk_group=1, num_experts_per_tok=2)).is_moe
    gqa = ModelConfig(attention="mha", num_attention_heads=6, num_key_value_heads=3, hidden_size=48)
    assert gqa.kv_heads == 3


# ----- experiment.load_config ------------------------------------------------------------------

def test_load_config_overrides_parse_like_config_flags():
    cfg = experiment.load_config(_path("deepseek_v3") + ":runlocal", [
        "--config.model.hidden_size=32", "optimizer.learning_rate=1", "progress=false",
        "model.rope_scaling.factor=8", "moe.dispatch=capacity"])
    assert cfg.model.hidden_size == 32
    assert cfg.optimizer.learning_rate == 1.0 and isinstance(cfg.optimizer.learning_rate, float)
    assert cfg.progress is False
    mc = experiment.model_config(cfg)
    assert (mc.hidden_size, mc.rope_scaling.factor, mc.moe_dispatch) == (32, 8.0, "capacity")
    assert mc.dtype == "float32"  # runlocal computes in float32
    with pytest.raises(ConfigError, match="expected key=value"):
        experiment.load_config(_path("tiny_v3"), ["model.hidden_size"])


def test_command_line_overrides_any_model_field():
    """`--config.model.FIELD=...` through config_flags with the config locked, as
    `python -m deepseek_jax.train` parses it, for fields configs/tiny_v3.py does not set."""
    from absl import flags
    from ml_collections import config_flags

    def parse(*overrides):
        argv = ["train", f"--config={_path('tiny_v3')}", *overrides]
        fv = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
        fv(argv)
        return fv.config

    base = experiment.model_config(parse())
    mc = experiment.model_config(parse("--config.model.attention_impl=blockwise", "--config.model.head_dim=24",
                                       "--config.model.rope_theta=500", "--config.model.scan_layers=true"))
    assert (base.attention_impl, base.head_dim, base.rope_theta, base.scan_layers) == ("auto", None, 10000.0, False)
    assert (mc.attention_impl, mc.head_dim, mc.rope_theta, mc.scan_layers) == ("blockwise", 24, 500.0, True)
    # Nothing else moved: the unset fields still carry ModelConfig's own defaults.
    changed = {k for k, v in mc.to_dict().items() if base.to_dict()[k] != v}
    assert changed == {"attention_impl", "head_dim", "rope_theta", "scan_layers"}
    assert ModelConfig().attention_impl == "auto" and ModelConfig().head_dim is None
    # A key that is no ModelConfig field is still refused, and so is an execution field
    # (compute_dtype / moe.* set those).
    for bad in ("--config.model.attention_implementation=blockwise", "--config.model.dtype=float32"):
        with pytest.raises(Exception, match="attention_implementation|dtype"):
            parse(bad)
    # load_config (the Python twin) parses an unset field by its type too.
    twin = experiment.load_config(_path("tiny_v3"), ["model.attention_impl=blockwise", "model.rope_interleave=false"])
    assert (twin.model.attention_impl, twin.model.rope_interleave) == ("blockwise", False)


def test_resume_and_init_from_treat_unlisted_model_fields_as_defaults(tmp_path):
    """Workdirs saved when cfg.model held only the fields a config set still resume, and
    init_from still refuses a real architecture override (post_train.resolve_init_from)."""
    import json

    from deepseek_jax import loading, post_train, trainer

    cfg = experiment.load_config(_path("tiny_v3"))
    old = json.loads(cfg.to_json_best_effort())
    # The old config.json had only what configs/tiny_v3.py sets; the new one lists every field.
    old["model"] = {k: v for k, v in old["model"].items() if v is not None}
    assert 0 < len(old["model"]) < len(cfg.model) == len(dataclasses.fields(ModelConfig)) - 7  # 7 execution fields
    assert "attention_impl" not in old["model"] and experiment.model_config(cfg).attention_impl == "auto"
    os.makedirs(tmp_path / "checkpoints" / "1")
    (tmp_path / "checkpoints" / "1" / loading.COMMIT_MARKER).write_text("")
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert loading.complete_steps(str(tmp_path)) == [1]
    trainer.check_workdir(cfg, str(tmp_path))  # every other field was its default then too
    cfg.model.attention_impl = "blockwise"
    with pytest.raises(ConfigError, match="model.attention_impl"):
        trainer.check_workdir(cfg, str(tmp_path))

    # init_from: the checkpoint's model wins over fields left at their defaults; a changed one is refused.
    ckpt = experiment.load_config(_path("tiny_v3"), ["model.hidden_size=48"])
    os.makedirs(tmp_path / "ckpt" / "checkpoints")
    (tmp_path / "ckpt" / "config.json").write_text(ckpt.to_json_best_effort())
    post = experiment.load_config(_path("post_train") + ":sft", [f"init_from={tmp_path / 'ckpt'}"])
    resolved = post_train.resolve_init_from(post)
    assert experiment.model_config(resolved).hidden_size == 48
    post.model.hidden_size = 96
    with pytest.raises(ConfigError, match="model.hidden_size=96"):
        post_train.resolve_init_from(post)


def test_load_config_variants():
    base = experiment.model_config(experiment.load_config(_path("deepseek_v3")))
    assert base.num_mtp_layers == 1 and base.rope_scaling.factor == 40.0 and base.dtype == "bfloat16"
    pre = experiment.model_config(experiment.load_config(_path("deepseek_v3") + ":pretrain,no_mtp"))
    assert pre.rope_scaling is None and pre.max_position_embeddings == 4096 and pre.num_mtp_layers == 0
    with pytest.raises(ValueError, match=r"unknown variant 'bogus'.*runlocal"):
        experiment.load_config(_path("deepseek_v2") + ":bogus")
    with pytest.raises(FileNotFoundError, match="nope.py"):
        experiment.load_config(os.path.join(ROOT, "configs", "nope.py"))


# ----- every config file ------------------------------------------------------------------------

def _variants(path):
    return [None, "runlocal"] if os.path.basename(path)[:-3] in PAPER else [None]


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_every_config_builds_and_its_model_traces(path):
    doc = open(path).read()
    name = os.path.basename(path)[:-3]
    assert f"--config configs/{name}.py" in doc, "the docstring must carry the command that runs it"
    # post_train is a template: its model comes from init_from (-1 MTP layers = the checkpoint's).
    overrides = ["model.num_mtp_layers=0"] if name == "post_train" else []
    for arg in _variants(path):
        cfg = experiment.load_config(path + (f":{arg}" if arg else ""), overrides)
        mc = experiment.model_config(cfg)
        experiment.optimizer_config(cfg)
        experiment.loss_config(cfg)
        assert cfg.data.batch_size % cfg.microbatches == 0
        if arg == "runlocal" or name == "tiny_v3":
            # Laptop variants: 8 CPU devices, a full forward traced (nothing allocated).
            sharding.mesh_shape(cfg.mesh, 8)
            tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)
            model = Transformer(mc)
            out = jax.eval_shape(lambda t: model.apply(model.init(jax.random.key(0), t), t), tokens)
            assert out.logits.shape == (2, 16, mc.vocab_size)
            if mc.num_mtp_layers:
                assert out.mtp_logits.shape == (mc.num_mtp_layers, 2, 16, mc.vocab_size)
        else:
            tree = ins.abstract_param_tree(mc)
            stacks = layer_stack.stacks(mc)
            if stacks is None:
                assert sorted(k for k in tree if k.startswith("layers_")) == sorted(
                    f"layers_{i}" for i in range(mc.num_hidden_layers))
                continue
            # Scanned (the paper configs): one stack per layer kind covering every layer, each
            # leaf with a leading axis of the stack's layer count.
            assert not any(k.startswith("layers_") for k in tree)
            assert sum(st.count for st in stacks) == mc.num_hidden_layers
            for st in stacks:
                assert {x.shape[0] for x in jax.tree.leaves(nn.meta.unbox(tree[st.name]))} == {st.count}


# Published safetensors shapes (HF [out, in]) of one dense and one MoE layer, and the MTP layer.
V3_PUBLISHED = {
    "model.embed_tokens.weight": (129280, 7168),
    "lm_head.weight": (129280, 7168),
    "model.layers.0.self_attn.q_a_proj.weight": (1536, 7168),
    "model.layers.0.self_attn.q_b_proj.weight": (24576, 1536),
    "model.layers.0.self_attn.kv_a_proj_with_mqa.weight": (576, 7168),
    "model.layers.0.self_attn.kv_b_proj.weight": (32768, 512),
    "model.layers.0.self_attn.o_proj.weight": (7168, 16384),
    "model.layers.0.mlp.gate_proj.weight": (18432, 7168),
    "model.layers.3.mlp.gate.weight": (256, 7168),
    "model.layers.3.mlp.gate.e_score_correction_bias": (256,),
    "model.layers.3.mlp.experts.255.down_proj.weight": (7168, 2048),
    "model.layers.3.mlp.shared_experts.up_proj.weight": (2048, 7168),
    "model.layers.61.eh_proj.weight": (7168, 14336),
}


def test_v3_paper_size_shapes_match_the_published_checkpoint():
    import math

    from deepseek_jax import hf

    # The published per-layer layout (the config's scanned stacks are restacked on import).
    mc = experiment.model_config(experiment.load_config(_path("deepseek_v3"))).replace(scan_layers=False)
    tree = jax.tree.map(lambda x: x.shape, hf.abstract_params(mc.replace(num_hidden_layers=4)))
    by_key = {}
    for e in hf.key_map(mc.replace(num_hidden_layers=4)):
        shape = tree
        for p in e.path:
            shape = shape[p]
        if e.kind == "experts":
            by_key[e.hf.format(e.num - 1)] = (math.prod(e.out_shape), math.prod(e.in_shape))
            assert shape == (e.num, *e.in_shape, *e.out_shape)
        elif e.kind == "linear":
            by_key[e.hf] = (math.prod(e.out_shape), math.prod(e.in_shape))
            assert shape == (*e.in_shape, *e.out_shape)
        else:
            by_key[e.hf] = shape
    by_key = {k.replace("model.layers.4.", "model.layers.61."): v for k, v in by_key.items()}
    for key, shape in V3_PUBLISHED.items():
        assert by_key[key] == shape, key


@pytest.mark.parametrize("name, devices, tokens", [
    ("deepseek_v3", 256, 14.8e12), ("deepseek_v2", 256, 8.1e12), ("deepseek_v2_lite", 64, 5.7e12),
    ("deepseek_v1_7b", 64, 2e12), ("deepseek_v1_67b", 256, 2e12)])
def test_paper_configs_fit_the_cluster_their_docstring_names(name, devices, tokens):
    """Mesh resolves, micro-batches split evenly over the devices, the schedule covers the
    paper's token budget (V3 14.8T, V2 8.1T, V2-Lite 5.7T, DeepSeek LLM 2T)."""
    cfg = experiment.load_config(_path(name))
    sizes = sharding.mesh_shape(cfg.mesh, devices)
    dp = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    assert (cfg.data.batch_size // cfg.microbatches) % dp == 0
    assert cfg.compute_dtype == "bfloat16"
    assert abs(cfg.total_steps * cfg.data.batch_size * cfg.data.seq_len / tokens - 1) < 1e-3
    mc = experiment.model_config(cfg)
    if mc.is_moe:
        assert mc.n_routed_experts % sizes["expert"] == 0


def test_v2_configs_drop_tokens_the_papers_way():
    """DeepSeek-V2 §2.2.4: per-device budget at capacity factor 1.0, lowest affinity dropped."""
    for name, dispatch in (("deepseek_v2", "capacity"), ("deepseek_v2_lite", "dropless")):
        mc = experiment.model_config(experiment.load_config(_path(name)))
        assert (mc.moe_dispatch, mc.capacity_policy, mc.capacity_factor) == (dispatch, "affinity", 1.0)
        assert mc.capacity_protected_fraction == 0.1
