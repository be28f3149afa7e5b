"""Pipeline parallelism's train step against its microbatches: step time for M = 1, 2, 4, 8, 16 microbatches on a
pipeline x data mesh of fake CPU devices, beside the bubble the schedule predicts, (P - 1) / (M + P - 1).

    python tools/bench_pipeline_parallel.py [--config configs/shapes_tiny.py --pipeline 4 --devices 8
                                             --batch_size 32 --length 96 --rounds 3]

(tools/bench_pipeline.py measures the input pipeline, the data side.) Each row is `state.sharded_train_step` as the
trainer runs it (the full stage, the state's shardings, the batch over data) for the config's model with scanned
layers, on a mesh of --pipeline stages x (--devices / --pipeline) data ways; a last row runs the same batch without
a pipeline (data over every device) for reference. Medians of --rounds rounds x 3 steps, the rows interleaved
(`roofline.interleaved_median_seconds`). Prints the host (CPU model, cores) first.

On a CPU split into fake devices the devices share its cores: the stages do not run at the same time, so the
table shows what the schedule costs (its iterations, the rotation between stages, the bubble's wasted stage work)
and not the speed-up of P stages on P real accelerators. There the step time would follow (M + P - 1) / M iterations
of one microbatch's stage time; here every device's work runs on the same few cores.
"""

import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

import roofline  # tools/roofline.py: this script's own folder is on sys.path
from vlmjax import runtime
from vlmjax.models.vlm import VLM, VLMConfig
from vlmjax.parallel import distributed, mesh as mesh_lib, pipeline
from vlmjax.train import optim, pipeline_plan, state as state_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/shapes_tiny.py", "Experiment config file.")
_PIPELINE = flags.DEFINE_integer("pipeline", 4, "Pipeline stages (mesh.pipeline); the rest of the devices are data.")
_DEVICES = flags.DEFINE_integer("devices", 8, "Fake CPU devices to split this machine's CPU into.")
_MICROBATCHES = flags.DEFINE_list("microbatches", ["1", "2", "4", "8", "16"], "Microbatch counts, one row each.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Rows per step: a multiple of every microbatch count x data ways.")
_LENGTH = flags.DEFINE_integer("length", 96, "Tokens per row (the image's included).")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds of calls; in each, every row's step 1 untimed + 3 timed.")
_CALLS_PER_ROUND = 3


def _batch(model_config: VLMConfig, batch_size: int, length: int) -> dict:
  """A batch of `length` tokens per row, one image each, the loss on half of the tokens."""
  inputs = model_config.example_inputs(batch_size, text_length=length - model_config.tokens_per_image, seed=0)
  ids = np.asarray(inputs["input_ids"])
  loss_mask = (np.random.default_rng(0).uniform(size=ids.shape) < 0.5).astype(np.float32)
  return dict(inputs, targets=np.roll(ids, -1, axis=1), loss_mask=loss_mask)


def step_call(config: ml_collections.ConfigDict, batch: dict):
  """A call that runs one train step of `config` (its mesh and train.microbatches) and returns its loss."""
  model_config = pipeline_plan.pipelined(VLMConfig.from_dict(config.model), config, jax.device_count())
  mesh = mesh_lib.make_mesh(config.mesh)
  rules = mesh_lib.normalize_rules(config.sharding_rules)
  init = lambda: VLM(model_config).init(jax.random.key(config.seed), **model_config.example_inputs(1))
  params = mesh_lib.init_sharded(init, mesh, rules)[0]["params"]
  optim_config = ml_collections.ConfigDict({**config.optim.to_dict(), "optimizer": "adamw"})
  optimizer = optim.make_optimizer(optim_config, params, "full", total_steps=1000)
  state, shardings = state_lib.create_sharded(params, optimizer, 0, mesh)
  train_step = state_lib.sharded_train_step(shardings, config=model_config, optimizer=optimizer, stage="full")
  batch = jax.device_put(batch, mesh_lib.batch_sharding(mesh))

  def step():
    nonlocal state
    with mesh_lib.activate(mesh, rules):
      state, metrics = train_step(state, batch)
    return metrics["loss"]
  return step


def main(argv):
  del argv
  distributed.split_cpu(_DEVICES.value)
  print(roofline.host_description())
  stages, data = _PIPELINE.value, _DEVICES.value // _PIPELINE.value
  base = _CONFIG.value
  base.model.scan_layers = True
  base.train.batch_size = _BATCH.value
  model_config = VLMConfig.from_dict(base.model)
  batch = _batch(model_config, _BATCH.value, _LENGTH.value)
  rows = {}
  for microbatches in map(int, _MICROBATCHES.value):
    config = ml_collections.ConfigDict(base.to_dict())
    config.mesh.update(pipeline=stages, data=data, fsdp=1, tensor=1)
    config.train.microbatches = microbatches
    rows[f"pipeline={stages} x data={data}", microbatches] = step_call(config, batch)
  config = ml_collections.ConfigDict(base.to_dict())
  config.mesh.update(pipeline=1, data=_DEVICES.value, fsdp=1, tensor=1)
  rows[f"data={_DEVICES.value}", 1] = step_call(config, batch)
  seconds = roofline.interleaved_median_seconds(rows, rounds=_ROUNDS.value, calls=_CALLS_PER_ROUND)
  print(f"decoder {model_config.decoder.depth} layers of width {model_config.decoder.width}, "
        f"{roofline.compute_dtype(model_config)} compute; batch {_BATCH.value} x {_LENGTH.value} tokens; medians of "
        f"{_ROUNDS.value} rounds x {_CALLS_PER_ROUND} steps; {_DEVICES.value} fake CPU devices sharing the cores above")
  print(f"{'mesh':<22}{'microbatches':>13}{'bubble (P-1)/(M+P-1)':>22}{'step s (median)':>17}{'tokens/s':>10}")
  for (mesh, microbatches), step in seconds.items():
    bubble = pipeline.bubble_fraction(stages, microbatches) if mesh.startswith("pipeline") else 0.0
    print(f"{mesh:<22}{microbatches:>13}{bubble:>22.1%}{step:>17.3f}{_BATCH.value * _LENGTH.value / step:>10.0f}")


if __name__ == "__main__":
  runtime.exec_with_huge_pages()  # as `vlmjax` runs: XLA's CPU buffers in huge pages
  app.run(main)
