"""Parameters per module and the sharding each parameter gets under a mesh, computed without allocating
anything (`jax.eval_shape`): `vlmjax summarize --config FILE`."""

import math
from collections import defaultdict

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import AbstractMesh

from vlmjax.models.vlm import VLM, VLMConfig
from vlmjax.parallel import mesh as mesh_lib


def abstract_params(config: VLMConfig) -> dict:
  """The boxed parameter tree of the VLM as ShapeDtypeStructs (with logical axes), nothing allocated."""
  model = VLM(config)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), **config.example_inputs(1)))["params"]


def count_by_module(params: dict, depth: int) -> dict[str, int]:
  """Parameter counts summed per module path prefix of up to `depth` levels ('decoder/layers', ...)."""
  counts: dict[str, int] = defaultdict(int)
  for path, leaf in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(params)):
    keys = [str(getattr(key, "key", key)) for key in path]
    for level in range(1, min(depth, len(keys)) + 1):
      counts["/".join(keys[:level])] += math.prod(leaf.shape)
  return dict(counts)


def summarize(config: ml_collections.ConfigDict, num_devices: int) -> str:
  """A plain-text report: parameter counts per module, total, and each parameter's sharding on the mesh."""
  model_config = VLMConfig.from_dict(config.model)
  mesh = mesh_lib.abstract_mesh(config.mesh, num_devices)
  params = abstract_params(model_config)
  shardings = mesh_lib.param_shardings(params, mesh, config.sharding_rules)
  specs = nn.get_partition_spec(params)
  total = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nn.meta.unbox(params)))

  lines = [f"mesh: {_describe_mesh(mesh)}", "", f"{'module':<44}{'parameters':>16}{'share':>8}"]
  for path, count in count_by_module(params, depth=2).items():
    lines.append(f"{path:<44}{count:>16,}{count / total:>8.1%}")
  lines += [f"{'total':<44}{total:>16,}", "",
            f"{'parameter':<52}{'shape':<22}{'logical axes':<36}{'mesh axes':<28}shard shape"]
  unboxed = nn.meta.unbox(params)
  for (path, leaf), spec, sharding in zip(jax.tree_util.tree_leaves_with_path(unboxed), jax.tree.leaves(
      specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)), jax.tree.leaves(shardings)):
    name = "/".join(str(getattr(key, "key", key)) for key in path)
    lines.append(f"{name:<52}{_axes(leaf.shape):<22}{_axes(spec):<36}{_axes(sharding.spec):<28}"
                 f"{_axes(sharding.shard_shape(leaf.shape))}")
  return "\n".join(lines)


def _axes(entries) -> str:
  """(4, 'embed', None, ('data', 'fsdp')) -> '4 embed - data+fsdp'."""
  def one(entry):
    if entry is None:
      return "-"
    return "+".join(entry) if isinstance(entry, tuple) else str(entry)
  return " ".join(one(entry) for entry in entries)


def _describe_mesh(mesh: AbstractMesh) -> str:
  return f"{mesh_lib.describe(mesh.shape)} ({mesh.size} devices)"
