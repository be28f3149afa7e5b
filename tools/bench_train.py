"""Training throughput: the vlmjax train step against the same step in PyTorch/transformers, each in float32 and
in bfloat16, and the model FLOPs utilization (MFU) of each against this machine's measured matmul peak in its
compute dtype.

    python tools/bench_train.py [--config configs/shapes_tiny.py --batch_size 32 --rounds 20 --sides ...]
    # shapes_tiny merges image tokens and has a conv stem, which transformers' LLaVA cannot express; this shape's
    # full step (the vision tower trained too) runs faster on the CPU split in two (0.086-0.089 s against 0.098 s):
    python tools/bench_train.py --config.model.image_token_merge=1 --config.model.vision.stem=patch \
        --config.cpu_devices=2

vlmjax: `vlmjax.train.state.train_step` as the trainer runs it (AdamW whatever the config's `optim.optimizer`, as
transformers' side steps; clipping, the jitted step with donated state, the CPU split into the config's
`cpu_devices` with the batch over them) on a batch of the config's `data.length` tokens per row, one image each.
transformers: a `LlavaForConditionalGeneration` of the same shape (CLIP vision tower with the config's width,
depth, heads and patches; Llama decoder with its width, depth, heads, KV heads, MLP and vocabulary), forward +
backward + clipping + `torch.optim.AdamW` on the same token and image counts, eager.

Each side (--sides, `framework:dtype`) keeps its weights and optimizer state in float32 (vlmjax: the config's
`model.param_dtype`); its dtype is the compute dtype of its matmuls. vlmjax in bfloat16: the config's `model.dtype` (and each tower's) set to bfloat16, matmuls of
bfloat16 operands accumulated in float32, as shapes_tiny trains. transformers in bfloat16: the forward under
`torch.autocast("cpu", dtype=torch.bfloat16)` (PyTorch's mixed precision: matmuls in bfloat16, norms, softmax and
loss in float32), the backward following it. float32 is float32 throughout on both sides. The ratios printed last
say which are like for like (the same compute dtype on both sides) and which are not.

Model FLOPs per step (`model_flops`: 6 x matmul parameters x tokens plus the attention scores, forward + backward)
are the same number for every side; MFU = model FLOPs / step time / the measured matmul peak of the side's compute
dtype (on a split CPU, of all its devices at once: `roofline.peak_matmul`). The steps and the peak matmuls are
timed in turn over --rounds rounds, 3 calls each per round after one untimed call, after three warm-up calls each
(`roofline.interleaved_median_seconds`: this machine's speed drifts within minutes, so every ratio is of figures
from the same minutes). Prints the host (CPU model, cores, JAX devices; PyTorch's threads) and one table of
medians.
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
_SIDES = flags.DEFINE_list("sides", ["vlmjax:bfloat16", "transformers:bfloat16", "vlmjax:float32",
                                     "transformers:float32"],
                            "framework:dtype pairs to time (framework vlmjax or transformers, dtype float32 or "
                            "bfloat16), in this order in the table.")
_CALLS_PER_ROUND = 3
# The train step's first few calls after the compile run slow (the second took 2.5x the median).
_WARMUP_STEPS = 3
_DTYPES = ("float32", "bfloat16")


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


def with_dtype(config, dtype: str):
  """A copy of `config` whose model (every tower) computes in `dtype`; its weights stay in `model.param_dtype`."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model.dtype = dtype
    for tower in config.model.values():
      if isinstance(tower, ml_collections.ConfigDict) and "dtype" in tower:
        tower.dtype = dtype
  return config


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


def transformers_step(model_config: VLMConfig, config, batch: dict, dtype: str) -> Callable[[], None]:
  """A call that runs one train step of the same-shaped LLaVA in transformers (eager, CPU; float32 weights), its
  forward under bfloat16 autocast if `dtype` is bfloat16."""
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
  input_ids = torch.tensor(batch["input_ids"]).long()
  pixel_values = torch.tensor(batch["pixel_values"]).permute(0, 3, 1, 2).contiguous()
  labels = torch.where(torch.tensor(batch["loss_mask"]) > 0, torch.tensor(batch["targets"]).long(), -100)
  labels = torch.roll(labels, 1, dims=1)  # transformers shifts labels itself: label t is predicted at t - 1

  def step():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
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
  print(roofline.host_description())
  sides = [tuple(side.split(":")) for side in _SIDES.value]
  for side in sides:
    assert len(side) == 2 and side[0] in ("vlmjax", "transformers") and side[1] in _DTYPES, (
        f"--sides takes framework:dtype pairs, framework vlmjax or transformers, dtype one of {_DTYPES}; got {side}")
  model_config = VLMConfig.from_dict(config.model)
  batch_size = _BATCH.value or config.train.batch_size
  length = config.data.length
  batch = _batch(model_config, batch_size, length)
  flops = model_flops(model_config, batch_size, length)
  calls, labels = {}, {}
  for framework, dtype in sides:
    if framework == "vlmjax":
      side_config = with_dtype(config, dtype)
      calls[framework, dtype] = vlmjax_step(side_config, batch)
      labels[framework, dtype] = roofline.compute_dtype(VLMConfig.from_dict(side_config.model))
    else:
      calls[framework, dtype] = transformers_step(model_config, config, batch, dtype)
      labels[framework, dtype] = {"float32": "float32", "bfloat16": "bfloat16 autocast"}[dtype]
  if any(framework == "transformers" for framework, _ in sides):
    import torch
    print(f"transformers: PyTorch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
  peak_matmuls = {dtype: roofline.peak_matmul(dtype) for dtype in _DTYPES if any(d == dtype for _, d in sides)}
  seconds = roofline.interleaved_median_seconds({**calls, **{dtype: matmul for dtype, (matmul, _) in
                                                            peak_matmuls.items()}},
                                                rounds=_ROUNDS.value, calls=_CALLS_PER_ROUND, warmup=_WARMUP_STEPS)
  peaks = {dtype: matmul_flops / seconds[dtype] for dtype, (_, matmul_flops) in peak_matmuls.items()}
  tokens = batch_size * length
  print(f"batch {batch_size} x {length} tokens, {flops / 1e9:.1f} model GFLOP per step; matmul peaks: " +
        ", ".join(f"{dtype} {peak / 1e9:.0f} GFLOP/s" for dtype, peak in peaks.items()) +
        f"; medians of {_ROUNDS.value} rounds x {_CALLS_PER_ROUND} steps; weights and optimizer state in "
        f"{model_config.decoder.param_dtype} (vlmjax), float32 (transformers)")
  print(f"{'framework':<14}{'compute dtype':>19}{'step s (median)':>17}{'tokens/s':>11}{'MFU':>8}"
        f"{'MFU against':>21}")
  for framework, dtype in sides:
    step = seconds[framework, dtype]
    print(f"{framework:<14}{labels[framework, dtype]:>19}{step:>17.3f}{tokens / step:>11.0f}"
          f"{flops / step / peaks[dtype]:>8.1%}{f'{dtype} peak':>21}")
  comparisons = [(("vlmjax", mine), ("transformers", theirs)) for mine, theirs in (
      ("bfloat16", "bfloat16"), ("float32", "float32"), ("bfloat16", "float32"), ("float32", "bfloat16"))]
  print(f"{'vlmjax speed-up over transformers':<48}{'step time ratio':>16}")
  for mine, theirs in comparisons:
    if mine in seconds and theirs in seconds:
      kind = "like for like" if mine[1] == theirs[1] else "NOT like for like"
      name = f"vlmjax {labels[mine]} / transformers {labels[theirs]}"
      print(f"{name:<48}{seconds[theirs] / seconds[mine]:>15.2f}x  {kind}")


if __name__ == "__main__":
  runtime.exec_with_huge_pages()  # as `vlmjax` runs: XLA's CPU buffers in huge pages
  app.run(main)
