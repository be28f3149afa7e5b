"""FastV (arXiv 2403.06764): image tokens pruned inside the language model, by the attention they receive.

    vlmjax.load(path, visual_tokens="fastv:144:2")   # keep 144 of each image's tokens from layer 2 on

Layers 0..LAYER-1 see every token. The attention of the prompt's last token in layer LAYER-1, averaged over its
heads, ranks the image tokens; from layer LAYER on the sequence holds only each image's KEEP best-ranked ones (and
every text token), so those layers compute over fewer tokens and their KV cache holds fewer slots. Kept tokens keep
their RoPE positions (the model was trained with them there, and the text after an image keeps its distance to it),
so the cache slot of a token in a pruned layer is its position less the tokens dropped before it; `KVCache.pruned`
holds each row's dropped count, which decoding subtracts for those layers. A prefill prunes; decode steps only
read what it left.
"""

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class Pruning:
  """What a decoder call prunes.

  layer: the first layer that sees only the kept tokens (>= 1).
  drop: the tokens each row loses from `layer` on in this call (a prefill's; 0 when decoding).
  image_mask: bool[B, T], the image tokens among the call's (None when drop is 0).
  rank_index: int32[B], each row's query whose attention in layer `layer` - 1 ranks them (its prompt's last token).
  """

  layer: int = flax.struct.field(pytree_node=False)
  drop: int = flax.struct.field(pytree_node=False, default=0)
  image_mask: jax.Array | None = None
  rank_index: jax.Array | None = None


def kept_order(received: jax.Array, image_mask: jax.Array, drop: int) -> jax.Array:
  """int32[B, T - drop]: each row's kept token indices in order, dropping its `drop` image tokens that received
  the least attention. received: float32[B, T], image_mask: bool[B, T] (each row holds at least `drop` image
  tokens; text tokens and padding are always kept)."""
  length = image_mask.shape[1]
  never_dropped = jnp.where(image_mask, received, jnp.inf)
  _, dropped = jax.lax.top_k(-never_dropped, drop)  # [B, drop], the least attended image tokens
  rows = jnp.arange(image_mask.shape[0])[:, None]
  is_dropped = jnp.zeros(image_mask.shape, bool).at[rows, dropped].set(True)
  return jnp.argsort(is_dropped, axis=1, stable=True)[:, :length - drop].astype(jnp.int32)


def gather(x: jax.Array, order: jax.Array, axis: int = 1) -> jax.Array:
  """x with its token axis `axis` (of length T, rows on the axis before it) taken in `order` int32[B, T']."""
  index = order.reshape(order.shape + (1,) * (x.ndim - axis - 1))
  if axis == 2:  # M-RoPE positions [3, B, T]
    index = index[None]
  return jnp.take_along_axis(x, index, axis=axis)


def compacted(order: jax.Array, index: jax.Array) -> jax.Array:
  """int32[B, K]: where the tokens at `index` int[B, K] (kept ones) sit among the kept tokens `order` int32[B, T']."""
  return jnp.argmax(order[:, None, :] == index[:, :, None], axis=-1).astype(jnp.int32)
