"""Image preprocessing as a checkpoint's image processor states it (`preprocessor_config.json`), step for step
as transformers' PIL image processors do it: convert to RGB (transparency composited onto white), resize with
Pillow and the config's resampling filter, center-crop (zero-padding an image smaller than the crop),
rescale, normalize; channels last.

CLIP (LLaVA): resize the shortest edge to size.shortest_edge, then center-crop to crop_size.
SigLIP (PaliGemma, shapes): resize to size.height x size.width.
LLaVA-NeXT (`AnyresImageProcessor`): the image resized into the best of its `image_grid_pinpoints` and cut into
tiles, after the whole image squashed to one tile, each tile then processed as CLIP's.
Qwen2-VL / Qwen2.5-VL (`QwenImageProcessor`): the image resized to multiples of patch_size x merge_size pixels
holding between min_pixels and max_pixels (`smart_resize`), rescaled, normalized and flattened into patches.

`processor.at_detail(detail)`: the processor an image asked for at OpenAI's `image_url.detail` goes through (below).
"""

import dataclasses
import json
import math
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

from vlmjax.models import anyres

CONFIG_FILES = ("preprocessor_config.json", "processor_config.json")
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Defaults of the transformers processor classes, for keys a config leaves out.
CLIP_DEFAULTS = dict(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
                     image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)
ANYRES_TYPE = "LlavaNextImageProcessor"
QWEN_TYPE = "Qwen2VLImageProcessor"  # Qwen2-VL's and Qwen2.5-VL's
TYPE_DEFAULTS = {
    "CLIPImageProcessor": CLIP_DEFAULTS,
    "SiglipImageProcessor": dict(size={"height": 224, "width": 224}),
    ANYRES_TYPE: dict(CLIP_DEFAULTS, image_grid_pinpoints=((336, 672), (672, 336), (672, 672), (1008, 336),
                                                           (336, 1008))),
    QWEN_TYPE: dict(size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}, image_mean=OPENAI_CLIP_MEAN,
                    image_std=OPENAI_CLIP_STD),
}
# OpenAI's `image_url.detail` ("auto" | "low" | "high"). OpenAI's "low" shows the model a 512x512 version of the
# image at a small fixed budget (85 tokens for GPT-4o), "high" adds crops of the full image, "auto" chooses by the
# image's size; vLLM accepts the field and ignores it. Here "high" and "auto" are the checkpoint's processor as it is
# configured (its token count already follows the image's size), and "low" is the cheapest the model takes an image at:
# - Qwen2-VL / Qwen2.5-VL: max_pixels lowered to LOW_DETAIL_TOKENS merged patches (28·28·64 pixels, 224x224, for
#   Qwen2.5-VL: OpenAI's small budget in the model's own tokens), never below min_pixels nor above max_pixels;
# - LLaVA-NeXT: the image scaled down, aspect kept, to fit the smallest of its image_grid_pinpoints, where the model
#   then tiles it. The base tile alone would be cheaper, but transformers' processor and model always give an image
#   its base tile and a grid: the checkpoint has never seen that layout;
# - fixed-size images (LLaVA-1.5, PaliGemma, shapes): every image gives the same tokens at any detail.
DETAILS = ("auto", "low", "high")
LOW_DETAIL_TOKENS = 64


def _check_detail(detail: str) -> str:
  if detail not in DETAILS:
    raise ValueError(f"image detail {detail!r}: use one of {', '.join(DETAILS)}")
  return detail


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
  size: dict  # {"shortest_edge": n} or {"height": h, "width": w}
  crop_size: dict | None = None  # {"height": h, "width": w}, used when do_center_crop
  resample: int = Image.Resampling.BICUBIC  # a PIL resampling filter code (3 = bicubic)
  do_resize: bool = True
  do_center_crop: bool = False
  do_rescale: bool = True
  rescale_factor: float = 1 / 255
  do_normalize: bool = True
  image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
  image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
  do_convert_rgb: bool = True

  def __post_init__(self):
    if not (set(self.size) == {"shortest_edge"} or set(self.size) == {"height", "width"}):
      raise ValueError(f"image processor size={self.size!r}: use {{'shortest_edge': n}} or "
                       f"{{'height': h, 'width': w}}")
    if self.do_center_crop and (not self.crop_size or set(self.crop_size) != {"height", "width"}):
      raise ValueError(f"image processor crop_size={self.crop_size!r}: center cropping needs "
                       f"{{'height': h, 'width': w}}")

  @classmethod
  def from_dict(cls, values: dict) -> "ImageProcessor":
    """From a preprocessor_config.json's contents. Keys this class does not use are ignored, as transformers'
    processors ignore the ones they do not use; keys left out (or null) take the defaults of the
    `image_processor_type`; LLaVA-NeXT's is an `AnyresImageProcessor`."""
    processor_type = str(values.get("image_processor_type", "")).removesuffix("Fast")
    if processor_type == ANYRES_TYPE:
      cls = AnyresImageProcessor
    elif processor_type == QWEN_TYPE:
      cls = QwenImageProcessor
      values = QwenImageProcessor.sized(values)
    elif values.get("do_pad"):
      raise ValueError("image processor do_pad=True (padding images to a square) is not supported")
    fields = {field.name for field in dataclasses.fields(cls)}
    defaults = TYPE_DEFAULTS.get(processor_type, {})
    kept = {**defaults, **{key: value for key, value in values.items() if key in fields and value is not None}}
    if isinstance(kept.get("size"), int):
      kept["size"] = {"shortest_edge": kept["size"]}
    if isinstance(kept.get("crop_size"), int):
      kept["crop_size"] = {"height": kept["crop_size"], "width": kept["crop_size"]}
    for key in ("image_mean", "image_std"):
      if key in kept:
        value = kept[key]
        kept[key] = tuple(value) if isinstance(value, (list, tuple)) else (float(value),) * 3
    return cls(**kept)

  @classmethod
  def from_directory(cls, directory: str) -> "ImageProcessor":
    for name in CONFIG_FILES:
      path = os.path.join(directory, name)
      if os.path.exists(path):
        with open(path) as f:
          values = json.load(f)
        return cls.from_dict(values.get("image_processor", values))
    raise FileNotFoundError(f"{directory} has none of {list(CONFIG_FILES)}")

  def to_dict(self) -> dict:
    return {"image_processor_type": "SiglipImageProcessor" if "height" in self.size else "CLIPImageProcessor",
            **dataclasses.asdict(self)}

  def at_detail(self, detail: str) -> "ImageProcessor":
    """The processor for images asked for at OpenAI's `detail` (one of DETAILS): this one, as every image of a
    fixed-size model gives the same tokens whatever the detail."""
    _check_detail(detail)
    return self

  @property
  def output_size(self) -> tuple[int, int]:
    """(height, width) of the processed images."""
    if self.do_center_crop:
      return self.crop_size["height"], self.crop_size["width"]
    if self.do_resize and "height" in self.size:
      return self.size["height"], self.size["width"]
    raise ValueError("without a center crop, a shortest_edge resize (or none) gives images of varying size")

  def _rgb(self, image: Any, index: int) -> np.ndarray:
    """uint8[H, W, C]: RGB when do_convert_rgb (alpha composited onto white, as transformers does)."""
    if isinstance(image, Image.Image):
      if self.do_convert_rgb and ("A" in image.getbands() or image.info.get("transparency") is not None):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
      image = np.asarray(image.convert("RGB") if self.do_convert_rgb else image)
    elif not isinstance(image, np.ndarray):
      raise ValueError(f"image {index}: expected a PIL image or a uint8[H, W, 3] array, got {type(image).__name__}")
    if image.ndim == 2:
      image = image[:, :, None]
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
      raise ValueError(f"image {index}: arrays must be uint8[H, W, 3] (or 1 or 4 channels), got "
                       f"{image.dtype}{list(image.shape)}")
    if not self.do_convert_rgb:
      return image
    if image.shape[-1] == 1:
      return np.repeat(image, 3, axis=-1)
    if image.shape[-1] == 4:
      alpha = image[..., 3:4] / 255
      return np.round(alpha * image[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return image

  def _resized_to(self, pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    resized = np.asarray(image.resize((width, height), resample=self.resample))
    return resized[..., None] if resized.ndim == 2 else resized

  def _resized(self, pixels: np.ndarray) -> np.ndarray:
    height, width = pixels.shape[:2]
    if "shortest_edge" in self.size:  # the long edge is truncated, as transformers (and torchvision) compute it
      short = self.size["shortest_edge"]
      target = (int(short * height / width), short) if width <= height else (short, int(short * width / height))
    else:
      target = (self.size["height"], self.size["width"])
    return self._resized_to(pixels, *target)

  def _cropped(self, pixels: np.ndarray) -> np.ndarray:
    """Center crop; an image smaller than the crop is zero-padded around it first."""
    height, width = pixels.shape[:2]
    crop_height, crop_width = self.crop_size["height"], self.crop_size["width"]
    pad_height, pad_width = max(crop_height - height, 0), max(crop_width - width, 0)
    if pad_height or pad_width:
      top, left = (pad_height + 1) // 2, (pad_width + 1) // 2
      pixels = np.pad(pixels, ((top, pad_height - top), (left, pad_width - left), (0, 0)))
      height, width = pixels.shape[:2]
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    return pixels[top:top + crop_height, left:left + crop_width]

  def _one(self, image: Any, index: int) -> np.ndarray:
    return self._finished(self._rgb(image, index))

  def _finished(self, pixels: np.ndarray) -> np.ndarray:
    """uint8[H, W, C] -> float32[H', W', C]: resized, cropped, rescaled and normalized as configured."""
    if self.do_resize:
      pixels = self._resized(pixels)
    if self.do_center_crop:
      pixels = self._cropped(pixels)
    return self._normalized(pixels)

  def _normalized(self, pixels: np.ndarray) -> np.ndarray:
    """uint8[H, W, C] -> float32[H, W, C], rescaled and normalized as configured."""
    pixels = (pixels.astype(np.float64) * self.rescale_factor if self.do_rescale else pixels).astype(np.float32)
    if self.do_normalize:
      pixels = (pixels - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
    return pixels

  def __call__(self, images: Sequence[Any]) -> np.ndarray:
    """PIL images or uint8[H, W, 3] arrays -> float32[B, H', W', 3], normalized, channels last."""
    processed = [self._one(image, i) for i, image in enumerate(images)]
    shapes = {pixels.shape for pixels in processed}
    if len(shapes) > 1:
      raise ValueError(f"the processed images differ in shape ({sorted(shapes)}); configure a center crop or a "
                       f"fixed size")
    return np.stack(processed)


@dataclasses.dataclass(frozen=True)
class AnyresImageProcessor(ImageProcessor):
  """LLaVA-NeXT's image processor (transformers' LlavaNextImageProcessor): an image becomes its base tile (the whole
  image resized to the size, aspect ignored) and the tiles of its best pinpoint resolution (`anyres`): resized
  into it with the aspect kept, zero-padded around to fill it, cut row by row into crop-size tiles. Each tile is
  then resized, cropped, rescaled and normalized as the CLIP processor does."""

  image_grid_pinpoints: tuple[tuple[int, int], ...] = TYPE_DEFAULTS[ANYRES_TYPE]["image_grid_pinpoints"]
  do_pad: bool = True  # transformers pads the tile counts of a batch to one; `anyres.batch_tiles` lays them out
  # detail "low" (`at_detail`): each image first scaled down, aspect kept, to fit the smallest pinpoints; its size is
  # then the scaled one, so the model's pinpoint for it is one of the smallest too.
  low_detail: bool = False

  def __post_init__(self):
    super().__post_init__()
    object.__setattr__(self, "image_grid_pinpoints", tuple(tuple(int(side) for side in pinpoint)
                                                           for pinpoint in self.image_grid_pinpoints))

  def to_dict(self) -> dict:
    values = {**super().to_dict(), "image_processor_type": ANYRES_TYPE}
    if not self.low_detail:  # a saved config (and a checkpoint's fingerprint) stays transformers' own
      del values["low_detail"]
    return values

  def at_detail(self, detail: str) -> "AnyresImageProcessor":
    """For detail "low", the processor that tiles each image at the smallest of the pinpoints (scaled down to fit
    them); else this one."""
    return dataclasses.replace(self, low_detail=True) if _check_detail(detail) == "low" else self

  def _scaled_to_smallest_pinpoint(self, pixels: np.ndarray) -> np.ndarray:
    """uint8[H, W, C] scaled down (never up), aspect kept, into the smallest-area pinpoint that shows it best."""
    height, width = pixels.shape[:2]
    least = min(pinpoint_height * pinpoint_width for pinpoint_height, pinpoint_width in self.image_grid_pinpoints)
    smallest = [pinpoint for pinpoint in self.image_grid_pinpoints if pinpoint[0] * pinpoint[1] == least]
    fit_height, fit_width = anyres.select_best_resolution((height, width), smallest)
    scale = min(fit_height / height, fit_width / width)
    if scale >= 1:
      return pixels
    return self._resized_to(pixels, min(max(1, round(height * scale)), fit_height),
                            min(max(1, round(width * scale)), fit_width))

  @property
  def tile_size(self) -> int:
    """The side of the tiles the padded image is cut into (transformers' `patch_size`)."""
    if self.crop_size:
      return self.crop_size["height"]
    return self.size.get("height", self.size.get("shortest_edge"))

  def _tiles(self, image: Any, index: int) -> tuple[np.ndarray, tuple[int, int]]:
    pixels = self._rgb(image, index)
    if self.low_detail:
      pixels = self._scaled_to_smallest_pinpoint(pixels)
    height, width = pixels.shape[:2]
    best_height, best_width = anyres.select_best_resolution((height, width), self.image_grid_pinpoints)
    if best_width / width < best_height / height:  # the width fills the pinpoint; the height rounds up
      new_height, new_width = min(math.ceil(height * (best_width / width)), best_height), best_width
    else:
      new_height, new_width = best_height, min(math.ceil(width * (best_height / height)), best_width)
    top, left = (best_height - new_height) // 2, (best_width - new_width) // 2
    padded = np.zeros((best_height, best_width, pixels.shape[-1]), np.uint8)
    padded[top:top + new_height, left:left + new_width] = self._resized_to(pixels, new_height, new_width)
    side = self.tile_size
    tiles = [padded[i:i + side, j:j + side] for i in range(0, best_height, side) for j in range(0, best_width, side)]
    base_height, base_width = ((self.size["height"], self.size["width"]) if "height" in self.size
                               else (self.size["shortest_edge"],) * 2)
    base = self._resized_to(pixels, base_height, base_width)
    return np.stack([self._finished(tile) for tile in [base, *tiles]]), (height, width)

  def __call__(self, images: Sequence[Any]) -> list[tuple[np.ndarray, tuple[int, int]]]:
    """PIL images or uint8[H, W, 3] arrays -> per image (its tiles float32[n, S, S, 3], the base tile first; its
    (height, width)), as `anyres.batch_tiles` takes them."""
    return [self._tiles(image, i) for i, image in enumerate(images)]


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
  """Qwen2-VL's target (height, width): multiples of `factor` near the image's own, the aspect kept as closely as
  they allow, scaled down into max_pixels or up to min_pixels (transformers' `smart_resize`)."""
  if max(height, width) / min(height, width) > 200:
    raise ValueError(f"an image of {height}x{width} pixels is too elongated for Qwen2-VL's processor: the longer side "
                     f"may be at most 200 times the shorter")
  resized_height, resized_width = round(height / factor) * factor, round(width / factor) * factor
  if resized_height * resized_width > max_pixels:
    beta = math.sqrt(height * width / max_pixels)
    resized_height = max(factor, math.floor(height / beta / factor) * factor)
    resized_width = max(factor, math.floor(width / beta / factor) * factor)
  elif resized_height * resized_width < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    resized_height = math.ceil(height * beta / factor) * factor
    resized_width = math.ceil(width * beta / factor) * factor
  return resized_height, resized_width


@dataclasses.dataclass(frozen=True)
class QwenImageProcessor(ImageProcessor):
  """Qwen2-VL's image processor (transformers' Qwen2VLImageProcessor, which Qwen2.5-VL uses): each image at its own
  resolution, resized by `smart_resize` (size.shortest_edge = min_pixels, size.longest_edge = max_pixels, in
  pixels), rescaled and normalized, then flattened into patches: merge units of merge_size x merge_size patches in
  raster order, each unit's patches row by row, a patch as (channel, frame, row, column) with the image repeated
  over the temporal_patch_size frames."""

  size: dict = dataclasses.field(default_factory=lambda: dict(TYPE_DEFAULTS[QWEN_TYPE]["size"]))
  patch_size: int = 14
  temporal_patch_size: int = 2
  merge_size: int = 2

  def __post_init__(self):
    if set(self.size) != {"shortest_edge", "longest_edge"}:
      raise ValueError(f"image processor size={self.size!r}: Qwen2-VL's needs {{'shortest_edge': min_pixels, "
                       f"'longest_edge': max_pixels}}")
    if self.do_center_crop:
      raise ValueError("image processor do_center_crop=True is not Qwen2-VL's (images keep their own size)")

  @staticmethod
  def sized(values: dict) -> dict:
    """A config's values with min_pixels / max_pixels (older configs' keys, which take precedence as transformers
    reads them) written into size."""
    size = dict(values.get("size") or TYPE_DEFAULTS[QWEN_TYPE]["size"])
    for key, edge in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
      if values.get(key) is not None:
        size[edge] = values[key]
    return {**values, "size": size}

  def to_dict(self) -> dict:
    return {**dataclasses.asdict(self), "image_processor_type": QWEN_TYPE}

  @property
  def output_size(self) -> tuple[int, int]:
    raise ValueError("Qwen2-VL's processor keeps each image's own size")

  def at_detail(self, detail: str) -> "QwenImageProcessor":
    """For detail "low", the processor whose max_pixels holds LOW_DETAIL_TOKENS visual tokens (a merged patch each,
    (patch_size · merge_size)² pixels), kept between its own min_pixels and max_pixels; else this one."""
    if _check_detail(detail) != "low":
      return self
    min_pixels, max_pixels = self.size["shortest_edge"], self.size["longest_edge"]
    low = LOW_DETAIL_TOKENS * (self.patch_size * self.merge_size)**2
    return dataclasses.replace(self, size={"shortest_edge": min_pixels,
                                           "longest_edge": max(min_pixels, min(max_pixels, low))})

  def target_size(self, height: int, width: int) -> tuple[int, int]:
    """The (height, width) an image of height x width pixels is resized to."""
    return smart_resize(height, width, self.patch_size * self.merge_size, self.size["shortest_edge"],
                        self.size["longest_edge"])

  def _patches(self, image: Any, index: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    pixels = self._rgb(image, index)
    if self.do_resize:
      pixels = self._resized_to(pixels, *self.target_size(*pixels.shape[:2]))
    pixels = self._normalized(pixels)
    p, m, frames = self.patch_size, self.merge_size, self.temporal_patch_size
    height, width, channels = pixels.shape
    rows, cols = height // p, width // p
    units = pixels.reshape(rows // m, m, p, cols // m, m, p, channels).transpose(0, 3, 1, 4, 6, 2, 5)
    # [h/m, w/m, m, m, C, p, p]: units, a unit's patches, each patch channel-first; the frames repeat the image
    units = np.broadcast_to(units[:, :, :, :, :, None], units.shape[:5] + (frames, p, p))
    return units.reshape(rows * cols, channels * frames * p * p), (1, rows, cols)

  def __call__(self, images: Sequence[Any]) -> list[tuple[np.ndarray, tuple[int, int, int]]]:
    """PIL images or uint8[H, W, 3] arrays -> per image (its patches float32[t·h·w, 3·T·p·p], its grid (t, h, w) of
    patches), as `vlmjax.models.qwen_vl.batch_patches` takes them."""
    return [self._patches(image, i) for i, image in enumerate(images)]
