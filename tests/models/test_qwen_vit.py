"""Qwen2.5-VL's vision attention against `jax.nn.dot_product_attention` over the whole mask it replaces (windows and
full attention over two images and padding, in key blocks that split the images (CPU) or in chunks, a traced `full`
under `nn.scan`), Qwen2.5-VL's and Qwen2-VL's towers scanned and unrolled, and the window bucket's padding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmjax import runtime
from vlmjax.models import blockwise_attention, qwen_vl
from vlmjax.models.qwen_vit import (QwenViT, QwenViTConfig, full_attention, full_attention_chunk,
                                    windowed_attention)

WINDOW, HEADS, HEAD_DIM = 16, 2, 8
# Two images and padding over 6 windows: image 0 fills windows 0-2 (its last window half padding), image 1
# windows 3-4, window 5 is padding.
IDS = np.concatenate([np.zeros(40), -np.ones(8), np.ones(32), -np.ones(16)]).astype(np.int32)


def _qkv(seed: int = 0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return [jax.random.normal(k, (len(IDS), HEADS, HEAD_DIM)) for k in keys]


def _reference(query, key, value, mask):
  """jax.nn.dot_product_attention of float[N, heads, H] under bool[N, N]."""
  return jax.nn.dot_product_attention(query[None], key[None], value[None], mask=mask[None, None])[0]


def test_windowed_attention_equals_the_masked_whole():
  query, key, value = _qkv()
  window = np.arange(len(IDS)) // WINDOW
  mask = (IDS[:, None] == IDS[None, :]) & (window[:, None] == window[None, :])
  with jax.default_matmul_precision("highest"):
    np.testing.assert_allclose(windowed_attention(query, key, value, jnp.asarray(IDS), WINDOW),
                               _reference(query, key, value, mask), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cpu_tuned,block", [(True, 16), (True, 24), (True, 64), (False, 16), (False, 32),
                                             (False, 96)])
def test_full_attention_equals_the_masked_whole(cpu_tuned, block, monkeypatch):
  """The CPU's blockwise attention in blocks of 16, 24 and 64 patches, which split images and padding (a query's
  first key blocks may hold none of its image's keys); elsewhere chunks of whole windows of queries against every
  key."""
  monkeypatch.setattr(blockwise_attention, "BLOCK", block)
  query, key, value = _qkv(1)
  with jax.default_matmul_precision("highest"), runtime.cpu_tuning(cpu_tuned):
    ours = full_attention(query, key, value, jnp.asarray(IDS), block)
  expected = _reference(query, key, value, IDS[:, None] == IDS[None, :])
  patches = IDS >= 0  # padding's outputs are left unspecified (the CPU's skip the blocks past the patches)
  np.testing.assert_allclose(ours[patches], expected[patches], rtol=1e-5, atol=1e-6)
  assert np.all(np.isfinite(ours))


def test_full_attention_chunk_is_whole_windows_dividing_the_patches():
  assert full_attention_chunk(160 * 64, 64) == 256  # 4 windows of 64 patches
  assert full_attention_chunk(7 * 64, 64) == 64  # 7 windows: one at a time
  assert full_attention_chunk(6 * 16, 16) == 96  # 6 of 16 windows fit in 256 patches
  assert full_attention_chunk(2 * 1024, 1024) == 1024  # a window larger than the chunk: one window


# Qwen2.5-VL's blocks (RMSNorm, gated MLP, windows but block 1) and Qwen2-VL's (LayerNorm, plain MLP, all full).
FAMILIES = {"qwen2_5_vl": dict(fullatt_block_indexes=(1,)),
            "qwen2_vl": dict(fullatt_block_indexes=(0, 1, 2), norm="layernorm", gated_mlp=False,
                             activation="quick_gelu")}


@pytest.mark.parametrize("family", FAMILIES)
def test_scanned_and_unrolled_towers_agree(family):
  """Under `nn.scan` the blocks choose windowed or full attention with `lax.cond` on a traced flag (Qwen2-VL's all
  attend over the whole image)."""
  config = QwenViTConfig(patch_size=2, width=16, depth=3, num_heads=2, mlp_dim=24, out_width=8, window_size=8,
                         scan_layers=True, **FAMILIES[family])
  num = len(IDS)  # 6 windows of (8 / 2)² = 16 patches
  rng = np.random.default_rng(0)
  pixels = rng.standard_normal((num, config.patch_dim)).astype(np.float32)
  positions = rng.integers(0, 8, (num, 2)).astype(np.int32)
  params = QwenViT(config).init(jax.random.key(0), pixels, positions, IDS)["params"]
  unrolled = dataclasses.replace(config, scan_layers=False)
  per_layer = {**{k: v for k, v in params.items() if k != "layers"},
               **{f"layers_{i}": jax.tree.map(lambda x, i=i: x[i], params["layers"]) for i in range(config.depth)}}
  with jax.default_matmul_precision("highest"):
    scanned = QwenViT(config).apply({"params": params}, pixels, positions, IDS)
    np.testing.assert_allclose(QwenViT(unrolled).apply({"params": per_layer}, pixels, positions, IDS), scanned,
                               rtol=1e-5, atol=1e-6)


def test_window_bucket_pads_under_an_eighth():
  assert [qwen_vl.window_bucket(n) for n in (1, 3, 9, 16, 17, 144, 145, 160, 161, 257)] == [
      1, 4, 16, 16, 18, 144, 160, 160, 176, 288]
  for count in range(17, 2000):
    padded = qwen_vl.window_bucket(count)
    assert count <= padded < 1.125 * count, count
