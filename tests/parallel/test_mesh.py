"""Sharding on 8 fake CPU devices (tests/conftest.py sets XLA_FLAGS): the same loss and gradients as 1 device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import shapes_tiny
from vlmjax.models.vlm import VLM, VLMConfig
from vlmjax.parallel import mesh as mesh_lib
from vlmjax.train.losses import next_token_loss

MESHES = {"data=8": dict(data=8, fsdp=1, tensor=1), "fsdp=8": dict(data=1, fsdp=8, tensor=1),
          "data=2,fsdp=2,tensor=2": dict(data=2, fsdp=2, tensor=2)}


def test_there_are_8_fake_devices():
  assert jax.device_count() == 8, "tests/conftest.py should force 8 host devices"


def test_mesh_shape_resolves_the_rest_and_checks_the_product():
  assert mesh_lib.mesh_shape(dict(data=-1, fsdp=2, tensor=1), 8) == dict(pipeline=1, data=4, fsdp=2, tensor=1)
  assert mesh_lib.mesh_shape(dict(data=2, fsdp=2, tensor=2), 8) == dict(pipeline=1, data=2, fsdp=2, tensor=2)
  assert mesh_lib.mesh_shape(dict(pipeline=-1, data=2), 8) == dict(pipeline=4, data=2, fsdp=1, tensor=1)
  with pytest.raises(ValueError, match=r"data=2 x fsdp=2 x tensor=1 uses 4 devices but there are 8"):
    mesh_lib.mesh_shape(dict(data=2, fsdp=2, tensor=1), 8)
  with pytest.raises(ValueError, match=r"8 devices cannot be split as data=-1 x fsdp=3 x tensor=1"):
    mesh_lib.mesh_shape(dict(data=-1, fsdp=3, tensor=1), 8)
  with pytest.raises(ValueError, match=r"only one axis may be -1"):
    mesh_lib.mesh_shape(dict(data=-1, fsdp=-1, tensor=1), 8)
  with pytest.raises(ValueError, match=r"unknown axes \['model'\]"):
    mesh_lib.mesh_shape(dict(data=-1, model=2), 8)
  with pytest.raises(ValueError, match=r"uses 4 devices but there are 8"):
    mesh_lib.make_mesh(dict(data=4, fsdp=1, tensor=1))


def test_a_dimension_that_does_not_divide_its_mesh_axis_is_an_error():
  config = shapes_tiny.get_config()
  model_config = VLMConfig.from_dict(config.model)
  boxed = jax.eval_shape(lambda: VLM(model_config).init(jax.random.key(0), **model_config.example_inputs(1)))
  mesh = mesh_lib.make_mesh(dict(data=1, fsdp=1, tensor=8))
  with pytest.raises(ValueError, match=r"\['params'\]\['decoder'\]\['layers_0'\]\['attention'\]\['key'\]\['kernel'\] "
                     r"of shape \(128, 4, 32\): dimension 1 \('kv_heads', size 4\) is sharded over mesh axes "
                     r"\('tensor',\) of total size 8, and 4 is not a multiple of 8"):
    mesh_lib.param_shardings(boxed, mesh, config.sharding_rules)


def _batch(model_config, batch_size=8, text_length=12):
  inputs = model_config.example_inputs(batch_size, text_length, seed=0)
  weights = (inputs["input_ids"] != model_config.image_token_id).astype(jnp.float32)
  return dict(inputs, weights=weights)


def _loss_and_grads(model_config, params, batch):
  def loss_fn(params):
    logits, _ = VLM(model_config).apply({"params": params}, batch["input_ids"], batch["pixel_values"])
    loss, _ = next_token_loss(logits[:, :-1], batch["input_ids"][:, 1:], batch["weights"][:, 1:])
    return loss
  return jax.value_and_grad(loss_fn)(params)


def _assert_gradients_equal(grads, reference):
  """rtol 1e-5 per element, with an absolute floor of 1e-5 x the tensor's largest gradient (float32 sums in
  another order differ by that much where terms cancel).

  Key biases are the exception: softmax is invariant to adding q.b to every score, so their true gradient is
  exactly zero and both computations hold rounding noise; they must be ~0 in both.
  """
  scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(reference))
  for (path, got), expected in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(reference)):
    name = jax.tree_util.keystr(path)
    got, expected = np.asarray(got), np.asarray(expected)
    if name.endswith("['key']['bias']"):
      assert np.max(np.abs(got)) < 1e-6 * scale and np.max(np.abs(expected)) < 1e-6 * scale, name
      continue
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.max(np.abs(expected)), err_msg=name)


@pytest.fixture(scope="module")
def setup():
  config = shapes_tiny.get_config()
  # float32 (the config's bfloat16 language model would sum in another order on each mesh) and stacked layers
  # (whose 'layers' axis the sharding rules place too).
  config.model.update(dtype="float32", scan_layers=True)
  model_config = VLMConfig.from_dict(config.model)
  batch = _batch(model_config)
  one_device = mesh_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  init = lambda: VLM(model_config).init(jax.random.key(0), **model_config.example_inputs(1))
  variables, _ = mesh_lib.init_sharded(init, one_device, config.sharding_rules)
  with mesh_lib.activate(one_device, config.sharding_rules):
    loss, grads = jax.jit(_loss_and_grads, static_argnums=0)(model_config, variables["params"], batch)
  return config, model_config, batch, init, variables["params"], (loss, grads)


@pytest.mark.parametrize("name", list(MESHES))
def test_sharded_loss_and_gradients_equal_one_device(setup, name):
  config, model_config, batch, init, params_1, (loss_1, grads_1) = setup
  mesh = mesh_lib.make_mesh(MESHES[name])
  variables, shardings = mesh_lib.init_sharded(init, mesh, config.sharding_rules)
  params = variables["params"]
  # Initialized straight into shards, with the same values as on one device.
  jax.tree.map(np.testing.assert_array_equal, params, params_1)
  batch = jax.device_put(batch, mesh_lib.batch_sharding(mesh))
  with mesh_lib.activate(mesh, config.sharding_rules):
    loss, grads = jax.jit(_loss_and_grads, static_argnums=0)(model_config, params, batch)
  np.testing.assert_allclose(loss, loss_1, rtol=1e-5)
  _assert_gradients_equal(grads, grads_1)

  # The weights really are split, as the rules say.
  embedding = params["decoder"]["embedding"]  # ('vocab', 'embed') -> (tensor, fsdp)
  expected_pieces = (MESHES[name]["tensor"], MESHES[name]["fsdp"])
  assert mesh_lib.shard_count(embedding) == expected_pieces
  assert embedding.addressable_shards[0].data.shape == (512 // expected_pieces[0], 128 // expected_pieces[1])
  up = params["decoder"]["layers"]["mlp"]["up"]["kernel"]  # ('layers', 'embed', 'mlp')
  assert mesh_lib.shard_count(up) == (1, MESHES[name]["fsdp"], MESHES[name]["tensor"])
  assert shardings["params"]["decoder"]["embedding"] == embedding.sharding
