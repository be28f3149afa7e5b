import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common, sizes
from vlmjax.models.vlm import VLM, VLMConfig
from vlmjax.train import optim, state as state_lib

CONFIG = VLMConfig.from_dict(dict(
    vision=sizes.vit("Ti/16", "siglip", image_size=16, patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64),
    decoder=sizes.lm("tiny", vocab_size=61, width=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=64),
    image_token_id=60, vision_feature_layer=None, vision_feature_select="full"))


def _batch(seed=0):
  inputs = CONFIG.example_inputs(4, text_length=6, seed=seed)
  ids = inputs["input_ids"]
  targets = jnp.concatenate([ids[:, 1:], jnp.zeros((4, 1), jnp.int32)], axis=1)
  loss_mask = (jnp.arange(ids.shape[1]) >= CONFIG.tokens_per_image + 1)[None].repeat(4, 0).astype(jnp.float32)
  loss_mask = loss_mask.at[:, -1].set(0.0)
  return dict(inputs, targets=targets, loss_mask=loss_mask)


@pytest.fixture(scope="module")
def params():
  return jax.jit(lambda: nn.meta.unbox(VLM(CONFIG).init(jax.random.key(0), **CONFIG.example_inputs(1)))["params"])()


def _optimizer(params, stage, **changes):
  config = common.base_config().optim
  config.update(dict(warmup_steps=0, learning_rate=1e-2), **changes)
  return optim.make_optimizer(config, params, stage, total_steps=10)


def _run(params, stage, steps=3, **changes):
  optimizer = _optimizer(params, stage, **changes)
  state = state_lib.create(jax.tree.map(jnp.copy, params), optimizer)
  losses = []
  for step in range(steps):
    state, metrics = state_lib.train_step(state, _batch(step), config=CONFIG, optimizer=optimizer, stage=stage)
    losses.append(float(metrics["loss"]))
  return state, losses


def test_align_stage_trains_only_the_projector_and_keeps_no_state_for_frozen_groups(params):
  state, losses = _run(params, "align")
  for group in ("vision", "decoder"):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), state.params[group], params[group])
  changed = jax.tree.map(lambda a, b: not np.array_equal(np.asarray(a), np.asarray(b)), state.params["projector"], params["projector"])
  assert all(jax.tree.leaves(changed))
  # multi_transform keeps Adam moments for the projector only: the frozen groups' state is empty.
  adam_leaves = jax.tree.leaves(state.opt_state)
  projector_size = sum(p.size for p in jax.tree.leaves(params["projector"]))
  assert sum(leaf.size for leaf in adam_leaves if leaf.ndim > 0) == 2 * projector_size


def test_finetune_freezes_the_vision_encoder_only(params):
  state, _ = _run(params, "finetune", steps=1)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), state.params["vision"], params["vision"])
  embedding_changed = np.asarray(state.params["decoder"]["embedding"]) != np.asarray(params["decoder"]["embedding"])
  assert embedding_changed.any()


def test_full_stage_lowers_the_loss(params):
  optimizer = _optimizer(params, "full")
  state = state_lib.create(jax.tree.map(jnp.copy, params), optimizer)
  batch = _batch(0)
  losses = []
  for _ in range(8):
    state, metrics = state_lib.train_step(state, batch, config=CONFIG, optimizer=optimizer, stage="full")
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.7 * losses[0], losses


def test_a_non_finite_loss_skips_the_update(params):
  optimizer = _optimizer(params, "full")
  state = state_lib.create(jax.tree.map(jnp.copy, params), optimizer)
  batch = _batch(0)
  batch["pixel_values"] = batch["pixel_values"].at[0, 0, 0, 0].set(jnp.nan)
  state, metrics = state_lib.train_step(state, batch, config=CONFIG, optimizer=optimizer, stage="full")
  assert not np.isfinite(float(metrics["loss"])) and int(metrics["skipped"]) == 1
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), state.params, params)
  state, metrics = state_lib.train_step(state, _batch(1), config=CONFIG, optimizer=optimizer, stage="full")
  assert np.isfinite(float(metrics["loss"])) and int(metrics["skipped"]) == 1 and int(state.step) == 2


def test_gradient_accumulation_equals_one_big_batch(params):
  # Two accumulated half-batches give the update of the whole batch (the loss is a mean over equal halves).
  # eps=1e-3: Adam's first step is ~lr*sign(g), which would amplify rounding noise in gradients that are
  # exactly zero in theory (attention key biases) into lr-sized differences.
  whole = _batch(0)
  halves = [jax.tree.map(lambda x: x[:2], whole), jax.tree.map(lambda x: x[2:], whole)]
  accumulated = _optimizer(params, "full", accumulation_steps=2, grad_clip=0.0, eps=1e-3)
  plain = _optimizer(params, "full", grad_clip=0.0, eps=1e-3)
  state_acc = state_lib.create(jax.tree.map(jnp.copy, params), accumulated)
  state_plain = state_lib.create(jax.tree.map(jnp.copy, params), plain)
  for half in halves:
    state_acc, _ = state_lib.train_step(state_acc, half, config=CONFIG, optimizer=accumulated, stage="full")
  state_plain, _ = state_lib.train_step(state_plain, whole, config=CONFIG, optimizer=plain, stage="full")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), state_acc.params,
               state_plain.params)


def test_unknown_stage_is_an_error(params):
  with pytest.raises(ValueError, match=r"unknown training stage 'pretrain'; the stages are \['align'"):
    optim.trainable_labels(params, "pretrain")


def test_contrastive_losses_match_their_definitions():
  from vlmjax.train import losses
  rng = np.random.default_rng(0)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  images, texts = unit(rng.standard_normal((5, 8))), unit(rng.standard_normal((5, 8)))
  scale, bias = 7.0, -2.0
  logits = scale * images @ texts.T
  log_softmax = lambda z, axis: z - np.log(np.sum(np.exp(z), axis=axis, keepdims=True))
  expected = -(np.mean(np.diag(log_softmax(logits, 1))) + np.mean(np.diag(log_softmax(logits, 0)))) / 2
  np.testing.assert_allclose(losses.softmax_contrastive_loss(images, texts, scale), expected, rtol=1e-5)
  z = logits + bias
  expected = -sum(np.log(1 / (1 + np.exp(-(1 if i == j else -1) * z[i, j]))) for i in range(5) for j in range(5)) / 5
  np.testing.assert_allclose(losses.sigmoid_contrastive_loss(images, texts, scale, bias), expected, rtol=1e-5)
  # Matching pairs give a lower loss than shuffled ones.
  assert losses.softmax_contrastive_loss(images, images, 10.0) < losses.softmax_contrastive_loss(images, texts, 10.0)


def test_next_token_loss_is_optax_cross_entropy_averaged_over_the_weights():
  from vlmjax.train import losses
  rng = np.random.default_rng(0)
  logits = jnp.asarray(3 * rng.standard_normal((2, 5, 7)), jnp.bfloat16)
  targets = jnp.asarray(rng.integers(0, 7, (2, 5)))
  weights = jnp.asarray(rng.integers(0, 2, (2, 5)), jnp.float32).at[0, 0].set(1.0)

  def reference(logits):
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return jnp.sum(per_token * weights) / jnp.sum(weights)

  (loss, total), grad = jax.value_and_grad(losses.next_token_loss, has_aux=True)(logits, targets, weights)
  expected, expected_grad = jax.value_and_grad(reference)(logits)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert float(total) == float(weights.sum())
  np.testing.assert_allclose(grad.astype(jnp.float32), expected_grad.astype(jnp.float32), rtol=1e-2, atol=1e-6)
  assert float(jnp.abs(grad.astype(jnp.float32)).sum()) > 0
  # No weight, no loss and no gradient (and no division by zero).
  (loss, _), grad = jax.value_and_grad(losses.next_token_loss, has_aux=True)(logits, targets, 0 * weights)
  assert float(loss) == 0.0 and not np.any(np.asarray(grad, np.float32))


def test_vision_learning_rate_scales_only_the_vision_towers_steps(params):
  plain, _ = _run(params, "full", steps=1)
  scaled, _ = _run(params, "full", steps=1, vision_learning_rate=3e-2)  # 3x the test's learning_rate
  step = lambda state, group: jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), state.params[group],
                                           params[group])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, 3 * b, rtol=1e-4, atol=1e-7),
               step(scaled, "vision"), step(plain, "vision"))
  for group in ("projector", "decoder"):
    jax.tree.map(np.testing.assert_array_equal, step(scaled, group), step(plain, group))


@pytest.mark.parametrize("optimizer_name", ["adamw", "muon"])
def test_a_sharded_step_keeps_the_states_shardings_and_compiles_once(params, optimizer_name):
  """fsdp: left to XLA, the fresh Adam moments come out replicated and the step's outputs sharded like the
  parameters, so the second step would compile again."""
  from vlmjax.parallel import mesh as mesh_lib

  mesh = mesh_lib.make_mesh(dict(data=1, fsdp=4, tensor=1), devices=jax.devices()[:4])
  rules = common.base_config().sharding_rules
  boxed = jax.eval_shape(lambda: VLM(CONFIG).init(jax.random.key(0), **CONFIG.example_inputs(1)))
  sharded = jax.device_put(params, mesh_lib.param_shardings(boxed, mesh, rules)["params"])
  optimizer = _optimizer(params, "finetune", optimizer=optimizer_name)
  state, shardings = state_lib.create_sharded(sharded, optimizer, 0, mesh)
  step = state_lib.sharded_train_step(shardings, config=CONFIG, optimizer=optimizer, stage="finetune")
  with mesh_lib.activate(mesh, rules):
    for seed in range(3):
      batch = {key: jax.device_put(value, mesh_lib.batch_sharding(mesh, value.ndim))
               for key, value in _batch(seed).items()}
      state, metrics = step(state, batch)
  assert step._cache_size() == 1
  jax.tree.map(lambda array, sharding: array.sharding.is_equivalent_to(sharding, array.ndim) or pytest.fail(
      f"{array.shape}: {array.sharding} against {sharding}"), state, shardings)
  # The moments are split as their parameters are (the decoder's embedding over fsdp), not replicated.
  embedding = sharded["decoder"]["embedding"]
  moments = [leaf for leaf in jax.tree.leaves(state.opt_state) if leaf.shape == embedding.shape]
  assert moments and all(mesh_lib.shard_count(m) == mesh_lib.shard_count(embedding) != (1, 1) for m in moments)
  _, losses = _run(params, "finetune", optimizer=optimizer_name)
  np.testing.assert_allclose(float(metrics["loss"]), losses[-1], rtol=1e-5)


def test_muon_orthogonalizes_the_hidden_kernels_and_gives_the_rest_adam(params):
  """One Muon step (no decay, no clipping) moves a hidden kernel by its gradient orthogonalized as one matrix
  (every head of an attention projection together) at muon_learning_rate, scaled by sqrt(fan_out / fan_in)
  where that is above 1; the embeddings, output head, norms and biases take Adam's first step (the gradient's
  sign times a constant); the frozen tower does not move."""
  rate, changes = 0.05, dict(grad_clip=0.0, weight_decay=0.0)
  muon, _ = _run(params, "finetune", steps=1, optimizer="muon", muon_learning_rate=rate, **changes)
  adam, _ = _run(params, "finetune", steps=1, **changes)
  grads = jax.grad(lambda p: state_lib.vlm_loss(p, CONFIG, _batch(0))[0])(params)
  step = lambda state, keys: np.asarray(_at(state.params, keys), np.float64) - np.asarray(_at(params, keys))
  layer = lambda array: array[1]  # the test model's layers are scanned: [L, ...]
  for keys, matrix_shape, pick in [(("decoder", "layers", "mlp", "up", "kernel"), (32, 64), layer),
                                   (("decoder", "layers", "attention", "query", "kernel"), (32, 32), layer),
                                   (("decoder", "layers", "attention", "out", "kernel"), (32, 32), layer),
                                   (("projector", "linear_1", "kernel"), None, lambda array: array)]:
    gradient = pick(_at(grads, keys))
    matrix = gradient.reshape(matrix_shape) if matrix_shape else gradient
    fan_in, fan_out = matrix.shape
    expected = -rate * max(1.0, (fan_out / fan_in) ** 0.5) * _newton_schulz(matrix).reshape(gradient.shape)
    np.testing.assert_allclose(pick(step(muon, keys)), expected, rtol=1e-3, atol=1e-6, err_msg=str(keys))
  for keys in [("decoder", "embedding"), ("decoder", "output_head"), ("decoder", "final_norm", "scale"),
               ("projector", "linear_1", "bias")]:
    muon_step, adam_step = step(muon, keys), step(adam, keys)
    moved = np.abs(adam_step) > 1e-6
    assert moved.any(), keys
    ratio = muon_step[moved] / adam_step[moved]
    np.testing.assert_allclose(ratio, np.median(ratio), rtol=1e-3, err_msg=str(keys))
  jax.tree.map(np.testing.assert_array_equal, muon.params["vision"], params["vision"])


def _newton_schulz(matrix, steps: int = 5) -> np.ndarray:
  """Muon's quintic Newton-Schulz iteration (github.com/KellerJordan/Muon), written out as the reference."""
  a, b, c = 3.4445, -4.7750, 2.0315
  x = np.asarray(matrix, np.float64)
  x = x / (np.linalg.norm(x) + 1e-8)
  wide = x.shape[0] <= x.shape[1]
  x = x if wide else x.T
  for _ in range(steps):
    gram = x @ x.T
    x = a * x + (b * gram + c * gram @ gram) @ x
  return x if wide else x.T


def _at(tree, keys):
  for key in keys:
    tree = tree[key]
  return tree


def test_muon_takes_the_kernels_of_hidden_layers_only():
  """Scanned stacks orthogonalize each layer's matrix; convolutions map their window to their channels; the
  output layers (classifier, contrastive projections) and everything that is not a kernel stay with Adam."""
  tree = {"vision": {"conv_stem": {"conv_0": {"kernel": jnp.zeros((3, 3, 3, 8))}},
                     "encoder": {"layers": {"attention": {"query": {"kernel": jnp.zeros((2, 16, 4, 8))},
                                                          "out": {"kernel": jnp.zeros((2, 4, 8, 16))}},
                                            "mlp": {"up": {"kernel": jnp.zeros((2, 16, 64))}}}}},
          "decoder": {"embedding": jnp.zeros((10, 16)), "output_head": jnp.zeros((16, 10)),
                      "layers_0": {"mlp": {"down": {"kernel": jnp.zeros((64, 16))}}}},
          "classifier": {"kernel": jnp.zeros((16, 5)), "bias": jnp.zeros((5,))}}
  specs = optim.muon_matrices(tree)
  as_tuple = lambda axes: tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)
  axes = lambda *keys: (as_tuple(_at(specs, keys).reduction_axis), as_tuple(_at(specs, keys).output_axis))
  assert axes("vision", "conv_stem", "conv_0", "kernel") == ((0, 1, 2), (-1,))
  assert axes("vision", "encoder", "layers", "attention", "query", "kernel") == ((-3,), (-2, -1))
  assert axes("vision", "encoder", "layers", "attention", "out", "kernel") == ((-3, -2), (-1,))
  assert axes("vision", "encoder", "layers", "mlp", "up", "kernel") == ((1,), (-1,))
  assert axes("decoder", "layers_0", "mlp", "down", "kernel") == ((0,), (-1,))
  for keys in [("decoder", "embedding"), ("decoder", "output_head"), ("classifier", "kernel"), ("classifier", "bias")]:
    assert _at(specs, keys) is None, keys


def test_an_unknown_optimizer_is_named():
  config = common.base_config().optim
  config.optimizer = "sgd"
  with pytest.raises(ValueError, match="optim.optimizer='sgd' is not one of"):
    optim.check_optimizer(config)
