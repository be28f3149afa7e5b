"""A train step's loss and gradients; on a mesh that only splits the batch, summed over the devices as one buffer.

Under `jax.jit` over a mesh, XLA's SPMD partitioner all-reduces each parameter's gradient where a dot produces it,
and its all-reduce combiner merges those into one all-reduce of a tuple. XLA's CPU backend reduces a tuple one
element at a time, each after a rendezvous of the devices: for the bench shape's VLM (tools/bench_train.py, 114
gradients, 7.4 MB) that took 8.4 ms against 3.8 ms for the same bytes as one array, concatenation and slicing
included (experiments/shapes_tiny/README.md, 2026-12-05 flat-allreduce). Where every parameter is replicated (the
mesh's fsdp and tensor axes of size 1) and the loss is a mean of per-example terms, each device therefore computes
its own part of the batch's loss and gradients under `shard_map`, and one `psum` of their concatenation sums them:
one collective instead of many on any backend.
"""

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jax.sharding import PartitionSpec

from vlmjax.models import lora
from vlmjax.parallel import mesh as mesh_lib

# (loss, count) = loss_fn(params, batch): the loss is the mean of per-example (or per-token) terms over `count`
# of them, a float32 scalar, computed as sum / max(count, 1).
LossFn = Callable[[dict, dict], tuple[jax.Array, jax.Array]]


def _splits_only_the_batch(mesh: jax.sharding.AbstractMesh) -> bool:
  """Whether `mesh` has more than one device, all along the data axis (every parameter replicated)."""
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  return sizes.get("data", 1) > 1 and all(size == 1 for axis, size in sizes.items() if axis != "data")


def loss_and_grads(loss_fn: LossFn, trained: dict, frozen: dict, batch: dict,
                   decomposable: bool) -> tuple[jax.Array, jax.Array, dict]:
  """The loss of `batch` under the parameters `trained` and `frozen` together (`lora.combine`: whole top-level groups,
  or a LoRA stage's adapters and the frozen base around them), its count, and the gradient for `trained`.

  decomposable: whether the loss is a mean of terms that each depend on one example, so that it can be summed
  from the devices' parts of the batch (not so for a contrastive loss, whose terms pair every image with every
  caption). Where it is and the mesh (`jax.set_mesh`) splits only the batch, one flat all-reduce sums the
  gradients; otherwise `jax.value_and_grad` under the SPMD partitioner.
  """
  def loss_of(trained: dict, frozen: dict, batch: dict):
    return loss_fn(lora.combine(trained, frozen), batch)

  mesh = jax.sharding.get_abstract_mesh()
  if not (decomposable and not mesh.empty and _splits_only_the_batch(mesh)):
    (loss, count), grads = jax.value_and_grad(loss_of, has_aux=True)(trained, frozen, batch)
    return loss, count, grads

  def device_part(trained: dict, frozen: dict, batch: dict):
    def summed(trained):  # the sum of this device's terms, whose gradients add up across devices
      loss, count = loss_of(trained, frozen, batch)
      return loss * jnp.maximum(count, 1.0), count
    with nn.logical_axis_rules(()):  # inside shard_map every array is one device's: no sharding constraints
      (total, count), grads = jax.value_and_grad(summed, has_aux=True)(trained)
    flat, unflatten = ravel_pytree(grads)
    flat, total, count = jax.lax.psum((flat, total, count), "data")
    normalizer = jnp.maximum(count, 1.0)
    return total / normalizer, count, unflatten(flat / normalizer)

  # check_vma=False: the custom VJPs of `matmul.contract`, `dot_attention` and `activation` do not track which
  # values vary across devices; the psum above is the only collective.
  return jax.shard_map(
      device_part, in_specs=(PartitionSpec(), PartitionSpec(), PartitionSpec(mesh_lib.BATCH_AXES)),
      out_specs=PartitionSpec(), check_vma=False)(trained, frozen, batch)
