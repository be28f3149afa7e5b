"""Scaled dot-product attention with its own backward pass: every matmul in the compute dtype with float32
accumulation, and the probabilities kept from the forward pass.

`jax.nn.dot_product_attention` (its XLA path, the one a CPU takes) is differentiated by JAX: its backward pass
multiplies float32 cotangents with bfloat16 operands, which XLA's CPU backend computes as float32 matmuls, and
the softmax's backward reads float32 scores. Here the four backward matmuls take bfloat16 operands
(`matmul.contract`'s reasoning), and the forward pass keeps the probabilities in the compute dtype ([B, K, T, G, S]:
3.2 MB per layer and device for the shapes_tiny step) instead of the float32 scores. On the shapes_tiny training
step (tools/bench_train.py) this took the language model's attention from 61 to 17 ms per device and step.
The forward pass computes what `jax.nn.dot_product_attention` computes (tests/models/test_mixed_precision.py).

Every [T, S] array (scores, probabilities, their gradients) is laid out [B, K, T, G, S], the order in which a dot
of [B, T, K, G, H] queries with [B, S, K, H] keys returns it, and every product is asked for in its dot's own
output order, with the small [.., H] results transposed after. Asked for in any other order, XLA's CPU backend
transposes a [T, S] array instead, the largest of the layer: with [B, K, G, T, S] probabilities the shapes_tiny
bench step copied three of them per layer and device (0.25-0.7 ms each). This layout, without the unit G axis
when every query head has its own keys (`_group`), took the bench step from 108.6 to 103.5 ms (in-process A/B;
107.4 against 99.8 ms in the other order).
"""

import functools

import jax
import jax.numpy as jnp

_F32 = jnp.float32


def _group(query: jax.Array, num_kv_heads: int) -> jax.Array:
  """float[B, T, N, H] -> float[B, T, K, N / K, H]: the query heads that share each key/value head.

  With a key/value head per query head the query stays [B, T, N, H], and `_dot` drops G from its equations: XLA's
  CPU backend copies arrays to add or drop a unit axis between fusions (in the shapes_tiny bench step, a [T, S]
  array per layer and device).
  """
  batch, length, heads, head_dim = query.shape
  if heads % num_kv_heads:
    raise ValueError(f"{heads} query heads cannot share {num_kv_heads} key/value heads")
  if heads == num_kv_heads:
    return query
  return query.reshape(batch, length, num_kv_heads, heads // num_kv_heads, head_dim)


def _dot(equation: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """The einsum of a and b, accumulated in float32. The equation is written in the grouped form (G the group axis,
  in a's subscripts); where a has one axis fewer (ungrouped, `_group`), G is left out."""
  if a.ndim < len(equation.split(",")[0]):
    equation = equation.replace("G", "")
  return jnp.einsum(equation, a, b, preferred_element_type=_F32)


def _probabilities(query, key, mask, scale):
  """Softmax over keys of float[B, T, K, G, H] queries against float[B, S, K, H] keys -> float32[B, K, T, G, S]
  (without G for ungrouped [B, T, N, H] queries: `_group`)."""
  scores = _dot("BTKGH,BSKH->BKTGS", query, key) * scale
  if mask is not None:
    # What jax.nn.dot_product_attention fills in: a fully masked row attends uniformly instead of giving NaN.
    mask = mask if query.ndim == 4 else mask[:, :, :, None]
    scores = jnp.where(mask, scores, -0.7 * jnp.finfo(_F32).max)
  return jax.nn.softmax(scores, axis=-1)


def _from_heads_major(x: jax.Array) -> jax.Array:
  """float[B, K, T, G, H] (a product with [B, K, T, G, S] probabilities, in its dot's order) -> float[B, T, K, G, H]."""
  return jnp.swapaxes(x, 1, 2)


def _forward(query, key, value, mask, scale):
  grouped = _group(query, key.shape[2])
  probs = _probabilities(grouped, key, mask, scale).astype(query.dtype)
  out = _from_heads_major(_dot("BKTGS,BSKH->BKTGH", probs, value.astype(query.dtype)).astype(query.dtype))
  return out.reshape(query.shape), probs


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array | None,
                          scale: float) -> jax.Array:
  """softmax(scale · q kᵀ, masked) v.

  Args:
    query: float[B, T, N, H] in the compute dtype.
    key, value: float[B, S, K, H], K dividing N (grouped-query attention; K = 1: multi-query).
    mask: bool[B, 1, T, S], True where a query may see a key, or None (every key).
    scale: the factor on the scores.
  Returns:
    float[B, T, N, H] in the query's dtype.
  """
  return _forward(query, key, value, mask, scale)[0]


def _attention_fwd(query, key, value, mask, scale):
  out, probs = _forward(query, key, value, mask, scale)
  return out, (query, key, value, mask, probs)


def _attention_bwd(scale, residuals, grad):
  query, key, value, mask, probs = residuals
  dtype = query.dtype
  grouped = _group(query, key.shape[2])
  grad = _group(grad, key.shape[2])  # [B, T, K, G, H] like the queries, in the compute dtype as the result
  grad_probs = _dot("BTKGH,BSKH->BKTGS", grad, value.astype(dtype))
  # The softmax's backward: dS = P (dP - rowsum(P * dP)). The row sums are taken over the [T, S] arrays at hand
  # rather than as rowsum(dO * O) over the heads: XLA's CPU backend gives that small reduction to YNNPACK, which
  # took longer than the larger sum fused with dS (attention's forward + backward at the bench step's size: 3.9
  # against 4.5 ms).
  probs32 = probs.astype(_F32)
  row = jnp.sum(probs32 * grad_probs, axis=-1, keepdims=True)  # [B, K, T, G, 1]
  # dS / scale: the scale goes onto the [.., H] products (XLA's CPU backend gave YNNPACK this fusion, and a scalar
  # in it as a [T, S] array of copies).
  grad_scores = (probs32 * (grad_probs - row)).astype(dtype)
  grad_query = _from_heads_major(_dot("BKTGS,BSKH->BKTGH", grad_scores, key.astype(dtype)) * scale)
  grad_key = _dot("BKTGS,BTKGH->BSKH", grad_scores, grouped) * scale
  grad_value = _dot("BKTGS,BTKGH->BSKH", probs, grad)
  grad_mask = None if mask is None else jnp.zeros(mask.shape, jax.dtypes.float0)
  return (grad_query.reshape(query.shape).astype(dtype), grad_key.astype(key.dtype), grad_value.astype(value.dtype),
          grad_mask)


dot_product_attention.defvjp(_attention_fwd, _attention_bwd)
