"""Rollouts: a jitted KV-cache sampler for the Qwen3 port.

    out = generate(params, prompt_ids, prompt_mask, config=config, rng=key, max_new_tokens=512,
                   lora=adapter, lora_scale=lora_config.scaling, eos_id=config.eos_token_id)
    batch = arca_jax.batch.build_batch(prompt_ids, prompt_mask, out, advantages=adv)

How it runs (B rows, S slots, P prompt width, N new tokens, V vocabulary):
  1. `qwen3.inference_weights` rearranges the parameters once (fused q/k/v and gate/up kernels,
     per-layer arrays; a LoRA adapter kept low-rank or merged).
  2. `prefill` admits the first S rows (S = B unless `max_batch` is set): their left-padded
     prompts run in one forward (once per GRPO group), their keys/values fill the slots' caches
     (P + N positions each), and token 0 is sampled from the last position's logits.
  3. `decode` runs `jax.lax.while_loop(cond, body, state)`: each `decode_step` feeds every slot's
     previous token (T = 1), samples the next, and writes it at its row's column; a row ends at
     EOS or after N tokens. With rows still waiting (S < B), the steps' loop stops whenever
     enough slots are free, the next rows are admitted into them (`admit`: continuous refill),
     and an outer loop starts the steps again. It all ends when every row has ended. The state
     (cache included) is donated, so buffers are reused.
     With `shrink`, once no row waits and at most half the slots run, the running rows move
     into half as many slots (`compact`) and a loop over those goes on.
  4. `SampleOutput` holds tokens, mask and log-probabilities [B, N].

Randomness: each token is drawn by inverse-CDF search with one uniform number per row (no noise
over the whole vocabulary). `prefill` draws the uniforms of all N columns, [N, B], in one call of
`rng` (used once, never again), and row b's column i reads entry [i, b] wherever and whenever
the row runs: no key is reused, the same `rng` gives the same samples with or without refill,
and the loop body holds no PRNG (on CPU threefry lowers to a rolled 5-round loop: fold_in then
uniform inside the loop cost ~185 kernels per step, more than the model's 4 layers).

Shapes: `generate` pads prompt widths and generation lengths up to powers of two
(`prompts.bucket_size`), so a training run compiles a handful of programs, not one per batch. The
true `max_new_tokens` is a traced loop bound; the output is cut back to it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from arca_jax import parallel, qwen3
from arca_jax.draw import Choice, choose_tokens
from arca_jax.prompts import bucket_size, new_token_columns, pad_prompts

Params = qwen3.Params

# --------------------------------------------------------------------------------------------
# Settings, state, results
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How tokens are chosen. Hashable: static under jit.

    max_new_tokens: N, the width of the token buffers (`generate` passes the bucketed width; the
      loop stops at the traced `limit` of `prefill`).
    temperature: logits are divided by it before sampling (ignored when greedy).
    top_k: keep only the k most likely tokens (after temperature; tokens tied with the k-th are
      kept, as transformers' TopKLogitsWarper, up to 2k candidates); 0 disables it. Applied before
      top_p, as transformers' `generate` (whose default for a model without a generation config
      setting is top_k=50).
    top_p: nucleus sampling: draw from the smallest set of most likely tokens whose probability
      (after temperature and top-k) reaches top_p; 1.0 disables it.
    min_p: then keep only the tokens whose probability is at least min_p times the largest one
      (transformers' MinPLogitsWarper, applied after top_k and top_p as there); 0 disables it.
    greedy: take the argmax (ties: lowest token id, as torch).
    eos_ids: tokens that end a row (kept, masked 1); empty: rows run to the limit.
    pad_id: written after a row's EOS.
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False
    eos_ids: Tuple[int, ...] = ()
    top_k: int = 0
    pad_id: int = 0
    min_p: float = 0.0

    def __post_init__(self):
        n = self.max_new_tokens
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n <= 0:
            raise ValueError(f"max_new_tokens must be a positive int, got {n!r}")
        if not self.greedy and not self.temperature > 0:
            raise ValueError("temperature must be > 0 (use greedy=True for argmax), "
                             f"got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        k = self.top_k
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 0:
            raise ValueError(f"top_k must be an int >= 0, got {k!r}")
        object.__setattr__(self, "top_k", int(k))
        object.__setattr__(self, "max_new_tokens", int(n))
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))
        object.__setattr__(self, "min_p", float(self.min_p))
        object.__setattr__(self, "eos_ids", tuple(int(e) for e in self.eos_ids))


@flax.struct.dataclass
class SamplerState:
    """The decode loop's carry: S slots decoding B rows (B prompts, N token columns each).

    Without refill S = B and slot s decodes row s. With S < B (`generate(max_batch=S)`) a slot
    whose row has ended takes the next waiting row (`admit`), so every slot keeps working until
    the rows run out; each row's tokens depend only on its prompt and its own uniforms, not on the
    slot or the step it ran in.

    Per slot [S]:
    cache:    `qwen3.KVCache` of S rows of P + N positions (the prompt, then the tokens fed).
    row:      [S] int32 the row the slot decodes (B: none yet).
    column:   [S] int32 tokens its row has so far = the column its next token goes to.
    last:     [S] int32 the newest token, fed at the next step.
    position: [S] int32 rotary position of `last` (the row's count of real tokens before it).
    done:     [S] bool, no running row (EOS, `limit` columns, or none given yet).
    Per row:
    prompt_ids, prompt_mask: [B, P] the left-padded prompts (read when a row is admitted).
    tokens:   [B, N] int32 sampled tokens; `pad_id` after a row's EOS and in unsampled columns.
    mask:     [B, N] int32, 1 for tokens up to and including the row's EOS.
    logps:    [B, N] float32 log-probability of each token under the plain softmax (0 where mask 0).
    sampled_logps: [B, N] float32 log-probability under the distribution sampled from.
    finished: [B] bool, the row produced EOS.
    uniforms: [B, N] float32 in (0, 1]: column i of row b is drawn with uniforms[b, i].
    Counters []:
    admitted: rows given a slot so far (rows are admitted in order).
    limit:    columns per row (<= N).
    slot_steps: (slot, column) pairs computed: S per decode step plus one per admitted row.
    Static:
    group_size: G; rows come in groups of G copies of one prompt, prefilled once per group.
    admit_rows: rows admitted together once that many slots are free (a multiple of G).
    """

    cache: qwen3.KVCache
    row: jax.Array
    column: jax.Array
    last: jax.Array
    position: jax.Array
    done: jax.Array
    prompt_ids: jax.Array
    prompt_mask: jax.Array
    tokens: jax.Array
    mask: jax.Array
    logps: jax.Array
    sampled_logps: jax.Array
    finished: jax.Array
    uniforms: jax.Array
    admitted: jax.Array
    limit: jax.Array
    slot_steps: jax.Array
    group_size: int = flax.struct.field(pytree_node=False, default=1)
    admit_rows: int = flax.struct.field(pytree_node=False, default=1)

    @property
    def slots(self) -> int:
        """S."""
        return self.row.shape[0]

    @property
    def rows(self) -> int:
        """B."""
        return self.tokens.shape[0]


def state_shardings(state: SamplerState, mesh) -> SamplerState:
    """NamedShardings of a `SamplerState` on a mesh: slots as the batch (`parallel.batch_spec`),
    the cache as `parallel.cache_shardings` (kv heads over "tensor"); the per-row buffers
    ([B, ...]: small, written at rows chosen at run time) and the counters replicated."""
    slots = jax.sharding.NamedSharding(mesh, parallel.batch_spec(state.slots, mesh))
    one = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    per_slot = dict(row=slots, column=slots, last=slots, position=slots, done=slots)
    replicated = {f.name: one for f in dataclasses.fields(state)
                  if f.metadata.get("pytree_node", True) and f.name not in per_slot
                  and f.name != "cache"}
    return state.replace(cache=parallel.cache_shardings(state.cache, mesh), **per_slot,
                         **replicated)


def _constrain(state: SamplerState, mesh) -> SamplerState:
    return state if mesh is None else jax.lax.with_sharding_constraint(
        state, state_shardings(state, mesh))


@flax.struct.dataclass
class SampleOutput:
    """A batch of completions. B rows, N = max_new_tokens columns.

    tokens:    [B, N] int32 generated tokens, `pad_id` after a row's EOS.
    mask:      [B, N] int32, 1 for each generated token up to and including the row's EOS.
    logps:     [B, N] float32 log-probability of each token under the model's plain softmax
               (temperature 1, no truncation): what the training step recomputes. 0 where mask 0.
    sampled_logps: [B, N] float32 log-probability of each token under the distribution it was
               drawn from (temperature, top-k, top-p, renormalised; 0 for greedy and where mask
               0): the behaviour policy of importance corrections.
    lengths:   [B] int32 tokens per row (= mask.sum(-1), EOS included).
    finished:  [B] bool, the row ended with EOS (False: cut at max_new_tokens).
    num_steps: [] int32 columns of the longest row (< N when every row stopped early).
    slot_steps: [] int32 (slot, column) pairs the sampler computed; lengths.sum() / slot_steps is
               the fraction of that work that produced a kept token.
    """

    tokens: jax.Array
    mask: jax.Array
    logps: jax.Array
    lengths: jax.Array
    finished: jax.Array
    num_steps: jax.Array
    sampled_logps: Optional[jax.Array] = None
    slot_steps: Optional[jax.Array] = None


# --------------------------------------------------------------------------------------------
# Prefill, decode loop
# --------------------------------------------------------------------------------------------


class Written(NamedTuple):
    """What `_write` changed: the per-row buffers and, per slot, the token fed next and whether
    the slot's row ended."""

    state: "SamplerState"
    tokens: jax.Array  # [S'] the written tokens (pad where the slot was not running)
    ended: jax.Array  # [S'] bool


def _write(state: SamplerState, rows, columns, choice: Choice, running,
           settings: SamplingConfig) -> Written:
    """Writes `choice` [S'] at (rows, columns) of the per-row buffers where `running` [S'];
    elsewhere nothing (a scatter that drops them). A row ends at EOS or at `limit` columns."""
    B = state.rows
    r = jnp.where(running, rows, B)  # B: dropped
    tokens = jnp.where(running, choice.tokens, settings.pad_id).astype(jnp.int32)

    def put(buf, val):
        return buf.at[r, columns].set(val.astype(buf.dtype), mode="drop")

    if settings.eos_ids:
        hit = running & functools.reduce(jnp.logical_or, [tokens == e for e in settings.eos_ids])
    else:
        hit = jnp.zeros_like(running)
    state = state.replace(tokens=put(state.tokens, tokens), mask=put(state.mask, running),
                          logps=put(state.logps, choice.logps),
                          sampled_logps=put(state.sampled_logps, choice.sampled_logps),
                          finished=state.finished.at[r].set(hit, mode="drop"))
    return Written(state, tokens, hit | (columns + 1 >= state.limit))


def _free_slots(done: jax.Array, n: int) -> jax.Array:
    """The first n slots with done set, in slot order, [n] int32 (S where fewer are free)."""
    S = done.shape[0]
    rank = jnp.cumsum(done.astype(jnp.int32)) - 1
    target = jnp.where(done & (rank < n), rank, n)
    return jnp.full((n,), S, jnp.int32).at[target].set(jnp.arange(S, dtype=jnp.int32), mode="drop")


def _spread(n: int, mesh) -> jax.sharding.PartitionSpec:
    """Spec of n rows over as many of the mesh's row devices as divide them: ("data", "fsdp"),
    else "fsdp", else "data", else replicated (the admitted prompts: each device runs its own)."""
    P = jax.sharding.PartitionSpec
    data, fsdp = parallel.axis_size(mesh, parallel.DATA), parallel.axis_size(mesh, parallel.FSDP)
    for axes, size in (((parallel.DATA, parallel.FSDP), data * fsdp), (parallel.FSDP, fsdp),
                       (parallel.DATA, data)):
        if size > 1 and n % size == 0:
            return P(axes)
    return P()


def admit(weights: qwen3.InferenceWeights, state: SamplerState, *, config: qwen3.Qwen3Config,
          settings: SamplingConfig, count: int, mesh=None) -> SamplerState:
    """Gives the next min(count, waiting) rows the first free slots: their prompts run through
    the model (each group of G copies once; with a `mesh`, split over its row devices), their
    keys and values replace the slot's cache, and their token 0 is sampled. `count` (static) is
    a multiple of G; the caller makes sure that many slots are free. Pure."""
    S, B = state.slots, state.rows
    P = state.prompt_ids.shape[1]
    G = state.group_size
    j = jnp.arange(count, dtype=jnp.int32)
    rows = state.admitted + j  # [count]
    take = rows < B
    slots = jnp.where(take, _free_slots(state.done, count), S)  # S: dropped
    src = jnp.minimum(rows[::G], B - 1)  # one prompt per group
    ids, mask = state.prompt_ids[src], state.prompt_mask[src]  # [count / G, P]
    if mesh is not None:
        spread = jax.sharding.NamedSharding(mesh, _spread(count // G, mesh))
        ids, mask = jax.lax.with_sharding_constraint((ids, mask), spread)
    fresh = qwen3.KVCache.init(config, count // G, P, weights.dtype, tensor=weights.tensor,
                               transposed_keys=state.cache.transposed_keys)
    out = qwen3.inference_forward(weights, ids, config=config,
                                  positions=qwen3.default_positions(mask),
                                  attention_mask=mask, cache=fresh)
    if mesh is not None:  # keep the prompts' work split by prompt, not replicated
        out = jax.lax.with_sharding_constraint(out, jax.tree_util.tree_map(
            lambda x: jax.sharding.NamedSharding(mesh, spread.spec if x.ndim else
                                                 jax.sharding.PartitionSpec()), out))
    if G > 1:  # each prompt's keys, values and logits to its G rows
        out = jax.tree_util.tree_map(lambda x: jnp.repeat(x, G, axis=0) if x.ndim else x, out)
        mask = jnp.repeat(mask, G, axis=0)
    cache = state.cache

    def put(axis):  # [S, ..., P + N (axis), ...] <- [count, ..., P, ...] at the admitted slots
        at = (slots,) + (slice(None),) * (axis - 1) + (slice(None, P),)
        return lambda buf, new: buf.at[at].set(new.astype(buf.dtype), mode="drop")

    cache = cache.replace(
        k=tuple(map(put(cache.key_slot_axis), cache.k, out.cache.k)),
        v=tuple(map(put(2), cache.v, out.cache.v)),
        valid=cache.valid.at[slots].set(
            jnp.pad(mask.astype(bool), ((0, 0), (0, cache.size - P))), mode="drop"),
        index=cache.index.at[slots].set(P, mode="drop"))
    u = state.uniforms[jnp.minimum(rows, B - 1), 0]
    zero = jnp.zeros_like(rows)
    choice = choose_tokens(out.logits, u, settings, mesh=mesh,
                           rows=None if mesh is None else parallel.leading_axes(spread.spec))
    w = _write(state, rows, zero, choice, take, settings)
    set_ = lambda buf, val: buf.at[slots].set(val.astype(buf.dtype), mode="drop")
    return w.state.replace(
        cache=cache, row=set_(w.state.row, rows), column=set_(w.state.column, zero + 1),
        last=set_(w.state.last, w.tokens), position=set_(w.state.position, jnp.sum(mask, -1)),
        done=set_(w.state.done, w.ended),
        admitted=jnp.minimum(state.admitted + count, B),
        slot_steps=state.slot_steps + jnp.sum(take))


def _uniforms(rng: jax.Array, N: int, B: int, rows_of=None) -> jax.Array:
    """[B, N] float32 in (0, 1]: rows `rows_of` (see `prefill`) of one draw [N, total]."""
    if rows_of is None:
        return (1.0 - jax.random.uniform(rng, (N, B), jnp.float32)).T
    first, total = rows_of
    table = jnp.pad(1.0 - jax.random.uniform(rng, (N, int(total)), jnp.float32), ((0, 0), (0, B)),
                    constant_values=1.0)
    return jax.lax.dynamic_slice_in_dim(table, first, B, axis=1).T


def prefill(weights: qwen3.InferenceWeights, prompt_ids: jax.Array, prompt_mask: jax.Array, *,
            config: qwen3.Qwen3Config, settings: SamplingConfig, rng: jax.Array,
            limit: Optional[jax.Array] = None, mesh=None, group_size: int = 1,
            slots: Optional[int] = None, admit_rows: Optional[int] = None,
            rows_of: Optional[Tuple[jax.Array, int]] = None) -> SamplerState:
    """The loop state with the first S rows admitted (prompt forward, token 0 sampled). Pure;
    jit with config, settings, mesh, group_size, slots, admit_rows and rows_of[1] static.

    Args:
      weights: `qwen3.inference_weights(params, config, ...)`.
      prompt_ids, prompt_mask: [B, P] left-padded prompts (each row needs at least one real token).
      rng: key of the whole generation; used once, to draw the uniforms of all B x N tokens
        (`jax.random.uniform(rng, (N, B))`, row b reading column b: the same key gives every row
        the same numbers whatever S is).
      limit: [] int, columns to produce (<= settings.max_new_tokens; default all).
      mesh: lay the state out on this mesh (`state_shardings`; static), or None.
      group_size: G; rows r G .. r G + G - 1 hold the same prompt (as `prompts.repeat_groups`
        lays GRPO groups out), so each group's prompt runs through the model once and its keys,
        values and last logits serve its G rows (the same numbers as prefilling every row). The
        caller vouches for the repetition.
      slots: S, rows decoded at once (default B); the others wait for a free slot (`decode`).
      admit_rows: rows admitted together during `decode` once that many slots are free (a
        multiple of G, <= S; default max(G, S / 8 rounded down to a multiple of G)).
      rows_of: (first, total): these B rows are rows first .. first + B - 1 of a generation of
        `total` rows (`arca_jax.replicas`: one device's share), so they read those columns of
        the [N, total] uniforms, the numbers one run of all rows gives them (columns past
        `total` read 1). None: rows 0 .. B - 1 of B.

    Returns:
      The loop state, a cache of P + N positions per slot (`qwen3.cache_size`).
    """
    B, P = prompt_ids.shape
    N = settings.max_new_tokens
    G = int(group_size)
    S = B if slots is None else int(slots)
    if G < 1 or B % G or S % G:
        raise ValueError(f"group_size {group_size} must be >= 1 and divide the {B} rows and the "
                         f"{S} slots")
    if not 0 < S <= B:
        raise ValueError(f"slots must be in [1, {B}] (the rows), got {slots}")
    F = max(G, S // 8 // G * G) if admit_rows is None else int(admit_rows)
    if F % G or not G <= F <= S:
        raise ValueError(f"admit_rows {admit_rows} must be a multiple of group_size {G} in "
                         f"[{G}, {S}]")
    if settings.greedy:
        uniforms = jnp.ones((B, N), jnp.float32)  # unused
    else:
        uniforms = _uniforms(rng, N, B, rows_of)
    limit = jnp.minimum(jnp.asarray(N if limit is None else limit, jnp.int32), N)
    zeros = jnp.zeros((B, N), jnp.float32)
    i32 = lambda n: jnp.zeros((n,), jnp.int32)
    state = SamplerState(
        cache=qwen3.KVCache.init(config, S, qwen3.cache_size(P + N, weights.decode_attention),
                                 weights.dtype, tensor=weights.tensor,
                                 transposed_keys=qwen3.transposed_keys(weights.decode_attention)),
        row=jnp.full((S,), B, jnp.int32), column=i32(S), last=i32(S), position=i32(S),
        done=jnp.ones((S,), bool), prompt_ids=prompt_ids.astype(jnp.int32),
        prompt_mask=prompt_mask.astype(jnp.int32),
        tokens=jnp.full((B, N), settings.pad_id, jnp.int32), mask=jnp.zeros((B, N), jnp.int32),
        logps=zeros, sampled_logps=zeros, finished=jnp.zeros((B,), bool), uniforms=uniforms,
        admitted=jnp.zeros((), jnp.int32), limit=limit, slot_steps=jnp.zeros((), jnp.int32),
        group_size=G, admit_rows=F)
    return _constrain(admit(weights, state, config=config, settings=settings, count=S,
                            mesh=mesh), mesh)


def decode_step(weights: qwen3.InferenceWeights, state: SamplerState, *, config: qwen3.Qwen3Config,
                settings: SamplingConfig, mesh=None) -> SamplerState:
    """One token per slot: feed `state.last` (T = 1), sample the running rows' next column.
    Pure. With a `mesh`, the new state keeps `state_shardings` (the loop carry's layout)."""
    S, B, N = state.slots, state.rows, state.tokens.shape[1]
    out = qwen3.inference_forward(weights, state.last[:, None], config=config,
                                  positions=state.position[:, None],
                                  attention_mask=jnp.ones((S, 1), jnp.int32), cache=state.cache)
    running = ~state.done
    column = jnp.minimum(state.column, N - 1)
    u = state.uniforms[jnp.minimum(state.row, B - 1), column]  # [S]
    choice = choose_tokens(out.logits, u, settings, out.softmax, mesh=mesh,
                           rows=None if mesh is None else parallel.row_axes(S, mesh))
    w = _write(state, state.row, column, choice, running, settings)
    done = state.done | w.ended
    # a slot without a running row writes its (ignored) keys at slot 0 until it is refilled, so
    # the longest running row alone bounds the cache blocks a step reads
    cache = out.cache.replace(index=jnp.where(done, 0, out.cache.index))
    return _constrain(w.state.replace(
        cache=cache, last=w.tokens, position=state.position + 1, done=done,
        column=state.column + running, slot_steps=state.slot_steps + S), mesh)


def _waiting(state: SamplerState) -> jax.Array:
    return state.admitted < state.rows


def _running(state: SamplerState) -> jax.Array:
    return ~jnp.all(state.done) | _waiting(state)


def _admit_now(state: SamplerState) -> jax.Array:
    """Rows wait and enough slots are free: `admit_rows`, or all the remaining rows."""
    need = jnp.minimum(state.admit_rows, state.rows - state.admitted)
    return _waiting(state) & (jnp.sum(state.done) >= need)


def _fits(state: SamplerState, slots: int) -> jax.Array:
    """No row waits and at most `slots` slots still run."""
    return ~_waiting(state) & (jnp.sum(~state.done) <= slots)


# Halvings of the decode slots where `rollout.shrink` is None and the sampler runs on CPU:
# the demo's training rollout (128 slots, completions of 44 tokens on average, up to 80), its
# decode loop in one process, rounds interleaved (2026-12-03, 2-core Xeon, medians of 11):
# 648 ms without halvings, 470 with one, 429 with two, 427 with three (slot-steps 8,448 ->
# 6,272 -> 5,664 -> 5,552; experiments/NOTES_sampling.md). GPU and TPU keep 0 until measured
# there: a halving gathers the cache once, and their decode steps cost little more at twice
# the rows.
CPU_SHRINK = 2


def resolve_shrink(shrink: Optional[int], platform: Optional[str] = None) -> int:
    """Halvings of the decode slots (`decode(shrink=...)`): `shrink` as given (an int >= 0), or
    for None `CPU_SHRINK` when `platform` (default: JAX's default backend) is "cpu", else 0."""
    if shrink is None:
        return CPU_SHRINK if (platform or jax.default_backend()) == "cpu" else 0
    if isinstance(shrink, bool) or not isinstance(shrink, (int, np.integer)) or shrink < 0:
        raise ValueError(f"shrink must be None or an int >= 0 (halvings of the slots), got "
                         f"{shrink!r}")
    return int(shrink)


def shrink_sizes(slots: int, halvings: int, mesh=None) -> Tuple[int, ...]:
    """The slot counts `decode(shrink=halvings)` passes through after `slots`: up to `halvings`
    halvings, while the count stays whole and (with a mesh) splits evenly over its row
    devices."""
    unit = parallel.row_devices(mesh)
    sizes, n = [], int(slots)
    while len(sizes) < halvings and n % 2 == 0 and (n // 2) % unit == 0:
        n //= 2
        sizes.append(n)
    return tuple(sizes)


def compact(state: SamplerState, slots: int, mesh=None) -> SamplerState:
    """The state on `slots` (static) slots: the running ones first, then ended ones, each in slot
    order; the caller makes sure at most `slots` run. Every per-slot array (the cache's rows
    included) is gathered; the per-row buffers are untouched, so each row's tokens do not
    change. Pure."""
    keep = jnp.argsort(state.done.astype(jnp.int32), stable=True)[:slots]  # [slots]
    take = lambda x: x[keep]
    c = state.cache
    cache = c.replace(k=tuple(map(take, c.k)), v=tuple(map(take, c.v)), valid=take(c.valid),
                      index=take(c.index))
    return _constrain(state.replace(cache=cache, row=take(state.row), column=take(state.column),
                                    last=take(state.last), position=take(state.position),
                                    done=take(state.done)), mesh)


def decode(weights: qwen3.InferenceWeights, state: SamplerState, *, config: qwen3.Qwen3Config,
           settings: SamplingConfig, mesh=None, shrink: int = 0) -> SamplerState:
    """`decode_step` in a `jax.lax.while_loop` until every row has ended (EOS or `limit`); with
    waiting rows (S < B), whenever `admit_rows` slots are free the next rows are admitted
    (`admit`) before the next step (`_refilling`).

    shrink (static): halvings of the slots. Once no row waits and at most half the slots run,
    the loop ends, the running slots move into half as many (`compact`) and a loop over those
    goes on, up to `shrink` times (`shrink_sizes`): rows that ended stop costing decode steps.
    Each row's tokens and log-probs are the same (up to float rounding of the batch's matmuls);
    `slot_steps` counts the smaller steps. Each halving is one more loop body to compile."""
    step = functools.partial(decode_step, weights, config=config, settings=settings, mesh=mesh)
    refill = functools.partial(admit, weights, config=config, settings=settings,
                               count=state.admit_rows, mesh=mesh)
    refills = state.slots < state.rows  # else nothing ever waits: plain steps
    state = _constrain(state, mesh)
    for n in shrink_sizes(state.slots, shrink, mesh):
        stop = functools.partial(_fits, slots=n)
        state = (_refilling(step, refill, state, stop, mesh) if refills else
                 jax.lax.while_loop(lambda s: _running(s) & ~stop(s), step, state))
        state = compact(state, n, mesh)
        refills = False  # rows wait no more once a stage ends
    if refills:
        return _refilling(step, refill, state, lambda s: jnp.bool_(False), mesh)
    return jax.lax.while_loop(_running, step, state)


def _refilling(step, refill, state: SamplerState, stop, mesh) -> SamplerState:
    """Decode steps until `stop(state)` or every row has ended; whenever `_admit_now`, `refill`
    first (admission takes precedence over a step). The steps run in a loop of their own, and the
    conditional (admit or not) runs once per time that loop stops, not at every step: with the
    conditional in the steps' loop body, XLA gave its branches copies of the loop state, every
    layer's whole cache among them."""
    steps = lambda s: jax.lax.while_loop(  # noqa: E731
        lambda s: _running(s) & ~stop(s) & ~_admit_now(s), step, s)
    admit_due = lambda s: jax.lax.cond(  # noqa: E731
        _admit_now(s), lambda s: _constrain(refill(s), mesh), lambda s: s, s)
    return jax.lax.while_loop(lambda s: _running(s) & ~stop(s),
                              lambda s: admit_due(steps(s)), state)


def finish(state: SamplerState) -> SampleOutput:
    """The loop state as a `SampleOutput` (all N columns)."""
    lengths = jnp.sum(state.mask, axis=-1)
    return SampleOutput(tokens=state.tokens, mask=state.mask, logps=state.logps,
                        lengths=lengths, finished=state.finished,
                        num_steps=jnp.max(lengths), sampled_logps=state.sampled_logps,
                        slot_steps=state.slot_steps)


def prepare_weights(params: Params, config: qwen3.Qwen3Config, *, lora: Optional[Params] = None,
                    lora_scale=1.0, merge_lora: bool = False, decode_attention=None,
                    mesh=None, matmul=None, gather: bool = False) -> qwen3.InferenceWeights:
    """`qwen3.inference_weights` for the sampler; with a `mesh` (static), laid out for its tensor
    size and placed as `parallel.inference_shardings` (tensor-parallel shards used in place by
    every decode step; over "fsdp" split as the base parameters, or with `gather` whole: see
    `parallel.gather_weights`). decode_attention None: the default for
    the backend (`qwen3.default_decode_attention`); "pallas" (a GPU kernel) runs on each
    device's rows and kv heads of a mesh (`cache_attention.attend_pallas`). matmul: see
    `qwen3.inference_weights` (None: `qwen3.default_matmul`, the C++ kernel on CPU in float32
    without a mesh)."""
    devices = 1 if mesh is None else int(mesh.devices.size)
    if decode_attention is None:
        decode_attention = qwen3.default_decode_attention(
            devices=devices, dtype=params["embed_tokens"]["embedding"].dtype)
    tensor = parallel.axis_size(mesh, parallel.TENSOR)
    weights = qwen3.inference_weights(params, config, lora=lora, lora_scale=lora_scale,
                                      merge_lora=merge_lora, decode_attention=decode_attention,
                                      tensor=tensor, mesh=mesh, matmul=matmul)
    if mesh is not None:
        weights = jax.lax.with_sharding_constraint(
            weights, parallel.inference_shardings(weights, mesh, gathered=gather))
    return weights


# Compiled entry points of `generate` (module level, so their caches live as long as the process).
prepare_weights_jit = jax.jit(prepare_weights,
                              static_argnames=("config", "merge_lora", "decode_attention", "mesh",
                                               "matmul", "gather"))
prefill_jit = jax.jit(prefill, static_argnames=("config", "settings", "mesh", "group_size", "slots",
                                                "admit_rows"))
decode_jit = jax.jit(decode, static_argnames=("config", "settings", "mesh", "shrink"),
                     donate_argnames="state")
finish_jit = jax.jit(finish)


@contextlib.contextmanager
def _shrinking_donation(shrink: int):
    """Lowering `decode_jit` with shrink > 0: its output state has fewer slots than the donated
    input, so the slot-shaped buffers (the cache, its masks and indices) have no output to take
    over and jax warns "Some donated buffers were not usable". Expected there (the row-shaped
    buffers, tokens and log-probs, are still taken over), so silenced for that call only."""
    if not shrink:
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
        yield


# --------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------


def _eos_tuple(eos_id) -> Tuple[int, ...]:
    if eos_id is None:
        return ()
    if isinstance(eos_id, (int, np.integer)):
        return (int(eos_id),)
    return tuple(int(e) for e in eos_id)


def generate(params: Params, prompt_ids, prompt_mask, *, config: qwen3.Qwen3Config, rng: jax.Array,
             max_new_tokens: int, lora: Optional[Params] = None, lora_scale: float = 1.0,
             temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
             eos_id: Union[None, int, Sequence[int]] = None, pad_id: int = 0,
             merge_lora: bool = False, bucket: bool = True, top_k: int = 0,
             min_p: float = 0.0, mesh=None, group_size: int = 1, max_batch: Optional[int] = None,
             admit_rows: Optional[int] = None,
             decode_attention: Optional[str] = None, matmul: Optional[str] = None,
             shrink: int = 0, store=None,
             devices: Optional[Sequence[jax.Device]] = None,
             gather_weights: bool = False) -> SampleOutput:
    """Samples completions of left-padded prompts.

    Args:
      params: base parameter tree (`arca_jax.qwen3`); activations and cache follow its embedding
        dtype (bfloat16 for rollouts, float32 for exact tests).
      prompt_ids, prompt_mask: [B, P] int, left-padded; positions follow cumsum(mask) - 1, as the
        model's forward. Every row needs at least one real token.
      config: the model's `Qwen3Config`, or `Qwen3MoeConfig` for a mixture of experts (every
        token routed at prefill and decode as in the training forward; attention adapters
        only; on a mesh the experts run expert-parallel over "fsdp", `qwen3.moe.mixture`).
      rng: a PRNG key; the same key gives the same samples.
      max_new_tokens: N, columns of the result.
      lora, lora_scale: an adapter tree (`arca_jax.lora`) and its scaling (alpha / rank).
      temperature, top_k, top_p, min_p, greedy: see `SamplingConfig`.
      eos_id: a token id or several (Qwen3 chat models end with either of two); None: no stopping.
      pad_id: written after a row's EOS.
      merge_lora: sample from W + lora_scale * A B (one matmul per projection) instead of the
        low-rank side path; the same tokens up to float rounding.
      bucket: pad P up to a power of two (at least 16) and N up to a multiple of 16
        (`prompts.new_token_columns`) so that nearby shapes share one compiled program; the loop
        still stops at max_new_tokens, and the result is [B, max_new_tokens].
      mesh: a ("data", "fsdp", "tensor") mesh (`parallel.make_mesh`), or None for the arrays'
        own placement. Rows are split as the train step's batch (over "data" and "fsdp"); with
        tensor > 1 each device holds its heads' and MLP units' slice of every kernel (used in
        place at every step: no weight gathering over "tensor") and its kv heads of the cache.
      gather_weights: with a mesh, gather the weights over "fsdp" once for this call instead of
        each layer's at every decode step (`parallel.gather_weights`); the same tokens.
      group_size: G > 1 when rows come in groups of G consecutive copies of one prompt (GRPO
        groups, pass@k; `prompts.repeat_groups`): each prompt is prefilled once for its G rows (see
        `prefill`). The tokens and log-probs equal those of group_size=1 for the same key.
      max_batch: S, rows decoded at once (None or >= B: all). With S < B the cache holds S rows;
        when a row ends, the next waiting row takes its slot (continuous refill: `admit_rows` at
        a time, default S / 8), so no slot idles while rows wait. Each row's tokens and log-probs
        are those of a one-batch run with the same key (up to float rounding of the batch's
        matmuls). A multiple of group_size; with a mesh, of the devices the rows split over.
      admit_rows: see `prefill`.
      decode_attention: how decode steps read the cache (`qwen3.InferenceWeights`; None: the
        backend's default, `qwen3.default_decode_attention`).
      matmul: how the projections multiply ("xla", "cpu-kernel"; None: `qwen3.default_matmul`,
        the C++ kernel over packed weights on CPU in float32 without a mesh).
      shrink: halvings of the slots as rows end (0: none). Once no row waits and at most half the
        slots still run, the running rows go on in half as many slots, up to `shrink` times
        (`decode`): rows that ended early stop costing decode steps. The same tokens and
        log-probs (up to float rounding of the batch's matmuls). Each halving compiles one more
        decode loop (`experiments/NOTES_sampling.md`, "Shrinking the slots").
      store: an `arca_jax.trainer.executables.ExecutableStore` (no mesh): the programs are
        loaded from it without tracing, or compiled and written to it; None: jit as usual.
      devices: several devices (no mesh): each samples its own contiguous share of the rows
        (whole groups) in its own loop, all at once (`arca_jax.replicas`: on a CPU host with
        two devices per core, the cores decode at once); the same tokens as one device, the
        output on devices[0]; `max_batch` counts the slots of all devices, `admit_rows` those
        of one. None or one device: the arrays' own.

    Returns:
      SampleOutput(tokens, mask, logps, sampled_logps [B, N], lengths [B], finished [B],
      num_steps [], slot_steps []).
    """
    settings = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              greedy=greedy, eos_ids=_eos_tuple(eos_id), pad_id=pad_id,
                              top_k=top_k, min_p=min_p)
    if not isinstance(shrink, (int, np.integer)) or isinstance(shrink, bool) or shrink < 0:
        raise ValueError(f"shrink must be an int >= 0 (halvings of the slots), got {shrink!r}")
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    prompt_mask = jnp.asarray(prompt_mask, jnp.int32)
    if prompt_ids.ndim != 2 or prompt_ids.shape != prompt_mask.shape:
        raise ValueError(f"prompt_ids {prompt_ids.shape} and prompt_mask {prompt_mask.shape} must "
                         "both be [B, P]")
    if bucket:
        width = bucket_size(prompt_ids.shape[1], 16)
        if width != prompt_ids.shape[1]:
            prompt_ids, prompt_mask = pad_prompts(prompt_ids, prompt_mask, width, pad_id)
        settings = dataclasses.replace(settings,
                                       max_new_tokens=new_token_columns(max_new_tokens))
    if mesh is not None:
        parallel.check_tensor(config, parallel.axis_size(mesh, parallel.TENSOR))
        rows = jax.sharding.NamedSharding(mesh, parallel.batch_spec(prompt_ids.shape[0], mesh))
        prompt_ids, prompt_mask = jax.device_put((prompt_ids, prompt_mask), rows)
    if store is not None and mesh is not None:
        raise ValueError("generate: a store holds the programs of sampling without a mesh; "
                         "sample on a mesh without one")
    if devices is not None and len(devices) > 1 and mesh is not None:
        raise ValueError("generate: pass a mesh or several devices, not both")

    def run(name, jitted, args, kwargs, static):
        if store is None:
            return jitted(*args, **kwargs, **static)
        return store.compiled(name, jitted, args, kwargs, static)(*args, **kwargs)

    weights = run("prepare_weights", prepare_weights_jit, (params,),
                  dict(lora=lora, lora_scale=jnp.asarray(lora_scale, jnp.float32)),
                  dict(config=config, merge_lora=bool(merge_lora and lora is not None),
                       decode_attention=decode_attention, mesh=mesh, matmul=matmul,
                       gather=bool(gather_weights and mesh is not None)))
    B = prompt_ids.shape[0]
    slots = None if max_batch is None or int(max_batch) >= B else int(max_batch)
    limit = jnp.asarray(max_new_tokens, jnp.int32)
    if devices is not None and len(devices) > 1:
        from arca_jax import replicas
        out = replicas.sample(run, weights, prompt_ids, prompt_mask, rng=rng, limit=limit,
                              devices=devices, config=config, settings=settings,
                              group_size=int(group_size), slots=slots,
                              admit_rows=None if slots is None else admit_rows,
                              shrink=int(shrink))
    else:
        state = run("prefill", prefill_jit, (weights, prompt_ids, prompt_mask),
                    dict(rng=rng, limit=limit),
                    dict(config=config, settings=settings, mesh=mesh, group_size=int(group_size),
                         slots=slots, admit_rows=None if slots is None else admit_rows))
        with _shrinking_donation(int(shrink)):
            state = run("decode", decode_jit, (weights, state), {},
                        dict(config=config, settings=settings, mesh=mesh, shrink=int(shrink)))
        out = run("finish", finish_jit, (state,), {}, {})
    if settings.max_new_tokens != max_new_tokens:
        out = out.replace(tokens=out.tokens[:, :max_new_tokens], mask=out.mask[:, :max_new_tokens],
                          logps=out.logps[:, :max_new_tokens],
                          sampled_logps=out.sampled_logps[:, :max_new_tokens])
    return out
