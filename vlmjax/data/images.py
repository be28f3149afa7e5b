"""Image preprocessing as a checkpoint's image processor states it (`preprocessor_config.json`): resize with its
PIL resampling, center-crop, rescale, normalize; channels last.

CLIP (LLaVA): resize the shortest edge to size.shortest_edge, then center-crop to crop_size.
SigLIP (PaliGemma, shapes): resize to size.height x size.width.
"""

import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

CONFIG_FILES = ("preprocessor_config.json", "processor_config.json")


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
  size: dict  # {"shortest_edge": n} or {"height": h, "width": w}
  crop_size: dict | None = None  # {"height": h, "width": w}, used when do_center_crop
  resample: int = Image.Resampling.BICUBIC
  do_resize: bool = True
  do_center_crop: bool = False
  do_rescale: bool = True
  rescale_factor: float = 1 / 255
  do_normalize: bool = True
  image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
  image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
  do_convert_rgb: bool = True

  @classmethod
  def from_dict(cls, values: dict) -> "ImageProcessor":
    """From a preprocessor_config.json's contents (keys this class does not use are ignored, as transformers'
    processors ignore the ones they do not use)."""
    fields = {field.name for field in dataclasses.fields(cls)}
    kept = {key: value for key, value in values.items() if key in fields}
    if isinstance(kept.get("size"), int):
      kept["size"] = {"shortest_edge": kept["size"]}
    if isinstance(kept.get("crop_size"), int):
      kept["crop_size"] = {"height": kept["crop_size"], "width": kept["crop_size"]}
    for key in ("image_mean", "image_std"):
      if key in kept:
        kept[key] = tuple(kept[key])
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

  @property
  def output_size(self) -> tuple[int, int]:
    """(height, width) of the processed images."""
    if self.do_center_crop and self.crop_size:
      return self.crop_size["height"], self.crop_size["width"]
    if "height" in self.size:
      return self.size["height"], self.size["width"]
    raise ValueError("a shortest_edge resize without center crop gives images of varying size")

  def _resized(self, image: Image.Image) -> Image.Image:
    if "shortest_edge" in self.size:
      short = self.size["shortest_edge"]
      width, height = image.size
      if width <= height:
        target = (short, int(short * height / width))
      else:
        target = (int(short * width / height), short)
    else:
      target = (self.size["width"], self.size["height"])
    return image.resize(target, resample=self.resample)

  def _one(self, image: Any, index: int) -> np.ndarray:
    if isinstance(image, np.ndarray):
      if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (3, 4):
        raise ValueError(f"image {index}: arrays must be uint8[H, W, 3], got {image.dtype}{list(image.shape)}")
      image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
      raise ValueError(f"image {index}: expected a PIL image or a uint8[H, W, 3] array, got {type(image).__name__}")
    if self.do_convert_rgb:
      image = image.convert("RGB")
    if self.do_resize:
      image = self._resized(image)
    pixels = np.asarray(image)
    if self.do_center_crop and self.crop_size:
      height, width = pixels.shape[:2]
      crop_height, crop_width = self.crop_size["height"], self.crop_size["width"]
      top, left = int((height - crop_height) / 2), int((width - crop_width) / 2)
      pixels = pixels[top:top + crop_height, left:left + crop_width]
    pixels = pixels.astype(np.float64) * self.rescale_factor if self.do_rescale else pixels.astype(np.float64)
    pixels = pixels.astype(np.float32)
    if self.do_normalize:
      pixels = (pixels - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
    return pixels

  def __call__(self, images: Sequence[Any]) -> np.ndarray:
    """PIL images or uint8[H, W, 3] arrays -> float32[B, H', W', 3], normalized."""
    return np.stack([self._one(image, i) for i, image in enumerate(images)])
