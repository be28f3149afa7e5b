"""What `Engine.submit` checks before it queues a request: that it fits a slot's context and the pool, that its
sampling settings are ones the engine takes, and that its images are those its prompt's placeholders ask for. Each
failure is a ValueError (PromptTooLong for length) that says what was wrong, raised before anything is queued."""

from collections.abc import Sequence

import numpy as np

from vlmjax.infer.sampling import MAX_TOP_LOGPROBS
from vlmjax.models import anyres, paged_cache, qwen_vl


class PromptTooLong(ValueError):
  """The prompt plus the tokens asked for do not fit a slot's context."""


def tokens_to_generate(prompt_length: int, max_tokens: int | None, max_len: int, page_size: int,
                       num_pages: int) -> int:
  """The tokens a prompt of `prompt_length` tokens may generate: `max_tokens`, or the rest of the context of
  `max_len` tokens when None. PromptTooLong when they do not fit that context or a pool of `num_pages` pages of
  `page_size` tokens; ValueError for no prompt or tokens."""
  if prompt_length < 1:
    raise ValueError("the prompt is empty")
  room = max_len - prompt_length
  if room < 1:
    raise PromptTooLong(f"a prompt of {prompt_length} tokens leaves no room to generate in the context "
                        f"of {max_len} tokens")
  max_tokens = room if max_tokens is None else max_tokens
  if max_tokens < 1:
    raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
  if max_tokens > room:
    raise PromptTooLong(f"a prompt of {prompt_length} tokens plus max_tokens={max_tokens} does not fit "
                        f"the context of {max_len} tokens")
  needed = paged_cache.pages_for(prompt_length + max_tokens, page_size)  # at most, near its end
  if needed > num_pages:
    raise PromptTooLong(f"a prompt of {prompt_length} tokens plus max_tokens={max_tokens} needs "
                        f"{needed} pages of {page_size} tokens; "
                        f"the pool has {num_pages}: ask for fewer tokens or give the engine more pages")
  return max_tokens


def check_sampling(vocab_size: int, top_k: int, logprobs: int | None, stop: Sequence[str]) -> None:
  """ValueError for a top_k past the vocabulary, top logprobs out of range, or an empty stop string."""
  if top_k > vocab_size:
    raise ValueError(f"top_k={top_k} is larger than the vocabulary of {vocab_size} tokens (0 keeps every token)")
  if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
    raise ValueError(f"top logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {logprobs}")
  if any(not text for text in stop):
    raise ValueError("stop strings must not be empty")


def checked_images(vlm, prompt_ids: Sequence[int], pixel_values) -> np.ndarray | list | None:
  """The request's images as the engine keeps them (a list of (pixels, size) for a model whose images give a
  token count each, else the float32[I, H, W, 3] array; None without images), after checking that each is what
  its image processor makes and that the prompt holds exactly their placeholders (`Engine.submit`'s
  pixel_values)."""
  config = vlm.model_config
  num_images = 0 if pixel_values is None else len(pixel_values)
  if config.variable_image_tokens:
    pixel_values = list(pixel_values) if num_images else None
    needed = sum(_image_tokens(vlm, pixels, size) for pixels, size in pixel_values or ())
  else:
    size = config.vision.image_size
    if num_images and pixel_values.shape[1:] != (size, size, 3):
      raise ValueError(f"pixel_values must be float32[I, {size}, {size}, 3], got {list(pixel_values.shape)}")
    needed = num_images * config.tokens_per_image
  placeholders = list(prompt_ids).count(config.image_token_id)
  if placeholders != needed:
    raise ValueError(f"the prompt holds {placeholders} image placeholder tokens but {num_images} images need "
                     f"{needed}")
  return pixel_values


def _image_tokens(vlm, pixels: np.ndarray, size: tuple[int, ...]) -> int:
  """The placeholders of one image as `Engine.submit` takes it (LLaVA-NeXT's tiles and (height, width),
  Qwen2.5-VL's patches and grid (t, h, w)); ValueError when the pixels are not those of its size."""
  config = vlm.model_config
  check = qwen_vl.image_layout if config.qwen_tower else anyres.checked_image_grid
  check(config, pixels, tuple(size))
  return vlm.image_token_count(size)
