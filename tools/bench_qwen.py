"""Qwen2.5-VL's speed in vlmjax against transformers (PyTorch) on the same weights: decode and time to first
token for a large image.

    python tools/bench_qwen.py [--image 1280 --prompt 16 --decode_image 224 --new_tokens 64 --repeats 5]

Builds a Qwen2.5-VL of the bench LLaVA's size (`bench_decode.build_checkpoint`) with transformers: a vision tower
4 x 192 (patch 14, 112-pixel windows, the last of its blocks attending over the whole image as every eighth of
Qwen2.5-VL-7B's does), a Qwen2 decoder 6 x 512 with 8 query and 4 key/value heads, MLP 1376, M-RoPE sections
(8, 12, 12) of its 32 frequencies, vocabulary 4000; random weights, saved to a temporary directory with
Qwen2.5-VL's image processor (min/max pixels as Qwen2.5-VL-7B's). It is loaded into vlmjax through the Hugging
Face importer (`vlmjax.load`) and both sides run in float32 (--dtype bfloat16: both in bfloat16). On a machine
with a CUDA GPU both run on it (transformers on `cuda` unless --torch_device says otherwise).

Two rows, each timed in rounds that run vlmjax and transformers in turn (`bench_decode.interleaved_medians`):
- decode: one --decode_image image and --prompt text tokens at batch 1, greedy generation of exactly --new_tokens
  tokens (no end token): time per output token (TPOT) and output tokens/s;
- TTFT: one --image x --image image (each side's processor resizes it alike, to multiples of 28 pixels) and
  --prompt text tokens: from the processor's patches to the first token (vlmjax's host layout of the patches, the
  vision tower, the prefill and the first sample; transformers' `generate` of one token). Each processor's own time
  is shown apart.
Prints the host first (CPU model, cores, load; PyTorch's threads): the figures and the speed-ups are this host's.
`--fullatt_block_indexes 1,3` gives two of the four vision blocks full attention; `--attn_implementation eager`
runs transformers' eager attention instead of its default, sdpa.
"""

import argparse
import os
import tempfile

import jax
import numpy as np
import roofline  # tools/roofline.py: this script's own folder is on sys.path
from bench_decode import interleaved_medians, timed_generation, torch_description, torch_device, word_tokenizer

import vlmjax
from vlmjax import runtime
from vlmjax.infer import generate as generation
from vlmjax.models import qwen_vl

VOCAB, IMAGE_PAD, VISION_START, VISION_END, VIDEO_PAD = 4000, 3999, 3997, 3998, 3996
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 16384  # Qwen2.5-VL-7B's preprocessor_config.json


def build_checkpoint(directory: str, fullatt_block_indexes=(3,)) -> None:
  """The benchmark's Qwen2.5-VL (the module docstring), written by transformers."""
  import torch
  import transformers

  vision = dict(depth=4, hidden_size=192, intermediate_size=768, num_heads=4, patch_size=14, spatial_merge_size=2,
                temporal_patch_size=2, window_size=112, out_hidden_size=512,
                fullatt_block_indexes=list(fullatt_block_indexes))
  text = dict(vocab_size=VOCAB, hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
              num_key_value_heads=4, max_position_embeddings=32768,
              rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[8, 12, 12]),
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
  config = transformers.Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_PAD,
                                         video_token_id=VIDEO_PAD, vision_start_token_id=VISION_START,
                                         vision_end_token_id=VISION_END)
  torch.manual_seed(0)
  transformers.Qwen2_5_VLForConditionalGeneration(config).eval().save_pretrained(directory)
  transformers.Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2,
                                        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
                                        ).save_pretrained(directory)
  specials = {"<|video_pad|>": VIDEO_PAD, "<|vision_start|>": VISION_START, "<|vision_end|>": VISION_END,
              "<|image_pad|>": IMAGE_PAD}
  word_tokenizer(directory, VOCAB, specials)


def _inputs(vlm, image_side: int, prompt: int, seed: int = 0):
  """(ids int64[1, T]: a token, the image's placeholders between vision start and end, `prompt` text tokens;
  the image uint8[side, side, 3])."""
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 256, (image_side, image_side, 3), dtype=np.uint8)
  (_, grid), = vlm.image_processor([image])
  count = qwen_vl.image_token_count(vlm.model_config, grid)
  text = rng.integers(4, VIDEO_PAD, prompt + 1)
  ids = np.concatenate([text[:1], [VISION_START], np.full(count, IMAGE_PAD), [VISION_END], text[1:]])
  return ids[None].astype(np.int64), image


def vlmjax_runs(vlm, ids, processed, new_tokens: tuple[int, ...]):
  """A compiled run per count in new_tokens, each generating that many tokens from the processor's (patches, grid);
  no end token stops the row. Each call lays the patches out (`qwen_vl.batch_patches`) as `VLM.generate` does."""
  def run(count):
    patches = jax.device_put(qwen_vl.batch_patches(vlm.model_config, [processed]))  # as `VLM.generate` hands them
    return generation.generate(vlm.params, vlm.model_config, ids, None, patches, max_new_tokens=count, eos_ids=(),
                               pad_id=0)
  for count in new_tokens:
    run(count)  # compile
  return [lambda count=count: run(count) for count in new_tokens]


def transformers_runs(model, ids, processed, new_tokens: tuple[int, ...]):
  """A run per count in new_tokens with transformers from the same patches, warmed up."""
  run = timed_generation(model, dict(input_ids=ids, attention_mask=np.ones_like(ids),
                                     pixel_values=np.concatenate([patches for patches, _ in processed]),
                                     image_grid_thw=np.asarray([grid for _, grid in processed]),
                                     mm_token_type_ids=(ids == IMAGE_PAD).astype(np.int64)))
  run(1)
  return [lambda count=count: run(count) for count in new_tokens]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--image", type=int, default=1280, help="the TTFT row's image side in pixels")
  parser.add_argument("--decode_image", type=int, default=224, help="the decode row's image side (224: 64 tokens)")
  parser.add_argument("--prompt", type=int, default=16, help="text tokens after the image")
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--fullatt_block_indexes", default="3", help="the vision blocks attending over the whole image")
  parser.add_argument("--attn_implementation", default="sdpa", choices=["sdpa", "eager"],
                      help="transformers' attention (sdpa: its default)")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="both sides' dtype")
  parser.add_argument("--torch_device", default=None, help="transformers' device (default: cuda if PyTorch sees a "
                      "GPU, else cpu)")
  args = parser.parse_args()

  import torch
  import transformers

  print(roofline.host_description())
  device = torch_device(args.torch_device)
  print(f"transformers {transformers.__version__}: {torch_description(device)}")
  directory = tempfile.mkdtemp(prefix="bench_qwen_")
  build_checkpoint(directory, tuple(int(i) for i in args.fullatt_block_indexes.split(",")))
  vlm = vlmjax.load(directory, dtype=args.dtype)
  model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
      directory, dtype=getattr(torch, args.dtype), attn_implementation=args.attn_implementation).to(device).eval()
  their_processor = transformers.AutoImageProcessor.from_pretrained(directory)
  mine, theirs = roofline.compute_dtype(vlm.model_config), str(model.dtype).removeprefix("torch.")
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree)) / 1e6
  print(f"model {count(vlm.params):.1f} M parameters (vision {count(vlm.params['vision']):.1f} M), "
        f"vision blocks {vlm.model_config.vision.depth} (full attention at "
        f"{list(vlm.model_config.vision.fullatt_block_indexes)}); vlmjax {mine}, transformers {theirs} "
        f"({model.config._attn_implementation}); greedy, batch 1; speed-up = vlmjax / transformers, like for like")

  group = lambda name: f"{name:-^27}"
  print(f"{'':>28}{group(f' vlmjax {mine} ')}{group(f' transformers {theirs} ')}{'vlmjax / transformers':>22}")
  print(f"{'row':>8}{'image':>11}{'tokens':>9}" + f"{'TTFT s':>9}{'TPOT ms':>9}{'tok/s':>9}" * 2 +
        f"{'1 / TTFT':>11}{'tok/s':>11}")
  for name, side, new_tokens in (("decode", args.decode_image, (1, args.new_tokens)), ("TTFT", args.image, (1,))):
    ids, image = _inputs(vlm, side, args.prompt)
    processed = vlm.image_processor([image])
    # Both sides read vlmjax's patches; this shows the processors resize alike (transformers' resampling has moved
    # by a level between releases).
    difference = np.abs(their_processor([image], return_tensors="np")["pixel_values"] - processed[0][0]).max()
    runs = vlmjax_runs(vlm, ids, processed, new_tokens) + transformers_runs(model, ids, processed, new_tokens)
    runs += [lambda: vlm.image_processor([image]), lambda: their_processor([image], return_tensors="np")]
    medians = interleaved_medians(runs, args.repeats)
    sides = [medians[:len(new_tokens)], medians[len(new_tokens):2 * len(new_tokens)]]
    cells, rates = "", []
    for ttft, *total in sides:
      if total:
        rates.append(new_tokens[1] / total[0])
        cells += f"{ttft:>9.3f}{(total[0] - ttft) / (new_tokens[1] - 1) * 1e3:>9.2f}{rates[-1]:>9.1f}"
      else:
        cells += f"{ttft:>9.3f}{'-':>9}{'-':>9}"
    speedups = f"{sides[1][0] / sides[0][0]:>10.2f}x" + (f"{rates[0] / rates[1]:>10.2f}x" if rates else f"{'-':>11}")
    height, width = processed[0][1][1:]
    print(f"{name:>8}{f'{height * 14}x{width * 14}':>11}{ids.shape[1]:>9}{cells}{speedups}")
    print(f"{'':>8}processor (resize, normalize, patches): vlmjax {medians[-2]:.3f} s, transformers "
          f"{medians[-1]:.3f} s; patches differ by at most {difference:.1e}")
  print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())} (1, 5, 15 minutes)")

if __name__ == "__main__":
  runtime.exec_with_huge_pages()  # as `vlmjax` runs: XLA's CPU buffers in huge pages
  main()
