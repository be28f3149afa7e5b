"""Decoder-only language model of the Llama and Gemma families, with an explicit KV cache.

    logits, cache = decoder.apply(params, tokens, positions, cache)

Llama: RMSNorm `w·x̂`, SwiGLU, separate output head. Gemma: RMSNorm `(1+w)·x̂`, tanh-GELU GeGLU, embeddings scaled
by sqrt(width), tied output head, optional final-logit soft-capping. `configs/sizes.py` holds both as presets;
here every switch is an explicit field. Layers are stacked with `nn.scan` for training (fast compiles), or
unrolled (`scan_layers=False`, parameters from `layers.unstack_layers`) for decoding, where each layer reads
its weights and its own KV-cache buffer in place. In training on a mesh with a `pipeline` axis (`pipeline_stages` > 1)
the scanned stack runs as stages over microbatches (`vlmjax.parallel.pipeline`), the same parameters either way.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlmjax.models.kv_cache import KV_CACHE_DTYPES, KVCache
from vlmjax.models import activation as activation_lib, fastv, layers, lora as lora_lib, matmul, quant
from vlmjax.models.config import ModelConfig, check_choice, check_divides, check_positive, dtype
from vlmjax.parallel import pipeline


@dataclasses.dataclass(frozen=True)
class DecoderConfig(ModelConfig):
  vocab_size: int = 32000
  width: int = 4096
  depth: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32
  head_dim: int = 0  # 0: width // num_heads
  mlp_dim: int = 11008
  activation: str = "silu"
  rope_theta: float = 10000.0
  # Qwen2-VL's M-RoPE: the head's H/2 frequencies in runs turned by the temporal, height and width positions
  # (positions int[3, B, T]; `layers.apply_rope`). (): plain RoPE, positions int[B, T].
  mrope_section: tuple[int, ...] = ()
  qkv_bias: bool = False  # Qwen2: biases on the query, key and value projections
  norm_eps: float = 1e-6
  norm_unit_offset: bool = False  # Gemma's (1 + w) RMSNorm
  scale_embeddings: bool = False  # Gemma multiplies embeddings by sqrt(width)
  tie_embeddings: bool = False
  final_logit_softcap: float | None = None
  dtype: str = "float32"
  param_dtype: str = "float32"
  kv_cache_dtype: str = ""  # "": the compute dtype; "int8": int8 keys and values, a scale per token and head
  scan_layers: bool = True
  remat_policy: str = "none"
  # Low-rank adapters on the linear layers its targets name (the `lora` training stage sets it; `vlmjax.load` merges
  # them into the kernels).
  lora: lora_lib.LoraConfig | None = None
  # The training step's pipeline (the trainer sets them from mesh.pipeline and train.microbatches): the scanned layers
  # as this many stages over this many microbatches of the batch. Initialization and decoding run the plain stack.
  pipeline_stages: int = 1
  pipeline_microbatches: int = 1

  def __post_init__(self):
    where = "decoder"
    check_positive(self, where, "vocab_size", "width", "depth", "num_heads", "num_kv_heads", "mlp_dim")
    if self.head_dim == 0:
      check_divides(self.num_heads, self.width, f"{where}.width={self.width} must split evenly into "
                    f"{where}.num_heads={self.num_heads} heads (or set {where}.head_dim)")
    check_divides(self.num_kv_heads, self.num_heads, f"{where}.num_heads={self.num_heads} must be a multiple of "
                  f"{where}.num_kv_heads={self.num_kv_heads} (grouped-query attention)")
    check_divides(2, self.attention_head_dim, f"{where}.head_dim={self.attention_head_dim} must be even for RoPE")
    check_choice(self.activation, tuple(activation_lib.ACTIVATIONS), f"{where}.activation")
    object.__setattr__(self, "mrope_section", tuple(int(n) for n in self.mrope_section))
    if self.mrope_section and (len(self.mrope_section) != 3 or sum(self.mrope_section) != self.attention_head_dim // 2):
      raise ValueError(f"{where}.mrope_section={list(self.mrope_section)} must be 3 runs (temporal, height, width) "
                       f"summing to half the head size, {self.attention_head_dim // 2}")
    check_choice(self.kv_cache_dtype, ("",) + KV_CACHE_DTYPES, f"{where}.kv_cache_dtype")
    check_positive(self, where, "pipeline_stages", "pipeline_microbatches")
    if self.pipeline_stages > 1:
      if not self.scan_layers:
        raise ValueError(f"{where}: {self.pipeline_stages} pipeline stages split the scanned layers; set scan_layers")
      check_divides(self.pipeline_stages, self.depth, f"{where}.depth={self.depth} layers must split into "
                    f"{self.pipeline_stages} pipeline stages")

  @property
  def attention_head_dim(self) -> int:
    return self.head_dim or self.width // self.num_heads

  @property
  def cache_dtype(self) -> jnp.dtype:
    """The KV cache's dtype: int8 (`kv_cache.Int8Buffer`) or the compute dtype."""
    return dtype(self.kv_cache_dtype or self.dtype)

  def init_cache(self, batch_size: int, max_len: int) -> KVCache:
    """An empty cache for `batch_size` rows of up to `max_len` tokens, in `cache_dtype`."""
    return KVCache.zeros(num_layers=self.depth, batch_size=batch_size, max_len=max_len,
                         num_kv_heads=self.num_kv_heads, head_dim=self.attention_head_dim,
                         dtype=self.cache_dtype)


class DecoderBlock(nn.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)); reads and writes its layer of the KV cache."""

  config: DecoderConfig

  @nn.compact
  def __call__(self, x, layer_cache, positions, mask, write_index, rank_index=None):
    """x: float[B, T, D]; layer_cache: this layer's (k, v), each float[B, K, H, S], a paged_cache.PagedLayer, or None
    -> (float[B, T, D], the updated layer cache or None), and with rank_index int[B] the attention of row b's query
    there over the keys, float32[B, S] (FastV's ranking). Under `nn.scan`, x is the carry and the layers' caches are
    scanned over."""
    cfg = self.config
    compute_dtype, param_dtype = dtype(cfg.dtype), dtype(cfg.param_dtype)
    norm = lambda name: layers.RMSNorm(eps=cfg.norm_eps, unit_offset=cfg.norm_unit_offset, dtype=compute_dtype,
                                       param_dtype=param_dtype, name=name)
    attended, layer_cache, *received = layers.Attention(
        num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.attention_head_dim,
        qkv_bias=cfg.qkv_bias, rope_theta=cfg.rope_theta, mrope_section=cfg.mrope_section, dtype=compute_dtype,
        param_dtype=param_dtype, lora=cfg.lora, name="attention",
    )(norm("attention_norm")(x), mask, positions, layer_cache, write_index, rank_index)
    x = x + attended
    x = x + layers.FeedForward(cfg.mlp_dim, activation=cfg.activation, gated=True, dtype=compute_dtype,
                               param_dtype=param_dtype, lora=cfg.lora, name="mlp")(norm("mlp_norm")(x))
    x = nn.with_logical_constraint(x, (layers.ACT_BATCH, layers.ACT_LENGTH, layers.ACT_EMBED))
    return (x, layer_cache, *received)


class Decoder(nn.Module):
  """Tokens (or embeddings) -> logits, optionally through a KV cache."""

  config: DecoderConfig

  def setup(self):
    cfg = self.config
    param_dtype = dtype(cfg.param_dtype)
    self.embedding = layers.kernel_param(
        self, "embedding", layers.param_init(nn.initializers.normal(0.02), (layers.VOCAB, layers.EMBED)),
        (cfg.vocab_size, cfg.width), param_dtype)
    if cfg.scan_layers:
      self.layers = _layer_stack(cfg, cfg.depth)(cfg)
    else:
      block = layers.maybe_remat(DecoderBlock, cfg.remat_policy, scanned=False)
      self.layers = [block(cfg) for _ in range(cfg.depth)]
    self.final_norm = layers.RMSNorm(eps=cfg.norm_eps, unit_offset=cfg.norm_unit_offset,
                                     dtype=dtype(cfg.dtype), param_dtype=param_dtype)
    if not cfg.tie_embeddings:
      self.output_head = layers.kernel_param(
          self, "output_head", layers.param_init(nn.initializers.lecun_normal(), (layers.EMBED, layers.VOCAB)),
          (cfg.width, cfg.vocab_size), param_dtype)

  def embed(self, tokens: jax.Array) -> jax.Array:
    """int[B, T] -> float[B, T, D] token embeddings (times sqrt(D) for Gemma), in the compute dtype."""
    cfg = self.config
    if isinstance(self.embedding, quant.QuantizedKernel):  # only the looked-up rows are dequantized
      embedded = quant.embedding_rows(self.embedding, tokens, dtype(cfg.dtype))
    else:
      embedded = jnp.take(self.embedding, tokens, axis=0).astype(dtype(cfg.dtype))
    if cfg.scale_embeddings:
      embedded = embedded * jnp.asarray(cfg.width**0.5, dtype(cfg.dtype))
    return nn.with_logical_constraint(embedded, (layers.ACT_BATCH, layers.ACT_LENGTH, layers.ACT_EMBED))

  def __call__(
      self,
      tokens: jax.Array | None,
      positions: jax.Array,
      cache: KVCache | None = None,
      *,
      embeddings: jax.Array | None = None,
      input_mask: jax.Array | None = None,
      segment_ids: jax.Array | None = None,
      prefix_lengths: jax.Array | None = None,
      logit_positions: jax.Array | None = None,
      pruning: fastv.Pruning | None = None,
  ) -> tuple[jax.Array, KVCache | None]:
    """Runs the stack.

    Args:
      tokens: int[B, T], or None when `embeddings` is given.
      positions: int[B, T] (or [1, T]) RoPE positions, a jax or numpy array (`layers.apply_rope`); with
        mrope_section also int[3, B, T] (temporal, height, width).
      cache: a KVCache or a paged_cache.PagedKVCache; the T new tokens of row b go to slots cache.lengths[b]
        onwards, and attention covers the cache. None for a plain forward pass.
      embeddings: float[B, T, D], used instead of embedding `tokens` (a VLM splices image embeddings in).
      input_mask: bool[B, T], False for padding after each row's tokens (right padding).
      segment_ids: int[B, T], packed sequences (no cache).
      prefix_lengths: int[B], bidirectional prefix of each row (prefix-LM), counted in cache slots.
      logit_positions: int[B, K], compute logits only at these of the T positions (prefill needs just each
        row's last token; the output head is the largest matmul for long prompts).
      pruning: FastV (`models/fastv.py`, unrolled layers only): from pruning.layer on, the layers see each row's
        kept tokens only (a prefill into an empty cache, or a forward without one, drops pruning.drop tokens a
        row; decode steps read the later layers' caches at their own slots).
    Returns:
      (logits float32[B, T, V] or float32[B, K, V] with logit_positions, the updated cache or None). A forward
      without a cache and without logit_positions that drops tokens gives the kept tokens' logits, in order.
    """
    cfg = self.config
    x = self.embed(tokens) if embeddings is None else embeddings.astype(dtype(cfg.dtype))
    batch, length = x.shape[:2]
    if pruning is not None and (cfg.scan_layers or not 1 <= pruning.layer < cfg.depth):
      raise ValueError(f"FastV prunes from layer {pruning.layer} on, of unrolled layers (scan_layers=False): the "
                       f"layer must be between 1 and {cfg.depth - 1}")
    assert cache is None or segment_ids is None, "packed segments are for training; decode with one sequence per row"
    num_new = length if input_mask is None else jnp.sum(input_mask, axis=1, dtype=jnp.int32)
    write_index = None if cache is None else cache.lengths
    from_slot_0 = cache is None or (isinstance(cache, KVCache) and cache.max_len == length)
    mask = _attention_mask(batch, length, cache, write_index, num_new, input_mask, segment_ids, prefix_lengths,
                           from_slot_0)
    layer_caches = (None,) * cfg.depth if cache is None else cache.layers()  # L x (k, v) or L x PagedLayer
    drop = 0 if pruning is None else pruning.drop

    if cfg.scan_layers and cfg.pipeline_stages > 1 and cache is None and not self.is_initializing():
      x = self._pipelined(x, positions, mask)
    elif cfg.scan_layers:
      # The scan takes the caches stacked, (k, v) float[L, B, K, H, S], and returns them stacked: a copy of the
      # cache each way, which a prefill affords. Decoding runs the layers unrolled (`layers.unstack_layers`),
      # each writing and reading its own buffer in place.
      stacked = jax.tree.map(lambda *per_layer: jnp.stack(per_layer), *layer_caches)
      x, stacked = self.layers(x, stacked, positions, mask, write_index)
      layer_caches = tuple(jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(cfg.depth))
    else:
      updated = []
      for i, (block, layer_cache) in enumerate(zip(self.layers, layer_caches)):
        if pruning is not None and i == pruning.layer:  # the later layers: the kept tokens, their own slots
          if drop:
            order = fastv.kept_order(received[:, :length], pruning.image_mask, drop)
            x, positions, input_mask = fastv.gather(x, order), self._gathered(positions, order, batch, length), (
                None if input_mask is None else fastv.gather(input_mask, order))
          pruned = drop if cache is None else cache.pruned + drop
          write_index = None if cache is None else cache.lengths - cache.pruned
          mask = _attention_mask(batch, length - drop, cache, write_index, num_new - drop, input_mask, segment_ids,
                                 None if prefix_lengths is None else prefix_lengths - pruned, from_slot_0)
        if drop and i == pruning.layer - 1:
          x, layer_cache, received = block(x, layer_cache, positions, mask, write_index, pruning.rank_index)
        else:
          x, layer_cache = block(x, layer_cache, positions, mask, write_index)
        updated.append(layer_cache)
      layer_caches = tuple(updated)

    if logit_positions is not None:
      if drop:
        logit_positions = fastv.compacted(order, logit_positions)
      x = jnp.take_along_axis(x, logit_positions[:, :, None], axis=1)  # [B, K, D]
    x = self.final_norm(x)
    head = self.output_head if not cfg.tie_embeddings else self.embedding.T  # [D, V]
    if cfg.tie_embeddings and isinstance(self.embedding, quant.QuantizedKernel):
      head = self.embedding  # [V, D] quantized with rows_out: contracted over D as it is
    logits = matmul.contract(x, head, result_dtype=jnp.float32)  # [B, T, V]
    logits = nn.with_logical_constraint(logits, (layers.ACT_BATCH, layers.ACT_LENGTH, layers.ACT_VOCAB))
    if cfg.final_logit_softcap is not None:
      logits = jnp.tanh(logits / cfg.final_logit_softcap) * cfg.final_logit_softcap
    if cache is not None:
      cache = cache.with_layers(layer_caches, cache.lengths + num_new, cache.pruned + drop)
    return logits, cache

  @staticmethod
  def _gathered(positions, order: jax.Array, batch: int, length: int) -> jax.Array:
    """The kept tokens' positions: int[3, B, T] (M-RoPE) or int[B, T] / [1, T] -> [3, B, T'] or [B, T']."""
    if positions.ndim == 3:
      return fastv.gather(jnp.asarray(positions), order, axis=2)
    return fastv.gather(jnp.broadcast_to(jnp.asarray(positions), (batch, length)), order)

  def _pipelined(self, x: jax.Array, positions, mask) -> jax.Array:
    """The scanned layers over x float[B, T, D] as `pipeline_stages` stages of depth / stages layers each, over
    `pipeline_microbatches` microbatches (`pipeline.run`); the rows' masks (and positions, unless one [1, T] row
    serves all) travel with their microbatch. Each stage gets its own dropout key (the adapters')."""
    cfg = self.config
    stack = _layer_stack(cfg, cfg.depth // cfg.pipeline_stages)(cfg, parent=None)  # one stage's layers, unbound
    per_row = {"mask": mask, **({"positions": positions} if positions.shape[0] == x.shape[0] else {})}

    def stage_fn(params, x, rows, rng):
      return stack.apply({"params": params}, x, None, rows.get("positions", positions), rows["mask"], None,
                         rngs=None if rng is None else {"dropout": rng})[0]
    rng = self.make_rng("dropout") if self.has_rng("dropout") else None
    return pipeline.run(stage_fn, self.layers.variables["params"], x, per_row, stages=cfg.pipeline_stages,
                        microbatches=cfg.pipeline_microbatches,
                        axes=(layers.ACT_BATCH, layers.ACT_LENGTH, layers.ACT_EMBED), rng=rng)


def _attention_mask(batch: int, length: int, cache, write_index, num_new, input_mask, segment_ids, prefix_lengths,
                    from_slot_0: bool):
  """The mask of `length` new tokens of `batch` rows, bool[B, 1, T, S] or a `layers.CausalMask` around one:
  without a cache over themselves; with one, the new tokens at slots write_index[b] onwards, over the cache's slots
  up to write_index[b] + num_new[b]. from_slot_0: the new tokens are all a row holds, from slot 0 (training, or a
  prefill filling a contiguous cache of its length)."""
  new_index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  if cache is None:
    mask = layers.make_attention_mask(new_index, new_index, kv_valid=input_mask, q_segment_ids=segment_ids,
                                      kv_segment_ids=segment_ids, prefix_lengths=prefix_lengths)
  else:
    cache_index = jnp.broadcast_to(jnp.arange(cache.max_len, dtype=jnp.int32), (batch, cache.max_len))
    mask = layers.make_attention_mask(write_index[:, None] + new_index, cache_index,
                                      kv_valid=cache_index < (write_index + num_new)[:, None],
                                      prefix_lengths=prefix_lengths)
  # Causal from slot 0 and no bidirectional prefix: no query sees a key past its own slot, and attention may skip
  # those blocks. With a cache the keys are then exactly the slots before each row's length, which a fused kernel
  # takes instead of the mask; without one, input_mask may pad either side or segments split a row.
  if prefix_lengths is None and from_slot_0:
    return layers.CausalMask(mask, key_lengths=None if cache is None else write_index + num_new)
  return mask


def _layer_stack(cfg: DecoderConfig, depth: int) -> type[nn.Module]:
  """`depth` DecoderBlocks under `nn.scan` (parameters stacked [depth, ...] on the logical axis `layers`), the
  carry x and each layer's cache scanned over, the rest broadcast."""
  return nn.scan(layers.maybe_remat(DecoderBlock, cfg.remat_policy, scanned=True), variable_axes={"params": 0},
                 split_rngs={"params": True, "dropout": True}, in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                 length=depth, metadata_params={nn.PARTITION_NAME: layers.LAYERS})
