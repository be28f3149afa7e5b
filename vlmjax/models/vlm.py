"""The vision-language model: ViT -> projector -> image embeddings spliced into the decoder's token embeddings.

Inputs follow the Hugging Face convention: `input_ids` already hold the image placeholder token once per image
embedding. The k-th placeholder of a row receives the row's k-th image embedding (images in order), so a row may
carry several images, or none (a text-only row in the same batch). LLaVA attends causally; PaliGemma
(`prefix_lm=True`) attends bidirectionally over its prefix (image + prompt) and causally after it.

Images with a token count of their own (LLaVA-NeXT's anyres, `image_grid_pinpoints`) come as `Tiles`, in static
shapes that the host lays out:

    Tiles.pixel_values  float[N, H, W, 3]   every tile of the batch's images (the tower's input size), one image's
                                            tiles after another's, zero tiles padding N to a bucket
    Tiles.token_index   int[B, K]           row b's k-th image embedding is row token_index[b, k] of the table

The tower and projector run over all N tiles; the image-token table is their tokens, tile n's token p at row
n·P + p, followed by the model's learned embeddings (LLaVA-NeXT's `image_newline`, row N·P). A gather by
`token_index` gives each row its image embeddings [B, K, D], spliced as above: a row's placeholders, as many as its
images' tokens, take the first ones; padding entries are never read. The compiled program depends only on N, K
and the text length, so images of new sizes reuse it; what an image's tokens are (`models/anyres.py` for
LLaVA-NeXT) is host arithmetic. A model with another layout (a per-image token count, other tiles) needs only
another index table.

Qwen2.5-VL (`vision_tower="qwen2_5_vl"`) and Qwen2-VL (`"qwen2_vl"`: the same tower with LayerNorms, plain MLPs and
full attention in every block, as `QwenViTConfig` settings) take their images at their own resolution as `Patches`,
the same scheme with patches for tiles: every patch of the batch, laid out window by window and padded to a bucket of
windows (`models/qwen_vit.py`), with each patch's row and column and image; the tower's merged tokens are the
image-token table, and `token_index` picks each row's. Its decoder's M-RoPE gives every token a (temporal, height,
width) position: text tokens count on, an image's tokens sit at the image's start plus their (0, row, column) in its
merged grid, and the text after an image goes on from its start plus its longer side (transformers'
`get_rope_index`). `qwen_vit.mrope_positions` computes that in the program from the placeholders and two more
host-made tables (`Patches.token_offsets`, `Patches.token_advance`), so padded and packed prompts need nothing else.
"""

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vlmjax.models.kv_cache import KVCache
from vlmjax.models import fastv, layers, visual_tokens
from vlmjax.models.config import ModelConfig, build_towers, check_choice, dtype
from vlmjax.models.decoder import Decoder, DecoderConfig
from vlmjax.models.projector import POSITION_EMBEDDINGS, PROJECTORS, Projector
from vlmjax.models.qwen_vit import Patches, QwenViT, QwenViTConfig, fill_patches, layout, mrope_positions
from vlmjax.models.vit import ViT, ViTConfig

# Qwen's vision towers by `VLMConfig.vision_tower` -> the family's name. Each carries its own patch merger (projector
# "patch_merger"); the tower names the Hugging Face architecture the model is written as.
QWEN_TOWERS = {"qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL"}
# Vision towers by `VLMConfig.vision_tower`.
VISION_TOWERS = {"vit": ViTConfig, **{tower: QwenViTConfig for tower in QWEN_TOWERS}}
QWEN_PROJECTOR = "patch_merger"

@dataclasses.dataclass(frozen=True)
class VLMConfig(ModelConfig):
  vision: ViTConfig | QwenViTConfig
  decoder: DecoderConfig
  image_token_id: int
  vision_tower: str = "vit"  # a key of VISION_TOWERS, which `vision` is
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
  # LLaVA-NeXT's anyres: the (height, width) resolutions an image may be tiled at, multiples of the tower's input
  # size; each image then gives its own number of tokens (`models/anyres.py`), passed as `Tiles`. () for one
  # fixed-size image per placeholder run.
  image_grid_pinpoints: tuple[tuple[int, int], ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "image_grid_pinpoints", tuple(tuple(int(side) for side in pinpoint)
                                                           for pinpoint in self.image_grid_pinpoints))
    check_choice(self.vision_tower, tuple(VISION_TOWERS), "model.vision_tower")
    if not isinstance(self.vision, VISION_TOWERS[self.vision_tower]):
      raise ValueError(f"model.vision_tower={self.vision_tower!r} needs a {VISION_TOWERS[self.vision_tower].__name__}")
    if self.qwen_tower:
      self._check_qwen()
      return
    if self.image_grid_pinpoints:
      self._check_anyres()
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
      reduction = visual_tokens.parse(self.visual_tokens)
      reduction.tokens(self.patch_tokens_per_image)  # checks KEEP
      if reduction.in_language_model and reduction.layer >= self.decoder.depth:
        raise ValueError(f"model.visual_tokens={self.visual_tokens!r} prunes from layer {reduction.layer}, past the "
                         f"language model's last (decoder.depth={self.decoder.depth})")
    if not 0 <= self.image_token_id < self.decoder.vocab_size:
      raise ValueError(f"model.image_token_id={self.image_token_id} is outside the vocabulary "
                       f"(decoder.vocab_size={self.decoder.vocab_size})")

  def _check_anyres(self):
    size = self.vision.image_size
    for pinpoint in self.image_grid_pinpoints:
      if len(pinpoint) != 2 or min(pinpoint) <= 0 or pinpoint[0] % size or pinpoint[1] % size:
        raise ValueError(f"model.image_grid_pinpoints: {list(pinpoint)} is not a (height, width) of whole tiles; "
                         f"every pinpoint must be a positive multiple of the vision tower's image size {size}")
    unsupported = {"vision_feature_select": (self.keeps_cls_token, "'default' (patch tokens only)"),
                   "image_token_merge": (self.image_token_merge != 1, "1"),
                   "image_position_embedding": (self.image_position_embedding != "none", "'none'"),
                   "visual_tokens": (bool(self.visual_tokens), "''"), "prefix_lm": (self.prefix_lm, "False")}
    for key, (bad, needed) in unsupported.items():
      if bad:
        raise ValueError(f"model.{key}={getattr(self, key)!r} is not supported with image_grid_pinpoints (anyres "
                         f"tiles): use {needed}")

  def _check_qwen(self):
    unsupported = {"projector": (self.projector != QWEN_PROJECTOR, repr(QWEN_PROJECTOR)),
                   "vision_feature_layer": (self.vision_feature_layer is not None, "None (the merger's output)"),
                   "image_token_merge": (self.image_token_merge != 1, "1 (the tower merges)"),
                   "image_position_embedding": (self.image_position_embedding != "none", "'none'"),
                   "visual_tokens": (bool(self.visual_tokens), "''"), "prefix_lm": (self.prefix_lm, "False"),
                   "image_grid_pinpoints": (bool(self.image_grid_pinpoints), "()")}
    for key, (bad, needed) in unsupported.items():
      if bad:
        raise ValueError(f"model.{key}={getattr(self, key)!r} is not supported with vision_tower="
                         f"{self.vision_tower!r}: use {needed}")
    if self.vision.out_width != self.decoder.width:
      raise ValueError(f"model.vision.out_width={self.vision.out_width} must equal model.decoder.width="
                       f"{self.decoder.width} (the patch merger projects into the language model)")
    if not 0 <= self.image_token_id < self.decoder.vocab_size:
      raise ValueError(f"model.image_token_id={self.image_token_id} is outside the vocabulary "
                       f"(decoder.vocab_size={self.decoder.vocab_size})")

  @classmethod
  def from_dict(cls, values: Mapping[str, Any], where: str = "model") -> "VLMConfig":
    """From the `model` section of a config: `vision` (of the `vision_tower`), `decoder`, the keys of VLMConfig and
    SHARED_KEYS."""
    tower = values.get("vision_tower", "vit")
    check_choice(tower, tuple(VISION_TOWERS), f"{where}.vision_tower")
    values = build_towers(values, {"vision": VISION_TOWERS[tower], "decoder": DecoderConfig}, where)
    return super().from_dict(values, where)

  @property
  def qwen_tower(self) -> bool:
    """Whether images go through Qwen2-VL's or Qwen2.5-VL's tower at their own resolution, as `Patches`."""
    return self.vision_tower in QWEN_TOWERS

  @property
  def keeps_cls_token(self) -> bool:
    """Whether the image tokens include the ViT's class token (then they are no square grid of patches)."""
    return not self.qwen_tower and self.vision.cls_token and self.vision_feature_select == "full"

  @property
  def patch_tokens_per_image(self) -> int:
    """The image tokens the projector makes of one image, before any `visual_tokens` reduction."""
    return self.vision.num_patches // self.image_token_merge**2 + int(self.keeps_cls_token)

  @property
  def variable_image_tokens(self) -> bool:
    """Whether each image gives its own number of tokens (anyres, Qwen2-VL, Qwen2.5-VL), so that images come as
    `Tiles` or `Patches`."""
    return bool(self.image_grid_pinpoints) or self.qwen_tower

  @property
  def tokens_per_image(self) -> int:
    """Image embeddings (placeholder tokens) each image contributes."""
    if self.variable_image_tokens:
      raise ValueError("this model's images give a number of tokens that depends on their size "
                       "(model.image_grid_pinpoints or a Qwen vision_tower): count them with "
                       "vlmjax.models.anyres.image_token_count or vlmjax.models.qwen_vl.image_token_count")
    reduction = self.tower_reduction
    return self.patch_tokens_per_image if reduction is None else reduction.tokens(self.patch_tokens_per_image)

  @property
  def tower_reduction(self) -> "visual_tokens.Reduction | None":
    """The `visual_tokens` reduction of each image's tokens before the language model, if any."""
    reduction = visual_tokens.parse(self.visual_tokens)
    return None if reduction is None or reduction.in_language_model else reduction

  @property
  def fastv(self) -> "visual_tokens.Reduction | None":
    """The `visual_tokens` pruning inside the language model (FastV), if any."""
    reduction = visual_tokens.parse(self.visual_tokens)
    return reduction if reduction is not None and reduction.in_language_model else None

  def example_inputs(self, batch_size: int, text_length: int = 8, seed: int | None = None) -> dict[str, jax.Array]:
    """Arguments for `VLM.init`, a shape check or a benchmark: one image per row, its placeholders after the
    first token. With a seed, the text tokens and pixels are random (else ones and zeros).

    Returns {input_ids: int[B, T], pixel_values: float[B, H, W, 3], prefix_lengths: int[B] (prefix-LM only)}
    with T = tokens_per_image + text_length; with variable image tokens, pixel_values are `Tiles` of one tile per
    row whose tokens are the row's (T = patch_tokens_per_image + text_length), or for Qwen2.5-VL `Patches` of one
    window-sized image per row.
    """
    if self.qwen_tower:
      return self._qwen_example_inputs(batch_size, text_length, seed)
    image_tokens = self.patch_tokens_per_image if self.variable_image_tokens else self.tokens_per_image
    length = image_tokens + text_length
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
    input_ids = input_ids.at[:, 1:1 + image_tokens].set(self.image_token_id)
    if self.variable_image_tokens:
      token_index = np.arange(batch_size * image_tokens, dtype=np.int32).reshape(batch_size, image_tokens)
      pixel_values = Tiles(pixel_values=pixel_values, token_index=jnp.asarray(token_index))
    inputs = dict(input_ids=input_ids, pixel_values=pixel_values)
    if self.prefix_lm:
      inputs["prefix_lengths"] = jnp.full((batch_size,), length, jnp.int32)
    return inputs

  def _qwen_example_inputs(self, batch_size: int, text_length: int, seed: int | None) -> dict:
    """`example_inputs` for Qwen2.5-VL: one image of one full window per row, its placeholders after the first
    token."""
    vision = self.vision
    side = vision.window_units * vision.merge_size
    image = layout((1, side, side), vision.merge_size, vision.window_units)
    count = len(image.token_units)
    length = count + text_length
    if seed is None:
      input_ids = np.ones((batch_size, length), np.int32)
      pixels = np.zeros((batch_size, side * side, vision.patch_dim), np.float32)
    else:
      rng = np.random.default_rng(seed)
      text = rng.integers(0, self.decoder.vocab_size - 1, (batch_size, length), dtype=np.int32)
      input_ids = np.where(text >= self.image_token_id, text + 1, text).astype(np.int32)
      pixels = rng.normal(size=(batch_size, side * side, vision.patch_dim)).astype(np.float32)
    input_ids[:, 1:1 + count] = self.image_token_id
    patches = fill_patches(vision, [[(pixels[b], image)] for b in range(batch_size)], batch_size, count)
    return dict(input_ids=jnp.asarray(input_ids), pixel_values=jax.tree.map(jnp.asarray, patches))


@flax.struct.dataclass
class Tiles:
  """Images with a token count each of their own, in static shapes (the module docstring's layout).

  pixel_values: float32[N, H, W, 3] normalized tiles of the tower's input size, zero tiles after the real ones.
  token_index: int32[B, K], row b's k-th image embedding as a row of the image-token table [N·P + E, D].
  """

  pixel_values: jax.Array
  token_index: jax.Array


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
    if cfg.qwen_tower:  # its tower ends in the patch merger, in the language model's width
      self.vision = QwenViT(cfg.vision)
      self.decoder = Decoder(cfg.decoder)
      return
    self.vision = ViT(cfg.vision)
    self.projector = Projector(cfg.projector, cfg.decoder.width, position_embedding=cfg.image_position_embedding,
                               position_scale=cfg.image_position_scale,
                               dtype=dtype(cfg.decoder.dtype), param_dtype=dtype(cfg.decoder.param_dtype))
    self.decoder = Decoder(cfg.decoder)
    if cfg.variable_image_tokens:  # LLaVA-NeXT: ends each row of an image's tile tokens
      width = cfg.decoder.width
      self.image_newline = self.param("image_newline", layers.param_init(
          nn.initializers.normal(width**-0.5), (layers.EMBED,)), (width,), dtype(cfg.decoder.param_dtype))

  def encode_tiles(self, tiles: Tiles) -> jax.Array:
    """Tiles -> each row's image embeddings float[B, K, D], gathered from the image-token table."""
    embeddings = self.encode_images(tiles.pixel_values)  # [N, P, D]
    table = embeddings.reshape(-1, embeddings.shape[-1])  # [N*P, D]
    table = jnp.concatenate([table, self.image_newline[None].astype(table.dtype)])  # [N*P + 1, D]
    return jnp.take(table, tiles.token_index, axis=0)  # [B, K, D]

  def encode_patches(self, patches: Patches) -> jax.Array:
    """Patches -> each row's image embeddings float[B, K, D], gathered from the tower's merged tokens."""
    table = self.vision(patches.pixel_values, patches.patch_positions, patches.image_ids)  # [N/m², D]
    return jnp.take(table, patches.token_index, axis=0)  # [B, K, D]

  def encode_images(self, pixel_values: jax.Array) -> jax.Array:
    """pixel_values: float[B, H, W, 3] or float[B, I, H, W, 3] -> image embeddings float[B, I*P, D]."""
    cfg = self.config
    if pixel_values.ndim == 4:
      pixel_values = pixel_values[:, None]
    batch, num_images = pixel_values.shape[:2]
    images = pixel_values.reshape(batch * num_images, *pixel_values.shape[2:])
    reduction = cfg.tower_reduction
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

  def embed(self, input_ids: jax.Array, image_embeddings: jax.Array | None,
            image_ends: jax.Array | None = None) -> jax.Array:
    """Token embeddings with the k-th image placeholder of each row replaced by its k-th image embedding.

    input_ids: int[B, T]; image_embeddings: float[B, I*P, D] or None; image_ends: int[B] or None -> float[B, T, D].
    Placeholders past a row's first I*P, or at index image_ends[b] or later, are ordinary tokens, as a
    generated placeholder id is when decoding: the engine prefills a preempted request's generated tokens again
    after its prompt, and its image inputs are padded (more images, more tokens a row) to a few shapes.
    """
    text = self.decoder.embed(input_ids)
    if image_embeddings is None:  # decoding: a generated placeholder id is an ordinary token, as in transformers
      return text
    is_image, slot = self._image_slots(input_ids, image_embeddings.shape[1], image_ends)
    spliced = jnp.take_along_axis(image_embeddings, slot[:, :, None], axis=1).astype(text.dtype)  # [B, T, D]
    embedded = jnp.where(is_image[:, :, None], spliced, text)
    return nn.with_logical_constraint(embedded, (layers.ACT_BATCH, layers.ACT_LENGTH, layers.ACT_EMBED))

  def _image_slots(self, input_ids: jax.Array, count: int, image_ends: jax.Array | None):
    """(bool[B, T]: the tokens that take an image embedding, `embed`'s rule; int[B, T]: which of the `count`)."""
    is_placeholder = input_ids == self.config.image_token_id  # [B, T]
    if image_ends is not None:
      is_placeholder &= jnp.arange(input_ids.shape[1])[None] < image_ends[:, None]
    slot = jnp.cumsum(is_placeholder, axis=1) - 1  # [B, T], the image embedding each placeholder takes
    return is_placeholder & (slot < count), jnp.clip(slot, 0, count - 1)

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
      image_ends: jax.Array | None = None,
      rank_index: jax.Array | None = None,
  ) -> tuple[jax.Array, KVCache | None]:
    """Args:
      input_ids: int[B, T] with image placeholders.
      pixel_values: float[B, H, W, 3] or float[B, I, H, W, 3] normalized images, `Tiles` (anyres), `Patches`
        (Qwen2.5-VL), or None for text only.
      positions: int[B, T] (or int[3, B, T] for M-RoPE); defaults to 0..T-1 in every row (a numpy [1, T], whose
        RoPE sines and cosines are constants of the program: `layers.apply_rope`), or with `Patches` and M-RoPE to
        `mrope_positions`.
      cache, input_mask, segment_ids, logit_positions: as `Decoder.__call__`.
      prefix_lengths: int[B] bidirectional prefix per row; required when the config is prefix-LM.
      image_ends: int[B], each row's placeholders at or after this token are ordinary tokens (`embed`); None: all
        take image embeddings while there are any.
      rank_index: int[B], with FastV (`visual_tokens` fastv:...) the token whose attention ranks each row's image
        tokens (default: its last, by input_mask). Every row holds all its images' placeholders; FastV's call
        with images is a prefill into an empty cache or a forward without one (whose logits are then the kept
        tokens', in order, unless logit_positions picks some).
    Returns:
      (logits float32[B, T, V], the updated cache or None).
    """
    if self.config.prefix_lm and prefix_lengths is None:
      raise ValueError("a prefix-LM model (model.prefix_lm=True) needs prefix_lengths: the image + prompt length")
    cfg = self.config
    if positions is None and isinstance(pixel_values, Patches) and cfg.decoder.mrope_section:
      positions, _ = mrope_positions(input_ids, cfg.image_token_id, pixel_values)
    elif positions is None:
      positions = np.arange(input_ids.shape[1], dtype=np.int32)[None]
    if pixel_values is None:
      image_embeddings = None
    elif isinstance(pixel_values, Patches) != cfg.qwen_tower:
      raise ValueError(f"a model with vision_tower in {sorted(QWEN_TOWERS)} takes its images as Patches "
                       "(vlmjax.models.qwen_vl.batch_patches), and only such a model does")
    elif isinstance(pixel_values, Tiles) != bool(cfg.image_grid_pinpoints):
      raise ValueError("a model with image_grid_pinpoints takes its images as Tiles (vlmjax.models.anyres), and "
                       "only such a model does")
    elif isinstance(pixel_values, Patches):
      image_embeddings = self.encode_patches(pixel_values)
    else:
      image_embeddings = (self.encode_tiles(pixel_values) if isinstance(pixel_values, Tiles)
                          else self.encode_images(pixel_values))
    embeddings = self.embed(input_ids, image_embeddings, image_ends)
    return self.decoder(None, positions, cache, embeddings=embeddings, input_mask=input_mask,
                        segment_ids=segment_ids, prefix_lengths=prefix_lengths, logit_positions=logit_positions,
                        pruning=self._pruning(input_ids, image_embeddings, image_ends, input_mask, rank_index))

  def _pruning(self, input_ids, image_embeddings, image_ends, input_mask, rank_index) -> fastv.Pruning | None:
    """FastV's `Pruning` of this call: with images, each image's tokens past KEEP dropped (image_embeddings
    float[B, I*P, D] of I images a row); without, decode steps reading the pruned layers."""
    reduction = self.config.fastv
    if reduction is None:
      return None
    if image_embeddings is None:
      return fastv.Pruning(layer=reduction.layer)
    per_image = self.config.tokens_per_image
    images = image_embeddings.shape[1] // per_image
    if rank_index is None:
      rank_index = (jnp.full(input_ids.shape[:1], input_ids.shape[1] - 1, jnp.int32) if input_mask is None else
                    jnp.sum(input_mask, axis=1, dtype=jnp.int32) - 1)
    is_image, _ = self._image_slots(input_ids, image_embeddings.shape[1], image_ends)
    return fastv.Pruning(layer=reduction.layer, drop=images * (per_image - reduction.tokens(per_image)),
                         image_mask=is_image, rank_index=rank_index)
