"""The jitted GRPO update: train state, optimiser, and one step on one device, under pmap, or on a
("data", "fsdp", "tensor") mesh.

    optimizer = make_optimizer(5e-6, warmup_steps=10, total_steps=100)
    state = TrainState.create(lora_tree, optimizer, jax.random.PRNGKey(0))
    train_step = make_train_step(config, GRPOConfig(), optimizer, lora_scale=lcfg.scaling)
    state, metrics = train_step(state, params, batch)      # state is donated

Each step: fold the dropout key from (state.rng, state.step); compute the aggregation's
normaliser on the whole batch; value-and-grad of ``objective.loss_fn`` (one microbatch, or a
``lax.scan`` over ``microbatches`` strided slices with summed gradients: the same update as one
large batch); on pmap, pmean of gradients and psum of statistics; the optimiser update; a
non-finite loss or gradient keeps the old LoRA, optimiser state and step and only increments
``skipped_steps``. Metrics stay on device (no host sync in the step).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from arca_jax import parallel, qwen3
from arca_jax.batch import as_batch
from arca_jax.grpo.config import GRPOConfig
from arca_jax.grpo.objective import LossStats, loss_fn, raw_normalizer, router_shape
from arca_jax.grpo.signals import completion_valid, residual_layer_count

Array = jax.Array
MODES = ("jit", "pmap", "mesh")


@struct.dataclass
class TrainState:
    """Everything a step updates (a pytree; donated to the step).

    step: [] int32, optimiser steps taken (skipped steps do not count).
    lora: adapter tree (the trainable parameters).
    opt_state: optimiser state of ``lora``.
    rng: PRNG key; never split in place: the step uses fold_in(rng, step) for LoRA dropout.
    skipped_steps: [] int32, steps skipped for a non-finite loss or gradient.
    """

    step: Array
    lora: Any
    opt_state: Any
    rng: Array
    skipped_steps: Array

    @classmethod
    def create(cls, lora, optimizer: optax.GradientTransformation, rng: Array) -> "TrainState":
        """A step-0 state holding ``lora`` itself (not a copy): the first donated step frees
        those buffers, so copy the tree first if you still need it."""
        return cls(step=jnp.zeros((), jnp.int32), lora=lora, opt_state=optimizer.init(lora),
                   rng=rng, skipped_steps=jnp.zeros((), jnp.int32))


@struct.dataclass
class StepMetrics:
    """Scalars of one step, as device arrays ([] each; read them when you log, not in the loop).

    loss: objective value of the whole batch (sum over microbatches / devices of their parts).
    grad_norm: global L2 norm of the LoRA gradient before clipping.
    learning_rate: the rate the optimiser used this step (NaN when the optimiser has no
        ``inject_hyperparams`` learning rate, e.g. a bare optax.adamw).
    weight_gini, effective_token_ratio: mean concentration of the token weights.
    residual_norm_mean, residual_norm_max: ||h_adapted - h_base||_2 over completion tokens
        (ARCA only; 0 otherwise): ARCA's salience before normalisation (with grpo.arca_layers /
        arca_relative, the mean over the measured layers of each layer's residual).
    residual_norm_layers: [S] float32, the mean residual of each measured layer (S = 1 for
        arca_layers "final"; their mean is residual_norm_mean).
    kl: mean k3 KL to the base model per completion token (0 when no base forward runs).
    clip_fraction: fraction of completion tokens whose PPO ratio was clipped (policy_loss
        "cispo": whose weight the cap truncated; they keep their gradient).
    entropy: mean predictive entropy (nats) of the policy at completion tokens.
    completion_length: mean completion tokens per trajectory.
    behaviour_ratio_mean, behaviour_ratio_max, behaviour_capped_fraction: the behaviour
        correction's importance ratio (``objective.behaviour_weights``, before capping) over
        completion tokens (correction_level "token") or trajectories ("sequence"): mean, max and
        the fraction above correction_cap (truncated by "tis", masked out by "mis"); 0 when
        behaviour_correction is "none".
    skipped: [] int32, 1 if this step's update was skipped (non-finite loss or gradient).
    skipped_steps: [] int32, the running count.
    aux_loss: mixture-of-experts models: the router's load-balancing loss of the gradient forward
        (transformers' ``aux_loss``; weighted into the loss by grpo.router_aux_loss_coef, logged
        whether or not); None for a dense model.
    expert_load: [Ls, E] float32, each sparse layer's fraction of routed (token, expert) pairs
        per expert over the batch's real tokens (rows sum to 1); None for a dense model.
    """

    loss: Array
    grad_norm: Array
    learning_rate: Array
    weight_gini: Array
    effective_token_ratio: Array
    residual_norm_mean: Array
    residual_norm_max: Array
    kl: Array
    clip_fraction: Array
    entropy: Array
    completion_length: Array
    behaviour_ratio_mean: Array
    behaviour_ratio_max: Array
    behaviour_capped_fraction: Array
    residual_norm_layers: Array
    skipped: Array
    skipped_steps: Array
    aux_loss: Optional[Array] = None
    expert_load: Optional[Array] = None


def make_schedule(learning_rate: float = 5e-6, *, warmup_steps: int = 10, total_steps: int = 100,
                  end_learning_rate: float = 0.0) -> optax.Schedule:
    """Linear warmup from 0 over ``warmup_steps``, then cosine decay to ``end_learning_rate`` at
    ``total_steps`` (counted from step 0, warmup included; optax's warmup_cosine_decay)."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=learning_rate, warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1), end_value=end_learning_rate)


def make_optimizer(learning_rate: float = 5e-6, *, warmup_steps: int = 10,
                   total_steps: int = 100, end_learning_rate: float = 0.0,
                   weight_decay: float = 0.0, max_grad_norm: Optional[float] = 1.0,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
                   ) -> optax.GradientTransformation:
    """optax chain: global-norm clipping, then AdamW on a warmup + cosine schedule.

    Defaults are the paper's (lr 5e-6, wd 0, 10 warmup steps, cosine over 100, max grad norm
    1.0). The learning rate is injected (``optax.inject_hyperparams``) so the step can report it.
    """
    schedule = make_schedule(learning_rate, warmup_steps=warmup_steps, total_steps=total_steps,
                             end_learning_rate=end_learning_rate)
    parts = []
    if max_grad_norm is not None:
        parts.append(optax.clip_by_global_norm(max_grad_norm))
    parts.append(optax.inject_hyperparams(optax.adamw)(
        learning_rate=schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return optax.chain(*parts)


def _learning_rate(opt_state) -> Array:
    states = jax.tree_util.tree_leaves(
        opt_state, is_leaf=lambda x: isinstance(
            x, (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)))
    for s in states:
        if isinstance(s, (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)):
            if "learning_rate" in s.hyperparams:
                return jnp.asarray(s.hyperparams["learning_rate"], jnp.float32)
    return jnp.asarray(jnp.nan, jnp.float32)


def _split_microbatches(batch, m: int):
    """[B, ...] -> [m, B / m, ...], microbatch i holding rows i, i + m, i + 2m, ... (strided, so
    every device's rows stay on that device when B is sharded)."""
    def split(x):
        if x.shape[0] % m:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by microbatches={m}")
        return jnp.swapaxes(x.reshape((x.shape[0] // m, m) + x.shape[1:]), 0, 1)
    return jax.tree_util.tree_map(split, batch)


def _zero_stats(residual_layers: int = 1, router: Optional[tuple] = None) -> LossStats:
    """Zero statistics ([] each; residual_layer_sum [S], S = ``residual_layers``; the routing
    fields None, or zeros with expert_load_sum [Ls, E] for ``router`` = (Ls, E), as
    ``objective.router_shape``)."""
    z = jnp.zeros((), jnp.float32)
    stats = LossStats(*([z] * len(LossStats.__dataclass_fields__))).replace(
        residual_layer_sum=jnp.zeros((residual_layers,), jnp.float32))
    if router is None:
        return stats.replace(aux_sum=None, aux_weight=None, expert_load_sum=None,
                             router_tokens=None)
    return stats.replace(expert_load_sum=jnp.zeros(router, jnp.float32))


def _loss_and_grads(value_and_grad, lora, params, b, key, normalizer, *, microbatches: int,
                    mesh: Optional[Mesh], residual_layers: int = 1, router=None,
                    grad_shardings=None, axis_name: Optional[str] = None):
    """(loss, LossStats, grads) of the batch: one value-and-grad, or a ``lax.scan`` over M strided
    microbatches with gradients summed in float32 (each microbatch uses the global normaliser and
    dropout key fold_in(key, i), so the sum is the large-batch gradient).

    grad_shardings: on a mesh, the adapter's layout (``parallel.state_shardings``): each
    (microbatch's) gradient and the float32 sum are constrained to it, so every device holds
    only the slices it owns (the devices' contributions reduced onto them, not all-reduced
    whole). axis_name: the pmap axis, passed to ``loss_fn``."""
    M = microbatches

    def owned(g):
        return g if grad_shardings is None else jax.lax.with_sharding_constraint(g, grad_shardings)

    if M == 1:
        (loss, stats), grads = value_and_grad(lora, params, b, rng=key, normalizer=normalizer,
                                              axis_name=axis_name)
        return loss, stats, owned(grads)
    mbs = _split_microbatches(b, M)
    if mesh is not None:
        spec = parallel.batch_spec(b.input_ids.shape[0] // M, mesh)
        mb_sharding = NamedSharding(mesh, P(None, *spec))
        mbs = jax.lax.with_sharding_constraint(
            mbs, jax.tree_util.tree_map(lambda _: mb_sharding, mbs))

    def body(carry, xs):
        g_acc, l_acc, s_acc = carry
        mb, i = xs
        (mb_loss, s), gr = value_and_grad(lora, params, mb, rng=jax.random.fold_in(key, i),
                                          normalizer=normalizer, axis_name=axis_name)
        g_acc = owned(jax.tree_util.tree_map(lambda a, x: a + x.astype(jnp.float32), g_acc,
                                             owned(gr)))
        return (g_acc, l_acc + mb_loss, s_acc.combine(s)), None

    # accumulate in float32 whatever the adapter's dtype (on a mesh: each device its own slice)
    init = (owned(jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, jnp.float32), lora)),
            jnp.zeros((), jnp.float32), _zero_stats(residual_layers, router))
    (grads, loss, stats), _ = jax.lax.scan(body, init, (mbs, jnp.arange(M)))
    return loss, stats, jax.tree_util.tree_map(lambda x, p: x.astype(p.dtype), grads, lora)


def _apply_update(optimizer, state: TrainState, loss, stats: LossStats, grads):
    """The optimiser update, kept only when loss and gradient are finite (else the old LoRA,
    optimiser state and step stay and ``skipped_steps`` counts it); the step's metrics."""
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(grad_norm) & jnp.isfinite(loss)
    updates, new_opt_state = optimizer.update(grads, state.opt_state, state.lora)
    new_lora = optax.apply_updates(state.lora, updates)

    def keep(new, old):
        return jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)

    skipped = (~finite).astype(jnp.int32)
    new_state = state.replace(
        step=state.step + (1 - skipped),
        lora=keep(new_lora, state.lora),
        opt_state=keep(new_opt_state, state.opt_state),
        skipped_steps=state.skipped_steps + skipped)
    metrics = StepMetrics(loss=loss, grad_norm=grad_norm,
                          learning_rate=_learning_rate(new_opt_state),
                          skipped=skipped, skipped_steps=new_state.skipped_steps,
                          **stats.metrics())
    return new_state, metrics


def make_train_step(config: qwen3.Qwen3Config, grpo_config: GRPOConfig,
                    optimizer: optax.GradientTransformation, *, lora_scale: float,
                    mode: str = "jit", mesh: Optional[Mesh] = None, microbatches: int = 1,
                    lora_dropout: float = 0.0, donate: bool = True,
                    compiler_options: Optional[dict] = None
                    ) -> Callable[[TrainState, Any, Any], tuple]:
    """Builds ``train_step(state, params, batch) -> (state, StepMetrics)``.

    config, grpo_config: static model and objective settings.
    optimizer: e.g. ``make_optimizer(...)``; applied to the LoRA tree only.
    lora_scale: adapter scaling (``LoraConfig.scaling``). lora_dropout: the paper used 0.05.
    mode:
      "jit":  one device; state donated, params passed by reference (never copied).
      "pmap": data parallel over all local devices. Pass ``parallel.replicate(state)`` and
              ``parallel.replicate(params)`` (once); the batch is the global [B, ...] batch, split
              into contiguous per-device rows here. Gradients are pmean-ed over devices (each
              device's loss is normalised by the global denominator), statistics psum-ed. The
              returned state stays replicated; metrics are device 0's (identical on all). Each
              device folds its index into the dropout key.
      "mesh": jit over ``mesh`` (axes ("data", "fsdp", "tensor"), see ``parallel.make_mesh``):
              base params sharded over "fsdp" and "tensor" (place them once with
              ``parallel.shard_params``), batch over ("data", "fsdp"), state (adapter and
              optimiser moments) split over "tensor" like the base layers and over "fsdp"
              ZeRO-style (``parallel.shard_lora``, ``parallel.state_shardings``): factors
              all-gathered over "fsdp" for the forward, gradients reduced onto each device's
              slice, the update applied there; the state keeps that layout. See
              ``arca_jax.parallel``.
    microbatches: M; the batch (B rows) is processed as M strided slices of B / M rows under
        ``lax.scan`` and the gradients summed (in float32); the update equals one large-batch
        step (each slice uses the global normaliser). Microbatch i uses dropout key
        fold_in(key, i) when M > 1.
    donate: donate the state's buffers to the step (the caller must not reuse the old state).
    compiler_options: XLA options for ``jax.jit`` ("jit" and "mesh" modes; pmap takes none),
        e.g. {"xla_backend_optimization_level": 0} to compile faster in CPU tests.

    The batch is a ``Batch`` or a dict with its fields (``objective.Batch``). A packed batch
    (``arca_jax.packing.pack``: the forwards run on the real tokens only) needs mode "jit" and
    microbatches=1 (ValueError otherwise).
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}; valid: {', '.join(MODES)}")
    if mode == "mesh" and mesh is None:
        raise ValueError('mode="mesh" needs a mesh (parallel.make_mesh)')
    if not (isinstance(microbatches, int) and microbatches >= 1):
        raise ValueError(f"microbatches must be an int >= 1, got {microbatches!r}")
    value_and_grad = jax.value_and_grad(
        functools.partial(loss_fn, config=config, lora_scale=float(lora_scale),
                          grpo_config=grpo_config, lora_dropout=float(lora_dropout),
                          mesh=mesh if mode == "mesh" else None),
        has_aux=True)
    grads_fn = functools.partial(
        _loss_and_grads, value_and_grad, microbatches=microbatches, mesh=mesh,
        residual_layers=residual_layer_count(grpo_config, config.num_hidden_layers),
        router=router_shape(config))

    kv_heads = config.num_key_value_heads
    if mesh is not None:
        parallel.check_tensor(config, parallel.axis_size(mesh, parallel.TENSOR))

    def step(state: TrainState, params, batch, axis_name: Optional[str] = None):
        b = as_batch(batch)
        _check_packed(b, mode, microbatches)
        if mesh is not None:
            b = jax.lax.with_sharding_constraint(b, parallel.batch_shardings(b, mesh))
            params = jax.lax.with_sharding_constraint(params,
                                                      parallel.param_shardings(params, mesh))
            state = jax.lax.with_sharding_constraint(
                state, parallel.state_shardings(state, mesh, kv_heads))
        key = jax.random.fold_in(state.rng, state.step)
        n_dev = 1
        z = raw_normalizer(completion_valid(b), grpo_config)
        if axis_name is not None:
            key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
            n_dev = jax.lax.psum(1, axis_name)
            z = jax.lax.psum(z, axis_name)
        # each device normalises by its share of the global denominator: pmean then adds up
        lora_in, grad_shardings = state.lora, None
        if mesh is not None:  # ZeRO: gather each factor over "fsdp" for the forward, and
            # reduce its gradient onto the slices the devices own
            lora_in = jax.lax.with_sharding_constraint(
                state.lora, parallel.state_shardings(state.lora, mesh, kv_heads, fsdp=False))
            grad_shardings = parallel.state_shardings(state.lora, mesh, kv_heads)
        loss, stats, grads = grads_fn(lora_in, params, b, key, jnp.maximum(z, 1.0) / n_dev,
                                      grad_shardings=grad_shardings, axis_name=axis_name)
        if axis_name is not None:
            grads = jax.lax.pmean(grads, axis_name)
            loss = jax.lax.pmean(loss, axis_name)
            stats = stats.all_reduce(axis_name)
        new_state, metrics = _apply_update(optimizer, state, loss, stats, grads)
        if mesh is not None:  # the state keeps its layout (donation reuses its buffers)
            new_state = jax.lax.with_sharding_constraint(
                new_state, parallel.state_shardings(new_state, mesh, kv_heads))
            metrics = jax.lax.with_sharding_constraint(metrics, parallel.replicated(metrics, mesh))
        return new_state, metrics

    donate_argnums = (0,) if donate else ()
    if mode == "jit":
        return jax.jit(step, donate_argnums=donate_argnums, compiler_options=compiler_options)
    if mode == "pmap":
        return _pmap_step(step, donate_argnums)
    return _mesh_step(step, mesh, kv_heads, donate_argnums, compiler_options)


def _check_packed(b, mode: str, microbatches: int) -> None:
    """A packed batch's index maps hold whole-batch positions: splitting its rows over devices
    or microbatches would break them (ValueError)."""
    if b.packing is not None and (mode != "jit" or microbatches > 1):
        raise ValueError(f"a packed batch (batch.packing) runs in mode 'jit' with one "
                         f"microbatch, not mode {mode!r} with {microbatches}")


def _pmap_step(step, donate_argnums):
    n = jax.local_device_count()
    pstep = jax.pmap(functools.partial(step, axis_name=parallel.DATA), axis_name=parallel.DATA,
                     donate_argnums=donate_argnums)

    def train_step(state, params, batch):
        # via the host: a batch produced under another sharding (e.g. a sampler's mesh) is
        # re-laid out by pmap's own device split instead of clashing with it
        _check_packed(as_batch(batch), "pmap", 1)  # before the host split would cut it up
        host = jax.tree_util.tree_map(np.asarray, as_batch(batch))
        new_state, metrics = pstep(state, params, parallel.split_batch(host, n))
        return new_state, parallel.unreplicate(metrics)

    train_step.pmapped = pstep  # the raw pmapped function, for inspection
    return train_step


def _mesh_step(step, mesh: Mesh, kv_heads: int, donate_argnums, compiler_options):
    jitted = jax.jit(step, donate_argnums=donate_argnums, compiler_options=compiler_options)

    def train_step(state, params, batch):
        b = as_batch(batch)
        _check_packed(b, "mesh", 1)  # before placement would shard it by rows
        # each a no-op when already placed so
        state = jax.device_put(state, parallel.state_shardings(state, mesh, kv_heads))
        params = jax.device_put(params, parallel.param_shardings(params, mesh))
        return jitted(state, params, jax.device_put(b, parallel.batch_shardings(b, mesh)))

    train_step.jitted = jitted  # for .lower(...) / memory analysis
    return train_step
