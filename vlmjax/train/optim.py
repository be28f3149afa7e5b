"""The optimizer: AdamW or Muon with warmup + cosine decay, global-norm clipping, gradient accumulation, and
per-stage freezing through `optax.multi_transform` (frozen groups get `set_to_zero`, which keeps no optimizer
state).

Stages, as LLaVA and PaliGemma train:
  align     only the projector trains (vision encoder and language model frozen)
  finetune  projector + language model (vision encoder frozen)
  full      everything
  lora      low-rank adapters on the language model's linear layers (`vlmjax.models.lora`) and the projector; the
            state holds only those, the frozen base sits beside it (`train/adapters.py`)
  contrastive  the CLIP dual tower, everything
  classify  the vision tower with a per-patch classification head, everything
"""

from typing import Any, Mapping

import jax
import ml_collections
import optax
import optax.contrib

from vlmjax.models import layers, lora

OPTIMIZERS = ("adamw", "muon")
# Top-level parameter groups that train in each stage; every other group is frozen.
TRAINABLE = {
    "align": ("projector",),
    "finetune": ("projector", "decoder"),
    "full": ("vision", "projector", "decoder"),
    "lora": ("projector",),  # and every adapter matrix (`lora.is_adapter`), wherever it sits
    "contrastive": ("vision", "text", "image_projection", "text_projection", "log_temperature", "logit_bias"),
    "classify": ("vision", "head", "classifier"),
}


def parameter_group(keys: tuple[str, ...]) -> str:
  """The group a parameter trains with, by its path: its top-level group, but
  - Qwen2.5-VL's patch merger (`vision/merger_*`, the end of its tower that maps image patches into the language
    model) is the projector: Qwen's finetuning trains it with the language model and the tower frozen, as LLaVA's
    projector;
  - LLaVA-NeXT's `image_newline` goes with the language model: its training code tunes it with the language model
    ("mm_language_model" takes every parameter outside the tower and projector), not with the projector, and its LoRA
    recipe keeps it frozen."""
  if keys[0] == "vision" and len(keys) > 1 and keys[1].startswith("merger_"):
    return "projector"
  if keys[0] == "image_newline":
    return "decoder"
  return keys[0]


def _path_keys(key_path) -> tuple[str, ...]:
  return tuple(str(getattr(key, "key", key)) for key in key_path)


def trains(keys: tuple[str, ...], stage: str) -> bool:
  """Whether the parameter at path `keys` trains in `stage`: its group (`parameter_group`) does, or it is an adapter
  matrix."""
  return parameter_group(keys) in TRAINABLE[stage] or lora.is_adapter(keys)


def split_trained(params: Mapping[str, Any], stage: str) -> tuple[dict, dict]:
  """(trained, frozen) of `stage`: the parameters that train in it (`trains`) and the rest, as two nested dicts whose
  `lora.combine` is `params` (any tree of the parameters' structure: values, shapes, shardings)."""
  check_stage(stage)
  trained, frozen = {}, {}
  for key_path, leaf in jax.tree_util.tree_leaves_with_path(dict(params)):
    keys = _path_keys(key_path)
    target = trained if trains(keys, stage) else frozen
    for key in keys[:-1]:
      target = target.setdefault(key, {})
    target[keys[-1]] = leaf
  return trained, frozen


def check_stage(stage: str) -> None:
  if stage not in TRAINABLE:
    raise ValueError(f"unknown training stage {stage!r}; the stages are {list(TRAINABLE)}")


def check_optimizer(config: ml_collections.ConfigDict) -> None:
  if config.optimizer not in OPTIMIZERS:
    raise ValueError(f"optim.optimizer={config.optimizer!r} is not one of {list(OPTIMIZERS)}")


def trainable_labels(params: Mapping[str, Any], stage: str) -> dict:
  """'train' or 'frozen' for every parameter leaf, by its group (`parameter_group`: `vision`, `projector`, ...);
  adapter matrices train."""
  check_stage(stage)
  return jax.tree_util.tree_map_with_path(lambda key_path, _: "train" if trains(_path_keys(key_path), stage)
                                          else "frozen", dict(params))


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int,
                           peak: float | None = None) -> optax.Schedule:
  """Linear warmup from 0 to `peak` (None: `optim.learning_rate`), then cosine decay to `peak * end_ratio`."""
  peak = config.learning_rate if peak is None else peak
  warmup = min(config.warmup_steps, max(total_steps - 1, 0))
  decay = optax.cosine_decay_schedule(peak, decay_steps=max(total_steps - warmup, 1), alpha=config.end_ratio)
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], boundaries=[warmup])


def make_optimizer(config: ml_collections.ConfigDict, params: Mapping[str, Any], stage: str,
                   total_steps: int) -> optax.GradientTransformation:
  """The stage's optimizer from the `optim` config section.

  Keys: optimizer ('adamw' or 'muon': `muon_update`), learning_rate, warmup_steps, end_ratio, b1, b2, eps,
  weight_decay (not on 1-D parameters: norms, biases), muon_learning_rate (Muon's peak rate), grad_clip (global
  norm of the trained groups' gradients; 0 disables), accumulation_steps (gradients averaged over that many steps
  before one update), vision_learning_rate (the vision tower's peak rate in the VLM stages, its steps scaled by
  vision_learning_rate / learning_rate; None: learning_rate. As LLaVA-OneVision's mm_vision_tower_lr: a tower
  learning from scratch stands a larger rate than the language model, a pretrained one wants a smaller one),
  projector_learning_rate (the projector's peak rate in the lora stage, as LLaVA's mm_projector_lr; None:
  learning_rate).
  """
  check_optimizer(config)
  if config.optimizer == "muon":
    update = muon_update(config, total_steps)
  else:
    decay_mask = lambda tree: jax.tree.map(lambda p: p.ndim >= 2, tree)
    update = optax.adamw(learning_rate_schedule(config, total_steps), b1=config.b1, b2=config.b2, eps=config.eps,
                         weight_decay=config.weight_decay, mask=decay_mask)
  # A group's own rate: the step (decay included) is proportional to the rate under AdamW and Muon alike, so scaling
  # the group's step is training it at that rate on the same warmup and decay.
  vision_rate = config.get("vision_learning_rate")
  if vision_rate is not None and stage == "full":  # the VLM stage that trains the vision tower
    update = optax.chain(update, _scale_group("vision", vision_rate / config.learning_rate))
  projector_rate = config.get("projector_learning_rate")
  if projector_rate is not None and stage == "lora":  # LLaVA's mm_projector_lr beside the adapters' rate
    update = optax.chain(update, _scale_group("projector", projector_rate / config.learning_rate))
  if config.grad_clip > 0:
    update = optax.chain(optax.clip_by_global_norm(config.grad_clip), update)
  optimizer = optax.multi_transform({"train": update, "frozen": optax.set_to_zero()},
                                    trainable_labels(params, stage))
  if config.accumulation_steps > 1:
    optimizer = optax.MultiSteps(optimizer, every_k_schedule=config.accumulation_steps)
  return optimizer


def muon_update(config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """Muon (`optax.contrib.muon`: Nesterov momentum `b1`, orthogonalized by Newton-Schulz) on the hidden layers'
  kernels (`muon_matrices`) at `muon_learning_rate`, with decoupled weight decay; Adam (Nesterov, as optax's Muon
  runs it) at `learning_rate` with no weight decay on the rest: embeddings, the output layers, norms, biases,
  position tables. Both rates follow the same warmup and decay.

  In the shapes main job's finetune stage Muon at 0.005 is below AdamW's final training loss (0.235) by step 850
  of 1270, and raised shapes_vqa from 0.886 to 0.954; in the classify stage the tower learns shapes by step 100
  instead of 300 (experiments/shapes_tiny/README.md, 2026-12-04 muon).
  """
  return optax.contrib.muon(
      learning_rate_schedule(config, total_steps, peak=config.muon_learning_rate), beta=config.b1, eps=config.eps,
      weight_decay=config.weight_decay, adam_b1=config.b1, adam_b2=config.b2,
      adam_learning_rate=learning_rate_schedule(config, total_steps), adam_weight_decay=0.0,
      muon_weight_dimension_numbers=muon_matrices)


# Groups whose kernels make the model's outputs (logits, contrastive embeddings): Adam, as Muon's authors train
# output layers.
OUTPUT_GROUPS = ("classifier", "image_projection", "text_projection")


def muon_matrices(params: Mapping[str, Any]) -> dict:
  """How Muon sees each parameter: a `MuonDimensionNumbers` (the axes it reduces over, the axes it produces) for
  the kernels of hidden layers, None (Adam) for the rest. Attention projections count as one matrix over all
  heads ([D, N, H] -> D x NH; out [N, H, D] -> NH x D); a convolution's kernel maps its window to its output
  channels; the leading axis of a scanned `layers` stack is a batch axis (one matrix per layer)."""
  def spec(path, leaf):
    names = [getattr(key, "key", None) for key in path]
    if names[-1] != "kernel" or names[0] in OUTPUT_GROUPS:
      return None
    if names[-2] in ("query", "key", "value"):
      return optax.contrib.MuonDimensionNumbers(reduction_axis=-3, output_axis=(-2, -1))
    if names[-2] == "out":
      return optax.contrib.MuonDimensionNumbers(reduction_axis=(-3, -2), output_axis=-1)
    first = 1 if layers.LAYER_STACK in names else 0
    return optax.contrib.MuonDimensionNumbers(reduction_axis=tuple(range(first, leaf.ndim - 1)), output_axis=-1)
  return jax.tree_util.tree_map_with_path(spec, params)


def _scale_group(group: str, factor: float) -> optax.GradientTransformation:
  """Multiplies the updates of one parameter group (`parameter_group`) by `factor`; keeps no state."""
  def update_fn(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(
        lambda key_path, u: u * factor if parameter_group(_path_keys(key_path)) == group else u, updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
