"""A loaded model in half precision or low-bit weights, with an optional INT8 KV cache: what `vlmjax.load(path,
dtype=..., quantize=..., kv_cache_dtype=...)` and `--dtype/--quantize/--kv_cache_dtype` apply.

    config, params = quantize.apply(config, params, Settings.parse(dtype="bfloat16", quantize="int8"))

Which layers are quantized is a list of rules over parameter paths, as qwix's `QuantizationRule(module_path=...)`
(the kernels themselves and their matmuls are `vlmjax.models.quant`, which says why qwix's PTQ does not fit our
layers): every linear layer of the language model (attention, MLP), its embedding table and output head, the
projector, and with `vision=True` the vision tower's attention and MLP layers. Norms, biases, position embeddings
and the patch embedding stay in floating point.

The settings are recorded in the config (`config.quantization`, `config.model.decoder.kv_cache_dtype`), so that a
quantized checkpoint (`vlmjax quantize SRC OUT`) is read back as it was written and loading it with other settings
fails with a message naming both.
"""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import ml_collections

from vlmjax.models import quant
from vlmjax.models.kv_cache import KV_CACHE_DTYPES

DTYPES = ("float32", "bfloat16")

# (path pattern, fan_in, rows_out): the quantized parameters. Paths are '/'-joined keys of unrolled parameters.
_LAYER_RULES = (  # the language model's attention and MLP layers: what QLoRA stores in low bits
    (r"decoder/layers_\d+/attention/out/kernel", 2, False),
    (r"decoder/layers_\d+/(attention|mlp)/\w+/kernel", 1, False),
)
_LANGUAGE_RULES = (
    (r"decoder/embedding", 1, True),
    (r"decoder/output_head", 1, False),
    *_LAYER_RULES,
    (r"projector/\w+/kernel", 1, False),
)
_VISION_RULES = (
    (r"vision/encoder/layers_\d+/attention/out/kernel", 2, False),
    (r"vision/encoder/layers_\d+/(attention|mlp)/\w+/kernel", 1, False),
)


def default_dtype(backend: str | None = None) -> str:
  """The compute dtype a model loads in when none is asked for: float32 on a CPU (Hugging Face checkpoints as
  stored, bit-comparable with transformers; a vlmjax workdir keeps its config's dtype), bfloat16 on a GPU or TPU
  (their matmul units' type)."""
  backend = backend or jax.default_backend()
  return "float32" if backend == "cpu" else "bfloat16"


@dataclasses.dataclass(frozen=True)
class Settings:
  """dtype: None (the checkpoint's on a CPU, `default_dtype` elsewhere), 'float32' or 'bfloat16'; scheme: None or
  one of quant.SCHEMES; group_size: inputs per INT4 group; vision: quantize the vision tower too; kv_cache_dtype:
  None (the compute dtype) or 'int8'."""

  dtype: str | None = None
  scheme: str | None = None
  group_size: int = 0
  vision: bool = False
  kv_cache_dtype: str | None = None

  @classmethod
  def parse(cls, dtype: str | None = None, quantize: str | None = None, kv_cache_dtype: str | None = None,
            quantize_vision: bool = False) -> "Settings":
    """From the user's strings: quantize is 'int8', 'int4' (groups of 128), 'int4:GROUP' or 'w8a8' (None or
    'none': float weights). ValueError naming the setting for anything else."""
    if dtype is not None and dtype not in DTYPES:
      raise ValueError(f"unknown dtype {dtype!r}; choose one of {list(DTYPES)}")
    if kv_cache_dtype in ("none", "auto", ""):
      kv_cache_dtype = None
    if kv_cache_dtype is not None and kv_cache_dtype not in KV_CACHE_DTYPES:
      raise ValueError(f"unknown kv_cache_dtype {kv_cache_dtype!r}; choose one of {list(KV_CACHE_DTYPES)} (or none)")
    scheme, group_size = None, 0
    if quantize not in (None, "", "none"):
      scheme, _, group = quantize.partition(":")
      if group and scheme != "int4":
        raise ValueError(f"quantize={quantize!r}: only int4 takes a group size (int4:GROUP)")
      if group and not group.isdigit():
        raise ValueError(f"quantize={quantize!r}: the group size must be a whole number, e.g. int4:64")
      group_size = (int(group) if group else quant.DEFAULT_GROUP_SIZE) if scheme == "int4" else 0
      quant.check_scheme(scheme, group_size or quant.DEFAULT_GROUP_SIZE)
    if quantize_vision and scheme is None:
      raise ValueError("quantize_vision needs a quantization scheme (quantize='int8', 'int4' or 'w8a8')")
    return cls(dtype, scheme, group_size, quantize_vision, kv_cache_dtype)

  @property
  def quantization(self) -> dict | None:
    """What `config.quantization` records, or None for float weights."""
    if self.scheme is None:
      return None
    return {"scheme": self.scheme, "group_size": self.group_size, "vision": self.vision}

  def describe(self) -> str:
    parts = [f"quantize={self.scheme}" + (f":{self.group_size}" if self.group_size else "") if self.scheme else
             "quantize=none"]
    if self.vision:
      parts.append("quantize_vision")
    return ", ".join(parts)


def _path(key_path) -> str:
  return "/".join(str(getattr(key, "key", key)) for key in key_path)


def _rule_for(path: str, rules: tuple):
  for pattern, fan_in, rows_out in rules:
    if re.fullmatch(pattern, path):
      return fan_in, rows_out
  return None


def quantize_params(params, scheme: str, group_size: int = 0, vision: bool = False, layers_only: bool = False):
  """Float parameters -> the same tree with the rules' kernels as `quant.QuantizedKernel`s: with layers_only the
  language model's attention and MLP layers (QLoRA's frozen base), else those, its embedding, output head and
  projector (and with vision the vision tower's layers). A scanned stack (`layers`, leaves [L, ...]) is quantized
  layer by layer, its kernels' arrays keeping the leading layer axis. A layer whose shape the scheme cannot take
  raises ValueError naming its path."""
  rules = _LAYER_RULES if layers_only else _LANGUAGE_RULES + (_VISION_RULES if vision else ())

  def convert(key_path, leaf):
    path = _path(key_path)
    stacked = "/layers/" in f"/{path}/"
    rule = _rule_for(path.replace("/layers/", "/layers_0/"), rules)
    if rule is None or isinstance(leaf, quant.QuantizedKernel):
      return leaf
    fan_in, rows_out = rule
    one = lambda kernel: quant.quantize_kernel(kernel, fan_in, scheme, group_size or quant.DEFAULT_GROUP_SIZE,
                                               rows_out=rows_out, where=path)
    return jax.vmap(one)(leaf) if stacked else one(leaf)
  return jax.tree_util.tree_map_with_path(convert, params, is_leaf=lambda x: isinstance(x, quant.QuantizedKernel))


def cast_params(params, dtype: str):
  """Floating-point parameters in `dtype`; quantized kernels (their scales stay float32) and integers as they are."""
  def cast(leaf):
    if isinstance(leaf, quant.QuantizedKernel) or not jnp.issubdtype(leaf.dtype, jnp.floating):
      return leaf
    return leaf.astype(dtype)
  return jax.tree.map(cast, params, is_leaf=lambda x: isinstance(x, quant.QuantizedKernel))


def param_bytes(params) -> int:
  """Bytes of a parameter tree's arrays as they are held (int4 values two a byte, scales included)."""
  return sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(params))


def recorded(config: ml_collections.ConfigDict) -> Settings:
  """The settings a (saved) config says its parameters were made with."""
  quantization = config.get("quantization") or {}
  return Settings(dtype=None, scheme=quantization.get("scheme"), group_size=quantization.get("group_size", 0),
                  vision=quantization.get("vision", False))


def check_matches(config: ml_collections.ConfigDict, settings: Settings, source: str) -> bool:
  """Whether a checkpoint's parameters are already quantized as asked. A quantized checkpoint loaded with other
  quantization settings raises ValueError naming the checkpoint and both settings (its integers cannot be turned
  into another scheme without the float weights)."""
  saved = recorded(config)
  if saved.scheme is None:
    return False
  asked = dataclasses.replace(settings, dtype=None, kv_cache_dtype=None)
  if asked.scheme is not None and asked != saved:
    raise ValueError(f"{source} holds weights quantized with {saved.describe()}; it was loaded with "
                     f"{asked.describe()}. Load it without quantize (or with its own settings), or quantize the "
                     f"float checkpoint again with `vlmjax quantize`")
  return True


def apply(config: ml_collections.ConfigDict, params, settings: Settings, source: str = "the checkpoint"):
  """(config, params) with `settings` applied: params unrolled (`layers.unstack_layers`) as the VLM facade holds
  them. Returns a new config (the settings recorded) and parameter tree."""
  already = check_matches(config, settings, source)
  config = config.copy_and_resolve_references()
  dtype = settings.dtype or (None if jax.default_backend() == "cpu" else default_dtype())
  with config.unlocked():
    if dtype is not None:
      for section in (config.model, config.model.get("vision"), config.model.get("decoder")):
        if section is not None:
          section.dtype = dtype
          section.param_dtype = dtype
      params = cast_params(params, dtype)
    if settings.scheme is not None and not already:
      params = quantize_params(params, settings.scheme, settings.group_size, settings.vision)
      config.quantization = settings.quantization
    if settings.kv_cache_dtype is not None:
      config.model.decoder.kv_cache_dtype = settings.kv_cache_dtype
  return config, params


def abstract_quantized(config: ml_collections.ConfigDict, abstract):
  """The abstract parameters (ShapeDtypeStructs) of a checkpoint that `save_checkpoint` wrote: the float model's
  `abstract` (unrolled, in the config's dtype) with the recorded scheme's kernels in place."""
  settings = recorded(config)
  if settings.scheme is None:
    return abstract
  return jax.eval_shape(lambda p: quantize_params(p, settings.scheme, settings.group_size, settings.vision), abstract)


def save_checkpoint(out: str, config: ml_collections.ConfigDict, params, tokenizer, image_processor,
                    eos_token_ids, pad_token_id: int, max_len: int | None, source: str | None) -> None:
  """Writes a loaded (quantized) model as a vlmjax workdir that `vlmjax.load(out)` reads back as it is: config.json
  (with `quantization` and the end tokens), the tokenizer and image-processor files, and the parameters as an
  orbax checkpoint (step 0). Refuses a directory that already holds a config."""
  import json
  import os

  from vlmjax import workdir as workdir_lib

  if os.path.exists(os.path.join(out, workdir_lib.CONFIG_FILE)):
    raise ValueError(f"{out} already holds a {workdir_lib.CONFIG_FILE}: give a new directory")
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.generation = {"eos_token_ids": list(eos_token_ids), "pad_token_id": pad_token_id, "max_len": max_len,
                         "source": source}
  os.makedirs(out, exist_ok=True)
  tokenizer.save(out)
  with open(os.path.join(out, "preprocessor_config.json"), "w") as f:
    json.dump(image_processor.to_dict(), f, indent=1)
  checkpointer = workdir_lib.Checkpointer(out, asynchronous=False)
  try:
    checkpointer.save(0, {"params": params}, {})
    checkpointer.wait()
  finally:
    checkpointer.close()
  workdir_lib.write_or_check_config(out, config, allow_change=False)  # last: a directory with it is complete
