"""How well does the classify stage's tower know what each patch shows, after how many steps?

    python experiments/shapes_tiny/probe_classify.py --data_dir runs/shapes/data --steps 380 --every 95

Trains the recipe's `classify` model (the config's vision tower with its per-patch head, the stage's batch and
learning rate, `optim`'s warmup and cosine decay over --steps) outside the trainer, and every --every steps
prints, on the first 500 validation images, the fraction of object patches whose shape, colour and size the head
names right (and, with --config.classify.position_bins, the strip of the image across and down that holds the
object's box centre; `shapes_tasks.patch_labels`; background patches are left out), and of all patches whether
the head says right which patch holds an object's box centre.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from ml_collections import config_flags

from vlmjax import workdir
from vlmjax.data import shapes, shapes_tasks
from vlmjax.models.classifier import ViTClassifier
from vlmjax.train import optim, stages, state as state_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/shapes_tiny.py", "Experiment config (its classify stage).")
_DATA_DIR = flags.DEFINE_string("data_dir", "runs/shapes/data", "A built shapes data set.")
_STEPS = flags.DEFINE_integer("steps", 380, "Training steps (the schedule's length).")
_EVERY = flags.DEFINE_integer("every", 95, "Steps between evaluations.")


def main(argv):
  del argv
  config = _CONFIG.value
  model_config = stages.classifier_config(config)
  model = ViTClassifier(model_config)
  position_bins = stages.position_bins(config)
  to_example = stages.patch_labels_example_fn(shapes.tokenizer_dir(_DATA_DIR.value), model_config.vision.grid_size,
                                              position_bins)
  train, validation = shapes.load(_DATA_DIR.value, "train"), shapes.load(_DATA_DIR.value, "validation")

  def batch(source, indices) -> dict:
    """{pixel_values, labels} of the records, as the classify stage makes them."""
    examples = [to_example(source[i], None) for i in indices]
    return {key: np.stack([e[key] for e in examples]) for key in examples[0]}

  image_size = model_config.vision.image_size
  params = model.init(jax.random.key(config.seed), jnp.zeros((1, image_size, image_size, 3)))["params"]
  optim_config = stages.optim_config(config, workdir.Stage(workdir.CLASSIFY, 0, _STEPS.value))
  optimizer = optim.make_optimizer(optim_config, params, workdir.CLASSIFY, _STEPS.value)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, batch):
    (loss, _), grads = jax.value_and_grad(state_lib.classify_loss, has_aux=True)(params, model_config, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  val = batch(validation, range(500))
  val_labels = val["labels"]
  predict = jax.jit(lambda p: model.apply({"params": p}, val["pixel_values"]))
  bounds = np.cumsum((0,) + model_config.label_classes)
  on_object = val_labels[..., 0] > 0  # [N, P]

  def report(params) -> str:
    logits = np.asarray(predict(params))
    right = {name: (logits[..., bounds[g]:bounds[g + 1]].argmax(-1) == val_labels[..., g])[on_object].mean()
             for g, name in enumerate(shapes_tasks.patch_groups(position_bins)[:-1])}
    right["box centre"] = (logits[..., bounds[-2]:].argmax(-1) == val_labels[..., -1]).mean()
    return ", ".join(f"{name} {value:.3f}" for name, value in right.items())

  rng, start = np.random.default_rng(config.seed), time.perf_counter()
  for i in range(1, _STEPS.value + 1):
    params, opt_state, loss = step(params, opt_state,
                                   batch(train, rng.integers(0, len(train), config.classify.batch_size)))
    if i % _EVERY.value == 0 or i == _STEPS.value:
      print(f"step {i}: loss {float(loss):.4f}, object patches right: {report(params)} "
            f"({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
  app.run(main)
