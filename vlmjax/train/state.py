"""The train state (a plain pytree) and the jitted update step.

A batch is a dict of arrays, every one with the global batch as its leading axis:
  input_ids int32[B, T] (image placeholders included), pixel_values float32[B, H, W, 3] (or [B, I, H, W, 3], or the
  `Tiles` / `Patches` of LLaVA-NeXT's / Qwen2.5-VL's images at their own size),
  targets int32[B, T] (the next token of each position), loss_mask float32[B, T] (1 on assistant tokens),
  and optionally positions int32[B, T] + segment_ids int32[B, T] (packed rows), prefix_lengths int32[B].
The contrastive stage's batches are image-caption pairs: pixel_values, input_ids int32[B, T] (the caption) and
input_mask bool[B, T]; the classify stage's are pixel_values and labels int32[B, P, G] (each patch's class in
each of the G attribute groups, `shapes_tasks.patch_labels`).
"""

import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vlmjax.data import variable_images
from vlmjax.models import lora
from vlmjax.models.classifier import ClassifierConfig, ViTClassifier, patch_classification_loss
from vlmjax.models.clip import CLIP, CLIPConfig
from vlmjax.models.vlm import VLM, VLMConfig
from vlmjax.train import gradients, losses
from vlmjax.train.optim import split_trained


@flax.struct.dataclass
class TrainState:
  """step: int32[]; params: the model's parameters (float32 master weights); opt_state: the optimizer's;
  skipped: int32[], updates skipped for a non-finite loss or gradient."""

  step: jax.Array
  params: Any
  opt_state: Any
  skipped: jax.Array


def create(params: Any, optimizer: optax.GradientTransformation, step: int = 0) -> TrainState:
  """A fresh optimizer over `params`; `step` counts globally across the stages of a run."""
  return TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=optimizer.init(params),
                    skipped=jnp.zeros((), jnp.int32))


def create_sharded(params: Any, optimizer: optax.GradientTransformation, step: int,
                   mesh: Mesh) -> tuple[TrainState, TrainState]:
  """`create` straight into the shardings the train step keeps: the parameters' own (as placed by the logical
  rules), each optimizer-state leaf that mirrors a parameter (Adam's moments, Muon's momentum) that parameter's,
  and the rest (the step, counts) replicated. Left to XLA, the moments (zeros, tied to no input) come out
  replicated, the step's outputs sharded like the parameters, and the second step compiles again.

  Returns:
    (the state, its shardings: a TrainState of NamedShardings).
  """
  replicated = NamedSharding(mesh, PartitionSpec())
  param_shardings = jax.tree.map(lambda p: p.sharding, params)
  new_state = lambda p: create(p, optimizer, step)
  masked = lambda leaf: isinstance(leaf, optax.MaskedNode)  # a frozen group's (`optim.make_optimizer`): no state
  opt_shardings = optax.tree_map_params(optimizer, lambda leaf, sharding: leaf if masked(leaf) else sharding,
                                        jax.eval_shape(new_state, params).opt_state, param_shardings,
                                        transform_non_params=lambda _: replicated, is_leaf=masked)
  shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings, skipped=replicated)
  return jax.jit(new_state, out_shardings=shardings)(params), shardings


def vlm_loss(params, config: VLMConfig, batch: dict,
             dropout_rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(mean next-token loss over the loss mask, number of loss tokens). dropout_rng: the key of the adapters' dropout
  (`models/lora.py`), None for none."""
  logits, _ = VLM(config).apply({"params": params}, batch["input_ids"], batch["pixel_values"], batch.get("positions"),
                                input_mask=batch.get("input_mask"), segment_ids=batch.get("segment_ids"),
                                prefix_lengths=batch.get("prefix_lengths"),
                                rngs=None if dropout_rng is None else {"dropout": dropout_rng})
  return losses.next_token_loss(logits, batch["targets"], batch["loss_mask"])


def clip_loss(params, config: CLIPConfig, batch: dict) -> tuple[jax.Array, jax.Array]:
  """(the contrastive loss of the batch's image-caption pairs, number of pairs)."""
  images, texts, scale, bias = CLIP(config).apply({"params": params}, batch["pixel_values"], batch["input_ids"],
                                                  batch["input_mask"])
  if config.loss == "sigmoid":
    loss = losses.sigmoid_contrastive_loss(images, texts, scale, bias)
  else:
    loss = losses.softmax_contrastive_loss(images, texts, scale)
  return loss, jnp.asarray(images.shape[0], jnp.float32)


def classify_loss(params, config: ClassifierConfig, batch: dict) -> tuple[jax.Array, jax.Array]:
  """(per-patch cross-entropy summed over the attribute groups, number of images)."""
  logits = ViTClassifier(config).apply({"params": params}, batch["pixel_values"])
  loss = patch_classification_loss(logits, batch["labels"], config.label_classes)
  return loss, jnp.asarray(logits.shape[0], jnp.float32)


def stage_loss(params, config: VLMConfig | CLIPConfig | ClassifierConfig, batch: dict, stage: str,
               dropout_rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """The loss of a stage: contrastive for the CLIP dual tower, per-patch classification for the classifier,
  next-token for the VLM (with dropout_rng for the adapters' dropout)."""
  if stage == "contrastive":
    return clip_loss(params, config, batch)
  if stage == "classify":
    return classify_loss(params, config, batch)
  return vlm_loss(params, config, batch, dropout_rng)


def _train_step(state: TrainState, batch: dict, frozen: dict | None = None, *,
                config: VLMConfig | CLIPConfig | ClassifierConfig, optimizer: optax.GradientTransformation,
                stage: str, seed: int = 0) -> tuple[TrainState, dict]:
  """One update. A non-finite loss or gradient norm skips the update (params and optimizer state unchanged)
  and counts it in `skipped`; the run goes on.

  Args:
    frozen: the parameters the stage keeps fixed, when the state holds only those it trains (the `lora` stage: the
      base model around the adapters, `lora.split`); None when state.params holds every parameter and those of
      the stage's groups train (`optim.split_trained`).
    seed: the run's seed; the adapters' dropout draws from it and the step number.
  Returns:
    (the new state, metrics {loss, grad_norm, tokens (loss tokens or pairs), skipped}: float32/int32 scalars).
  """
  if frozen is None:
    trained, frozen = split_trained(state.params, stage)
    frozen_zeros = jax.tree.map(jnp.zeros_like, frozen)
  else:
    trained, frozen_zeros = state.params, {}
  dropout_rng = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)  # Flax takes raw keys as rngs
  loss_fn = lambda params, batch: stage_loss(params, config, batch, stage, dropout_rng)
  # A batch of `Tiles` or `Patches` is not split into the devices' parts: their tables hold the whole batch's images.
  decomposable = stage != "contrastive" and not variable_images.is_image_input(batch.get("pixel_values"))
  loss, tokens, grads = gradients.loss_and_grads(loss_fn, trained, frozen, batch, decomposable=decomposable)
  # The frozen parameters' zeros, where the optimizer sees every parameter (it sets their updates to zero).
  grads = lora.combine(grads, frozen_zeros)
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  state = TrainState(step=state.step + 1, params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
                     skipped=state.skipped + (~finite).astype(jnp.int32))
  return state, {"loss": loss, "grad_norm": grad_norm, "tokens": tokens, "skipped": state.skipped}


# The step, its state donated; its output shardings are what XLA propagates from the inputs'.
train_step = jax.jit(_train_step, static_argnames=("config", "optimizer", "stage", "seed"),
                     donate_argnames=("state",))


def sharded_train_step(state_shardings: TrainState, *, config: VLMConfig | CLIPConfig | ClassifierConfig,
                       optimizer: optax.GradientTransformation, stage: str, seed: int = 0) -> Callable:
  """`train_step` for one stage, jitted with the state's shardings (`create_sharded`) as its output's, so that
  every step of the stage runs the one program: `state, metrics = step(state, batch)`, or
  `step(state, batch, frozen)` for a stage whose state holds only what it trains."""
  replicated = NamedSharding(state_shardings.step.mesh, PartitionSpec())
  return jax.jit(functools.partial(_train_step, config=config, optimizer=optimizer, stage=stage, seed=seed),
                 out_shardings=(state_shardings, replicated), donate_argnums=0)
