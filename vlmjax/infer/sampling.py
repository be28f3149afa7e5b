"""Choosing the next token: greedy, temperature, top-k and top-p, with per-row settings and explicit PRNG keys.

Settings are arrays (one value per row), not Python values, so one compiled decode loop serves every request
and a serving slot can change its settings without recompiling.
"""

import flax.struct
import jax
import jax.numpy as jnp

MAX_TOP_LOGPROBS = 20  # the most likely tokens reported with each scored one (OpenAI's bound for top_logprobs)


@flax.struct.dataclass
class SamplingParams:
  """Per-row sampling settings.

  Attributes:
    temperature: float32[B]; 0 means greedy (argmax).
    top_k: int32[B]; keep the k most likely tokens, 0 keeps all.
    top_p: float32[B]; keep the smallest set of most likely tokens whose probability reaches p, 1 keeps all.
  """

  temperature: jax.Array
  top_k: jax.Array
  top_p: jax.Array

  @classmethod
  def fill(cls, batch_size: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> "SamplingParams":
    """The same settings for every row, checked."""
    if temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not 0.0 < top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    return cls(temperature=jnp.full((batch_size,), temperature, jnp.float32),
               top_k=jnp.full((batch_size,), top_k, jnp.int32),
               top_p=jnp.full((batch_size,), top_p, jnp.float32))


def sample(logits: jax.Array, params: SamplingParams, key: jax.Array) -> jax.Array:
  """Next tokens int32[B] from logits float[B, V].

  Rows with temperature 0 take the argmax. When every row is greedy (the common case) the sorting that top-k
  and top-p need is skipped at run time (`lax.cond`).
  """
  logits = logits.astype(jnp.float32)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.lax.cond(jnp.all(params.temperature == 0.0), lambda: greedy,
                      lambda: jnp.where(params.temperature == 0.0, greedy, _sample_filtered(logits, params, key)))


def _sample_filtered(logits: jax.Array, params: SamplingParams, key: jax.Array) -> jax.Array:
  vocab = logits.shape[-1]
  scaled = logits / jnp.maximum(params.temperature, 1e-6)[:, None]
  order = jnp.argsort(-scaled, axis=-1)  # [B, V], most likely first
  sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
  rank = jnp.arange(vocab)[None, :]
  k = jnp.where(params.top_k > 0, params.top_k, vocab)[:, None]
  keep = rank < k
  probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the more likely tokens
  keep = keep & (mass_before < params.top_p[:, None])  # the most likely token is always kept
  choice = jax.random.categorical(key, jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)  # [B]
  return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


@flax.struct.dataclass
class TokenScores:
  """The model's log-probabilities at sampled tokens: log-softmax of its logits, before temperature or any mask.

  Attributes:
    chosen: float32[N], of each row's sampled token.
    top_ids: int32[N, K], the K most likely tokens (K = min(MAX_TOP_LOGPROBS, V)), the likeliest first.
    top: float32[N, K], their log-probabilities.
  """

  chosen: jax.Array
  top_ids: jax.Array
  top: jax.Array


def token_scores(logits: jax.Array, tokens: jax.Array) -> TokenScores:
  """TokenScores of tokens int32[N] under logits float[N, V]."""
  logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  top, top_ids = jax.lax.top_k(logprobs, min(MAX_TOP_LOGPROBS, logprobs.shape[-1]))
  return TokenScores(chosen=jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0],
                     top_ids=top_ids.astype(jnp.int32), top=top)
