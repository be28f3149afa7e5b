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
