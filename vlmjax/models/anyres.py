"""LLaVA-NeXT's "anyres" layout: which image tokens an image of a given size becomes, computed on the host.

An image is resized (aspect kept) and zero-padded into the best of the checkpoint's `image_grid_pinpoints`
(`select_best_resolution`), cut into a rows x cols grid of tiles of the tower's input size, and preceded by the
whole image squashed to one tile (the base tile). The tower makes a g x g grid of tokens of every tile. The model
takes the base tile's g² tokens, then the tiles' tokens as one (rows·g) x (cols·g) grid, less the rows (or columns)
that only show the padding, each kept row followed by the learned `image_newline` embedding:

    tokens = g² + height · (width + 1)        (height x width: the kept part of the grid)

`batch_tiles` writes a batch's images as one array of tiles and, per row, the indices of its image tokens in the
model's image-token table (`vlmjax.models.vlm.Tiles`), both padded to `bucket`s, so the compiled program sees only
padded shapes. The arithmetic is transformers' (`select_best_resolution`,
`LlavaNextProcessor._get_number_of_features`, `LlavaNextModel.pack_image_features`), float rounding included.
"""

import dataclasses
from typing import Sequence

import numpy as np

from vlmjax import runtime
from vlmjax.models.vlm import Tiles, VLMConfig


def select_best_resolution(image_size: tuple[int, int], pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
  """The (height, width) among `pinpoints` that shows the most of an image of `image_size` (height, width) at up
  to its own resolution, the least padded area breaking ties; the first such one in the list order."""
  height, width = image_size
  best, best_effective, best_wasted = None, 0, float("inf")
  for target_height, target_width in pinpoints:
    scale = min(target_width / width, target_height / height)
    effective = min(int(width * scale) * int(height * scale), width * height)
    wasted = target_width * target_height - effective
    if effective > best_effective or (effective == best_effective and wasted < best_wasted):
      best, best_effective, best_wasted = (target_height, target_width), effective, wasted
  return best


@dataclasses.dataclass(frozen=True)
class Grid:
  """One image's tiles and the part of their token grid the model keeps (in tokens).

  rows, cols: tiles of the chosen resolution (besides the base tile).
  top, height: the kept token rows [top, top + height) of the rows·g token rows; left, width: the same for columns.
  """

  rows: int
  cols: int
  top: int
  height: int
  left: int
  width: int

  @property
  def num_tiles(self) -> int:
    """Tiles the tower runs over for this image, the base tile included."""
    return 1 + self.rows * self.cols


def grid(image_size: tuple[int, int], pinpoints: Sequence[Sequence[int]], tile_size: int, tokens_per_side: int) -> Grid:
  """The tiles of an image of `image_size` (height, width) and the unpadded part of their tokens.

  tile_size: the tower's input side (pixels); tokens_per_side: g, the tower's patch grid side."""
  best_height, best_width = select_best_resolution(image_size, pinpoints)
  rows, cols = best_height // tile_size, best_width // tile_size
  height, width = image_size
  current_height, current_width = rows * tokens_per_side, cols * tokens_per_side
  top, left, kept_height, kept_width = 0, 0, current_height, current_width
  if width / height > current_width / current_height:  # a wide image: padding above and below
    top = (current_height - int(round(height * (current_width / width), 7))) // 2
    kept_height = current_height - 2 * top
  else:
    left = (current_width - int(round(width * (current_height / height), 7))) // 2
    kept_width = current_width - 2 * left
  return Grid(rows, cols, top, kept_height, left, kept_width)


def token_count(image_grid: Grid, tokens_per_side: int) -> int:
  """Image tokens (placeholders) one image becomes: the base tile's, then each kept row and its newline."""
  return tokens_per_side**2 + image_grid.height * (image_grid.width + 1)


def image_token_indices(image_grid: Grid, first_tile: int, tokens_per_side: int, newline: int) -> np.ndarray:
  """int32[token_count]: one image's tokens as rows of the image-token table, whose row n·g² + p is token p of tile
  n and row `newline` the newline embedding; the image's base tile is tile `first_tile`, its grid the next ones."""
  g = tokens_per_side
  rows = np.arange(image_grid.top, image_grid.top + image_grid.height)[:, None]  # [h, 1] token rows of the grid
  cols = np.arange(image_grid.left, image_grid.left + image_grid.width)[None, :]  # [1, w]
  tile = first_tile + 1 + (rows // g) * image_grid.cols + cols // g  # [h, w]
  grid_tokens = tile * g * g + (rows % g) * g + cols % g  # [h, w]
  with_newlines = np.concatenate([grid_tokens, np.full((image_grid.height, 1), newline)], axis=1)  # [h, w + 1]
  return np.concatenate([first_tile * g * g + np.arange(g * g), with_newlines.ravel()]).astype(np.int32)


def bucket(count: int) -> int:
  """The padded size of a variable count (tiles, image tokens): the next power of two, so a batch of new sizes
  rarely compiles again and never pads more than twice over."""
  return 1 << max(count - 1, 0).bit_length()


def image_grid(config: VLMConfig, image_size: tuple[int, int]) -> Grid:
  """`grid` for a model with `image_grid_pinpoints`."""
  return grid(image_size, config.image_grid_pinpoints, config.vision.image_size, config.vision.grid_size)


def checked_image_grid(config: VLMConfig, tiles: np.ndarray, image_size: tuple[int, int]) -> Grid:
  """`image_grid` of an image of `image_size` (height, width); ValueError when its tiles are not the float[n, S, S,
  3] that size takes."""
  found, side = image_grid(config, tuple(image_size)), config.vision.image_size
  if np.shape(tiles) != (found.num_tiles, side, side, 3):
    raise ValueError(f"an image of {image_size[0]}x{image_size[1]} pixels takes float32[{found.num_tiles}, {side}, "
                     f"{side}, 3] tiles, got {list(np.shape(tiles))}")
  return found


def image_token_count(config: VLMConfig, image_size: tuple[int, int]) -> int:
  """Placeholders an image of `image_size` (height, width) takes in a prompt of this model."""
  return token_count(image_grid(config, image_size), config.vision.grid_size)


def batch_tiles(config: VLMConfig, rows: Sequence[Sequence[tuple[np.ndarray, tuple[int, int]]]],
                num_tiles: int | None = None, num_tokens: int | None = None) -> Tiles:
  """The `Tiles` of a batch: rows[b] lists row b's images in prompt order, each as (its tiles float32[n, S, S, 3],
  the base tile first, as the image processor makes them; its (height, width)).

  num_tiles, num_tokens: N and K, at least the batch's tiles and its longest row's image tokens (default: their
  `bucket`s).
  """
  size, g = config.vision.image_size, config.vision.grid_size
  grids = [[checked_image_grid(config, tiles, image_size) for tiles, image_size in row] for row in rows]
  total = sum(tiles_grid.num_tiles for row_grids in grids for tiles_grid in row_grids)
  counts = [sum(token_count(tiles_grid, g) for tiles_grid in row_grids) for row_grids in grids]
  num_tiles = bucket(max(total, 1)) if num_tiles is None else num_tiles
  num_tokens = bucket(max(counts + [1])) if num_tokens is None else num_tokens
  if num_tiles < total or num_tokens < max(counts + [0]):
    raise ValueError(f"the batch has {total} tiles and up to {max(counts)} image tokens a row; num_tiles="
                     f"{num_tiles} and num_tokens={num_tokens} are too few")
  newline = num_tiles * g * g  # the table's row after every tile's tokens
  token_index = np.zeros((len(rows), num_tokens), np.int32)
  first_tile = 0
  for b, row_grids in enumerate(grids):
    row_indices = []
    for tiles_grid in row_grids:
      row_indices.append(image_token_indices(tiles_grid, first_tile, g, newline))
      first_tile += tiles_grid.num_tiles
    token_index[b, :counts[b]] = np.concatenate(row_indices) if row_indices else []
  pixel_values = runtime.aligned_zeros((num_tiles, size, size, 3), np.float32)  # read in place on a CPU
  pixel_values[:total] = np.concatenate([tiles for row in rows for tiles, _ in row] or [pixel_values[:0]])
  return Tiles(pixel_values=pixel_values, token_index=token_index)
