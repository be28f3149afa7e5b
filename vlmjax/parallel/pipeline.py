"""GPipe over the `pipeline` mesh axis: the decoder's stacked layers as P stages, the batch as M microbatches.

    x = pipeline.run(stage_fn, layer_params, x, rows, stages=P, microbatches=M, axes=(batch, length, embed))

The layers' parameters stay the stack `nn.scan` makes, leaves [L, ...] with the logical axis `layers`, which the rules
map onto the `pipeline` mesh axis: the devices of stage s hold layers s·L/P ... (s+1)·L/P - 1, and a checkpoint is the
same parameter tree on any mesh. Here the stack is viewed as [P, L/P, ...] (a reshape that moves no data) and the P
stages run at once, `jax.vmap` over that axis with `spmd_axis_name="pipeline"`: each stage on its own devices, split
further over data, fsdp and tensor inside. This is MaxText's layers/pipeline.py without its circular repeats.

The schedule: the batch splits into M microbatches of b = B/M rows; in iteration i (of M + P - 1) stage 0 takes
microbatch i and every other stage the output its predecessor made in iteration i - 1 (a buffer [P, b, T, D] rotated
by one stage: a collective permute between neighbours), so stage s works on microbatch i - s. The last stage's
outputs are gathered as they come out. Of the P·(M+P-1) stage-iterations P·(P-1) have no microbatch to work on: the
bubble, (P-1)/(M+P-1) of the time. M need not be a multiple of P; below P most of the time is bubble.

The backward pass is `jax.grad` of the iterations' `lax.scan`: the same schedule run in reverse. Each stage is
rematerialized (`jax.checkpoint`), so an iteration keeps only its stages' inputs, [P, b, T, D], and the backward pass
recomputes one stage's layers at a time (under the layers' own remat policy) instead of keeping M + P - 1 iterations
of every layer's activations.
"""

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

MESH_AXIS = "pipeline"
ACT_STAGE = "activation_stage"  # the logical name of a buffer's stage axis (the rules map it onto MESH_AXIS)

# stage_fn(stage_params, x, rows, rng) -> x: one stage's layers on one microbatch (see `run`).
StageFn = Callable[[Any, jax.Array, Any, jax.Array | None], jax.Array]


def bubble_fraction(stages: int, microbatches: int) -> float:
  """The share of stage-iterations that idle: (P - 1) / (M + P - 1)."""
  return (stages - 1) / (microbatches + stages - 1)


def check(*, depth: int, num_heads: int, num_kv_heads: int, scan_layers: bool, mesh_sizes: Mapping[str, int],
          batch_size: int, microbatches: int) -> None:
  """Raises ValueError, naming the config keys and their numbers, for a plan the mesh cannot run: heads that do not
  split over mesh.tensor, decoder layers that do not split into mesh.pipeline stages, a batch that does not split
  into train.microbatches microbatches whose rows split over the batch axes (data x fsdp). Runs before any compile.

  mesh_sizes: the resolved mesh (`mesh.mesh_shape`).
  """
  tensor, stages = mesh_sizes["tensor"], mesh_sizes[MESH_AXIS]
  for key, heads in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
    if heads % tensor:
      raise ValueError(f"model.decoder.{key}={heads} does not split over mesh.tensor={tensor} ({heads} is not a "
                       f"multiple of {tensor}): make mesh.tensor a divisor of {heads}")
  if microbatches < 1:
    raise ValueError(f"train.microbatches={microbatches}: it is a count of microbatches, at least 1")
  if stages == 1:
    if microbatches != 1:
      raise ValueError(f"train.microbatches={microbatches} splits the batch for a pipeline, and mesh.pipeline=1 has "
                       f"none: set mesh.pipeline > 1, or leave train.microbatches at 1 (optim.accumulation_steps "
                       f"splits a batch without a pipeline)")
    return
  if not scan_layers:
    raise ValueError(f"mesh.pipeline={stages} splits the decoder's stacked layers into stages: set "
                     f"model.scan_layers=True")
  if depth % stages:
    raise ValueError(f"model.decoder.depth={depth} layers do not split into mesh.pipeline={stages} stages ({depth} is "
                     f"not a multiple of {stages}): change mesh.pipeline or the depth")
  if batch_size % microbatches:
    raise ValueError(f"train.batch_size={batch_size} does not split into train.microbatches={microbatches} "
                     f"microbatches ({batch_size} is not a multiple of {microbatches})")
  ways = mesh_sizes["data"] * mesh_sizes["fsdp"]
  rows = batch_size // microbatches
  if rows % ways:
    raise ValueError(f"a microbatch of {rows} rows (train.batch_size={batch_size} / train.microbatches="
                     f"{microbatches}) does not split over the {ways} batch ways (mesh.data={mesh_sizes['data']} x "
                     f"mesh.fsdp={mesh_sizes['fsdp']}): make train.batch_size a multiple of {microbatches * ways}, or "
                     f"use fewer microbatches")


def split_microbatches(x: jax.Array, microbatches: int) -> jax.Array:
  """[B, ...] -> [M, B/M, ...], microbatch m holding rows m, M + m, 2M + m, ...: each device's contiguous block of
  rows (the batch is split over data x fsdp) holds its share of every microbatch, so nothing moves."""
  return jnp.swapaxes(x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]), 0, 1)


def merge_microbatches(x: jax.Array) -> jax.Array:
  """The inverse of `split_microbatches`: [M, B/M, ...] -> [B, ...]."""
  return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def run(stage_fn: StageFn, layer_params: Any, x: jax.Array, rows: Any, *, stages: int, microbatches: int,
        axes: tuple[str, ...], rng: jax.Array | None = None) -> jax.Array:
  """The stacked layers over `x` as `stages` pipeline stages over `microbatches` microbatches (the module docstring).

  Args:
    stage_fn: (stage_params: leaves [L/P, ...], x: float[b, T, D], rows: one microbatch's `rows`, rng: a key or None)
      -> float[b, T, D]: one stage's layers on one microbatch.
    layer_params: the stack's parameters, leaves [L, ...].
    x: float[B, T, D], the first layer's input.
    rows: a pytree of arrays [B, ...] that go with the rows into every stage (the attention mask, positions).
    axes: the logical axes of x's dimensions, for its buffers' sharding.
    rng: a key for dropout in the stages, or None; each stage of each iteration folds in its own.
  Returns:
    float[B, T, D], the last layer's output.
  """
  P, M = stages, microbatches
  stage_params = jax.tree.map(lambda p: p.reshape(P, p.shape[0] // P, *p.shape[1:]), layer_params)
  inputs = nn.with_logical_constraint(split_microbatches(x, M), (None, *axes))  # [M, b, T, D]
  microbatch_rows = jax.tree.map(lambda a: split_microbatches(a, M), rows)
  stage_index = jnp.arange(P)
  is_first = (stage_index == 0).reshape(P, *(1,) * (x.ndim))
  on_stages = lambda buffer: nn.with_logical_constraint(buffer, (ACT_STAGE, *axes))  # [P, b, T, D]
  # prevent_cse=False: under the scan below nothing merges the recomputation into the forward pass.
  run_stages = jax.vmap(jax.checkpoint(stage_fn, prevent_cse=False), spmd_axis_name=MESH_AXIS)

  def iteration(carry, i):
    passed, outputs = carry  # passed [P, b, T, D]: stage s - 1's output of the last iteration at s
    microbatch = jnp.clip(i - stage_index, 0, M - 1)  # [P]; clipped in the bubble, whose results are dropped
    first = jax.lax.dynamic_index_in_dim(inputs, jnp.minimum(i, M - 1), keepdims=False)  # [b, T, D]
    stage_inputs = on_stages(jnp.where(is_first, first[None], passed))
    stage_rows = jax.tree.map(lambda a: a[microbatch], microbatch_rows)  # leaves [P, b, ...]
    keys = None if rng is None else jax.vmap(lambda s: jax.random.fold_in(rng, i * P + s))(stage_index)
    out = on_stages(run_stages(stage_params, stage_inputs, stage_rows, keys))
    # The last stage finishes microbatch i - (P - 1); before that it writes bubbles into slot 0, overwritten later.
    outputs = jax.lax.dynamic_update_index_in_dim(outputs, out[P - 1], jnp.maximum(i - (P - 1), 0), 0)
    return (on_stages(jnp.roll(out, 1, axis=0)), outputs), None

  start = (on_stages(jnp.zeros((P, *inputs.shape[1:]), x.dtype)), jnp.zeros_like(inputs))
  (_, outputs), _ = jax.lax.scan(iteration, start, jnp.arange(M + P - 1))
  return merge_microbatches(nn.with_logical_constraint(outputs, (None, *axes)))
