import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sizes
from vlmjax.models.layers import unstack_layers
from vlmjax.models.summary import abstract_params
from vlmjax.models.vit import sincos_2d
from vlmjax.models.vlm import VLM, VLMConfig
from vlmjax.train import optim

TINY_LLAVA_MODEL = dict(
    vision=sizes.vit("Ti/16", "clip", image_size=16, patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64),
    decoder=sizes.lm("tiny", vocab_size=101, width=48, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=96),
    image_token_id=100, vision_feature_layer=-2, vision_feature_select="default")
TINY_LLAVA = VLMConfig.from_dict(TINY_LLAVA_MODEL)
TINY_PALIGEMMA = VLMConfig.from_dict(dict(
    vision=sizes.vit("Ti/16", "siglip", image_size=16, patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64),
    decoder=sizes.lm("gemma-2b", vocab_size=103, width=32, depth=2, num_heads=2, num_kv_heads=1, head_dim=16,
                     mlp_dim=64),
    image_token_id=102, projector="linear", vision_feature_layer=None, vision_feature_select="full", prefix_lm=True))


def _images(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.fixture(scope="module", params=[TINY_LLAVA, TINY_PALIGEMMA], ids=["llava", "paligemma"])
def vlm(request):
  config = request.param
  params = VLM(config).init(jax.random.key(0), **config.example_inputs(1))
  return config, nn.meta.unbox(params)


@pytest.mark.parametrize("name", ["shapes_tiny", "llava_1_5_7b", "paligemma_3b_224"])
def test_output_shapes_for_every_config(name):
  config = VLMConfig.from_dict(importlib.import_module(f"configs.{name}").get_config().model)
  inputs = config.example_inputs(2)
  model = VLM(config)
  params = abstract_params(config)
  logits, cache = jax.eval_shape(lambda p: model.apply({"params": p}, **inputs), nn.meta.unbox(params))
  assert logits.shape == (2, config.tokens_per_image + 8, config.decoder.vocab_size)
  assert logits.dtype == jnp.float32 and cache is None
  image_embeddings = jax.eval_shape(lambda p: model.apply({"params": p}, inputs["pixel_values"],
                                                          method=VLM.encode_images), nn.meta.unbox(params))
  assert image_embeddings.shape == (2, config.tokens_per_image, config.decoder.width)


def test_shapes_tiny_runs_for_real():
  config = VLMConfig.from_dict(importlib.import_module("configs.shapes_tiny").get_config().model)
  inputs = config.example_inputs(2)
  variables = VLM(config).init(jax.random.key(0), **inputs)
  logits, _ = jax.jit(VLM(config).apply)(variables, **inputs)
  assert config.tokens_per_image == 16  # 64 patches, 2 x 2 merged
  assert logits.shape == (2, 16 + 8, 512) and bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize("name,published", [("llava_1_5_7b", 7.06e9), ("paligemma_3b_224", 2.92e9)])
def test_parameter_counts_match_published_sizes_without_allocation(name, published):
  config = VLMConfig.from_dict(importlib.import_module(f"configs.{name}").get_config().model)
  params = abstract_params(config)  # ShapeDtypeStructs only: 7B float32 parameters would need 28 GB
  assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(nn.meta.unbox(params)))
  count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(nn.meta.unbox(params)))
  assert abs(count - published) / published < 0.005, f"{name}: {count:,} parameters vs published {published:,.0f}"


def _ids_with_images(config, rows):
  """rows: list of (text_before, number_of_images, text_after) -> int[B, T] right-padded with token 0."""
  rng = np.random.default_rng(0)
  sequences = []
  for before, images, after in rows:
    text = lambda n: list(rng.integers(1, config.image_token_id, n))
    sequences.append(text(before) + [config.image_token_id] * (images * config.tokens_per_image) + text(after))
  length = max(map(len, sequences))
  return jnp.asarray([s + [0] * (length - len(s)) for s in sequences], jnp.int32)


def test_splicing_equals_feeding_the_projected_image_embeddings_by_hand(vlm):
  config, params = vlm
  model = VLM(config)
  # Row 0: two images between text; row 1: one image; row 2: text only.
  input_ids = _ids_with_images(config, [(2, 2, 3), (1, 1, 5), (7, 0, 0)])
  pixel_values = _images((3, 2, 16, 16, 3))
  prefix = jnp.full((3,), input_ids.shape[1], jnp.int32) if config.prefix_lm else None
  logits, _ = model.apply(params, input_ids, pixel_values, prefix_lengths=prefix)

  image_embeddings = np.asarray(model.apply(params, pixel_values, method=VLM.encode_images))  # [B, 2P, D]
  by_hand = np.array(model.apply(params, jnp.where(input_ids == config.image_token_id, 0, input_ids),
                                   method=lambda m, ids: m.decoder.embed(ids)))
  for row in range(3):
    slots = np.flatnonzero(np.asarray(input_ids[row]) == config.image_token_id)
    by_hand[row, slots] = image_embeddings[row, :len(slots)]
  positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
  expected, _ = model.apply(params, None, positions, embeddings=jnp.asarray(by_hand), prefix_lengths=prefix,
                            method=lambda m, *a, **k: m.decoder(*a, **k))
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
  # The images matter: other pixels change rows 0 and 1 but not the text-only row 2.
  other, _ = model.apply(params, input_ids, _images((3, 2, 16, 16, 3), seed=9), prefix_lengths=prefix)
  assert not np.allclose(other[:2], logits[:2], atol=1e-4)
  np.testing.assert_allclose(other[2], logits[2], rtol=1e-5, atol=1e-6)


def test_placeholder_ids_past_the_images_embed_as_ordinary_tokens(vlm):
  config, params = vlm
  model = VLM(config)
  input_ids = _ids_with_images(config, [(2, 1, 3)]).at[0, -1].set(config.image_token_id)  # one more, generated
  image_embeddings = model.apply(params, _images((1, 16, 16, 3)), method=VLM.encode_images)
  embedded = model.apply(params, input_ids, image_embeddings, method=VLM.embed)
  as_text = model.apply(params, input_ids, None, method=VLM.embed)
  np.testing.assert_array_equal(embedded[0, -1], as_text[0, -1])
  np.testing.assert_array_equal(embedded[0, 2:2 + config.tokens_per_image], image_embeddings[0])


def test_text_only_batch_needs_no_pixels(vlm):
  config, params = vlm
  input_ids = _ids_with_images(config, [(5, 0, 0)])
  prefix = jnp.array([5]) if config.prefix_lm else None
  with_pixels, _ = VLM(config).apply(params, input_ids, _images((1, 16, 16, 3)), prefix_lengths=prefix)
  without, _ = VLM(config).apply(params, input_ids, None, prefix_lengths=prefix)
  np.testing.assert_allclose(with_pixels, without, rtol=1e-6)


def test_cached_decoding_of_a_vlm_equals_its_full_forward(vlm):
  config, params = vlm
  model = VLM(config)
  input_ids = _ids_with_images(config, [(1, 1, 4)])
  length = input_ids.shape[1]
  prompt = length - 2
  prefix = jnp.array([prompt]) if config.prefix_lm else None
  pixels = _images((1, 16, 16, 3), seed=4)
  full, _ = model.apply(params, input_ids, pixels, prefix_lengths=prefix)
  cache = config.decoder.init_cache(batch_size=1, max_len=length + 3)
  first, cache = model.apply(params, input_ids[:, :prompt], pixels, cache=cache, prefix_lengths=prefix)
  np.testing.assert_allclose(first, full[:, :prompt], rtol=1e-4, atol=1e-4)
  for t in range(prompt, length):
    step, cache = model.apply(params, input_ids[:, t:t + 1], None, jnp.array([[t]]), cache, prefix_lengths=prefix)
    np.testing.assert_allclose(step[:, 0], full[:, t], rtol=1e-4, atol=1e-4)


def test_prefix_lm_model_requires_prefix_lengths():
  params = nn.meta.unbox(VLM(TINY_PALIGEMMA).init(jax.random.key(0), **TINY_PALIGEMMA.example_inputs(1)))
  inputs = TINY_PALIGEMMA.example_inputs(1)
  inputs.pop("prefix_lengths")
  with pytest.raises(ValueError, match="needs prefix_lengths"):
    VLM(TINY_PALIGEMMA).apply(params, **inputs)


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match=r"model.image_token_id=500 is outside the vocabulary"):
    TINY_LLAVA.replace(image_token_id=500)
  with pytest.raises(ValueError, match=r"model.projector must be one of"):
    TINY_LLAVA.replace(projector="mlp3x")
  with pytest.raises(ValueError, match=r"model: unknown keys \['vision_featur_layer'\]"):
    VLMConfig.from_dict(dict(vision={}, decoder={}, image_token_id=1, vision_featur_layer=-2))
  with pytest.raises(ValueError, match=r"model.vision: unknown keys \['patch'\]"):
    VLMConfig.from_dict(dict(vision={"patch": 3}, decoder={}, image_token_id=1))


def test_a_tower_section_overrides_the_model_wide_dtype_and_scan():
  # A bfloat16, unscanned language model over a float32, scanned vision tower.
  mixed = VLMConfig.from_dict({**TINY_LLAVA_MODEL, "dtype": "bfloat16", "scan_layers": False,
                               "vision": {**TINY_LLAVA_MODEL["vision"], "dtype": "float32", "scan_layers": True}})
  assert (mixed.vision.dtype, mixed.vision.scan_layers) == ("float32", True)
  assert (mixed.decoder.dtype, mixed.decoder.scan_layers) == ("bfloat16", False)
  uniform = VLMConfig.from_dict({**TINY_LLAVA_MODEL, "dtype": "bfloat16"})
  assert uniform.vision.dtype == uniform.decoder.dtype == "bfloat16"

  inputs = TINY_LLAVA.example_inputs(2, seed=0)
  reference = nn.meta.unbox(VLM(TINY_LLAVA).init(jax.random.key(0), **inputs))
  params = nn.meta.unbox(VLM(mixed).init(jax.random.key(0), **inputs))
  vision_tokens = VLM(mixed).apply(params, inputs["pixel_values"], method=lambda m, x: m.vision(x, feature_layer=-2))
  assert vision_tokens.dtype == jnp.float32
  # The same weights (the unscanned decoder's layers unstacked) give the float32 model's logits to bfloat16
  # precision.
  decoder = unstack_layers(reference["params"]["decoder"])
  assert jax.tree.structure(decoder) == jax.tree.structure(params["params"]["decoder"])
  params = {"params": {**reference["params"], "decoder": decoder}}
  expected, _ = VLM(TINY_LLAVA).apply(reference, **inputs)
  logits, _ = VLM(mixed).apply(params, **inputs)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, expected, atol=0.05 * float(jnp.abs(expected).max()))


def test_merging_neighbouring_image_tokens():
  from vlmjax.models.vlm import merge_neighbours
  tokens = jnp.arange(2 * 16 * 3, dtype=jnp.float32).reshape(2, 16, 3)  # a 4 x 4 grid of 3-wide tokens
  merged = merge_neighbours(tokens, 2)
  assert merged.shape == (2, 4, 12)
  grid = np.asarray(tokens).reshape(2, 4, 4, 3)
  # Output token 1 is the top-right 2 x 2 block: rows 0-1, columns 2-3, row-major.
  np.testing.assert_array_equal(merged[:, 1], np.concatenate([grid[:, 0, 2], grid[:, 0, 3], grid[:, 1, 2],
                                                              grid[:, 1, 3]], axis=-1))
  config = TINY_PALIGEMMA.replace(image_token_merge=2)
  assert config.tokens_per_image == 1  # a 2 x 2 patch grid becomes one token
  params = nn.meta.unbox(VLM(config).init(jax.random.key(0), **config.example_inputs(1)))
  logits, _ = VLM(config).apply(params, **config.example_inputs(2))
  assert logits.shape == (2, 9, config.decoder.vocab_size)
  with pytest.raises(ValueError, match=r"image_token_merge=3 must divide the patch grid \(2 x 2\)"):
    TINY_PALIGEMMA.replace(image_token_merge=3)
  with pytest.raises(ValueError, match=r"image_token_merge needs patch tokens only"):
    TINY_LLAVA.replace(vision_feature_select="full", image_token_merge=2)


def test_image_position_embedding_adds_a_learned_table_started_at_sincos():
  config = TINY_PALIGEMMA.replace(vision=TINY_PALIGEMMA.vision.replace(image_size=32),
                                  image_token_merge=2, vision_feature_select="default")
  with_positions = config.replace(image_position_embedding="sincos2d")
  inputs = with_positions.example_inputs(2, seed=0)
  params = nn.meta.unbox(VLM(with_positions).init(jax.random.key(0), **inputs))["params"]
  table = params["projector"]["position_embedding"]
  # A 2 x 2 grid of merged tokens; the init computes the table by a jitted program of its own.
  np.testing.assert_array_equal(table, jax.jit(sincos_2d, static_argnums=(0, 1))(2, config.decoder.width))
  plain = {**params, "projector": {k: v for k, v in params["projector"].items() if k != "position_embedding"}}
  encode = lambda cfg, p: VLM(cfg).apply({"params": p}, inputs["pixel_values"], method=VLM.encode_images)
  # The projector's output with the table added, one row per token of the grid.
  np.testing.assert_allclose(encode(with_positions, params), encode(config, plain) + table[None], rtol=1e-6,
                             atol=1e-6)
  # It is the projector's: the align and finetune stages train it.
  assert optim.trainable_labels(params, "align")["projector"]["position_embedding"] == "train"
  # Scaled: centred over the tokens, root mean square 3 (the raw table is nearly constant on a small grid).
  scaled = with_positions.replace(image_position_scale=3.0)
  scaled_params = nn.meta.unbox(VLM(scaled).init(jax.random.key(0), **inputs))["params"]
  scaled_table = scaled_params["projector"]["position_embedding"]
  centred = table - table.mean(0)
  np.testing.assert_allclose(scaled_table, 3.0 * centred / np.sqrt(np.mean(centred**2)), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"image_position_scale=2.0 needs a table to scale"):
    config.replace(image_position_scale=2.0)
  with pytest.raises(ValueError, match=r"model.image_position_embedding must be one of"):
    config.replace(image_position_embedding="rope")
  with pytest.raises(ValueError, match=r"image_position_embedding needs patch tokens only"):
    TINY_LLAVA.replace(vision_feature_select="full", image_token_merge=1, image_position_embedding="sincos2d")
