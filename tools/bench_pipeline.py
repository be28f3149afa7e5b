"""Input-pipeline throughput against the train step's appetite, for a config's batch (shapes_tiny by default).

    python tools/bench_pipeline.py --config configs/shapes_tiny.py --data_dir /tmp/shapes [--batches 30]

Prints examples/s of the grain pipeline (decode, chat template, tokenize, loss mask, pixels, batch) and of the
jitted train step on the same batches, and their ratio: above 1, the pipeline keeps ahead and the trainer
never waits on input. Builds the data set into --data_dir if it is missing.
"""

import statistics
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from vlmjax.data import pipeline, shapes
from vlmjax.models.vlm import VLM, VLMConfig
from vlmjax.parallel import mesh as mesh_lib
from vlmjax.train import optim, stages, state as state_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/shapes_tiny.py", "Experiment config file.")
_DATA_DIR = flags.DEFINE_string("data_dir", "/tmp/shapes", "Where the shapes data set is (built if missing).")
_BATCHES = flags.DEFINE_integer("batches", 30, "Batches timed for each side.")


def main(argv):
  del argv
  config = _CONFIG.value
  shapes.build(_DATA_DIR.value, config.data.shapes)
  model_config = VLMConfig.from_dict(config.model)
  to_example = stages.shapes_example_fn(config, model_config, shapes.tokenizer_dir(_DATA_DIR.value))
  dataset = pipeline.train_dataset(shapes.load(_DATA_DIR.value, "train"), to_example, seed=0,
                                   batch_size=config.train.batch_size, length=config.data.length)
  iterator = iter(dataset)
  batches = [next(iterator)]  # warm up
  start = time.perf_counter()
  batches += [next(iterator) for _ in range(_BATCHES.value)]
  pipeline_rate = _BATCHES.value * config.train.batch_size / (time.perf_counter() - start)

  mesh = mesh_lib.make_mesh(config.mesh)
  init = lambda: VLM(model_config).init(jax.random.key(0), **model_config.example_inputs(1))
  params = mesh_lib.init_sharded(init, mesh, mesh_lib.normalize_rules(config.sharding_rules))[0]["params"]
  optimizer = optim.make_optimizer(config.optim, params, "full", config.train.steps)
  state = state_lib.create(params, optimizer)
  step_times = []
  for i, batch in enumerate(batches):
    start = time.perf_counter()
    state, metrics = state_lib.train_step(state, jax.device_put(batch), config=model_config, optimizer=optimizer,
                                          stage="full")
    jax.block_until_ready(metrics)
    if i:  # the first step compiles
      step_times.append(time.perf_counter() - start)
  step_rate = config.train.batch_size / statistics.median(step_times)
  print(f"{'batch':>6}{'tokens':>8}{'pipeline ex/s':>15}{'train step ex/s':>17}{'pipeline / step':>17}")
  print(f"{config.train.batch_size:>6}{config.data.length:>8}{pipeline_rate:>15.0f}{step_rate:>17.1f}"
        f"{pipeline_rate / step_rate:>16.1f}x")


if __name__ == "__main__":
  app.run(main)
