"""Visual-token reduction: time to first token and accuracy against the tokens kept per image.

    python tools/bench_tokens.py [--keeps 576,192,144,64 --text_tokens 32 --repeats 5]
    python tools/bench_tokens.py --workdir runs/shapes64 --data_dir runs/shapes64/data   # accuracy on shapes

Speed: a LLaVA-1.5 of about 25 M parameters written by transformers (tools/bench_decode.py's, at 336 px / patch 14:
576 tokens per image, LLaVA-1.5's count), one image and --text_tokens text tokens. For each method
(`vlmjax/models/visual_tokens.py`) and each KEEP, vlmjax's time to first token (image encoding, prefill and the
first sample, `generate_ids(max_new_tokens=1)`) and the prefill's FLOPs as XLA counts them; beside them
transformers' forward over the whole prompt with all 576 tokens. Medians of --repeats rounds, each timing every
setting in turn. Both sides in float32. Prints the host first.

Accuracy (--workdir): the shapes benchmarks (shapes_vqa accuracy and POPE F1, test split) of a trained model for
each method at every token, one third and one ninth of them, with the share of the full model's score kept.
"""

import argparse
import os
import tempfile

import jax
import numpy as np
import roofline  # tools/roofline.py: this script's own folder is on sys.path

import bench_decode
import vlmjax
from vlmjax import api
from vlmjax.models import visual_tokens

METHODS = visual_tokens.METHODS


def _poolable(keep: int, available: int) -> bool:
  """Whether pooling the image's square grid of `available` tokens can keep `keep` (a square whose side divides)."""
  side, grid = round(keep**0.5), round(available**0.5)
  return side * side == keep and grid % side == 0


def _prompt(vlm, text_tokens: int, seed: int = 0) -> np.ndarray:
  """int[1, T]: the first token, the image's placeholders, then text."""
  config = vlm.model_config
  ids = np.random.default_rng(seed).integers(4, config.image_token_id, (1, 1 + config.tokens_per_image + text_tokens))
  ids[:, 1:1 + config.tokens_per_image] = config.image_token_id
  return ids


def _prefill_flops(vlm, input_ids: np.ndarray, pixel_values: np.ndarray) -> float:
  compiled = api._forward.lower(vlm.params, vlm.model_config, input_ids, pixel_values, None).compile()
  analysis = compiled.cost_analysis()
  return (analysis[0] if isinstance(analysis, list) else analysis)["flops"]


def speed(args) -> None:
  import torch
  import transformers

  directory = tempfile.mkdtemp()
  bench_decode.build_checkpoint(directory, image_size=336)
  base = vlmjax.load(directory)
  pixel_values = np.random.default_rng(0).normal(size=(1, 336, 336, 3)).astype(np.float32)
  settings = [("all", base.model_config.tokens_per_image, base)]
  for keep in args.keeps:
    if keep < base.model_config.tokens_per_image:
      settings += [(method, keep, base.with_visual_tokens(f"{method}:{keep}")) for method in args.methods
                   if method != "pool" or _poolable(keep, base.model_config.tokens_per_image)]
  runs = []
  for _, _, vlm in settings:
    ids = _prompt(vlm, args.text_tokens)
    vlm.generate_ids(ids, pixel_values, max_new_tokens=1)  # compiles
    runs.append(lambda vlm=vlm, ids=ids: vlm.generate_ids(ids, pixel_values, max_new_tokens=1))
  model = transformers.LlavaForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()
  full_ids = torch.from_numpy(_prompt(base, args.text_tokens))
  torch_pixels = torch.from_numpy(pixel_values.transpose(0, 3, 1, 2).copy())

  def transformers_prefill():
    with torch.no_grad():
      model(input_ids=full_ids, pixel_values=torch_pixels)

  transformers_prefill()
  times = bench_decode.interleaved_medians(runs + [transformers_prefill], args.repeats)
  print(f"\nTime to first token, one image + {args.text_tokens} text tokens, float32 both, medians of {args.repeats}; "
        f"transformers (all {base.model_config.tokens_per_image} tokens, one forward): {times[-1] * 1e3:.1f} ms")
  print(f"{'method':>10} {'tokens':>7} {'TTFT ms':>8} {'vs all':>7} {'vs transformers':>16} {'prefill GFLOP':>14}")
  for (method, keep, vlm), seconds in zip(settings, times):
    ids = _prompt(vlm, args.text_tokens)
    flops = _prefill_flops(vlm, ids, pixel_values) / 1e9
    print(f"{method:>10} {keep:>7} {seconds * 1e3:>8.1f} {times[0] / seconds:>6.2f}x {times[-1] / seconds:>15.2f}x "
          f"{flops:>14.2f}")


def accuracy(args) -> None:
  from vlmjax.eval import harness

  base = vlmjax.load(args.workdir)
  available = base.model_config.tokens_per_image
  names = ["shapes_vqa", "shapes_pope"]
  scores = lambda results: (results["shapes_vqa"]["accuracy"], results["shapes_pope"]["f1"])
  out = tempfile.mkdtemp()
  full = scores(harness.evaluate(base, names, out, args.data_dir, split="test"))
  print(f"\nshapes benchmarks, test split, {args.workdir} ({available} tokens per image): "
        f"shapes_vqa {full[0]:.3f}, POPE F1 {full[1]:.3f}")
  print(f"{'method':>10} {'tokens':>7} {'vqa':>6} {'POPE F1':>8} {'kept %':>7}")
  for divisor in (3, 9):
    keep = max(1, round(available / divisor))
    for method in args.methods:
      keep_here = keep
      if method == "pool" and not _poolable(keep, available):  # the grid that pools evenly nearest below
        keep_here = max(side * side for side in range(1, keep + 1) if _poolable(side * side, available)
                        and side * side <= keep)
      vlm = base.with_visual_tokens(f"{method}:{keep_here}")
      got = scores(harness.evaluate(vlm, names, os.path.join(out, f"{method}{keep_here}"), args.data_dir,
                                    split="test"))
      retention = 100 * np.mean([got[0] / full[0], got[1] / full[1]])
      print(f"{method:>10} {keep_here:>7} {got[0]:>6.3f} {got[1]:>8.3f} {retention:>6.1f}%")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--keeps", default="192,144,64", type=lambda text: [int(k) for k in text.split(",")])
  parser.add_argument("--methods", default=",".join(METHODS), type=lambda text: text.split(","),
                      help=f"of {', '.join(METHODS)} (fastv prunes from the language model's layer "
                           f"{visual_tokens.FASTV_LAYER})")
  parser.add_argument("--text_tokens", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--workdir", help="a trained shapes model: measure accuracy against tokens kept")
  parser.add_argument("--data_dir", help="its shapes data set (default: the workdir's)")
  args = parser.parse_args()
  print(roofline.host_description())
  print(f"JAX devices: {jax.devices()}")
  if args.workdir:
    if args.data_dir is None:
      from vlmjax import workdir as workdir_lib
      args.data_dir = workdir_lib.data_dir(args.workdir)
    accuracy(args)
  else:
    speed(args)


if __name__ == "__main__":
  main()
