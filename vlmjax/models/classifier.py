"""A ViT with a multi-label classification head, for supervised pretraining of the vision tower.

    logits = ViTClassifier(config).apply(params, images)   # float32[B, num_labels], one sigmoid per label

The ViT was first trained this way (ImageNet-21k, JFT: sigmoid cross-entropy over many labels per image). The
head is a per-token MLP layer max-pooled over the tokens, then one logit per label. A VLM stage after a
`classify` stage starts from its vision tower; the head is dropped.
"""

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlmjax.models import layers
from vlmjax.models.config import ModelConfig, build_towers, check_positive, dtype
from vlmjax.models.vit import ViT, ViTConfig


@dataclasses.dataclass(frozen=True)
class ClassifierConfig(ModelConfig):
  vision: ViTConfig
  num_labels: int = 1000
  head_mlp_dim: int = 512

  def __post_init__(self):
    check_positive(self, "classify", "num_labels", "head_mlp_dim")

  @classmethod
  def from_dict(cls, values: Mapping[str, Any], where: str = "classify") -> "ClassifierConfig":
    """From the run's `model.vision` plus the `classify` section's keys (and SHARED_KEYS)."""
    return super().from_dict(build_towers(values, {"vision": ViTConfig}, where), where)


class MaxPoolHead(nn.Module):
  """tokens float[B, N, D] -> float[B, mlp_dim]: a per-token MLP layer, then the maximum over the tokens. An
  object label asks whether the object is anywhere in the image, which a maximum over the patches answers
  directly; it learned the shapes labels faster than attention pooling."""

  mlp_dim: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    hidden = nn.Dense(self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="hidden",
                      kernel_init=layers.param_init(nn.initializers.lecun_normal(), (layers.EMBED, layers.MLP)),
                      bias_init=layers.param_init(nn.initializers.zeros, (layers.MLP,)))(tokens)
    return jnp.max(nn.gelu(hidden), axis=1)


class ViTClassifier(nn.Module):
  config: ClassifierConfig

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """images float[B, H, W, 3] (normalized) -> label logits float32[B, num_labels]."""
    cfg = self.config
    compute_dtype, param_dtype = dtype(cfg.vision.dtype), dtype(cfg.vision.param_dtype)
    tokens = ViT(cfg.vision, name="vision")(images)  # [B, P(+1), D]
    pooled = MaxPoolHead(cfg.head_mlp_dim, dtype=compute_dtype, param_dtype=param_dtype, name="head")(tokens)
    logits = nn.Dense(cfg.num_labels, param_dtype=param_dtype, name="classifier",
                      kernel_init=layers.param_init(nn.initializers.zeros, (layers.MLP, None)),
                      bias_init=layers.param_init(nn.initializers.constant(-2.0), (None,)))(pooled)
    return logits.astype(jnp.float32)
