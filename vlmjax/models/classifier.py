"""A ViT with a per-patch classification head, for supervised pretraining of the vision tower.

    logits = ViTClassifier(config).apply(params, images)   # float32[B, P, sum(config.label_classes)]

Every patch token says what lies under it: one softmax per attribute group (`label_classes`, e.g. the shape,
colour and size of the object at the patch's centre, class 0 meaning none), as dense-prediction pretraining
(segmentation, detection) trains a tower. A label per patch is a far denser signal than one multi-label target
per image: on the shapes data the tower learns which shape an object is in about half the steps. A VLM stage
after a `classify` stage starts from its vision tower; the head is dropped.
"""

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vlmjax.models import layers
from vlmjax.models.config import ModelConfig, build_towers, check_positive, dtype
from vlmjax.models.vit import ViT, ViTConfig


@dataclasses.dataclass(frozen=True)
class ClassifierConfig(ModelConfig):
  vision: ViTConfig
  label_classes: tuple[int, ...] = (2,)  # classes of each attribute group, "none" included
  head_mlp_dim: int = 512

  def __post_init__(self):
    classes = tuple(self.label_classes)
    if not classes or any(not isinstance(n, int) or n < 2 for n in classes):
      raise ValueError(f"classify.label_classes must be group sizes of at least 2, got {self.label_classes!r}")
    object.__setattr__(self, "label_classes", classes)
    check_positive(self, "classify", "head_mlp_dim")

  @classmethod
  def from_dict(cls, values: Mapping[str, Any], where: str = "classify") -> "ClassifierConfig":
    """From the run's `model.vision` plus the `classify` section's keys (and SHARED_KEYS)."""
    return super().from_dict(build_towers(values, {"vision": ViTConfig}, where), where)


class ViTClassifier(nn.Module):
  config: ClassifierConfig

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """images float[B, H, W, 3] (normalized) -> logits float32[B, P, sum(label_classes)] for the P patch tokens
    (a class token, if the tower has one, is left out)."""
    cfg = self.config
    compute_dtype, param_dtype = dtype(cfg.vision.dtype), dtype(cfg.vision.param_dtype)
    tokens = ViT(cfg.vision, name="vision")(images)[:, int(cfg.vision.cls_token):]  # [B, P, D]
    hidden = layers.Projection((tokens.shape[-1], cfg.head_mlp_dim), (layers.EMBED, layers.MLP), fan_in=1,
                               use_bias=True, dtype=compute_dtype, param_dtype=param_dtype, name="head")(tokens)
    logits = nn.Dense(sum(cfg.label_classes), param_dtype=param_dtype, name="classifier",
                      kernel_init=layers.param_init(nn.initializers.zeros, (layers.MLP, None)),
                      bias_init=layers.param_init(nn.initializers.zeros, (None,)))(nn.gelu(hidden))
    return logits.astype(jnp.float32)


def patch_classification_loss(logits: jax.Array, labels: jax.Array, label_classes: tuple[int, ...]) -> jax.Array:
  """Softmax cross-entropy of each attribute group, averaged over images and patches, summed over the groups.

  Args:
    logits: float[B, P, sum(label_classes)], the groups side by side.
    labels: int[B, P, G], each group's class (G = len(label_classes)).
  """
  bounds = [sum(label_classes[:i]) for i in range(1, len(label_classes))]
  groups = jnp.split(logits, bounds, axis=-1)
  return sum(optax.softmax_cross_entropy_with_integer_labels(group, labels[..., g]).mean()
             for g, group in enumerate(groups))
