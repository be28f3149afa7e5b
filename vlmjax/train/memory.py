"""Will it fit? The bytes per device of a VLM training run, computed without allocating anything.

    print(memory.report(config, num_devices=256))      # `vlmjax summarize --config FILE --devices 256`

For each setup (full finetuning, the finetune stage, LoRA, QLoRA int8 and int4) on the config's mesh and sharding
rules, per device:
  parameters   the trained and the frozen ones at their shard shape (`jax.eval_shape` of the init, the logical
               rules on an `AbstractMesh`); QLoRA's base layers at their stored bytes (int8 or packed int4 values
               and their scales, `quantize_params` under `jax.eval_shape`), placed as XLA places them when the
               trainer quantizes the base (`frozen_bytes`).
  optimizer    `jax.eval_shape(optimizer.init, trained)` of the stage's own optimizer (`optim.make_optimizer`),
               each leaf that mirrors a parameter sharded like it, the rest replicated (as `state.create_sharded`).
  gradients    the trained parameters' shapes and dtype (float32 master weights), sharded like them.
  activations  what JAX keeps from one train step's forward pass for its backward pass: the residuals of
               `jax.vjp` of the stage's loss with respect to the trained parameters, traced (`jax.make_jaxpr`) on
               one device's part of the batch (train.batch_size over the mesh's data x fsdp ways, data.length
               tokens with the image's: one image a row, LLaVA-NeXT's at its most tiles, Qwen2.5-VL's with as many
               patches as a whole row of image tokens merges from), through the standard JAX path a GPU or TPU
               runs (`runtime.cpu_tuning(
               False)`). Under a remat policy the scanned layers keep only what it saves (for 'full', each layer's
               input); the backward then recomputes one layer at a time, so the largest layer's other residuals
               (those of the policy 'none', its gathered compute-dtype kernels included) are added once, and so
               are the cotangents of one layer's residuals, which its backward holds.
Checked against XLA's buffer assignment for a tiny step (tests/train/test_memory.py): within 1.5x for remat 'full'
and 'none'.
"""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec

from vlmjax import runtime
from vlmjax.models import lora, quant
from vlmjax.models.vlm import VLM, Patches, Tiles, VLMConfig
from vlmjax.parallel import mesh as mesh_lib
from vlmjax.train import adapters, optim, state as state_lib

# (row name, training stage, lora.quantize) of the table.
SETUPS = (("full", "full", ""), ("finetune", "finetune", ""), ("lora", "lora", ""), ("qlora int8", "lora", "int8"),
          ("qlora int4", "lora", "int4"))


@dataclasses.dataclass(frozen=True)
class Footprint:
  """Bytes per device of one setup; trained: the number of trained parameters (all devices)."""

  name: str
  trained: int
  params: int
  optimizer: int
  gradients: int
  activations: int

  @property
  def total(self) -> int:
    return self.params + self.optimizer + self.gradients + self.activations


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a setup trains and keeps, as ShapeDtypeStructs with their NamedShardings on an AbstractMesh.

  trained / trained_shardings: the parameters the state holds and the optimizer updates (a `full` or `finetune`
  state holds every parameter; `trained` is then its trained groups). frozen: the rest (QLoRA: its layers as
  `quant.QuantizedKernel`s); frozen_float_shardings: the shardings of the frozen parameters as floats; scheme: QLoRA's
  ("" for none).
  """

  model_config: VLMConfig
  stage: str
  scheme: str
  state_params: dict
  state_shardings: dict
  trained: dict
  trained_shardings: dict
  frozen: dict
  frozen_float_shardings: dict


def plan(config: ml_collections.ConfigDict, mesh: AbstractMesh, stage: str, scheme: str = "") -> Plan:
  """The abstract parameters of `stage` (with QLoRA's `scheme` for the lora stage) on `mesh`."""
  model_config = VLMConfig.from_dict(config.model)
  if stage == "lora":
    model_config = adapters.adapted(model_config, adapters.lora_config(config))
  rules = mesh_lib.normalize_rules(config.sharding_rules)
  boxed = _boxed_params(model_config)
  params, shardings = nn.meta.unbox(boxed), mesh_lib.param_shardings(boxed, mesh, rules)
  trained, frozen = optim.split_trained(params, stage)
  trained_shardings, frozen_shardings = optim.split_trained(shardings, stage)
  if stage == "lora":  # the state holds only the adapters and the projector
    state_params, state_shardings = trained, trained_shardings
    frozen = _stored_base(frozen, model_config, scheme)
  else:  # the state holds every parameter; the frozen groups keep no optimizer state
    state_params, state_shardings = params, shardings
  return Plan(model_config, stage, scheme, state_params, state_shardings, trained, trained_shardings, frozen,
              frozen_shardings)


@functools.lru_cache(maxsize=8)
def _boxed_params(model_config: VLMConfig) -> dict:
  """The VLM's parameters as ShapeDtypeStructs boxed with their logical axes (kept: every setup and trace asks)."""
  return jax.eval_shape(lambda: VLM(model_config).init(jax.random.key(0), **model_config.example_inputs(1)))["params"]


def _stored_base(frozen: dict, model_config: VLMConfig, scheme: str) -> dict:
  """The lora stage's frozen base as ShapeDtypeStructs, as it holds it (`adapters.stored_base`): kernels in the compute
  dtype, QLoRA's layers as `quant.QuantizedKernel`s."""
  return jax.eval_shape(lambda tree: adapters.stored_base(tree, model_config, scheme), frozen)


def sharded_bytes(tree, shardings) -> int:
  """Bytes on one device of ShapeDtypeStructs (or arrays) placed with `shardings` (the same tree structure)."""
  return sum(math.prod(sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
             for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


def frozen_bytes(frozen, float_shardings) -> int:
  """Bytes on one device of the frozen parameters. A `QuantizedKernel`'s values are split over as many devices as its
  float kernel was, its scales (one per output, or per output and group) over those its output axes were: where the
  trainer quantizes the base under jit (`adapters.trained_and_frozen`), XLA places them so."""
  def pieces(sharding, dims) -> int:
    return math.prod(sharding.mesh.shape[axis] for entry in list(sharding.spec)[dims] if entry is not None
                     for axis in ((entry,) if isinstance(entry, str) else entry))

  def one(leaf, sharding) -> int:
    if not isinstance(leaf, quant.QuantizedKernel):
      return math.prod(sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
    stacked = leaf.values.ndim - (3 if leaf.scheme == "int4" else 2)  # a scanned stack's leading layer axis
    values = leaf.values.size * leaf.values.dtype.itemsize // pieces(sharding, slice(None))
    outputs = slice(stacked + leaf.fan_in, stacked + len(leaf.shape))
    return values + leaf.scales.size * leaf.scales.dtype.itemsize // pieces(sharding, outputs)
  is_kernel = lambda x: isinstance(x, quant.QuantizedKernel)
  return sum(jax.tree.leaves(jax.tree.map(one, frozen, float_shardings, is_leaf=is_kernel)))


def optimizer_state(config: ml_collections.ConfigDict, setup: Plan) -> tuple:
  """(the stage's optimizer state as ShapeDtypeStructs, its shardings): a leaf that mirrors a parameter sharded like
  it, the rest (counts) replicated, as `state.create_sharded` places them."""
  optimizer = optim.make_optimizer(config.optim, setup.state_params, setup.stage, config.train.steps)
  opt_state = jax.eval_shape(optimizer.init, setup.state_params)
  mesh = jax.tree.leaves(setup.state_shardings)[0].mesh
  masked = lambda leaf: isinstance(leaf, optax.MaskedNode)
  shardings = optax.tree_map_params(optimizer, lambda leaf, sharding: leaf if masked(leaf) else sharding, opt_state,
                                    setup.state_shardings, transform_non_params=lambda _: NamedSharding(
                                        mesh, PartitionSpec()), is_leaf=masked)
  return opt_state, shardings


def rows_per_device(config: ml_collections.ConfigDict, mesh: AbstractMesh) -> int:
  """train.batch_size over the mesh's batch ways (data x fsdp), rounded up."""
  ways = math.prod(mesh.shape[axis] for axis in mesh_lib.BATCH_AXES)
  return -(-config.train.batch_size // ways)


def sequence_length(config: ml_collections.ConfigDict, model_config: VLMConfig) -> int:
  """Tokens per row: data.length (image tokens included), or one image and 64 text tokens for a config without."""
  data = config.get("data") or {}
  return data.get("length") or model_config.tokens_per_image + 64


def _local_model(model_config: VLMConfig, tensor: int) -> VLMConfig:
  """The model as one of `tensor` tensor-parallel devices computes its activations: its share of the language
  model's heads, MLP columns and vocabulary, and of the vision tower's MLP columns. (The vision tower's heads are
  kept whole: its head width follows from their number, so its attention is counted unsplit.)"""
  if tensor == 1:
    return model_config
  decoder, vision = model_config.decoder, model_config.vision
  decoder = decoder.replace(num_heads=decoder.num_heads // tensor, num_kv_heads=max(decoder.num_kv_heads // tensor, 1),
                            head_dim=decoder.attention_head_dim, mlp_dim=decoder.mlp_dim // tensor,
                            vocab_size=decoder.vocab_size // tensor)
  return model_config.replace(decoder=decoder, vision=vision.replace(mlp_dim=vision.mlp_dim // tensor),
                              image_token_id=0)


def _image_input(model_config: VLMConfig, rows: int, length: int):
  """The abstract pixel input of `rows` rows of `length` tokens, one image each: float32[rows, H, W, 3]; for
  LLaVA-NeXT `Tiles` of the most tiles an image takes (its base tile and largest pinpoint); for Qwen2.5-VL `Patches`
  of the windows a row's `length` image tokens merge from (the most a row can show)."""
  spec, vision = jax.ShapeDtypeStruct, model_config.vision
  if model_config.qwen_tower:
    windows = -(-length * vision.merge_size**2 // vision.window_patches)  # per row
    patches = rows * windows * vision.window_patches
    return Patches(pixel_values=spec((patches, vision.patch_dim), jnp.float32),
                   patch_positions=spec((patches, 2), jnp.int32), image_ids=spec((patches,), jnp.int32),
                   token_index=spec((rows, length), jnp.int32), token_offsets=spec((rows, length, 3), jnp.int32),
                   token_advance=spec((rows, length), jnp.int32))
  size = vision.image_size
  if model_config.image_grid_pinpoints:
    tiles = 1 + max(height // size * (width // size) for height, width in model_config.image_grid_pinpoints)
    return Tiles(pixel_values=spec((rows * tiles, size, size, 3), jnp.float32),
                 token_index=spec((rows, length), jnp.int32))
  return spec((rows, size, size, 3), jnp.float32)


def _saved_bytes(model_config: VLMConfig, setup: Plan, rows: int, length: int) -> int:
  """Bytes of the residuals `jax.vjp` of the stage's loss keeps for `rows` rows of `length` tokens (one image each)
  on the standard JAX path; inputs (parameters, the batch) and constants are not counted."""
  trained, frozen = optim.split_trained(nn.meta.unbox(_boxed_params(model_config)), setup.stage)
  if setup.stage == "lora":
    # What a quantized layer leaves for the backward pass is its kernel dequantized to the compute dtype, the same
    # bytes in int8 and int4; traced in int8, since a tensor-parallel device's share of a layer (`_local_model`) need
    # not split into int4's groups as the whole layer, which the trainer quantizes, does.
    frozen = _stored_base(frozen, model_config, "int8" if setup.scheme else "")
  spec = jax.ShapeDtypeStruct
  batch = dict(input_ids=spec((rows, length), jnp.int32), pixel_values=_image_input(model_config, rows, length),
               targets=spec((rows, length), jnp.int32), loss_mask=spec((rows, length), jnp.float32))
  if model_config.prefix_lm:
    batch["prefix_lengths"] = spec((rows,), jnp.int32)
  dropout = model_config.decoder.lora is not None and model_config.decoder.lora.dropout > 0

  def backward_of(trained, frozen, batch, key):
    loss = lambda trained: state_lib.vlm_loss(lora.combine(trained, frozen), model_config, batch,
                                              key if dropout else None)[0]
    return jax.vjp(loss, trained)[1]  # a pytree whose leaves are the residuals
  with runtime.cpu_tuning(False):
    closed = jax.make_jaxpr(backward_of)(trained, frozen, batch, spec((2,), jnp.uint32))
  not_saved = set(closed.jaxpr.invars) | set(closed.jaxpr.constvars)
  saved = {var for var in closed.jaxpr.outvars if isinstance(var, jax.extend.core.Var) and var not in not_saved}
  return sum(math.prod(var.aval.shape) * var.aval.dtype.itemsize for var in saved)


def activation_bytes(config: ml_collections.ConfigDict, setup: Plan, mesh: AbstractMesh) -> int:
  """Bytes per device of one train step's activations (see the module docstring).

  Residuals that do not grow with the batch (the compute-dtype copies of kernels that policy 'none' keeps) are
  split over the fsdp ways, as the kernels are; those of the one layer recomputed under remat are counted whole
  (FSDP gathers that layer's weights)."""
  model_config = _local_model(setup.model_config, mesh.shape["tensor"])
  rows, length = rows_per_device(config, mesh), sequence_length(config, setup.model_config)
  saved = _saved_bytes(model_config, setup, rows, length)
  fixed = 2 * saved - _saved_bytes(model_config, setup, 2 * rows, length)  # what does not scale with the rows
  total = saved - fixed + fixed // mesh.shape["fsdp"]
  # The backward recomputes a layer (under remat: what the policy did not save) and holds the cotangents of its
  # residuals, about as many bytes as the residuals of a layer under 'none' beyond its input (those of 'full').
  one_layer = 0
  for tower in ("decoder", "vision"):
    tower_config = getattr(model_config, tower)
    traced = {policy: saved if policy == tower_config.remat_policy else _saved_bytes(
        model_config.replace(**{tower: tower_config.replace(remat_policy=policy)}), setup, rows, length)
              for policy in ("none", "full")}
    recomputed, cotangents = traced["none"] - saved, traced["none"] - traced["full"]
    one_layer = max(one_layer, (recomputed + cotangents) // tower_config.depth)
  return total + one_layer


def footprint(config: ml_collections.ConfigDict, num_devices: int, name: str, stage: str,
              scheme: str = "") -> Footprint:
  """The bytes per device of one setup on `num_devices` devices (config.mesh resolved for them)."""
  mesh = mesh_lib.abstract_mesh(config.mesh, num_devices)
  setup = plan(config, mesh, stage, scheme)
  trained = sharded_bytes(setup.trained, setup.trained_shardings)
  if stage == "lora":  # the state's parameters (those it trains) and the frozen base beside it
    params = trained + frozen_bytes(setup.frozen, setup.frozen_float_shardings)
  else:
    params = sharded_bytes(setup.state_params, setup.state_shardings)
  opt_state, opt_shardings = optimizer_state(config, setup)
  return Footprint(name=name, trained=sum(leaf.size for leaf in jax.tree.leaves(setup.trained)), params=params,
                   optimizer=sharded_bytes(opt_state, opt_shardings), gradients=trained,
                   activations=activation_bytes(config, setup, mesh))


def human(size: int) -> str:
  """Bytes in GiB, MiB or KiB: 3.29 GiB."""
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if size >= scale:
      return f"{size / scale:.2f} {unit}"
  return f"{size} B"


def report(config: ml_collections.ConfigDict, num_devices: int) -> str:
  """The plain-text memory table of every setup the config can run (the LoRA rows need its `lora` section)."""
  mesh = mesh_lib.abstract_mesh(config.mesh, num_devices)
  model_config = VLMConfig.from_dict(config.model)
  rows, length = rows_per_device(config, mesh), sequence_length(config, model_config)
  ways = math.prod(mesh.shape[axis] for axis in mesh_lib.BATCH_AXES)
  setups = [setup for setup in SETUPS if setup[1] != "lora" or "lora" in config]
  footprints = [footprint(config, num_devices, *setup) for setup in setups]
  lines = [f"memory per device, {num_devices} devices ({' x '.join(f'{a}={s}' for a, s in mesh.shape.items())}): "
           f"activations of one step of {rows} row(s) x {length} tokens per device, remat "
           f"'{model_config.decoder.remat_policy}', {model_config.decoder.dtype} compute",
           f"{'setup':<12}{'trained':>10}{'parameters':>13}{'optimizer':>13}{'gradients':>13}{'activations':>13}"
           f"{'total':>13}"]
  for row in footprints:
    lines.append(f"{row.name:<12}{row.trained / 1e9:>9.2f}B{human(row.params):>13}{human(row.optimizer):>13}"
                 f"{human(row.gradients):>13}{human(row.activations):>13}{human(row.total):>13}")
  if config.train.batch_size % ways:
    lines.append(f"note: train.batch_size={config.train.batch_size} does not split over the {ways} batch ways (data x "
                 f"fsdp); the step would refuse it. Activations are counted at {rows} row(s) per device.")
  if "lora" in config:
    lines.append(f"lora: rank {config.lora.rank} on {config.lora.targets!r}, dropout {config.lora.dropout}; "
                 f"the state holds the adapters and the projector, the frozen base sits beside it")
  lines.append("activations: the residuals of the loss's backward pass (jax.vjp on the GPU/TPU path, where "
               "jax.nn.dot_product_attention's XLA implementation keeps each layer's float32 softmax and its "
               "probabilities [rows, heads, T, T]), plus one layer's recomputed residuals (under remat) and their "
               "cotangents; not counted: XLA's workspace")
  return "\n".join(lines)
