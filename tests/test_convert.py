"""HF directory -> Orbax -> HF round trip through the convert CLI.

Oracles: the original safetensors tensors (the round trip must give them back bit for bit,
the V3 MTP layer included), `transformers` logits on the written directory, and the logits of
the HF directory loaded directly.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from deepseek_jax import convert, hf  # noqa: E402
from tests import hf_fixtures as fx  # noqa: E402

B, T = 2, 24


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    """A tiny V3 (MLA + q-LoRA, grouped sigmoid routing with bias, YaRN, MTP) converted both ways."""
    root = tmp_path_factory.mktemp("convert")
    config = fx.tiny_v3_config(hidden_size=64, max_position_embeddings=128, num_hidden_layers=2)
    hf_model = fx.build_hf_model(config)
    sd = fx.add_mtp_layer(fx.published_state_dict(hf_model, config), config)
    fx.write_checkpoint(str(root / "hf"), config, sd)
    convert.main(["--from_hf", str(root / "hf"), "--to", str(root / "orbax")])
    convert.main(["--from_orbax", str(root / "orbax"), "--to_hf", str(root / "hf_back")])
    tokens = np.random.default_rng(0).integers(0, config["vocab_size"], (B, T)).astype(np.int32)
    model, params = convert.load_orbax(str(root / "orbax"))
    apply = jax.jit(model.apply)  # one compilation serves every logits comparison below

    def logits(params):
        # Same program, same device, same weights -> bitwise equal logits.
        out = apply({"params": jax.device_put(params, jax.devices()[0])}, jnp.asarray(tokens))
        return np.asarray(out.logits), np.asarray(out.mtp_logits)

    return dict(root=root, config=config, hf_model=hf_model, sd=sd, tokens=tokens, model=model, params=params,
                logits=logits)


def test_orbax_layout_and_config(round_trip):
    root = round_trip["root"]
    assert sorted(os.listdir(root / "orbax")) == ["model_config.json", "params"]
    with open(root / "orbax" / "model_config.json") as f:
        saved = json.load(f)
    d = round_trip["config"]
    assert (saved["hidden_size"], saved["n_routed_experts"], saved["num_mtp_layers"]) == (
        d["hidden_size"], d["n_routed_experts"], d["num_nextn_predict_layers"])
    assert saved["rope_scaling"]["factor"] == d["rope_scaling"]["factor"]


def test_orbax_logits_identical_to_hf_dir(round_trip):
    root = round_trip["root"]
    model_o, params_o = round_trip["model"], round_trip["params"]
    model_h, params_h = hf.from_pretrained(str(root / "hf"))
    assert model_o.config == model_h.config
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params_o, params_h)
    lo, mo = round_trip["logits"](params_o)
    lh, mh = round_trip["logits"](params_h)
    np.testing.assert_array_equal(lo, lh)
    np.testing.assert_array_equal(mo, mh)


def test_round_trip_gives_back_the_published_tensors(round_trip):
    from safetensors.numpy import load_file

    back_dir = round_trip["root"] / "hf_back"
    back = {}
    for name in os.listdir(back_dir):
        if name.endswith(".safetensors"):
            back.update(load_file(str(back_dir / name)))
    assert set(back) == set(round_trip["sd"])
    for key, value in round_trip["sd"].items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_round_trip_loads_in_transformers_with_the_same_logits(round_trip):
    import transformers

    back = transformers.AutoModelForCausalLM.from_pretrained(
        str(round_trip["root"] / "hf_back"), dtype=torch.float32, attn_implementation="eager").eval()
    tok = torch.from_numpy(round_trip["tokens"]).long()
    with torch.no_grad():
        ref = round_trip["hf_model"](tok).logits.numpy()
        got = back(tok).logits.numpy()
    np.testing.assert_array_equal(got, ref)
    ours, _ = round_trip["logits"](round_trip["params"])
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-4  # the HF parity tolerance


def test_bfloat16_restore_keeps_the_router_in_float32(round_trip):
    _, params = convert.load_orbax(str(round_trip["root"] / "orbax"), dtype=jnp.bfloat16)
    moe = params["layers_1"]["mlp"]
    assert moe["gate_proj"].dtype == jnp.bfloat16
    assert moe["router"].dtype == moe["e_score_correction_bias"].dtype == jnp.float32


def test_errors_name_the_missing_path(round_trip, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert.load_orbax(str(tmp_path / "nowhere"))
    (tmp_path / "half").mkdir()
    with pytest.raises(FileNotFoundError, match="model_config.json.*not a complete checkpoint"):
        convert.load_orbax(str(tmp_path / "half"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        convert.main(["--from_hf", str(tmp_path / "nowhere"), "--to", str(tmp_path / "out")])
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        convert.main(["--from_hf", str(round_trip["root"] / "hf"), "--to", str(round_trip["root"] / "orbax")])
    with pytest.raises(SystemExit):
        convert.main(["--from_hf", str(round_trip["root"] / "hf")])  # no --to
