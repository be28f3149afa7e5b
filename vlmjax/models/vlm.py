"""The vision-language model: ViT -> projector -> image embeddings spliced into the decoder's token embeddings.

Inputs follow the Hugging Face convention: `input_ids` already hold the image placeholder token once per image
embedding. The k-th placeholder of a row receives the row's k-th image embedding (images in order), so a row may
carry several images, or none (a text-only row in the same batch). LLaVA attends causally; PaliGemma
(`prefix_lm=True`) attends bidirectionally over its prefix (image + prompt) and causally after it.
"""

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlmjax.models.kv_cache import KVCache
from vlmjax.models import layers, visual_tokens
from vlmjax.models.config import ModelConfig, build_towers, check_choice, dtype
from vlmjax.models.decoder import Decoder, DecoderConfig
from vlmjax.models.projector import POSITION_EMBEDDINGS, PROJECTORS, Projector
from vlmjax.models.vit import ViT, ViTConfig

@dataclasses.dataclass(frozen=True)
class VLMConfig(ModelConfig):
  vision: ViTConfig
  decoder: DecoderConfig
  image_token_id: int
  projector: str = "mlp2x_gelu"
  vision_feature_layer: int | None = -2  # None: the ViT's final output after its post-LayerNorm
  vision_feature_select: str = "default"  # 'default' drops the class token, 'full' keeps it
  image_token_merge: int = 1  # k: each k x k block of neighbouring patch tokens becomes one (concatenated)
  prefix_lm: bool = False
  # "none" (LLaVA, PaliGemma) or "sincos2d": the projector adds a learned embedding per image token of the
  # (merged) grid, started at the 2-D sine-cosine table of the token's row and column. The shapes model trained
  # for 4000 finetune steps answered relation questions ("Is the X left or right of the Y?") 0.90 of the time
  # with it and classify.position_bins=4, 0.74 with the position groups alone (experiments/shapes_tiny/README.md,
  # 2026-12-02 relation-long).
  image_position_embedding: str = "none"
  # The table's start (`Projector.position_scale`): 0 the sine-cosine table as it is, s > 0 centred and scaled
  # to a root mean square of s.
  image_position_scale: float = 0.0
  # Fewer visual tokens without retraining, `METHOD:KEEP` (visual_tokens.py; "" keeps every token): set at load
  # time (`vlmjax.load(path, visual_tokens=...)`), not trained with.
  visual_tokens: str = ""

  def __post_init__(self):
    check_choice(self.projector, PROJECTORS, "model.projector")
    check_choice(self.vision_feature_select, ("default", "full"), "model.vision_feature_select")
    check_choice(self.image_position_embedding, POSITION_EMBEDDINGS, "model.image_position_embedding")
    if self.image_position_scale < 0 or (self.image_position_scale and self.image_position_embedding == "none"):
      raise ValueError(f"model.image_position_scale={self.image_position_scale} needs a table to scale: 0, or "
                       f"positive with image_position_embedding='sincos2d'")
    if self.image_position_embedding != "none" and self.keeps_cls_token:
      raise ValueError("model.image_position_embedding needs patch tokens only (a square grid): use "
                       "vision_feature_select='default' or a ViT without class token")
    if self.image_token_merge > 1:
      if self.keeps_cls_token:
        raise ValueError("model.image_token_merge needs patch tokens only: use vision_feature_select='default' "
                         "or a ViT without class token")
      if self.vision.grid_size % self.image_token_merge:
        raise ValueError(f"model.image_token_merge={self.image_token_merge} must divide the patch grid "
                         f"({self.vision.grid_size} x {self.vision.grid_size})")
    if self.visual_tokens:
      if self.keeps_cls_token:
        raise ValueError("model.visual_tokens reduces patch tokens: use vision_feature_select='default' or a ViT "
                         "without class token")
      visual_tokens.parse(self.visual_tokens).tokens(self.patch_tokens_per_image)  # checks KEEP
    if not 0 <= self.image_token_id < self.decoder.vocab_size:
      raise ValueError(f"model.image_token_id={self.image_token_id} is outside the vocabulary "
                       f"(decoder.vocab_size={self.decoder.vocab_size})")

  @classmethod
  def from_dict(cls, values: Mapping[str, Any], where: str = "model") -> "VLMConfig":
    """From the `model` section of a config: `vision`, `decoder`, the keys of VLMConfig and SHARED_KEYS."""
    values = build_towers(values, {"vision": ViTConfig, "decoder": DecoderConfig}, where)
    return super().from_dict(values, where)

  @property
  def keeps_cls_token(self) -> bool:
    """Whether the image tokens include the ViT's class token (then they are no square grid of patches)."""
    return self.vision.cls_token and self.vision_feature_select == "full"

  @property
  def patch_tokens_per_image(self) -> int:
    """The image tokens the projector makes of one image, before any `visual_tokens` reduction."""
    return self.vision.num_patches // self.image_token_merge**2 + int(self.keeps_cls_token)

  @property
  def tokens_per_image(self) -> int:
    """Image embeddings (placeholder tokens) each image contributes."""
    reduction = visual_tokens.parse(self.visual_tokens)
    return self.patch_tokens_per_image if reduction is None else reduction.tokens(self.patch_tokens_per_image)

  def example_inputs(self, batch_size: int, text_length: int = 8, seed: int | None = None) -> dict[str, jax.Array]:
    """Arguments for `VLM.init`, a shape check or a benchmark: one image per row, its placeholders after the
    first token. With a seed, the text tokens and pixels are random (else ones and zeros).

    Returns {input_ids: int[B, T], pixel_values: float[B, H, W, 3], prefix_lengths: int[B] (prefix-LM only)}
    with T = tokens_per_image + text_length.
    """
    length = self.tokens_per_image + text_length
    size = self.vision.image_size
    if seed is None:
      input_ids = jnp.ones((batch_size, length), jnp.int32)
      pixel_values = jnp.zeros((batch_size, size, size, 3), jnp.float32)
    else:
      text_key, pixel_key = jax.random.split(jax.random.key(seed))
      # Random text avoids the image placeholder: ids drawn below it, shifted past it.
      text = jax.random.randint(text_key, (batch_size, length), 0, self.decoder.vocab_size - 1, jnp.int32)
      input_ids = jnp.where(text >= self.image_token_id, text + 1, text)
      pixel_values = jax.random.normal(pixel_key, (batch_size, size, size, 3), jnp.float32)
    input_ids = input_ids.at[:, 1:1 + self.tokens_per_image].set(self.image_token_id)
    inputs = dict(input_ids=input_ids, pixel_values=pixel_values)
    if self.prefix_lm:
      inputs["prefix_lengths"] = jnp.full((batch_size,), length, jnp.int32)
    return inputs


def merge_neighbours(tokens: jax.Array, k: int) -> jax.Array:
  """Visual-token reduction by concatenation ("pixel shuffle"): float[N, g*g, D] patch tokens on a g x g grid
  -> float[N, (g/k)², k²·D], each output token holding a k x k block of neighbours. Nothing is averaged away;
  the projector maps the wider tokens into the language model."""
  count, length, width = tokens.shape
  grid = int(round(length**0.5))
  blocks = tokens.reshape(count, grid // k, k, grid // k, k, width)  # [N, g/k, k, g/k, k, D]
  return blocks.transpose(0, 1, 3, 2, 4, 5).reshape(count, (grid // k) ** 2, k * k * width)


class VLM(nn.Module):
  config: VLMConfig

  def setup(self):
    cfg = self.config
    self.vision = ViT(cfg.vision)
    self.projector = Projector(cfg.projector, cfg.decoder.width, position_embedding=cfg.image_position_embedding,
                               position_scale=cfg.image_position_scale,
                               dtype=dtype(cfg.decoder.dtype), param_dtype=dtype(cfg.decoder.param_dtype))
    self.decoder = Decoder(cfg.decoder)

  def encode_images(self, pixel_values: jax.Array) -> jax.Array:
    """pixel_values: float[B, H, W, 3] or float[B, I, H, W, 3] -> image embeddings float[B, I*P, D]."""
    cfg = self.config
    if pixel_values.ndim == 4:
      pixel_values = pixel_values[:, None]
    batch, num_images = pixel_values.shape[:2]
    images = pixel_values.reshape(batch * num_images, *pixel_values.shape[2:])
    reduction = visual_tokens.parse(cfg.visual_tokens)
    if reduction is None:
      tokens = self.vision(images, feature_layer=cfg.vision_feature_layer)  # [B*I, P(+1), Dv]
    else:
      tokens, keys, received = self.vision(images, feature_layer=cfg.vision_feature_layer, with_attention=True)
    if cfg.vision_feature_select == "default" and cfg.vision.cls_token:
      tokens = tokens[:, 1:]
      if reduction is not None:
        keys, received = keys[:, 1:], received[:, 1:]
    if cfg.image_token_merge > 1:
      tokens = merge_neighbours(tokens, cfg.image_token_merge)  # [B*I, P/k², k²·Dv]
      if reduction is not None:  # a block's attention is its patches', its key theirs side by side
        keys = merge_neighbours(keys, cfg.image_token_merge)
        received = merge_neighbours(received[:, :, None], cfg.image_token_merge).sum(axis=-1)
    embeddings = self.projector(tokens)  # [B*I, P, D]
    if reduction is not None:
      embeddings = visual_tokens.reduce(reduction, embeddings, keys, received)  # [B*I, KEEP, D]
    return embeddings.reshape(batch, num_images * embeddings.shape[1], embeddings.shape[2])

  def embed(self, input_ids: jax.Array, image_embeddings: jax.Array | None) -> jax.Array:
    """Token embeddings with the k-th image placeholder of each row replaced by its k-th image embedding.

    input_ids: int[B, T]; image_embeddings: float[B, I*P, D] or None -> float[B, T, D].
    Placeholders past a row's first I*P are ordinary tokens, as a generated placeholder id is when decoding (the
    engine prefills a preempted request's generated tokens again after its prompt).
    """
    text = self.decoder.embed(input_ids)
    if image_embeddings is None:  # decoding: a generated placeholder id is an ordinary token, as in transformers
      return text
    is_placeholder = input_ids == self.config.image_token_id  # [B, T]
    slot = jnp.cumsum(is_placeholder, axis=1) - 1  # [B, T], the image embedding each placeholder takes
    is_image = is_placeholder & (slot < image_embeddings.shape[1])
    slot = jnp.clip(slot, 0, image_embeddings.shape[1] - 1)
    spliced = jnp.take_along_axis(image_embeddings, slot[:, :, None], axis=1).astype(text.dtype)  # [B, T, D]
    embedded = jnp.where(is_image[:, :, None], spliced, text)
    return nn.with_logical_constraint(embedded, (layers.ACT_BATCH, layers.ACT_LENGTH, layers.ACT_EMBED))

  def __call__(
      self,
      input_ids: jax.Array,
      pixel_values: jax.Array | None,
      positions: jax.Array | None = None,
      cache: KVCache | None = None,
      *,
      input_mask: jax.Array | None = None,
      segment_ids: jax.Array | None = None,
      prefix_lengths: jax.Array | None = None,
      logit_positions: jax.Array | None = None,
  ) -> tuple[jax.Array, KVCache | None]:
    """Args:
      input_ids: int[B, T] with image placeholders.
      pixel_values: float[B, H, W, 3] or float[B, I, H, W, 3] normalized images, or None for text only.
      positions: int[B, T]; defaults to 0..T-1 in every row (a numpy [1, T], whose RoPE sines and cosines are
        constants of the program: `layers.apply_rope`).
      cache, input_mask, segment_ids, logit_positions: as `Decoder.__call__`.
      prefix_lengths: int[B] bidirectional prefix per row; required when the config is prefix-LM.
    Returns:
      (logits float32[B, T, V], the updated cache or None).
    """
    if self.config.prefix_lm and prefix_lengths is None:
      raise ValueError("a prefix-LM model (model.prefix_lm=True) needs prefix_lengths: the image + prompt length")
    if positions is None:
      positions = np.arange(input_ids.shape[1], dtype=np.int32)[None]
    image_embeddings = None if pixel_values is None else self.encode_images(pixel_values)
    embeddings = self.embed(input_ids, image_embeddings)
    return self.decoder(None, positions, cache, embeddings=embeddings, input_mask=input_mask,
                        segment_ids=segment_ids, prefix_lengths=prefix_lengths, logit_positions=logit_positions)
