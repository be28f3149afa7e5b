"""Input-pipeline throughput against the train step's appetite, for a config's batch (shapes_tiny by default),
with and without packing and worker processes.

    python tools/bench_pipeline.py --config configs/shapes_tiny.py --data_dir /tmp/shapes \
        [--batches 30 --num_workers 2 --packed_length 384]

One row per pipeline setting: rows x tokens of a batch, worker processes, examples per batch, the batch's padding
(fraction of its tokens), examples/s of the grain pipeline alone (decode, chat template, tokenize, loss mask,
pixels, pack, batch), of the jitted train step alone on the same batches (median step), their ratio (above 1,
the pipeline keeps ahead), then the two running together as the trainer runs them (the pipeline's prefetch
thread and workers share this machine's cores with XLA's threads): examples/s of that loop and the milliseconds
per step it waits for its next batch. Packing is measured at the config's length and at --packed_length with the
rows scaled to the same tokens per batch, with as many image slots per row as the shortest example seen fits
(the vision tower encodes every slot); 'padding saved' is the padding per example that packing removes against
the unpacked batch. Builds the data set into --data_dir if it is missing. Prints the host (CPU model, cores, JAX
devices) first and the train step's compute dtype above the table.
"""

import statistics
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

import roofline  # tools/roofline.py: this script's own folder is on sys.path
from vlmjax import runtime
from vlmjax.data import pipeline, shapes
from vlmjax.models.vlm import VLM, VLMConfig
from vlmjax.parallel import mesh as mesh_lib
from vlmjax.train import optim, stages, state as state_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/shapes_tiny.py", "Experiment config file.")
_DATA_DIR = flags.DEFINE_string("data_dir", "/tmp/shapes", "Where the shapes data set is (built if missing).")
_BATCHES = flags.DEFINE_integer("batches", 30, "Batches timed for each side.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 2, "Worker processes compared with decoding in-process.")
_PACKED_LENGTH = flags.DEFINE_integer("packed_length", None, "Row length of the longer packed setting "
                                      "(default: twice data.length).")


def _examples(batch: dict[str, np.ndarray]) -> int:
  """Examples in a batch: one per row, or one per segment of a packed row."""
  return int(batch["segment_ids"].max(axis=1).sum()) if "segment_ids" in batch else len(batch["input_ids"])


def _pipeline_rate(make_dataset, count: int) -> tuple[list[dict], float]:
  """(the first count + 1 batches, examples/s over the last count: the first starts the workers)."""
  iterator = iter(make_dataset(prefetch=0))
  batches = [next(iterator)]
  start = time.perf_counter()
  batches += [next(iterator) for _ in range(count)]
  rate = sum(map(_examples, batches[1:])) / (time.perf_counter() - start)
  iterator.close()
  return batches, rate


def _train_loop(step, state, iterator, count: int):
  """Steps on the iterator's batches as the trainer does -> (state, examples/s, mean seconds waiting for a batch)
  over `count` steps after a first one (which compiles the step if it is a new shape)."""
  state, _ = step(state, next(iterator))
  examples, waits, start = 0, [], time.perf_counter()
  for _ in range(count):
    wait_start = time.perf_counter()
    batch = next(iterator)
    waits.append(time.perf_counter() - wait_start)
    state, _ = step(state, batch)
    examples += _examples(batch)
  return state, examples / (time.perf_counter() - start), statistics.mean(waits)


def main(argv):
  del argv
  print(roofline.host_description())
  config = _CONFIG.value
  shapes.build(_DATA_DIR.value, config.data.shapes)
  model_config = VLMConfig.from_dict(config.model)
  to_example = stages.shapes_example_fn(config, model_config, shapes.tokenizer_dir(_DATA_DIR.value))
  source = shapes.load(_DATA_DIR.value, "train")
  rows, length = config.train.batch_size, config.data.length
  packed_length = _PACKED_LENGTH.value or 2 * length
  settings = [(False, rows, length, 0), (False, rows, length, _NUM_WORKERS.value), (True, rows, length, 0),
              (True, rows * length // packed_length, packed_length, 0),
              (True, rows * length // packed_length, packed_length, _NUM_WORKERS.value)]

  mesh = mesh_lib.make_mesh(config.mesh)
  init = lambda: VLM(model_config).init(jax.random.key(0), **model_config.example_inputs(1))
  params = mesh_lib.init_sharded(init, mesh, mesh_lib.normalize_rules(config.sharding_rules))[0]["params"]
  optimizer = optim.make_optimizer(config.optim, params, "full", config.train.steps)
  state = state_lib.create(params, optimizer)

  def step(state, batch):
    state, metrics = state_lib.train_step(state, jax.device_put(batch), config=model_config, optimizer=optimizer,
                                          stage="full")
    return state, jax.block_until_ready(metrics)

  print(f"train step: vlmjax computing in {roofline.compute_dtype(model_config)}, "
        f"{jax.device_count()} device(s)")
  print(f"{'packing':>8}{'rows x tokens':>15}{'images/row':>12}{'workers':>9}{'ex/batch':>10}{'padding':>9}"
        f"{'pipeline ex/s':>15}{'train step ex/s':>17}{'pipeline / step':>17}{'together ex/s':>15}"
        f"{'wait ms/step':>14}")
  padding_per_example, shortest = {}, length
  for packing, batch_rows, batch_length, num_workers in settings:
    images_per_row = batch_length // shortest if packing else 1
    make_dataset = lambda **options: pipeline.train_dataset(
        source, to_example, seed=0, batch_size=batch_rows, length=batch_length, packing=packing,
        images_per_row=images_per_row, num_workers=num_workers, **options)
    batches, pipeline_rate = _pipeline_rate(make_dataset, _BATCHES.value)
    examples = sum(map(_examples, batches))
    padding_tokens = sum(int((~b["input_mask"]).sum()) for b in batches)
    padding_per_example[packing, batch_length] = padding_tokens / examples
    if not packing:
      shortest = min(shortest, min(int(b["input_mask"].sum(axis=1).min()) for b in batches))

    step_times = []
    for i, batch in enumerate(batches):
      start = time.perf_counter()
      state, _ = step(state, batch)
      if i:  # the first step compiles
        step_times.append(time.perf_counter() - start)
    step_rate = examples / len(batches) / statistics.median(step_times)

    iterator = iter(make_dataset())  # the trainer's loop: the pipeline prefetches while the step runs
    state, together_rate, wait = _train_loop(step, state, iterator, _BATCHES.value)
    iterator.close()

    print(f"{str(packing):>8}{f'{batch_rows} x {batch_length}':>15}{images_per_row:>12}{num_workers:>9}"
          f"{examples / len(batches):>10.1f}{padding_tokens / sum(b['input_mask'].size for b in batches):>9.1%}"
          f"{pipeline_rate:>15.0f}{step_rate:>17.1f}{pipeline_rate / step_rate:>16.1f}x{together_rate:>15.1f}"
          f"{1e3 * wait:>14.1f}")
  unpacked = padding_per_example[False, length]
  for packed in (length, packed_length):
    print(f"padding saved by packing at {packed} tokens per row: "
          f"{1 - padding_per_example[True, packed] / unpacked:.0%} of the padding per example")


if __name__ == "__main__":
  runtime.exec_with_huge_pages()  # as `vlmjax` runs: XLA's CPU buffers in huge pages
  app.run(main)
