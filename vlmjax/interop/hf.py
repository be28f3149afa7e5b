"""Hugging Face LLaVA-1.5, LLaVA-NeXT, PaliGemma, Qwen2-VL and Qwen2.5-VL checkpoints in and out.

    pretrained = load_pretrained("/models/llava-1.5-7b-hf")            # or with mesh=..., rules=... to shard
    VLM(VLMConfig.from_dict(pretrained.config.model)).apply({"params": pretrained.params}, ...)
    save_pretrained("/tmp/out", config, params, tokenizer, image_processor, eos_token_ids=(2,))

A directory is read as transformers reads it: config.json (`hf_config`), the safetensors (`hf_weights`),
generation_config.json (end tokens), the tokenizer (`vlmjax.data.tokenizer`) and the image processor
(`vlmjax.data.images`). Written directories load with `LlavaForConditionalGeneration.from_pretrained` /
`LlavaNextForConditionalGeneration.from_pretrained` / `PaliGemmaForConditionalGeneration.from_pretrained` /
`Qwen2VLForConditionalGeneration.from_pretrained` / `Qwen2_5_VLForConditionalGeneration.from_pretrained`.
"""

import dataclasses
import json
import os
from typing import Any, Sequence

import jax
import ml_collections

from vlmjax.data.images import AnyresImageProcessor, ImageProcessor, QwenImageProcessor
from vlmjax.data.tokenizer import Tokenizer
from vlmjax.interop import hf_config, hf_weights
from vlmjax.models import layers
from vlmjax.models.vlm import QWEN_TOWERS, VLMConfig
from vlmjax.parallel import mesh as mesh_lib

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """A Hugging Face checkpoint in vlmjax terms.

  Attributes:
    config: a full vlmjax config; `VLMConfig.from_dict(config.model)` is the model.
    params: the `params` tree of `vlmjax.models.vlm.VLM`, float32.
    tokenizer, image_processor: the checkpoint's.
    eos_token_ids: tokens that end generation (generation_config.json, else config.json, else the tokenizer's).
    pad_token_id: the id to pad rows with.
    image_token_id: the image placeholder id (repeated once per image embedding in input_ids).
    prefix_lm: whether the prompt is a bidirectional prefix (PaliGemma).
    max_len: the text model's context length (max_position_embeddings).
  """

  config: ml_collections.ConfigDict
  params: Any
  tokenizer: Tokenizer
  image_processor: ImageProcessor
  eos_token_ids: tuple[int, ...]
  pad_token_id: int
  image_token_id: int
  prefix_lm: bool
  max_len: int


def _read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def is_hf_checkpoint(path: str) -> bool:
  """Whether `path` is a directory whose config.json is a Hugging Face LLaVA, LLaVA-NeXT, PaliGemma, Qwen2-VL or
  Qwen2.5-VL config."""
  config_path = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(config_path):
    return False
  try:
    values = _read_json(config_path)
  except (OSError, ValueError):
    return False
  return isinstance(values, dict) and values.get("model_type") in hf_config.ARCHITECTURES


def _ids(value: int | Sequence[int] | None) -> tuple[int, ...]:
  if value is None:
    return ()
  return (int(value),) if isinstance(value, int) else tuple(int(v) for v in value)


def load_pretrained(path: str, mesh: jax.sharding.Mesh | None = None,
                    rules: mesh_lib.Rules | None = None) -> Pretrained:
  """Reads a Hugging Face LLaVA-1.5 / LLaVA-NeXT / PaliGemma / Qwen2-VL / Qwen2.5-VL directory.

  Args:
    path: the directory (config.json, safetensors, tokenizer.json, preprocessor_config.json, ...).
    mesh: when given, every parameter is created in its sharding on this mesh, each device reading only its
      own block of the files.
    rules: the logical-axis rules for `mesh` (default: the config's `sharding_rules`).
  Raises:
    ValueError naming the config key, tensor or shape that vlmjax cannot load exactly.
  """
  hf_model = read_config(path)
  config = hf_model.config
  model_config = VLMConfig.from_dict(config.model)
  image_processor = ImageProcessor.from_directory(path)
  _check_image_processor(path, image_processor, model_config)
  tokenizer = Tokenizer.from_directory(path)
  generation = generation_settings(path, hf_model, tokenizer)
  if mesh is not None and rules is None:
    rules = config.sharding_rules
  params = hf_weights.load_params(path, model_config, mesh, rules)
  return Pretrained(config=config, params=params, tokenizer=tokenizer, image_processor=image_processor,
                    eos_token_ids=tuple(generation["eos_token_ids"]), pad_token_id=generation["pad_token_id"],
                    image_token_id=model_config.image_token_id, prefix_lm=model_config.prefix_lm,
                    max_len=generation["max_len"])


def _check_image_processor(path: str, image_processor: ImageProcessor, model_config: VLMConfig) -> None:
  """The processor makes what the model takes: images (tiles) of the tower's size, tiled at the same pinpoints, or
  Qwen2-VL's and Qwen2.5-VL's patches of the tower's patch, frame and merge sizes."""
  qwen = isinstance(image_processor, QwenImageProcessor)
  if qwen != model_config.qwen_tower:
    raise ValueError(f"{path}: a {type(image_processor).__name__} for a model "
                     f"{'with' if model_config.qwen_tower else 'without'} a Qwen2-VL / Qwen2.5-VL vision tower")
  if qwen:
    vision = model_config.vision
    ours = (image_processor.patch_size, image_processor.temporal_patch_size, image_processor.merge_size)
    if ours != (vision.patch_size, vision.temporal_patch_size, vision.merge_size):
      raise ValueError(f"{path}: the image processor's (patch_size, temporal_patch_size, merge_size) are {ours}, the "
                       f"vision tower's {(vision.patch_size, vision.temporal_patch_size, vision.merge_size)}")
    return
  size = model_config.vision.image_size
  if image_processor.output_size != (size, size):
    raise ValueError(f"{path}: the image processor makes {image_processor.output_size} images but the vision "
                     f"model takes {size}x{size} (vision_config.image_size)")
  anyres = isinstance(image_processor, AnyresImageProcessor)
  if anyres != model_config.variable_image_tokens:
    raise ValueError(f"{path}: a {type(image_processor).__name__} for a model "
                     f"{'with' if model_config.variable_image_tokens else 'without'} image_grid_pinpoints")
  if anyres and (image_processor.image_grid_pinpoints != model_config.image_grid_pinpoints
                 or image_processor.tile_size != size):
    raise ValueError(f"{path}: the image processor tiles images at {image_processor.image_grid_pinpoints} in tiles "
                     f"of {image_processor.tile_size}, the model at image_grid_pinpoints="
                     f"{model_config.image_grid_pinpoints} in tiles of {size}: they must agree")


def read_config(path: str) -> hf_config.HFModel:
  """A Hugging Face directory's config.json in vlmjax terms (no weights read)."""
  config_path = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{path} has no {CONFIG_FILE}: not a Hugging Face model directory")
  return hf_config.from_hf(_read_json(config_path))


def generation_settings(path: str, hf_model: hf_config.HFModel | None = None,
                        tokenizer: Tokenizer | None = None) -> dict:
  """{eos_token_ids: the tokens that end generation (generation_config.json, else config.json, else the
  tokenizer's), pad_token_id, max_len: the text model's context} of a Hugging Face directory, as a run's config
  records them (`config.generation`)."""
  hf_model = hf_model or read_config(path)
  tokenizer = tokenizer or Tokenizer.from_directory(path)
  generation_path = os.path.join(path, GENERATION_CONFIG_FILE)
  generation = _read_json(generation_path) if os.path.isfile(generation_path) else {}
  eos_token_ids = (_ids(generation.get("eos_token_id")) or _ids(hf_model.token_ids["eos_token_id"])
                   or _ids(tokenizer.eos_token_id))
  if not eos_token_ids:
    raise ValueError(f"{path}: no end token in {GENERATION_CONFIG_FILE}, {CONFIG_FILE} or the tokenizer")
  pad_candidates = (generation.get("pad_token_id"), hf_model.token_ids["pad_token_id"], tokenizer.pad_token_id)
  pad_token_id = next((int(i) for i in pad_candidates if i is not None), eos_token_ids[0])
  return {"eos_token_ids": list(eos_token_ids), "pad_token_id": pad_token_id, "max_len": hf_model.max_len}


def save_pretrained(path: str, config: ml_collections.ConfigDict, params: Any, tokenizer: Tokenizer | None = None,
                    image_processor: ImageProcessor | None = None, eos_token_ids: Sequence[int] = (),
                    pad_token_id: int | None = None, max_len: int | None = None) -> None:
  """Writes a Hugging Face directory: config.json + model.safetensors (+ generation_config.json with the end
  tokens, the tokenizer files, preprocessor_config.json, when given) that transformers loads as
  LlavaForConditionalGeneration, LlavaNextForConditionalGeneration, PaliGemmaForConditionalGeneration,
  Qwen2VLForConditionalGeneration or Qwen2_5_VLForConditionalGeneration.

  Args:
    config: a vlmjax config whose `model` section is LLaVA-like (CLIP ViT, 2-layer GELU projector, Llama decoder;
      LLaVA-NeXT with image_grid_pinpoints), PaliGemma-like (SigLIP ViT, linear projector, Gemma decoder, prefix-LM)
      or Qwen2.5-VL / Qwen2-VL (its tower and patch merger, a Qwen2 decoder with M-RoPE).
    params: the `params` tree of VLM, layers scanned or unrolled (`vlmjax.load` unrolls them).
    max_len: the text model's max_position_embeddings (transformers' default when None).
  Raises:
    ValueError naming the config key a Hugging Face checkpoint cannot express, or quantized weights.
  """
  if config.get("quantization"):
    raise ValueError(f"these weights are quantized ({config.quantization.scheme}); a Hugging Face checkpoint is written "
                     f"from float weights: load the source without quantize and save that")
  model_config = VLMConfig.from_dict(config.model)
  model_type = hf_config.model_type_of(model_config)
  eos_token_ids = _ids(eos_token_ids)
  token_ids = dict(bos_token_id=tokenizer.bos_token_id if tokenizer else None,
                   eos_token_id=eos_token_ids[0] if eos_token_ids else None, pad_token_id=pad_token_id)
  values = hf_config.to_hf(model_config, token_ids, max_len)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    json.dump(values, f, indent=2)
  clip_post_norm_width = model_config.vision.width if model_type in ("llava", "llava_next") else None
  renames = hf_weights.QWEN_SAVED if model_type in QWEN_TOWERS else ()
  hf_weights.save_params(os.path.join(path, hf_weights.SINGLE_FILE), layers.stack_layers(params),
                         clip_post_norm_width, renames)
  if eos_token_ids:
    generation = {key: value for key, value in token_ids.items() if value is not None}
    generation["eos_token_id"] = list(eos_token_ids) if len(eos_token_ids) > 1 else eos_token_ids[0]
    with open(os.path.join(path, GENERATION_CONFIG_FILE), "w") as f:
      json.dump(generation, f, indent=2)
  if tokenizer is not None:
    tokenizer.save(path)
  if image_processor is not None:
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
      json.dump(image_processor.to_dict(), f, indent=2)
