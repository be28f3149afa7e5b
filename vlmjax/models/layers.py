"""Building blocks shared by the vision encoder, the decoder and the CLIP towers.

Shapes use one letter per axis, the same in einsum strings and docstrings:
  B batch, T query length, S key/value length, D model width, N query heads,
  K key/value heads, H head dim, F MLP hidden width.

Every parameter is created with `nn.with_logical_partitioning` and large activations are constrained with
`nn.with_logical_constraint`; `vlmjax.parallel.mesh` maps the logical names below onto mesh axes.
"""

from typing import Any, Callable, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vlmjax import runtime
from vlmjax.models import activation as activation_lib, blockwise_attention, dot_attention, fused_attention
from vlmjax.models import kv_cache as kv_cache_lib
from vlmjax.models import lora as lora_lib, matmul, paged_cache, quant, trig

# Logical axis names. Weights use bare names; activations `activation_*`; the KV cache `cache_*`.
EMBED = "embed"
MLP = "mlp"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
VOCAB = "vocab"
LAYERS = "layers"  # the decoder's stacked layers (split into pipeline stages)
ENCODER_LAYERS = "encoder_layers"  # the ViT's and CLIP text tower's (not pipelined: whole on every stage)
ACT_BATCH = "activation_batch"
ACT_LENGTH = "activation_length"
ACT_EMBED = "activation_embed"
ACT_HEADS = "activation_heads"
ACT_KV_HEADS = "activation_kv_heads"
ACT_MLP = "activation_mlp"
ACT_VOCAB = "activation_vocab"
CACHE_BATCH = "cache_batch"
CACHE_LENGTH = "cache_length"
CACHE_KV_HEADS = "cache_kv_heads"

# The submodule name of a stack of layers: `nn.scan` stacks them as one `layers` module, unrolled layers are
# `layers_0`, `layers_1`, ... (Flax's names for a list of submodules).
LAYER_STACK = "layers"

Dtype = jnp.dtype


def param_init(initializer: Callable, axes: tuple[str | None, ...]) -> Callable:
  """An initializer whose parameter carries the logical axis names `axes`."""
  return nn.with_logical_partitioning(initializer, axes)


def kernel_param(module: nn.Module, name: str, init: Callable, shape: tuple[int, ...], param_dtype) -> Any:
  """`module.param(name, init, shape, param_dtype)`, or the `quant.QuantizedKernel` the parameters hold under that
  name (`vlmjax.infer.quantize`), which `matmul.contract` multiplies by (Flax's shape check would refuse it)."""
  if module.has_variable("params", name):
    value = module.get_variable("params", name)
    if isinstance(value, quant.QuantizedKernel):
      return value
  return module.param(name, init, shape, param_dtype)


class RMSNorm(nn.Module):
  """RMS normalization over the last axis, computed in float32.

  Llama form: `w * x / rms(x)` with w initialised to 1. Gemma form (`unit_offset=True`): `(1 + w) * x / rms(x)`
  with w initialised to 0, as Gemma checkpoints store it.
  """

  eps: float = 1e-6
  unit_offset: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.zeros if self.unit_offset else nn.initializers.ones
    scale = self.param("scale", param_init(init, (EMBED,)), (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    scale = scale.astype(jnp.float32)
    if self.unit_offset:
      scale = 1.0 + scale
    return (normed * scale).astype(self.dtype)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis (float32 statistics), with scale and bias."""

  eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    scale = self.param("scale", param_init(nn.initializers.ones, (EMBED,)), (width,), self.param_dtype)
    bias = self.param("bias", param_init(nn.initializers.zeros, (EMBED,)), (width,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    normed = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def rope_sincos(angles: jax.Array | np.ndarray) -> tuple[jax.Array | np.ndarray, jax.Array | np.ndarray]:
  """(sin, cos) of float32 RoPE angles: a numpy array's exactly (constants of the program), a jax array's with
  `jnp.sin` and `jnp.cos`, or on the CPU `trig.sincos` (float32 accuracy up to 2**17, which XLA's CPU backend
  vectorizes)."""
  if isinstance(angles, np.ndarray):
    return tuple(np.asarray(part(angles.astype(np.float64)), np.float32) for part in (np.sin, np.cos))
  return trig.sincos(angles) if runtime.cpu_tuned() else (jnp.sin(angles), jnp.cos(angles))


def rotate(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
  """The "rotate half" rotation of x float[..., T, N, H] by angles whose sines and cosines are float32[..., T, H/2]:
  pair (j, j + H/2) turns by angle j. Returns x's dtype."""
  sin, cos = sin[..., None, :], cos[..., None, :]  # [..., T, 1, H/2]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array | np.ndarray, theta: float,
               mrope_section: tuple[int, ...] = ()) -> jax.Array:
  """Rotary position embedding in the "rotate half" layout of Llama and Gemma checkpoints.

  Args:
    x: float[B, T, N, H], H even.
    positions: int[B, T] (or [1, T], the same for every row), the position of each token (passed in, so padded
      and packed rows work). A jax array: the sines and cosines are computed in the program (`rope_sincos`). A
      numpy array, known when tracing (`VLM`'s default 0..T-1): they are computed here and enter the program as
      constants. XLA fuses a computed sine and cosine into every rotation that reads them, so that they are
      evaluated per element of the queries and keys, forward and backward; as constants the shapes_tiny bench
      step (tools/bench_train.py) took 95.2 ms against 99.0 ms (in-process A/B, both orders).
      Or int[3, B, T] for M-RoPE (Qwen2-VL): temporal, height and width positions, the H/2 frequencies split in
      `mrope_section` consecutive runs, run i turned by component i (transformers' `mrope_section`).
    theta: the RoPE base frequency.
    mrope_section: the runs of frequencies, summing to H/2; needed with 3-D positions only.
  Returns:
    float[B, T, N, H] in x's dtype.
  """
  head_dim = x.shape[-1]
  assert head_dim % 2 == 0, f"RoPE needs an even head dim, got {head_dim}"
  inv_freq = (1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)).astype(np.float32)  # [H/2]
  xp = np if isinstance(positions, np.ndarray) else jnp
  angles = positions[..., None].astype(xp.float32) * inv_freq  # [B, T, H/2] or [3, B, T, H/2]
  if positions.ndim == 3:
    assert sum(mrope_section) == head_dim // 2, f"mrope_section {mrope_section} must sum to {head_dim // 2}"
    bounds = np.cumsum((0,) + tuple(mrope_section))
    angles = xp.concatenate([angles[i % 3, ..., start:end] for i, (start, end) in enumerate(zip(bounds, bounds[1:]))],
                            axis=-1)  # [B, T, H/2]
  return rotate(x, *rope_sincos(angles))


def make_attention_mask(
    q_index: jax.Array,
    kv_index: jax.Array,
    *,
    causal: bool = True,
    kv_valid: jax.Array | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    prefix_lengths: jax.Array | None = None,
) -> jax.Array:
  """The one mask builder: causal, prefix-LM, padding and packed segments.

  Indices are slots in the sequence (cache slots when decoding), so a query at slot i may see a key at
  slot j <= i (causal); prefix-LM additionally lets every query see keys in the row's prefix (j < prefix
  length), which makes attention bidirectional over image + prompt and causal after it (PaliGemma).

  Args:
    q_index: int[B, T] slot of each query token.
    kv_index: int[B, S] slot of each key token.
    causal: whether a query may only see keys at or before its slot.
    kv_valid: bool[B, S], False for padding or unwritten cache slots.
    q_segment_ids, kv_segment_ids: int[B, T], int[B, S]; tokens only see keys of their own segment.
    prefix_lengths: int[B], length of the bidirectional prefix of each row.
  Returns:
    bool[B, 1, T, S], True where attention is allowed (broadcasts over heads).
  """
  q = q_index[:, :, None]
  k = kv_index[:, None, :]
  if causal:
    allowed = k <= q
    if prefix_lengths is not None:
      allowed = allowed | (k < prefix_lengths[:, None, None])
  else:
    allowed = jnp.ones(jnp.broadcast_shapes(q.shape, k.shape), dtype=bool)
  if kv_valid is not None:
    allowed = allowed & kv_valid[:, None, :]
  if q_segment_ids is not None or kv_segment_ids is not None:
    assert q_segment_ids is not None and kv_segment_ids is not None, "pass segment ids for queries and keys"
    allowed = allowed & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
  return allowed[:, None, :, :]


# Query rows per attention block when a causal mask lets a query see no key past its own slot (`CausalMask`):
# block i attends only to the keys up to its last query, so a long prefill skips the scores above the diagonal
# (60% of the work at 5 blocks) and never holds the whole [T, T] score matrix. 128 rather than 256: a training
# step of 224 tokens then computes 76% of the scores in two blocks, and the bench step (tools/bench_train.py) took
# 94.5-100.1 ms against 100.0-104.2 ms (in-process A/Bs, 22 alternating steps each, twice in each order), its
# attention 23.5 against 25.3 ms per device (per-op minima over 10 profiled steps). On the CPU only
# (`runtime.cpu_tuned`): a GPU or TPU gets the whole mask in one fused kernel (`fused_attention`).
CAUSAL_BLOCK = 128


@flax.struct.dataclass
class CausalMask:
  """A mask (bool[B, 1, T, S], as `make_attention_mask` gives it) under which query t sits at key slot t and sees
  no key past it: causal attention from slot 0, as in training or a prefill into an empty cache, without a
  bidirectional prefix. `Attention` then skips the key blocks above the diagonal. key_lengths (int[B]), set only
  where the mask is exactly that ∧ key slot < key_lengths[b] (right-padded rows of one segment each), lets a fused
  kernel take lengths instead of the mask (`fused_attention.kernel_mask`)."""

  mask: jax.Array
  key_lengths: jax.Array | None = None


def _kernel_mask(mask: jax.Array | CausalMask | None) -> fused_attention.KernelMask:
  """An `Attention` mask in the fused kernels' form."""
  if isinstance(mask, CausalMask):
    return fused_attention.kernel_mask(mask.mask, causal=True, key_lengths=mask.key_lengths)
  return fused_attention.kernel_mask(mask)


def _jax_attention(query, key, value, mask, scale: float) -> jax.Array:
  return jax.nn.dot_product_attention(query, key, value, mask=mask, scale=scale)


def _received(query, key, mask, scale: float, rank_index) -> jax.Array:
  """float32[B, S]: the softmax of row b's query at rank_index[b] over the keys, mean over its heads. query
  float[B, T, N, H], key float[B, S, K, H] (N a multiple of K), mask bool[B, 1, T, S]."""
  batch, _, num_heads, head_dim = query.shape
  num_kv_heads = key.shape[2]
  one = jnp.take_along_axis(query, rank_index[:, None, None, None], axis=1)[:, 0]  # [B, N, H]
  one = one.reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
  scores = jnp.einsum("bkgh,bskh->bkgs", one, key, preferred_element_type=jnp.float32) * scale
  row_mask = jnp.take_along_axis(mask[:, 0], rank_index[:, None, None], axis=1)[:, 0]  # [B, S]
  scores = jnp.where(row_mask[:, None, None], scores, -jnp.inf)
  return jnp.mean(jax.nn.softmax(scores, axis=-1), axis=(1, 2))


def _attend(query, key, value, mask, scale: float, attention: Callable) -> jax.Array:
  """`attention` (dot_attention.dot_product_attention's arguments) over float[B, T, N, H] queries and float[B, S,
  K, H] keys/values; a CausalMask is computed in blocks of CAUSAL_BLOCK queries, each over the keys up to its last
  query."""
  if not isinstance(mask, CausalMask) or query.shape[1] <= CAUSAL_BLOCK:
    mask = mask.mask if isinstance(mask, CausalMask) else mask
    return attention(query, key, value, mask, scale)
  blocks = []
  for start in range(0, query.shape[1], CAUSAL_BLOCK):
    end = min(start + CAUSAL_BLOCK, query.shape[1])
    blocks.append(attention(query[:, start:end], key[:, :end], value[:, :end], mask.mask[:, :, start:end, :end],
                            scale))
  return jnp.concatenate(blocks, axis=1)


class Projection(nn.Module):
  """A linear map over a kernel of the given shape (+ a bias over its output axes): the input's last `fan_in` axes
  contracted with the kernel's first `fan_in` (`matmul.contract`), e.g. [B, T, D] x [D, N, H] -> [B, T, N, H].

  Used for the attention projections, whose kernels keep their head axes ([D, N, H], [N, H, D]) so each axis
  carries its own logical name (`nn.DenseGeneral` would create them flattened and reshape, which breaks
  logical-axis constraints), and for the MLPs, the projector and the classifier's head (the parameters of an
  `nn.Dense`: the same names, shapes and initial values). The bias is added by `matmul.add_bias`. With a `lora`
  config whose targets match the module's path, a low-rank adapter's term is added (`vlmjax.models.lora`).
  """

  kernel_shape: tuple[int, ...]
  kernel_axes: tuple[str | None, ...]
  fan_in: int  # how many of the kernel's leading axes are its inputs (contracted with the input's last)
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  lora: lora_lib.LoraConfig | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    out_axes = tuple(range(self.fan_in, len(self.kernel_shape)))
    init = nn.initializers.lecun_normal(in_axis=tuple(range(self.fan_in)), out_axis=out_axes)
    kernel = kernel_param(self, "kernel", param_init(init, self.kernel_axes), self.kernel_shape, self.param_dtype)
    x = x.astype(self.dtype)
    y = matmul.contract(x, kernel, self.fan_in)
    if self.lora is not None and self.lora.adapts(self.path):
      y = y + lora_lib.adapter_update(self, x, self.kernel_shape, self.kernel_axes, self.fan_in, self.lora,
                                      self.param_dtype)
    if self.use_bias:
      bias_shape = tuple(self.kernel_shape[i] for i in out_axes)
      bias = self.param("bias", param_init(nn.initializers.zeros, tuple(self.kernel_axes[i] for i in out_axes)),
                        bias_shape, self.param_dtype)
      y = matmul.add_bias(y, bias)
    return y


class Attention(nn.Module):
  """Multi-head attention with MHA, GQA (num_kv_heads < num_heads) and MQA (num_kv_heads = 1).

  The softmax goes through `jax.nn.dot_product_attention`, or on the CPU without a cache (`runtime.cpu_tuned`)
  through `dot_attention.dot_product_attention` (grouped heads natively; every matmul in the compute dtype with
  float32 accumulation, forward and backward), causal masks in blocks of CAUSAL_BLOCK queries. Elsewhere training
  and prefill attention go through the backend's fused kernel (`fused_attention.attention`: cuDNN, splash).
  With a layer of KV cache (`kv_cache`: keys and values float[B, K, H, S]) the new keys and values are written at
  `write_index` of each row and attention runs over the whole cache.
  """

  num_heads: int
  num_kv_heads: int
  head_dim: int
  use_bias: bool = False
  qkv_bias: bool = False  # biases on the query, key and value projections only (Qwen2)
  rope_theta: float | None = None  # None: no rotary embedding (the ViT)
  mrope_section: tuple[int, ...] = ()  # M-RoPE's frequency runs, for int[3, B, T] positions (`apply_rope`)
  query_scale: float | None = None  # None: 1/sqrt(head_dim)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  lora: lora_lib.LoraConfig | None = None  # adapters on the projections its targets name

  def _project(self, name: str, x: jax.Array, heads: int, heads_axis: str) -> jax.Array:
    return Projection((x.shape[-1], heads, self.head_dim), (EMBED, heads_axis, HEAD_DIM),
                      fan_in=1, use_bias=self.use_bias or self.qkv_bias, dtype=self.dtype,
                      param_dtype=self.param_dtype, lora=self.lora, name=name)(x)

  @nn.compact
  def __call__(
      self,
      x: jax.Array,
      mask: jax.Array | None,
      positions: jax.Array | None = None,
      kv_cache: tuple[jax.Array, jax.Array] | paged_cache.PagedLayer | None = None,
      write_index: jax.Array | None = None,
      rank_index: jax.Array | None = None,
  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | paged_cache.PagedLayer | None]:
    """Args:
      x: float[B, T, D].
      mask: bool[B, 1, T, S] from `make_attention_mask` (S = T without a cache, the cache length with one),
        a `CausalMask` around one (long causal sequences from slot 0 attend block by block), or None for full
        attention.
      positions: int[B, T] RoPE positions (required when rope_theta is set), or int[3, B, T] with mrope_section.
      kv_cache: (k, v), each float[B, K, H, S]: this layer's cache. Only the T new slots of each row are written
        (a scatter the decode loop does in place), and attention reads the buffer as it is, so a decode step
        costs the new tokens and one read of the cache, not a copy of it. Slots last is the layout the two
        attention matmuls read directly on the CPU (XLA copies a [B, S, K, H] cache into it every step).
        Or a paged_cache.PagedLayer: the new keys and values go into the rows' pages, and attention reads the pages
        gathered through the page table, or, for one new token per row (a decode step) on a layer with a
        kernel, the Pallas paged-attention kernel reads them in place.
      write_index: int[B], the cache slot where row b's first new token goes.
      rank_index: int[B] or None: also return the attention of row b's query at that index over the keys, mean
        over heads (FastV's ranking, `models/fastv.py`).
    Returns:
      (float[B, T, D], the updated (k, v) cache or None), and with rank_index that attention float32[B, S].
    """
    query = self._project("query", x, self.num_heads, HEADS)  # [B, T, N, H]
    key = self._project("key", x, self.num_kv_heads, KV_HEADS)  # [B, T, K, H]
    value = self._project("value", x, self.num_kv_heads, KV_HEADS)
    if self.rope_theta is not None:
      query = apply_rope(query, positions, self.rope_theta, self.mrope_section)
      key = apply_rope(key, positions, self.rope_theta, self.mrope_section)
    query = nn.with_logical_constraint(query, (ACT_BATCH, ACT_LENGTH, ACT_HEADS, None))
    key = nn.with_logical_constraint(key, (ACT_BATCH, ACT_LENGTH, ACT_KV_HEADS, None))
    value = nn.with_logical_constraint(value, (ACT_BATCH, ACT_LENGTH, ACT_KV_HEADS, None))

    scale = self.query_scale if self.query_scale is not None else self.head_dim**-0.5
    if isinstance(kv_cache, paged_cache.PagedLayer) and kv_cache.kernel and not kv_cache.quantized and x.shape[1] == 1:
      # A decode step through the platform's paged-attention kernel: one new token per row, attending to every key
      # its row holds (the causal and prefix-LM masks allow all of them). An INT8 pool is read by the gather below.
      kv_cache = kv_cache.write(key, value, write_index)
      out = kv_cache.decode_attention(query * scale, write_index + 1)
      return self._output(out, x.shape[-1]), kv_cache
    if isinstance(kv_cache, paged_cache.PagedLayer):
      kv_cache, (key, value) = kv_cache.write_and_read(key, value, write_index)  # [B, S, K, H]
    elif kv_cache is not None:
      k_cache, v_cache = kv_cache
      rows = jnp.arange(x.shape[0])[:, None]  # [B, 1]
      slots = write_index[:, None] + jnp.arange(x.shape[1])[None, :]  # [B, T]
      if isinstance(k_cache, kv_cache_lib.Int8Buffer):  # int8 values [B, K, H, S] with scales [B, K, S]
        def put(buffer, new):  # new [B, T, K, H] -> int8 [B, T, K, H] and scales [B, T, K], as below
          values, scales = kv_cache_lib.quantize_heads(new)
          return buffer.replace(values=buffer.values.at[rows, :, :, slots].set(values, mode="drop"),
                                scales=buffer.scales.at[rows, :, slots].set(scales, mode="drop"))
        kv_cache = (put(k_cache, key), put(v_cache, value))
        key, value = (jnp.transpose(c.dequantized(self.dtype), (0, 3, 1, 2)) for c in kv_cache)  # [B, S, K, H]
      else:
        # [rows, :, :, slots] of a [B, K, H, S] cache selects [B, T, K, H]: the new keys and values as projected.
        k_cache = k_cache.at[rows, :, :, slots].set(key.astype(k_cache.dtype), mode="drop")
        v_cache = v_cache.at[rows, :, :, slots].set(value.astype(v_cache.dtype), mode="drop")
        cache_axes = (CACHE_BATCH, CACHE_KV_HEADS, None, CACHE_LENGTH)
        kv_cache = tuple(nn.with_logical_constraint(c, cache_axes) for c in (k_cache, v_cache))
        key, value = (jnp.transpose(c, (0, 3, 1, 2)) for c in kv_cache)  # [B, S, K, H], folded into the matmuls

    # On the CPU without a cache (training, a forward over whole sequences): `dot_attention`, every matmul in the
    # compute dtype, causal masks in blocks. A cache's [B, K, H, S] slots, transposed into those matmuls, leave
    # XLA's CPU backend bfloat16 matmuls with float32 results in forms only YNNPACK would run and it does not take
    # ("Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32", jax 0.10.2). A prefill into a cache
    # from slot 0 longer than one of its blocks goes through `blockwise_attention` (its scores never leave the
    # cache; the key blocks above the diagonal and past every row's length are skipped); with a cache otherwise,
    # and on other backends, training and prefill through the backend's fused kernel, a decode step or a chunk
    # after a cached prefix through XLA over the cache's mask.
    key, value = key.astype(self.dtype), value.astype(self.dtype)
    if (runtime.cpu_tuned() and kv_cache is not None and isinstance(mask, CausalMask) and mask.key_lengths is not None
        and query.shape[1] > blockwise_attention.CAUSAL_BLOCK):
      out = blockwise_attention.attention(query, key, value, scale, causal=True, key_lengths=mask.key_lengths)
    elif runtime.cpu_tuned():
      attention = dot_attention.dot_product_attention if kv_cache is None else _jax_attention
      out = _attend(query, key, value, mask, scale, attention)  # [B, T, N, H]
    elif kv_cache is None or isinstance(mask, CausalMask):
      out = fused_attention.attention(query, key, value, _kernel_mask(mask), scale)
    else:
      out = _jax_attention(query, key, value, mask, scale)
    if rank_index is not None:
      received = _received(query, key, mask.mask if isinstance(mask, CausalMask) else mask, scale, rank_index)
      return self._output(out, x.shape[-1]), kv_cache, received
    return self._output(out, x.shape[-1]), kv_cache

  def _output(self, out: jax.Array, width: int) -> jax.Array:
    """The heads' outputs float[B, T, N, H] -> float[B, T, D] through the output projection."""
    out = nn.with_logical_constraint(out, (ACT_BATCH, ACT_LENGTH, ACT_HEADS, None))
    return Projection((self.num_heads, self.head_dim, width), (HEADS, HEAD_DIM, EMBED),
                      fan_in=2, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                      lora=self.lora, name="out")(out)  # [B, T, D]


class FeedForward(nn.Module):
  """Feed-forward block. Gated (`gated=True`: act(x W_gate) * (x W_up) W_down — SwiGLU with silu, GeGLU with
  gelu_tanh) or plain (act(x W_up + b) W_down + b — GELU / quick-GELU as in ViTs)."""

  hidden_dim: int
  activation: str = "silu"
  gated: bool = True
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  lora: lora_lib.LoraConfig | None = None  # adapters on the layers its targets name

  def _dense(self, name: str, features: int, axes: tuple[str, str], x: jax.Array) -> jax.Array:
    return Projection((x.shape[-1], features), axes, fan_in=1, use_bias=self.use_bias, dtype=self.dtype,
                      param_dtype=self.param_dtype, lora=self.lora, name=name)(x)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: float[B, T, D] -> float[B, T, D]."""
    if self.activation not in activation_lib.ACTIVATIONS:
      raise ValueError(f"unknown MLP activation {self.activation!r}; "
                       f"choose one of {sorted(activation_lib.ACTIVATIONS)}")
    first = self._dense("up" if not self.gated else "gate", self.hidden_dim, (EMBED, MLP), x)
    up = self._dense("up", self.hidden_dim, (EMBED, MLP), x) if self.gated else None
    hidden = activation_lib.activate(self.activation, first, up)
    hidden = nn.with_logical_constraint(hidden, (ACT_BATCH, ACT_LENGTH, ACT_MLP))  # [B, T, F]
    return self._dense("down", x.shape[-1], (MLP, EMBED), hidden)


def remat_policy(name: str):
  """A `jax.checkpoint` policy by name: 'none' (no remat: save everything), 'full' (save nothing), or any
  policy in `jax.checkpoint_policies` such as 'dots_with_no_batch_dims_saveable'. Returns None for 'none'."""
  if name == "none":
    return None
  if name == "full":
    return jax.checkpoint_policies.nothing_saveable
  policy = getattr(jax.checkpoint_policies, name, None)
  if policy is None:
    raise ValueError(f"unknown remat policy {name!r}: use 'none', 'full' or a name in jax.checkpoint_policies")
  return policy


def maybe_remat(block: type[nn.Module], policy_name: str, scanned: bool) -> type[nn.Module]:
  """Wraps a layer class in `nn.remat` with the named policy (no wrapping for 'none'). Under `nn.scan` the
  common-subexpression guard is unnecessary and costs speed, so it is dropped there."""
  policy = remat_policy(policy_name)
  if policy is None:
    return block
  return nn.remat(block, policy=policy, prevent_cse=not scanned)


def unstack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
  """Scanned parameters -> unrolled ones: every `layers` subtree (an `nn.scan` stack, leaves [L, ...]) becomes
  `layers_0` ... `layers_{L-1}`, the names of the same modules built with `scan_layers=False`. Copies each
  layer out of the stack once, so that a decode loop reads the weights in place instead of slicing per step."""
  unrolled = {}
  for name, value in params.items():
    if name == LAYER_STACK:
      depth = jax.tree.leaves(value)[0].shape[0]
      unrolled.update({f"{LAYER_STACK}_{i}": jax.tree.map(lambda p, i=i: p[i], value) for i in range(depth)})
    else:
      unrolled[name] = unstack_layers(value) if isinstance(value, Mapping) else value
  return unrolled


def stack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
  """The inverse of `unstack_layers`: `layers_0` ... `layers_{L-1}` -> one `layers` stack, leaves [L, ...]."""
  stacked, unrolled = {}, {}
  for name, value in params.items():
    prefix, _, index = name.rpartition("_")
    if prefix == LAYER_STACK and index.isdigit():
      unrolled[int(index)] = value
    else:
      stacked[name] = stack_layers(value) if isinstance(value, Mapping) else value
  if unrolled:
    assert sorted(unrolled) == list(range(len(unrolled))), f"layers are missing: got {sorted(unrolled)}"
    stacked[LAYER_STACK] = jax.tree.map(lambda *per_layer: jnp.stack(per_layer), *[unrolled[i] for i in
                                                                                     range(len(unrolled))])
  return stacked
