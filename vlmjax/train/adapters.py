"""The `lora` stage: low-rank adapters on a frozen base, as LLaVA's LoRA recipe and QLoRA train.

    train.stages = "lora"          train.init_from = a Hugging Face directory or a vlmjax workdir (the base)
    lora.rank, lora.alpha, lora.dropout, lora.targets     the adapters (`vlmjax.models.lora`)
    lora.quantize = "" | "int8" | "int4" | "int4:GROUP"   QLoRA: the frozen base's layers stored in low bits
    optim.projector_learning_rate                         the projector's own rate (LLaVA's mm_projector_lr)

The stage trains the adapters and the projector (Qwen2.5-VL's patch merger: `optim.parameter_group`). Its train
state holds only those (so only they have optimizer state and go into the checkpoints); the frozen base sits beside
it, read from train.init_from again when a run resumes, and never updated. `vlmjax.load` of the workdir reads the
base the same way and merges the adapters (`lora.merge`).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlmjax.infer import quantize as quantize_lib
from vlmjax.models import lora, quant
from vlmjax.models.vlm import VLM, VLMConfig
from vlmjax.parallel import mesh as mesh_lib
from vlmjax.train.optim import split_trained
from vlmjax.workdir import LORA, Stage

QUANTIZE = ("", "int8", "int4")  # QLoRA's base: float, INT8 per output channel, INT4 in groups (of 128, or int4:GROUP)
LORA_KEYS = tuple(field.name for field in dataclasses.fields(lora.LoraConfig))


def lora_config(config: ml_collections.ConfigDict) -> lora.LoraConfig:
  """The adapters of a run config's `lora` section (rank, alpha, dropout, targets)."""
  if "lora" not in config:
    raise ValueError("train.stages has a 'lora' stage but the config has no `lora` section: see configs/from_hf.py")
  return lora.LoraConfig.from_dict({key: config.lora[key] for key in LORA_KEYS if key in config.lora}, "lora")


def check(config: ml_collections.ConfigDict, stages: list[Stage]) -> None:
  """A run with a lora stage: that stage alone, a base to start from, a known base format. Fails before anything
  compiles."""
  if not any(stage.name == LORA for stage in stages):
    return
  if len(stages) > 1:
    raise ValueError(f"train.stages={config.train.stages!r}: a lora stage runs alone (its base is train.init_from; "
                     f"train the stages before it in a run of their own)")
  if not config.train.init_from:
    raise ValueError("the lora stage adapts a trained model: set train.init_from to a Hugging Face directory or a "
                     "vlmjax workdir")
  lora_config(config)
  value = config.lora.get("quantize", "")
  if value.partition(":")[0] not in QUANTIZE:
    raise ValueError(f"lora.quantize={value!r}: choose one of {list(QUANTIZE)} (int4 also as int4:GROUP)")
  quantize_lib.Settings.parse(quantize=value)  # a bad group size fails here


def _quantized_base(frozen: dict, quantize: str) -> dict:
  """The frozen base with its language model's layers in `quantize`'s scheme (lora.quantize; "": as it is)."""
  settings = quantize_lib.Settings.parse(quantize=quantize)
  if settings.scheme is None:
    return frozen
  return quantize_lib.quantize_params(frozen, settings.scheme, settings.group_size, layers_only=True)


def stored_base(frozen: dict, model_config: VLMConfig, quantize: str) -> dict:
  """The frozen base as the lora stage holds it: with `quantize` (lora.quantize) its language model's layers in low
  bits, and its other kernels and tables (parameters of two or more axes) in their tower's compute dtype. Never
  updated, they need no float32 master copy, and the matmuls read them in that dtype anyway: a bfloat16 run holds a
  7B base in half the bytes (LLaVA's LoRA recipe loads its base in bfloat16 too). Norms and biases stay as they are.
  """
  towers = {"vision": model_config.vision.dtype, "decoder": model_config.decoder.dtype}

  def cast(group: str, tree):
    compute = jnp.dtype(towers.get(group, "float32"))
    return jax.tree.map(lambda x: x.astype(compute) if not isinstance(x, quant.QuantizedKernel) and x.ndim >= 2
                        and jnp.issubdtype(x.dtype, jnp.floating) else x, tree,
                        is_leaf=lambda x: isinstance(x, quant.QuantizedKernel))
  return {group: cast(group, tree) for group, tree in _quantized_base(frozen, quantize).items()}


def adapted(model_config: VLMConfig, adapters: lora.LoraConfig) -> VLMConfig:
  """The model with adapters on its language model's linear layers."""
  return model_config.replace(decoder=model_config.decoder.replace(lora=adapters))


def trained_and_frozen(config: ml_collections.ConfigDict, model_config: VLMConfig, base_params: dict, mesh,
                       rules) -> tuple[dict, dict]:
  """(trained, frozen) of a lora stage around `base_params` (the base model's, in their shardings): fresh adapters
  (the run's seed) and the projector, and the rest as the stage holds it (`stored_base`)."""
  model = VLM(adapted(model_config, lora_config(config)))

  def init_adapters():  # only the adapters leave the program: XLA drops the base's initialization
    params = model.init(jax.random.key(config.seed), **model_config.example_inputs(1))["params"]
    return lora.split(params)[0]
  adapters = mesh_lib.init_sharded(init_adapters, mesh, rules)[0]
  trained, frozen = split_trained(lora.combine(base_params, adapters), LORA)
  quantize = config.lora.get("quantize", "")
  return trained, jax.jit(lambda tree: stored_base(tree, model_config, quantize))(frozen)


def abstract_trained(config: ml_collections.ConfigDict, model_config: VLMConfig) -> dict:
  """The trained parameters of a lora stage as ShapeDtypeStructs (what its checkpoints hold), nothing allocated."""
  model = VLM(adapted(model_config, lora_config(config)))
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), **model_config.example_inputs(1))["params"])
  return split_trained(nn.meta.unbox(params), LORA)[0]


def merged(config: ml_collections.ConfigDict, base_params: dict, trained: dict) -> dict:
  """The plain model's parameters: the base (quantized as the stage trained it), the trained projector and the
  adapters folded into the kernels."""
  _, frozen = split_trained(base_params, LORA)
  return lora.merge(lora.combine(_quantized_base(frozen, config.lora.get("quantize", "")), trained),
                    lora_config(config))

