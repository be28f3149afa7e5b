"""Training batches of models whose images give a token count each: LLaVA-NeXT's anyres tiles and Qwen2(.5)-VL's
native-resolution patches.

    images = VariableImages(model_config)                   # model.image_grid_pinpoints or a Qwen vision_tower
    count = images.count(size)                              # placeholders of one processed image
    batch = images.collate(examples, length=2048)           # the batch the train step takes

An example carries its images as the checkpoint's image processor makes them, (tiles float32[n, S, S, 3], (height,
width)) or (patches float32[t·h·w, 3·T·p·p], grid (t, h, w)), and each image's placeholder repeated `count` times. A
batch's images become one `Tiles` or `Patches` (`vlmjax.models.vlm`) whose token tables are as long as the rows
(K = T: no row can hold more image tokens than tokens) and whose tiles or windows are padded to a bucket of their count
(`anyres.bucket`, `qwen_vl.window_bucket`): the train step compiles once per bucket of a batch's image area, not per
batch. Qwen2.5-VL's
M-RoPE positions are made by the model from the placeholders and the `Patches` tables.
"""

import dataclasses
from typing import Sequence

import numpy as np

from vlmjax.data import pipeline
from vlmjax.models import anyres, qwen_vl
from vlmjax.models.vlm import Patches, Tiles, VLMConfig

Image = tuple[np.ndarray, tuple[int, ...]]  # a processed image and its size: (height, width) or grid (t, h, w)


@dataclasses.dataclass(frozen=True)
class VariableImages:
  """The image arithmetic of one model with variable image tokens."""

  config: VLMConfig

  def __post_init__(self):
    if not self.config.variable_image_tokens:
      raise ValueError("VariableImages is for models whose images give a token count each (model."
                       "image_grid_pinpoints or vision_tower 'qwen2_vl' or 'qwen2_5_vl')")

  def count(self, size: tuple[int, ...]) -> int:
    """Placeholders of one image of `size`, as its image processor gives it."""
    if self.config.qwen_tower:
      return qwen_vl.image_token_count(self.config, tuple(size))
    return anyres.image_token_count(self.config, tuple(size))

  def padded_units(self, images: Sequence[Image]) -> int:
    """The tiles or windows that a batch holding these images pads them to (`anyres.bucket` of their tiles,
    `qwen_vl.window_bucket` of their windows): with the prompt bucket and the rows, the shape a prefill follows."""
    if self.config.qwen_tower:
      windows = sum(qwen_vl.image_layout(self.config, pixels, tuple(size)).num_windows for pixels, size in images)
      return qwen_vl.window_bucket(max(windows, 1))
    return anyres.bucket(max(sum(len(tiles) for tiles, _ in images), 1))

  def expand(self, ids: np.ndarray, weights: np.ndarray, images: Sequence[Image]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, weights) [t] with one placeholder per image -> each image's placeholder repeated its `count` times
    (its weight with it); ValueError when the placeholders and images do not pair up."""
    placeholders = np.flatnonzero(ids == self.config.image_token_id)
    if len(placeholders) != len(images):
      raise ValueError(f"{len(placeholders)} image placeholders in the rendered text for {len(images)} images")
    copies = np.ones(len(ids), np.int64)
    copies[placeholders] = [self.count(size) for _, size in images]
    return np.repeat(ids, copies), np.repeat(weights, copies)

  def collate(self, examples: Sequence[dict], length: int) -> dict:
    """Examples {input_ids, targets, loss_mask: [t], pixel_values: list of `Image`} -> the batch {input_ids,
    targets, loss_mask, input_mask: [B, T] (right-padded to T = length), pixel_values: `Tiles` or `Patches`}."""
    batch = pipeline.pad_batch([{key: example[key] for key in pipeline.TOKEN_KEYS} for example in examples], length)
    rows = [list(example["pixel_values"]) for example in examples]
    batch_images = qwen_vl.batch_patches if self.config.qwen_tower else anyres.batch_tiles
    batch["pixel_values"] = batch_images(self.config, rows, num_tokens=length)
    return batch


def is_image_input(value) -> bool:
  """Whether a batch value is a `Tiles` or `Patches` (tables of the whole batch beside per-row indices)."""
  return isinstance(value, (Tiles, Patches))
