"""Compile time and step time of a VLM's forward + backward (loss and gradients), jitted, on this machine.

    python tools/bench_step.py --config configs/shapes_tiny.py [--batch_size 32 --text_length 24 --repeats 10]

Prints the host (CPU model, cores, JAX devices), then one table: the model's compute dtype, compile seconds
(lowering + XLA compile, measured once, without the persistent cache), and the median, min and max step seconds
over `--repeats` timed steps after a warm-up step.
"""

import statistics
import time

import jax
from absl import app, flags
from ml_collections import config_flags

import roofline  # tools/roofline.py: this script's own folder is on sys.path
from vlmjax import runtime
from vlmjax.models.vlm import VLM, VLMConfig
from vlmjax.parallel import mesh as mesh_lib
from vlmjax.train.losses import next_token_loss

_CONFIG = config_flags.DEFINE_config_file("config", "configs/shapes_tiny.py", "Experiment config file.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Rows per step (default: the config's train.batch_size).")
_TEXT = flags.DEFINE_integer("text_length", 24, "Text tokens per row besides the image tokens.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed steps.")


def main(argv):
  del argv
  jax.config.update("jax_enable_compilation_cache", False)
  print(roofline.host_description())
  config = _CONFIG.value
  model_config = VLMConfig.from_dict(config.model)
  batch_size = _BATCH.value or config.train.batch_size
  model = VLM(model_config)
  mesh = mesh_lib.make_mesh(config.mesh)
  init = lambda: model.init(jax.random.key(config.seed), **model_config.example_inputs(1))
  variables, _ = mesh_lib.init_sharded(init, mesh, config.sharding_rules)
  inputs = jax.device_put(model_config.example_inputs(batch_size, _TEXT.value, seed=0),
                          mesh_lib.batch_sharding(mesh))
  weights = (inputs["input_ids"] != model_config.image_token_id).astype("float32")

  def loss_fn(params, inputs, weights):
    logits, _ = model.apply({"params": params}, **inputs)
    return next_token_loss(logits[:, :-1], inputs["input_ids"][:, 1:], weights[:, 1:])[0]

  step = jax.jit(jax.value_and_grad(loss_fn))
  with mesh_lib.activate(mesh, config.sharding_rules):
    start = time.perf_counter()
    compiled = step.lower(variables["params"], inputs, weights).compile()
    compile_seconds = time.perf_counter() - start
    jax.block_until_ready(compiled(variables["params"], inputs, weights))  # warm-up
    times = []
    for _ in range(_REPEATS.value):
      start = time.perf_counter()
      jax.block_until_ready(compiled(variables["params"], inputs, weights))
      times.append(time.perf_counter() - start)

  tokens = batch_size * inputs["input_ids"].shape[1]
  print(f"{'config':<28}{'dtype':>10}{'devices':>8}{'batch':>7}{'tokens':>8}{'compile s':>11}"
        f"{'step s (median)':>17}{'min':>8}{'max':>8}{'tokens/s':>10}")
  name = config_flags.get_config_filename(flags.FLAGS["config"]).rsplit("/", 1)[-1].removesuffix(".py")
  print(f"{name:<28}{roofline.compute_dtype(model_config):>10}{jax.device_count():>8}{batch_size:>7}{tokens:>8}"
        f"{compile_seconds:>11.2f}{statistics.median(times):>17.4f}{min(times):>8.4f}{max(times):>8.4f}"
        f"{tokens / statistics.median(times):>10.0f}")


if __name__ == "__main__":
  runtime.exec_with_huge_pages()  # as `vlmjax` runs: XLA's CPU buffers in huge pages
  app.run(main)
