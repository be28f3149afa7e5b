"""`gradients.loss_and_grads` on a mesh of 8 fake CPU devices against one device: the data-parallel path's one
flat all-reduce, the partitioner's path where the mesh splits parameters or the loss pairs examples."""

import re

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from configs import sizes
from vlmjax.models.vlm import VLM, VLMConfig
from vlmjax.parallel import mesh as mesh_lib
from vlmjax.train import gradients, state as state_lib

CONFIG = VLMConfig.from_dict(dict(
    vision=sizes.vit("Ti/16", "siglip", image_size=16, patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64),
    decoder=sizes.lm("tiny", vocab_size=61, width=32, depth=1, num_heads=4, num_kv_heads=2, mlp_dim=64),
    image_token_id=60, vision_feature_layer=None, vision_feature_select="full"))
TRAINABLE = ("projector", "decoder")


def _batch():
  """8 rows, one per device; rows 2 and 5 have no loss tokens, so two devices' parts count 0 tokens."""
  inputs = CONFIG.example_inputs(8, text_length=6, seed=0)
  ids = np.asarray(inputs["input_ids"])
  loss_mask = np.random.default_rng(0).uniform(size=ids.shape) < 0.5
  loss_mask[[2, 5]] = False
  return dict(inputs, targets=np.roll(ids, -1, axis=1), loss_mask=loss_mask.astype(np.float32))


def _loss_fn(params, batch):
  return state_lib.vlm_loss(params, CONFIG, batch)


def _loss_and_grads(params, batch, decomposable: bool = True):
  """The finetune stage's: the vision tower frozen."""
  trained = {group: params[group] for group in TRAINABLE}
  return gradients.loss_and_grads(_loss_fn, trained, {"vision": params["vision"]}, batch, decomposable)


@pytest.fixture(scope="module")
def params():
  return jax.jit(lambda: nn.meta.unbox(VLM(CONFIG).init(jax.random.key(0), **CONFIG.example_inputs(1)))["params"])()


@pytest.fixture(scope="module")
def one_device(params):
  """(loss, count, grads) without a mesh: `jax.value_and_grad` of the whole batch."""
  return jax.jit(_loss_and_grads)(params, _batch())


def _on_mesh(params, mesh_config: dict, decomposable: bool):
  """(loss, count, grads) and the compiled program's text, on a mesh of 8 devices with the batch split."""
  mesh = mesh_lib.make_mesh(mesh_config)
  batch = jax.device_put(_batch(), mesh_lib.batch_sharding(mesh))
  params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
  with mesh_lib.activate(mesh, mesh_lib.LOGICAL_RULES):
    step = jax.jit(lambda p, b: _loss_and_grads(p, b, decomposable))
    compiled = step.lower(params, batch).compile()
    return compiled(params, batch), compiled.as_text()


def _assert_same(result, reference):
  (loss, count, grads), (ref_loss, ref_count, ref_grads) = result, reference
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  assert float(count) == float(ref_count)
  jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5), grads, ref_grads)


def _trained_size(params) -> int:
  return sum(leaf.size for group in TRAINABLE for leaf in jax.tree.leaves(params[group]))


def _all_reduces(hlo: str) -> list[str]:
  return re.findall(r"= (\(.*?\)|\S+) all-reduce\(", hlo)


def test_a_data_parallel_mesh_sums_the_gradients_in_one_flat_all_reduce(params, one_device):
  result, hlo = _on_mesh(params, {"data": 8}, decomposable=True)
  _assert_same(result, one_device)
  reduced = _all_reduces(hlo)
  assert len(reduced) == 1, reduced  # the loss, its count and every gradient at once
  assert f"f32[{_trained_size(params)}]" in reduced[0]
  assert set(result[2]) == set(TRAINABLE)  # no gradient computed for the frozen tower


@pytest.mark.parametrize("mesh_config, decomposable", [({"data": 2, "fsdp": 2, "tensor": 2}, True),
                                                       ({"data": 8}, False)], ids=["sharded-params", "pairwise-loss"])
def test_otherwise_the_partitioner_reduces_each_gradient(params, one_device, mesh_config, decomposable):
  result, hlo = _on_mesh(params, mesh_config, decomposable)
  _assert_same(result, one_device)
  assert _all_reduces(hlo) and not any(f"f32[{_trained_size(params)}]" in reduced for reduced in _all_reduces(hlo))
