"""The image processors at OpenAI's `image_url.detail`: "low" is the cheapest the model takes an image at (Qwen2.5-VL:
a 64-token budget within its own min and max pixels; LLaVA-NeXT: the image scaled down into its smallest pinpoint,
processed as that smaller image), "high" and "auto" the processor as configured, and a fixed-size processor is the
same at any detail. Their numerics against transformers are tests/interop's."""

import numpy as np
import pytest
from PIL import Image

from vlmjax.data.images import LOW_DETAIL_TOKENS, AnyresImageProcessor, ImageProcessor, QwenImageProcessor, smart_resize
from vlmjax.models import anyres

QWEN = ImageProcessor.from_dict({"image_processor_type": "Qwen2VLImageProcessor"})  # Qwen2.5-VL's defaults
LLAVA_NEXT = ImageProcessor.from_dict({"image_processor_type": "LlavaNextImageProcessor",  # 336-pixel tiles
                                      "size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}})
CLIP = ImageProcessor.from_dict({"image_processor_type": "CLIPImageProcessor"})


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)


def _qwen_tokens(processor: QwenImageProcessor, image: np.ndarray) -> int:
  (_, (_, rows, cols)), = processor([image])
  return rows * cols // processor.merge_size**2


def test_qwen_low_detail_holds_64_tokens_within_its_own_min_and_max_pixels():
  image = _image(1000, 800)
  low = QWEN.at_detail("low")
  assert low.size == {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * LOW_DETAIL_TOKENS}
  assert QWEN.at_detail("high") is QWEN and QWEN.at_detail("auto") is QWEN
  assert _qwen_tokens(QWEN, image) > 1000 and _qwen_tokens(low, image) <= LOW_DETAIL_TOKENS
  assert low([image])[0][1] == (1, *(side // 14 for side in smart_resize(1000, 800, 28, 56 * 56, 28 * 28 * 64)))
  # A budget below the processor's own max_pixels only; never below its min_pixels.
  small = QwenImageProcessor(size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 16})
  assert small.at_detail("low") == small
  large_min = QwenImageProcessor(size={"shortest_edge": 28 * 28 * 100, "longest_edge": 28 * 28 * 1280})
  assert large_min.at_detail("low").size == {"shortest_edge": 28 * 28 * 100, "longest_edge": 28 * 28 * 100}


def _llava_next_tokens(processor: AnyresImageProcessor, image: np.ndarray) -> int:
  (tiles, size), = processor([image])
  image_grid = anyres.grid(size, processor.image_grid_pinpoints, processor.tile_size, 24)
  assert tiles.shape[0] == image_grid.num_tiles
  return anyres.token_count(image_grid, 24)


def test_llava_next_low_detail_tiles_the_image_scaled_into_its_smallest_pinpoint():
  image = _image(1000, 800)
  low = LLAVA_NEXT.at_detail("low")
  assert LLAVA_NEXT.at_detail("high") is LLAVA_NEXT and LLAVA_NEXT.at_detail("auto") is LLAVA_NEXT
  (high_tiles, high_size), = LLAVA_NEXT([image])
  (low_tiles, low_size), = low([image])
  # High: a 2x2 grid of 672x672 and the base tile; low: the image at 420x336, in the 672x336 pinpoint's 2x1 grid.
  assert (high_tiles.shape[0], high_size, low_tiles.shape[0], low_size) == (5, (1000, 800), 3, (420, 336))
  assert _llava_next_tokens(low, image) < _llava_next_tokens(LLAVA_NEXT, image)
  # As the processor takes the smaller image itself (what transformers' processor gives for it).
  smaller = np.asarray(Image.fromarray(image).resize((336, 420), resample=Image.Resampling.BICUBIC))
  (expected_tiles, expected_size), = LLAVA_NEXT([smaller])
  np.testing.assert_array_equal(low_tiles, expected_tiles)
  assert low_size == expected_size
  # An image that already fits a smallest pinpoint is not scaled (up or down).
  fits = _image(300, 500, seed=1)
  np.testing.assert_array_equal(low([fits])[0][0], LLAVA_NEXT([fits])[0][0])
  # A checkpoint's saved config stays transformers' own.
  assert "low_detail" not in LLAVA_NEXT.to_dict()


@pytest.mark.parametrize("processor", [CLIP, QWEN, LLAVA_NEXT], ids=["clip", "qwen", "llava_next"])
def test_every_processor_names_an_unknown_detail(processor):
  with pytest.raises(ValueError, match=r"image detail 'medium': use one of auto, low, high"):
    processor.at_detail("medium")


def test_a_fixed_size_processor_is_the_same_at_any_detail():
  assert all(CLIP.at_detail(detail) is CLIP for detail in ("low", "high", "auto"))
