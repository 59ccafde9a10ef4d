"""Post-training a checkpoint on your own data: the pieces the trainer and the GRPO loop call.

    python -m deepseek_jax.train --config configs/post_train.py:sft --workdir runs/sft \\
        --config.init_from=path/to/hf_dir --config.data.path=chats.jsonl

* `resolve_init_from(cfg)`: with `init_from` set (a Hugging Face directory, a `convert`
  Orbax directory or a training workdir) the model config comes from the checkpoint;
  `cfg.model` may only restate it, or lower `num_mtp_layers` (drop MTP); `compute_dtype`,
  `remat` and `moe.*` stay execution choices. `data.tokenizer="auto"` becomes the
  checkpoint's tokenizer.
* `user_source(cfg, path)`: SFT rows {"messages"} or {"prompt", "response"}; DPO rows
  {"prompt", "chosen", "rejected"} (strings or message lists), from JSONL or Parquet.
* `chat_template(cfg)`: `data.chat_template` ("auto" | "none"), data/chat.py.
* `fit_params(params, abstract)`: a checkpoint's params cut to this model's tree (the MTP
  modules of a checkpoint trained with them are dropped when num_mtp_layers is lowered).
* `DPOReference`: the reference policy's per-token log-probs of each DPO batch.
* `export_hf(cfg, model, params, out)`: the final policy as a transformers checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

import jax
import ml_collections

from deepseek_jax.config import ConfigError
from deepseek_jax.data import chat, sources

log = logging.getLogger(__name__)

SFT_FORMATS = (("messages",), ("prompt", "response"))
DPO_FORMATS = (("prompt", "chosen", "rejected"),)
# ModelConfig fields that are execution choices, not architecture: set from the run's keys.
_EXECUTION_FIELDS = ("dtype", "remat", "moe_dispatch", "capacity_factor", "routing_impl", "capacity_policy")


# ----- data -----------------------------------------------------------------------------------

def user_source(cfg: ml_collections.ConfigDict, path: str):
    """The JSONL/Parquet source of an SFT or DPO file; its row format from its first row."""
    d = cfg.data
    formats = DPO_FORMATS if cfg.loss == "dpo" else SFT_FORMATS
    fields = sources.detect_fields(path, d.kind, formats)
    spec = {"kind": d.kind, "paths": path, "fields": fields, "message_fields": fields,
            "on_error": d.get("on_error", "skip")}
    return sources.make_source(spec)


def chat_template(cfg: ml_collections.ConfigDict) -> Optional[chat.ChatTemplate]:
    """`data.chat_template` for the run's tokenizer (None = plain concatenation)."""
    return chat.load_template(cfg.data.get("chat_template", "none"), cfg.data.tokenizer)


# ----- init_from --------------------------------------------------------------------------------

def checkpoint_model_config(path: str) -> dict:
    """The ModelConfig fields of a checkpoint, read from its config file (no weights)."""
    from deepseek_jax import experiment, hf, loading

    kind = loading.detect(path)
    if kind == loading.HF:
        # load_config: num_mtp_layers as stored (transformers-saved V3 checkpoints declare 1, store 0).
        return hf.load_config(path).to_dict()
    if kind == loading.ORBAX:
        from deepseek_jax import convert

        with open(os.path.join(path, convert.CONFIG_FILE)) as f:
            return json.load(f)
    return experiment.model_config(loading.saved_config(path)).to_dict()


def checkpoint_tokenizer(path: str) -> str:
    """The tokenizer a checkpoint was trained with: its tokenizer.json, or a workdir's data.tokenizer."""
    from deepseek_jax import loading

    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return path
    if loading.detect(path) == loading.WORKDIR:
        return loading.saved_config(path).get("data", {}).get("tokenizer", "byte") or "byte"
    return "byte"


def resolve_init_from(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `cfg` whose model (and "auto" tokenizer) come from `init_from` (docstring)."""
    if not cfg.get("init_from"):
        if cfg.data.get("tokenizer") == "auto":
            raise ConfigError("data.tokenizer='auto' means the tokenizer of init_from, which is not set; "
                              "set init_from or name a tokenizer ('byte', a tokenizer.json or its directory)")
        return cfg
    cfg = ml_collections.ConfigDict(cfg.to_dict())  # configs from the command line are locked
    path = cfg.init_from
    theirs = {k: v for k, v in checkpoint_model_config(path).items() if k not in _EXECUTION_FIELDS}
    ours = cfg.model.to_dict()
    for key, value in ours.items():
        # None: a field the config does not set (experiment.model_defaults lists every one unset).
        if value is None or key in _EXECUTION_FIELDS or key not in theirs:
            continue
        if key == "num_mtp_layers" and value < 0:
            continue  # configs/post_train.py's "whatever the checkpoint has"
        if key == "num_mtp_layers" and 0 <= value <= theirs[key]:
            theirs[key] = value  # dropping MTP modules (or some of them) is allowed
            continue
        if _norm(value) != _norm(theirs[key]):
            raise ConfigError(f"model.{key}={value!r} but init_from={path!r} has {theirs[key]!r}: the model comes "
                              "from the checkpoint; drop that override (only model.num_mtp_layers may be lowered)")
    cfg.model = ml_collections.ConfigDict(theirs)
    if cfg.data.get("tokenizer") == "auto":
        cfg.data.tokenizer = checkpoint_tokenizer(path)
    return cfg


def _norm(v):
    return json.loads(json.dumps(v))  # tuples and lists compare equal, as in config.json


def fit_params(params: Any, abstract: Any) -> Any:
    """`params` restricted to the tree of `abstract` (extra subtrees, e.g. dropped MTP
    modules, are left out; a missing or differently shaped leaf is a ConfigError)."""
    if isinstance(abstract, dict):
        missing = [k for k in abstract if k not in params]
        if missing:
            raise ConfigError(f"init_from: the checkpoint has no parameters {missing} that this model needs; "
                              "init_from must hold the same architecture (model.*)")
        return {k: fit_params(params[k], a) for k, a in abstract.items()}
    if tuple(params.shape) != tuple(abstract.shape):
        raise ConfigError(f"init_from: a parameter is {tuple(params.shape)} there but {tuple(abstract.shape)} here")
    return params


# ----- DPO reference ----------------------------------------------------------------------------------

class DPOReference:
    """Reference log-probs for DPO (Rafailov et al. 2023): the frozen starting policy's
    log pi_ref(target) per token, computed for every batch by one jitted forward."""

    def __init__(self, parts, ref_params):
        import flax.linen as nn

        from deepseek_jax import losses, sharding

        self.parts, self.params = parts, ref_params
        model = parts.model

        def logprobs(params, batch):
            out = model.apply({"params": params}, batch["tokens"], positions=batch["positions"],
                              segment_ids=batch["segment_ids"])
            return losses.token_logprobs(out.logits, batch["targets"])[0]

        self._fn = jax.jit(logprobs, out_shardings=sharding.batch_sharding(parts.mesh, 2))
        self._context = lambda: (jax.set_mesh(parts.mesh), nn.logical_axis_rules(parts.rules))

    def __call__(self, batch: dict) -> dict:
        mesh_cm, rules_cm = self._context()
        with mesh_cm, rules_cm:
            return dict(batch, ref_logprobs=self._fn(self.params, batch))


# ----- export -------------------------------------------------------------------------------------

def export_hf(cfg: ml_collections.ConfigDict, model, params, out_dir: str) -> str:
    """The final policy as a transformers-loadable directory, tokenizer files beside it."""
    from deepseek_jax import export

    export.write_hf(model, params, cfg.data.tokenizer, out_dir)
    log.info("exported the final params as a Hugging Face checkpoint to %s", out_dir)
    return out_dir


def with_dpo_reference(cfg: ml_collections.ConfigDict, parts, state, *, resumed: bool):
    """`parts` whose train and eval steps first add the reference log-probs to each batch.

    The reference is the starting policy: init_from's params (read again on resume), or
    the seed's initialisation when there is no init_from.
    """
    import dataclasses

    import jax.numpy as jnp

    from deepseek_jax import warm_start

    if not resumed:
        ref_params = jax.tree.map(jnp.copy, state.params)  # the step donates the state's buffers
    elif cfg.get("init_from"):
        ref_params = fit_params(warm_start.load_params(cfg.init_from, parts.mesh), parts.abstract_state.params)
    else:
        ref_params = parts.init_state().params
    reference = DPOReference(parts, ref_params)
    train_step, eval_step = parts.train_step, parts.eval_step

    class _Step:
        def __call__(self, state, batch):
            return train_step(state, reference(batch))

        def lower(self, state, batch):  # multi-host compiles ahead (trainer._loop)
            return train_step.lower(state, reference(batch))

    return dataclasses.replace(parts, train_step=_Step(),
                               eval_step=lambda params, batch: eval_step(params, reference(batch)))


# ----- GRPO prompts -------------------------------------------------------------------------------

_PROMPTS: dict = {}


def load_prompts(cfg: ml_collections.ConfigDict, path: str) -> list[dict]:
    """Rows of a GRPO prompt file as problem dicts: {"prompt": the user's text, "_input": what
    the model continues (chat-templated with the generation prompt; absent with "none",
    when the prompt is encoded after bos as for the synthetic tasks), "_where": file:line,
    **the row's other columns (passed to rewards)}. Read once per process."""
    key = (path, cfg.data.tokenizer, cfg.data.get("chat_template", "none"))
    if key not in _PROMPTS:
        template = chat_template(cfg)
        problems = []
        for where, row in sources.read_rows(path):
            if "messages" in row:
                problem = chat.check_messages(row["messages"])
                if problem:
                    raise ValueError(f"{where}: {problem}")
                messages = row["messages"]
            elif isinstance(row.get("prompt"), str):
                messages = [{"role": "user", "content": row["prompt"]}]
            else:
                raise ValueError(f"{where}: a GRPO prompt row needs a string 'prompt' or a 'messages' list; "
                                 f"it has {sorted(row)}")
            out = {k: v for k, v in row.items() if k != "messages"}
            out["prompt"] = row["prompt"] if isinstance(row.get("prompt"), str) else messages[-1]["content"]
            out["_where"] = where
            if template is not None:
                try:
                    out["_input"] = chat.prompt_text(template, messages)
                except chat.TemplateMismatch as e:
                    raise ValueError(f"{where}: {e}") from None
            elif "messages" in row:
                out["_input"] = None  # encoded as the concatenated contents, after bos
                out["prompt"] = "".join(m["content"] for m in messages)
            problems.append(out)
        _PROMPTS[key] = problems
    return _PROMPTS[key]


def prompts_for_step(cfg: ml_collections.ConfigDict, step: int) -> list[dict]:
    """The `grpo.prompts_per_step` prompts of GRPO step `step`: each epoch visits every row
    once in an order drawn from (seed, epoch), so a step's prompts depend only on (seed, step)."""
    import numpy as np

    rows = load_prompts(cfg, cfg.grpo.prompts)
    P, N = cfg.grpo.prompts_per_step, len(rows)
    out = []
    for i in range(step * P, (step + 1) * P):
        epoch, j = divmod(i, N)
        order = np.random.default_rng([cfg.seed, epoch]).permutation(N)
        out.append(rows[int(order[j])])
    return out
