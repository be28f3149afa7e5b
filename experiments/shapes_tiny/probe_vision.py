"""How fast can a vision encoder learn what the shapes VQA questions need? A supervised probe.

    python experiments/shapes_tiny/probe_vision.py --data_dir runs/shapes/data --encoder vit --steps 300

The encoder (the config's ViT, a per-patch MLP, or three strided convolutions) is trained alone with one
attention-pooling head per label to say which colours (8), which shapes (5) and which (shape, colour) pairs (40)
an image holds; every 50 steps it prints, on 256 validation images, the fraction of colour and shape labels
right and of images whose 40 pair labels are all right.
"""

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from ml_collections import config_flags

from vlmjax.data import shapes, shapes_scene
from vlmjax.models.vit import ViT, ViTConfig

_CONFIG = config_flags.DEFINE_config_file("config", "configs/shapes_tiny.py", "Experiment config (its ViT).")
_DATA_DIR = flags.DEFINE_string("data_dir", "runs/shapes/data", "A built shapes data set.")
_ENCODER = flags.DEFINE_enum("encoder", "vit", ["vit", "mlp", "conv"], "What to probe.")
_STEPS = flags.DEFINE_integer("steps", 300, "Training steps.")
_LR = flags.DEFINE_float("learning_rate", 1e-3, "Peak AdamW learning rate.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Images per step.")

COLOURS, SHAPES = list(shapes_scene.COLOURS), list(shapes_scene.SHAPES)
PAIRS = len(SHAPES) * len(COLOURS)
LABELS = PAIRS + len(COLOURS) + len(SHAPES)


def arrays(source, indices) -> tuple[np.ndarray, np.ndarray]:
  """-> (pixels float[N, H, W, 3] in [-1, 1], labels float[N, LABELS]: pairs, colours, shapes present)."""
  pixels = np.stack([source[i]["image"] for i in indices]).astype(np.float32) / 127.5 - 1
  pairs = np.zeros((len(indices), len(SHAPES), len(COLOURS)), np.float32)
  for row, i in enumerate(indices):
    for obj in source[i]["scene"]:
      pairs[row, SHAPES.index(obj["shape"]), COLOURS.index(obj["colour"])] = 1
  return pixels, np.concatenate([pairs.reshape(len(indices), PAIRS), pairs.any(1), pairs.any(2)], axis=1)


class Probe(nn.Module):
  vit: ViTConfig
  encoder: str

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """images float[N, H, W, 3] -> label logits float[N, LABELS]."""
    width = self.vit.width
    if self.encoder == "vit":
      tokens = ViT(self.vit)(images)
    elif self.encoder == "mlp":
      patch = self.vit.patch_size
      tokens = nn.Dense(width)(nn.gelu(nn.Conv(width, (patch, patch), strides=patch)(images)))
    else:
      x = images
      for channels in (width // 4, width // 2, width):
        x = nn.gelu(nn.LayerNorm()(nn.Conv(channels, (3, 3), strides=2)(x)))
      tokens = nn.Dense(width)(x)
    tokens = tokens.reshape(images.shape[0], -1, width)  # [N, P, D]
    queries = self.param("queries", nn.initializers.normal(0.02), (LABELS, width))
    weights = jax.nn.softmax(jnp.einsum("ld,npd->nlp", queries, tokens), axis=-1)
    return nn.Dense(1)(jnp.einsum("nlp,npd->nld", weights, tokens))[..., 0]


def main(argv):
  del argv
  probe = Probe(ViTConfig.from_dict(_CONFIG.value.model.vision), _ENCODER.value)
  train, validation = shapes.load(_DATA_DIR.value, "train"), shapes.load(_DATA_DIR.value, "validation")
  size = probe.vit.image_size
  params = probe.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))
  schedule = optax.warmup_cosine_decay_schedule(0, _LR.value, 20, _STEPS.value, _LR.value * 0.1)
  optimizer = optax.adamw(schedule, weight_decay=0.05)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, pixels, labels):
    loss = lambda p: optax.sigmoid_binary_cross_entropy(probe.apply(p, pixels), labels).mean()
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  val_pixels, val_labels = arrays(validation, range(256))
  rng, start = np.random.default_rng(0), time.perf_counter()
  for i in range(1, _STEPS.value + 1):
    params, opt_state, loss = step(params, opt_state, *arrays(train, rng.integers(0, len(train), _BATCH.value)))
    if i % 50 == 0:
      right = (np.asarray(probe.apply(params, val_pixels)) > 0) == (val_labels > 0)
      print(f"step {i}: loss {float(loss):.4f}, colour present {right[:, PAIRS:PAIRS + len(COLOURS)].mean():.3f}, "
            f"shape present {right[:, PAIRS + len(COLOURS):].mean():.3f}, every pair right "
            f"{right[:, :PAIRS].all(1).mean():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
  app.run(main)
