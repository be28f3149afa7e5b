"""The optimizer: AdamW with warmup + cosine decay, global-norm clipping, gradient accumulation, and per-stage
freezing through `optax.multi_transform` (frozen groups get `set_to_zero`, which keeps no optimizer state).

Stages, as LLaVA and PaliGemma train:
  align     only the projector trains (vision encoder and language model frozen)
  finetune  projector + language model (vision encoder frozen)
  full      everything
  contrastive  the CLIP dual tower, everything
  classify  the vision tower with a per-patch classification head, everything
"""

from typing import Any, Mapping

import jax
import ml_collections
import optax

# Top-level parameter groups that train in each stage; every other group is frozen.
TRAINABLE = {
    "align": ("projector",),
    "finetune": ("projector", "decoder"),
    "full": ("vision", "projector", "decoder"),
    "contrastive": ("vision", "text", "image_projection", "text_projection", "log_temperature", "logit_bias"),
    "classify": ("vision", "head", "classifier"),
}


def check_stage(stage: str) -> None:
  if stage not in TRAINABLE:
    raise ValueError(f"unknown training stage {stage!r}; the stages are {list(TRAINABLE)}")


def trainable_labels(params: Mapping[str, Any], stage: str) -> dict:
  """'train' or 'frozen' for every parameter leaf, by its top-level group (`vision`, `projector`, ...)."""
  check_stage(stage)
  return {group: jax.tree.map(lambda _: "train" if group in TRAINABLE[stage] else "frozen", subtree)
          for group, subtree in params.items()}


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `optim.learning_rate`, then cosine decay to `learning_rate * end_ratio`."""
  peak = config.learning_rate
  warmup = min(config.warmup_steps, max(total_steps - 1, 0))
  decay = optax.cosine_decay_schedule(peak, decay_steps=max(total_steps - warmup, 1), alpha=config.end_ratio)
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], boundaries=[warmup])


def make_optimizer(config: ml_collections.ConfigDict, params: Mapping[str, Any], stage: str,
                   total_steps: int) -> optax.GradientTransformation:
  """The stage's optimizer from the `optim` config section.

  Keys: learning_rate, warmup_steps, end_ratio, b1, b2, eps, weight_decay (not on 1-D parameters: norms,
  biases), grad_clip (global norm of the trained groups' gradients; 0 disables), accumulation_steps (gradients
  averaged over that many steps before one update), vision_learning_rate (the vision tower's peak rate in the
  VLM stages; None: learning_rate. As LLaVA-OneVision's mm_vision_tower_lr: a tower learning from scratch
  stands a larger rate than the language model, a pretrained one wants a smaller one).
  """
  schedule = learning_rate_schedule(config, total_steps)
  decay_mask = lambda tree: jax.tree.map(lambda p: p.ndim >= 2, tree)
  update = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay,
                       mask=decay_mask)
  vision_rate = config.get("vision_learning_rate")
  if vision_rate is not None and stage == "full":  # the VLM stage that trains the vision tower
    # AdamW's step (decay included) is proportional to its rate, so scaling the vision tower's step is AdamW
    # at vision_rate on the same warmup and decay.
    update = optax.chain(update, _scale_group("vision", vision_rate / config.learning_rate))
  if config.grad_clip > 0:
    update = optax.chain(optax.clip_by_global_norm(config.grad_clip), update)
  optimizer = optax.multi_transform({"train": update, "frozen": optax.set_to_zero()},
                                    trainable_labels(params, stage))
  if config.accumulation_steps > 1:
    optimizer = optax.MultiSteps(optimizer, every_k_schedule=config.accumulation_steps)
  return optimizer


def _scale_group(group: str, factor: float) -> optax.GradientTransformation:
  """Multiplies the updates of one top-level parameter group by `factor`; keeps no state."""
  def update_fn(updates, state, params=None):
    del params
    return {name: jax.tree.map(lambda u: u * factor, tree) if name == group else tree
            for name, tree in updates.items()}, state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
