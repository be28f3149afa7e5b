"""Training losses."""

import jax
import jax.numpy as jnp


def next_token_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean cross-entropy of the tokens with weight > 0 (the loss mask: assistant tokens only).

  Args:
    logits: float[B, T, V], the prediction for each position's *next* token.
    targets: int[B, T], the token that follows each position.
    weights: float[B, T] (or bool), 0 where a position does not count (prompt, image, padding).
  Returns:
    (mean loss over weighted tokens, float32 scalar; total weight, float32 scalar).
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  token_log_probs = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]  # [B, T]
  weights = weights.astype(jnp.float32)
  total = jnp.sum(weights)
  return -jnp.sum(token_log_probs * weights) / jnp.maximum(total, 1.0), total


def softmax_contrastive_loss(image_embeddings: jax.Array, text_embeddings: jax.Array,
                             logit_scale: jax.Array) -> jax.Array:
  """CLIP's InfoNCE: symmetric cross-entropy over the batch, the i-th image's caption being the i-th text.

  image_embeddings, text_embeddings: float[B, E], unit norm; logit_scale: the inverse temperature.
  """
  logits = logit_scale * image_embeddings @ text_embeddings.T  # [B, B]
  labels = jnp.arange(logits.shape[0])
  image_to_text = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=1), labels[:, None], axis=1)
  text_to_image = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=0), labels[None, :], axis=0)
  return (jnp.mean(image_to_text) + jnp.mean(text_to_image)) / 2


def sigmoid_contrastive_loss(image_embeddings: jax.Array, text_embeddings: jax.Array, logit_scale: jax.Array,
                             logit_bias: jax.Array) -> jax.Array:
  """SigLIP's pairwise sigmoid loss: every (image, text) pair is a binary match / no-match decision,
  summed over texts and averaged over images."""
  logits = logit_scale * image_embeddings @ text_embeddings.T + logit_bias  # [B, B]
  labels = 2 * jnp.eye(logits.shape[0]) - 1  # +1 on the diagonal, -1 elsewhere
  return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / logits.shape[0]
