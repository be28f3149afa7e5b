"""The CLIP dual tower for contrastive pretraining: a ViT and a causal text transformer, each projected to a
shared embedding space, with a learnable temperature (and, for the SigLIP sigmoid loss, a learnable bias).

    image_embeddings, text_embeddings, logit_scale, logit_bias = clip.apply(params, images, text_ids, text_mask)

The logits of the contrastive losses are `logit_scale * image_embeddings @ text_embeddings.T + logit_bias`.
"""

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlmjax.models import activation as activation_lib, layers
from vlmjax.models.config import (ModelConfig, build_towers, check_choice, check_divides, check_positive, dtype,
                                  pretraining_section)
from vlmjax.models.vit import Encoder, ViT, ViTConfig


@dataclasses.dataclass(frozen=True)
class TextConfig(ModelConfig):
  vocab_size: int = 49408
  context_length: int = 77
  width: int = 512
  depth: int = 12
  num_heads: int = 8
  mlp_dim: int = 2048
  activation: str = "quick_gelu"
  norm_eps: float = 1e-5
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = True
  remat_policy: str = "none"

  def __post_init__(self):
    where = "text"
    check_positive(self, where, "vocab_size", "context_length", "width", "depth", "num_heads", "mlp_dim")
    check_divides(self.num_heads, self.width, f"{where}.width={self.width} must split evenly into "
                  f"{where}.num_heads={self.num_heads} heads")
    check_choice(self.activation, tuple(activation_lib.ACTIVATIONS), f"{where}.activation")


@dataclasses.dataclass(frozen=True)
class CLIPConfig(ModelConfig):
  vision: ViTConfig
  text: TextConfig
  embed_dim: int = 512
  pooling: str = "cls"  # image pooling: the class token ('cls') or the mean of the patch tokens ('mean')
  temperature_init: float = 1 / 0.07  # CLIP: 1/0.07; SigLIP: 10
  bias_init: float = 0.0  # SigLIP: -10
  loss: str = "softmax"  # CLIP's InfoNCE ('softmax') or SigLIP's pairwise 'sigmoid' loss

  def __post_init__(self):
    check_choice(self.pooling, ("cls", "mean"), "model.pooling")
    check_choice(self.loss, ("softmax", "sigmoid"), "model.loss")
    if self.pooling == "cls" and not self.vision.cls_token:
      raise ValueError("model.pooling='cls' needs a class token: set model.vision.cls_token=True or pooling='mean'")

  @classmethod
  def from_dict(cls, values: Mapping[str, Any], where: str = "model") -> "CLIPConfig":
    """From the `model` section of a config: `vision`, `text`, the keys of CLIPConfig and SHARED_KEYS."""
    values = build_towers(values, {"vision": ViTConfig, "text": TextConfig}, where)
    return super().from_dict(values, where)


class TextTower(nn.Module):
  """Token ids int[B, T] (+ padding mask) -> the last valid token's features float[B, D] (CLIP pools at EOS)."""

  config: TextConfig

  @nn.compact
  def __call__(self, text_ids: jax.Array, text_mask: jax.Array) -> jax.Array:
    cfg = self.config
    compute_dtype, param_dtype = dtype(cfg.dtype), dtype(cfg.param_dtype)
    batch, length = text_ids.shape
    if length > cfg.context_length:
      raise ValueError(f"text of {length} tokens is longer than text.context_length={cfg.context_length}")
    embedding = self.param("embedding", layers.param_init(nn.initializers.normal(0.02), (layers.VOCAB, layers.EMBED)),
                           (cfg.vocab_size, cfg.width), param_dtype)
    positions = self.param("position_embedding", layers.param_init(nn.initializers.normal(0.01),
                                                                   (None, layers.EMBED)),
                           (cfg.context_length, cfg.width), param_dtype)
    x = (jnp.take(embedding, text_ids, axis=0) + positions[:length]).astype(compute_dtype)  # [B, T, D]
    index = jnp.broadcast_to(jnp.arange(length), (batch, length))
    mask = layers.make_attention_mask(index, index, kv_valid=text_mask)
    x, _ = Encoder(depth=cfg.depth, width=cfg.width, num_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim,
                   activation=cfg.activation, norm_eps=cfg.norm_eps, scan_layers=cfg.scan_layers,
                   remat_policy=cfg.remat_policy, dtype=compute_dtype, param_dtype=param_dtype,
                   name="encoder")(x, mask)
    x = layers.LayerNorm(eps=cfg.norm_eps, dtype=compute_dtype, param_dtype=param_dtype, name="final_norm")(x)
    last = jnp.maximum(jnp.sum(text_mask, axis=1) - 1, 0)  # [B]
    return jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]  # [B, D]


class CLIP(nn.Module):
  config: CLIPConfig

  @nn.compact
  def __call__(self, images: jax.Array, text_ids: jax.Array, text_mask: jax.Array):
    """Args:
      images: float[B, H, W, 3] normalized; text_ids: int[B', T]; text_mask: bool[B', T] (right padding).
    Returns:
      (image embeddings float32[B, E] and text embeddings float32[B', E], unit norm; logit_scale and
      logit_bias, float32 scalars, logit_scale = exp(the learned log-temperature)).
    """
    cfg = self.config
    param_dtype = dtype(cfg.vision.param_dtype)
    tokens = ViT(cfg.vision, name="vision")(images)  # [B, P(+1), Dv]
    pooled_image = tokens[:, 0] if cfg.pooling == "cls" else jnp.mean(tokens, axis=1)
    pooled_text = TextTower(cfg.text, name="text")(text_ids, text_mask)

    def project(name, x):
      return nn.Dense(cfg.embed_dim, use_bias=False, param_dtype=param_dtype, name=name,
                      kernel_init=layers.param_init(nn.initializers.lecun_normal(), (layers.EMBED, layers.MLP)))(x)

    image_embeddings = _unit(project("image_projection", pooled_image))
    text_embeddings = _unit(project("text_projection", pooled_text))
    log_scale = self.param("log_temperature", layers.param_init(nn.initializers.constant(
        math.log(cfg.temperature_init)), ()), (), jnp.float32)
    bias = self.param("logit_bias", layers.param_init(nn.initializers.constant(cfg.bias_init), ()), (), jnp.float32)
    return image_embeddings, text_embeddings, jnp.exp(log_scale), bias


def _unit(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


def clip_config(config: Mapping[str, Any]) -> CLIPConfig:
  """The dual tower of a run config's contrastive stage: the run's `model.vision` with the `contrastive` section's
  text tower, embedding size, pooling, loss and temperature (every key but the stage's training settings)."""
  return CLIPConfig.from_dict(pretraining_section(config, "contrastive"), "contrastive")
