"""THE train step: one jitted `(state, batch) -> (state, metrics)` for every objective.

Dimension legend: B global batch rows, T time, M micro-batches, Dp data-parallel devices
(data x fsdp x expert), b = B / (Dp M) rows per device per micro-batch, L MoE layers,
E routed experts.

    state = create_train_state(model, optimizer, mesh, rules, seed)
    loss_fn = bind_loss("pretrain", model, loss_cfg)   # functools.partial(losses.get_loss(..))
    step = make_train_step(model, loss_fn, optimizer, mesh, rules, microbatches=4,
                           bias_update_rate=cfg.moe.bias_update_rate, schedule=schedule)
    state, metrics = step(state, batch)                 # batch: dict of [B, ...] arrays

What one call does, in order (DeepSeek-V3 §2.1.2, §3.3; REFERENCES.md pitfalls 6 and the
normalisation note):
  1. Counts of the WHOLE global batch (`losses.global_counts`) are merged into every
     micro-batch, so per-micro-batch losses, gradients and metrics simply add up to those
     of the global batch (losses.py docstring). Metrics are summed, never averaged.
  2. Gradients are accumulated in float32 over M micro-batches with `lax.scan`; the model
     runs its activations in `config.dtype`, router and losses in float32, remat per
     `config.remat`; parameters (the master copy) stay float32.
  3. grad_norm (global L2 norm, BEFORE clipping) is reported; clipping itself is in the
     optax chain (optim.py), so the trainer's optimizer owns it.
  4. NaN/inf guard: if the loss or the gradient norm is not finite, the update is skipped
     and the state is returned unchanged except `skipped` (+1). `step` does NOT advance:
     the step counts applied updates, so the LR schedule, optax's own count and the RNG
     stream stay in lockstep, and a skipped batch leaves no trace in the model.
  5. Optimizer update, then the aux-loss-free router-bias rule
     (`moe.update_router_biases`, b += rate * sign(mean load - load)) from the global
     batch's `moe/expert_counts`, inside the same compiled program.

Compilation. The step is one `jax.jit` with explicit shardings (state as
`train_state_shardings`, batch over `sharding.batch_sharding`, metrics replicated) and a
donated state. The bound loss is a STATIC argument of that jit: `step.with_loss(other)`
returns a step sharing the same jit object (and the same state, optimizer and shardings),
so switching objectives (e.g. pretrain -> grpo -> pretrain) traces the model once per
distinct loss and never again; `step.num_traces` counts the traces.

Why the loss is static and not a runtime switch: a `lax.switch` over objectives would
compile every objective into every program and needs all of their batch keys in every
batch; keying the one jit's cache on the loss costs one compile per objective actually
used, and none when switching back.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from deepseek_jax import losses as losses_lib
from deepseek_jax import moe as moe_lib
from deepseek_jax import sharding as sharding_lib


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied
    params: Any  # float32 master params (router biases live here, frozen in the optimizer)
    opt_state: Any  # optax state, sharded like params
    rng: jax.Array  # uint32 raw key data [2]; per-step key = fold_in(wrap_key_data(rng), step)
    skipped: jax.Array  # int32 scalar: updates skipped by the NaN/inf guard


# ----- state and its shardings -------------------------------------------------------------

def _dict_keys(path) -> tuple:
    # The trailing run of dict keys of a leaf path: its parameter path inside the state.
    keys = []
    for p in reversed(path):
        if not isinstance(p, jax.tree_util.DictKey):
            break
        keys.append(p.key)
    return tuple(reversed(keys))


def _opt_shardings(optimizer, abstract_params, param_shardings, mesh):
    """Optimizer-state shardings: params-shaped leaves (mu, nu) like params, the rest replicated.

    Matched by parameter path and shape (optax.tree_map_params trips over the MaskedNode
    leaves multi_transform puts where the frozen router biases are).
    """
    by_path = {}
    for (path, a), sh in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0],
                             jax.tree.leaves(param_shardings)):
        by_path[_dict_keys(path)] = (a.shape, sh)
    rep = sharding_lib.replicated(mesh)

    def pick(path, leaf):
        shape, sh = by_path.get(_dict_keys(path), (None, rep))
        return sh if shape == leaf.shape else rep

    return jax.tree_util.tree_map_with_path(pick, jax.eval_shape(optimizer.init, abstract_params))


@functools.lru_cache(maxsize=16)
def _abstract_params(model):
    # Tracing the model's init costs seconds; every builder below needs it.
    return sharding_lib.abstract_params(model)


def train_state_shardings(model, optimizer, mesh, rules) -> TrainState:
    """A TrainState of NamedShardings (the step's in/out shardings, Orbax's restore target)."""
    return _state_shardings(model, optimizer, mesh, tuple((k, tuple(v) if isinstance(v, list) else v)
                                                          for k, v in rules))


@functools.lru_cache(maxsize=16)
def _state_shardings(model, optimizer, mesh, rules) -> TrainState:
    boxed = _abstract_params(model)
    params_sh = sharding_lib.logical_to_shardings(boxed, mesh, rules)
    rep = sharding_lib.replicated(mesh)
    return TrainState(step=rep, params=params_sh,
                      opt_state=_opt_shardings(optimizer, nn.meta.unbox(boxed), params_sh, mesh),
                      rng=rep, skipped=rep)


def abstract_train_state(model, optimizer, mesh, rules) -> TrainState:
    """ShapeDtypeStructs carrying their shardings; allocates nothing (Orbax restore)."""
    abstract = nn.meta.unbox(_abstract_params(model))
    shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract,
                        opt_state=jax.eval_shape(optimizer.init, abstract),
                        rng=jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))),
                        skipped=jax.ShapeDtypeStruct((), jnp.int32))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, train_state_shardings(model, optimizer, mesh, rules))


def create_train_state(model, optimizer, mesh, rules, seed: int) -> TrainState:
    """Fresh state: params created already sharded, optimizer state sharded like them.

    The same seed gives the same values on every mesh (sharding-independent RNG).
    """
    init_key, step_key = jax.random.split(jax.random.key(seed))
    shardings = train_state_shardings(model, optimizer, mesh, rules)

    def init(key):  # as sharding.init_params, reusing the shardings computed above
        params = nn.meta.unbox(model.init(key, jnp.zeros((1, 8), jnp.int32))["params"])
        return params, optimizer.init(params)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        params, opt_state = jax.jit(init, out_shardings=(shardings.params, shardings.opt_state))(init_key)
    rep = sharding_lib.replicated(mesh)
    scalar = lambda: jax.device_put(jnp.zeros((), jnp.int32), rep)
    return TrainState(step=scalar(), params=params, opt_state=opt_state,
                      rng=jax.device_put(jax.random.key_data(step_key), rep), skipped=scalar())


# ----- the loss and its counts -------------------------------------------------------------

def bind_loss(name: str, model, cfg=None) -> Callable:
    """losses.get_loss(name) bound to the model and LossConfig: loss_fn(params, batch, rng)."""
    return functools.partial(losses_lib.get_loss(name), model=model, cfg=losses_lib.LossConfig.coerce(cfg))


def _loss_identity(loss_fn, loss_name, loss_cfg):
    """(name, cfg) that `losses.global_counts` needs; read off a bound registry loss if not given."""
    if loss_name is None and isinstance(loss_fn, functools.partial):
        names = [n for n, f in losses_lib.LOSSES.items() if f is loss_fn.func]
        loss_name = names[0] if names else None
        if loss_cfg is None:
            loss_cfg = loss_fn.keywords.get("cfg")
    return loss_name, losses_lib.LossConfig.coerce(loss_cfg)


# ----- micro-batches -----------------------------------------------------------------------

def split_microbatches(batch, microbatches: int, dp: int):
    """[B, ...] -> [M, B / M, ...], each micro-batch taking b = B / (Dp M) rows from every device.

    Rows of device d are the contiguous block d of the batch sharding; micro-batch m takes
    the m-th run of b rows inside every block, so the split is local to each device (no
    communication) and keeps neighbouring rows (DPO's chosen/rejected pairs) together.
    """
    def split(x):
        B = x.shape[0]
        if B % (dp * microbatches):
            raise ValueError(f"batch of {B} rows cannot be split into microbatches={microbatches} on "
                             f"{dp} data-parallel devices; make the global batch a multiple of "
                             f"{dp * microbatches} or change microbatches")
        b = B // (dp * microbatches)
        x = x.reshape((dp, microbatches, b) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1).reshape((microbatches, dp * b) + x.shape[3:])

    return jax.tree.map(split, batch)


def _place_batch(batch, mesh):
    """Puts each leaf on the batch sharding (a no-op for arrays already placed there)."""
    def place(x):
        if isinstance(x, jax.ShapeDtypeStruct):  # abstract batches (plan.py lowers without data)
            return x
        sh = sharding_lib.batch_sharding(mesh, max(np.ndim(x), 1))
        if isinstance(x, jax.Array) and x.sharding == sh:
            return x
        if jax.process_count() > 1 and not isinstance(x, jax.Array):
            # Multi-host: each process holds its own rows (data pipeline shard_index).
            return jax.make_array_from_process_local_data(sh, np.asarray(x))
        return jax.device_put(x, sh)

    return jax.tree.map(place, batch)


# ----- the step ----------------------------------------------------------------------------

class TrainStep:
    """Callable `(state, batch) -> (state, metrics)`; see the module docstring.

    Attributes: `loss_fn`, `loss_name` (used for the global counts), `microbatches`,
    `num_traces` (how often the jitted body has been traced, over all losses).
    """

    def __init__(self, core: "_StepCore", loss_fn, loss_name, loss_cfg):
        self._core, self.loss_fn = core, loss_fn
        self.loss_name, self.loss_cfg = loss_name, loss_cfg
        self.microbatches = core.microbatches

    @property
    def num_traces(self) -> int:
        return self._core.num_traces

    def with_loss(self, loss_fn, *, loss_name: Optional[str] = None, loss_cfg=None) -> "TrainStep":
        """The same compiled step (same jit, shardings, optimizer) with another objective."""
        name, cfg = _loss_identity(loss_fn, loss_name, loss_cfg)
        return TrainStep(self._core, loss_fn, name, cfg)

    def __call__(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        return self._core(self.loss_fn, self.loss_name, self.loss_cfg, state, batch)

    def lower(self, state: TrainState, batch: dict):
        """jax `Lowered` of this step (for cost analysis / HLO inspection)."""
        return self._core.lower(self.loss_fn, self.loss_name, self.loss_cfg, state, batch)

    def lower_abstract(self, state: TrainState, batch: dict, platforms: Optional[tuple] = None):
        """jax `Lowered` from abstract inputs (ShapeDtypeStructs, e.g. `abstract_train_state`),
        for `platforms` (e.g. ("cuda",) on a CPU host); nothing is allocated or compiled."""
        return self._core.lower_abstract(self.loss_fn, self.loss_name, self.loss_cfg, state, batch, platforms)


class _StepCore:
    """The one jit shared by every `TrainStep.with_loss` variant."""

    def __init__(self, model, optimizer, mesh, rules, microbatches, bias_update_rate, schedule, donate):
        if microbatches < 1:
            raise ValueError(f"microbatches={microbatches}: must be >= 1")
        self.model, self.optimizer, self.mesh, self.rules = model, optimizer, mesh, rules
        self.microbatches, self.schedule = microbatches, schedule
        c = model.config
        # Only models with the V3 selection bias get the aux-loss-free update.
        self.bias_rate = float(bias_update_rate) if (c.is_moe and c.router_bias) else 0.0
        self.dp = sharding_lib.data_parallel_size(mesh)
        self.state_shardings = train_state_shardings(model, optimizer, mesh, rules)
        self.num_traces = 0
        # Args: (loss_fn, loss_name, loss_cfg) static, then state and batch. The batch is
        # placed on its sharding by `_place_batch` before the call (its keys and ranks
        # differ between objectives, so its shardings are taken from the arguments).
        self._jit = jax.jit(self._step, static_argnums=(0, 1, 2),
                            in_shardings=(self.state_shardings, None),
                            out_shardings=(self.state_shardings, sharding_lib.replicated(mesh)),
                            donate_argnums=(3,) if donate else ())

    def _context(self):
        # The model's logical constraints and expert_parallel's shard_map read these.
        return _Contexts(jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules))

    def __call__(self, loss_fn, loss_name, loss_cfg, state, batch):
        with self._context():
            return self._jit(loss_fn, loss_name, loss_cfg, state, _place_batch(batch, self.mesh))

    def lower(self, loss_fn, loss_name, loss_cfg, state, batch):
        with self._context():
            return self._jit.lower(loss_fn, loss_name, loss_cfg, state, _place_batch(batch, self.mesh))

    def lower_abstract(self, loss_fn, loss_name, loss_cfg, state, batch, platforms):
        batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=sharding_lib.batch_sharding(self.mesh, len(x.shape))), batch)
        with self._context():
            traced = self._jit.trace(loss_fn, loss_name, loss_cfg, state, batch)
            return traced.lower(lowering_platforms=platforms) if platforms else traced.lower()

    # -- traced code --

    def _grads(self, loss_fn, loss_name, loss_cfg, params, batch, key):
        """(summed metrics, summed float32 grads) over the micro-batches."""
        counts = {}
        if loss_name is not None:
            counts = losses_lib.global_counts(loss_name, batch, loss_cfg)
        elif self.microbatches > 1:
            raise ValueError("microbatches > 1 needs the loss name for losses.global_counts: bind the loss "
                             "with train_step.bind_loss(name, model, cfg) or pass loss_name=")
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        param_sh = self.state_shardings.params

        def one(mb, k):
            (_, metrics), grads = grad_fn(params, {**mb, **counts}, k)
            grads = jax.lax.with_sharding_constraint(grads, param_sh)
            return jax.tree.map(lambda m: jnp.asarray(m, jnp.float32), metrics), grads

        if self.microbatches == 1:
            return one(batch, jax.random.fold_in(key, 0))
        mbs = split_microbatches(batch, self.microbatches, self.dp)
        mb_sh = jax.tree.map(lambda x: NamedSharding(self.mesh, P(None, sharding_lib.BATCH_AXES,
                                                                  *([None] * (x.ndim - 2)))), mbs)
        mbs = jax.lax.with_sharding_constraint(mbs, mb_sh)
        first = jax.tree.map(lambda x: x[0], mbs)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                             jax.eval_shape(one, first, jax.random.fold_in(key, 0)))

        def body(acc, xs):
            mb, i = xs
            out = one(mb, jax.random.fold_in(key, i))
            return jax.tree.map(jnp.add, acc, out), None

        (metrics, grads), _ = jax.lax.scan(body, zeros, (mbs, jnp.arange(self.microbatches)))
        return metrics, grads

    def _step(self, loss_fn, loss_name, loss_cfg, state: TrainState, batch):
        self.num_traces += 1
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        metrics, grads = self._grads(loss_fn, loss_name, loss_cfg, state.params, batch, key)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)

        def apply(state):
            updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            if self.bias_rate:
                params = moe_lib.update_router_biases(params, metrics["moe/expert_counts"], self.bias_rate)
            return state.replace(step=state.step + 1, params=params, opt_state=opt_state)

        def skip(state):
            return state.replace(skipped=state.skipped + 1)

        new_state = jax.lax.cond(ok, apply, skip, state)
        out = dict(metrics, grad_norm=grad_norm, skipped=(~ok).astype(jnp.float32),
                   skipped_total=new_state.skipped.astype(jnp.float32))
        if self.schedule is not None:
            out["learning_rate"] = jnp.asarray(self.schedule(state.step), jnp.float32)
        return new_state, out


class _Contexts:
    """Enters several context managers as one (jax.set_mesh + flax logical rules)."""

    def __init__(self, *cms):
        self.cms = cms

    def __enter__(self):
        for cm in self.cms:
            cm.__enter__()
        return self

    def __exit__(self, *exc):
        for cm in reversed(self.cms):
            cm.__exit__(*exc)
        return False


def make_train_step(model, loss_fn, optimizer, mesh, rules, *, microbatches: int = 1,
                    bias_update_rate: float = 0.0, schedule: Optional[Callable] = None, donate: bool = True,
                    loss_name: Optional[str] = None, loss_cfg=None) -> TrainStep:
    """The jitted train step; see the module docstring.

    loss_fn: loss_fn(params, batch, rng) -> (loss, metrics), e.g. `bind_loss(name, model, cfg)`.
    The registry name and LossConfig (for `losses.global_counts`) are read off a
    functools.partial of a registry loss, or given as loss_name / loss_cfg; a custom loss
    without a name works with microbatches=1 only.
    bias_update_rate: V3's gamma (cfg.moe.bias_update_rate); used only if the model has
    router_bias. schedule: step -> learning rate, reported as metrics["learning_rate"].
    donate: donate the input state's buffers (use the returned state afterwards).
    """
    core = _StepCore(model, optimizer, mesh, rules, microbatches, bias_update_rate, schedule, donate)
    name, cfg = _loss_identity(loss_fn, loss_name, loss_cfg)
    return TrainStep(core, loss_fn, name, cfg)
