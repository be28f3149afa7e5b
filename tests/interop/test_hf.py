"""Hugging Face interop against transformers itself: logits of LLaVA and PaliGemma checkpoints (tiny, random,
written by transformers), the image processor, the tokenizer and chat template, export, sharded loading, and the
errors for checkpoints vlmjax cannot run."""

import functools
import importlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers
from PIL import Image

from vlmjax.data.images import ImageProcessor
from vlmjax.data.tokenizer import Tokenizer
from vlmjax.interop import hf, hf_config, hf_weights
from vlmjax.models.vlm import VLM, VLMConfig
from vlmjax.parallel import mesh as mesh_lib

IMAGE_TOKEN = "<image>"
PROMPTS = ["What is in the picture?", "Describe the image in detail, please. How many shapes are there?",
           "caption en"]


def random_images(count: int, seed: int = 0) -> list[np.ndarray]:
  """uint8 RGB images of assorted sizes (landscape, portrait, square)."""
  rng = np.random.default_rng(seed)
  sizes = [(37, 52), (61, 29), (24, 24), (45, 45)]
  return [rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8) for i in range(count)]


@functools.cache
def _forward(model_config: VLMConfig):
  """Our forward, compiled once per config (and shape)."""
  return jax.jit(lambda params, ids, pixels, mask, prefix: VLM(model_config).apply(
      {"params": params}, ids, pixels, input_mask=mask, prefix_lengths=prefix)[0])


def _prompt_ids(pretrained: hf.Pretrained, prompt: str) -> list[int]:
  model_config = VLMConfig.from_dict(pretrained.config.model)
  image_token = pretrained.tokenizer.backend.id_to_token(pretrained.image_token_id)
  text = prompt if pretrained.prefix_lm else f"USER: {image_token}\n{prompt} ASSISTANT:"
  return pretrained.tokenizer.encode_prompt(text, pretrained.image_token_id, model_config.tokens_per_image,
                                            pretrained.prefix_lm)


def our_logits(pretrained: hf.Pretrained, rows: list[list[int]], pixel_values: np.ndarray) -> np.ndarray:
  """float32[B, T, V] for right-padded rows (the whole prompt is the prefix of a prefix-LM)."""
  lengths = np.asarray([len(row) for row in rows], np.int32)
  ids = np.full((len(rows), lengths.max()), pretrained.pad_token_id, np.int32)
  for i, row in enumerate(rows):
    ids[i, :len(row)] = row
  mask = np.arange(ids.shape[1])[None] < lengths[:, None]
  prefix = jnp.asarray(lengths) if pretrained.prefix_lm else None
  forward = _forward(VLMConfig.from_dict(pretrained.config.model))
  with jax.default_matmul_precision("highest"):  # float32 matmuls on accelerators too (no TF32 / bf16 passes)
    return np.asarray(forward(pretrained.params, jnp.asarray(ids), jnp.asarray(pixel_values), jnp.asarray(mask),
                              prefix))


def their_logits(model, kind: str, row: list[int], pixel_values: torch.Tensor) -> np.ndarray:
  """transformers' logits for one row; PaliGemma with token_type_ids 0 (all prefix), as its generate prefills."""
  ids = torch.tensor([row])
  extra = {"token_type_ids": torch.zeros_like(ids)} if kind == "paligemma" else {}
  with torch.no_grad():
    return model(input_ids=ids, pixel_values=pixel_values, **extra).logits[0].numpy()


def max_relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
  return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def test_logits_match_transformers(checkpoint, case_name):
  case, directory, model = checkpoint(case_name)
  pretrained = hf.load_pretrained(directory)
  images = random_images(len(PROMPTS), seed=1)
  their_processor = transformers.AutoImageProcessor.from_pretrained(directory, backend="pil")
  their_pixels = their_processor(images, return_tensors="pt")["pixel_values"]
  rows = [_prompt_ids(pretrained, prompt) for prompt in PROMPTS]
  assert len({len(row) for row in rows}) == len(rows)  # rows of different lengths in one batch
  ours = our_logits(pretrained, rows, pretrained.image_processor(images))
  errors = []
  for i, row in enumerate(rows):
    theirs = their_logits(model, case.kind, row, their_pixels[i:i + 1])
    assert theirs.shape == (len(row), case.vocab_size)
    errors.append(max_relative_error(ours[i, :len(row)], theirs))
    np.testing.assert_allclose(ours[i, :len(row)], theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())
  print(f"{case_name}: max relative logit error {max(errors):.2e}")


def test_pretrained_fields(checkpoint):
  case, directory, _ = checkpoint("paligemma_mqa")
  pretrained = hf.load_pretrained(directory)
  tokenizer = pretrained.tokenizer
  assert pretrained.eos_token_ids == (tokenizer.eos_token_id, pretrained.image_token_id - 1)  # generation_config
  assert pretrained.pad_token_id == tokenizer.pad_token_id == 0
  assert pretrained.image_token_id == tokenizer.backend.token_to_id(IMAGE_TOKEN)
  assert pretrained.prefix_lm and pretrained.max_len == 8192
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda x: x.dtype == jnp.float32, pretrained.params))
  assert hf.is_hf_checkpoint(directory)


def test_is_hf_checkpoint(tmp_path):
  assert not hf.is_hf_checkpoint(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps({"seed": 0, "model": {}}))  # a vlmjax workdir's config
  assert not hf.is_hf_checkpoint(str(tmp_path))
  (tmp_path / "config.json").write_text("{not json")
  assert not hf.is_hf_checkpoint(str(tmp_path))


def test_export_loads_in_transformers_with_the_same_logits(checkpoint, case_name, tmp_path):
  case, directory, model = checkpoint(case_name)
  pretrained = hf.load_pretrained(directory)
  out = str(tmp_path / "export")
  hf.save_pretrained(out, pretrained.config, pretrained.params, pretrained.tokenizer, pretrained.image_processor,
                     eos_token_ids=pretrained.eos_token_ids, pad_token_id=pretrained.pad_token_id,
                     max_len=pretrained.max_len)
  reloaded, info = type(model).from_pretrained(out, output_loading_info=True)
  assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
  row = _prompt_ids(pretrained, PROMPTS[1])
  pixels = torch.tensor(pretrained.image_processor(random_images(1)).transpose(0, 3, 1, 2))
  np.testing.assert_array_equal(their_logits(reloaded.eval(), case.kind, row, pixels),
                                their_logits(model, case.kind, row, pixels))
  again = hf.load_pretrained(out)
  jax.tree_util.tree_map(np.testing.assert_array_equal, again.params, pretrained.params)
  assert again.eos_token_ids == pretrained.eos_token_ids and again.pad_token_id == pretrained.pad_token_id
  assert again.image_processor == pretrained.image_processor
  assert again.tokenizer.encode(PROMPTS[1]) == pretrained.tokenizer.encode(PROMPTS[1])
  their_processor = transformers.AutoImageProcessor.from_pretrained(out, backend="pil")
  np.testing.assert_allclose(their_processor(random_images(2), return_tensors="np")["pixel_values"],
                             pretrained.image_processor(random_images(2)).transpose(0, 3, 1, 2), atol=1e-5)
  their_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  assert their_tokenizer(PROMPTS[1])["input_ids"] == pretrained.tokenizer.encode(PROMPTS[1])
  assert their_tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == pretrained.tokenizer.apply_chat_template(
      CONVERSATION, add_generation_prompt=False)


def test_a_loaded_model_keeps_its_layers_unrolled_and_exports_them_stacked(checkpoint, tmp_path):
  import vlmjax

  _, directory, _ = checkpoint("llava_gqa")
  vlm = vlmjax.load(directory)
  assert not vlm.config.model.scan_layers and "layers_0" in vlm.params["decoder"]
  out = str(tmp_path / "export")
  hf.save_pretrained(out, vlm.config, vlm.params, vlm.tokenizer, vlm.image_processor,
                     eos_token_ids=vlm.eos_token_ids, pad_token_id=vlm.pad_token_id, max_len=vlm.max_len)
  jax.tree_util.tree_map(np.testing.assert_array_equal, hf.load_pretrained(out).params,
                         hf.load_pretrained(directory).params)


def test_export_refuses_what_a_hugging_face_checkpoint_cannot_express(tmp_path):
  config = importlib.import_module("configs.shapes_tiny").get_config()  # SigLIP tower with a LLaVA projector
  with pytest.raises(ValueError, match=r"model\.image_token_merge=2 cannot be written as a Hugging Face llava"):
    hf.save_pretrained(str(tmp_path), config, params=None)
  config.model.image_token_merge = 1
  assert config.model.image_position_embedding == "sincos2d"
  with pytest.raises(ValueError, match=r"model\.image_position_embedding='sincos2d' cannot be written as a Hugging "
                                       r"Face llava"):
    hf.save_pretrained(str(tmp_path), config, params=None)
  config.model.image_position_embedding, config.model.image_position_scale = "none", 0.0
  config.model.vision.stem = "patch"
  with pytest.raises(ValueError, match=r"model\.vision\.cls_token=False cannot be written as a Hugging Face llava"):
    hf.save_pretrained(str(tmp_path), config, params=None)


def test_load_into_a_mesh_shards_every_parameter_where_it_belongs(checkpoint):
  _, directory, _ = checkpoint("paligemma_gqa_sharded")
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sharded = hf.load_pretrained(directory, mesh=mesh)
  plain = hf.load_pretrained(directory)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                         sharded.params, plain.params)
  model_config = VLMConfig.from_dict(plain.config.model)
  boxed = jax.eval_shape(VLM(model_config).init, jax.random.key(0), **model_config.example_inputs(1))
  expected = mesh_lib.param_shardings(boxed, mesh, mesh_lib.LOGICAL_RULES)["params"]
  jax.tree_util.tree_map(lambda array, sharding: (array.sharding.is_equivalent_to(sharding, array.ndim)
                                                  or pytest.fail(f"{array.sharding} != {sharding}")),
                         sharded.params, expected)
  query = sharded.params["decoder"]["layers"]["attention"]["query"]["kernel"]  # [layers, D, N, H]
  assert mesh_lib.shard_count(query) == (1, 2, 2, 1)
  assert query.addressable_shards[0].data.shape == (2, 24, 2, 8)  # no device holds the whole parameter


@pytest.mark.parametrize("layout", ["SAME2", "LINEAR", "CONV", "HEADS_IN", "HEADS_OUT", "HEADS_BIAS"])
def test_a_layout_reads_any_block_as_the_whole_tensor_would_give_it(layout):
  layout = getattr(hf_weights, layout)
  shape = {2: (6, 10), 3: (6, 3, 4), 4: (3, 4, 5, 6)}[len(layout.perm)]
  rng = np.random.default_rng(0)
  tensor = rng.standard_normal(layout.hf_shape(shape)).astype(np.float32)
  whole = layout.read(tensor, shape, tuple(slice(None) for _ in shape))
  np.testing.assert_array_equal(layout.to_hf(whole), tensor)
  for _ in range(20):
    starts = [int(rng.integers(0, size)) for size in shape]
    index = tuple(slice(start, int(rng.integers(start + 1, size + 1))) for start, size in zip(starts, shape))
    np.testing.assert_array_equal(layout.read(tensor, shape, index), whole[index])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints_load_as_float32(checkpoint, dtype, tmp_path):
  _, directory, _ = checkpoint("paligemma_mqa")
  half = str(tmp_path / "half")
  shutil.copytree(directory, half)
  path = os.path.join(half, "model.safetensors")
  tensors = {name: tensor.to(dtype) for name, tensor in safetensors.torch.load_file(path).items()}
  safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
  params = hf.load_pretrained(half).params
  expected = tensors["language_model.model.layers.1.self_attn.q_proj.weight"].float().numpy()  # [N*H, D]
  query = np.asarray(params["decoder"]["layers"]["attention"]["query"]["kernel"][1])  # [D, N, H]
  np.testing.assert_array_equal(query.reshape(query.shape[0], -1).T, expected)


# --- what vlmjax refuses, with the key, tensor or shape named ----------------------------------------------------

def _llava_config() -> dict:
  return transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(),
                                  text_config=transformers.LlamaConfig()).to_dict()


def _change(values: dict, key: str, value) -> dict:
  values = json.loads(json.dumps(values))
  *parents, last = key.split(".")
  target = values
  for parent in parents:
    target = target[parent]
  target[last] = value
  return values


@pytest.mark.parametrize("key,value,message", [
    ("model_type", "qwen3_vl", "model_type='qwen3_vl'"),
    ("architectures", ["LlavaNextForConditionalGeneration"], "architectures=['LlavaNextForConditionalGeneration']"),
    ("text_config.model_type", "mistral", "text_config.model_type='mistral'"),
    ("vision_config.model_type", "siglip_vision_model", "vision_config.model_type='siglip_vision_model'"),
    ("text_config.hidden_act", "relu", "text_config.hidden_act='relu'"),
    ("vision_config.hidden_act", "gelu_10", "vision_config.hidden_act='gelu_10'"),
    ("vision_feature_layer", [-2, -5], "vision_feature_layer=[-2, -5]"),
    ("text_config.rope_scaling", {"rope_type": "linear", "factor": 2.0}, "text_config.rope_scaling="),
    ("text_config.rope_parameters", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4},
     "text_config.rope_parameters="),
    ("text_config.attention_bias", True, "text_config.attention_bias=True"),
    ("projector_hidden_act", "relu", "projector_hidden_act='relu'"),
])
def test_unsupported_config_values_are_named(key, value, message):
  with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
    hf_config.from_hf(_change(_llava_config(), key, value))


@pytest.mark.parametrize("model_type", ["llava", "paligemma"])
def test_missing_keys_take_the_transformers_defaults(model_type):
  config_class = transformers.LlavaConfig if model_type == "llava" else transformers.PaliGemmaConfig
  ours = hf_config.from_hf({"model_type": model_type}).config.model
  assert ours == hf_config.from_hf(config_class().to_dict()).config.model  # sub-configs absent
  vision_type, text_type = hf_config.VISION_TYPE[model_type], hf_config.TEXT_TYPE[model_type]
  width = {} if model_type == "llava" else {"projection_dim": 3072}  # GemmaConfig's hidden_size
  bare = {"model_type": model_type, "vision_config": {"model_type": vision_type},
          "text_config": {"model_type": text_type}, **width}
  full = config_class(vision_config=transformers.AutoConfig.for_model(vision_type),
                      text_config=transformers.AutoConfig.for_model(text_type), **width).to_dict()
  assert hf_config.from_hf(bare).config.model == hf_config.from_hf(full).config.model  # class defaults


# config.json of llava-hf/llava-1.5-7b-hf and google/paligemma-3b-pt-224 as published (most keys left to defaults).
PUBLISHED = {
    "llava_1_5_7b": {
        "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
        "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
        "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                        "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                        "torch_dtype": "float16", "vocab_size": 32064},
        "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
        "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                          "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                          "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064},
    "paligemma_3b_224": {
        "architectures": ["PaliGemmaForConditionalGeneration"], "bos_token_id": 2, "eos_token_id": 1,
        "hidden_size": 2048, "ignore_index": -100, "image_token_index": 257152, "model_type": "paligemma",
        "pad_token_id": 0, "projection_dim": 2048,
        "text_config": {"hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2048, "intermediate_size": 16384,
                        "model_type": "gemma", "num_attention_heads": 8, "num_hidden_layers": 18,
                        "num_image_tokens": 256, "num_key_value_heads": 1, "torch_dtype": "float32",
                        "vocab_size": 257216},
        "torch_dtype": "float32", "transformers_version": "4.41.0.dev0",
        "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "model_type": "siglip_vision_model",
                          "num_attention_heads": 16, "num_hidden_layers": 27, "num_image_tokens": 256,
                          "patch_size": 14, "projection_dim": 2048, "projector_hidden_act": "gelu_fast",
                          "vision_use_head": False}},
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_configs_read_as_the_vlmjax_configs_of_those_models(name):
  hf_model = hf_config.from_hf(PUBLISHED[name])
  ours = VLMConfig.from_dict(hf_model.config.model)
  expected = VLMConfig.from_dict(importlib.import_module(f"configs.{name}").get_config().model)
  precision = dict(dtype="float32", remat_policy="none")
  assert ours.vision == expected.vision.replace(**precision)
  assert ours.decoder.replace(head_dim=0) == expected.decoder.replace(**precision, head_dim=0)
  assert ours.decoder.attention_head_dim == expected.decoder.attention_head_dim
  assert ours.replace(vision=expected.vision, decoder=expected.decoder) == expected
  assert hf_model.max_len == {"llava_1_5_7b": 4096, "paligemma_3b_224": 8192}[name]


@pytest.fixture
def llava_copy(checkpoint, tmp_path):
  _, directory, _ = checkpoint("llava_gqa")
  copy = str(tmp_path / "copy")
  shutil.copytree(directory, copy)
  return copy


def _edit_tensors(directory: str, edit) -> None:
  path = os.path.join(directory, "model.safetensors")
  tensors = safetensors.numpy.load_file(path)
  edit(tensors)
  safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})


def test_unsupported_architecture_in_config_json(llava_copy):
  path = os.path.join(llava_copy, "config.json")
  with open(path) as f:
    values = json.load(f)
  with open(path, "w") as f:
    json.dump({**values, "architectures": ["LlavaForCausalLM"]}, f)
  with pytest.raises(ValueError, match=r"architectures=\['LlavaForCausalLM'\] is not supported"):
    hf.load_pretrained(llava_copy)


def test_a_missing_tensor_is_named(llava_copy):
  _edit_tensors(llava_copy, lambda t: t.pop("language_model.model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(ValueError, match=r"missing[\s\S]*language_model\.model\.layers\.1\.mlp\.up_proj\.weight "
                                       r"\(for parameter decoder/layers/mlp/up/kernel\)"):
    hf.load_pretrained(llava_copy)


def test_an_extra_tensor_is_named(llava_copy):
  _edit_tensors(llava_copy, lambda t: t.update({"language_model.model.layers.0.self_attn.q_norm.weight":
                                                np.ones(12, np.float32)}))
  with pytest.raises(ValueError, match=r"no parameter for[\s\S]*layers\.0\.self_attn\.q_norm\.weight"):
    hf.load_pretrained(llava_copy)


def test_a_mismatched_shape_names_the_tensor_and_both_shapes(llava_copy):
  _edit_tensors(llava_copy, lambda t: t.update({"multi_modal_projector.linear_2.weight": np.ones((48, 40),
                                                                                                 np.float32)}))
  with pytest.raises(ValueError, match=r"multi_modal_projector\.linear_2\.weight: shape \[48, 40\] in the "
                                       r"checkpoint, the model needs \[48, 48\]"):
    hf.load_pretrained(llava_copy)


def test_tied_head_must_equal_the_embeddings(checkpoint, tmp_path):
  _, directory, _ = checkpoint("llava_mqa_full_tied")  # module layout: lm_head.weight is stored, equal
  copy = str(tmp_path / "copy")
  shutil.copytree(directory, copy)
  _edit_tensors(copy, lambda t: t["lm_head.weight"].__iadd__(1.0))
  with pytest.raises(ValueError, match=r"ties the output head[\s\S]*lm_head\.weight differs from "
                                       r"model\.language_model\.embed_tokens\.weight"):
    hf.load_pretrained(copy)


# --- image processor ----------------------------------------------------------------------------------------------

PROCESSORS = {
    "clip": lambda: transformers.CLIPImageProcessorPil(size={"shortest_edge": 30},
                                                       crop_size={"height": 26, "width": 30}),
    "clip_pads_small_images": lambda: transformers.CLIPImageProcessorPil(size={"shortest_edge": 20},
                                                                         crop_size={"height": 24, "width": 28}),
    "siglip": lambda: transformers.SiglipImageProcessorPil(size={"height": 28, "width": 20}, resample=1),
}


def _test_images() -> list:
  rng = np.random.default_rng(3)
  rgba = rng.integers(0, 256, (33, 21, 4), dtype=np.uint8)
  palette = Image.fromarray(rng.integers(0, 256, (17, 40, 3), dtype=np.uint8)).convert("P")
  palette.info["transparency"] = 5
  return [*random_images(4), rgba, Image.fromarray(rgba), Image.fromarray(rgba[..., 0]), palette,
          rng.integers(0, 256, (19, 23, 1), dtype=np.uint8)]


@pytest.mark.parametrize("name", list(PROCESSORS))
def test_image_processor_matches_transformers(name, tmp_path):
  processor = PROCESSORS[name]()
  processor.save_pretrained(str(tmp_path))
  ours = ImageProcessor.from_directory(str(tmp_path))
  images = _test_images()
  expected = np.concatenate([processor([image], return_tensors="np")["pixel_values"] for image in images])
  np.testing.assert_allclose(ours(images), expected.transpose(0, 2, 3, 1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("processor_type", ["CLIPImageProcessor", "SiglipImageProcessor"])
def test_image_processor_keys_left_out_take_the_class_defaults(processor_type):
  ours = ImageProcessor.from_dict({"image_processor_type": processor_type, "do_convert_rgb": None})
  theirs = getattr(transformers, processor_type + "Pil")()
  images = _test_images()
  expected = np.concatenate([theirs([image], return_tensors="np")["pixel_values"] for image in images])
  np.testing.assert_allclose(ours(images), expected.transpose(0, 2, 3, 1), atol=1e-5, rtol=0)


# --- tokenizer and chat template ------------------------------------------------------------------------------------

TEXTS = ["USER: What is in the picture? ASSISTANT:", "caption en", "", "The  quick fox — naïve café!",
         f"<s>hello</s> {IMAGE_TOKEN}{IMAGE_TOKEN} world", "<bos>x<eos><pad>", "unseen zebra words ☃"]
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A circle."}], "tool_calls": None},
    {"role": "user", "content": [{"type": "text", "text": "And its colour?"}]},
]


@pytest.mark.parametrize("name", ["llava_gqa", "paligemma_mqa"])
def test_tokenizer_and_chat_template_match_transformers(checkpoint, name):
  _, directory, _ = checkpoint(name)
  ours = Tokenizer.from_directory(directory)
  theirs = transformers.AutoTokenizer.from_pretrained(directory)
  for text in TEXTS:
    ids = theirs(text)["input_ids"]
    assert ours.encode(text) == ids, text
    assert ours.encode(text, add_special_tokens=False) == theirs(text, add_special_tokens=False)["input_ids"]
    for skip in (True, False):
      assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip), text
  assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (theirs.bos_token_id, theirs.eos_token_id,
                                                                      theirs.pad_token_id)
  for add_generation_prompt in (True, False):
    assert ours.apply_chat_template(CONVERSATION, add_generation_prompt) == theirs.apply_chat_template(
        CONVERSATION, tokenize=False, add_generation_prompt=add_generation_prompt)
  with pytest.raises(ValueError, match="unknown role robot"):
    ours.apply_chat_template([{"role": "robot", "content": "beep"}])


@pytest.mark.parametrize("name", ["llava_gqa", "paligemma_mqa"])
def test_image_placeholders_expand_as_the_processors_do(checkpoint, name):
  case, directory, _ = checkpoint(name)
  pretrained = hf.load_pretrained(directory)
  tokens_per_image = VLMConfig.from_dict(pretrained.config.model).tokens_per_image
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
  image_processor = transformers.AutoImageProcessor.from_pretrained(directory, backend="pil")
  image = random_images(1)
  if case.kind == "llava":
    processor = transformers.LlavaProcessor(image_processor, tokenizer, patch_size=case.patch_size,
                                            vision_feature_select_strategy=case.select, num_additional_image_tokens=1)
    texts = [f"USER: {IMAGE_TOKEN}\nWhat is this? ASSISTANT:"]
  else:
    image_processor.image_seq_length = tokens_per_image
    processor = transformers.PaliGemmaProcessor(image_processor, tokenizer)
    texts = ["caption en", f"{IMAGE_TOKEN}answer en where is the circle?"]
  for text in texts:
    expected = processor(images=image, text=text)["input_ids"][0]
    assert pretrained.tokenizer.encode_prompt(text, pretrained.image_token_id, tokens_per_image,
                                              pretrained.prefix_lm) == list(expected)


def test_greedy_generations_match_transformers_token_for_token(checkpoint, case_name):
  """A batch of prompts of different lengths (right-padded on our side) against transformers one row at a time:
  the same new tokens, up to and including the end token (we pad after it)."""
  import vlmjax

  case, directory, model = checkpoint(case_name)
  vlm = vlmjax.load(directory)
  pretrained = hf.load_pretrained(directory)
  images = random_images(len(PROMPTS), seed=2)
  rows = [_prompt_ids(pretrained, prompt) for prompt in PROMPTS]
  width = max(map(len, rows))
  ids = np.full((len(rows), width), vlm.pad_token_id, np.int64)
  mask = np.zeros((len(rows), width), np.int64)
  for i, row in enumerate(rows):
    ids[i, :len(row)], mask[i, :len(row)] = row, 1
  new_tokens = 8
  with jax.default_matmul_precision("highest"):
    ours = vlm.generate_ids(ids, vlm.image_processor(images), max_new_tokens=new_tokens, attention_mask=mask)
  their_pixels = transformers.AutoImageProcessor.from_pretrained(directory, backend="pil")(
      images, return_tensors="pt")["pixel_values"]
  eos = set(vlm.eos_token_ids)
  compared = []
  for i, row in enumerate(rows):
    input_ids = torch.tensor([row])
    extra = {"token_type_ids": torch.zeros_like(input_ids)} if case.kind == "paligemma" else {}
    with torch.no_grad():
      out = model.generate(input_ids=input_ids, pixel_values=their_pixels[i:i + 1],
                           attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens, do_sample=False,
                           **extra)[0, len(row):].tolist()
    end = next((j + 1 for j, token in enumerate(out) if token in eos), len(out))
    assert ours[i, :end].tolist() == out[:end], f"row {i}"
    assert all(token == vlm.pad_token_id for token in ours[i, end:])
    compared.append(end)
  assert max(compared) >= 4, f"too few tokens compared: {compared}"
  # The facade's text path gives the same first row (PaliGemma has no chat template: the processor's prompt).
  if case.kind == "paligemma":
    with jax.default_matmul_precision("highest"):
      text = vlm.generate([images[0]], [PROMPTS[0]], max_new_tokens=new_tokens)[0]
    assert text == vlm.tokenizer.decode([t for t in ours[0] if t not in eos and t != vlm.pad_token_id])
