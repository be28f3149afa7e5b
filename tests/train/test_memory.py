"""`memory`'s bytes per device against arrays really created in those shardings (8 fake CPU devices), and its
activations against XLA's own buffer assignment for a tiny train step."""

import math

import jax
import jax.numpy as jnp
import pytest

from configs import common, sizes
from vlmjax import runtime
from vlmjax.models import quant
from vlmjax.models.vlm import VLM, VLMConfig
from vlmjax.parallel import mesh as mesh_lib
from vlmjax.train import adapters, memory, optim, state as state_lib


def _config(remat: str = "full"):
  """A tiny VLM whose language model is wide enough for int4 groups of 128 inputs, with LLaVA's finetune sections."""
  config = common.finetune_sections(common.base_config())
  config.model.vision = sizes.vit("Ti/16", "siglip", image_size=16, patch_size=8, width=32, depth=2, num_heads=2,
                                  mlp_dim=64)
  config.model.decoder = sizes.lm("tiny", vocab_size=64, width=128, depth=4, num_heads=4, num_kv_heads=2, mlp_dim=256)
  config.model.update(image_token_id=63, vision_feature_layer=None, vision_feature_select="full", dtype="bfloat16",
                      remat_policy=remat)
  config.mesh.update(data=1, fsdp=-1)
  config.train.batch_size = 8
  config.data.length = 256
  config.lora.rank = 4
  return config


def _on_device_0(tree) -> int:
  device = jax.devices()[0]
  return sum(shard.data.nbytes for leaf in jax.tree.leaves(tree) for shard in leaf.addressable_shards
             if shard.device == device)


@pytest.fixture(scope="module")
def base():
  """(config, mesh over 8 devices, rules, the base parameters initialized into their shardings)."""
  config = _config()
  mesh, rules = mesh_lib.make_mesh(config.mesh), mesh_lib.normalize_rules(config.sharding_rules)
  model_config = VLMConfig.from_dict(config.model)
  init = lambda: VLM(model_config).init(jax.random.key(0), **model_config.example_inputs(1))
  return config, mesh, rules, mesh_lib.init_sharded(init, mesh, rules)[0]["params"]


@pytest.mark.parametrize("stage", ["full", "finetune"])
def test_full_state_bytes_equal_those_of_the_created_state(base, stage):
  config, mesh, _, params = base
  optimizer = optim.make_optimizer(config.optim, params, stage, config.train.steps)
  state, _ = state_lib.create_sharded(params, optimizer, 0, mesh)
  setup = memory.plan(config, mesh_lib.abstract_mesh(config.mesh, 8), stage)
  assert memory.sharded_bytes(setup.state_params, setup.state_shardings) == _on_device_0(state.params)
  assert memory.sharded_bytes(*memory.optimizer_state(config, setup)) == _on_device_0(state.opt_state)
  trained = {group: tree for group, tree in state.params.items() if group in optim.TRAINABLE[stage]}
  assert memory.sharded_bytes(setup.trained, setup.trained_shardings) == _on_device_0(trained)


@pytest.mark.parametrize("scheme", ["", "int8", "int4"])
def test_lora_and_qlora_bytes_equal_those_of_the_created_state(base, scheme):
  """The trainer's own path: `adapters.trained_and_frozen` quantizes the base under jit, its placement left to XLA."""
  config, mesh, rules, params = base
  config = config.copy_and_resolve_references()
  config.lora.quantize = scheme
  trained, frozen = adapters.trained_and_frozen(config, VLMConfig.from_dict(config.model), params, mesh, rules)
  optimizer = optim.make_optimizer(config.optim, trained, "lora", config.train.steps)
  state, _ = state_lib.create_sharded(trained, optimizer, 0, mesh)
  setup = memory.plan(config, mesh_lib.abstract_mesh(config.mesh, 8), "lora", scheme)
  assert memory.frozen_bytes(setup.frozen, setup.frozen_float_shardings) == _on_device_0(frozen)
  assert memory.sharded_bytes(setup.trained, setup.trained_shardings) == _on_device_0(state.params)
  assert memory.sharded_bytes(*memory.optimizer_state(config, setup)) == _on_device_0(state.opt_state)


def test_lora_trains_the_adapters_and_the_projector():
  config = _config()
  setup = memory.plan(config, mesh_lib.abstract_mesh(config.mesh, 1), "lora")
  decoder, rank = config.model.decoder, config.lora.rank
  width, mlp, head_dim = decoder.width, decoder.mlp_dim, decoder.width // decoder.num_heads
  per_layer = rank * sum(fan_in + fan_out for fan_in, fan_out in [
      (width, decoder.num_heads * head_dim), (width, decoder.num_kv_heads * head_dim),
      (width, decoder.num_kv_heads * head_dim), (decoder.num_heads * head_dim, width),
      (width, mlp), (width, mlp), (mlp, width)])  # query, key, value, out, gate, up, down
  projector = sum(leaf.size for leaf in jax.tree.leaves(setup.trained["projector"]))
  assert projector == (32 * width + width) + (width * width + width)  # mlp2x_gelu from the vision width 32
  assert sum(leaf.size for leaf in jax.tree.leaves(setup.trained)) == decoder.depth * per_layer + projector


@pytest.mark.parametrize("scheme, ratio", [("int8", 1 / 4), ("int4", 1 / 8 + 2 / (128 * 4))])
def test_qlora_stores_the_base_layers_in_a_quarter_or_an_eighth(scheme, ratio):
  """int8: a byte a weight and a float32 scale per output; int4: half a byte a weight and a bfloat16 scale per
  group of 128 inputs."""
  config = _config()
  mesh = mesh_lib.abstract_mesh(config.mesh, 1)
  plain, quantized = memory.plan(config, mesh, "lora"), memory.plan(config, mesh, "lora", scheme)
  is_kernel = lambda leaf: isinstance(leaf, quant.QuantizedKernel)
  kernels = [(float_leaf, leaf) for float_leaf, leaf in zip(
      jax.tree.leaves(plain.frozen), jax.tree.leaves(quantized.frozen, is_leaf=is_kernel)) if is_kernel(leaf)]
  assert len(kernels) == 7 and all(leaf.shape == float_leaf.shape[1:] for float_leaf, leaf in kernels)
  float_bytes = sum(float_leaf.size * 4 for float_leaf, _ in kernels)
  stored = sum(leaf.values.size * leaf.values.dtype.itemsize + leaf.scales.size * leaf.scales.dtype.itemsize
               for _, leaf in kernels)
  if scheme == "int8":
    assert float_bytes / 4 < stored < 1.05 * float_bytes / 4
  else:
    assert stored == pytest.approx(ratio * float_bytes)
  held = sum(float_leaf.size * float_leaf.dtype.itemsize for float_leaf, _ in kernels)  # a float base's, computed dtype
  assert (memory.frozen_bytes(plain.frozen, plain.frozen_float_shardings)
          - memory.frozen_bytes(quantized.frozen, quantized.frozen_float_shardings)) == held - stored


def test_activations_follow_xlas_buffers_for_remat_full_and_none():
  """XLA's temporary buffers of the loss's gradient (the standard path, one device) hold the residuals, the
  backward's cotangents and XLA's workspace; the estimate counts the first two, so it may miss some of the
  workspace and XLA may free a layer's cotangents sooner: within 1.5x either way, and 'none' above 'full'."""
  estimated, measured = {}, {}
  for remat in ("full", "none"):
    config = _config(remat)
    mesh = mesh_lib.abstract_mesh(config.mesh, 1)
    setup = memory.plan(config, mesh, "full")
    estimated[remat] = memory.activation_bytes(config, setup, mesh)
    rows, length = config.train.batch_size, config.data.length
    spec = jax.ShapeDtypeStruct
    batch = dict(input_ids=spec((rows, length), jnp.int32), pixel_values=spec((rows, 16, 16, 3), jnp.float32),
                 targets=spec((rows, length), jnp.int32), loss_mask=spec((rows, length), jnp.float32))
    loss = lambda params, batch: state_lib.vlm_loss(params, setup.model_config, batch)[0]
    with runtime.cpu_tuning(False):
      compiled = jax.jit(jax.grad(loss)).lower(setup.state_params, batch).compile()
    measured[remat] = compiled.memory_analysis().temp_size_in_bytes
    assert 1 / 1.5 < estimated[remat] / measured[remat] < 1.5, (remat, estimated[remat], measured[remat])
  assert estimated["none"] > 2 * estimated["full"] and measured["none"] > 2 * measured["full"]


def test_the_report_has_a_row_per_setup_and_names_an_uneven_batch():
  config = _config()
  config.train.batch_size = 4
  text = memory.report(config, 8)
  for name, _, _ in memory.SETUPS:
    assert f"\n{name} " in text
  assert "train.batch_size=4 does not split over the 8 batch ways" in text
  assert math.isclose(memory.rows_per_device(config, mesh_lib.abstract_mesh(config.mesh, 8)), 1)
