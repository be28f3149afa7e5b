"""Training throughput: the vlmjax train step against the same step in PyTorch/transformers, and the model FLOPs
utilization (MFU) of each against this machine's measured matmul peak in its compute dtype.

    python tools/bench_train.py [--config configs/shapes_tiny.py --batch_size 32 --rounds 20]
    # shapes_tiny merges image tokens and has a conv stem, which transformers' LLaVA cannot express; this shape's
    # full step (the vision tower trained too) runs faster on the CPU split in two (0.086-0.089 s against 0.098 s):
    python tools/bench_train.py --config.model.image_token_merge=1 --config.model.vision.stem=patch \
        --config.cpu_devices=2

vlmjax: `vlmjax.train.state.train_step` as the trainer runs it (AdamW whatever the config's `optim.optimizer`, as
transformers' side steps; clipping, the jitted step with donated state, the CPU split into the config's
`cpu_devices` with the batch over them) on a batch of the config's `data.length` tokens per row, one image each.
transformers: a `LlavaForConditionalGeneration` of the same shape (CLIP vision tower with the config's width,
depth, heads and patches; Llama decoder with its width, depth, heads, KV heads, MLP and vocabulary), forward +
backward + clipping + `torch.optim.AdamW` on the same token and image counts. Model FLOPs per step (`model_flops`:
6 x matmul parameters x tokens plus the attention scores, forward + backward) are the same number for both; MFU =
model FLOPs / step time / the measured matmul peak of the compute dtype (on a split CPU, of all its devices at
once: `roofline.peak_matmul`). The steps and the peak matmuls are timed in turn over --rounds rounds, 3 calls
each per round after one untimed call, after three warm-up calls each (`roofline.interleaved_median_seconds`:
this machine's speed drifts within minutes, so every ratio is of figures from the same minutes). Prints one
table of medians.
"""

from typing import Callable

import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

import roofline  # tools/roofline.py: this script's own folder is on sys.path
from vlmjax import runtime
from vlmjax.models.vlm import VLM, VLMConfig
from vlmjax.parallel import distributed, mesh as mesh_lib
from vlmjax.train import optim, state as state_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/shapes_tiny.py", "Experiment config file.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Rows per step (default: the config's train.batch_size).")
_ROUNDS = flags.DEFINE_integer("rounds", 20, "Rounds of calls; in each, every step and peak matmul in turn, "
                                "1 untimed call and 3 timed calls each.")
_CALLS_PER_ROUND = 3
# The train step's first few calls after the compile run slow (the second: 2.5x the median, session 18).
_WARMUP_STEPS = 3


def _batch(model_config: VLMConfig, batch_size: int, length: int) -> dict[str, np.ndarray]:
  """A training batch: random text with one image's placeholders after the first token, loss on the text."""
  inputs = model_config.example_inputs(batch_size, length - model_config.tokens_per_image, seed=0)
  input_ids = np.asarray(inputs["input_ids"])
  targets = np.roll(input_ids, -1, axis=1)
  loss_mask = (targets != model_config.image_token_id).astype(np.float32)
  return dict(input_ids=input_ids, pixel_values=np.asarray(inputs["pixel_values"]), targets=targets,
              loss_mask=loss_mask, input_mask=np.ones_like(input_ids, bool))


def model_flops(model_config: VLMConfig, batch_size: int, length: int) -> float:
  """Training FLOPs of one step (forward + backward = 3x forward): every matmul weight does 2 FLOPs per token
  forward, the attention scores and their weighted sum 4·T·D per token and layer (no causal discount)."""
  vision, decoder = model_config.vision, model_config.decoder
  patches = vision.num_patches + int(vision.cls_token)
  vision_weights = vision.depth * (4 * vision.width**2 + 2 * vision.width * vision.mlp_dim)
  heads_width = decoder.num_heads * decoder.attention_head_dim
  kv_width = decoder.num_kv_heads * decoder.attention_head_dim
  decoder_weights = decoder.depth * (2 * decoder.width * heads_width + 2 * decoder.width * kv_width
                                     + 3 * decoder.width * decoder.mlp_dim) + decoder.width * decoder.vocab_size
  projector_weights = vision.width * decoder.width + decoder.width**2
  forward = 2 * batch_size * (patches * vision_weights + model_config.tokens_per_image * projector_weights
                              + length * decoder_weights)
  forward += 4 * batch_size * (vision.depth * patches**2 * vision.width + decoder.depth * length**2 * heads_width)
  return 3 * forward


def vlmjax_step(config, batch: dict) -> Callable[[], jax.Array]:
  """A call that runs one vlmjax train step (and returns its loss)."""
  model_config = VLMConfig.from_dict(config.model)
  mesh = mesh_lib.make_mesh(config.mesh)
  rules = mesh_lib.normalize_rules(config.sharding_rules)
  init = lambda: VLM(model_config).init(jax.random.key(config.seed), **model_config.example_inputs(1))
  params = mesh_lib.init_sharded(init, mesh, rules)[0]["params"]
  optim_config = ml_collections.ConfigDict({**config.optim.to_dict(), "optimizer": "adamw"})
  optimizer = optim.make_optimizer(optim_config, params, "full", total_steps=1000)
  state = jax.jit(lambda p: state_lib.create(p, optimizer))(params)
  batch = jax.device_put(batch, mesh_lib.batch_sharding(mesh))

  def step():
    nonlocal state
    with mesh_lib.activate(mesh, rules):
      state, metrics = state_lib.train_step(state, batch, config=model_config, optimizer=optimizer, stage="full")
    return metrics["loss"]
  return step


def transformers_step(model_config: VLMConfig, config, batch: dict) -> Callable[[], None]:
  """A call that runs one train step of the same-shaped LLaVA in transformers (float32, eager, CPU)."""
  import torch
  import transformers

  vision, decoder = model_config.vision, model_config.decoder
  if model_config.image_token_merge != 1 or vision.stem != "patch":
    raise ValueError(f"transformers' LLaVA has no image_token_merge={model_config.image_token_merge} or "
                     f"vision.stem={vision.stem!r}: compare the same step with --config.model.image_token_merge=1 "
                     f"--config.model.vision.stem=patch")
  hf_config = transformers.LlavaConfig(
      vision_config=transformers.CLIPVisionConfig(
          hidden_size=vision.width, intermediate_size=vision.mlp_dim, num_hidden_layers=vision.depth,
          num_attention_heads=vision.num_heads, image_size=vision.image_size, patch_size=vision.patch_size),
      text_config=transformers.LlamaConfig(
          vocab_size=decoder.vocab_size, hidden_size=decoder.width, intermediate_size=decoder.mlp_dim,
          num_hidden_layers=decoder.depth, num_attention_heads=decoder.num_heads,
          num_key_value_heads=decoder.num_kv_heads, max_position_embeddings=4096),
      image_token_index=model_config.image_token_id, vision_feature_layer=-1,
      vision_feature_select_strategy="default", image_seq_length=model_config.tokens_per_image)
  torch.manual_seed(config.seed)
  model = transformers.LlavaForConditionalGeneration(hf_config).train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.learning_rate,
                                betas=(config.optim.b1, config.optim.b2), weight_decay=config.optim.weight_decay)
  input_ids = torch.from_numpy(batch["input_ids"]).long()
  pixel_values = torch.from_numpy(batch["pixel_values"]).permute(0, 3, 1, 2).contiguous()
  labels = torch.where(torch.from_numpy(batch["loss_mask"]) > 0, torch.from_numpy(batch["targets"]).long(), -100)
  labels = torch.roll(labels, 1, dims=1)  # transformers shifts labels itself: label t is predicted at t - 1

  def step():
    loss = model(input_ids=input_ids, pixel_values=pixel_values, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
  return step


def main(argv):
  del argv
  config = _CONFIG.value
  distributed.split_cpu(config.cpu_devices)  # as `vlmjax train` runs the config
  model_config = VLMConfig.from_dict(config.model)
  batch_size = _BATCH.value or config.train.batch_size
  length = config.data.length
  batch = _batch(model_config, batch_size, length)
  compute_dtype = model_config.decoder.dtype
  flops = model_flops(model_config, batch_size, length)
  peak_matmuls = {dtype: roofline.peak_matmul(dtype) for dtype in ("float32", compute_dtype)}
  calls = {"vlmjax": vlmjax_step(config, batch), "transformers": transformers_step(model_config, config, batch),
           **{dtype: matmul for dtype, (matmul, _) in peak_matmuls.items()}}
  seconds = roofline.interleaved_median_seconds(calls, rounds=_ROUNDS.value, calls=_CALLS_PER_ROUND,
                                                warmup=_WARMUP_STEPS)
  peaks = {dtype: matmul_flops / seconds[dtype] for dtype, (_, matmul_flops) in peak_matmuls.items()}
  tokens = batch_size * length
  print(f"batch {batch_size} x {length} tokens, {flops / 1e9:.1f} model GFLOP per step; matmul peaks: " +
        ", ".join(f"{dtype} {peak / 1e9:.0f} GFLOP/s" for dtype, peak in peaks.items()))
  print(f"{'framework':<16}{'compute':>10}{'step s (median)':>17}{'tokens/s':>11}{'MFU':>8}{'speed-up':>10}")
  for name, dtype in (("vlmjax", compute_dtype), ("transformers", "float32")):
    step = seconds[name]
    print(f"{name:<16}{dtype:>10}{step:>17.3f}{tokens / step:>11.0f}{flops / step / peaks[dtype]:>8.1%}"
          f"{seconds['transformers'] / step:>9.2f}x")


if __name__ == "__main__":
  runtime.exec_with_huge_pages()  # as `vlmjax` runs: XLA's CPU buffers in huge pages
  app.run(main)
