"""Vision Transformer (CLIP and SigLIP variants) and the pre-LayerNorm encoder stack it shares with CLIP's text
tower.

CLIP: class token, LayerNorm before the encoder, no patch-embedding bias, quick-GELU MLP.
SigLIP: no class token, no pre-LayerNorm, patch bias, tanh-GELU MLP, LayerNorm after the encoder.
`configs/sizes.py` holds both as presets; here every switch is an explicit field.

`stem="conv"` replaces the linear patch embedding by a convolutional stem (Xiao et al. 2021, "Early convolutions
help transformers see better"): 3x3 stride-2 convolutions down to the patch grid, then a 1x1 projection. Same
tokens, same grid; it learns local shape much faster from scratch. It has no Hugging Face counterpart.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlmjax.models import activation as activation_lib, layers
from vlmjax.models.config import ModelConfig, check_choice, check_divides, check_positive, dtype


@dataclasses.dataclass(frozen=True)
class ViTConfig(ModelConfig):
  image_size: int = 224
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  activation: str = "quick_gelu"
  norm_eps: float = 1e-5
  cls_token: bool = True
  pre_norm: bool = True
  post_norm: bool = True
  patch_bias: bool = False
  stem: str = "patch"  # "patch": one linear patch embedding (CLIP, SigLIP); "conv": a convolutional stem
  # How the learned position embeddings start: "normal" (std 0.02, as CLIP and SigLIP) or "sincos2d" (big_vision's
  # fixed 2-D sine-cosine table, of unit amplitude: every patch's row and column stay readable in its features).
  position_embedding_init: str = "normal"
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = True
  remat_policy: str = "none"

  def __post_init__(self):
    where = "vision"
    check_positive(self, where, "image_size", "patch_size", "width", "depth", "num_heads", "mlp_dim")
    check_divides(self.num_heads, self.width, f"{where}.width={self.width} must split evenly into "
                  f"{where}.num_heads={self.num_heads} heads")
    check_divides(self.patch_size, self.image_size, f"{where}.image_size={self.image_size} must be a multiple "
                  f"of {where}.patch_size={self.patch_size}")
    check_choice(self.activation, tuple(activation_lib.ACTIVATIONS), f"{where}.activation")
    check_choice(self.stem, ("patch", "conv"), f"{where}.stem")
    check_choice(self.position_embedding_init, tuple(POSITION_EMBEDDING_INITS), f"{where}.position_embedding_init")
    if self.position_embedding_init == "sincos2d" and self.width % 4:
      raise ValueError(f"{where}.position_embedding_init='sincos2d' splits the width in 4 (sin, cos of row and of "
                       f"column): {where}.width={self.width} must be a multiple of 4")
    if self.stem == "conv" and (self.patch_size & (self.patch_size - 1) or self.patch_size < 2):
      raise ValueError(f"{where}.stem='conv' halves the image per convolution down to the patch grid, so "
                       f"{where}.patch_size={self.patch_size} must be a power of two (2, 4, 8, 16 ...)")

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size**2


class EncoderBlock(nn.Module):
  """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x)). Biases everywhere, as CLIP and SigLIP."""

  width: int
  num_heads: int
  mlp_dim: int
  activation: str
  norm_eps: float
  return_hidden: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
    """x: float[B, N, D]; mask: bool[B, 1, N, N] or None. Returns (x, x if return_hidden else None)."""
    norm = lambda name: layers.LayerNorm(eps=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                                         name=name)
    head_dim = self.width // self.num_heads
    attended, _ = layers.Attention(
        num_heads=self.num_heads, num_kv_heads=self.num_heads, head_dim=head_dim, use_bias=True,
        dtype=self.dtype, param_dtype=self.param_dtype, name="attention")(norm("attention_norm")(x), mask)
    x = x + attended
    x = x + layers.FeedForward(self.mlp_dim, activation=self.activation, gated=False, use_bias=True, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="mlp")(norm("mlp_norm")(x))
    x = nn.with_logical_constraint(x, (layers.ACT_BATCH, layers.ACT_LENGTH, layers.ACT_EMBED))
    return x, (x if self.return_hidden else None)


class Encoder(nn.Module):
  """`depth` EncoderBlocks, scanned (`nn.scan`, one compiled layer) or unrolled, with optional remat."""

  depth: int
  width: int
  num_heads: int
  mlp_dim: int
  activation: str
  norm_eps: float
  scan_layers: bool = True
  remat_policy: str = "none"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               return_hidden: bool = False) -> tuple[jax.Array, jax.Array | None]:
    """x: float[B, N, D] -> (float[B, N, D], float[depth, B, N, D] each layer's output, or None)."""
    block = layers.maybe_remat(EncoderBlock, self.remat_policy, self.scan_layers)
    block_args = dict(width=self.width, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                      activation=self.activation, norm_eps=self.norm_eps, return_hidden=return_hidden,
                      dtype=self.dtype, param_dtype=self.param_dtype)
    if self.scan_layers:
      scanned = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=nn.broadcast, length=self.depth,
                        metadata_params={nn.PARTITION_NAME: layers.ENCODER_LAYERS})
      return scanned(**block_args, name="layers")(x, mask)
    hidden = []
    for i in range(self.depth):
      x, h = block(**block_args, name=f"layers_{i}")(x, mask)
      hidden.append(h)
    return x, (jnp.stack(hidden) if return_hidden else None)


class ConvStem(nn.Module):
  """images float[B, H, W, 3] -> float[B, H/patch, W/patch, C]: log2(patch) 3x3 stride-2 convolutions, each
  followed by LayerNorm and GELU, channels doubling up to `width` at the last one."""

  width: int
  patch_size: int
  norm_eps: float
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    num_convs = self.patch_size.bit_length() - 1
    for i in range(num_convs):
      channels = max(self.width >> (num_convs - 1 - i), 8)
      x = nn.Conv(channels, (3, 3), strides=2, padding="SAME", use_bias=False, dtype=self.dtype,
                  param_dtype=self.param_dtype,
                  kernel_init=layers.param_init(nn.initializers.lecun_normal(), (None, None, None, None)),
                  name=f"conv_{i}")(x)
      x = layers.LayerNorm(eps=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name=f"norm_{i}")(x)
      x = nn.gelu(x)
    return x


class ViT(nn.Module):
  """Images float[B, H, W, 3] (normalized, channels last) -> tokens float[B, P (+1 with a class token), D]."""

  config: ViTConfig

  @nn.compact
  def __call__(self, images: jax.Array, feature_layer: int | None = None,
               with_attention: bool = False) -> jax.Array | tuple[jax.Array, jax.Array, jax.Array]:
    """Args:
      images: float[B, H, W, 3]; H and W multiples of the patch size (other sizes than the config's
        interpolate the position embeddings).
      feature_layer: None for the encoder's final output (after the post-LayerNorm when the config has one);
        an int i for hidden state i as Hugging Face counts them (0 = embeddings, -1 = last layer, -2 =
        penultimate as LLaVA uses), without the post-LayerNorm.
      with_attention: also return what the layer that made the features attended with (visual-token
        reduction, `visual_tokens.py`): its keys float[B, P(+1), N·H] and the attention each token received,
        float32[B, P(+1)] (from the class token when there is one, as VisionZip reads CLIP; else the mean over
        queries, for SigLIP), averaged over heads.
    Returns:
      float[B, P(+1), D], the class token first when the config has one; with_attention: (it, keys, received).
    """
    cfg = self.config
    compute_dtype, param_dtype = dtype(cfg.dtype), dtype(cfg.param_dtype)
    height, width = images.shape[1:3]
    if height % cfg.patch_size or width % cfg.patch_size:
      raise ValueError(f"image size {height}x{width} is not a multiple of vision.patch_size={cfg.patch_size}")
    x = images.astype(compute_dtype)
    window = cfg.patch_size  # the linear patch embedding's window and stride; 1x1 after a conv stem
    if cfg.stem == "conv":
      x = ConvStem(cfg.width, cfg.patch_size, cfg.norm_eps, compute_dtype, param_dtype, name="conv_stem")(x)
      window = 1
    x = nn.Conv(cfg.width, (window, window), strides=window, padding="VALID",
                use_bias=cfg.patch_bias, dtype=compute_dtype, param_dtype=param_dtype,
                kernel_init=layers.param_init(nn.initializers.lecun_normal(), (None, None, None, layers.EMBED)),
                bias_init=layers.param_init(nn.initializers.zeros, (layers.EMBED,)),
                name="patch_embedding")(x)  # [B, h, w, D]
    batch, grid_h, grid_w, _ = x.shape
    x = x.reshape(batch, grid_h * grid_w, cfg.width)  # [B, P, D]

    num_prefix = 1 if cfg.cls_token else 0
    init = POSITION_EMBEDDING_INITS[cfg.position_embedding_init](num_prefix, cfg.grid_size)
    positions = self.param("position_embedding", layers.param_init(init, (None, layers.EMBED)),
                           (num_prefix + cfg.num_patches, cfg.width), param_dtype)
    patch_positions = resize_position_embeddings(positions[num_prefix:], cfg.grid_size, (grid_h, grid_w))
    x = x + patch_positions.astype(compute_dtype)[None]
    if cfg.cls_token:
      cls = self.param("cls_token", layers.param_init(nn.initializers.normal(0.02), (layers.EMBED,)), (cfg.width,),
                       param_dtype)
      cls = (cls + positions[0]).astype(compute_dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, cfg.width)), x], axis=1)  # [B, 1+P, D]
    norm = lambda name: layers.LayerNorm(eps=cfg.norm_eps, dtype=compute_dtype, param_dtype=param_dtype,
                                         name=name)
    if cfg.pre_norm:
      x = norm("pre_norm")(x)
    x = nn.with_logical_constraint(x, (layers.ACT_BATCH, layers.ACT_LENGTH, layers.ACT_EMBED))

    encoder = Encoder(depth=cfg.depth, width=cfg.width, num_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim,
                      activation=cfg.activation, norm_eps=cfg.norm_eps, scan_layers=cfg.scan_layers,
                      remat_policy=cfg.remat_policy, dtype=compute_dtype, param_dtype=param_dtype,
                      name="encoder")
    if feature_layer is not None or with_attention:
      if feature_layer is not None and not -(cfg.depth + 1) <= feature_layer <= cfg.depth:
        raise ValueError(f"vision feature layer {feature_layer} is out of range for a {cfg.depth}-layer ViT "
                         f"(hidden states 0..{cfg.depth}, or -1..-{cfg.depth + 1})")
      _, hidden = encoder(x, return_hidden=True)
      states = jnp.concatenate([x[None], hidden], axis=0)  # [depth + 1, B, N, D]
      index = cfg.depth if feature_layer is None else feature_layer % (cfg.depth + 1)
      features = states[index]
      if feature_layer is None and cfg.post_norm:
        features = norm("post_norm")(features)
      if not with_attention:
        return features
      if index == 0:
        raise ValueError("visual-token reduction reads the attention of the layer that made the image features: "
                         "the patch embeddings (vision_feature_layer 0) have none")
      keys, received = self._attention_of(encoder.variables["params"], index - 1, states[index - 1])
      return features, keys, received
    x, _ = encoder(x)
    if cfg.post_norm:
      x = norm("post_norm")(x)
    return x

  def _attention_of(self, encoder_params, layer: int, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The keys float[B, N, heads·H] and the attention received float32[B, N] of encoder layer `layer` (0-based)
    on its input x float[B, N, D], computed with that layer's own modules and parameters."""
    cfg = self.config
    block = (jax.tree.map(lambda p: p[layer], encoder_params["layers"]) if cfg.scan_layers
             else encoder_params[f"layers_{layer}"])
    compute_dtype = dtype(cfg.dtype)
    normed = layers.LayerNorm(eps=cfg.norm_eps, dtype=compute_dtype).apply({"params": block["attention_norm"]}, x)
    head_dim = cfg.width // cfg.num_heads
    project = lambda name: layers.Projection(
        (cfg.width, cfg.num_heads, head_dim), (layers.EMBED, layers.HEADS, layers.HEAD_DIM), fan_in=1,
        use_bias=True, dtype=compute_dtype).apply({"params": block["attention"][name]}, normed)
    query, key = project("query"), project("key")  # [B, N, heads, H]
    logits = jnp.einsum("bqnh,bknh->bnqk", query, key, preferred_element_type=jnp.float32) * head_dim**-0.5
    attention = jax.nn.softmax(logits, axis=-1).mean(axis=1)  # [B, Nq, Nk], over heads
    received = attention[:, 0] if cfg.cls_token else attention.mean(axis=1)
    return key.reshape(*key.shape[:2], -1), received


def sincos_2d(grid: int, width: int, temperature: float = 10_000.0) -> jax.Array:
  """float32[grid*grid, width], patches in raster order: sin and cos of the column, then of the row, each at
  width/4 frequencies from 1 down to 1/temperature (big_vision's `posemb_sincos_2d`)."""
  rows, columns = jnp.mgrid[:grid, :grid]
  omega = 1.0 / temperature ** (jnp.arange(width // 4) / max(width // 4 - 1, 1))
  x = columns.reshape(-1, 1) * omega  # [grid*grid, width/4]
  y = rows.reshape(-1, 1) * omega
  return jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)


def _sincos_init(num_prefix: int, grid: int):
  """An initializer of float[num_prefix + grid*grid, D] position embeddings: zeros for the class token, then
  `sincos_2d`. It ignores the random key."""
  def init(key, shape, dtype=jnp.float32):
    del key
    table = sincos_2d(grid, shape[1])
    return jnp.concatenate([jnp.zeros((num_prefix, shape[1])), table]).astype(dtype)
  return init


POSITION_EMBEDDING_INITS = {
  "normal": lambda num_prefix, grid: nn.initializers.normal(0.02),
  "sincos2d": _sincos_init,
}


def resize_position_embeddings(positions: jax.Array, grid: int, target: tuple[int, int]) -> jax.Array:
  """Position embeddings float[grid*grid, D] -> float[h*w, D], bicubic-interpolated when the grid differs."""
  if target == (grid, grid):
    return positions
  width = positions.shape[-1]
  grid_positions = positions.reshape(grid, grid, width).astype(jnp.float32)
  resized = jax.image.resize(grid_positions, (*target, width), method="bicubic")
  return resized.reshape(target[0] * target[1], width).astype(positions.dtype)
