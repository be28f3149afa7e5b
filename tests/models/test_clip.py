import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sizes
from vlmjax.models.clip import CLIP, CLIPConfig

CONFIG = CLIPConfig.from_dict(dict(
    vision=sizes.vit("Ti/16", "clip", image_size=16, patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64),
    text=dict(vocab_size=50, context_length=10, width=32, depth=2, num_heads=2, mlp_dim=64),
    embed_dim=24))


@pytest.fixture(scope="module")
def clip():
  images = jnp.zeros((2, 16, 16, 3))
  text = jnp.ones((3, 6), jnp.int32)
  params = nn.meta.unbox(CLIP(CONFIG).init(jax.random.key(0), images, text, text > 0))
  return params


def test_embeddings_are_unit_vectors_with_a_learned_temperature(clip):
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.standard_normal((2, 16, 16, 3)), jnp.float32)
  text = jnp.asarray(rng.integers(1, 50, (3, 6)), jnp.int32)
  image_embeddings, text_embeddings, scale, bias = CLIP(CONFIG).apply(clip, images, text, text > 0)
  assert image_embeddings.shape == (2, 24) and text_embeddings.shape == (3, 24)
  np.testing.assert_allclose(jnp.linalg.norm(image_embeddings, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(text_embeddings, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(scale, 1 / 0.07, rtol=1e-5)
  assert float(bias) == 0.0


def test_text_pools_the_last_valid_token_and_ignores_padding(clip):
  rng = np.random.default_rng(1)
  images = jnp.zeros((1, 16, 16, 3))
  text = jnp.asarray(rng.integers(1, 50, (1, 6)), jnp.int32)
  mask = jnp.arange(6)[None] < 4
  _, pooled, _, _ = CLIP(CONFIG).apply(clip, images, text, mask)
  garbage = text.at[:, 4:].set(7)
  _, pooled_other_padding, _, _ = CLIP(CONFIG).apply(clip, images, garbage, mask)
  np.testing.assert_allclose(pooled, pooled_other_padding, rtol=1e-5, atol=1e-6)
  _, truncated, _, _ = CLIP(CONFIG).apply(clip, images, text[:, :4], mask[:, :4])
  np.testing.assert_allclose(pooled, truncated, rtol=1e-5, atol=1e-6)
  _, causal_prefix, _, _ = CLIP(CONFIG).apply(clip, images, text, jnp.arange(6)[None] < 3)
  assert not np.allclose(pooled, causal_prefix, atol=1e-4)


def test_bad_configs():
  with pytest.raises(ValueError, match="pooling='cls' needs a class token"):
    CLIPConfig.from_dict(dict(vision=sizes.vit("Ti/16", "siglip", image_size=16, patch_size=8), text={}))
  with pytest.raises(ValueError, match=r"text.width=30 must split evenly into text.num_heads=4 heads"):
    CONFIG.text.replace(width=30, num_heads=4)
