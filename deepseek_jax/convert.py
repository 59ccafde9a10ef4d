"""Checkpoint conversion between Hugging Face directories and Orbax.

    python -m deepseek_jax.convert --from_hf path/to/DeepSeek-V3 --to ckpt/v3 [--dtype bfloat16]
    python -m deepseek_jax.convert --from_orbax ckpt/v3 --to_hf out/DeepSeek-V3
    python -m deepseek_jax.convert --from_workdir runs/demo/grpo --to_hf out/grpo [--dtype bfloat16] [--step N]

`--from_workdir` exports any run (a trainer or GRPO workdir, newest complete checkpoint or
`--step`) with its tokenizer, control-token ids and generation_config.json (export.py), so
transformers' `generate` stops where ours does. The source directory is only read.

Orbax layout written here (and read by `load_orbax`, which generate/train reuse):
    OUT/params/             the parameter pytree (orbax StandardCheckpointer)
    OUT/model_config.json   ModelConfig.to_dict(), written last: its presence marks a
                            complete conversion
With several devices the parameters are sharded FSDP-style over all of them (the logical
rules of `sharding.py`), so a model larger than one accelerator converts as long as it fits
the devices together; one parameter at a time passes through host memory.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Optional

import jax
import jax.numpy as jnp

from deepseek_jax import hf, sharding
from deepseek_jax.config import ModelConfig
from deepseek_jax.model import Transformer

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


def _fsdp_shardings(model: Transformer) -> Any:
    """Parameters split over every device along their `embed` axis (None on one device)."""
    devices = jax.devices()
    if len(devices) == 1:
        return None
    mesh = sharding.make_mesh({"data": 1, "fsdp": len(devices), "expert": 1, "tensor": 1})
    return sharding.param_shardings(model, mesh, sharding.logical_rules())


def save_orbax(model: Transformer, params: Any, out_dir: str) -> None:
    """Write `params` and the model's config in the layout above. Refuses to overwrite."""
    import orbax.checkpoint as ocp

    out_dir = os.path.abspath(out_dir)
    params_dir = os.path.join(out_dir, PARAMS_DIR)
    if os.path.exists(params_dir) or os.path.exists(os.path.join(out_dir, CONFIG_FILE)):
        raise FileExistsError(f"{out_dir} already holds a checkpoint ({PARAMS_DIR}/ or {CONFIG_FILE}); "
                              "choose a new --to directory or delete the old one")
    os.makedirs(out_dir, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(params_dir, params)
        ckptr.wait_until_finished()
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(model.config.to_dict(), f, indent=2)


def load_orbax(ckpt_dir: str, shardings: Optional[Any] = None, dtype=None) -> tuple[Transformer, Any]:
    """(Transformer, params) from a directory written by `save_orbax` / the convert CLI.

    `shardings`: optional pytree of jax.sharding.Sharding matching the parameters; default
    FSDP over all devices (one device: that device). `dtype`: restore in this dtype instead of
    the stored one (the router and its bias always stay float32).
    """
    import orbax.checkpoint as ocp

    ckpt_dir = os.path.abspath(ckpt_dir)
    config_path, params_dir = os.path.join(ckpt_dir, CONFIG_FILE), os.path.join(ckpt_dir, PARAMS_DIR)
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"Orbax checkpoint directory {ckpt_dir!r} does not exist")
    for path in (config_path, params_dir):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path!r} is missing: {ckpt_dir!r} is not a complete checkpoint "
                                    "written by `python -m deepseek_jax.convert --from_hf HF_DIR --to DIR`")
    with open(config_path) as f:
        config = ModelConfig.from_dict(json.load(f))
    model = Transformer(config)
    with ocp.StandardCheckpointer() as ckptr:
        stored = ckptr.metadata(params_dir).item_metadata.tree
        shapes = hf.abstract_params(config)
        if shardings is None:
            shardings = _fsdp_shardings(model)
        if shardings is None:
            one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shardings = jax.tree.map(lambda _: one, shapes)

        def target(path, shape, stored_leaf, sh):
            keep_f32 = hf._is_f32_leaf(tuple(k.key for k in path))
            leaf_dtype = stored_leaf.dtype if dtype is None or keep_f32 else jnp.dtype(dtype)
            return jax.ShapeDtypeStruct(shape.shape, leaf_dtype, sharding=sh)

        abstract = jax.tree_util.tree_map_with_path(target, shapes, stored, shardings)
        params = ckptr.restore(params_dir, abstract)
    return model, params


def convert_hf_to_orbax(hf_dir: str, out_dir: str, dtype=jnp.float32) -> dict:
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise FileNotFoundError(f"--from_hf {hf_dir!r}: no config.json there; pass a Hugging Face model "
                                "directory (config.json + *.safetensors)")
    with open(os.path.join(hf_dir, "config.json")) as f:
        model = Transformer(hf.config_from_hf(json.load(f)))
    model, params = hf.from_pretrained(hf_dir, dtype=dtype, shardings=_fsdp_shardings(model))
    save_orbax(model, params, out_dir)
    return model.config.to_dict()


def convert_orbax_to_hf(ckpt_dir: str, out_dir: str, dtype=jnp.float32) -> dict:
    model, params = load_orbax(ckpt_dir)
    hf.save_pretrained(model, params, out_dir, dtype=dtype)
    return model.config.to_dict()


def main(argv: Optional[list] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deepseek_jax.convert",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--from_hf", help="Hugging Face directory (config.json + *.safetensors)")
    parser.add_argument("--to", help="output Orbax directory (with --from_hf)")
    parser.add_argument("--from_orbax", help="Orbax directory written by --from_hf ... --to")
    parser.add_argument("--to_hf", help="output Hugging Face directory (with --from_orbax)")
    parser.add_argument("--from_workdir", help="training or GRPO workdir to export (with --to_hf)")
    parser.add_argument("--step", type=int, help="--from_workdir: checkpoint step (default: newest complete)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="parameter dtype written (the router stays float32)")
    args = parser.parse_args(argv)
    if args.from_workdir and args.to_hf and not (args.from_hf or args.to or args.from_orbax):
        from deepseek_jax import export

        export.export_hf(args.from_workdir, args.to_hf, dtype=args.dtype, step=args.step)
        print(f"wrote {args.to_hf} (config.json, generation_config.json, tokenizer.json, *.safetensors)")
    elif args.from_hf and args.to and not (args.from_orbax or args.to_hf):
        convert_hf_to_orbax(args.from_hf, args.to, jnp.dtype(args.dtype))
        print(f"wrote {os.path.join(args.to, PARAMS_DIR)} and {os.path.join(args.to, CONFIG_FILE)}")
    elif args.from_orbax and args.to_hf and not (args.from_hf or args.to):
        convert_orbax_to_hf(args.from_orbax, args.to_hf, jnp.dtype(args.dtype))
        print(f"wrote {args.to_hf} (config.json + *.safetensors)")
    else:
        parser.error("use --from_hf HF_DIR --to OUT, --from_orbax DIR --to_hf OUT, "
                     "or --from_workdir DIR --to_hf OUT")


if __name__ == "__main__":
    import traceback

    from absl import logging as absl_logging

    from deepseek_jax import cli

    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax's INFO lines
    try:
        main(sys.argv[1:])
    except cli._usage_errors() as e:
        if os.environ.get(cli.TRACEBACK_ENV):
            traceback.print_exc()
        print(f"deepseek_jax.convert: error: {cli._message(e)}", file=sys.stderr)
        cli.exit_now(cli.EXIT_USAGE)
