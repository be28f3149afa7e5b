"""One device mesh and one table of logical-axis rules, used by training, inference and serving alike.

Model code names the axes of every parameter and large activation logically (`embed`, `mlp`, `heads`, ...,
see `vlmjax.models.layers`); the rules below map those names onto the mesh axes `pipeline`, `data`, `fsdp` and
`tensor` (`pipeline.py` runs the decoder's layers as stages over the first).
The same model runs on 1 device or N: only `config.mesh` (and, rarely, `config.sharding_rules`) changes.
"""

import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

# The pipeline axis first: its neighbours exchange one microbatch's activations per iteration, the least traffic of
# the four, so it spans the devices furthest apart (jax.make_mesh gives the last axes the closest ones).
MESH_AXES = ("pipeline", "data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # a global batch is split over both: fsdp is data parallelism for activations

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# The one rules table (logical name -> mesh axes). Configs set `config.sharding_rules = LOGICAL_RULES`.
LOGICAL_RULES: Rules = (
    # Weights: fully sharded over fsdp along the model width, Megatron-style over tensor along heads/MLP/vocab.
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("layers", "pipeline"),  # the decoder's stacked layers: stage s holds its consecutive block of them
    ("encoder_layers", None),  # the ViT's and CLIP text tower's: whole on every stage (they run before the pipeline)
    # Activations: batch over data and fsdp, the tensor-parallel dimension over tensor.
    ("activation_batch", BATCH_AXES),
    ("activation_stage", "pipeline"),  # the pipeline's buffers, one microbatch per stage
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    # KV cache: rows over data and fsdp, heads over tensor.
    ("cache_batch", BATCH_AXES),
    ("cache_length", None),
    ("cache_kv_heads", "tensor"),
)


def normalize_rules(rules) -> Rules:
  """Rules as a config holds them (lists after a JSON round trip) -> tuples, as flax expects."""
  def axes(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value
  return tuple((name, axes(value)) for name, value in rules)


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Resolves `mesh.pipeline/data/fsdp/tensor` (one of them may be -1: "the rest of the devices") for `num_devices`."""
  unknown = sorted(set(mesh_config) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"mesh: unknown axes {unknown}; the mesh axes are {list(MESH_AXES)}")
  sizes = {axis: int(mesh_config.get(axis, 1)) for axis in MESH_AXES}
  free = [axis for axis, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ValueError(f"mesh: only one axis may be -1, got {free}")
  for axis, size in sizes.items():
    if size == 0 or size < -1:
      raise ValueError(f"mesh.{axis}={size}: sizes are positive, or -1 for the rest of the devices")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f"mesh: {num_devices} devices cannot be split as {describe(sizes)} "
                       f"({num_devices} is not a multiple of {fixed})")
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(f"mesh: {describe(sizes)} uses {fixed} devices but there are {num_devices}; make the product "
                     f"of mesh.data, mesh.fsdp, mesh.tensor and mesh.pipeline equal {num_devices} or set one of them "
                     f"to -1")
  return sizes


def describe(sizes: Mapping[str, int]) -> str:
  """'data=2 x fsdp=2 x tensor=2', with the pipeline axis only when it is used (not 1): as users write meshes."""
  return " x ".join(f"{axis}={size}" for axis, size in sizes.items() if axis != "pipeline" or size != 1)


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A Mesh over `devices` (default: every device of every process) with axes MESH_AXES."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(tuple(sizes.values()), MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def abstract_mesh(mesh_config: Mapping[str, int], num_devices: int) -> AbstractMesh:
  """A device-free mesh of the same shape, for planning shardings without the devices (`vlmjax summarize`)."""
  sizes = mesh_shape(mesh_config, num_devices)
  return AbstractMesh(tuple(sizes.values()), MESH_AXES)


def mesh_axes(logical_spec: PartitionSpec, rules: Rules) -> PartitionSpec:
  """Logical PartitionSpec -> mesh PartitionSpec under `rules`."""
  return nn.logical_to_mesh_axes(tuple(logical_spec), rules)


def logical_shardings(abstract_tree: Any, logical_specs: Any, mesh: Mesh | AbstractMesh, rules: Rules,
                      what: str = "parameter") -> Any:
  """NamedShardings for a tree of arrays from their logical PartitionSpecs, checking divisibility.

  Args:
    abstract_tree: arrays or ShapeDtypeStructs (plain, not boxed).
    logical_specs: the same tree structure with a logical PartitionSpec per leaf.
  Raises:
    ValueError naming the array, the dimension and the mesh axes when a dimension does not divide.
  """
  def shard(path, leaf, logical_spec):
    spec = mesh_axes(logical_spec, rules)
    for dim, (size, axes) in enumerate(zip(leaf.shape, tuple(spec) + (None,) * len(leaf.shape))):
      axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
      split = math.prod(mesh.shape[axis] for axis in axes)
      if size % split:
        logical = tuple(logical_spec)[dim]
        raise ValueError(
            f"{what} {jax.tree_util.keystr(path)} of shape {tuple(leaf.shape)}: dimension {dim} "
            f"('{logical}', size {size}) is sharded over mesh axes {axes} of total size {split}, and {size} is not a "
            f"multiple of {split}. Change the mesh (config.mesh.*), the model size, or map '{logical}' to another "
            f"mesh axis in config.sharding_rules.")
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(shard, abstract_tree, logical_specs,
                                          is_leaf=lambda x: isinstance(x, PartitionSpec))


def param_shardings(boxed_abstract_variables: Any, mesh: Mesh | AbstractMesh, rules: Rules) -> Any:
  """Shardings for variables as `jax.eval_shape(model.init, ...)` returns them (boxed with logical axes)."""
  specs = nn.get_partition_spec(boxed_abstract_variables)
  return logical_shardings(nn.meta.unbox(boxed_abstract_variables), specs, mesh, rules)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """A batch array's sharding: the leading dimension over data and fsdp, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *(None,) * (ndim - 1)))


# How programs that run once (initializers) are compiled: XLA's backend optimizations off.
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def init_sharded(init_fn: Callable[..., Any], mesh: Mesh, rules: Rules, *args) -> tuple[Any, Any]:
  """Runs `init_fn(*args)` (e.g. `model.init`) straight into its shardings: each device only ever allocates its
  own shards (`jax.eval_shape` -> shardings -> `jax.jit(out_shardings=...)`), never the whole tree.

  Returns:
    (variables as plain arrays, their NamedShardings).
  """
  boxed = jax.eval_shape(init_fn, *args)
  shardings = param_shardings(boxed, mesh, rules)
  # Outside `activate`: the out_shardings place every variable; constraints inside scanned layers at init
  # would see per-layer shapes against the stacked layers' axes.
  # XLA's CPU backend spends most of an init's compile optimizing one threefry hash per parameter (the
  # shapes_tiny VLM: 11 s); a program that runs once is compiled without its optimizations (6 s).
  variables = jax.jit(lambda *a: nn.meta.unbox(init_fn(*a)), out_shardings=shardings,
                      compiler_options=INIT_COMPILER_OPTIONS)(*args)
  return variables, shardings


class activate:
  """Context for running model code on `mesh`: the mesh and the logical rules for activation constraints.

      with mesh_lib.activate(mesh, rules):
        logits = jax.jit(step)(params, batch)
  """

  def __init__(self, mesh: Mesh, rules: Rules):
    self._contexts = [jax.set_mesh(mesh), nn.logical_axis_rules(rules)]

  def __enter__(self):
    for context in self._contexts:
      context.__enter__()
    return self

  def __exit__(self, *exc):
    for context in reversed(self._contexts):
      context.__exit__(*exc)
    return False


def shard_count(array: jax.Array) -> tuple[int, ...]:
  """How many pieces each dimension of `array` is split into (1 = replicated along it)."""
  shard_shape = array.sharding.shard_shape(array.shape)
  return tuple(int(np.ceil(size / max(piece, 1))) for size, piece in zip(array.shape, shard_shape))
