"""LoRA: low-rank adapters beside the language model's frozen linear layers (Hu et al. 2021, as PEFT runs them).

    y = x W + (alpha / rank) * dropout(x) A B      A float[C..., r], B float[r, O...]; B starts at zero

An adapted `layers.Projection` (its kernel float[C1..Ca, O1..Ob] contracting the input's last `fan_in` axes) holds
beside its `kernel` the parameters `lora_a` float[C1..Ca, r] and `lora_b` float[r, O1..Ob], created when the
decoder's config carries a `LoraConfig` whose `targets` pattern matches the module's path. The base kernel may be
a `quant.QuantizedKernel` (QLoRA: the frozen base stored in int8 or int4); the adapters stay in float32.

Why not qwix's LoRA (`qwix.LoraProvider`): it finds a layer's weight by intercepting `jax.lax.dot_general` inside
the module and matching the very param array, which our `matmul.contract` (a `jax.custom_vjp` on the CPU) hides
(`quant.py` says the same of qwix's PTQ). Creating the adapters in `Projection` keeps them ordinary Linen params:
they get logical axes (sharded as their kernel's input or output axes), `nn.scan` stacks them, and
`jax.eval_shape` of an init counts them without allocating (`vlmjax summarize`).
"""

import dataclasses
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlmjax.models import matmul, quant
from vlmjax.models.config import ModelConfig

# LLaVA's recipe (its `find_all_linear_names`): every linear layer of the language model, not the output head
# (which is no `Projection`) nor the embedding. Matched with re.search against paths such as
# "decoder/layers_3/attention/query" or, scanned, "decoder/layers/mlp/down".
DEFAULT_TARGETS = r"attention/(query|key|value|out)$|mlp/(gate|up|down)$"
ADAPTER_NAMES = ("lora_a", "lora_b")


@dataclasses.dataclass(frozen=True)
class LoraConfig(ModelConfig):
  """rank r; alpha (the update is scaled by alpha / r, so that a rank change needs no new learning rate); dropout on
  the adapter's input while training; targets: a regular expression over the paths of the language model's linear
  layers."""

  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: str = DEFAULT_TARGETS

  def __post_init__(self):
    if not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f"lora.rank must be a positive integer, got {self.rank!r}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
    try:
      re.compile(self.targets)
    except re.error as error:
      raise ValueError(f"lora.targets={self.targets!r} is not a regular expression ({error})") from error

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def adapts(self, path: tuple[str, ...]) -> bool:
    """Whether the linear layer at module path `path` gets an adapter."""
    return re.search(self.targets, "/".join(path)) is not None


def adapter_update(module: nn.Module, x: jax.Array, kernel_shape: tuple[int, ...], kernel_axes: tuple, fan_in: int,
                   lora: LoraConfig, param_dtype) -> jax.Array:
  """The adapter's term for `module` (a Projection): x float[..., C1..Ca] -> scale * dropout(x) A B float[..., O...]
  in x's dtype. Dropout runs when the module is given a 'dropout' rng (training)."""
  in_shape, out_shape = kernel_shape[:fan_in], kernel_shape[fan_in:]
  # PEFT's start: A ~ kaiming_uniform(a=sqrt(5)) over its inputs, i.e. uniform within 1/sqrt(fan_in); B = 0, so an
  # adapted model starts as its base.
  init_a = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=tuple(range(fan_in)), out_axis=-1)
  a = module.param("lora_a", nn.with_logical_partitioning(init_a, (*kernel_axes[:fan_in], None)),
                   (*in_shape, lora.rank), param_dtype)
  b = module.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros, (None, *kernel_axes[fan_in:])),
                   (lora.rank, *out_shape), param_dtype)
  if lora.dropout and module.has_rng("dropout"):
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - lora.dropout, x.shape)
    x = jnp.where(keep, x / (1.0 - lora.dropout), 0).astype(x.dtype)
  low_rank = matmul.contract(x, a, fan_in)  # [..., r]
  return matmul.contract(low_rank, b, 1) * jnp.asarray(lora.scale, x.dtype)


def is_adapter(path: tuple[str, ...]) -> bool:
  """Whether a parameter path (its keys) ends at an adapter matrix."""
  return bool(path) and path[-1] in ADAPTER_NAMES


def _keys(key_path) -> tuple[str, ...]:
  return tuple(str(getattr(key, "key", key)) for key in key_path)


def split(params: Mapping[str, Any], trainable_groups: tuple[str, ...] = ()) -> tuple[dict, dict]:
  """(trained, frozen): the adapter matrices and every parameter of the top-level `trainable_groups` (e.g. the
  projector), and the rest; two nested dicts whose `combine` is `params`."""
  trained, frozen = {}, {}

  def visit(tree: Mapping[str, Any], path: tuple[str, ...], into_trained: bool):
    for name, value in tree.items():
      here = (*path, name)
      whole_group = into_trained or (len(here) == 1 and name in trainable_groups)
      if isinstance(value, Mapping):
        visit(value, here, whole_group)
      else:
        target = trained if whole_group or is_adapter(here) else frozen
        for key in here[:-1]:
          target = target.setdefault(key, {})
        target[name] = value
  visit(params, (), False)
  return trained, frozen


def combine(*trees: Mapping[str, Any]) -> dict:
  """Nested dicts merged key by key (the inverse of `split`); a leaf present in two trees is an error."""
  merged: dict = {}
  for tree in trees:
    for name, value in tree.items():
      if isinstance(value, Mapping) and isinstance(merged.get(name), Mapping):
        merged[name] = combine(merged[name], value)
      elif name in merged:
        raise ValueError(f"parameter {name!r} is in both trees")
      else:
        merged[name] = dict(value) if isinstance(value, Mapping) else value
  return merged


def delta(a: jax.Array, b: jax.Array, scale: float, stacked: bool = False) -> jax.Array:
  """The kernel update scale * A B, float32[(L,) C1..Ca, O...]: a float[(L,) C1..Ca, r], b float[(L,) r, O...], with
  a leading layer axis L when `stacked` (an `nn.scan` stack)."""
  lead = int(stacked)
  numbers = (((a.ndim - 1,), (lead,)), ((0,), (0,)) if stacked else ((), ()))
  return scale * jax.lax.dot_general(a.astype(jnp.float32), b.astype(jnp.float32), numbers,
                                     precision=jax.lax.Precision.HIGHEST)


def merge(params: Mapping[str, Any], lora: LoraConfig) -> dict:
  """Parameters with every adapter folded into its kernel (W + scale * A B, in the kernel's dtype) and the adapter
  matrices gone: the plain model, as PEFT's `merge_and_unload`. A quantized base kernel (QLoRA) is dequantized
  first, so that the merged model computes what the adapters were trained against."""
  def visit(tree: Mapping[str, Any]) -> dict:
    out = {name: visit(value) if isinstance(value, Mapping) else value
           for name, value in tree.items() if name not in ADAPTER_NAMES}
    if "lora_a" in tree:
      a, b, kernel = tree["lora_a"], tree["lora_b"], tree["kernel"]
      kernel_rank = len(kernel.shape) if isinstance(kernel, quant.QuantizedKernel) else kernel.ndim
      stacked = a.ndim + b.ndim - 2 > kernel_rank  # a scanned stack: every array has a leading layer axis
      if isinstance(kernel, quant.QuantizedKernel):
        kernel = (jax.vmap(quant.dequantize) if stacked else quant.dequantize)(kernel)
      out["kernel"] = (kernel.astype(jnp.float32) + delta(a, b, lora.scale, stacked)).astype(kernel.dtype)
    return out
  return visit(params)
