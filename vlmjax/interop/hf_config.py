"""Hugging Face `config.json` of LLaVA-1.5, LLaVA-NeXT, PaliGemma, Qwen2-VL and Qwen2.5-VL <-> the `model` section of a
vlmjax config.

Read as transformers reads it: a key missing from `vision_config` / `text_config` takes the default of the
transformers config class of its `model_type` (CLIPVisionConfig, SiglipVisionConfig, LlamaConfig, MistralConfig,
GemmaConfig); a missing sub-config takes the defaults the LlavaConfig / LlavaNextConfig / PaliGemmaConfig classes
give it. Everything vlmjax cannot run exactly (another architecture, a sliding-window text model, an activation we
do not have, RoPE scaling, several vision feature layers, anyres pinpoints that are not whole tiles, ...) is a
ValueError naming the key and its value.
"""

import dataclasses
from typing import Any, Mapping

import ml_collections
from ml_collections import config_dict

from configs import common
from vlmjax.models.vlm import QWEN_TOWERS, VLMConfig

ARCHITECTURES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
                 "paligemma": "PaliGemmaForConditionalGeneration", "qwen2_vl": "Qwen2VLForConditionalGeneration",
                 "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
VISION_TYPE = {"llava": "clip_vision_model", "llava_next": "clip_vision_model", "paligemma": "siglip_vision_model"}
TEXT_TYPE = {"llava": "llama", "llava_next": "llama", "paligemma": "gemma"}  # the one written (and the default)
# Text models read besides: Mistral is Llama's architecture (no biases) with an optional sliding window.
OTHER_TEXT_TYPES = {"llava_next": ("mistral",)}
LLAVA_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # LlavaNextConfig's default

# Defaults of the transformers config classes, for the keys we read (tests check them against transformers).
CLASS_DEFAULTS = {
    "clip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu",
                              layer_norm_eps=1e-5),
    "siglip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                                hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=True),
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=None, head_dim=None, hidden_act="silu",
                  max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False,
                  mlp_bias=False, bos_token_id=1, eos_token_id=2, pad_token_id=None),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=None, hidden_act="silu",
                    max_position_embeddings=131072, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1,
                    eos_token_id=2, pad_token_id=None, sliding_window=4096),
    "gemma": dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=16, head_dim=256, hidden_act="gelu_pytorch_tanh",
                  max_position_embeddings=8192, rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=False,
                  bos_token_id=2, eos_token_id=1, pad_token_id=0),
}
# Qwen2_5_VLVisionConfig's and Qwen2VLVisionConfig's defaults, by model_type (Qwen2-VL's `hidden_size` is the merger's
# output, its blocks' width `embed_dim`), and Qwen2_5_VLTextConfig's (Qwen2VLTextConfig's are the same). An older
# config.json writes the text model's keys at its top level, without text_config (as transformers reads them).
QWEN_VISION_DEFAULTS = {
    "qwen2_5_vl": dict(depth=32, hidden_size=3584, hidden_act="silu", intermediate_size=3420, num_heads=16,
                       in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       out_hidden_size=3584, fullatt_block_indexes=[7, 15, 23, 31]),
    "qwen2_vl": dict(depth=32, embed_dim=1280, hidden_size=3584, hidden_act="quick_gelu", mlp_ratio=4, num_heads=16,
                     in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
}
# Qwen2-VL attends over the whole image in every block; vlmjax still lays its patches out in windows (`qwen_vit`), of
# this many merge units a side: Qwen2.5-VL's published 112 pixels at patch 14, 64 patches, the window the layout's
# padding buckets were measured with.
QWEN2_VL_WINDOW_UNITS = 4
QWEN_TEXT_DEFAULTS = dict(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8, hidden_act="silu",
                          max_position_embeddings=32768, rms_norm_eps=1e-5, use_sliding_window=False,
                          tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645, pad_token_id=None)
QWEN_ROPE_THETA, QWEN_MROPE_SECTION = 1000000.0, [16, 24, 24]  # the text model's RoPE defaults
QWEN_TOP_DEFAULTS = dict(image_token_id=151655, tie_word_embeddings=False)

# What LlavaConfig / PaliGemmaConfig build when a sub-config is absent altogether.
MISSING_SUBCONFIG = {
    **{(llava, "vision_config"): dict(model_type="clip_vision_model", intermediate_size=4096, hidden_size=1024,
                                      patch_size=14, image_size=336, num_hidden_layers=24, num_attention_heads=16)
       for llava in ("llava", "llava_next")},
    **{(llava, "text_config"): dict(model_type="llama") for llava in ("llava", "llava_next")},
    ("paligemma", "vision_config"): dict(model_type="siglip_vision_model", intermediate_size=4096, hidden_size=1152,
                                         patch_size=14, image_size=224, num_hidden_layers=27, num_attention_heads=16,
                                         vision_use_head=False),
    ("paligemma", "text_config"): dict(model_type="gemma", hidden_size=2048, num_hidden_layers=18,
                                       intermediate_size=16384, num_attention_heads=8, num_key_value_heads=1,
                                       vocab_size=257152),
}
LLAVA_TOP_DEFAULTS = dict(image_token_index=32000, projector_hidden_act="gelu",
                          vision_feature_select_strategy="default", vision_feature_layer=-2,
                          multimodal_projector_bias=True, tie_word_embeddings=False)
TOP_DEFAULTS = {
    "llava": LLAVA_TOP_DEFAULTS,
    "llava_next": dict(LLAVA_TOP_DEFAULTS, image_grid_pinpoints=LLAVA_PINPOINTS),
    "paligemma": dict(image_token_index=256000, projection_dim=2048, tie_word_embeddings=True),
}

# transformers activation names -> ours. "gelu_new" and "gelu_fast" are the tanh approximation written otherwise.
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "quick_gelu": "quick_gelu"}
ACTIVATION_NAMES = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu"}


@dataclasses.dataclass(frozen=True)
class HFModel:
  """What a Hugging Face config.json says, in vlmjax terms.

  Attributes:
    config: a full vlmjax config (`configs.common.base_config()`) whose `model` section builds the model.
    max_len: the text model's max_position_embeddings.
    token_ids: the bos/eos/pad ids config.json states (top level first, then text_config), None where absent.
  """

  config: ml_collections.ConfigDict
  max_len: int
  token_ids: dict[str, Any]


def _sub_config(values: Mapping[str, Any], model_type: str, key: str, allowed: tuple[str, ...]) -> dict:
  sub = values.get(key)
  sub = dict(MISSING_SUBCONFIG[(model_type, key)]) if sub is None else dict(sub)
  sub_type = sub.get("model_type", MISSING_SUBCONFIG[(model_type, key)]["model_type"])
  if sub_type not in allowed:
    raise ValueError(f"config.json: {key}.model_type={sub_type!r} is not supported for {model_type} "
                     f"(vlmjax runs {model_type} with {key}.model_type {' or '.join(map(repr, allowed))})")
  return {**CLASS_DEFAULTS[sub_type], **sub}


def _activation(value: str, key: str) -> str:
  if value not in ACTIVATIONS:
    raise ValueError(f"config.json: {key}={value!r} is not supported; vlmjax has {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[value]


def _image_size(vision: Mapping[str, Any], key: str) -> int:
  size = vision[key]
  if isinstance(size, (list, tuple)):
    if len(size) != 2 or size[0] != size[1]:
      raise ValueError(f"config.json: vision_config.{key}={size!r}; vlmjax needs a square size")
    size = size[0]
  return int(size)


def _rope_theta(text: Mapping[str, Any]) -> float:
  """The RoPE base, refusing any RoPE scaling (rope_scaling, or rope_parameters of another type than default)."""
  for key in ("rope_scaling", "rope_parameters"):
    parameters = text.get(key) or {}
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    if rope_type != "default" or "factor" in parameters:
      raise ValueError(f"config.json: text_config.{key}={parameters!r} is not supported (vlmjax implements plain "
                       f"RoPE, without scaling)")
  parameters = text.get("rope_parameters") or {}
  return float(parameters.get("rope_theta", text.get("rope_theta", 10000.0)))


def _vision_section(vision: Mapping[str, Any], model_type: str) -> dict:
  if vision.get("num_channels", 3) != 3:
    raise ValueError(f"config.json: vision_config.num_channels={vision['num_channels']!r}; vlmjax reads RGB images")
  clip = model_type != "paligemma"
  return dict(image_size=_image_size(vision, "image_size"), patch_size=_image_size(vision, "patch_size"),
              width=vision["hidden_size"], depth=vision["num_hidden_layers"], num_heads=vision["num_attention_heads"],
              mlp_dim=vision["intermediate_size"],
              activation=_activation(vision["hidden_act"], "vision_config.hidden_act"),
              norm_eps=float(vision["layer_norm_eps"]), cls_token=clip, pre_norm=clip, post_norm=True,
              patch_bias=not clip)


def _decoder_section(text: Mapping[str, Any], model_type: str, tie_embeddings: bool) -> dict:
  gemma = model_type == "paligemma"
  for key in ("attention_bias", "mlp_bias"):
    if text.get(key):
      raise ValueError(f"config.json: text_config.{key}={text[key]!r} is not supported (vlmjax's decoder has no "
                       f"biases)")
  window = text.get("sliding_window")
  if window is not None and window < text["max_position_embeddings"]:
    raise ValueError(f"config.json: text_config.sliding_window={window!r} is not supported (vlmjax's decoder "
                     f"attends to the whole context of {text['max_position_embeddings']}; null, as LLaVA-NeXT's "
                     f"Mistral has it, runs)")
  activation = text["hidden_act"]
  if gemma and activation == "gelu":  # GemmaConfig reads the legacy "gelu" as the tanh approximation
    activation = "gelu_pytorch_tanh"
  num_heads = text["num_attention_heads"]
  return dict(vocab_size=text["vocab_size"], width=text["hidden_size"], depth=text["num_hidden_layers"],
              num_heads=num_heads, num_kv_heads=text.get("num_key_value_heads") or num_heads,
              head_dim=text.get("head_dim") or text["hidden_size"] // num_heads, mlp_dim=text["intermediate_size"],
              activation=_activation(activation, "text_config.hidden_act"), rope_theta=_rope_theta(text),
              norm_eps=float(text["rms_norm_eps"]), norm_unit_offset=gemma, scale_embeddings=gemma,
              tie_embeddings=tie_embeddings, final_logit_softcap=None)


def _pinpoints(top: Mapping[str, Any], tile_size: int) -> list[list[int]]:
  """LLaVA-NeXT's image_grid_pinpoints, each a [height, width] of whole tiles (vlmjax's tiles are the tower's
  input, as transformers' model assumes when it counts tiles); its patch-token grid has no CLS token."""
  if top["vision_feature_select_strategy"] != "default":
    raise ValueError(f"config.json: vision_feature_select_strategy={top['vision_feature_select_strategy']!r} is not "
                     f"supported for llava_next (its tiles' tokens form a grid only without the CLS token: "
                     f"'default')")
  pinpoints = top["image_grid_pinpoints"]
  if not isinstance(pinpoints, (list, tuple)) or not pinpoints:
    raise ValueError(f"config.json: image_grid_pinpoints={pinpoints!r} is not a list of [height, width]")
  for pinpoint in pinpoints:
    if (not isinstance(pinpoint, (list, tuple)) or len(pinpoint) != 2
        or any(not isinstance(side, int) or side <= 0 or side % tile_size for side in pinpoint)):
      raise ValueError(f"config.json: image_grid_pinpoints has {pinpoint!r}, not a [height, width] of positive "
                       f"multiples of vision_config.image_size={tile_size} (vlmjax cuts it into whole tiles)")
  return [list(pinpoint) for pinpoint in pinpoints]


def _qwen_rope(text: Mapping[str, Any]) -> tuple[float, list[int]]:
  """Qwen2-VL's and Qwen2.5-VL's text RoPE: (theta, mrope_section), from rope_parameters or the older rope_scaling
  (type 'mrope' or 'default'); any other type is refused."""
  parameters = dict(text.get("rope_scaling") or text.get("rope_parameters") or {})
  rope_type = parameters.get("rope_type", parameters.get("type", "default"))
  if rope_type not in ("default", "mrope") or "factor" in parameters:
    key = "rope_scaling" if text.get("rope_scaling") else "rope_parameters"
    raise ValueError(f"config.json: text_config.{key}={parameters!r} is not supported (vlmjax implements M-RoPE "
                     f"without scaling)")
  theta = float(parameters.get("rope_theta", text.get("rope_theta", QWEN_ROPE_THETA)))
  return theta, [int(n) for n in parameters.get("mrope_section", QWEN_MROPE_SECTION)]


def _qwen_vision_section(vision: Mapping[str, Any], model_type: str) -> dict:
  """vision_config of a Qwen2.5-VL or Qwen2-VL config.json (defaults filled in) -> the `model.vision` section."""
  if vision["in_channels"] != 3:
    raise ValueError(f"config.json: vision_config.in_channels={vision['in_channels']!r}; vlmjax reads RGB images")
  for key in ("patch_size", "temporal_patch_size"):
    if not isinstance(vision[key], int):
      raise ValueError(f"config.json: vision_config.{key}={vision[key]!r} is not supported (vlmjax needs one int)")
  vision_rope = vision.get("rope_parameters") or {}
  if vision_rope.get("rope_type", "axial") != "axial":
    raise ValueError(f"config.json: vision_config.rope_parameters={vision_rope!r} is not supported (the vision tower's "
                     f"RoPE is axial)")
  section = dict(patch_size=vision["patch_size"], temporal_patch_size=vision["temporal_patch_size"],
                 merge_size=vision["spatial_merge_size"], depth=vision["depth"], num_heads=vision["num_heads"],
                 activation=_activation(vision["hidden_act"], "vision_config.hidden_act"),
                 rope_theta=float(vision_rope.get("rope_theta", 10000.0)))
  if model_type == "qwen2_5_vl":
    return dict(section, width=vision["hidden_size"], mlp_dim=vision["intermediate_size"],
                out_width=vision["out_hidden_size"], window_size=vision["window_size"],
                fullatt_block_indexes=list(vision["fullatt_block_indexes"]))
  width = vision["embed_dim"]
  return dict(section, width=width, mlp_dim=int(width * vision["mlp_ratio"]), out_width=vision["hidden_size"],
              window_size=QWEN2_VL_WINDOW_UNITS * vision["spatial_merge_size"] * vision["patch_size"],
              fullatt_block_indexes=list(range(vision["depth"])), norm="layernorm", gated_mlp=False)


def _from_qwen(values: Mapping[str, Any], model_type: str) -> HFModel:
  """A Qwen2_5_VLConfig's or Qwen2VLConfig's values -> HFModel (the text model Qwen2 with q/k/v biases and M-RoPE)."""
  top = {**QWEN_TOP_DEFAULTS, **values}
  vision = {**QWEN_VISION_DEFAULTS[model_type], **(values.get("vision_config") or {})}
  text_values = values.get("text_config") or {key: value for key, value in values.items()
                                                if key in QWEN_TEXT_DEFAULTS or key.startswith("rope")}
  text = {**QWEN_TEXT_DEFAULTS, **text_values}
  if text["use_sliding_window"]:
    raise ValueError(f"config.json: text_config.use_sliding_window={text['use_sliding_window']!r} is not supported "
                     f"(vlmjax's decoder attends to the whole context)")
  theta, mrope_section = _qwen_rope(text)
  num_heads = text["num_attention_heads"]
  head_dim = text["hidden_size"] // num_heads  # Qwen2-VL's and Qwen2.5-VL's attention ignore a head_dim key
  if sum(mrope_section) != head_dim // 2:
    raise ValueError(f"config.json: text_config.rope_parameters.mrope_section={mrope_section} must sum to half the "
                     f"head size ({head_dim // 2})")
  config = common.base_config()
  model = config.model
  model.vision_tower = model_type
  model.vision = ml_collections.ConfigDict(_qwen_vision_section(vision, model_type))
  model.decoder = ml_collections.ConfigDict(dict(
      vocab_size=text["vocab_size"], width=text["hidden_size"], depth=text["num_hidden_layers"], num_heads=num_heads,
      num_kv_heads=text["num_key_value_heads"] or num_heads, head_dim=head_dim, mlp_dim=text["intermediate_size"],
      activation=_activation(text["hidden_act"], "text_config.hidden_act"), rope_theta=theta,
      mrope_section=mrope_section, qkv_bias=True, norm_eps=float(text["rms_norm_eps"]),
      tie_embeddings=bool(top["tie_word_embeddings"] or text["tie_word_embeddings"])))
  model.image_token_id = int(top["image_token_id"])
  model.projector = "patch_merger"
  model.vision_feature_layer = config_dict.placeholder(int)  # None: the merger's output
  token_ids = {name: values[name] if values.get(name) is not None else text.get(name)
               for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
  return HFModel(config=config, max_len=int(text["max_position_embeddings"]), token_ids=token_ids)


def from_hf(values: Mapping[str, Any]) -> HFModel:
  """config.json contents -> HFModel. Raises ValueError naming the key for anything vlmjax cannot run."""
  model_type = values.get("model_type")
  if model_type not in ARCHITECTURES:
    raise ValueError(f"config.json: model_type={model_type!r} is not supported; vlmjax reads "
                     f"{sorted(ARCHITECTURES)}")
  architectures = values.get("architectures") or [ARCHITECTURES[model_type]]
  if list(architectures) != [ARCHITECTURES[model_type]]:
    raise ValueError(f"config.json: architectures={list(architectures)!r} is not supported; vlmjax reads "
                     f"{model_type} as [{ARCHITECTURES[model_type]!r}]")
  if model_type in QWEN_TOWERS:
    return _from_qwen(values, model_type)
  top = {**TOP_DEFAULTS[model_type], **values}
  vision = _sub_config(values, model_type, "vision_config", (VISION_TYPE[model_type],))
  text = _sub_config(values, model_type, "text_config",
                     (TEXT_TYPE[model_type], *OTHER_TEXT_TYPES.get(model_type, ())))
  tie_embeddings = bool(top["tie_word_embeddings"] or text["tie_word_embeddings"])

  config = common.base_config()
  model = config.model
  model.vision = ml_collections.ConfigDict(_vision_section(vision, model_type))
  model.decoder = ml_collections.ConfigDict(_decoder_section(text, model_type, tie_embeddings))
  model.image_token_id = int(top["image_token_index"])
  if model_type != "paligemma":
    layer = top["vision_feature_layer"]
    if not isinstance(layer, int):
      raise ValueError(f"config.json: vision_feature_layer={layer!r} is not supported (vlmjax takes one layer)")
    depth = vision["num_hidden_layers"]
    if not -(depth + 1) <= layer <= depth:
      raise ValueError(f"config.json: vision_feature_layer={layer} is out of range for a {depth}-layer vision tower")
    if top["projector_hidden_act"] != "gelu":
      raise ValueError(f"config.json: projector_hidden_act={top['projector_hidden_act']!r} is not supported "
                       f"(vlmjax's LLaVA projector uses 'gelu')")
    if not top["multimodal_projector_bias"]:
      raise ValueError("config.json: multimodal_projector_bias=False is not supported (vlmjax's projector has "
                       "biases)")
    strategy = top["vision_feature_select_strategy"]
    if strategy not in ("default", "full"):
      raise ValueError(f"config.json: vision_feature_select_strategy={strategy!r} is not supported (use 'default' "
                       f"or 'full')")
    model.projector = "mlp2x_gelu"
    model.vision_feature_layer = layer
    model.vision_feature_select = strategy
    if model_type == "llava_next":
      model.image_grid_pinpoints = _pinpoints(top, _image_size(vision, "image_size"))
  else:
    if top["projection_dim"] != text["hidden_size"]:
      raise ValueError(f"config.json: projection_dim={top['projection_dim']} must equal text_config.hidden_size="
                       f"{text['hidden_size']} (the projector maps image tokens into the text model)")
    model.projector = "linear"
    model.vision_feature_layer = config_dict.placeholder(int)  # None: SigLIP's output after its post-LayerNorm
    model.vision_feature_select = "full"
    model.prefix_lm = True
  token_ids = {name: values[name] if values.get(name) is not None else text.get(name)
               for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
  return HFModel(config=config, max_len=int(text["max_position_embeddings"]), token_ids=token_ids)


def _check_expected(model: VLMConfig, model_type: str, expected: Mapping[str, Any]) -> None:
  """ValueError naming the first `model.KEY` whose value is not the one a `model_type` checkpoint has."""
  for key, value in expected.items():
    actual = model
    for part in key.split("."):
      actual = getattr(actual, part)
    if actual != value:
      raise ValueError(f"model.{key}={actual!r} cannot be written as a Hugging Face {model_type} checkpoint "
                       f"(it needs {value!r})")


def model_type_of(model: VLMConfig) -> str:
  """'llava', 'llava_next' (anyres tiles), 'paligemma', or the Qwen tower's 'qwen2_vl' or 'qwen2_5_vl': which Hugging
  Face architecture a vlmjax model is; ValueError naming the first setting that none can express."""
  if model.qwen_tower:  # VLMConfig has checked the tower's projector and image-token settings
    model_type = model.vision_tower
    # The tower's norms have transformers' eps 1e-6 built in.
    _check_expected(model, model_type, {
        "vision.norm_eps": 1e-6, **_qwen_vision_expected(model), "decoder.qkv_bias": True,
        "decoder.norm_unit_offset": False, "decoder.scale_embeddings": False, "decoder.final_logit_softcap": None})
    decoder = model.decoder
    if decoder.attention_head_dim != decoder.width // decoder.num_heads:
      raise ValueError(f"model.decoder.head_dim={decoder.head_dim} cannot be written as a Hugging Face {model_type} "
                       f"checkpoint (its attention's heads are decoder.width // decoder.num_heads = "
                       f"{decoder.width // decoder.num_heads} wide)")
    if not decoder.mrope_section:
      raise ValueError(f"model.decoder.mrope_section=() cannot be written as a Hugging Face {model_type} checkpoint "
                       f"(its decoder takes M-RoPE: 3 runs, temporal, height and width)")
  else:
    model_type = _check_llava_or_paligemma(model)
  for key, value in (("vision.activation", model.vision.activation), ("decoder.activation", model.decoder.activation)):
    if value not in ACTIVATION_NAMES:
      raise ValueError(f"model.{key}={value!r} has no transformers name")
  return model_type


def _qwen_vision_expected(model: VLMConfig) -> dict:
  """The tower settings of its family (`model.vision_tower`) that a Qwen2.5-VL or Qwen2-VL config.json cannot change."""
  if model.vision_tower == "qwen2_5_vl":
    return {"vision.norm": "rmsnorm", "vision.gated_mlp": True}
  vision = model.vision
  if vision.mlp_dim % vision.width:  # Qwen2VLVisionConfig's mlp_ratio is an int
    raise ValueError(f"model.vision.mlp_dim={vision.mlp_dim} cannot be written as a Hugging Face qwen2_vl checkpoint "
                     f"(its MLP is embed_dim * mlp_ratio wide, an int mlp_ratio: a multiple of model.vision.width="
                     f"{vision.width})")
  return {"vision.norm": "layernorm", "vision.gated_mlp": False,
          "vision.fullatt_block_indexes": tuple(range(vision.depth))}


def _check_llava_or_paligemma(model: VLMConfig) -> str:
  """'llava', 'llava_next' or 'paligemma' for a model with vlmjax's ViT; ValueError naming what none can express."""
  model_type = "paligemma" if model.prefix_lm else "llava_next" if model.variable_image_tokens else "llava"
  clip = model_type != "paligemma"
  _check_expected(model, model_type, {
      "projector": "mlp2x_gelu" if clip else "linear",
      "image_token_merge": 1, "image_position_embedding": "none", "vision.stem": "patch",
      "vision.cls_token": clip, "vision.pre_norm": clip, "vision.post_norm": True, "vision.patch_bias": not clip,
      "decoder.norm_unit_offset": not clip, "decoder.scale_embeddings": not clip,
      "decoder.final_logit_softcap": None, "decoder.qkv_bias": False, "decoder.mrope_section": (),
  })
  if clip and model.vision_feature_layer is None:
    raise ValueError("model.vision_feature_layer=None cannot be written as a Hugging Face llava checkpoint (LLaVA "
                     "takes a hidden state: set an int such as -2)")
  if not clip and model.vision_feature_layer is not None:
    raise ValueError(f"model.vision_feature_layer={model.vision_feature_layer!r} cannot be written as a Hugging "
                     f"Face paligemma checkpoint (PaliGemma takes SigLIP's final output: None)")
  if not clip and model.decoder.activation == "gelu":
    raise ValueError("model.decoder.activation='gelu' cannot be written as a Hugging Face Gemma config "
                     "(transformers reads Gemma's 'gelu' as the tanh approximation)")
  return model_type


def to_hf(model: VLMConfig, token_ids: Mapping[str, Any], max_len: int | None) -> dict:
  """A vlmjax model -> config.json contents that transformers loads (every value explicit).

  Args:
    token_ids: bos_token_id, eos_token_id and pad_token_id (None: left out).
    max_len: the text model's max_position_embeddings (None: transformers' default).
  """
  model_type = model_type_of(model)
  if model_type in QWEN_TOWERS:
    return _to_qwen(model, model_type, token_ids, max_len)
  vision, decoder = model.vision, model.decoder
  vision_config = dict(
      model_type=VISION_TYPE[model_type], hidden_size=vision.width, intermediate_size=vision.mlp_dim,
      num_hidden_layers=vision.depth, num_attention_heads=vision.num_heads, num_channels=3,
      image_size=vision.image_size, patch_size=vision.patch_size, hidden_act=ACTIVATION_NAMES[vision.activation],
      layer_norm_eps=vision.norm_eps)
  token_ids = {key: value for key, value in token_ids.items() if value is not None}
  text_config = dict(
      model_type=TEXT_TYPE[model_type], vocab_size=decoder.vocab_size, hidden_size=decoder.width,
      intermediate_size=decoder.mlp_dim, num_hidden_layers=decoder.depth, num_attention_heads=decoder.num_heads,
      num_key_value_heads=decoder.num_kv_heads, head_dim=decoder.attention_head_dim,
      hidden_act=ACTIVATION_NAMES[decoder.activation], rms_norm_eps=decoder.norm_eps,
      rope_theta=decoder.rope_theta, rope_parameters=dict(rope_type="default", rope_theta=decoder.rope_theta),
      tie_word_embeddings=decoder.tie_embeddings, attention_bias=False, **token_ids)
  if max_len is not None:
    text_config["max_position_embeddings"] = max_len
  values = dict(architectures=[ARCHITECTURES[model_type]], model_type=model_type,
                image_token_index=model.image_token_id, tie_word_embeddings=decoder.tie_embeddings,
                vision_config=vision_config, text_config=text_config, dtype="float32", **token_ids)
  if model_type != "paligemma":
    text_config["mlp_bias"] = False
    values.update(projector_hidden_act="gelu", vision_feature_layer=model.vision_feature_layer,
                  vision_feature_select_strategy=model.vision_feature_select, multimodal_projector_bias=True,
                  image_seq_length=(model.patch_tokens_per_image if model_type == "llava_next"  # the base tile's
                                    else model.tokens_per_image))
    if model_type == "llava_next":
      values["image_grid_pinpoints"] = [list(pinpoint) for pinpoint in model.image_grid_pinpoints]
  else:
    vision_config.update(vision_use_head=False, projection_dim=decoder.width)
    text_config["num_image_tokens"] = model.tokens_per_image
    values.update(projection_dim=decoder.width, hidden_size=decoder.width, vocab_size=decoder.vocab_size)
  return values


def _qwen_vision_config(vision, model_type: str) -> dict:
  """The `vision_config` of a Qwen2.5-VL or Qwen2-VL config.json: every key `_qwen_vision_section` reads (Qwen2-VL's
  window, only the layout of its patches in vlmjax, is not one)."""
  both = dict(model_type=f"{model_type}_vision", depth=vision.depth, num_heads=vision.num_heads, in_channels=3,
              patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
              spatial_merge_size=vision.merge_size, hidden_act=ACTIVATION_NAMES[vision.activation],
              rope_parameters=dict(rope_type="axial", rope_theta=vision.rope_theta))
  if model_type == "qwen2_5_vl":
    return dict(both, hidden_size=vision.width, intermediate_size=vision.mlp_dim, window_size=vision.window_size,
                fullatt_block_indexes=list(vision.fullatt_block_indexes), out_hidden_size=vision.out_width)
  return dict(both, embed_dim=vision.width, mlp_ratio=vision.mlp_dim // vision.width, hidden_size=vision.out_width)


def _to_qwen(model: VLMConfig, model_type: str, token_ids: Mapping[str, Any], max_len: int | None) -> dict:
  """A Qwen2.5-VL or Qwen2-VL model -> config.json contents: every key `_from_qwen` reads, in the sub-config where
  transformers saves it. M-RoPE is written as Qwen publishes it, rope_theta and rope_scaling's mrope_section, which
  transformers 4 reads and 5 turns into its rope_parameters."""
  decoder = model.decoder
  text_config = dict(
      model_type=f"{model_type}_text", vocab_size=decoder.vocab_size, hidden_size=decoder.width,
      intermediate_size=decoder.mlp_dim, num_hidden_layers=decoder.depth, num_attention_heads=decoder.num_heads,
      num_key_value_heads=decoder.num_kv_heads, hidden_act=ACTIVATION_NAMES[decoder.activation],
      rms_norm_eps=decoder.norm_eps, rope_theta=decoder.rope_theta,
      rope_scaling=dict(type="mrope", mrope_section=list(decoder.mrope_section)), use_sliding_window=False,
      tie_word_embeddings=decoder.tie_embeddings,
      **token_ids)  # None written as null: Qwen's defaults (bos 151643, ...) are ids of its own vocabulary
  if max_len is not None:
    text_config["max_position_embeddings"] = max_len
  return dict(architectures=[ARCHITECTURES[model_type]], model_type=model_type, image_token_id=model.image_token_id,
              tie_word_embeddings=decoder.tie_embeddings, vision_config=_qwen_vision_config(model.vision, model_type),
              text_config=text_config, dtype="float32")
