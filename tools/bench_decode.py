"""Decode speed of vlmjax against transformers (PyTorch) on the same weights, and against the roofline.

    python tools/bench_decode.py [--batches 1,8,32 --prompts 64,256,1024 --new_tokens 64 --repeats 3]

Builds a LLaVA-1.5 of about 25 M parameters with transformers (random weights, saved to a temporary
directory), loads it into vlmjax through the Hugging Face importer, and times greedy generation of exactly
--new_tokens tokens (no end token) for each batch size and prompt length, medians over --repeats rounds that
time vlmjax and transformers in turn: time to first token (TTFT: image encoding + prefill + first sample), time per
output token (TPOT) and output tokens/s. Both sides run in float32 (vlmjax's importer keeps the checkpoint's
float32 weights and computes and caches keys and values in that dtype; transformers loads it with
dtype=torch.float32), so the speed-up column is like for like; the table's header names each side's dtype as the
model was loaded. The roofline column divides the decode step's lower bound (bytes it must read — weights plus the
KV cache — over the measured memory bandwidth, or its FLOPs over the measured matmul rate of its compute dtype,
whichever is larger) by the measured TPOT. Prints the host first (CPU model, cores, JAX devices; PyTorch's
threads): the figures, the speed-ups included, are this host's. Writes a table to stdout and a plot to --plot.

    python tools/bench_decode.py --batches 1,8 --prompts 64 --quantize none,int8,int4:32,w8a8 --quantize_vision --accuracy

times each vlmjax variant (`vlmjax.load`'s quantize; --dtype, --kv_cache_dtype) in the same interleaved rounds as
transformers (--torch_dtype, float32 by default), prints each variant's parameter bytes against float32's, and with
--accuracy its logits' relative error and the share of its greedy tokens equal to float32's. A quantized variant
against transformers float32 is not like for like, and the header says so.

    python tools/bench_decode.py --batches 1,8 --prompts 64 --dtype bfloat16 --torch_dtype bfloat16 --quantize none,int8

on a machine with a CUDA GPU runs both sides on it (JAX's GPU backend, transformers on `cuda` unless
--torch_device says otherwise), each timed run waiting for the device to finish.
"""

import argparse
import statistics
import tempfile
import time

import jax
import numpy as np
import roofline  # tools/roofline.py: this script's own folder is on sys.path

import vlmjax
from vlmjax import runtime
from vlmjax.infer import generate as generation
from vlmjax.infer import quantize as quantize_lib


def build_checkpoint(directory: str, image_size: int = 112) -> None:
  """The benchmark's LLaVA, written by transformers: CLIP 4 x 192 at 112 px / patch 14 (64 image tokens; 336 px:
  576, LLaVA-1.5's), Llama 6 x 512 with 8 query and 4 key/value heads, MLP 1376, vocabulary 4000."""
  import torch
  import transformers

  vision = transformers.CLIPVisionConfig(hidden_size=192, intermediate_size=768, num_hidden_layers=4,
                                         num_attention_heads=4, image_size=image_size, patch_size=14)
  text = transformers.LlamaConfig(vocab_size=4000, hidden_size=512, intermediate_size=1376, num_hidden_layers=6,
                                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
  config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=3999,
                                    vision_feature_layer=-2, vision_feature_select_strategy="default")
  torch.manual_seed(0)
  transformers.LlavaForConditionalGeneration(config).eval().save_pretrained(directory)
  transformers.CLIPImageProcessor(size={"shortest_edge": image_size},
                                  crop_size={"height": image_size, "width": image_size}).save_pretrained(directory)
  word_tokenizer(directory, 4000, {"<image>": 3999})


def word_tokenizer(directory: str, vocab_size: int, specials: dict[str, int]) -> None:
  """Saves a word-level tokenizer over `vocab_size` ids: <pad> 0, <s> 1, </s> 2, `specials` {token: id} and a word
  for every other id (the benchmarks feed ids; loading needs a tokenizer all the same)."""
  import tokenizers
  import transformers

  taken = {"<pad>": 0, "<s>": 1, "</s>": 2, **specials}
  vocab = {**{f"w{i}": i for i in sorted(set(range(vocab_size)) - set(taken.values()))}, **taken}
  backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
  backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                       eos_token="</s>").save_pretrained(directory)


def interleaved_medians(runs, repeats: int) -> list[float]:
  """Median seconds of each callable over `repeats` rounds; each round times every callable in turn, so a change
  in the machine's load (another process on the same cores) falls on vlmjax and transformers alike."""
  times = [[] for _ in runs]
  for _ in range(repeats):
    for run, seconds in zip(runs, times):
      start = time.perf_counter()
      run()
      seconds.append(time.perf_counter() - start)
  return [statistics.median(seconds) for seconds in times]


def _inputs(vlm, batch: int, prompt: int, seed: int = 0):
  """`prompt` text tokens plus the image's placeholders (after the first token)."""
  config = vlm.model_config
  rng = np.random.default_rng(seed)
  ids = rng.integers(4, config.image_token_id, (batch, prompt + config.tokens_per_image)).astype(np.int64)
  ids[:, 1:1 + config.tokens_per_image] = config.image_token_id
  size = config.vision.image_size
  return ids, rng.standard_normal((batch, size, size, 3)).astype(np.float32)


def vlmjax_runs(vlm, ids, pixels, new_tokens: int):
  """(generate one token, generate new_tokens), compiled; no end token stops a row."""
  args = (vlm.params, vlm.model_config, ids, None, jax.numpy.asarray(pixels))
  first = lambda: generation.generate(*args, max_new_tokens=1, eos_ids=(), pad_id=0)
  whole = lambda: generation.generate(*args, max_new_tokens=new_tokens, eos_ids=(), pad_id=0)
  first(), whole()  # compile
  return first, whole


def torch_device(name: str | None) -> str:
  """PyTorch's device for transformers: `name`, or a CUDA GPU where there is one (then vlmjax runs on JAX's GPU
  backend too, and the table compares the two on one GPU), else the CPU."""
  import torch

  return name or ("cuda" if torch.cuda.is_available() else "cpu")


def torch_description(device: str) -> str:
  """One line naming what transformers runs on: its threads and vector kernels on a CPU, the GPU's name on one."""
  import torch

  if device == "cpu":
    return (f"PyTorch {torch.__version__} on the CPU, {torch.get_num_threads()} threads, "
            f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
  return f"PyTorch {torch.__version__} on {torch.cuda.get_device_name(torch.device(device))}"


def timed_generation(model, inputs: dict):
  """A function of a token count that runs transformers' greedy `generate` of exactly that many tokens on
  `inputs` (numpy arrays, moved to the model's device once) and waits for the device, so that a wall-clock timer
  around it times the work, not its launch."""
  import torch

  inputs = {name: torch.from_numpy(value).to(model.device) for name, value in inputs.items()}

  def run(count: int) -> None:
    with torch.inference_mode():
      model.generate(**inputs, max_new_tokens=count, min_new_tokens=count, do_sample=False)
    if model.device.type == "cuda":
      torch.cuda.synchronize(model.device)
  return run


def transformers_runs(model, ids, pixels, new_tokens: int):
  """(generate one token, generate new_tokens) with transformers, warmed up."""
  run = timed_generation(model, dict(input_ids=ids, attention_mask=np.ones_like(ids),
                                     pixel_values=pixels.transpose(0, 3, 1, 2).astype(np.float32)))
  run(1)
  return lambda: run(1), lambda: run(new_tokens)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", default="1,8,32")
  parser.add_argument("--prompts", default="64,256,1024")
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--plot", default="bench_decode.png")
  parser.add_argument("--no_torch", action="store_true", help="time vlmjax only")
  parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                      help="vlmjax's compute and weight dtype (default: vlmjax.load's for the backend)")
  parser.add_argument("--quantize", default="none", help="comma-separated vlmjax variants timed in the same rounds: "
                      "none, int8, int4[:GROUP], w8a8 (vlmjax.load's quantize); the bench LLaVA's MLP (1376 inputs) "
                      "takes int4 groups of 32")
  parser.add_argument("--kv_cache_dtype", default=None, help="vlmjax's KV cache: int8, or the compute dtype")
  parser.add_argument("--quantize_vision", action="store_true", help="quantize the vision tower too")
  parser.add_argument("--torch_dtype", default="float32", choices=["float32", "bfloat16"],
                      help="transformers' dtype")
  parser.add_argument("--torch_device", default=None, help="transformers' device (default: cuda if PyTorch sees a "
                      "GPU, else cpu)")
  parser.add_argument("--accuracy", action="store_true", help="also each variant's logits against float32's "
                      "(relative error) and its greedy tokens against float32's (share equal), batch 8")
  args = parser.parse_args()

  import torch
  import transformers

  host = roofline.host_description()
  print(host)
  device = torch_device(args.torch_device)
  if not args.no_torch:
    print(f"transformers {transformers.__version__}: {torch_description(device)}")
  directory = tempfile.mkdtemp(prefix="bench_decode_")
  build_checkpoint(directory)
  variants = args.quantize.split(",")
  vlms = {variant: vlmjax.load(directory, dtype=args.dtype, quantize=None if variant == "none" else variant,
                               kv_cache_dtype=args.kv_cache_dtype,
                               quantize_vision=args.quantize_vision and variant != "none") for variant in variants}
  model = None if args.no_torch else transformers.LlavaForConditionalGeneration.from_pretrained(
      directory, dtype=getattr(torch, args.torch_dtype)).to(device).eval()
  vlm = vlms[variants[0]]
  decoder = vlm.model_config.decoder
  decoder_params = sum(x.size for x in jax.tree.leaves(vlm.params["decoder"]))
  float_bytes = sum(x.size * 4 for x in jax.tree.leaves(vlmjax.load(directory, dtype="float32").params))
  mine = roofline.compute_dtype(vlm.model_config)
  theirs = "-" if model is None else str(model.dtype).removeprefix("torch.")
  ceilings = roofline.measure(repeats=5, dtype=decoder.dtype)

  print(f"machine: {ceilings['bandwidth_gb_s']:.1f} GB/s, {ceilings['matmul_gflop_s']:.1f} GFLOP/s {decoder.dtype}; "
        f"model {float_bytes / 4e6:.1f} M parameters; {args.new_tokens} new tokens, greedy")
  param_bytes = {}
  for variant, one in vlms.items():
    param_bytes[variant] = quantize_lib.param_bytes(one.params)
    weights = sorted({str(x.dtype) for x in jax.tree.leaves(one.params)})
    print(f"vlmjax {variant}: compute {mine}, weights {'/'.join(weights)} ({param_bytes[variant] / 2**20:.1f} MiB, "
          f"{param_bytes[variant] / float_bytes:.3f}x float32's), KV cache {one.model_config.decoder.cache_dtype}")
  print(f"transformers: {theirs} (eager); speed-up = vlmjax tok/s / transformers tok/s, " +
        ("not measured" if model is None else "like for like" if mine == theirs and variants == ["none"] else
         "NOT like for like (different dtypes or quantized weights)"))
  group = lambda name: f"{name:-^27}"
  print(f"{'':>24}{group(f' vlmjax {mine} ')}{group(f' transformers {theirs} ')}")
  header = (f"{'vlmjax':>10}{'batch':>6}{'prompt':>8}{'TTFT s':>9}{'TPOT ms':>9}{'tok/s':>9}{'TTFT s':>9}"
            f"{'TPOT ms':>9}{'tok/s':>9}{'speed-up':>10}{'roofline':>10}")
  print(header)
  rows = []
  for batch in map(int, args.batches.split(",")):
    for prompt in map(int, args.prompts.split(",")):
      ids, pixels = _inputs(vlm, batch, prompt)
      runs = [run for one in vlms.values() for run in vlmjax_runs(one, ids, pixels, args.new_tokens)]
      if model is not None:
        runs += transformers_runs(model, ids, pixels, args.new_tokens)
      medians = interleaved_medians(runs, args.repeats)
      hf = (float("nan"),) * 3
      if model is not None:
        hf_ttft, hf_total = medians[-2:]
        hf = (hf_ttft, (hf_total - hf_ttft) / (args.new_tokens - 1), batch * args.new_tokens / hf_total)
      for index, (variant, one) in enumerate(vlms.items()):
        ttft, total = medians[2 * index:2 * index + 2]
        tpot = (total - ttft) / (args.new_tokens - 1)
        tokens_per_s = batch * args.new_tokens / total
        cache = one.model_config.decoder.init_cache(batch, ids.shape[1] + args.new_tokens)
        cache_bytes = sum(x.nbytes for x in jax.tree.leaves((cache.k, cache.v)))
        bound = max((param_bytes[variant] + cache_bytes) / (ceilings["bandwidth_gb_s"] * 1e9),
                    2 * decoder_params * batch / (ceilings["matmul_gflop_s"] * 1e9))
        rows.append((batch, prompt, ttft, tpot, tokens_per_s, *hf, tokens_per_s / hf[2], bound / tpot, variant))
        print(f"{variant:>10}{batch:>6}{prompt:>8}{ttft:>9.3f}{tpot * 1e3:>9.2f}{tokens_per_s:>9.0f}{hf[0]:>9.3f}"
              f"{hf[1] * 1e3:>9.2f}{hf[2]:>9.0f}{rows[-1][8]:>9.2f}x{rows[-1][9]:>10.0%}")
  if args.accuracy:
    accuracy(directory, vlms, args.new_tokens, None if args.no_torch else device)
  _plot(rows, args.plot, f"vlmjax {mine} against transformers {theirs}", host)


def accuracy(directory: str, vlms: dict, new_tokens: int, torch_device: str | None) -> None:
  """Each variant against vlmjax float32 on the same inputs (8 rows, 64-token prompts with an image): the logits'
  relative error (Frobenius norm of the difference over float32's), the share of prompt positions whose most likely
  next token is float32's, and the share of greedy tokens equal to float32's (position by position over new_tokens
  tokens per row: once a row's tokens part, the rest of it mostly differs, so random weights' flat logits make this
  share low). Two rows of reference follow: vlmjax in float32 on the weights rounded to bfloat16 (the weights'
  rounding alone, which every bfloat16 model starts from), and with `torch_device` transformers in bfloat16 against
  transformers in float32 (another implementation's bfloat16 on these weights)."""
  reference = vlmjax.load(directory, dtype="float32")
  ids, pixels = _inputs(reference, 8, 64, seed=1)
  outputs = lambda vlm: (np.asarray(vlm.logits(ids, pixels)), vlm.generate_ids(ids, pixels, max_new_tokens=new_tokens))
  logits, tokens = outputs(reference)
  print(f"{'vlmjax':>14}{'logits rel. error':>20}{'argmax = float32':>19}{'greedy tokens = float32':>26}")
  for variant, one in vlms.items():
    _agreement_row(variant, *outputs(one), logits, tokens)
  reference.params = jax.tree.map(lambda x: x.astype(jax.numpy.bfloat16).astype(x.dtype), reference.params)
  _agreement_row("bf16 weights", *outputs(reference), logits, tokens,
                 "vlmjax float32 on the weights rounded to bfloat16")
  if torch_device is not None:
    their_logits, their_tokens = _transformers_outputs(directory, ids, pixels, new_tokens, torch_device, "float32")
    _agreement_row("HF bfloat16", *_transformers_outputs(directory, ids, pixels, new_tokens, torch_device, "bfloat16"),
                   their_logits, their_tokens, "transformers bfloat16 against transformers float32")


def _agreement_row(name: str, logits, tokens, reference_logits, reference_tokens, note: str = "") -> None:
  """Prints one row of `accuracy`: the logits' relative error against the reference's, the share of prompt positions
  (teacher-forced) whose argmax is the reference's, and the share of greedy tokens equal to the reference's."""
  error = np.linalg.norm(logits - reference_logits) / np.linalg.norm(reference_logits)
  argmax = float(np.mean(logits.argmax(-1) == reference_logits.argmax(-1)))
  same = float(np.mean(tokens == reference_tokens))
  print(f"{name:>14}{error:>20.4f}{argmax:>19.3f}{same:>26.3f}" + (f"   ({note})" if note else ""))


def _transformers_outputs(directory: str, ids, pixels, new_tokens: int, device: str, dtype: str):
  """transformers' (logits float32[B, T, V] of the prompts, greedy tokens int[B, new_tokens]) in `dtype`."""
  import torch
  import transformers

  model = transformers.LlavaForConditionalGeneration.from_pretrained(
      directory, dtype=getattr(torch, dtype)).to(device).eval()
  inputs = {"input_ids": torch.from_numpy(ids).to(device), "attention_mask": torch.ones(ids.shape, device=device),
            "pixel_values": torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()).to(device, getattr(torch, dtype))}
  with torch.inference_mode():
    logits = model(**inputs).logits.float().cpu().numpy()
    generated = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
  return logits, generated[:, ids.shape[1]:].cpu().numpy()


def _plot(rows, path: str, dtypes: str, host: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  figure, axes = plt.subplots(figsize=(7, 4))
  for batch in sorted({row[0] for row in rows}):
    for variant in dict.fromkeys(row[10] for row in rows):
      mine = [row for row in rows if row[0] == batch and row[10] == variant]
      axes.plot([r[1] for r in mine], [r[4] for r in mine], "o-", label=f"vlmjax {variant}, batch {batch}")
    axes.plot([r[1] for r in mine], [r[7] for r in mine], "x--", label=f"transformers, batch {batch}")
  axes.set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="output tokens/s",
           title=f"greedy decoding, {dtypes}")
  figure.text(0.01, 0.01, host.removeprefix("host: "), fontsize=6)
  axes.grid(alpha=0.3)
  axes.legend(fontsize=7)
  figure.tight_layout(rect=(0, 0.03, 1, 1))
  figure.savefig(path, dpi=100)
  print(f"wrote {path}")


if __name__ == "__main__":
  runtime.exec_with_huge_pages()  # as `vlmjax` runs: XLA's CPU buffers in huge pages
  main()
