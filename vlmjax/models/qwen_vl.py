"""Qwen2.5-VL's images on the host: which tokens an image becomes and the `Patches` of a batch.

The image processor (`vlmjax.data.images.QwenImageProcessor`) resizes an image to multiples of patch_size x
merge_size pixels and flattens it into a grid (t, h, w) of patches, each merge unit's m x m patches consecutive,
units in raster order. The tower merges each unit into one token, so an image takes

    tokens = t · (h / m) · (w / m)

placeholders, in the raster order of its merged grid. `batch_patches` lays a batch's patches out window by window
(`models/qwen_vit.py`'s `layout` and `fill_patches`): window (i, j) of an image holds the merge units of rows [i·s,
i·s + s) and columns [j·s, j·s + s) of its merged grid (s = `window_units`), padded to s² units, so that windowed
attention is a reshape; the number of windows is padded to a `window_bucket`, so images of new sizes reuse the
compiled program. Per row it writes where each image token sits in the tower's output (`token_index`), its
(temporal, row, column) in its merged grid and, at an image's last token, the grid's longer side (M-RoPE,
`qwen_vit.mrope_positions`).
The window arithmetic is transformers' `get_vision_window_index`, the positions its `get_vision_position_ids` and
`get_rope_index`.
"""

from typing import Sequence

import numpy as np

from vlmjax.models.anyres import bucket
from vlmjax.models.qwen_vit import Layout, Patches, fill_patches, layout
from vlmjax.models.vlm import VLMConfig


def image_token_count(config: VLMConfig, grid: tuple[int, int, int]) -> int:
  """Placeholders an image of `grid` (t, h, w) patches takes in a prompt."""
  t, h, w = grid
  return t * h * w // config.vision.merge_size**2


def window_bucket(count: int) -> int:
  """The padded number of windows of a batch: up to 16 the next power of two (`bucket`), above it the next multiple
  of a sixteenth of the next power of two (144 for 144, a 1280 x 1280 image's windows), so that padding stays under
  an eighth. The tower's time grows with every padded window and its full-attention blocks' with their square: the
  next power of two (256 for 144) gave a 1280 x 1280 image's full attention 3.2 times its own work, and with steps of
  an eighth (160 for 144) that image's tower took 1.27 s against 1.02 s on the 2-core AMD EPYC."""
  if count <= 16:
    return bucket(count)
  step = 1 << ((count - 1).bit_length() - 4)
  return -(-count // step) * step


def image_layout(config: VLMConfig, patches: np.ndarray, grid: tuple[int, int, int]) -> Layout:
  """The `layout` of an image of `grid` (t, h, w) patches; ValueError when its patches are not float[t·h·w,
  3·T·p·p] or the grid is not whole merge units."""
  vision = config.vision
  found = layout(grid, vision.merge_size, vision.window_units)
  if np.shape(patches) != (len(found.patch_slots), vision.patch_dim):
    raise ValueError(f"an image of {list(grid)} patches takes float32[{len(found.patch_slots)}, {vision.patch_dim}], "
                     f"got {list(np.shape(patches))}")
  return found


def batch_patches(config: VLMConfig, rows: Sequence[Sequence[tuple[np.ndarray, tuple[int, int, int]]]],
                  num_windows: int | None = None, num_tokens: int | None = None) -> Patches:
  """The `Patches` of a batch: rows[b] lists row b's images in prompt order, each as (its patches float32[t·h·w,
  3·T·p·p] in the processor's order, its grid (t, h, w)), as the image processor makes them.

  num_windows, num_tokens: at least the batch's windows and its longest row's image tokens (default: their
  `window_bucket` and `bucket`); N = num_windows · L patches.
  """
  layouts = [[image_layout(config, patches, grid) for patches, grid in row] for row in rows]
  total = sum(each.num_windows for row_layouts in layouts for each in row_layouts)
  counts = [sum(len(each.token_units) for each in row_layouts) for row_layouts in layouts]
  num_windows = window_bucket(max(total, 1)) if num_windows is None else num_windows
  num_tokens = bucket(max(counts + [1])) if num_tokens is None else num_tokens
  if num_windows < total or num_tokens < max(counts + [0]):
    raise ValueError(f"the batch has {total} windows and up to {max(counts)} image tokens a row; num_windows="
                     f"{num_windows} and num_tokens={num_tokens} are too few")
  return fill_patches(config.vision, [list(zip((patches for patches, _ in row), row_layouts))
                                       for row, row_layouts in zip(rows, layouts)], num_windows, num_tokens)
