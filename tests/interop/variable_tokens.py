"""What the tests of models whose images give a token count each (LLaVA-NeXT's tiles, Qwen2.5-VL's patches) share:
images of given sizes, chat prompts with each image's placeholders expanded to its own count, padded batches, and
two checks every such model passes."""

import subprocess
import sys

import jax
import numpy as np
import torch
import transformers
from PIL import Image

import vlmjax


def images_of(sizes, seed: int = 0) -> list[np.ndarray]:
  """Random uint8 RGB images of the given (height, width) sizes."""
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for size in sizes]


def chat_rows(vlm, images_per_row: list[list[np.ndarray]], prompts: list[str]):
  """(each row's prompt ids: one user turn, its images first, placeholders expanded per image; the batch's image
  input, `Tiles` or `Patches`; each row's chat-template text, for transformers' processor)."""
  conversations = [[{"role": "user", "content": [{"type": "image"}] * len(row_images) + [
      {"type": "text", "text": prompt}]}] for row_images, prompt in zip(images_per_row, prompts)]
  pixel_values, counts = vlm._images(images_per_row)
  rows = [vlm.prompt_ids(messages, len(row_images), row_counts)
          for messages, row_images, row_counts in zip(conversations, images_per_row, counts)]
  texts = [vlm.tokenizer.apply_chat_template(messages, add_generation_prompt=True) for messages in conversations]
  return rows, pixel_values, texts


def padded(vlm, rows: list[list[int]], left: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """(input_ids int32[B, T], mask bool[B, T]): the rows padded with the pad token to the longest, on the right (as
  `logits` reads them) or on the left (as `generate_ids` may take them)."""
  width = max(map(len, rows))
  ids = np.full((len(rows), width), vlm.pad_token_id, np.int32)
  mask = np.zeros((len(rows), width), bool)
  for i, row in enumerate(rows):
    place = slice(width - len(row), width) if left else slice(0, len(row))
    ids[i, place], mask[i, place] = row, True
  return ids, mask


def assert_greedy_matches_transformers(vlm, model, directory: str, their_inputs, images: list[np.ndarray],
                                       prompts: list[str], new_tokens: int = 8) -> None:
  """Greedy decoding, one image per row, equals transformers' `model.generate` row by row: `generate_ids`' tokens
  (a left-padded batch of the rows), `generate`'s texts, and `stream`'s pieces for the second row.
  their_inputs(directory, texts, images): transformers' processor inputs for chat-template texts."""
  with jax.default_matmul_precision("highest"):
    ours = vlm.generate(images, prompts, max_new_tokens=new_tokens)
    rows, pixel_values, texts = chat_rows(vlm, [[image] for image in images], prompts)
    ids, mask = padded(vlm, rows, left=True)
    ours_ids = vlm.generate_ids(ids, pixel_values, max_new_tokens=new_tokens, attention_mask=mask)
    streamed = "".join(vlm.stream([images[1]], prompts[1], max_new_tokens=new_tokens))
  their_tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
  compared = []
  for i, image in enumerate(images):
    inputs = their_inputs(directory, [texts[i]], [image])
    with torch.no_grad():
      out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    out = out.tolist()
    end = next((j + 1 for j, token in enumerate(out) if token in vlm.eos_token_ids), len(out))
    compared.append(end)
    assert ours_ids[i, :end].tolist() == out[:end], f"row {i}"
    assert ours[i] == their_tokenizer.decode(out[:end], skip_special_tokens=True), f"row {i}"
  assert max(compared) >= 4, f"too few tokens compared: {compared}"
  assert streamed == ours[1]


def assert_generate_command_matches(directory: str, tmp_path, prompt: str) -> None:
  """`vlmjax generate --checkpoint DIRECTORY` prints what `vlmjax.load(DIRECTORY).generate` answers."""
  image_path = str(tmp_path / "image.png")
  Image.fromarray(images_of([(40, 70)])[0]).save(image_path)
  done = subprocess.run([sys.executable, "-m", "vlmjax.cli", "generate", "--checkpoint", directory, "--image",
                         image_path, "--prompt", prompt, "--max_new_tokens", "6"],
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  expected = vlmjax.load(directory).generate([Image.open(image_path)], [prompt], max_new_tokens=6)[0]
  assert done.stdout.strip() == expected.strip()


def assert_new_sizes_reuse_prefill(vlm, sizes: list[tuple[int, int]], other_sizes: list[tuple[int, int]]) -> None:
  """Images of `other_sizes`, whose image input falls in the buckets of `sizes`', are prefilled by the program
  compiled for `sizes`."""
  from vlmjax.infer import generate as generation

  prompts = ["hi", "What is in the picture?"]
  vlm.generate(images_of(sizes), prompts, max_new_tokens=2)
  compiled = generation.prefill._cache_size()
  inputs = [vlm._images([[image] for image in images_of(each)])[0] for each in (sizes, other_sizes)]
  assert jax.tree.map(np.shape, inputs[0]) == jax.tree.map(np.shape, inputs[1])  # the same buckets
  vlm.generate(images_of(other_sizes), prompts, max_new_tokens=2)
  assert generation.prefill._cache_size() == compiled
