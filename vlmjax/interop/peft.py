"""A lora run's adapters out to PEFT: written as `peft` saves them, to load onto the base transformers model.

    save_adapters("/tmp/adapters", config, trained, lora_config, "/models/llava-1.5-7b-hf")
    # in PyTorch:
    base = LlavaForConditionalGeneration.from_pretrained("/models/llava-1.5-7b-hf")
    model = PeftModel.from_pretrained(base, "/tmp/adapters")      # the same logits as vlmjax's adapted model

The directory holds adapter_config.json and adapter_model.safetensors, with the names PEFT 0.21 gives the modules
of transformers 5's LlavaForConditionalGeneration, LlavaNextForConditionalGeneration,
PaliGemmaForConditionalGeneration, Qwen2VLForConditionalGeneration and Qwen2_5_VLForConditionalGeneration:

    base_model.model.model.language_model.layers.{i}.self_attn.q_proj.lora_A.weight    float32[r, in]
    base_model.model.model.language_model.layers.{i}.self_attn.q_proj.lora_B.weight    float32[out, r]
    base_model.model.model.multi_modal_projector.linear_1.weight                       the trained projector, whole
                                                                                       (modules_to_save)
    base_model.model.model.visual.merger.mlp.0.weight                                  Qwen2(.5)-VL's: its patch merger

Our adapter a float[C1..Ca, r], b float[r, O1..Ob] sits beside a kernel float[C1..Ca, O1..Ob]; PEFT's update
(alpha / r) B A x is ours when B A is (a b) in the Hugging Face layout of that kernel, Linear's [out, in]. The kernel's
`hf_weights` layout (a transpose and a merge of the head axes) is linear, so A is the layout applied to `a` taken as
the kernel of a layer with r outputs, float[C1..Ca, r, 1..1], and B the layout applied to `b` taken as that of a
layer with r inputs, float[r, 1..1, O1..Ob]. Whatever the layout does to the kernel's axes it then does to A's inputs
and B's outputs.
"""

import collections
import json
import os
import re
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
import safetensors.numpy

from vlmjax.interop import hf_config, hf_weights
from vlmjax.models import layers, lora
from vlmjax.models.vlm import VLMConfig
from vlmjax.train import optim

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# PEFT wraps the transformers model (`base_model`, a LoraModel) around its `model`; its keys follow the modules.
PEFT_PREFIX = "base_model.model."
# hf_weights' canonical file names -> transformers 5's module names (LlavaModel / PaliGemmaModel / Qwen2_5_VLModel
# under `model`).
MODULE_PREFIXES = ((hf_weights.TEXT, "model.language_model."), (hf_weights.PROJECTOR, "model.multi_modal_projector."),
                   (hf_weights.QWEN_VISION, "model.visual."))
PROJECTOR = "projector"  # the group the lora stage trains besides the adapters (`optim.parameter_group`)
# The module that holds the projector group, by family: PEFT saves it whole (modules_to_save, matched by name).
PROJECTOR_MODULES = {False: "multi_modal_projector", True: "merger"}  # by VLMConfig.qwen_tower
# LLaVA's LoRA recipe trains with task_type CAUSAL_LM: PeftModelForCausalLM passes pixel_values and token_type_ids
# through to the model and generates with it.
TASK_TYPE = "CAUSAL_LM"


def transformers_name(canonical: str) -> str:
  """A canonical Hugging Face weight name as transformers 5's modules name it ('language_model.model.layers.0.mlp.
  up_proj.weight' -> 'model.language_model.layers.0.mlp.up_proj.weight')."""
  for prefix, module_prefix in MODULE_PREFIXES:
    if canonical.startswith(prefix):
      return module_prefix + canonical[len(prefix):]
  raise ValueError(f"{canonical} is neither in the language model nor in the projector or Qwen's vision tower")


def adapter_tensors(params: Mapping[str, Any], rank: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{transformers module name: (A float32[r, in], B float32[out, r])} for every adapter of a `params` tree of VLM
  (layers unrolled or scanned). ValueError naming an adapter that PEFT's layout of these models cannot hold."""
  unrolled = layers.unstack_layers(params)
  tensors = {}
  for key_path, a in jax.tree_util.tree_leaves_with_path(unrolled):
    path = tuple(str(key.key) for key in key_path)
    if path[-1] != "lora_a":
      continue
    module = path[:-1]
    where = "/".join(module)
    b = unrolled
    for key in (*module, "lora_b"):
      b = b[key]
    a, b = (np.asarray(jax.device_get(x), np.float32) for x in (a, b))
    layer = re.fullmatch(r"layers_(\d+)", module[1]) if module[0] == "decoder" and len(module) > 2 else None
    stacked = "/".join(("decoder", "layers", *module[2:], "kernel")) if layer else None
    if stacked not in hf_weights.TENSORS:
      raise ValueError(f"an adapter on {where}: PEFT's export takes adapters on the linear layers of the language "
                       f"model's layers only (lora.targets matched {where})")
    if a.shape[-1] != rank or b.shape[0] != rank:
      raise ValueError(f"the adapter on {where} has rank {a.shape[-1]} (a{list(a.shape)}, b{list(b.shape)}) but the "
                       f"LoRA config says lora.rank={rank}")
    name, layout = hf_weights.TENSORS[stacked]
    fan_in, fan_out = a.ndim - 1, b.ndim - 1
    if fan_in + fan_out != len(layout.perm):
      raise ValueError(f"the adapter on {where}: a{list(a.shape)} b{list(b.shape)} do not make a kernel of "
                       f"{len(layout.perm)} axes as {name} needs")
    a_hf = layout.to_hf(a.reshape(*a.shape[:-1], rank, *[1] * (fan_out - 1)))  # [r, in]
    b_hf = layout.to_hf(b.reshape(rank, *[1] * (fan_in - 1), *b.shape[1:]))  # [out, r]
    tensors[transformers_name(name.format(layer.group(1))).removesuffix(".weight")] = (a_hf, b_hf)
  return tensors


def target_modules(modules: list[str], depth: int) -> str:
  """A regular expression that PEFT full-matches against module names, matching exactly `modules` (names
  'model.language_model.layers.{i}.{suffix}'): per suffix its layers, `\\d+` when it is every one of the `depth`."""
  layers_of = collections.defaultdict(set)
  prefix = transformers_name(hf_weights.TEXT + "layers.")
  for module in modules:
    index, _, suffix = module[len(prefix):].partition(".")
    layers_of[suffix].add(int(index))
  suffixes_of = collections.defaultdict(list)  # suffixes that share their set of layers go in one alternative
  for suffix, indices in sorted(layers_of.items()):
    suffixes_of[tuple(sorted(indices))].append(suffix)
  alternatives = []
  for indices, suffixes in suffixes_of.items():
    layer_pattern = r"\d+" if len(indices) == depth else "(?:" + "|".join(map(str, indices)) + ")"
    alternatives.append(re.escape(prefix) + layer_pattern + r"\.(?:" + "|".join(map(re.escape, suffixes)) + ")")
  return "|".join(alternatives)


def save_adapters(path: str, config: VLMConfig | ml_collections.ConfigDict, trained_params: Mapping[str, Any],
                  lora_config: lora.LoraConfig, base_model_name_or_path: str) -> None:
  """Writes a lora run's trained parameters as PEFT saves a LoRA adapter of the base model.

  Args:
    path: the directory to write (adapter_config.json, adapter_model.safetensors).
    config: the base model's VLMConfig, or a run config whose `model` section it is; LLaVA-like (LLaVA-NeXT too),
      PaliGemma-like or Qwen2.5-VL as `hf.save_pretrained` needs.
    trained_params: what a lora stage trains (`api.lora_trained`): the adapters (lora_a, lora_b beside the decoder's
      kernels), layers unrolled or scanned, and the projector (Qwen2.5-VL's patch merger), written whole as PEFT's
      `modules_to_save`.
    lora_config: the run's rank, alpha and dropout (PEFT's r, lora_alpha, lora_dropout).
    base_model_name_or_path: the base model's Hugging Face directory (or hub name), recorded for AutoPeftModel.
  A QLoRA run's adapters are written as they are: PEFT applies them to the base it is given, so on the float base
  the logits differ from vlmjax's (which runs the quantized base) by the quantization error.
  Raises:
    ValueError naming what PEFT's layout of these models cannot hold: a model transformers cannot express, an
    adapter outside the language model's layers, a trained parameter that is neither an adapter nor the projector.
  """
  model_config = config if isinstance(config, VLMConfig) else VLMConfig.from_dict(config.model)
  hf_config.model_type_of(model_config)  # a model transformers has no class for fails here
  for key_path, _ in jax.tree_util.tree_leaves_with_path(trained_params):
    keys = tuple(str(key.key) for key in key_path)
    if optim.parameter_group(keys) != PROJECTOR and not lora.is_adapter(keys):
      raise ValueError(f"trained parameter {'/'.join(keys)} is neither an adapter nor the projector: a PEFT adapter "
                       f"holds only those (export a fully trained model without --adapters)")
  adapters = adapter_tensors(trained_params, lora_config.rank)
  if not adapters:
    raise ValueError("the trained parameters hold no adapter (lora_a, lora_b): nothing for PEFT to load")
  tensors = {}
  for module, (a, b) in adapters.items():
    tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"], tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = a, b
  modules_to_save = None
  _, projector = lora.split(trained_params)  # what is not an adapter: the projector group
  if projector:
    # PEFT saves a module it trains whole under the wrapped module's own names (no `modules_to_save.default`).
    for name, value in hf_weights.iter_hf_tensors(projector):
      tensors[PEFT_PREFIX + transformers_name(name)] = value
    modules_to_save = [PROJECTOR_MODULES[model_config.qwen_tower]]
  adapter_config = {
      "peft_type": "LORA", "task_type": TASK_TYPE, "base_model_name_or_path": base_model_name_or_path,
      "r": lora_config.rank, "lora_alpha": lora_config.alpha, "lora_dropout": lora_config.dropout,
      "target_modules": target_modules(sorted(adapters), model_config.decoder.depth),
      "modules_to_save": modules_to_save, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
      "use_dora": False, "init_lora_weights": True, "inference_mode": True,
  }
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    json.dump(adapter_config, f, indent=2)
  safetensors.numpy.save_file({name: np.ascontiguousarray(value) for name, value in tensors.items()},
                              os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt"})
