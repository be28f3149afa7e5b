"""LoRA (`vlmjax.models.lora`) and the lora stage's train step: adapters where the targets say, an adapted model that
starts as its base, merging that computes what the adapters do, QLoRA's quantized base, and a step that trains only
the adapters and the projector."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import sizes
from vlmjax.infer import quantize as quantize_lib
from vlmjax.models import lora, quant
from vlmjax.models.vlm import VLM, VLMConfig
from vlmjax.train import adapters, optim, state as state_lib

CONFIG = VLMConfig.from_dict(dict(
    vision=sizes.vit("Ti/16", "siglip", image_size=16, patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64),
    decoder=sizes.lm("tiny", vocab_size=61, width=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                     scan_layers=False),
    image_token_id=60, vision_feature_layer=None, vision_feature_select="full"))
LORA = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.0)
ADAPTED = adapters.adapted(CONFIG, LORA)


def _inputs():
  return ADAPTED.example_inputs(2, text_length=6, seed=0)


def _batch():
  inputs = _inputs()
  ids = np.asarray(inputs["input_ids"])
  loss_mask = np.zeros(ids.shape, np.float32)
  loss_mask[:, -6:] = 1.0
  return dict(inputs, targets=np.roll(ids, -1, axis=1), loss_mask=loss_mask)


@pytest.fixture(scope="module")
def params():
  """The adapted model's parameters, every adapter's B made non-zero so that the adapters change the logits."""
  initial = jax.jit(lambda: nn.meta.unbox(VLM(ADAPTED).init(jax.random.key(0), **_inputs()))["params"])()
  perturb = lambda path, x: (0.1 * jax.random.normal(jax.random.key(len(str(path))), x.shape)
                             if path[-1].key == "lora_b" else x)
  return jax.tree_util.tree_map_with_path(perturb, initial)


def _paths(tree) -> list[str]:
  return ["/".join(str(key.key) for key in path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def _logits(config, params, **kwargs):
  return np.asarray(VLM(config).apply({"params": params}, **_inputs(), **kwargs)[0])


def test_adapters_sit_beside_the_targeted_layers_only(params):
  adapted = sorted({path.rsplit("/", 1)[0] for path in _paths(params) if path.endswith("lora_a")})
  assert adapted == [f"decoder/layers_{i}/{module}" for i in range(2) for module in
                     ("attention/key", "attention/out", "attention/query", "attention/value", "mlp/down", "mlp/gate",
                      "mlp/up")]
  only_query = adapters.adapted(CONFIG, lora.LoraConfig(rank=2, targets=r"attention/query$"))
  abstract = jax.eval_shape(lambda: VLM(only_query).init(jax.random.key(0), **_inputs()))["params"]
  assert [p for p in _paths(nn.meta.unbox(abstract)) if "lora" in p] == [
      f"decoder/layers_{i}/attention/query/lora_{ab}" for i in range(2) for ab in "ab"]
  # A = [inputs..., r], B = [r, outputs...]: rank * (inputs + outputs) parameters per layer.
  out = params["decoder"]["layers_0"]["attention"]["out"]
  assert out["lora_a"].shape == (4, 8, 4) and out["lora_b"].shape == (4, 32)


def test_a_fresh_adapter_leaves_the_base_model_unchanged():
  """B starts at zero (A random), as PEFT starts: the adapted model computes its base's logits exactly."""
  fresh = jax.jit(lambda: nn.meta.unbox(VLM(ADAPTED).init(jax.random.key(0), **_inputs()))["params"])()
  _, base = lora.split(fresh)
  assert np.any(fresh["decoder"]["layers_0"]["mlp"]["up"]["lora_a"])
  np.testing.assert_array_equal(_logits(ADAPTED, fresh), _logits(CONFIG, base))


def test_merging_folds_the_adapters_into_the_kernels(params):
  adapted = _logits(ADAPTED, params)
  merged = lora.merge(params, LORA)
  assert not any("lora" in path for path in _paths(merged))
  unadapted = _logits(CONFIG, lora.split(params)[1])
  assert np.abs(adapted - unadapted).max() > 0.1  # the adapters matter
  np.testing.assert_allclose(_logits(CONFIG, merged), adapted, atol=2e-5 * np.abs(adapted).max())


def test_dropout_runs_only_with_a_dropout_rng(params):
  with_dropout = adapters.adapted(CONFIG, lora.LoraConfig(rank=4, alpha=8.0, dropout=0.5))
  plain = _logits(ADAPTED, params)
  np.testing.assert_array_equal(_logits(with_dropout, params), plain)  # inference: no rng, no dropout
  dropped = _logits(with_dropout, params, rngs={"dropout": jax.random.PRNGKey(1)})
  assert np.abs(dropped - plain).max() > 1e-3


def test_split_and_combine_are_inverses(params):
  trained, frozen = lora.split(params, ("projector",))
  assert set(trained) == {"decoder", "projector"} and "vision" in frozen
  assert all(path.endswith(("lora_a", "lora_b")) for path in _paths(trained["decoder"]))
  assert not any("lora" in path for path in _paths(frozen))
  assert jax.tree.structure(lora.combine(frozen, trained)) == jax.tree.structure(params)
  with pytest.raises(ValueError, match="in both trees"):
    lora.combine(trained, trained)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_quantized_base_trains_its_adapters_as_its_dequantized_copy_would(params, scheme):
  """QLoRA: the base's layer kernels held in low bits; the adapters' gradients (through the quantized matmuls'
  inputs) are those of the same model over the dequantized kernels, and merging dequantizes."""
  trained, frozen = lora.split(params, ("projector",))
  quantized = quantize_lib.quantize_params(frozen, scheme, group_size=8, layers_only=True)
  kernels = [leaf for leaf in jax.tree.leaves(quantized, is_leaf=lambda x: isinstance(x, quant.QuantizedKernel))
             if isinstance(leaf, quant.QuantizedKernel)]
  assert len(kernels) == 2 * 7  # every attention and MLP kernel of both layers, nothing else
  # Held at their width: a byte a weight in int8, half a byte in int4 (the scales apart).
  per_weight = {"int8": 1.0, "int4": 0.5}[scheme]
  assert all(k.values.dtype == np.int8 and k.values.nbytes == per_weight * np.prod(k.shape) for k in kernels)
  dequantized = jax.tree.map(lambda x: quant.dequantize(x) if isinstance(x, quant.QuantizedKernel) else x, quantized,
                             is_leaf=lambda x: isinstance(x, quant.QuantizedKernel))
  batch = _batch()
  grads = lambda base: jax.grad(lambda t: state_lib.vlm_loss(lora.combine(t, base), ADAPTED, batch)[0])(trained)
  from_quantized, from_float = grads(quantized), grads(dequantized)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6 * np.abs(b).max()),
               from_quantized, from_float)
  assert np.abs(from_quantized["decoder"]["layers_0"]["attention"]["query"]["lora_b"]).max() > 0
  merged = lora.merge(lora.combine(trained, quantized), LORA)
  np.testing.assert_allclose(_logits(CONFIG, merged), _logits(ADAPTED, lora.combine(trained, dequantized)),
                             atol=1e-4)


def test_the_lora_step_trains_adapters_and_projector_and_leaves_the_base_bit_identical(params):
  trained, frozen = lora.split(params, optim.TRAINABLE["lora"])
  frozen_before = jax.tree.map(np.array, frozen)
  config = ml_collections.ConfigDict(dict(optimizer="adamw", learning_rate=1e-2, warmup_steps=0, end_ratio=1.0, b1=0.9,
                                          b2=0.95, eps=1e-8, weight_decay=0.0, grad_clip=1.0, accumulation_steps=1,
                                          projector_learning_rate=1e-3))
  optimizer = optim.make_optimizer(config, trained, "lora", 10)
  fresh_state = lambda: state_lib.create(jax.tree.map(jnp.copy, trained), optimizer)  # the step donates its state
  state = fresh_state()
  # Adam's two moments for every trained leaf and nothing else: the base has no optimizer state.
  moments = [leaf for leaf in jax.tree.leaves(state.opt_state) if leaf.ndim > 0]
  assert sum(m.size for m in moments) == 2 * sum(p.size for p in jax.tree.leaves(trained))
  losses, before = [], jax.tree.map(np.array, trained)
  for _ in range(5):
    state, metrics = state_lib.train_step(state, _batch(), frozen, config=ADAPTED, optimizer=optimizer, stage="lora")
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0]
  jax.tree.map(np.testing.assert_array_equal, frozen, frozen_before)
  moved = jax.tree.map(lambda new, old: float(np.abs(np.asarray(new) - old).max()), state.params, before)
  assert moved["decoder"]["layers_1"]["mlp"]["down"]["lora_a"] > 0 and moved["projector"]["linear_2"]["kernel"] > 0
  # Each group at its rate: Adam's first step moves every weight with a gradient by the rate (the gradient over its
  # own magnitude), 1e-2 for the adapters, projector_learning_rate 1e-3 for the projector.
  first = state_lib.train_step(fresh_state(), _batch(), frozen, config=ADAPTED, optimizer=optimizer,
                               stage="lora")[0].params
  largest_step = lambda *keys: np.abs(np.asarray(_at(first, keys)) - _at(before, keys)).max()
  assert largest_step("projector", "linear_1", "kernel") == pytest.approx(1e-3, rel=1e-3)
  assert largest_step("decoder", "layers_0", "mlp", "up", "lora_b") == pytest.approx(1e-2, rel=1e-3)


def _at(tree, keys):
  for key in keys:
    tree = tree[key]
  return tree
