import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sizes
from vlmjax.models.vit import ConvStem, ViT, ViTConfig, resize_position_embeddings

CLIP = ViTConfig.from_dict(sizes.vit("Ti/16", "clip", image_size=32, patch_size=8, width=32, depth=3, num_heads=2,
                                     mlp_dim=64))
SIGLIP = ViTConfig.from_dict(sizes.vit("Ti/16", "siglip", image_size=32, patch_size=8, width=32, depth=3,
                                       num_heads=2, mlp_dim=64))


def _images(batch, size, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, size, size, 3)), jnp.float32)


@pytest.fixture(scope="module", params=[CLIP, SIGLIP], ids=["clip", "siglip"])
def vit(request):
  config = request.param
  return config, nn.meta.unbox(ViT(config).init(jax.random.key(0), _images(1, 32)))


def test_output_shapes_and_variant_parameters(vit):
  config, params = vit
  tokens = ViT(config).apply(params, _images(2, 32))
  assert tokens.shape == (2, 16 + int(config.cls_token), 32)
  names = set(params["params"])
  assert ("cls_token" in names) == config.cls_token
  assert ("pre_norm" in names) == config.pre_norm
  assert ("bias" in params["params"]["patch_embedding"]) == config.patch_bias


def test_hidden_state_of_layer_i_equals_a_vit_cut_after_layer_i(vit):
  config, params = vit
  images = _images(2, 32, seed=1)
  two_layers = config.replace(depth=2, post_norm=False)
  cut = jax.tree.map(lambda x: x, params)
  cut["params"]["encoder"]["layers"] = jax.tree.map(lambda p: p[:2], params["params"]["encoder"]["layers"])
  cut["params"].pop("post_norm")
  expected = ViT(two_layers).apply(cut, images)
  for layer in (2, -2):
    np.testing.assert_allclose(ViT(config).apply(params, images, feature_layer=layer), expected, rtol=1e-5,
                               atol=1e-5)
  # The last hidden state is the final output before the post-LayerNorm.
  no_post = ViT(config.replace(post_norm=False)).apply({"params": {k: v for k, v in params["params"].items()
                                                                   if k != "post_norm"}}, images)
  np.testing.assert_allclose(ViT(config).apply(params, images, feature_layer=-1), no_post, rtol=1e-5, atol=1e-5)
  assert not np.allclose(ViT(config).apply(params, images), no_post, atol=1e-3)
  with pytest.raises(ValueError, match="feature layer 5 is out of range for a 3-layer ViT"):
    ViT(config).apply(params, images, feature_layer=5)


def test_scanned_encoder_equals_unrolled(vit):
  config, params = vit
  images = _images(2, 32, seed=2)
  unrolled = jax.tree.map(lambda x: x, params)
  layers = unrolled["params"]["encoder"].pop("layers")
  for i in range(config.depth):
    unrolled["params"]["encoder"][f"layers_{i}"] = jax.tree.map(lambda p: p[i], layers)
  np.testing.assert_allclose(ViT(config.replace(scan_layers=False)).apply(unrolled, images),
                             ViT(config).apply(params, images), rtol=1e-5, atol=1e-5)


def test_position_embeddings_interpolate_to_other_image_sizes(vit):
  config, params = vit
  tokens = ViT(config).apply(params, _images(1, 48))
  assert tokens.shape == (1, 36 + int(config.cls_token), 32)
  grid = params["params"]["position_embedding"][int(config.cls_token):]
  np.testing.assert_array_equal(resize_position_embeddings(grid, 4, (4, 4)), grid)
  constant = jnp.ones_like(grid) * jnp.arange(32.0)
  np.testing.assert_allclose(resize_position_embeddings(constant, 4, (6, 6)), jnp.ones((36, 32)) * jnp.arange(32.0),
                             rtol=1e-5)
  resized = resize_position_embeddings(grid, 4, (8, 8)).reshape(8, 8, 32)
  # Upsampling by 2 keeps each source cell's value near its 2x2 block (half-pixel centres).
  np.testing.assert_allclose(resized.mean(axis=(0, 1)), grid.mean(axis=0), atol=0.05)
  if not config.cls_token:
    # Without a class token, a uniform image with uniform positions gives the same token at any size.
    flat = jax.tree.map(lambda x: x, params)
    flat["params"]["position_embedding"] = jnp.ones_like(params["params"]["position_embedding"])
    small = ViT(config).apply(flat, jnp.ones((1, 32, 32, 3)))
    large = ViT(config).apply(flat, jnp.ones((1, 48, 48, 3)))
    np.testing.assert_allclose(small[0, -1], large[0, -1], rtol=1e-4, atol=1e-4)


def test_image_size_not_a_multiple_of_the_patch_size_is_an_error(vit):
  config, params = vit
  with pytest.raises(ValueError, match=r"image size 30x30 is not a multiple of vision.patch_size=8"):
    ViT(config).apply(params, _images(1, 30))
  with pytest.raises(ValueError, match=r"vision.image_size=30 must be a multiple of vision.patch_size=8"):
    config.replace(image_size=30)
  with pytest.raises(ValueError, match=r"vision.width=30 must split evenly into vision.num_heads=4 heads"):
    config.replace(width=30, num_heads=4)


def test_conv_stem_gives_the_patch_grid_and_is_translation_equivariant():
  config = SIGLIP.replace(stem="conv")
  params = nn.meta.unbox(ViT(config).init(jax.random.key(0), _images(1, 32)))
  assert "conv_stem" in params["params"] and params["params"]["patch_embedding"]["kernel"].shape[:2] == (1, 1)
  assert ViT(config).apply(params, _images(2, 32)).shape == (2, 16, 32)
  # Shifting the image by one patch shifts the stem's grid by one cell (away from the zero-padded border).
  stem = ConvStem(width=32, patch_size=8, norm_eps=1e-6)
  images = _images(1, 48, seed=3)
  stem_params = stem.init(jax.random.key(1), images)
  grid = stem.apply(stem_params, images)  # [1, 6, 6, 32]
  shifted = stem.apply(stem_params, jnp.roll(images, 8, axis=2))
  np.testing.assert_allclose(shifted[:, 1:5, 2:5], grid[:, 1:5, 1:4], rtol=1e-5, atol=1e-5)
  assert not np.allclose(shifted[:, 1:5, 1:4], grid[:, 1:5, 1:4], atol=1e-3)


def test_conv_stem_needs_a_power_of_two_patch():
  with pytest.raises(ValueError, match="patch_size=14 must be a power of two"):
    ViTConfig.from_dict(sizes.vit("Ti/16", "siglip", image_size=28, patch_size=14, stem="conv"))


@pytest.mark.parametrize("variant", [CLIP, SIGLIP], ids=["clip", "siglip"])
def test_sincos2d_position_embeddings_start_as_the_2d_sine_cosine_table(variant):
  config = variant.replace(position_embedding_init="sincos2d")
  params = nn.meta.unbox(ViT(config).init(jax.random.key(0), _images(1, 32)))
  positions = np.asarray(params["params"]["position_embedding"])  # [cls + 16, 32]
  if config.cls_token:
    np.testing.assert_array_equal(positions[0], 0.0)
  table = positions[int(config.cls_token):]
  rows, columns = np.divmod(np.arange(16), 4)  # a 4 x 4 patch grid in raster order
  omega = 1.0 / 10_000.0 ** (np.arange(8) / 7)  # width/4 = 8 frequencies
  expected = np.concatenate([np.sin(columns[:, None] * omega), np.cos(columns[:, None] * omega),
                             np.sin(rows[:, None] * omega), np.cos(rows[:, None] * omega)], axis=1)
  np.testing.assert_allclose(table, expected, rtol=1e-6, atol=1e-6)
  # The default stays CLIP's and SigLIP's small random start.
  default = nn.meta.unbox(ViT(variant).init(jax.random.key(0), _images(1, 32)))["params"]["position_embedding"]
  assert float(np.abs(default).max()) < 0.2


def test_position_embedding_init_is_checked():
  with pytest.raises(ValueError, match="position_embedding_init"):
    SIGLIP.replace(position_embedding_init="rope")
  with pytest.raises(ValueError, match="width=30 must be a multiple of 4"):
    SIGLIP.replace(width=30, num_heads=2, position_embedding_init="sincos2d")
