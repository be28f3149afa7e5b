"""Looking inside a VLM: which image tokens an answer attends to, and what the vision tower says each patch shows.

    attention = answer_attention(vlm, image, "What colour is the circle?")
    attention.answer, attention.grid                  # "red", float[g, g]: where the answer looked
    draw_attention(image, attention.grid)             # a PIL image: the map laid over the picture
    attention.share_in_box(box, image_size=64)        # how much of it lies on an object's tokens
    draw_heads(attention.attention)                   # every layer's and head's own map

The decoder's attention goes through `jax.nn.dot_product_attention`, which returns no weights, so
`attention_weights` runs the model once more with Flax's `capture_intermediates` on each decoder layer's query,
key and value projections and computes the softmax itself with the model's own RoPE, scale and mask
(`layers.apply_rope`, `layers.make_attention_mask`): the weights the model used (tests/eval/test_visualize.py
rebuilds each layer's attention output from them).

Raw attention weights overstate heads that attend to a token but carry little from it: many heads put weight on
the image by position, whatever the question. `ImageAttention.grid` therefore weighs each head's attention to an
image token by the norm of what that token's value adds to the output through the head (‖v_j W_O^h‖, the
norm-based analysis of Kobayashi et al., 2020, "Attention is not only a weight"), summed over layers and heads;
`attention_grid` is the plain sum of the weights. On the main job's model (README), over 60 test images with one
circle among other shapes, "What colour is the circle?" put 0.57 of `grid` on the circle's tokens (0.49 of
`attention_grid`; the circle's tokens are 0.24 of the image). Single heads are sharper: two put 0.95 and 0.98 of
their attention there, and `draw_heads` shows them.
"""

import dataclasses
import functools
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from vlmjax import workdir as workdir_lib
from vlmjax.data import shapes_scene, shapes_tasks
from vlmjax.data.images import ImageProcessor
from vlmjax.models import layers
from vlmjax.models.classifier import ClassifierConfig, ViTClassifier
from vlmjax.models.config import pretraining_section
from vlmjax.models.vlm import VLM as VLMModel


@dataclasses.dataclass(frozen=True)
class ImageAttention:
  """The answer to one question about one image, and where in the image its tokens looked.

  answer, answer_ids: the answer (without its end token; an empty answer is its end token, whose attention decided
    to stop).
  attention: float[L, N, g, g], each decoder layer's and head's attention from the positions that predict the
    answer's tokens to each image token (averaged over those positions; rows top to bottom). An image token covers
    (image size / g) pixels a side (`patch_size` x `image_token_merge`). Each [g, g] sums to that head's share of
    attention on the image.
  value_norms: float[L, N, g, g], ‖v_j W_O^h‖: how far image token j's value moves the output through that head.
  """

  answer: str
  answer_ids: tuple[int, ...]
  attention: np.ndarray
  value_norms: np.ndarray

  @property
  def grid(self) -> np.ndarray:
    """float[g, g], summing to 1: what each image token gave the answer through attention, attention times value
    norm summed over layers and heads (module docstring)."""
    moved = (self.attention * self.value_norms).sum((0, 1))
    return moved / moved.sum()

  @property
  def attention_grid(self) -> np.ndarray:
    """float[g, g], summing to 1: the attention weights alone, summed over layers and heads."""
    summed = self.attention.sum((0, 1))
    return summed / summed.sum()

  @property
  def image_share(self) -> float:
    """Of all the attention the answer's positions paid (to the image, the prompt and the answer so far), the share
    the image got, averaged over layers and heads."""
    return float(self.attention.sum((-2, -1)).mean())

  def share_in_box(self, box: Sequence[float], image_size: int, grid: np.ndarray | None = None) -> float:
    """The share of `grid` (default: `self.grid`) on the image tokens whose cell overlaps `box` (x0, y0, x1, y1 in
    pixels of an image_size-pixel square image, ends exclusive, as the shapes data set writes boxes)."""
    grid = self.grid if grid is None else grid
    return float((grid * box_cells(box, image_size, grid.shape[0])).sum())


def box_cells(box: Sequence[float], image_size: int, grid: int) -> np.ndarray:
  """bool[grid, grid]: the cells of a grid x grid tiling of an image_size-pixel square that overlap `box`
  (x0, y0, x1, y1, ends exclusive)."""
  x0, y0, x1, y1 = box
  edges = np.arange(grid + 1) * image_size / grid  # cell i spans [edges[i], edges[i + 1])
  columns = (edges[:-1] < x1) & (edges[1:] > x0)
  rows = (edges[:-1] < y1) & (edges[1:] > y0)
  return rows[:, None] & columns[None, :]


PROJECTIONS = ("query", "key", "value")


def _is_decoder_projection(module: nn.Module, method_name: str) -> bool:
  return method_name == "__call__" and module.name in PROJECTIONS and "decoder" in module.path


@functools.partial(jax.jit, static_argnames=("config",))
def _projections(params, input_ids, pixel_values, config):
  """{layers_i: {attention: {query|key|value: {__call__: (float[B, T, N or K, H],)}}}}: each decoder layer's
  projections, before RoPE."""
  _, state = VLMModel(config).apply({"params": params}, input_ids, pixel_values, capture_intermediates=
                                    _is_decoder_projection, mutable=["intermediates"])
  return state["intermediates"]["decoder"]


def attention_weights(vlm, input_ids: np.ndarray, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(weights float32[L, N, T, T], values float32[L, T, K, H]): every decoder layer's attention probabilities and
  values for one row of `input_ids` (int[1, T], placeholders expanded) and its image (float[1, H, W, 3],
  normalized), as the model computes them: its RoPE, scale and mask (causal, or the prefix-LM's bidirectional
  prefix over the whole input, as `vlm.logits`)."""
  config = vlm.model_config
  if config.decoder.scan_layers:
    raise ValueError("attention_weights reads the decoder's layers one by one: load the model with vlmjax.load, "
                     "which unrolls them (model.scan_layers=False)")
  input_ids = jnp.asarray(input_ids, jnp.int32)
  captured = _projections(vlm.params, input_ids, jnp.asarray(pixel_values, jnp.float32), config)
  length = input_ids.shape[1]
  positions = np.arange(length, dtype=np.int32)[None]  # [1, T], as the model's default positions
  index = jnp.broadcast_to(jnp.asarray(positions), input_ids.shape)
  prefix = jnp.full((input_ids.shape[0],), length, jnp.int32) if config.prefix_lm else None
  mask = layers.make_attention_mask(index, index, prefix_lengths=prefix)  # [B, 1, T, T]
  decoder = config.decoder
  weights, values = [], []
  for layer in range(decoder.depth):
    query, key, value = (captured[f"layers_{layer}"]["attention"][name]["__call__"][0].astype(jnp.float32)
                         for name in PROJECTIONS)
    query = layers.apply_rope(query, positions, decoder.rope_theta)  # [B, T, N, H]
    key = layers.apply_rope(key, positions, decoder.rope_theta)  # [B, T, K, H]
    key = jnp.repeat(key, decoder.num_heads // decoder.num_kv_heads, axis=2)  # [B, T, N, H]
    scores = jnp.einsum("BTNH,BSNH->BNTS", query, key) * decoder.attention_head_dim**-0.5
    weights.append(jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)[0])  # [N, T, S]
    values.append(value[0])  # [T, K, H]
  return np.asarray(jnp.stack(weights)), np.asarray(jnp.stack(values))


def answer_attention(vlm, image: Any, question: str, answer_ids: Sequence[int] | None = None,
                     max_new_tokens: int = 16) -> ImageAttention:
  """Where the answer to `question` about `image` (a PIL image or uint8[H, W, 3]) looks in the image.

  The answer is the model's greedy one, or `answer_ids` (without the end token). Its attention is that of the
  positions that predict it: the prompt's last token (which predicts the answer's first token) and each answer
  token but the last.
  """
  config = vlm.model_config
  grid = round(config.tokens_per_image**0.5)
  if grid * grid != config.tokens_per_image:
    raise ValueError(f"the image's {config.tokens_per_image} tokens are not a square grid (a class token kept?): "
                     f"answer_attention draws a patch grid")
  messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
  prompt = vlm.prompt_ids(messages, 1)
  pixel_values = vlm.image_processor([image])  # [1, H, W, 3]
  if answer_ids is None:
    generated = vlm.generate_ids(np.asarray([prompt]), pixel_values, max_new_tokens=max_new_tokens)[0]
    answer_ids = []
    for token in generated:
      if int(token) in vlm.eos_token_ids or int(token) == vlm.pad_token_id:
        break
      answer_ids.append(int(token))
  answer_ids = tuple(int(token) for token in answer_ids) or (vlm.eos_token_ids[0],)
  weights, values = attention_weights(vlm, np.asarray([prompt + list(answer_ids)]), pixel_values)
  asking = np.arange(len(prompt) - 1, len(prompt) + len(answer_ids) - 1)  # the positions that predict the answer
  image_slots = np.flatnonzero(np.asarray(prompt) == config.image_token_id)[:config.tokens_per_image]
  attention = weights[:, :, asking][..., image_slots].mean(2)  # [L, N, P]
  decoder = config.decoder
  values = np.repeat(values[:, image_slots], decoder.num_heads // decoder.num_kv_heads, axis=2)  # [L, P, N, H]
  out = np.stack([np.asarray(vlm.params["decoder"][f"layers_{layer}"]["attention"]["out"]["kernel"], np.float32)
                  for layer in range(decoder.depth)])  # [L, N, H, D]
  value_norms = np.linalg.norm(np.einsum("LPNH,LNHD->LNPD", values, out), axis=-1)  # [L, N, P]
  shape = (decoder.depth, decoder.num_heads, grid, grid)
  return ImageAttention(answer=vlm.tokenizer.decode(list(answer_ids)), answer_ids=answer_ids,
                        attention=attention.reshape(shape), value_norms=value_norms.reshape(shape))


def _heat_colours(values: np.ndarray) -> np.ndarray:
  """uint8[..., 3]: values in [0, 1] through matplotlib's 'inferno' colour map."""
  from matplotlib import colormaps

  return (colormaps["inferno"](values)[..., :3] * 255).astype(np.uint8)


def draw_attention(image: Any, grid: np.ndarray, scale: int = 4, alpha: float = 0.6,
                   boxes: Sequence[Sequence[float]] = (), title: str | None = None) -> Image.Image:
  """The image enlarged `scale` times, side by side with the attention `grid` (float[g, g]) laid over it as a heat
  map (brightest: the most attended token; each token's cell outlined), `boxes` (x0, y0, x1, y1 in the image's
  pixels) outlined in cyan, and `title` written above."""
  picture = Image.fromarray(np.asarray(image, np.uint8)) if not isinstance(image, Image.Image) else image
  picture = picture.convert("RGB")
  width, height = picture.size
  big = picture.resize((width * scale, height * scale), Image.Resampling.NEAREST)
  heat = Image.fromarray(_heat_colours(grid / max(float(grid.max()), 1e-9)))
  heat = heat.resize(big.size, Image.Resampling.NEAREST)
  overlay = Image.blend(big, heat, alpha)
  draw = ImageDraw.Draw(overlay)
  rows, columns = grid.shape
  for i in range(rows):
    for j in range(columns):
      x0, y0 = j * big.width / columns, i * big.height / rows
      draw.rectangle((x0, y0, x0 + big.width / columns - 1, y0 + big.height / rows - 1), outline=(90, 90, 90))
      draw.text((x0 + 2, y0 + 1), f"{grid[i, j]:.2f}", fill="white")
  for picture_ in (big, overlay):
    outline = ImageDraw.Draw(picture_)
    for x0, y0, x1, y1 in boxes:
      outline.rectangle((x0 * scale - 1, y0 * scale - 1, x1 * scale, y1 * scale), outline=(0, 255, 255), width=2)
  top = 18 if title else 0
  canvas = Image.new("RGB", (2 * big.width + 8, big.height + top), "white")
  canvas.paste(big, (0, top))
  canvas.paste(overlay, (big.width + 8, top))
  if title:
    ImageDraw.Draw(canvas).text((2, 3), title, fill="black")
  return canvas


def draw_heads(per_layer: np.ndarray, scale: int = 18) -> Image.Image:
  """Every decoder layer's and head's map (float[L, N, g, g], as `ImageAttention.attention`) side by side: a row per
  layer, a column per head, each map scaled to its own maximum and labelled with the layer, the head and its sum
  (for `attention`: the head's share of attention on the image)."""
  depth, heads, rows, columns = per_layer.shape
  side, label = rows * scale, 14
  canvas = Image.new("RGB", (heads * (side + 6) + 6, depth * (side + label + 6) + 6), "white")
  draw = ImageDraw.Draw(canvas)
  for layer in range(depth):
    for head in range(heads):
      grid = per_layer[layer, head]
      tile = Image.fromarray(_heat_colours(grid / max(float(grid.max()), 1e-9)))
      left, top = 6 + head * (side + 6), 6 + layer * (side + label + 6)
      draw.text((left, top), f"L{layer} H{head}: {grid.sum():.2f}", fill="black")
      canvas.paste(tile.resize((side, side), Image.Resampling.NEAREST), (left, top + label))
  return canvas


@dataclasses.dataclass(frozen=True)
class PatchClassifier:
  """The vision tower and per-patch head a run's `classify` stage trained (`ViTClassifier`), as its checkpoint
  holds them: `load_patch_classifier(workdir)`, then `classes(image)`."""

  config: ClassifierConfig
  params: Any
  position_bins: int
  image_processor: ImageProcessor
  step: int  # the checkpoint's: the end of the classify stage

  def classes(self, image: Any) -> dict[str, np.ndarray]:
    """What the tower says each patch of `image` (PIL or uint8[H, W, 3]) shows: {group: int[g, g]}, the predicted
    class of each of `shapes_tasks.patch_groups(position_bins)` per patch, g = the tower's patch grid (0: no object
    there, else 1 + the index of the value in `shapes_tasks.PATCH_ATTRIBUTES`; "box centre": 1 on the patch that
    holds an object's box centre)."""
    pixels = jnp.asarray(self.image_processor([image]), jnp.float32)  # [1, H, W, 3]
    logits = np.asarray(_classify(self.params, pixels, self.config)[0])  # [P, sum(label_classes)]
    grid = self.config.vision.grid_size
    groups = np.split(logits, np.cumsum(self.config.label_classes)[:-1], axis=-1)
    return {name: group.argmax(-1).reshape(grid, grid)
            for name, group in zip(shapes_tasks.patch_groups(self.position_bins), groups)}


@functools.partial(jax.jit, static_argnames=("config",))
def _classify(params, images, config):
  return ViTClassifier(config).apply({"params": params}, images)


def load_patch_classifier(workdir: str) -> PatchClassifier:
  """The classifier a workdir's last `classify` stage trained, read from the checkpoint that ends that stage.
  Raises FileNotFoundError when the run has no classify stage or no longer holds that checkpoint
  (`train.keep_checkpoints` kept only later ones)."""
  config = workdir_lib.read_config(workdir)
  classify = [stage for stage in workdir_lib.parse_stages(config.train.stages, config.train.steps)
              if stage.name == "classify"]
  if not classify:
    raise FileNotFoundError(f"{workdir} has no classify stage (train.stages={config.train.stages!r})")
  step = classify[-1].end
  if not os.path.isdir(os.path.join(workdir, "checkpoints", str(step))):
    raise FileNotFoundError(f"{workdir} no longer holds checkpoint {step}, the end of its classify stage "
                            f"(train.keep_checkpoints={config.train.keep_checkpoints} kept only later ones)")
  bins = config.classify.get("position_bins", 0)
  classifier = ClassifierConfig.from_dict({**pretraining_section(config, "classify"),
                                           "label_classes": shapes_tasks.patch_classes(bins)}, "classify")
  size = classifier.vision.image_size
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = nn.meta.unbox(jax.eval_shape(lambda: ViTClassifier(classifier).init(
      jax.random.key(0), jnp.zeros((1, size, size, 3)))["params"]))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
  checkpointer = workdir_lib.Checkpointer(workdir, asynchronous=False)
  try:
    params = checkpointer.restore_params(step, abstract)
  finally:
    checkpointer.close()
  return PatchClassifier(classifier, params, bins, ImageProcessor.from_directory(workdir), step)


def draw_patch_classes(image: Any, classes: dict[str, np.ndarray], scale: int = 8) -> Image.Image:
  """The image enlarged `scale` times, each patch outlined and labelled with the shape the tower predicts there,
  written in the colour it predicts (`PatchClassifier.classes`; no label where it predicts no object)."""
  picture = Image.fromarray(np.asarray(image, np.uint8)) if not isinstance(image, Image.Image) else image
  picture = picture.convert("RGB")
  big = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
  draw = ImageDraw.Draw(big)
  colours, shapes_ = shapes_tasks.PATCH_ATTRIBUTES["colour"], shapes_tasks.PATCH_ATTRIBUTES["shape"]
  rows, columns = classes["shape"].shape
  cell_w, cell_h = big.width / columns, big.height / rows
  for i in range(rows):
    for j in range(columns):
      x0, y0 = j * cell_w, i * cell_h
      draw.rectangle((x0, y0, x0 + cell_w - 1, y0 + cell_h - 1), outline=(70, 70, 70))
      shape, colour = int(classes["shape"][i, j]), int(classes["colour"][i, j])
      if shape == 0 and colour == 0:
        continue
      fill = shapes_scene.COLOURS[colours[colour - 1]] if colour else (200, 200, 200)
      draw.rectangle((x0 + 2, y0 + cell_h - 20, x0 + cell_w - 3, y0 + cell_h - 3), fill=(0, 0, 0))
      draw.text((x0 + 4, y0 + cell_h - 19), shapes_[shape - 1] if shape else "?", fill=fill)
  return big
