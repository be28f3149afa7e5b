"""Training and prefill attention through an accelerator's fused kernel, memory linear in the sequence length:
cuDNN's flash attention on a GPU (`jax.nn.dot_product_attention(implementation="cudnn")`), Pallas splash attention on
a TPU, and XLA's `jax.nn.dot_product_attention` elsewhere or where a kernel's constraints do not hold (`attention`
chooses). `layers.Attention` calls it off the CPU-tuned path (`runtime.cpu_tuned`).

The kernels are fast when told the mask's structure rather than handed it: causal as a flag (whole blocks above the
diagonal skipped), right padding as each row's key length. `KernelMask` holds a mask in that form, with the
materialized bool[B, 1, T, S] kept only for what the two cannot say (a bidirectional prefix, packed segments, padding
that is not a suffix). `kernel_mask` builds it and `jax_attention` runs it through XLA: the CPU tests hold those
against today's path (tests/models/test_fused_attention.py), so a kernel given the same arguments computes the same
attention. The splash path runs on a CPU in Pallas's interpreter for the same tests.
"""

import flax.struct
import jax
import jax.numpy as jnp

# Splash attention's tiles: query and key blocks of 128 rows, head dims a multiple of the TPU's 128 lanes.
SPLASH_BLOCK = 128
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_MAX_HEAD_DIM = 128


@flax.struct.dataclass
class KernelMask:
  """A mask as the fused kernels take it: query t sees key s where all that is given allows it.

  Attributes:
    is_causal: query t sees no key past slot t (a query sits at its own slot, from 0).
    key_lengths: int32[B] or None: row b's keys at slots from key_lengths[b] on are padding.
    mask: bool[B, 1, T, S] or None: what the two cannot say; a kernel that needs it materializes [B, T, S].
  """

  is_causal: bool = flax.struct.field(pytree_node=False)
  key_lengths: jax.Array | None = None
  mask: jax.Array | None = None


def kernel_mask(mask: jax.Array | None, causal: bool = False, key_lengths: jax.Array | None = None) -> KernelMask:
  """The kernels' form of a mask from `layers.make_attention_mask` (bool[B, 1, T, S] or None for full attention).

  causal: the mask is causal from slot 0 without a bidirectional prefix (`layers.CausalMask`). key_lengths:
  int[B], given only where the mask is exactly key slot < key_lengths[b] (and causal where it says so): right-padded
  rows of one segment each; the materialized mask is then dropped."""
  if key_lengths is not None:
    return KernelMask(is_causal=causal, key_lengths=jnp.asarray(key_lengths, jnp.int32))
  return KernelMask(is_causal=causal, mask=mask)


def jax_attention(query: jax.Array, key: jax.Array, value: jax.Array, mask: KernelMask, scale: float,
                  implementation: str = "xla") -> jax.Array:
  """`jax.nn.dot_product_attention` of float[B, T, N, H] queries and float[B, S, K, H] keys and values under `mask`
  -> float[B, T, N, H]: through XLA, or with implementation "cudnn" cuDNN's kernel (on a GPU, `cudnn_fits`)."""
  return jax.nn.dot_product_attention(query, key, value, mask=mask.mask, scale=scale, is_causal=mask.is_causal,
                                      key_value_seq_lengths=mask.key_lengths, implementation=implementation)


def cudnn_fits(query: jax.Array, key: jax.Array) -> bool:
  """Whether cuDNN's flash attention takes these queries and keys: bfloat16 or float16 (one dtype for both), a head
  dim that is a multiple of 8 and at most CUDNN_MAX_HEAD_DIM. A float32 model computes through XLA."""
  head_dim = query.shape[-1]
  return (query.dtype == key.dtype and any(query.dtype == dtype for dtype in CUDNN_DTYPES) and head_dim % 8 == 0
          and head_dim <= CUDNN_MAX_HEAD_DIM)


def splash_fits(query: jax.Array, key: jax.Array, mask: KernelMask) -> bool:
  """Whether splash attention takes them: query and key lengths and the head dim multiples of SPLASH_BLOCK, and a
  mask of flags and lengths only (a materialized one goes through XLA)."""
  return (mask.mask is None and query.shape[1] % SPLASH_BLOCK == 0 and key.shape[1] % SPLASH_BLOCK == 0
          and query.shape[-1] % SPLASH_BLOCK == 0)


def splash_attention(query: jax.Array, key: jax.Array, value: jax.Array, mask: KernelMask, scale: float,
                     interpret: bool = False) -> jax.Array:
  """Pallas splash attention (`splash_fits`), float[B, T, N, H] queries and float[B, S, K, H] keys and values ->
  float[B, T, N, H]: one multi-query kernel per key/value head over its N/K query heads, mapped over the batch and
  the key/value heads. Padding is a segment of its own that only the keys are in, so a padded query row sees the
  row's real keys, as under XLA. interpret: Pallas's interpreter instead of a TPU (for tests on a CPU)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

  batch, length, num_heads, head_dim = query.shape
  key_length, num_kv_heads = key.shape[1], key.shape[2]
  group = num_heads // num_kv_heads
  one_head = masks.CausalMask((length, key_length)) if mask.is_causal else masks.FullMask((length, key_length))
  block = splash.BlockSizes.get_default()
  kernel = splash.make_splash_mqa_single_device(masks.MultiHeadMask([one_head] * group), block_sizes=block,
                                                interpret=interpret)
  grouped = (query * jnp.asarray(scale, query.dtype)).reshape(batch, length, num_kv_heads, group, head_dim)
  grouped = jnp.transpose(grouped, (0, 2, 3, 1, 4))  # [B, K, G, T, H]
  key, value = (jnp.transpose(x, (0, 2, 1, 3)) for x in (key, value))  # [B, K, S, H]
  lengths = jnp.full((batch,), key_length, jnp.int32) if mask.key_lengths is None else mask.key_lengths
  segments = splash.SegmentIds(q=jnp.ones((batch, length), jnp.int32),
                               kv=(jnp.arange(key_length)[None, :] < lengths[:, None]).astype(jnp.int32))
  per_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))  # over K
  out = jax.vmap(per_head, in_axes=(0, 0, 0, splash.SegmentIds(q=0, kv=0)))(grouped, key, value, segments)
  return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(batch, length, num_heads, head_dim)  # [B, T, N, H]


def attention(query: jax.Array, key: jax.Array, value: jax.Array, mask: KernelMask, scale: float) -> jax.Array:
  """softmax(scale · q kᵀ, masked) v, float[B, T, N, H] queries and float[B, S, K, H] keys and values, through the
  fused kernel of JAX's backend where it fits, else XLA's path."""
  backend = jax.default_backend()
  if backend == "gpu" and cudnn_fits(query, key):
    return jax_attention(query, key, value, mask, scale, implementation="cudnn")
  if backend == "tpu" and splash_fits(query, key, mask):
    return splash_attention(query, key, value, mask, scale)
  return jax_attention(query, key, value, mask, scale)
